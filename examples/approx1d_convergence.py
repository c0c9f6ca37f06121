"""Convergence study of the 1-D ReLU planar construction, and the same depths trained by MLE.

Part 1: exact TV of the construction against n ∈ {4, 10, 25, 50, 100, 300, 1000} for every built-in
target, with the fitted log-log slope. Part 2: for a few targets, ReLU planar and tanh planar flows
of the same depths trained by maximum likelihood (``flowprobe.fit``: Adam at a constant learning
rate, no clipping, no validation split, fixed seed), TV of the trained flow on a fine grid, beside
the construction.

    PYTHONPATH=src python examples/approx1d_convergence.py [--quick] [--json out.json]
"""

import argparse
import json
import time

import numpy as np
import torch

from flowprobe import Flow, Planar, StandardNormal, fit
from flowprobe.theory.approx1d import PiecewiseLinearMap, construct, convergence_study, loglog_slope
from flowprobe.theory.targets1d import BUILTIN_TARGETS, parse_target
from flowprobe.theory.tv import tv_quadrature

GRID = (4, 10, 25, 50, 100, 300, 1000)


def trained_flow(target, n, activation, steps, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(target.sample(20_000, rng)).unsqueeze(1)
    layers = [Planar(1, activation).double() for _ in range(n)]
    lo, hi = np.quantile(data.numpy(), [0.02, 0.98])
    with torch.no_grad():  # start near the identity, breakpoints spread over the data (b = −w c)
        for layer in layers:
            layer.u.mul_(0.01)
            layer.b.copy_(-layer.w[0] * float(rng.uniform(lo, hi)))
    flow = Flow(StandardNormal(1).double(), layers)
    fit(flow, data=data, steps=steps, lr=1e-2, batch_size=512, schedule="constant", clip=None, val_fraction=0.0,
        log_every=steps, seed=seed)
    return flow


def trained_tv(target, flow):
    """Exact TV (collapsed map + quadrature) for ReLU flows; a fine-grid TV for tanh flows."""
    flow.eval()
    if flow.layers[0].act.piecewise_linear:
        pwl = PiecewiseLinearMap.from_flow(flow)
        return tv_quadrature(target.log_pdf, pwl.log_prob, pwl.x_knots)
    lo, hi = target.ppf(np.array([1e-7, 1 - 1e-7]))
    x = np.linspace(lo - 1, hi + 1, 40_001)
    with torch.no_grad():
        q = flow.log_prob(torch.from_numpy(x).unsqueeze(1)).exp().numpy()
    p = np.exp(target.log_pdf(x))
    outside_q = 1 - np.trapezoid(q, x)
    return 0.5 * (np.trapezoid(np.abs(p - q), x) + abs(outside_q))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grids (smoke test)")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per trained flow")
    parser.add_argument("--json", help="write all numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = (4, 10, 25) if args.quick else GRID
    report = {"construction": {}, "trained": {}}

    print("Part 1: exact TV of the construction (optimal knots, tv tails)")
    print(f"{'target':>13} " + " ".join(f"{n:>9}" for n in grid) + "    slope  slope(n>=25)")
    for name in BUILTIN_TARGETS:
        study = convergence_study(name, grid)
        tv = [r["tv"] for r in study["results"]]
        late = [n for n in grid if n >= 25]
        slope_late = loglog_slope(late, tv[-len(late):]) if len(late) > 1 else float("nan")
        report["construction"][name] = {"layers": list(grid), "tv": tv, "slope": study["slope"]}
        print(f"{name:>13} " + " ".join(f"{v:9.2e}" for v in tv) + f"  {study['slope']:7.3f}  {slope_late:7.3f}",
              flush=True)
    reference = convergence_study("blog-mixture", grid, knots="equispaced", tail="height")
    print(f"{'blog (ref.)':>13} " + " ".join(f"{r['tv']:9.2e}" for r in reference["results"])
          + f"  {reference['slope']:7.3f}   (docs/theory/approx1d.md §6: equispaced on [-4, 4], height tails)")

    train_grid = (4, 10, 25) if args.quick else (4, 10, 25, 50)
    steps = 200 if args.quick else args.steps
    print(f"\nPart 2: trained by MLE ({steps} Adam steps, lr 1e-2, batch 512, 20000 samples, seed 0)")
    for name in ("blog-mixture",):
        target = parse_target(name)
        rows = {"constructed": [], "relu-trained": [], "tanh-trained": []}
        for n in train_grid:
            rows["constructed"].append(construct(target, n).tv())
            for act in ("relu", "tanh"):
                start = time.perf_counter()
                rows[f"{act}-trained"].append(trained_tv(target, trained_flow(target, n, act, steps)))
                print(f"  [{name} n={n} {act}: {time.perf_counter() - start:.0f}s]", flush=True)
        report["trained"][name] = {"layers": list(train_grid), **rows}
        print(f"{name}: TV by depth " + " ".join(f"{n:>9}" for n in train_grid) + "    slope")
        for label, tv in rows.items():
            print(f"{label:>26} " + " ".join(f"{v:9.2e}" for v in tv) + f"  {loglog_slope(train_grid, tv):7.3f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
