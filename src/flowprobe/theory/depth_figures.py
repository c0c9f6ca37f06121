"""Figure of minimum-depth brackets against the dimension (``docs/theory/depth.md`` §5).

:func:`bracket_figure` draws, for each series (a construction, a ``κ``), the proven lower bound as a
line (its real-valued form, dashed, and rounded up, solid), the measured upper bound (the smallest
depth that reached ``ε``), and every other depth tried: not reached (grey ``×``) or failed (red ``×``).
It reads only what a store's rows hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.figure import Figure

from flowprobe.plots import plt
from flowprobe.theory.depth_experiments import ConfigurationBracket

__all__ = ["bracket_figure"]


def bracket_figure(found: Sequence[ConfigurationBracket], title: str | None = None) -> Figure:
    """One panel per series: depth against ``d`` with the theoretical lines and the measured brackets.

    Raises:
        ValueError: nothing to draw.
    """
    series = sorted({str(c.params.get("series", c.params.get("family"))) for c in found})
    if not series:
        raise ValueError("no depth runs to draw")
    fig, axes = plt.subplots(1, len(series), figsize=(max(6.4, 4.6 * len(series)), 4.0), squeeze=False)
    for ax, name in zip(axes[0], series, strict=True):
        group = sorted((c for c in found if str(c.params.get("series", c.params.get("family"))) == name),
                       key=lambda c: c.params.get("d") or 0)
        dims = [c.params.get("d") for c in group]
        bounded = [(d, c) for d, c in zip(dims, group, strict=True) if c.bound is not None]
        if any(c.bound != c.bracket.lower for _, c in bounded):
            ax.plot([d for d, _ in bounded], [c.bound for _, c in bounded], "--", color="tab:blue",
                    label="proven lower bound (real)")
        if bounded:
            ax.plot([d for d, _ in bounded], [c.bracket.lower for _, c in bounded], "-", color="tab:blue",
                    marker="^", label="proven lower bound ⌈·⌉")
        reached = [(d, c.bracket.upper) for d, c in zip(dims, group, strict=True) if c.bracket.upper is not None]
        if reached:
            ax.plot(*zip(*reached, strict=True), "o", color="tab:orange", markersize=8,
                    label="measured upper bound (TV ≤ ε)")
        deeper = [(d, o.depth) for d, c in zip(dims, group, strict=True) for o in c.bracket.outcomes
                  if o.status == "reached" and o.depth != c.bracket.upper]
        if deeper:
            ax.plot(*zip(*deeper, strict=True), ".", color="tab:orange", label="reached (deeper)")
        for status, colour, label in (("above", "0.5", "not reached"),
                                      ("inconclusive", "0.5", None), ("failed", "tab:red", "training failed")):
            points = [(d, o.depth) for d, c in zip(dims, group, strict=True) for o in c.bracket.outcomes
                      if o.status == status]
            if points:
                ax.plot(*zip(*points, strict=True), "x", color=colour, label=label)
        eps = {c.params.get("eps") for c in group}
        eps_text = ", ".join(f"{e:g}" for e in sorted(e for e in eps if isinstance(e, float)))
        ax.set_title(f"{name} (ε = {eps_text})")
        ax.set_xlabel("dimension d")
        ax.set_ylabel("depth (layers)")
        ax.set_xticks(sorted({d for d in dims if isinstance(d, int)}))
        top = max([o.depth for c in group for o in c.bracket.outcomes] + [1])
        ax.set_ylim(-0.3, math.ceil(top * 1.1) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title or "Minimum depth T_ε: proven lower bound and measured upper bound")
    fig.tight_layout()
    return fig
