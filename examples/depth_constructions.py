"""The two minimum-depth constructions of docs/theory/depth.md §4, swept, tabulated and drawn.

* Householder on N(0, Λ) → N(0, Λ′), d ∈ {2, 4, 6, 8}, ε = 0.1: T_ε = d/2 exactly.
* Bounded planar (tanh, ‖û‖ ≤ 1) on N(0, I) → N(d^κ e₁, I), κ ∈ {0.5, 1}, d ∈ {2, 4, 8, 16}, ε = 0.1:
  T_ε ≥ (d^κ − 2Φ⁻¹(0.55))/1.

Each configuration (d, depth) is one run of a sweep, its 4 seeds trained as one ensemble; the stores
(OUT/depth-householder.sqlite, OUT/depth-planar.sqlite) make a rerun resume where it stopped. Prints
markdown tables (bracket per d, and every depth's best TV interval), each sweep's wall time and runs per
second, and writes OUT/depth_householder.png and OUT/depth_planar.png.

    PYTHONPATH=src python examples/depth_constructions.py [--out depth-out] [--workers 2]
"""

import argparse
from pathlib import Path

from flowprobe.plots import save_figure
from flowprobe.sweep import Store, run_sweep
from flowprobe.theory import depth_experiments as dx
from flowprobe.theory.depth_figures import bracket_figure


def table(found):
    lines = ["| series | d | target | proven bound | T_ε bracket | depth: status (smallest TV interval upper end) |",
             "|---|---|---|---|---|---|"]
    for c in found:
        runs = ", ".join(f"{r['params']['depth']}: {r['result']['status']} ({r['result']['best_high']:.3f})"
                         if r["status"] == "ok" else f"{r['params']['depth']}: run failed" for r in c.rows)
        lines.append(f"| {c.params['series']} | {c.params['d']} | {c.params['target']} | {c.bound:.3f} | "
                     f"{c.bracket.text()}{' closed' if c.bracket.closed else ''} | {runs} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="depth-out")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    for name, sweep in (("householder", dx.householder_sweep()), ("planar", dx.planar_sweep())):
        store = out / f"depth-{name}.sqlite"
        summary = run_sweep(sweep, store, workers=args.workers, best=dx.BestBracket())
        with Store(store, readonly=True) as db:
            found = dx.brackets(db.rows())
        rate = summary.ran / summary.wall_s
        print(f"\n## {name}: {summary.total} runs, {summary.ran} run now in {summary.wall_s:.1f} s "
              f"({rate:.3g} runs/s, {args.workers} workers)\n")
        print(table(found))
        print(f"\nfigure: {save_figure(bracket_figure(found), out / f'depth_{name}.png')}")


if __name__ == "__main__":
    main()
