"""Wall time of a whole reverse-KL run on U1, PyTorch kernels against the compiled run kernels.

Each run is a fresh process (``python -c`` calling :func:`flowprobe.fit`), ``K = 32``, ``d = 2``,
batch 256, Adam, ``--steps`` steps (default 20 000), float32, ``--threads`` torch threads:

* ``eager``: ``FLOWPROBE_NATIVE=0`` — the PyTorch kernels (the pure-torch path every device has);
* ``native cold``: an empty kernel cache (``FLOWPROBE_CACHE``) and ``FLOWPROBE_NATIVE=1`` — the
  C++ build (``layers/runs.cpp``) is part of the wall time;
* ``native warm``: the same cache again — the built module is loaded.

The three variants of one family run back to back, families in turn, ``--reps`` times; the table
gives the median wall time of each. Run: ``python benchmarks/whole_run.py [--steps 20000]
[--reps 1] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from flowprobe.io import write_json

RUN = """
import torch, flowprobe as fp
from flowprobe.distributions import rezende_energy
torch.manual_seed(0)
torch.set_num_threads({threads})
flow = fp.build_flow("{family}:32", 2)
history = fp.fit(flow, energy=rezende_energy("U1"), steps={steps}, batch_size=256, lr=1e-3, log_every={steps})
print(history.records[-1]["loss"])
"""


def wall_time(family: str, steps: int, threads: int, env: dict[str, str]) -> tuple[float, float]:
    """Seconds of one fresh-process run and its final loss."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN.format(family=family, steps=steps, threads=threads)],
                          env=os.environ | env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=["planar", "radial"])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.reps):
        for family in args.families:
            with tempfile.TemporaryDirectory() as cache:
                variants = {"eager": {"FLOWPROBE_NATIVE": "0"},
                            "native cold": {"FLOWPROBE_NATIVE": "1", "FLOWPROBE_CACHE": cache},
                            "native warm": {"FLOWPROBE_NATIVE": "1", "FLOWPROBE_CACHE": cache}}
                for name, env in variants.items():
                    seconds, loss = wall_time(family, args.steps, args.threads, env)
                    rows.setdefault(family, {}).setdefault(name, []).append(seconds)
                    print(f"{family:7s} {name:12s} {seconds:8.1f} s  final loss {loss:.4f}", flush=True)
    table = {family: {name: statistics.median(times) for name, times in variants.items()}
             for family, variants in rows.items()}
    print(f"\n| {args.steps} steps | eager | native cold | native warm | eager / warm |\n|---|---|---|---|---|")
    for family, times in table.items():
        print(f"| {family} | {times['eager']:.1f} s | {times['native cold']:.1f} s | {times['native warm']:.1f} s "
              f"| {times['eager'] / times['native warm']:.2f}× |")
    if args.json:
        write_json(args.json, {"steps": args.steps, "threads": args.threads, "torch": torch.__version__,
                               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "load": os.getloadavg(), "seconds": table})


if __name__ == "__main__":
    main()
