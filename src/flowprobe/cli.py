"""The ``flowprobe`` command line.

Sub-commands live in their own modules; each provides ``add_commands(subparsers)`` and sets
``func`` on its parsers. Errors a user can fix (bad specs, shapes, files) are printed as one line
and exit with status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Sequence
from typing import Any

from flowprobe.layers.base import InverseNotAvailable

__all__ = ["CliError", "check_finite", "main"]

# Modules that contribute sub-commands (each defines ``add_commands``).
COMMAND_MODULES = (
    "flowprobe.demo",
    "flowprobe.commands.train",
    "flowprobe.commands.approx1d",
    "flowprobe.commands.topology",
)


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


USER_ERRORS = (CliError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError, InverseNotAvailable)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="flowprobe",
        description="Residual normalizing flows with exact likelihood, and what they can express.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
