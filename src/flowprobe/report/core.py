"""The data model of a report: sections, their context, checks, verdicts and outputs.

A :class:`Section` states one claim in one sentence and names the function that measures it. The
function receives a :class:`Context` (the settings of the chosen mode, a seed, a progress callback)
and returns a :class:`SectionOutput`: what was measured (text), every number (a JSON-ready tree),
the :class:`Check` s that decide the verdict, and the figures as PNG bytes. Sections never write
files: the runner (:mod:`flowprobe.report.runner`) records their outputs, so one process writes the
report directory whatever runs the sections.

Verdicts are computed from the checks (:func:`verdict`):

* ``holds``: every check passes;
* ``fails``: a *decisive* check fails (the numbers contradict the claim);
* ``inconclusive``: only *evidence* checks fail (the experiment could not show what it set out to
  show, e.g. training did not get close enough to tell).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MODES",
    "VERDICTS",
    "Check",
    "Context",
    "Section",
    "SectionOutput",
    "check",
    "fmt",
    "verdict",
]

MODES = ("quick", "full")
VERDICTS = ("holds", "fails", "inconclusive")


def fmt(value: float | int) -> str:
    """How every number appears on the page: integers in full, floats to 4 significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


@dataclass(frozen=True)
class Check:
    """One criterion of a verdict, with the numbers it was decided on.

    Attributes:
        text: The criterion with its numbers, e.g. ``"TV(300) = 0.000668 ≤ 0.01"``.
        passed: Whether it holds.
        decisive: ``True``: failing contradicts the claim (verdict ``fails``); ``False``: failing
            means the experiment is not conclusive (verdict ``inconclusive``).
    """

    text: str
    passed: bool
    decisive: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "passed": self.passed, "decisive": self.decisive}


_RELATIONS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "≤": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "≥": lambda a, b: a >= b,
}


def check(name: str, value: float, relation: str, bound: float, decisive: bool = True, bound_name: str = "") -> Check:
    """``Check("name = value relation bound")``; a non-finite value never passes.

    Args:
        name: What ``value`` is, e.g. ``"TV(300)"``.
        value: The measured number.
        relation: ``<``, ``≤``, ``>`` or ``≥``.
        bound: The threshold.
        decisive: See :class:`Check`.
        bound_name: What the bound is (shown before its value), e.g. ``"floor"``.
    """
    passed = math.isfinite(value) and math.isfinite(bound) and _RELATIONS[relation](value, bound)
    right = f"{bound_name} = {fmt(bound)}" if bound_name else fmt(bound)
    return Check(f"{name} = {fmt(value)} {relation} {right}", passed, decisive)


def verdict(checks: list[Check]) -> str:
    """``holds`` / ``fails`` / ``inconclusive`` from the checks (module docstring).

    Raises:
        ValueError: no checks (a verdict must be computed from numbers).
    """
    if not checks:
        raise ValueError("a section must return at least one check")
    if any(c.decisive and not c.passed for c in checks):
        return "fails"
    return "holds" if all(c.passed for c in checks) else "inconclusive"


@dataclass(frozen=True)
class Context:
    """What a section's function receives.

    Attributes:
        mode: ``quick`` or ``full`` (or a test's own name).
        settings: The section's settings for this mode.
        seed: Seed of everything random in the section.
        progress: Called with one line per step worth reporting.
    """

    mode: str
    settings: Mapping[str, Any]
    seed: int = 0
    progress: Callable[[str], None] = field(default=lambda line: None)


@dataclass
class SectionOutput:
    """What a section measured.

    Attributes:
        measured: What was measured and how, one paragraph (plain text).
        numbers: Every number shown on the page, as a JSON-ready tree: scalars, dicts, and lists of
            dicts (rendered as tables).
        checks: The criteria of the verdict.
        figures: ``name → (PNG bytes, caption)``, in the order shown.
        labels: Display names of keys of ``numbers`` (default: the key with spaces).
    """

    measured: str
    numbers: dict[str, Any]
    checks: list[Check]
    figures: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    """One claim of the paper and how it is measured.

    Attributes:
        key: Short name (``--only KEY``, file names, paths in ``results.json``).
        number: Position in the report (``--only NUMBER``).
        title: Heading.
        claim: The claim, in one sentence.
        run: The module-level function that measures it (``None``: not written yet; the section
            is shown as not available).
        settings: ``mode → settings`` passed to ``run`` in :attr:`Context.settings`.
        requires: Modules the section needs; a missing one makes it "not available in this build".
        issue: Where the missing capability is being built (shown with "not available").
    """

    key: str
    number: int
    title: str
    claim: str
    run: Callable[[Context], SectionOutput] | None
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    issue: str = ""

    def unavailable(self) -> str | None:
        """Why the section cannot run in this build, or ``None`` when it can."""
        missing = [name for name in self.requires if not _importable(name)]
        where = f" ({self.issue})" if self.issue else ""
        if missing:
            return f"not available in this build: needs {', '.join(missing)}{where}"
        if self.run is None:
            return f"not available in this build: the measurement is not wired yet{where}"
        return None

    def settings_for(self, mode: str) -> dict[str, Any]:
        """The settings of ``mode`` (empty when the section defines none)."""
        return dict(self.settings.get(mode, {}))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False
