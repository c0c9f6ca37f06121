"""``flowprobe approx1d``: construct ReLU planar flows for a 1-D target and report their exact TV."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

from flowprobe.cli import add_parser, check_finite
from flowprobe.rundir import OutputDir
from flowprobe.spec import MAX_LAYERS
from flowprobe.theory.approx1d import (
    KNOT_RULES,
    TAIL_RULES,
    construct,
    loglog_slope,
    plot_approximation,
    plot_pieces,
    two_layer_example,
)
from flowprobe.theory.targets1d import BUILTIN_TARGETS, parse_target

__all__ = ["add_commands", "run_approx1d"]

MAX_MC_SAMPLES = 10**8


def run_approx1d(args: argparse.Namespace) -> dict:
    """Build one flow per depth in ``args.layers``; returns the ``--json`` document."""
    if args.mc_samples < 2:
        raise ValueError(f"--mc-samples must be at least 2, got {args.mc_samples}")
    if args.mc_samples > MAX_MC_SAMPLES:
        raise ValueError(f"--mc-samples {args.mc_samples} exceeds {MAX_MC_SAMPLES} (memory)")
    if args.interval is not None:
        if args.knots != "equispaced":
            raise ValueError("--interval sets the equispaced knots; it needs --knots equispaced")
        if not args.interval[0] < args.interval[1]:
            raise ValueError(f"--interval LO HI needs LO < HI, got {args.interval[0]:g} {args.interval[1]:g}")
    target = parse_target(args.target)
    interval = tuple(args.interval) if args.interval else None
    results = []
    with OutputDir(Path(args.figures), "approx1d") if args.figures else contextlib.nullcontext() as figures:
        if figures is not None:
            from flowprobe.plots import save_figure

            names = [f"approx1d_n{n}.png" for n in args.layers] + ["approx1d_two_layers.png"]
            for name in names:
                figures.claim(name)
        for n in args.layers:
            built = construct(target, n, knots=args.knots, interval=interval, tail=args.tail,
                              source=(args.source_loc, args.source_scale))
            mc = built.tv_monte_carlo(args.mc_samples, seed=args.seed)
            results.append({"layers": n, "tv": built.tv(), "tv_mc": float(mc.estimate),
                            "tv_mc_ci": [float(mc.low), float(mc.high)], "aligned": built.aligned,
                            "centre": built.centre})
            if figures is not None:
                lo, hi = interval or target.interval or (float(built.knots[0]), float(built.knots[-1]))
                save_figure(plot_approximation(built, lo, hi), figures.claim(f"approx1d_n{n}.png"))
        if figures is not None:
            save_figure(plot_pieces(two_layer_example()), figures.claim("approx1d_two_layers.png"))
    slope = loglog_slope(args.layers, [r["tv"] for r in results]) if len(results) > 1 else None
    return {"target": target.name, "knots": args.knots, "tail": args.tail, "results": results, "slope": slope}


def _command(args: argparse.Namespace) -> int:
    report = run_approx1d(args)
    check_finite(report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"target {report['target']}: N({args.source_loc:g}, {args.source_scale:g}²) through n ReLU planar layers "
          f"({args.knots} knots, {args.tail} tails)")
    print(f"{'layers':>7} {'TV (exact)':>12} {'TV (MC)':>12}  {args.mc_samples} samples, 99% CI")
    for r in report["results"]:
        low, high = r["tv_mc_ci"]
        print(f"{r['layers']:>7} {r['tv']:>12.6g} {r['tv_mc']:>12.6g}  [{low:.6g}, {high:.6g}]")
    if report["slope"] is not None:
        print(f"log-log slope of TV against n: {report['slope']:.3f}")
    if args.figures:
        print(f"figures: {args.figures}")
    return 0


def _layer_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be integers, got {text!r}") from None
    if not 4 <= value <= MAX_LAYERS:
        raise argparse.ArgumentTypeError(f"layers must lie in [4, {MAX_LAYERS}] (one module per layer), got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``approx1d``."""
    p = add_parser(
        sub,
        "approx1d",
        description="Kong & Chaudhuri (2020), result 1: push N(0,1) through n ReLU planar layers to a "
        "piecewise-Gaussian density close to TARGET; report the exact TV (quadrature) and a Monte-Carlo check.",
    )
    p.add_argument("target", help=f"{', '.join(BUILTIN_TARGETS)}, scipy:NAME(k=v,...) or path/file.py:name")
    p.add_argument("--layers", type=_layer_count, nargs="+", default=[50, 300], help="depths n (default: 50 300)")
    p.add_argument("--knots", choices=KNOT_RULES, default="optimal", help="knot rule (default: optimal)")
    p.add_argument("--tail", choices=TAIL_RULES, default="tv", help="tail-layer rule (default: tv)")
    p.add_argument("--interval", type=_finite, nargs=2, metavar=("LO", "HI"),
                   help="interval of the equispaced knots (with --knots equispaced)")
    p.add_argument("--source-loc", type=_finite, default=0.0, help="mean of the normal source (default 0)")
    p.add_argument("--source-scale", type=_finite, default=1.0, help="std of the normal source (default 1)")
    p.add_argument("--mc-samples", type=int, default=100_000, help="Monte-Carlo samples per depth")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo check")
    p.add_argument("--figures", help="directory for PNG figures (p / q_pwc / q_pwg per depth, two-layer example)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_command)
