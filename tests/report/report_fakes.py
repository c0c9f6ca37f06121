"""Tiny sections for the report framework's tests (module level, so that spawned workers import them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from flowprobe.plots import figure_png, plt
from flowprobe.report.core import Context, Section, SectionOutput, check


def _figure() -> bytes:
    fig, ax = plt.subplots(figsize=(2.0, 1.5))
    ax.plot([0, 1, 2], [0, 1, 4])
    return figure_png(fig, dpi=50)


def holds(ctx: Context) -> SectionOutput:
    """A section that holds; counts its runs in ``settings["counter"]`` and sleeps ``$REPORT_FAKE_SLEEP`` s."""
    counter = ctx.settings.get("counter")
    if counter:
        with open(counter, "a") as f:
            f.write("run\n")
    time.sleep(float(os.environ.get("REPORT_FAKE_SLEEP", "0")) if ctx.settings.get("sleepy") else 0.0)
    ctx.progress("half way")
    numbers = {"value": 0.123456789, "count": 3, "name": "text", "tiny": 1.5e-12,
               "rows": [{"n": 1, "tv": 0.5, "interval": [0.4, 0.6]}, {"n": 2, "tv": 0.25, "interval": [0.2, 0.3]}],
               "nested": {"inner": 2.5, "list": [1, 2, 3], "deeper": {"x": -7.0}}}
    return SectionOutput("A fake measurement.", numbers, [check("value", 0.123456789, "<", 1)],
                         {"curve": (_figure(), "A curve."), "second": (_figure(), "Another curve.")}, {"tv": "TV"})


def inconclusive(ctx: Context) -> SectionOutput:
    return SectionOutput("Weak evidence.", {"a": 1.0, "b": 3.0},
                         [check("a", 1.0, "<", 2), check("b", 3.0, "<", 2, decisive=False)])


def fails(ctx: Context) -> SectionOutput:
    return SectionOutput("A contradiction.", {"a": 5.0}, [check("a", 5.0, "<", 2)])


def not_a_number(ctx: Context) -> SectionOutput:
    return SectionOutput("NaN.", {"a": float("nan")}, [check("a", 1.0, "<", 2)])


def _settings(**extra: object) -> dict:
    return {"quick": {"size": 1, **extra}, "full": {"size": 2, **extra}}


def sections(counter: Path | None = None, sleepy: bool = False) -> tuple[Section, ...]:
    """alpha holds, beta is inconclusive, gamma needs a missing module, delta is not wired."""
    extra = {"counter": str(counter) if counter else None, "sleepy": sleepy}
    return (
        Section("alpha", 1, "Alpha", "Alpha holds.", holds, _settings(**extra)),
        Section("beta", 2, "Beta", "Beta is unclear.", inconclusive, _settings()),
        Section("gamma", 3, "Gamma", "Gamma needs a module.", holds, requires=("flowprobe.no_such_module",),
                issue="issue 99"),
        Section("delta", 4, "Delta", "Delta is not wired.", None, issue="issue 98"),
    )


def kill_sections() -> tuple[Section, ...]:
    """fast (1) finishes at once, slow (2) sleeps ``$REPORT_FAKE_SLEEP`` seconds."""
    return (Section("fast", 1, "Fast", "Fast is unclear.", inconclusive, _settings()),
            Section("slow", 2, "Slow", "Slow holds.", holds, _settings(counter=None, sleepy=True)))
