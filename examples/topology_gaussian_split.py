"""Isotropic Gaussian split (Kong & Chaudhuri 2020, result 2; docs/theory/topology.md §3).

q = N(0, I_d), p = N(0, σ²I_d), σ > 1. Every flow of residual layers z + A h(Bᵀz + b) with M < d neurons
stays at TV ≥ TV(N(0, I_{d−M}), N(0, σ²I_{d−M})) (derivation: flowprobe.theory.topology.isotropic_floor);
with M ≥ d the target is reachable. Trains Sylvester flows below, at and above the bound M = d and prints
a markdown table of the reached KL (Monte Carlo ± 1.96 s.e.) and TV (95% interval) next to the floor.

    PYTHONPATH=src python examples/topology_gaussian_split.py [--activation identity|softplus] [--layers 1]
"""

import argparse
import time

import torch

from flowprobe.theory import topology as tp
from flowprobe.theory import topology_experiments as tx


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--neurons", default="1,2,3,4,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--activation", default="identity")
    parser.add_argument("--samples", type=int, default=400_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    neurons = [int(v) for v in args.neurons.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    eye = torch.eye(args.dim, dtype=torch.float64)
    bound = tp.gaussian_neuron_bound(eye, args.scale**2 * eye)
    print(f"q = N(0, I_{args.dim}), p = N(0, {args.scale}² I); minimum admissible M = {bound.min_neurons}")
    print(bound.statement)
    print(f"Sylvester (orthogonal) flows, activation {args.activation}, ≥ {args.layers} layer(s), reverse KL, "
          f"Adam {args.steps} steps, float64, {args.samples} MC samples\n")
    print("| M | layers | seed | side | KL (± 1.96 s.e.) | KL floor | TV [95% interval] | TV floor | TV ≥ floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    start = time.time()
    worst_margin = float("inf")
    for m in neurons:
        runs = tx.isotropic_split_experiment(args.dim, args.scale, [m], seeds, args.steps, args.layers,
                                             args.activation, samples=args.samples)
        for r in runs:
            side = "below" if m < bound.min_neurons else ("at" if m == bound.min_neurons else "above")
            if m < bound.min_neurons:
                worst_margin = min(worst_margin, float(r.tv.estimate) - r.tv_floor)
            tv = f"{float(r.tv.estimate):.5f} [{float(r.tv.low):.5f}, {float(r.tv.high):.5f}]"
            print(f"| {m} | {r.layers} | {r.seed} | {side} | {r.kl:.5f} ± {1.96 * r.kl_stderr:.5f} | "
                  f"{r.kl_floor:.5f} | {tv} | {r.tv_floor:.5f} | {'yes' if r.above_floor else 'NO'} |", flush=True)
    print(f"\nsmallest (TV − floor) over runs below the bound: {worst_margin:.5f}; total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
