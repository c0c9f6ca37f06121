"""Many runs at once: E seeds of one architecture trained as one ensemble, against E sequential runs.

The work (issues 12 and 14): E = 16 seeds of planar-tanh K = 32 on U1 (Rezende & Mohamed 2015), reverse
KL, ``--steps`` Adam steps each at batch 256 (lr 1e-3, as rows (a) of ``compare_anchors.py``), float32.
Timed side by side in one run, after a warm-up of each; the ensemble and the flowprobe sequential runs
alternate ``--reps`` times (the ensemble's timed window is short, so one repetition is at the mercy of
a shared machine's noise), and the ratio is the median over repetitions of the paired ratios:

* **ensemble**: one ``flowprobe.fit(flow, energy=U1, seeds=[0..E-1])`` of an ensemble flow (every member
  initialised as its solo run, ``seeded_ensemble``);
* **flowprobe sequential**: E calls of ``flowprobe.fit(flow, energy=U1, seed=s)``;
* **normflows sequential**: E runs of the explicit reverse-KL loop of ``compare_anchors.py`` (same loss,
  batch, Adam, lr; lighter than ``fit``: no clipping, annealing or records), when normflows is installed.

Reported: flows trained per second of each (median seconds) and the ratios (with their smallest and
largest over the repetitions), and the largest difference between an
ensemble member and its solo run (the members must be the solo runs). ``--profile`` adds the top ops
of one ensemble step and one solo step (``torch.profiler``).

Run: ``PYTHONPATH=src python benchmarks/ensemble_speed.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import flowprobe as fp
from flowprobe.distributions import rezende_energy
from flowprobe.theory.depth_experiments import seeded_ensemble

sys.path.insert(0, str(Path(__file__).parent))
import compare_anchors  # noqa: E402  (its normflows adapter and reverse-KL step)

SPEC, DIM, BATCH, LR = "planar:32:tanh", 2, 256, 1e-3
U1 = rezende_energy("U1")
THREADS = int(os.environ.get("FLOWPROBE_BENCH_THREADS", "2"))


def settings(steps: int) -> dict:
    return {"steps": steps, "lr": LR, "batch_size": BATCH, "log_every": steps}


def ensemble_run(seeds: list[int], steps: int) -> fp.Flow:
    flow = seeded_ensemble(SPEC, fp.StandardNormal(DIM), seeds)
    fp.fit(flow, energy=U1, seeds=seeds, **settings(steps))
    return flow


def solo_run(seed: int, steps: int) -> fp.Flow:
    torch.manual_seed(seed)
    flow = fp.build_flow(SPEC, DIM)
    fp.fit(flow, energy=U1, seed=seed, **settings(steps))
    return flow


def normflows_run(seed: int, steps: int) -> None:
    torch.manual_seed(seed)
    model = compare_anchors.build("normflows", "planar-tanh", 32, DIM)
    step = compare_anchors.rkl_step(model, torch.optim.Adam(model.parameters(), lr=LR), BATCH)
    for _ in range(steps):
        step()


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def profile(seeds: list[int]) -> dict[str, str]:
    """The top ops (self CPU time) of 20 steps of the ensemble and of one solo flow."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for name, run in (("ensemble", lambda: ensemble_run(seeds, 20)), ("solo", lambda: solo_run(0, 20))):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return tables


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=16, help="E: seeds per ensemble (default 16)")
    parser.add_argument("--steps", type=int, default=500, help="Adam steps per flow (default 500)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of ensemble vs sequential (default 5)")
    parser.add_argument("--quick", action="store_true", help="4 members, 30 steps, 2 repetitions (a smoke test)")
    parser.add_argument("--profile", action="store_true", help="print where the time of a step goes")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args(argv)
    members, steps, reps = (4, 30, 2) if args.quick else (args.members, args.steps, args.reps)
    if min(members, steps, reps) < 1:
        parser.error("--members, --steps and --reps must be positive")
    torch.set_num_threads(THREADS)
    seeds = list(range(members))
    have_normflows = compare_anchors.installed("normflows")

    ensemble_run(seeds[:2], 5), solo_run(0, 5)  # warm-up: first-call costs out of the timings
    if have_normflows:
        normflows_run(0, 5)
    runs: dict[str, list[float]] = {"ensemble": [], "flowprobe sequential": []}
    for _ in range(reps):
        seconds, ensemble = timed(lambda: ensemble_run(seeds, steps))
        runs["ensemble"].append(seconds)
        seconds, solos = timed(lambda: [solo_run(s, steps) for s in seeds])
        runs["flowprobe sequential"].append(seconds)
    if have_normflows:
        runs["normflows sequential"] = [timed(lambda: [normflows_run(s, steps) for s in seeds])[0]]
    seconds = {name: statistics.median(values) for name, values in runs.items()}
    paired = [b / a for a, b in zip(runs["ensemble"], runs["flowprobe sequential"], strict=True)]
    difference = max(
        float((a - b).detach().abs().max())
        for i, solo in enumerate(solos)
        for a, b in zip(ensemble.member(i).parameters(), solo.parameters(), strict=True)
    )
    rates = {name: members / s for name, s in seconds.items()}
    result = {
        "work": f"{members} × {SPEC} on U1, reverse KL, {steps} steps at batch {BATCH}, lr {LR:g}, float32",
        "threads": THREADS,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "repetitions": reps,
        "seconds": seconds,
        "seconds_per_repetition": runs,
        "flows_per_s": rates,
        "speedup_vs_flowprobe_sequential": statistics.median(paired),
        "speedup_vs_flowprobe_sequential_range": [min(paired), max(paired)],
        "speedup_vs_normflows_sequential": (rates["ensemble"] / rates["normflows sequential"]) if have_normflows
        else "normflows not installed",
        "max_member_vs_solo_difference": difference,
    }
    print(f"{result['work']}; {THREADS} thread(s); median of {reps} repetitions (normflows: one)")
    print(f"| {'':<22} | {'wall s':>8} | {'flows/s':>8} | {'ensemble ×':>10} |")
    for name, s in seconds.items():
        ratio = statistics.median(paired) if name == "flowprobe sequential" else rates["ensemble"] / rates[name]
        print(f"| {name:<22} | {s:>8.2f} | {rates[name]:>8.3f} | {ratio:>10.2f} |")
    print(f"ensemble × flowprobe sequential per repetition: {', '.join(f'{r:.2f}' for r in paired)}")
    if not have_normflows:
        print("normflows: not installed (pip install normflows==1.7.3)")
    print(f"largest |ensemble member − solo run| over the parameters: {difference:.2e}")
    if args.profile:
        for name, table in profile(seeds).items():
            print(f"\n{name}: 20 steps\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
