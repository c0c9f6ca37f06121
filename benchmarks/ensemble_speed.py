"""Many runs at once: E seeds of one configuration trained as one ensemble, against E sequential runs.

Workloads (``--workload``):

* ``u1`` (issue 14, the default): E = 16 seeds of planar-tanh K = 32 on U1 (Rezende & Mohamed 2015),
  reverse KL, ``--steps`` Adam steps each at batch 256 (lr 1e-3, as rows (a) of ``compare_anchors.py``),
  float32; also against E sequential normflows runs (the explicit reverse-KL loop of
  ``compare_anchors.py``: same loss, batch, Adam, lr; lighter than ``fit``: no clipping, annealing or
  records), when normflows is installed;
* ``householder`` (issue 12): a configuration of the Householder depth sweep, ``halves:2:1 → halves:1:2``
  in d = 4 at depth 2 (= T_ε), trained as ``flowprobe depth`` trains it (``depth_experiments.Training``:
  maximum likelihood through the inverse on 8192 draws of p, batch 256, lr 0.05, float64) for ``--steps``;
* ``planar``: a configuration of the bounded-planar sweep, ``normal → shift:8`` in d = 8 (κ = 1), planar-tanh
  with ‖û‖ ≤ 1 at its proven lower-bound depth (8), trained the same way.

Timed side by side in one run, after a warm-up of each. A repetition interleaves the two: the E sequential
runs go in ``--interleave`` chunks (default 4), each followed by one ensemble run, so that the ensemble's
timed window (a few seconds) is spread over the repetition as the sequential runs' is, and a burst of a
shared machine's load falls on both alike (with ``--interleave 1``: one ensemble run after the E sequential
runs, the protocol of the README's earlier rows). The ratio is the median over ``--reps`` repetitions of
each repetition's ratio, (its sequential runs' seconds) / (the mean seconds of its ensemble runs):

* **ensemble**: one ``fit`` of an ensemble flow with ``seeds=[0..E-1]`` (every member initialised as its
  solo run, ``seeded_ensemble``; the depth workloads call ``depth_experiments.train_members``);
* **flowprobe sequential**: E calls of ``fit(flow, ..., seed=s)`` on the solo flow built after
  ``torch.manual_seed(s)``.

Reported: flows trained per second of each (median seconds) and the ratios (with their smallest and
largest over the repetitions), and the largest difference between an ensemble member and its solo run
(the members must be the solo runs). ``--profile`` adds the top ops of 20 steps of the ensemble and of one
solo run (``torch.profiler``).

Run: ``PYTHONPATH=src python benchmarks/ensemble_speed.py [--workload u1] [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import flowprobe as fp
from flowprobe.distributions import rezende_energy
from flowprobe.io import write_json
from flowprobe.spec import build_layers
from flowprobe.theory import depth_experiments as dx
from flowprobe.theory.depth_experiments import seeded_ensemble
from flowprobe.theory.depth_pairs import load_pair

sys.path.insert(0, str(Path(__file__).parent))
import compare_anchors  # noqa: E402  (its normflows adapter and reverse-KL step)

SPEC, DIM, BATCH, LR = "planar:32:tanh", 2, 256, 1e-3
U1 = rezende_energy("U1")
THREADS = int(os.environ.get("FLOWPROBE_BENCH_THREADS", "2"))


@dataclasses.dataclass
class Workload:
    """What one flow's training is: ``ensemble(seeds, steps)`` and ``solo(seed, steps)`` return the trained
    flows; ``normflows(seed, steps)`` the same run in normflows, where there is one."""

    description: str
    ensemble: Callable[[list[int], int], fp.Flow]
    solo: Callable[[int, int], fp.Flow]
    normflows: Callable[[int, int], None] | None = None


def u1_workload() -> Workload:
    settings = {"lr": LR, "batch_size": BATCH}

    def ensemble(seeds: list[int], steps: int) -> fp.Flow:
        flow = seeded_ensemble(SPEC, fp.StandardNormal(DIM), seeds)
        fp.fit(flow, energy=U1, seeds=seeds, steps=steps, log_every=steps, **settings)
        return flow

    def solo(seed: int, steps: int) -> fp.Flow:
        torch.manual_seed(seed)
        flow = fp.build_flow(SPEC, DIM)
        fp.fit(flow, energy=U1, seed=seed, steps=steps, log_every=steps, **settings)
        return flow

    def normflows(seed: int, steps: int) -> None:
        torch.manual_seed(seed)
        model = compare_anchors.build("normflows", "planar-tanh", 32, DIM)
        step = compare_anchors.rkl_step(model, torch.optim.Adam(model.parameters(), lr=LR), BATCH)
        for _ in range(steps):
            step()

    return Workload(f"{SPEC} on U1, reverse KL, batch {BATCH}, lr {LR:g}, float32", ensemble, solo,
                    normflows if compare_anchors.installed("normflows") else None)


def depth_workload(family: str, source: str, target: str, dim: int, depth: int | None) -> Workload:
    """A configuration of a ``flowprobe depth`` sweep, trained as the sweep trains it (``train_members``), at
    ``depth`` layers (default: the proven lower bound for ε = 0.1)."""
    pair = load_pair(source, target, dim)
    if depth is None:
        theory = dx.theory_of(family, pair)
        assert theory is not None
        depth = theory.lower_bound(0.1)
    torch.manual_seed(0)
    data = pair.target.sample(dx.Training().train_samples)
    spec = dx.family_spec(family, depth)

    def training(steps: int) -> dx.Training:
        return dx.Training(steps=steps)

    def ensemble(seeds: list[int], steps: int) -> fp.Flow:
        return dx.train_members(family, pair, depth, seeds, data, training(steps))[0]

    def solo(seed: int, steps: int) -> fp.Flow:
        t = training(steps)
        torch.manual_seed(seed)
        flow = fp.Flow(pair.source, build_layers(spec, pair.dim)).to(pair.source.anchor)
        fp.fit(flow, data=data, seed=seed, steps=t.steps, lr=t.lr, batch_size=t.batch_size,
               log_every=max(1, min(50, t.steps)))
        return flow

    t = dx.Training()
    return Workload(f"{spec}, {source} → {target} in d = {dim}, maximum likelihood on {t.train_samples} draws, "
                    f"batch {t.batch_size}, lr {t.lr:g}, {t.dtype} (a `flowprobe depth` configuration)",
                    ensemble, solo)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "u1": u1_workload,
    "householder": lambda: depth_workload("householder", "halves:2:1", "halves:1:2", 4, 2),
    "planar": lambda: depth_workload("planar:tanh:umax=1.0", "normal", "shift:8.0", 8, None),
}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def profile(work: Workload, seeds: list[int]) -> dict[str, str]:
    """The top ops (self CPU time) of 20 steps of the ensemble and of one solo flow."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for name, run in (("ensemble", lambda: work.ensemble(seeds, 20)), ("solo", lambda: work.solo(0, 20))):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return tables


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="u1", help="what each flow's training is "
                        "(default u1)")
    parser.add_argument("--members", type=int, default=16, help="E: seeds per ensemble (default 16)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per flow (default 500 for u1, the "
                        "sweeps' 1000 for the depth workloads)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of ensemble vs sequential (default 5)")
    parser.add_argument("--interleave", type=int, default=4, help="ensemble runs per repetition, one after each "
                        "chunk of the sequential runs (default 4)")
    parser.add_argument("--quick", action="store_true", help="4 members, 30 steps, 2 repetitions (a smoke test)")
    parser.add_argument("--profile", action="store_true", help="print where the time of a step goes")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else 500 if args.workload == "u1" else dx.Training().steps
    members, steps, reps = (4, 30, 2) if args.quick else (args.members, steps, args.reps)
    interleave = min(args.interleave, members)
    if min(members, steps, reps, interleave) < 1:
        parser.error("--members, --steps, --reps and --interleave must be positive")
    torch.set_num_threads(THREADS)
    work = WORKLOADS[args.workload]()
    seeds = list(range(members))

    work.ensemble(seeds[:2], 5), work.solo(0, 5)  # warm-up: first-call costs out of the timings
    if work.normflows is not None:
        work.normflows(0, 5)
    # per repetition: the mean of its ensemble runs, the sum of its sequential runs
    runs: dict[str, list[float]] = {"ensemble": [], "flowprobe sequential": []}
    chunks = [seeds[i * members // interleave : (i + 1) * members // interleave] for i in range(interleave)]
    ensemble_runs = []
    for _ in range(reps):
        sequential, solos = 0.0, []
        for chunk in chunks:
            start = time.perf_counter()
            solos += [work.solo(s, steps) for s in chunk]
            sequential += time.perf_counter() - start
            seconds, ensemble = timed(lambda: work.ensemble(seeds, steps))
            ensemble_runs.append(seconds)
        runs["ensemble"].append(sum(ensemble_runs[-interleave:]) / interleave)
        runs["flowprobe sequential"].append(sequential)
    if work.normflows is not None:
        runs["normflows sequential"] = [timed(lambda: [work.normflows(s, steps) for s in seeds])[0]]
    seconds = {name: statistics.median(values) for name, values in runs.items()}
    paired = [b / a for a, b in zip(runs["ensemble"], runs["flowprobe sequential"], strict=True)]
    difference = max(
        float((a - b).detach().abs().max())
        for i, solo in enumerate(solos)
        for a, b in zip(ensemble.member(i).parameters(), solo.parameters(), strict=True)
    )
    rates = {name: members / s for name, s in seconds.items()}
    result = {
        "workload": args.workload,
        "work": f"{members} × {work.description}, {steps} steps",
        "threads": THREADS,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "repetitions": reps,
        "ensemble_runs_per_repetition": interleave,
        "seconds": seconds,
        "seconds_per_repetition": runs,
        "ensemble_seconds_per_run": ensemble_runs,
        "flows_per_s": rates,
        "speedup_vs_flowprobe_sequential": statistics.median(paired),
        "speedup_vs_flowprobe_sequential_range": [min(paired), max(paired)],
        "speedup_vs_normflows_sequential": (rates["ensemble"] / rates["normflows sequential"])
        if "normflows sequential" in rates else "not measured (u1 only; normflows installed)",
        "max_member_vs_solo_difference": difference,
    }
    print(f"{result['work']}; {THREADS} thread(s); median of {reps} repetitions of {interleave} ensemble run(s) "
          f"interleaved with the {members} sequential ones"
          + (" (normflows: one)" if "normflows sequential" in runs else ""))
    print(f"| {'':<22} | {'wall s':>8} | {'flows/s':>8} | {'ensemble ×':>10} |")
    for name, s in seconds.items():
        ratio = statistics.median(paired) if name == "flowprobe sequential" else rates["ensemble"] / rates[name]
        print(f"| {name:<22} | {s:>8.2f} | {rates[name]:>8.3f} | {ratio:>10.2f} |")
    print(f"ensemble × flowprobe sequential per repetition: {', '.join(f'{r:.2f}' for r in paired)}")
    if args.workload == "u1" and work.normflows is None:
        print("normflows: not installed (pip install normflows==1.7.3)")
    print(f"largest |ensemble member − solo run| over the parameters: {difference:.2e}")
    if args.profile:
        for name, table in profile(work, seeds).items():
            print(f"\n{name}: 20 steps\n{table}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
