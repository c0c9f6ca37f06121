"""The README performance table for two checkouts of flowprobe, measured side by side in one run.

Every row of ``benchmarks/compare_anchors.py`` is timed by each checkout's own copy of that script
(its own flowprobe on ``PYTHONPATH``), in two long-lived worker processes (``checkout_worker.py``)
that take turns **one repetition at a time** (and which one goes first alternates), so that a change
in the machine's speed — other jobs, a throttled virtual CPU — hits both alike; the median repetition
of each is reported. The anchors (normflows, Pyro) are timed by the after-checkout's worker in the
same rotation. The memory rows (e) run once per checkout at the end. The table gives both checkouts'
median numbers and the median over repetitions of the ratio after/before of adjacent repetitions (the
pairs that ran under the same conditions).

Run: ``python benchmarks/compare_checkouts.py --before ../old-checkout [--after .] [--rows a,b1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
ANCHORS = ("normflows", "pyro")


class Worker:
    """A checkout's ``checkout_worker.py`` process: ``prepare`` a row, then time one repetition per ``rep``."""

    def __init__(self, checkout: Path) -> None:
        env = os.environ | {"PYTHONPATH": str(checkout / "src")}
        command = [sys.executable, str(HERE / "benchmarks" / "checkout_worker.py"), str(checkout)]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **request: object) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker stopped (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def time_interleaved(workers: dict[str, Worker], key: str, reps: int, target: float, pause: float) -> dict[str, Any]:
    """One row, the two checkouts (and the anchors, on the after side) taking turns one repetition at a
    time, with ``pause`` seconds before each (the OpenMP threads of the worker that just finished spin-wait
    for a while: without the pause they would slow whichever worker runs next).

    Returns:
        ``{checkout: {lib: median units/s, or the reason it cannot}}`` and ``"paired_ratio"``: the median
        over repetitions of after/before of adjacent repetitions (flowprobe).
    """
    libs = {"before": ["flowprobe"], "after": ["flowprobe", *ANCHORS]}
    calls = {name: w.ask(op="prepare", row=key, libs=libs[name], target=target)["calls"] for name, w in workers.items()}
    samples: dict[str, dict[str, list[float]]] = {name: {lib: [] for lib, n in c.items() if isinstance(n, int)}
                                                  for name, c in calls.items()}
    for rep in range(reps):
        for name in ("before", "after") if rep % 2 == 0 else ("after", "before"):
            for lib in samples[name]:
                time.sleep(pause)
                samples[name][lib].append(workers[name].ask(op="rep", lib=lib)["rate"])
    result = {name: {lib: statistics.median(samples[name][lib]) if lib in samples[name] else calls[name][lib]
                     for lib in libs[name]} for name in workers}
    if "flowprobe" in samples["before"] and "flowprobe" in samples["after"]:  # adjacent repetitions share the load
        pairs = zip(samples["after"]["flowprobe"], samples["before"]["flowprobe"], strict=True)
        result["paired_ratio"] = statistics.median(after / before for after, before in pairs)
    return result


def run_rows(checkout: Path, rows: str, extra: list[str]) -> dict:
    """One ``compare_anchors.py`` run of ``checkout`` on ``rows``; returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = os.environ | {"PYTHONPATH": str(checkout / "src")}
        cmd = [sys.executable, str(checkout / "benchmarks" / "compare_anchors.py"), "--json", str(out), *extra]
        if rows:
            cmd += ["--rows", rows]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def row_keys(checkout: Path) -> list[tuple[str, str, str]]:
    """``(key, description, unit)`` of every row the checkout's benchmark defines."""
    code = ("import json, compare_anchors as c; "
            "print(json.dumps([(r.key, r.description, r.unit) for r in c.rows()]))")
    env = os.environ | {"PYTHONPATH": f"{checkout / 'src'}:{checkout / 'benchmarks'}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return [tuple(row) for row in json.loads(out.stdout)]


def fmt(value: object) -> str:
    if not isinstance(value, float | int):
        return str(value)
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout before the change")
    parser.add_argument("--after", type=Path, default=HERE, help="the checkout after the change (default: this one)")
    parser.add_argument("--rows", default="", help="comma-separated row-key prefixes (default: all)")
    parser.add_argument("--reps", type=int, default=11, help="repetitions per row and checkout (median reported)")
    parser.add_argument("--target", type=float, default=0.25, help="seconds per repetition")
    parser.add_argument("--pause", type=float, default=0.2, help="idle seconds before each repetition")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory rows (e)")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    prefixes = [p for p in args.rows.split(",") if p]
    rows = [r for r in row_keys(checkouts["after"]) if not prefixes or any(r[0].startswith(p) for p in prefixes)]
    speed: dict[str, dict[str, dict]] = {}
    workers = {name: Worker(path) for name, path in checkouts.items()}
    try:
        for key, description, _ in rows:
            speed[key] = time_interleaved(workers, key, args.reps, args.target, args.pause)
            print(f"{description}: before {fmt(speed[key]['before']['flowprobe'])}, "
                  f"after {fmt(speed[key]['after']['flowprobe'])}", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    memory = {}
    if not args.no_memory:
        for name, path in checkouts.items():
            memory[name] = run_rows(path, "none", ["--reps", "1"]).get("memory", {})
    lines = ["| row | unit | before | after | after / before | normflows | Pyro |", "|---|---|---|---|---|---|---|"]
    for key, description, unit in rows:
        before, after = speed[key]["before"]["flowprobe"], speed[key]["after"]["flowprobe"]
        ratio = f"{speed[key]['paired_ratio']:.2f}" if "paired_ratio" in speed[key] else "–"
        anchors = [fmt(speed[key]["after"][lib]) for lib in ANCHORS]
        lines.append(f"| {description} | {unit} | {fmt(before)} | {fmt(after)} | {ratio} | {' | '.join(anchors)} |")
    for row, libs in memory.get("after", {}).items():
        for measure in ("tensor_peak_bytes", "rss_peak_bytes"):
            value = {name: memory[name].get(row, {}).get("flowprobe", {}).get(measure) for name in checkouts}
            ratio = f"{value['after'] / value['before']:.2f}" if value["before"] and value["after"] else "–"
            anchors = [fmt(libs[lib][measure]) if isinstance(libs.get(lib), dict) else str(libs.get(lib))
                       for lib in ANCHORS]
            lines.append(f"| (e) {measure}, {row} | bytes (lower is better) | {fmt(value['before'])} | "
                         f"{fmt(value['after'])} | {ratio} | {' | '.join(anchors)} |")
    table = "\n".join(lines)
    print(table)
    result = {"checkouts": {k: str(v) for k, v in checkouts.items()}, "speed": speed, "memory": memory,
              "markdown": table}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
