"""Sources of a flow named in spec strings, and their initialisation at the data's moments.

A spec may start with a source and ``>`` (see :mod:`flowprobe.spec`)::

    normal>planar:8          N(0, I), fixed: the default when no source is named
    gaussian:diag>planar:8   N(μ, diag σ²), trainable (DiagonalNormal)
    gaussian:full>planar:8   N(μ, L Lᵀ), trainable, full covariance through its Cholesky factor (FullNormal)

:func:`initialise` sets a Gaussian source to the maximum-likelihood Gaussian of the training points
pulled back through the flow's layers, which is the best source for the layers as they are: with
``z = f⁻¹(x)``, ``log p(x) = log q(z) + log|det ∂z/∂x|`` and the second term does not depend on ``q``.
Degenerate moments (constant or collinear columns, fewer rows than dimensions) are regularised until
the covariance is positive definite, and the regularisation is reported.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from flowprobe.distributions import Density, DiagonalNormal, FullNormal, StandardNormal
from flowprobe.flow import Flow

__all__ = ["MAX_SOURCE_VALUES", "SOURCES", "build_source", "gaussian_moments", "initialise"]

SOURCES = {
    "normal": "N(0, I), fixed (the default)",
    "gaussian:diag": "N(μ, diag σ²), trainable (DiagonalNormal)",
    "gaussian:full": "N(μ, L Lᵀ), trainable, L lower triangular with a positive diagonal (FullNormal)",
}
"""Source names of spec strings and what they build."""

MAX_SOURCE_VALUES = 10**9
MIN_STD = 1e-6
"""A column whose standard deviation is below this share of the typical one (the root mean square over
the columns; 1 if every column is constant) is raised to it."""
MIN_PIVOT = 1e-4
"""Collinearity limit: every column keeps at least this share of its standard deviation once the
columns before it are regressed out (the Cholesky pivot ``L_ii / √Σ_ii``)."""
RIDGE = 1e-8
"""First ridge tried (a share of each variance added to it), multiplied by 10 until the limit holds."""


def build_source(name: str, dim: int, ensemble: tuple[int, ...] = ()) -> Density:
    """The source ``name`` (a key of :data:`SOURCES`) on ``R^dim``: ``N(0, I)`` for ``normal`` (shared by
    ensemble members), otherwise a trainable standard Gaussian with per-member parameters ``(*E, …)``.

    Raises:
        ValueError: an unknown name, or more than :data:`MAX_SOURCE_VALUES` parameters.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; expected one of: {', '.join(SOURCES)}")
    if name == "normal":
        return StandardNormal(dim)
    members = math.prod(ensemble)
    values = members * (dim * (dim + 3) // 2 if name == "gaussian:full" else 2 * dim)
    if values > MAX_SOURCE_VALUES:
        raise ValueError(f"source {name} on R^{dim} for {members} member(s) has {values:.3g} parameters, more than "
                         f"{MAX_SOURCE_VALUES:.0e}; use gaussian:diag or fewer dimensions")
    loc, scale = torch.zeros(*ensemble, dim), torch.ones(*ensemble, dim)
    if name == "gaussian:diag":
        return DiagonalNormal(loc, scale, trainable=True)
    return FullNormal(loc, torch.diag_embed(scale), trainable=True)


def _member_moments(z: Tensor, full: bool) -> tuple[Tensor, Tensor, list[str]]:
    """Regularised maximum-likelihood mean and covariance of one member's points ``(N, d)`` (float64)."""
    n, d = z.shape
    mean = z.mean(0)
    centred = z - mean
    cov = centred.T @ centred / n
    var = torch.diagonal(cov)
    notes = []
    typical = float(var.mean().sqrt())
    floor = (MIN_STD * (typical if typical > 0 else 1.0)) ** 2
    flat = (var < floor).nonzero().flatten()
    if flat.numel():
        cov = cov + torch.diag_embed(torch.where(var < floor, floor - var, 0.0))
        notes.append(f"{flat.numel()} constant column(s) (first: {int(flat[0])}) given a standard deviation of "
                     f"{math.sqrt(floor):.3g}")
    if not full:
        return mean, torch.diag_embed(torch.diagonal(cov)), notes
    ridge = 0.0
    while True:
        candidate = cov + ridge * torch.diag_embed(torch.diagonal(cov))
        tril, info = torch.linalg.cholesky_ex(candidate)
        pivots = torch.diagonal(tril) / torch.diagonal(candidate).sqrt()
        if int(info) == 0 and float(pivots.min()) >= MIN_PIVOT:
            break
        ridge = RIDGE if ridge == 0 else 10 * ridge
    if ridge:
        why = "fewer rows than dimensions" if n <= d else "collinear columns"
        notes.append(f"{why}: {ridge:g} × each variance added to it (a ridge) to keep the covariance positive definite")
    return mean, candidate, notes


@torch.no_grad()
def gaussian_moments(points: Tensor, full: bool = True) -> tuple[Tensor, Tensor, str | None]:
    """The maximum-likelihood Gaussian of ``points`` ``(N, d)`` (or ``(*E, N, d)``, one per member), made
    positive definite where it is not.

    The mean and covariance ``Σ = (1/N) Σ_n (x_n − μ)(x_n − μ)ᵀ`` are computed in float64. Columns whose
    standard deviation is below :data:`MIN_STD` of the typical one are raised to it; with ``full``,
    ``Σ + ρ diag(Σ)`` replaces ``Σ`` for the smallest ``ρ ∈ {0, 10⁻⁸, 10⁻⁷, …}`` whose Cholesky pivots
    ``L_ii/√Σ_ii`` are all at least :data:`MIN_PIVOT` (a ridge on the correlation matrix; ``ρ ≤ 1``
    always suffices); without ``full``, only the diagonal of ``Σ`` is kept.

    Returns:
        ``(mean, cov, note)``: float64 tensors ``(*E, d)`` and ``(*E, d, d)`` on the points' device, and a
        sentence saying what was regularised (``None`` if nothing was).
    """
    d = points.shape[-1]
    flat = points.to(torch.float64).reshape(-1, *points.shape[-2:])
    results = [_member_moments(member, full) for member in flat]
    mean = torch.stack([r[0] for r in results]).reshape(*points.shape[:-2], d)
    cov = torch.stack([r[1] for r in results]).reshape(*points.shape[:-2], d, d)
    notes = [f"member {m}: {note}" if len(results) > 1 else note for m, r in enumerate(results) for note in r[2]]
    return mean, cov, "; ".join(notes) or None


@torch.no_grad()
def initialise(flow: Flow, points: Tensor) -> str | None:
    """Set the flow's Gaussian source to the maximum-likelihood Gaussian of ``points`` pulled back through
    its layers (:func:`gaussian_moments` of ``f⁻¹(points)``), each ensemble member from its own points.

    Args:
        flow: A flow whose source is a :class:`~flowprobe.DiagonalNormal` or :class:`~flowprobe.FullNormal`.
        points: Training points ``(N, d)`` or, for an ensemble, ``(*E, N, d)`` (one set per member).

    Returns:
        What had to be regularised (also issued as a ``UserWarning``), or ``None``.

    Raises:
        ValueError: a source that is not a Gaussian of these classes, or bad points.
    """
    source = flow.base
    if not isinstance(source, DiagonalNormal | FullNormal):
        raise ValueError(f"the flow's source {type(source).__name__} has no moments to initialise; name a Gaussian "
                         "source in the spec (gaussian:full>… or gaussian:diag>…)")
    z, _ = flow.inverse(points)
    mean, cov, note = gaussian_moments(z, full=isinstance(source, FullNormal))
    if mean.shape[:-1] != source.ensemble_shape:
        members = f"ensemble shape {source.ensemble_shape}" if source.ensemble_shape else "no ensemble shape"
        raise ValueError(f"the points pulled back have batch shape {tuple(mean.shape[:-1])}; the source has {members} "
                         "(a source shared by ensemble members has one set of moments)")
    source.set_moments(mean, cov)
    if note is not None:
        warnings.warn(f"source initialised at the moments of the training points pulled back through the layers, "
                      f"regularised: {note}", UserWarning, stacklevel=2)
    return note
