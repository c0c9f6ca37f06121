"""ReLU Sylvester flows on pairs the pointwise condition forbids (Kong & Chaudhuri 2020, result 3).

For real-analytic q, p (Gaussian mixtures) an exact ReLU Sylvester transport forces p to be an affine
image of q. The two built-in pairs violate that (flowprobe.theory.topology_experiments.FORBIDDEN_PAIRS). Each flow is
fitted by maximum likelihood on samples of p; the table shows the TV at checkpoints (it stalls above 0)
and the pointwise residual ‖Cᵀ∇log p(f(z)) − ∇log q(z)‖ on 1000 off-kink points (it stays O(1)), next
to the same residual for the exact pair p := f#q (round-off).

    PYTHONPATH=src python examples/topology_relu_impossibility.py [--layers 2,4,8] [--steps 3000]
"""

import argparse
import time

import torch

from flowprobe.theory import topology_experiments as tx


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="product,mixture")
    parser.add_argument("--layers", default="2,4,8")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| pair | layers (M) | seed | TV at steps [95% interval] | residual median | residual 90% "
          "| exact-pair residual |")
    print("|---|---|---|---|---|---|---|")
    start = time.time()
    for pair in args.pairs.split(","):
        for layers in (int(v) for v in args.layers.split(",")):
            for seed in (int(v) for v in args.seeds.split(",")):
                run = tx.relu_impossibility(pair, layers, seed, args.steps)
                checkpoints = zip(run.steps, run.tv, strict=True)
                tvs = "; ".join(f"{s}: {float(e.estimate):.4f} [{float(e.low):.4f}, {float(e.high):.4f}]"
                                for s, e in checkpoints)
                print(f"| {pair} | {layers} ({2 * layers}) | {seed} | {tvs} | {run.residual_median:.3g} | "
                      f"{run.residual_p90:.3g} | {run.exact_residual_max:.1e} |", flush=True)
    for name, text in tx.FORBIDDEN_PAIRS.items():
        print(f"\n{name}: {text}", end="")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
