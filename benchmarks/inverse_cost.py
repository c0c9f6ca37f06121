"""Cost of ``Flow.log_prob`` (through the inverses) relative to ``rsample_and_log_prob``.

Planar-tanh, K = 32, d = 2 by default (``--family`` takes any spec family: ``sylvester:kind=orthogonal``
and so on); both timed side by side (alternating), medians of ``--reps`` repetitions after a warm-up,
without gradient (evaluation) and with gradient (a training step's forward + backward). The performance
issues' bounds: ratio ≤ 3 for planar; ≤ 5 with gradient for Sylvester-O/H/T, K = 16, d = 64
(``--family sylvester:kind=orthogonal --layers 16 --dim 64``). ``--unfused`` times the layer-by-layer
path for comparison.

Run: ``PYTHONPATH=src python benchmarks/inverse_cost.py [--family F] [--batch 4096] [--unfused]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import flowprobe as fp
from flowprobe.io import write_json
from flowprobe.layers import fused_kernels


def median_time(fns: dict[str, Callable[[], object]], reps: int, target_s: float) -> dict[str, float]:
    calls = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(target_s / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="planar:tanh", help="layer spec without the count (default planar:tanh)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--unfused", action="store_true", help="layer-by-layer path (fused kernels off)")
    parser.add_argument("--json", help="write the times and ratios to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    family, _, options = args.family.partition(":")
    spec = f"{family}:{args.layers}" + (f":{options}" if options else "")
    flow = fp.build_flow(spec, args.dim).to(dtype)
    for p in flow.parameters():  # a trained-looking flow: non-trivial weights
        p.data.add_(0.5 * torch.randn_like(p))
    with torch.no_grad():
        x = flow.sample(args.batch)

    def grad_step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            flow.zero_grad(set_to_none=True)
            fn().mean().backward()

        return step

    out = {}
    with fused_kernels(not args.unfused):
        with torch.no_grad():
            t = median_time(
                {"log_prob": lambda: flow.log_prob(x), "rsample": lambda: flow.rsample_and_log_prob(args.batch)},
                args.reps,
                args.target,
            )
        out["no_grad_ratio"] = t["log_prob"] / t["rsample"]
        tg = median_time(
            {
                "log_prob": grad_step(lambda: flow.log_prob(x)),
                "rsample": grad_step(lambda: flow.rsample_and_log_prob(args.batch)[1]),
            },
            args.reps,
            args.target,
        )
        out["grad_ratio"] = tg["log_prob"] / tg["rsample"]
    path = "layer-by-layer" if args.unfused else "fused"
    print(f"{spec} d={args.dim} batch={args.batch} {args.dtype} ({path}, {args.threads} threads)")
    print(f"  no grad:   log_prob {t['log_prob'] * 1e3:.2f} ms, rsample_and_log_prob {t['rsample'] * 1e3:.2f} ms, "
          f"ratio {out['no_grad_ratio']:.2f}")
    print(f"  with grad: log_prob {tg['log_prob'] * 1e3:.2f} ms, rsample_and_log_prob {tg['rsample'] * 1e3:.2f} ms, "
          f"ratio {out['grad_ratio']:.2f}")
    out |= {"spec": spec, "dim": args.dim, "batch": args.batch, "dtype": args.dtype, "threads": args.threads,
            "path": path, "repetitions": args.reps, "seconds_no_grad": t, "seconds_with_grad": tg,
            "torch": torch.__version__}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
