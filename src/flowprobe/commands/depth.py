"""``flowprobe depth …``: bracket the minimum depth T_ε (Kong & Chaudhuri 2020, result 4) with sweeps.

* ``householder``: the Householder construction, ``T_ε = d/2`` exactly (``docs/theory/depth.md`` §4);
* ``planar``: the bounded-planar construction, ``N(0, I) → N(d^κ e₁, I)``;
* ``pair``: any family and pair (``--source`` / ``--target``: built-ins, Gaussians, ``file.py:name``);
* ``report STORE``: the brackets of a store, read-only (no code is imported from a store).

Each configuration (family, pair, d, depth) is one run of a sweep, its seeds trained as one ensemble,
recorded in a SQLite store: a rerun skips finished runs, ``kill -9`` loses only the runs in flight,
several processes may share a store, and ``--ray ADDRESS`` runs on a Ray cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from flowprobe.cli import CliError, add_parser, check_finite
from flowprobe.rundir import OutputDir
from flowprobe.sweep import Store, Sweep, run_sweep
from flowprobe.theory import depth_experiments as dx
from flowprobe.theory.depth_pairs import MAX_DIM

__all__ = ["add_commands"]

FIGURE = "depth_brackets.png"


# -- output -------------------------------------------------------------------------------------------


def _interval(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    trained = [m for m in result["members"] if m["failed"] is None]
    if not trained:
        return "-"
    best = min(trained, key=lambda m: m["high"])
    return f"{best['tv']:.4f} [{best['low']:.4f}, {best['high']:.4f}]"


def _lines(found: list[dx.ConfigurationBracket]) -> list[str]:
    """The runs of each configuration, then its bracket and what it means."""
    lines = []
    for c in found:
        p = c.params
        lines += ["", f"{c.label}: {p['family']}, {p['source']} → {p['target']}, ε = {p['eps']:g}, "
                  f"{len(p['seeds'])} seeds, {p['steps']} steps"]
        if c.theory:
            lines.append(f"  theory: {c.theory}")
        lines.append(f"  {'depth':>5}  {'status':<12} {'reached':>7}  {'best TV [interval]':<28} {'TV floor':>8}")
        for row in c.rows:
            result = row["result"] or {}
            members = result.get("members", [])
            hits = sum(m["failed"] is None and m["high"] <= p["eps"] for m in members)
            status = result.get("status", "run failed")
            floor = result.get("floor")
            floor_text = "-" if floor is None else f"{floor:.4f}"
            lines.append(f"  {row['params']['depth']:>5}  {status:<12} {f'{hits}/{len(members)}':>7}  "
                         f"{_interval(row['result']):<28} {floor_text:>8}")
            if row["status"] != "ok":
                lines.append(f"         {row['error']}")
        lines.append(f"  T_ε ∈ {c.bracket.text()}: {c.bracket.statement(p['eps'])}")
    return lines


def _emit(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    check_finite(document)
    print(json.dumps(document, indent=2) if args.json else "\n".join(lines))


def _figure(out: OutputDir | None, found: list[dx.ConfigurationBracket]) -> list[str]:
    if out is None or not found:
        return []
    path = out.claim(FIGURE)  # refused before drawing if the name is the user's
    from flowprobe.plots import save_figure
    from flowprobe.theory.depth_figures import bracket_figure

    return [str(save_figure(bracket_figure(found), path))]


# -- sweeping -----------------------------------------------------------------------------------------


def _training(args: argparse.Namespace) -> dx.Training:
    return dx.Training(steps=args.steps, lr=args.lr, batch_size=args.batch_size, train_samples=args.train_samples,
                       tv_samples=args.tv_samples, level=args.level, dtype=args.dtype)


def _sweep_and_report(args: argparse.Namespace, sweep: Sweep) -> int:
    """Run ``sweep`` into ``--store`` and print the brackets of its runs."""
    deepest: dict[int, int] = {}
    for run in sweep:
        deepest[run.params["d"]] = max(deepest.get(run.params["d"], 0), run.params["depth"])
    for dim, depth in deepest.items():
        dx.check_sizes(sweep.fixed["family"], dim, depth, len(sweep.fixed["seeds"]), _training(args))
    store = Path(args.store)
    if store.is_file():
        with Store(store, readonly=True) as db:
            name = db.meta.get("name")
        if name not in (None, sweep.name):
            raise CliError(f"{store} holds the sweep {name!r}, not {sweep.name!r}: give another --store")
    with OutputDir(Path(args.figures), "depth") if args.figures else contextlib.nullcontext() as out:
        if out is not None:
            out.claim(FIGURE)  # refused now, before the sweep, if the name is the user's
        summary = run_sweep(sweep, store, workers=args.workers, ray_address=args.ray,
                            progress=sys.stderr if not args.no_progress else False, best=dx.BestBracket())
        keys = {run.key for run in sweep}
        with Store(store, readonly=True) as db:
            rows = [r for r in db.rows() if r["key"] in keys]
        found = dx.brackets(rows)
        figures = _figure(out, found)
    rate = summary.ran / summary.wall_s if summary.wall_s > 0 else 0.0
    missing = len(keys) - len(rows)
    head = (f"sweep {sweep.name}: {summary.total} runs ({summary.skipped} already recorded, {summary.ran} run now, "
            f"{summary.failed} failed) in {summary.wall_s:.1f} s ({rate:.3g} runs/s); store {store}")
    lines = [head] + ([f"{missing} run(s) still in flight in another process"] if missing else [])
    lines += _lines(found) + [f"figure: {f}" for f in figures]
    document = {"sweep": sweep.name, "store": str(store), "summary": summary.__dict__, "runs_per_s": rate,
                "in_flight_elsewhere": missing, "brackets": [c.to_dict() for c in found], "figures": figures}
    _emit(args, document, lines)
    return 0


def _householder(args: argparse.Namespace) -> int:
    sweep = dx.householder_sweep(args.dims, args.eps, args.seeds, _training(args), args.depths)
    return _sweep_and_report(args, sweep)


def _planar(args: argparse.Namespace) -> int:
    sweep = dx.planar_sweep(args.dims, args.kappas, args.eps, args.seeds, _training(args), args.umax,
                            args.activation, args.depths)
    return _sweep_and_report(args, sweep)


def _pair(args: argparse.Namespace) -> int:
    sweep = dx.pair_sweep(args.family, args.source, args.target, args.dim, args.depths, args.eps, args.seeds,
                          _training(args))
    return _sweep_and_report(args, sweep)


def _report(args: argparse.Namespace) -> int:
    path = Path(args.store)
    if not path.is_file():
        raise CliError(f"no store at {path}")
    with Store(path, readonly=True) as db:
        rows, meta = db.rows(), db.meta
    found = dx.brackets(rows)
    if not found:
        raise CliError(f"{path} holds no depth runs (sweep {meta.get('name')!r}, {len(rows)} rows)")
    with OutputDir(Path(args.figures), "depth report") if args.figures else contextlib.nullcontext() as out:
        figures = _figure(out, found)
    lines = [f"store {path}: sweep {meta.get('name')!r}, {len(rows)} runs"] + _lines(found)
    lines += [f"figure: {f}" for f in figures]
    _emit(args, {"store": str(path), "sweep": meta.get("name"), "brackets": [c.to_dict() for c in found],
                 "figures": figures}, lines)
    return 0


# -- arguments ----------------------------------------------------------------------------------------


def _list(kind: type, low: float, high: float, what: str) -> Any:
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values or not all(math.isfinite(v) and low <= v <= high for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} in [{low:g}, {high:g}], got {text!r}")
        return values

    return parse


def _number(kind: type, low: float, high: float) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must lie in [{low:g}, {high:g}], got {text!r}")
        return value

    return parse


def _common(p: argparse.ArgumentParser, store: str, depths_help: str) -> None:
    d = dx.Training()
    p.add_argument("--eps", type=float, default=0.1, help="the TV tolerance ε, in (0, 1) (default 0.1)")
    p.add_argument("--seeds", type=_list(int, 0, 2**63 - 1, "seeds"), default=[0, 1, 2, 3],
                   help="seeds trained as one ensemble per configuration (default 0,1,2,3)")
    p.add_argument("--depths", type=_list(int, 0, 10_000, "depths"), help=depths_help)
    p.add_argument("--steps", type=_number(int, 1, 10**7), default=d.steps, help=f"Adam steps (default {d.steps})")
    p.add_argument("--lr", type=_number(float, 1e-12, 1e3), default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--batch-size", type=_number(int, 1, 10**7), default=d.batch_size,
                   help=f"points per step (default {d.batch_size})")
    p.add_argument("--train-samples", type=_number(int, 16, 10**8), default=d.train_samples,
                   help=f"draws of the target to train on (default {d.train_samples})")
    p.add_argument("--tv-samples", type=_number(int, 2, 10**9), default=d.tv_samples,
                   help=f"draws per side for each TV estimate (default {d.tv_samples})")
    p.add_argument("--level", type=_number(float, 1e-9, 1 - 1e-9), default=d.level,
                   help=f"confidence of 'some seed reached ε' (default {d.level:g}; Bonferroni over the seeds)")
    p.add_argument("--dtype", choices=("float64", "float32"), default=d.dtype, help="default float64")
    p.add_argument("--store", default=store, help=f"SQLite store of the sweep (default {store}); reruns skip "
                   "finished runs")
    p.add_argument("--workers", type=_number(int, 0, 4096), help="local worker processes (default: CPU count; "
                   "0 or 1: in this process)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on Ray: auto, host:port, ray://host:port, or local")
    p.add_argument("--figures", help=f"directory for the figure ({FIGURE})")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``depth householder | planar | pair | report``."""
    parser = add_parser(sub, "depth", description="Bracket the minimum depth T_ε(p, q, F) of Kong & Chaudhuri "
                        "(2020): a proven lower bound and a measured upper bound, by sweeps of training runs.")
    depth = parser.add_subparsers(dest="depth_command", required=True, metavar="SUBCOMMAND")

    house = depth.add_parser("householder", help="Householder on N(0, Λ) → N(0, Λ′): T_ε = d/2 for ε < 0.166")
    house.add_argument("--dims", type=_list(int, 2, MAX_DIM, "even dimensions"), default=[2, 4, 6, 8],
                       help="even dimensions d (default 2,4,6,8)")
    _common(house, "depth-householder.sqlite", "depths to train (default d/2−1, d/2, d/2+1)")
    house.set_defaults(func=_householder)

    planar = depth.add_parser("planar", help="bounded planar on N(0, I) → N(d^κ e₁, I): T_ε = Ω(d^κ)")
    planar.add_argument("--dims", type=_list(int, 1, MAX_DIM, "dimensions"), default=[2, 4, 8, 16],
                        help="dimensions d (default 2,4,8,16)")
    planar.add_argument("--kappas", type=_list(float, 1e-3, 4, "exponents κ"), default=[0.5, 1.0],
                        help="exponents κ of R = d^κ (default 0.5,1)")
    planar.add_argument("--umax", type=float, default=1.0, help="bound U on ‖û‖ (default 1)")
    planar.add_argument("--activation", choices=("tanh", "sigmoid", "arctan"), default="tanh",
                        help="bounded activation (default tanh)")
    _common(planar, "depth-planar.sqlite", "depths to train (default: the proven bound −1 … +2)")
    planar.set_defaults(func=_planar)

    pair = depth.add_parser("pair", help="any family and pair of densities")
    pair.add_argument("--family", required=True, help="a spec term without count: householder, "
                      "planar:tanh:umax=1, radial, sylvester:orthogonal:m=2, …")
    pair.add_argument("--source", required=True, help="q: normal, normal:mean=M:cov=C, shift:R, halves:A:B or "
                      "path/file.py:name (imported, i.e. executed)")
    pair.add_argument("--target", required=True, help="p: as --source")
    pair.add_argument("--dim", type=_number(int, 1, MAX_DIM), help="d (needed unless a side is a file)")
    _common(pair, "depth-pair.sqlite", "depths to train (default: around the proven lower bound, if any)")
    pair.set_defaults(func=_pair)

    report = depth.add_parser("report", help="brackets of a store (read-only; imports no code)")
    report.add_argument("store", help="SQLite store of a depth sweep")
    report.add_argument("--figures", help=f"directory for the figure ({FIGURE})")
    report.add_argument("--json", action="store_true", help="print the results as JSON")
    report.set_defaults(func=_report)
