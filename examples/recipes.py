"""The recipe table of the README: a small search of flow specs per data set, scored on held-out points.

    python examples/recipes.py                      # everything: the README's table (wall time in the README)
    python examples/recipes.py --sets iris wine     # some data sets
    python examples/recipes.py --json recipes.json  # every spec's numbers, not just the best

Protocol (docs/density.md):

* Real sets (standardised): a fixed 20 % of the rows (permutation seeded with ``SPLIT_SEED``) is the
  **test** split, used for nothing but the numbers reported. Toy sets: 5000 training points and 5000
  fresh test points.
* Every spec of :func:`grid` (a trainable full-covariance source, initialised at the moments of the
  training split pulled back through the layers, then layer stacks) is trained with :data:`CONFIG` on the
  remaining rows, whose own validation split (20 %, drawn per seed) chooses the best weights. The seeds
  are the members of one ensemble (``fit(ensemble, seeds=…)``), each exactly as if trained alone.
* The recipe of a data set is the spec with the lowest mean **validation** NLL (the test split plays no
  part in the choice). The Gaussian (maximum likelihood, full covariance) and the Gaussian KDE (Scott's
  bandwidth) are fitted to all non-test rows, the flows' training and validation rows together.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import flowprobe as fp
from flowprobe.data import REAL_SETS, load_data, toy_data
from flowprobe.io import write_json
from flowprobe.metrics import gaussian_nll, kde_nll, nll_per_dim
from flowprobe.spec import default_spec
from flowprobe.train import FitConfig

SETS = (*REAL_SETS, "moons", "8gaussians")
SEEDS = (0, 1, 2)
SPLIT_SEED = 2024
TEST_FRACTION = 0.2
TOY_POINTS = 5000
CONFIG = FitConfig(steps=2000, lr=3e-3, batch_size=256, val_fraction=0.2, log_every=25, init_source=True)


def grid(dim: int) -> list[str]:
    """The specs tried on data of dimension ``dim`` (Sylvester neurons ``m`` and reflections ``k`` scale with it)."""
    m, k = max(1, dim // 4), dim
    return list(dict.fromkeys([
        default_spec(dim),
        "gaussian:full>radial:8",
        "gaussian:full>radial:32",
        f"gaussian:full>sylvester:8:orthogonal:m={m}",
        f"gaussian:full>householder:2:k={k}+sylvester:8:orthogonal:m={max(1, dim // 2)}",
        "gaussian:full>planar:16:tanh:umax=0.5",
    ]))


def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rest, test)``: the rows flows train and validate on, and the held-out test points."""
    if name not in REAL_SETS:
        return toy_data(name, TOY_POINTS, seed=0), toy_data(name, TOY_POINTS, seed=1)
    x = load_data(name)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(TEST_FRACTION * x.shape[0])
    return x[perm[n_test:]], x[perm[:n_test]]


def run_spec(spec: str, rest: torch.Tensor, test: torch.Tensor, seeds: tuple[int, ...], config: FitConfig) -> dict:
    """Train ``spec`` once per seed (one ensemble) and score every member."""
    torch.manual_seed(seeds[0])
    flow = fp.build_flow(spec, rest.shape[1], ensemble=len(seeds))
    started = time.perf_counter()
    histories = fp.fit(flow, data=rest.float(), seeds=list(seeds), config=config)
    seconds = time.perf_counter() - started
    test_nll = [nll_per_dim(flow.member(i), test) for i in range(len(seeds))]
    return {"spec": spec, "test": test_nll, "val": [h.best_val_nll for h in histories],
            "best_step": [h.best_step for h in histories], "seconds": seconds}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=CONFIG.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the ops are small)")
    parser.add_argument("--json", help="write every spec's numbers here")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("give at least two seeds (a spread needs two)")
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(CONFIG, steps=args.steps)
    started, results, rows = time.perf_counter(), {}, []
    for name in args.sets:
        rest, test = split(name)
        dim = rest.shape[1]
        gauss, kde = gaussian_nll(rest, test), kde_nll(rest, test)
        print(f"{name} (d = {dim}, {rest.shape[0]} rows to train and validate on, {test.shape[0]} test points): "
              f"Gaussian {gauss:.3f}, KDE {kde:.3f}", flush=True)
        runs = []
        for spec in grid(dim):
            run = run_spec(spec, rest, test, tuple(args.seeds), config)
            runs.append(run)
            print(f"  {spec:58s} test {mean_std(run['test'])}  val {statistics.mean(run['val']):.3f}  "
                  f"({run['seconds']:.0f} s)", flush=True)
        best = min(runs, key=lambda r: statistics.mean(r["val"]))
        results[name] = {"dim": dim, "gaussian": gauss, "kde": kde, "runs": runs, "best": best["spec"]}
        rows.append(f"| {name} | {dim} | `{best['spec']}` | {mean_std(best['test'])} | {gauss:.3f} | {kde:.3f} | "
                    f"{best['seconds']:.0f} s |")
    total = time.perf_counter() - started
    print(f"\n| data | d | recipe (lowest validation NLL) | flow test NLL | Gaussian | KDE | "
          f"train time ({len(args.seeds)} seeds) |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nheld-out NLL in nats/dim; {len(args.seeds)} seeds {args.seeds}, {config.steps} steps; total wall time "
          f"{total / 60:.1f} min ({args.threads} thread(s))")
    if args.json:
        results["settings"] = {"seeds": args.seeds, "steps": config.steps, "seconds": total}
        write_json(args.json, results)


if __name__ == "__main__":
    main()
