"""Figures (matplotlib, PNG). Every figure has a title, axis labels and, for densities, a colour bar."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from flowprobe.flow import Flow  # noqa: E402

__all__ = ["plot_stages", "save_figure"]


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically (temporary file + rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_stages(flow: Flow, n: int = 2000, max_panels: int = 6, title: str | None = None) -> Figure:
    """Scatter plots of samples from the source, after selected layers, and at the output.

    Args:
        flow: A 1-D or 2-D flow.
        n: Number of points.
        max_panels: Panels shown (source, evenly spaced intermediate stages, output).
        title: Figure title.
    """
    if flow.dim not in (1, 2):
        raise ValueError(f"plot_stages shows 1-D or 2-D flows, got dim {flow.dim}")
    z = flow.base.sample(n)
    stages = flow.stages(z)
    k = len(stages) - 1
    count = min(max_panels, k + 1)
    picks = sorted({round(i * k / max(count - 1, 1)) for i in range(count)})
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.2), squeeze=False)
    colour = z[:, 0].cpu()
    for ax, i in zip(axes[0], picks):
        pts = stages[i].cpu()
        if flow.dim == 2:
            ax.scatter(pts[:, 0], pts[:, 1], c=colour, s=2, cmap="viridis")
            ax.set_ylabel("$x_2$")
            ax.set_aspect("equal", adjustable="datalim")
        else:
            ax.hist(pts[:, 0].numpy(), bins=60, density=True, color="tab:blue")
            ax.set_ylabel("density")
        ax.set_xlabel("$x_1$")
        ax.set_title("source $z$" if i == 0 else f"after layer {i}" + (" (output)" if i == k else ""))
    fig.suptitle(title or f"Stages of a {k}-layer flow (colour: first source coordinate)")
    fig.tight_layout()
    return fig
