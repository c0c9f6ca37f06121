"""``flowprobe reproduce``: every claim of the paper, measured, in one self-contained HTML report.

Exit status: 0 when every section that ran holds (sections not available in this build do not
count), 1 when a verdict is ``fails`` or ``inconclusive``, 2 for bad input, and ``10 + n`` when
section ``n`` raised (the lowest-numbered one; stderr and the page name every one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowprobe.cli import add_parser

__all__ = ["add_commands"]


def _command(args: argparse.Namespace) -> int:
    from flowprobe.report.runner import exit_status, reproduce
    from flowprobe.report.sections import SECTIONS

    if args.list:
        for s in SECTIONS:
            missing = s.unavailable()
            print(f"{s.number}  {s.key:<10} {s.title}" + (f"  [{missing}]" if missing else ""))
        return 0
    if args.out is None:
        raise ValueError("--out DIR is required (the report directory)")
    overrides = {}
    if args.mnist is not None:
        mnist = Path(args.mnist)
        if not mnist.is_dir():
            raise FileNotFoundError(f"--mnist {mnist}: not a directory (give the directory that holds the MNIST files)")
        overrides["vae"] = {"data": str(mnist.resolve())}
    results = reproduce(Path(args.out), SECTIONS, "full" if args.full else "quick", args.only, args.force, args.jobs,
                        args.seed, command=" ".join(["flowprobe", *sys.argv[1:]]), overrides=overrides)
    width = max(len(s["key"]) for s in results["sections"])
    print(f"{'#':>2}  {'section':<{width}}  verdict")
    for s in results["sections"]:
        detail = s.get("error") or s.get("reason") or ("cached" if s.get("cached") else "")
        print(f"{s['number']:>2}  {s['key']:<{width}}  {s['status']}" + (f"  ({detail})" if detail else ""))
    failed = [f"({s['number']}) {s['key']}" for s in results["sections"] if s["status"] == "error"]
    if failed:
        print(f"flowprobe reproduce: section(s) failed to run: {', '.join(failed)}", file=sys.stderr)
    print(f"report: {(Path(args.out) / 'index.html').resolve()}")
    return exit_status(results)


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, 64], got {value}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``reproduce``."""
    p = add_parser(sub, "reproduce", description="Run every experiment of Kong & Chaudhuri (AISTATS 2020) and write "
                   "DIR/index.html (one self-contained page with a verdict per claim), DIR/results.json and the "
                   "figures. Finished sections are reused on the next run with the same settings and versions.")
    p.add_argument("--out", help="report directory (new, empty, or an earlier report)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short version (default; minutes on 2 cores)")
    mode.add_argument("--full", action="store_true", help="the publication version (longer training, more samples)")
    p.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections (keys or numbers; see --list)")
    p.add_argument("--force", action="store_true", help="run the chosen sections even when a cached result matches")
    p.add_argument("--jobs", type=_jobs, default=1, help="sections run at once, in worker processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of every section (default 0)")
    p.add_argument("--mnist", metavar="DIR", help="the VAE section (8) on MNIST: a directory of its files (IDX or "
                   ".amat; default: the bundled binarised digits)")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.set_defaults(func=_command)
