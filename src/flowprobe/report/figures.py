"""Figures of the report that no other module draws (matplotlib, returned as :class:`Figure`).

The sections compute the numbers; these functions only draw them. Figures that exist elsewhere
(the blog's F1–F3 in :mod:`flowprobe.theory.approx1d`, the ridge and mode figures in
:mod:`flowprobe.theory.topology_figures`, Figure 3 in :mod:`flowprobe.plots`) are reused as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from flowprobe.plots import plt

__all__ = ["convergence_figure", "density_row_figure", "floor_figure", "tv_steps_figure"]


def density_row_figure(panels: Sequence[tuple[str, Tensor, Tensor]], title: str) -> Figure:
    """One row of density heat maps.

    Args:
        panels: ``(title, axis, density)`` per panel, as :func:`flowprobe.plots.density_grid` returns them.
        title: Figure title.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.1), squeeze=False)
    for ax, (name, axis, density) in zip(axes[0], panels, strict=True):
        lim = float(axis[-1])
        ax.imshow(density.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma", aspect="equal")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("$x_1$", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("$x_2$", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def convergence_figure(construction: Sequence[dict], trained: Sequence[dict], source_tv: float, title: str) -> Figure:
    """``TV`` against the number of layers ``n`` on log-log axes: the construction, trained flows, a
    ``1/n`` guide through the construction's last point and the TV of the source itself.

    Args:
        construction: Rows with ``layers`` and ``tv``.
        trained: Rows with ``layers`` and ``tv`` (may be empty).
        source_tv: ``TV(q, p)`` of the untransformed source.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    n = np.array([r["layers"] for r in construction], dtype=float)
    tv = np.array([r["tv"] for r in construction])
    ax.loglog(n, tv, "o-", color="tab:blue", label="construction (exact TV)")
    ax.loglog(n, tv[-1] * n[-1] / n, ":", color="grey", label="slope −1 (O(1/n))")
    if trained:
        ax.loglog([r["layers"] for r in trained], [r["tv"] for r in trained], "s--", color="tab:orange",
                  label="trained by maximum likelihood (exact TV)")
    ax.axhline(source_tv, color="tab:red", lw=0.8, label="TV(source, target)")
    return _tv_axes(fig, ax, "ReLU planar layers n", title)


def floor_figure(runs: Sequence[dict], floors: Sequence[dict], bound: int, title: str) -> Figure:
    """Reached ``TV`` (with intervals) against the neuron count ``M``, the proven floor as steps, and
    the minimum admissible ``M`` as a vertical line.

    Args:
        runs: Rows with ``neurons``, ``tv``, ``tv_low``, ``tv_high``.
        floors: Rows with ``neurons`` and ``tv_floor``.
        bound: The minimum admissible ``M``.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    m = np.array([r["neurons"] for r in runs], dtype=float)
    tv = np.array([r["tv"] for r in runs])
    err = np.array([[r["tv"] - r["tv_low"] for r in runs], [r["tv_high"] - r["tv"] for r in runs]])
    ax.errorbar(m, tv, yerr=err, fmt="o", color="tab:blue", capsize=3, label="trained flows (TV, 95% interval)")
    ax.step([f["neurons"] for f in floors], [f["tv_floor"] for f in floors], where="mid", color="tab:red",
            label="proven floor for M neurons")
    ax.axvline(bound - 0.5, color="grey", ls=":", label=f"minimum admissible M = {bound}")
    return _tv_axes(fig, ax, "neurons M", title)


def tv_steps_figure(runs: Sequence[dict], title: str) -> Figure:
    """``TV`` (with intervals) after each training chunk, one line per run.

    Args:
        runs: ``{"label", "steps": [...], "tv": [...], "tv_low": [...], "tv_high": [...]}`` per run.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run in runs:
        steps, tv = np.array(run["steps"], dtype=float), np.array(run["tv"])
        (line,) = ax.plot(steps, tv, "o-", label=run["label"])
        ax.fill_between(steps, run["tv_low"], run["tv_high"], color=line.get_color(), alpha=0.2)
    ax.axhline(0.0, color="grey", lw=0.8)
    return _tv_axes(fig, ax, "training steps", title)


def _tv_axes(fig: Figure, ax: Any, xlabel: str, title: str) -> Figure:
    """Label a ``TV(f#q, p)`` plot (x label, title, legend) and lay it out."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("TV(f#q, p)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
