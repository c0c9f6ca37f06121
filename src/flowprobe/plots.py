"""Figures (matplotlib, PNG). Every figure has a title, axis labels and, for densities, a colour bar."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from flowprobe.flow import Flow  # noqa: E402
from flowprobe.validation import validation  # noqa: E402

__all__ = [
    "density_grid",
    "figure_png",
    "flow_log_density",
    "plot_density_comparison",
    "plot_flow_grid",
    "plot_stages",
    "plot_training_curve",
    "save_figure",
]


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


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes (closed afterwards), e.g. to embed in a page."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _scatter_or_hist(ax: Axes, pts: Tensor, colour: Tensor | None) -> None:
    if pts.shape[1] == 2:
        ax.scatter(pts[:, 0], pts[:, 1], c=colour, s=2, cmap="viridis" if colour is not None else None)
        ax.set_ylabel("$x_2$")
        ax.set_aspect("equal", adjustable="datalim")
    else:
        ax.hist(pts[:, 0].numpy(), bins=60, density=True, color="tab:blue")
        ax.set_ylabel("density")
    ax.set_xlabel("$x_1$")


def plot_stages(
    flow: Flow, n: int = 2000, max_panels: int = 6, title: str | None = None, data: Tensor | None = None
) -> Figure:
    """Scatter plots of samples from the source, after selected layers, and at the output.

    Args:
        flow: A 1-D or 2-D flow.
        n: Number of points.
        max_panels: Panels shown (source, evenly spaced intermediate stages, output).
        title: Figure title.
        data: Target samples, shown in an extra last panel for comparison.
    """
    if flow.dim not in (1, 2):
        raise ValueError(f"plot_stages shows 1-D or 2-D flows, got dim {flow.dim}")
    z = flow.base.sample(n)
    stages = flow.stages(z)
    k = len(stages) - 1
    count = min(max_panels, k + 1)
    picks = sorted({round(i * k / max(count - 1, 1)) for i in range(count)})
    panels = len(picks) + (data is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2), squeeze=False)
    colour = z[:, 0].cpu()
    for ax, i in zip(axes[0], picks, strict=False):
        _scatter_or_hist(ax, stages[i].cpu(), colour)
        ax.set_title("source $z$" if i == 0 else f"after layer {i}" + (" (output)" if i == k else ""))
    if data is not None:
        _scatter_or_hist(axes[0][-1], data.detach()[:n].cpu(), None)
        axes[0][-1].set_title("data (target)")
    fig.suptitle(title or f"Stages of a {k}-layer flow (colour: first source coordinate)")
    fig.tight_layout()
    return fig


# -- densities, samples and training curves --------------------------------------------------------


def density_grid(log_density: Callable[[Tensor], Tensor], bound: float, points: int = 200) -> tuple[Tensor, Tensor]:
    """``(axis, density)``: a ``points × points`` grid over ``[−bound, bound]²`` and ``exp(log_density)`` on it.

    ``density[i, j]`` is the value at ``(axis[j], axis[i])`` (image convention: rows are ``x_2``).
    """
    axis = torch.linspace(-bound, bound, points, dtype=torch.float64)
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], -1)
    with torch.no_grad(), validation(False):
        values = torch.cat([log_density(chunk).to(torch.float64).exp() for chunk in pts.split(16_384)])
    return axis, values.reshape(points, points)


def flow_log_density(flow: Flow) -> Callable[[Tensor], Tensor]:
    """The flow's exact log-density (through the inverses) as a function of float64 points."""
    anchor = next(flow.parameters())
    return lambda x: flow.log_prob(x.to(anchor.dtype))


def _heat_map(ax: Axes, fig: Figure, axis: Tensor, density: Tensor, title: str) -> None:
    lim = float(axis[-1])
    image = ax.imshow(density.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma", aspect="equal")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="density")
    ax.set_title(title)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


def plot_density_comparison(
    flow: Flow,
    target_log_density: Callable[[Tensor], Tensor] | None = None,
    data: Tensor | None = None,
    bound: float = 4.0,
    title: str | None = None,
    n_samples: int = 5000,
) -> Figure:
    """Target vs. flow on ``[−bound, bound]²``: target density (or a histogram of the data), the flow's
    exact density (through the inverses), and samples of the flow.

    Args:
        flow: A 2-D flow.
        target_log_density: Normalised target log-density (e.g. ``−U − log Z``).
        data: Target samples, shown as a 2-D histogram when no density is given.
        bound: Half-width of the square shown.
        title: Figure title.
        n_samples: Number of flow samples in the scatter panel.
    """
    if flow.dim != 2:
        raise ValueError(f"density plots need a 2-D flow, got dim {flow.dim}")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    if target_log_density is not None:
        _heat_map(axes[0], fig, *density_grid(target_log_density, bound), "target density $p$")
    elif data is not None:
        pts = data.detach().to(torch.float64).cpu().numpy()
        square = [[-bound, bound]] * 2
        *_, image = axes[0].hist2d(pts[:, 0], pts[:, 1], bins=120, range=square, density=True, cmap="magma")
        fig.colorbar(image, ax=axes[0], fraction=0.046, pad=0.04, label="density")
        axes[0].set(title=f"data ({pts.shape[0]} points, histogram)", xlabel="$x_1$", ylabel="$x_2$", aspect="equal")
    _heat_map(axes[1], fig, *density_grid(flow_log_density(flow), bound), "flow density $q$ (exact, via inverse)")
    samples = flow.sample(n_samples).to(torch.float64).cpu()
    axes[2].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5, color="tab:blue")
    axes[2].set(xlim=(-bound, bound), ylim=(-bound, bound), aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    axes[2].set_title(f"{n_samples} samples of $q$")
    fig.suptitle(title or "Target vs. flow")
    fig.tight_layout()
    return fig


def plot_training_curve(
    records: Sequence[dict], offset: float = 0.0, ylabel: str = "loss", title: str | None = None
) -> Figure:
    """Loss (plus ``offset``, e.g. ``log Z`` to show ``KL(q‖p)``) and validation NLL against the step."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] + offset for r in records], label="training " + ylabel, color="tab:blue")
    val = [(r["step"], r["val_nll"]) for r in records if "val_nll" in r]
    if val:
        ax.plot(*zip(*val, strict=True), label="validation NLL (nats/dim)", color="tab:orange")
    values = [r["loss"] + offset for r in records]
    if values and min(values) > 0 and max(values) / max(min(values), 1e-12) > 30:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel=ylabel, title=title or "Training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_flow_grid(
    rows: Sequence[tuple[str, Callable[[Tensor], Tensor]]],
    columns: Sequence[str],
    flows: dict[tuple[str, str], tuple[Flow, str]],
    bound: float = 4.0,
    points: int = 150,
    title: str | None = None,
    caption: str | None = None,
) -> Figure:
    """A grid of density heat maps (each with its colour bar): one row per target (its density
    first), one column per flow setting.

    Args:
        rows: ``(name, normalised target log-density)`` per row.
        columns: Column names (flow settings).
        flows: ``(row name, column name) → (trained flow, panel label)``; missing panels stay empty.
        bound: Half-width of the square shown.
        points: Grid points per axis.
        title: Figure title.
        caption: Text under the figure.
    """
    size = (2.6 * (len(columns) + 1), 2.6 * len(rows))
    fig, axes = plt.subplots(len(rows), len(columns) + 1, figsize=size, squeeze=False)
    lim = bound
    for i, (row, log_p) in enumerate(rows):
        panels = [(f"{row}: target", log_p)]
        for col in columns:
            flow, label = flows.get((row, col), (None, ""))
            panels.append((f"{col}\n{label}", flow_log_density(flow) if flow is not None else None))
        for ax, (label, fn) in zip(axes[i], panels, strict=True):
            ticks = [-lim, 0, lim]
            ax.set_xticks(ticks if i == len(rows) - 1 else [])
            ax.set_yticks(ticks if ax is axes[i][0] else [])
            ax.tick_params(labelsize=7)
            ax.set_title(label, fontsize=8)
            if fn is not None:
                _, density = density_grid(fn, bound, points)
                image = ax.imshow(density.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        axes[i][0].set_ylabel("$z_2$")
    for ax in axes[-1]:
        ax.set_xlabel("$z_1$")
    fig.suptitle(title or "Flows fitted to targets")
    if caption:
        fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=8, wrap=True)
    fig.tight_layout()
    return fig
