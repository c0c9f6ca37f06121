"""The ``flowprobe`` command line.

Sub-commands live in their own modules; each provides ``add_commands(subparsers)`` (creating its
parsers with :func:`add_parser`) and sets ``func`` on them. Only the module of the command being
run is imported (the others appear in ``--help`` from :data:`COMMANDS`), so start-up does not pay
for plotting or SciPy a command does not use. Errors a user can fix (bad specs, shapes, files) are
printed as one line and exit with status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Sequence
from typing import Any

from flowprobe.layers.base import InverseNotAvailable

__all__ = ["COMMANDS", "CliError", "add_parser", "check_finite", "finite_float", "main", "positive_int"]

COMMANDS: dict[str, tuple[str, str]] = {  # name -> (module that defines it, one-line help)
    "demo": ("flowprobe.demo", "the earlier demo: train on U1 and on moons, write figures (main job: reproduce)"),
    "fit": ("flowprobe.commands.train", "train a flow on data (maximum likelihood) or an energy (reverse KL)"),
    "sample": ("flowprobe.commands.train", "draw samples from a trained flow (the last checkpoint while it trains)"),
    "eval": ("flowprobe.commands.train", "held-out NLL or KL(q‖p) and ESS of a trained flow"),
    "plot": ("flowprobe.commands.train", "figures of a run directory, or 'rezende' for Rezende & Mohamed's Figure 3"),
    "approx1d": ("flowprobe.commands.approx1d", "construct ReLU planar flows approximating a 1-D density (exact TV)"),
    "topology": ("flowprobe.commands.topology", "topology matching: can a flow map q to p exactly, and why not"),
    "depth": ("flowprobe.commands.depth", "minimum depth T_ε: proven lower bound and measured upper bound, by sweeps"),
    "vae": ("flowprobe.commands.vae", "VAEs with flow posteriors: train, eval, table (several processes: torchrun)"),
    "reproduce": ("flowprobe.commands.reproduce", "every claim of the paper, measured: one HTML report with verdicts"),
}


class CliError(Exception):
    """A problem with the user's input, reported as one line with exit status 2."""


def check_finite(result: Any, where: str = "result") -> None:
    """Refuse to report a number that is NaN or infinite (a wrong number must not exit 0).

    Raises:
        CliError: naming the first such entry.
    """
    if isinstance(result, float) and not math.isfinite(result):
        raise CliError(f"{where} is {result}: the computation failed numerically; nothing is reported")
    if isinstance(result, dict):
        for key, value in result.items():
            check_finite(value, f"{where}.{key}" if where != "result" else str(key))
    elif isinstance(result, list | tuple):
        for i, value in enumerate(result):
            check_finite(value, f"{where}[{i}]")


def positive_int(text: str) -> int:
    """An ``argparse`` type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """An ``argparse`` type: a finite number."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


USER_ERRORS = (CliError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError, InverseNotAvailable)


def add_parser(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """The parser of command ``name`` with its help line from :data:`COMMANDS`."""
    return sub.add_parser(name, help=COMMANDS[name][1], **kwargs)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser: the command named in ``argv`` in full (all of them for ``None``), the others
    as one-line entries for ``--help``."""
    parser = argparse.ArgumentParser(
        prog="flowprobe",
        description="Residual normalizing flows with exact likelihood, and what they can express.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if argv is None:
        modules = {module for module, _ in COMMANDS.values()}
    else:
        first = next((a for a in argv if not a.startswith("-")), None)
        modules = {COMMANDS[first][0]} if first in COMMANDS else set()
    for module in dict.fromkeys(m for m, _ in COMMANDS.values() if m in modules):
        importlib.import_module(module).add_commands(sub)
    for name, (module, _) in COMMANDS.items():
        if module not in modules:
            add_parser(sub, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"flowprobe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowprobe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m flowprobe.cli`: run the imported module so error classes match
    from flowprobe.cli import main as _main

    sys.exit(_main())
