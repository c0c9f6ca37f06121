"""The recipe table of the README: a small search of flow specs per data set, scored on held-out points.

    python examples/recipes.py                      # everything: the README's table (wall time in the README)
    python examples/recipes.py --sets iris wine     # some data sets
    python examples/recipes.py --json recipes.json  # every spec's numbers, not just the best
    python examples/recipes.py --tables recipes.json  # the tables again, from a saved run

Protocol (docs/density.md, "Recipes"):

* Real sets (standardised, as ``flowprobe fit --data`` loads them): a fixed 20 % of the rows (permutation
  seeded with ``SPLIT_SEED``) is the **test** split, used for nothing but the numbers reported. Toy sets:
  5000 points to train and validate on, 5000 fresh test points.
* Every spec of :func:`grid` (a trainable full-covariance source, then layer stacks; the layers start at
  the identity and the source at the training split's moments, so step 0 is the Gaussian) is trained
  with :data:`CONFIG` on the remaining rows, whose validation split (20 %, drawn per seed) chooses the
  best weights, the initial flow included (step 0), and stops a member after ``patience`` validations
  without improvement. The seeds are the members of one ensemble (``fit(ensemble, seeds=…)``), each
  trained exactly as alone.
* The baselines are those ``flowprobe fit --json`` reports: the maximum-likelihood full-covariance
  Gaussian and the Gaussian KDE (Scott's bandwidth), fitted per seed to that seed's training split (the
  rows the flow trains on) and scored on the same test points.
* ``Δ`` is the test NLL of the flow minus the Gaussian's, paired per seed (mean ± standard deviation);
  a spec *loses* to the Gaussian when ``mean Δ > 2 std Δ / √seeds`` (worse beyond seed noise).
* The recipe of a data set is the spec with the lowest mean **validation** NLL (the test split plays no
  part in the choice).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch

import flowprobe as fp
from flowprobe.data import REAL_SETS, load_data, toy_data
from flowprobe.io import read_json, write_json
from flowprobe.metrics import gaussian_nll, kde_nll, nll_per_dim
from flowprobe.spec import default_spec
from flowprobe.train import FitConfig, split_data

SETS = (*REAL_SETS, "moons", "8gaussians")
SEEDS = (0, 1, 2)
SPLIT_SEED = 2024
TEST_FRACTION = 0.2
TOY_POINTS = 5000
CONFIG = FitConfig(steps=1000, lr=3e-3, batch_size=256, val_fraction=0.2, patience=12, log_every=25,
                   init_source=True)


def grid(dim: int) -> list[str]:
    """The specs tried on data of dimension ``dim``: the default, and a few stacks of each family (Sylvester
    neurons ``m`` grow with the dimension)."""
    m = min(dim, max(2, dim // 8))
    return list(dict.fromkeys([
        "gaussian:full>radial:8",
        "gaussian:full>radial:16",
        "gaussian:full>planar:16:tanh:umax=0.5",
        f"gaussian:full>sylvester:8:orthogonal:m={m}",
        default_spec(dim),  # gaussian:full>sylvester:4:orthogonal:m={m}+radial:8
    ]))


def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rest, test)``: the rows flows train and validate on, and the held-out test points."""
    if name not in REAL_SETS:
        return toy_data(name, TOY_POINTS, seed=0), toy_data(name, TOY_POINTS, seed=1)
    x = load_data(name)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(TEST_FRACTION * x.shape[0])
    return x[perm[n_test:]], x[perm[:n_test]]


def baselines(rest: torch.Tensor, test: torch.Tensor, seeds: tuple[int, ...], config: FitConfig) -> dict:
    """Test NLL of the Gaussian and the KDE fitted to each seed's training split."""
    trains = [split_data(rest, config.val_fraction, seed)[0] for seed in seeds]
    return {"gaussian": [gaussian_nll(t, test) for t in trains], "kde": [kde_nll(t, test) for t in trains]}


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


def versus(flow: list[float], gauss: list[float]) -> tuple[str, bool]:
    """``Δ`` (flow − Gaussian, paired per seed) as text, and whether the flow loses beyond seed noise."""
    delta = [f - g for f, g in zip(flow, gauss, strict=True)]
    mean, std = statistics.mean(delta), statistics.stdev(delta)
    return f"{mean:+.3f} ± {std:.3f}", mean > 2 * std / math.sqrt(len(delta))


def tables(results: dict) -> str:
    """The README's table (the recipe of each data set, the default spec beside it) and the table of every
    spec, as markdown, from the results :func:`main` collects (or writes with ``--json``)."""
    settings = results["settings"]
    seeds = settings["seeds"]
    best_rows, all_rows = [], []
    for name, result in results.items():
        if name == "settings":
            continue
        runs = {run["spec"]: run for run in result["runs"]}
        best, default = runs[result["best"]], runs[default_spec(result["dim"])]
        best_rows.append(f"| {name} | {result['dim']} | `{best['spec'].removeprefix('gaussian:full>')}` | "
                         f"{mean_std(best['test'])} | {mean_std(default['test'])} | {mean_std(result['gaussian'])} | "
                         f"{mean_std(result['kde'])} | {best['seconds']:.0f} s |")
        all_rows += [f"| {name} | `{run['spec'].removeprefix('gaussian:full>')}` | {mean_std(run['test'])} | "
                     f"{run['delta']} | {'**yes**' if run['loses'] else 'no'} | {run['seconds']:.0f} s |"
                     for run in result["runs"]]
    return "\n".join([
        f"| data | d | recipe (lowest validation NLL) | its NLL | default spec's NLL | Gaussian | KDE | recipe's time "
        f"({len(seeds)} seeds) |", "|---|---|---|---|---|---|---|---|", *best_rows, "",
        "| data | spec | flow | Δ = flow − Gaussian | loses | train time |", "|---|---|---|---|---|---|", *all_rows, "",
        f"Held-out NLL in nats/dim, mean ± std over seeds {seeds}; every spec behind `gaussian:full>`, at most "
        f"{settings['config']['steps']} steps; total wall time {settings['seconds'] / 60:.1f} min.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=CONFIG.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the ops are small)")
    parser.add_argument("--json", help="write every spec's numbers here")
    parser.add_argument("--tables", metavar="JSON", help="only print the tables of a run saved with --json")
    args = parser.parse_args()
    if args.tables:
        print(tables(read_json(args.tables)))
        return
    if len(args.seeds) < 2:
        parser.error("give at least two seeds (a spread needs two)")
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(CONFIG, steps=args.steps)
    seeds = tuple(args.seeds)
    started, results = time.perf_counter(), {}
    for name in args.sets:
        rest, test = split(name)
        base = baselines(rest, test, seeds, config)
        print(f"{name} (d = {rest.shape[1]}, {rest.shape[0]} rows to train and validate on, {test.shape[0]} test "
              f"points): Gaussian {mean_std(base['gaussian'])}, KDE {mean_std(base['kde'])}", flush=True)
        runs = []
        for spec in grid(rest.shape[1]):
            run = run_spec(spec, rest, test, seeds, config)
            run["delta"], run["loses"] = versus(run["test"], base["gaussian"])
            runs.append(run)
            print(f"  {spec:52s} test {mean_std(run['test'])}  Δ {run['delta']}  val "
                  f"{statistics.mean(run['val']):.3f}  best steps {run['best_step']}  ({run['seconds']:.0f} s)"
                  f"{'  LOSES to the Gaussian' if run['loses'] else ''}", flush=True)
        best = min(runs, key=lambda r: statistics.mean(r["val"]))
        results[name] = {"dim": rest.shape[1], **base, "runs": runs, "best": best["spec"]}
    results["settings"] = {"seeds": list(seeds), "config": dataclasses.asdict(config),
                           "seconds": time.perf_counter() - started, "threads": args.threads}
    print("\n" + tables(results))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
