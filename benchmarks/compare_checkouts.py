"""The README performance table for two checkouts of flowprobe, measured side by side in one run.

Every row of ``benchmarks/compare_anchors.py`` is timed by each checkout's own copy of that script
(its own flowprobe on ``PYTHONPATH``), the two alternating row by row (and which one goes first
alternates too), so that the load of the machine hits both alike; the memory rows (e) run once per
checkout at the end. The table gives both checkouts' numbers and their ratio, and the anchors
(normflows, Pyro) as each run measured them.

Run: ``python benchmarks/compare_checkouts.py --before ../old-checkout [--after .] [--rows a,b1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


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
    parser.add_argument("--reps", type=int, default=5, help="repetitions per row and checkout (median reported)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory rows (e)")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    prefixes = [p for p in args.rows.split(",") if p]
    rows = [r for r in row_keys(checkouts["after"]) if not prefixes or any(r[0].startswith(p) for p in prefixes)]
    speed: dict[str, dict[str, dict]] = {}
    for i, (key, description, _) in enumerate(rows):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        speed[key] = {name: run_rows(checkouts[name], key, ["--no-memory", "--reps", str(args.reps)])["speed"][key]
                      for name in order}
        print(f"{description}: before {fmt(speed[key]['before']['flowprobe'])}, "
              f"after {fmt(speed[key]['after']['flowprobe'])}", flush=True)
    memory = {}
    if not args.no_memory:
        for name, path in checkouts.items():
            memory[name] = run_rows(path, "none", ["--reps", "1"]).get("memory", {})
    lines = ["| row | unit | before | after | after / before | normflows | Pyro |", "|---|---|---|---|---|---|---|"]
    for key, description, unit in rows:
        before, after = speed[key]["before"]["flowprobe"], speed[key]["after"]["flowprobe"]
        ratio = f"{after / before:.2f}" if isinstance(before, float | int) and isinstance(after, float | int) else "–"
        anchors = [fmt(speed[key]["after"][lib]) for lib in ("normflows", "pyro")]
        lines.append(f"| {description} | {unit} | {fmt(before)} | {fmt(after)} | {ratio} | {' | '.join(anchors)} |")
    for row, libs in memory.get("after", {}).items():
        for measure in ("tensor_peak_bytes", "rss_peak_bytes"):
            value = {name: memory[name].get(row, {}).get("flowprobe", {}).get(measure) for name in checkouts}
            ratio = f"{value['after'] / value['before']:.2f}" if value["before"] and value["after"] else "–"
            anchors = [fmt(libs[lib][measure]) if isinstance(libs.get(lib), dict) else str(libs.get(lib))
                       for lib in ("normflows", "pyro")]
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
