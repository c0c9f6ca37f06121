"""Figures of topology matching (Kong & Chaudhuri, AISTATS 2020, results 2 and 3), after the authors' blog.

* :func:`ridge_figure`: rows of ``(q, p = f#q, L)`` for one tanh planar layer (``M = 1``): ``L`` is a
  ridge function (``docs/theory/topology.md`` §2).
* :func:`modes_figure`: modes of ``q`` and their images under random ReLU Sylvester flows, which are
  modes of ``p = f#q`` (``docs/theory/topology.md`` §4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from flowprobe.distributions import Density, GaussianMixture, StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers import Planar
from flowprobe.plots import plt
from flowprobe.theory.topology import find_modes, log_ratio
from flowprobe.theory.topology_experiments import four_peak_mixture, relu_demo_flow

__all__ = ["modes_figure", "ridge_figure", "ridge_rows"]


def _grid(lim: float, size: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    axis = torch.linspace(-lim, lim, size, dtype=like.dtype, device=like.device)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    return gx, gy, torch.stack([gx.flatten(), gy.flatten()], -1)


def _heat(ax: Axes, grid: tuple[Tensor, Tensor, Tensor], values: Tensor, title: str, var: str,
          cmap: str = "viridis") -> None:
    gx, gy, _ = grid
    image = ax.pcolormesh(gx.numpy(), gy.numpy(), values.reshape(gx.shape).numpy(), cmap=cmap, shading="auto")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    ax.set_xlabel(f"${var}_1$")
    ax.set_ylabel(f"${var}_2$")
    ax.set_aspect("equal")


def ridge_rows() -> list[tuple[str, Density, tuple[list[float], list[float], float]]]:
    """The four ``(q, planar (u, w, b))`` rows of the blog's "q, p, L" figure (our choices, tanh)."""
    def mixture(means: list[list[float]], var: float) -> GaussianMixture:
        m = torch.tensor(means, dtype=torch.float64)
        return GaussianMixture(m, torch.full((m.shape[0],), var, dtype=torch.float64)).double()

    return [
        ("unimodal q", StandardNormal(2).double(), ([2.4, 1.2], [1.6, 0.8], 0.0)),
        ("four peaks", four_peak_mixture(), ([-0.4, 1.6], [0.5, 2.0], 0.3)),
        ("three peaks", mixture([[-1.3, -0.8], [1.3, -0.8], [0.0, 1.3]], 0.3), ([2.0, 0.0], [2.0, 0.4], -0.5)),
        ("two peaks", mixture([[-1.2, 0.6], [1.2, -0.6]], 0.35), ([-0.45, 0.45], [1.0, -1.0], 0.0)),
    ]


def ridge_figure(size: int = 121) -> Figure:
    """Rows of ``(q, p = f#q, L)`` for one tanh planar layer (``M = 1``): ``L`` is a ridge function.

    The arrow shows ``w``; the contour lines of ``L`` are straight lines orthogonal to it.
    """
    rows = ridge_rows()
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.9 * len(rows)), squeeze=False)
    for (name, source, (u, w, b)), row in zip(rows, axes, strict=True):
        layer = Planar(2, "tanh").double()
        layer.set_constrained(torch.tensor(u), torch.tensor(w), b)
        flow = Flow(source, [layer])
        gz = _grid(3, size, source.anchor)
        gx = _grid(4, size, source.anchor)
        with torch.no_grad():
            _heat(row[0], gz, source.log_prob(gz[2]).exp(), f"q: {name}", "z")
            _heat(row[1], gx, flow.log_prob(gx[2]).exp(), "p = f#q", "x")
        ratio = log_ratio(flow, gz[2]).detach()
        _heat(row[2], gz, ratio, "L = log p(f(z)) − log q(z)", "z", cmap="magma")
        row[2].contour(gz[0].numpy(), gz[1].numpy(), ratio.reshape(gz[0].shape).numpy(), 12, colors="white",
                       linewidths=0.6)
        direction = torch.tensor(w) / torch.tensor(w).norm()
        row[2].annotate("", xy=tuple((2 * direction).tolist()), xytext=(0, 0),
                        arrowprops={"arrowstyle": "->", "color": "cyan", "lw": 2})
        row[2].text(*(2.1 * direction).tolist(), "w", color="cyan")
    fig.suptitle("M = 1 (one tanh planar layer): L depends on z only through wᵀz — a ridge function")
    fig.tight_layout()
    return fig


def modes_figure(seeds: Sequence[int] = (0, 1), size: int = 161) -> Figure:
    """The blog's red-point figure: modes ``z*`` of ``q`` (red) and their images ``f(z*)`` under random
    ReLU Sylvester flows, which are modes of ``p = f#q`` (white crosses: modes of ``p`` found by
    ascent started near the images)."""
    fig, axes = plt.subplots(len(seeds), 2, figsize=(9, 4 * len(seeds)), squeeze=False)
    for seed, row in zip(seeds, axes, strict=True):
        flow = relu_demo_flow(seed)
        modes = find_modes(flow.base, flow.base.means)
        with torch.no_grad():
            images, _ = flow(modes)
        found = find_modes(flow, images + 0.05)
        gz, gx = _grid(3, size, modes), _grid(4, size, modes)
        with torch.no_grad():
            _heat(row[0], gz, flow.base.log_prob(gz[2]).exp(), f"q (seed {seed}): modes z*", "z")
            _heat(row[1], gx, flow.log_prob(gx[2]).exp(), "p = f#q: images f(z*)", "x")
        row[0].scatter(modes[:, 0], modes[:, 1], c="red", s=40, edgecolors="white")
        row[1].scatter(images[:, 0], images[:, 1], c="red", s=40, edgecolors="white")
        row[1].scatter(found[:, 0], found[:, 1], c="white", marker="x", s=60)
    fig.suptitle("ReLU Sylvester flows (3 layers): modes of q map to modes of p")
    fig.tight_layout()
    return fig
