r"""Total variation between two densities: closed forms, exact on ``R``, Monte Carlo with intervals in ``R^d``.

:math:`\mathrm{TV}(a, b) = \sup_A |a(A) - b(A)| = \tfrac12\int|a - b| \in [0, 1]`, the metric in which
Kong & Chaudhuri (AISTATS 2020) measure approximation by normalizing flows. The math of every
estimator here is in ``docs/theory/tv.md``.

* Closed forms (test oracles, theoretical floors): :func:`normal_tv` (two normals on ``R``; with
  the Mahalanobis distance also two normals of one covariance in ``R^d``) and
  :func:`isotropic_normal_tv`.
* Exact on ``R``: :func:`tv_quadrature` (log-densities of NumPy arrays) and :func:`tv_exact_1d`
  (density objects, e.g. a 1-D :class:`~flowprobe.Flow` against a target).
* Monte Carlo in any dimension, from :math:`\mathrm{TV}(a, b) = \mathbb E_{x\sim a}[(1 - b(x)/a(x))^+]`:
  :func:`tv_monte_carlo` (log-densities at samples of ``a``), :func:`tv_sampled` (one side) and
  :func:`tv_combined` (both sides, averaged pairwise), each with an empirical-Bernstein interval
  (valid for every sample size) or a CLT one (asymptotic, narrower; it undercovers when TV is within a
  few ``1/n`` of 0 or 1).
* :func:`estimate_tv`: exact in ``d = 1``, combined otherwise.

A *density* is anything with ``log_prob(x)`` and ``sample(n)``: a flowprobe
:class:`~flowprobe.Density` or :class:`~flowprobe.Flow`, or a ``torch.distributions.Distribution``
(drawn with ``sample((n,))``; a scalar event shape is read as points of shape ``(N, 1)``). Points
have shape ``(..., N, d)``: the estimators reduce over ``N`` only, so leading dimensions give one TV
each. An ensemble of flows (``ensemble_shape = E``) draws ``(E, N, d)`` and evaluates them member by
member, one TV per member; every other density sees such points flattened to ``(E·N, d)``, so a
flowprobe :class:`~flowprobe.Density` or a user's object works as the other side of an ensemble.

References:
    Z. Kong, K. Chaudhuri. The Expressive Power of a Class of Normalizing Flow Models.
    AISTATS 2020. https://arxiv.org/abs/2006.00392

    A. Maurer, M. Pontil. Empirical Bernstein Bounds and Sample Variance Penalization. COLT 2009.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from scipy import special, stats
from torch import Tensor
from torch.distributions import Distribution

__all__ = [
    "Sampleable",
    "TVEstimate",
    "estimate_tv",
    "isotropic_normal_tv",
    "normal_tv",
    "tv_combined",
    "tv_exact_1d",
    "tv_monte_carlo",
    "tv_quadrature",
    "tv_sampled",
]

LogDensity = Callable[[np.ndarray], np.ndarray]
Interval = Literal["clt", "bernstein"]

CHUNK = 65_536  # points per call of a density
PILOT = 1_000  # draws per side that place the breakpoints of the exact 1-D quadrature
_PILOT_QUANTILES = (0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999)

# Probe points of a semi-infinite interval, as multiples of a length scale from its finite end.
_TAIL_PROBES = np.concatenate([[0.0], np.geomspace(1e-3, 1e8, 45)])
# Gauss–Legendre pair: the 21-point rule integrates, |G21 − G10| estimates its error (conservatively).
_NODES_LO, _WEIGHTS_LO = np.polynomial.legendre.leggauss(10)
_NODES_HI, _WEIGHTS_HI = np.polynomial.legendre.leggauss(21)
_MAX_ROUNDS = 80
_SECTIONS = 64  # sections of a bracket per round of the root search


class Sampleable(Protocol):
    """What the estimators need of a density: ``log_prob(x)`` and ``sample(n)``."""

    def log_prob(self, x: Tensor) -> Tensor: ...

    def sample(self, n: Any) -> Tensor: ...


# -- closed forms ---------------------------------------------------------------------------------


def normal_tv(mean_a: float, std_a: float, mean_b: float, std_b: float) -> float:
    r"""``TV(N(μ_a, σ_a²), N(μ_b, σ_b²))`` on ``R`` in closed form (``docs/theory/tv.md`` §1).

    ``log a − log b`` is a quadratic in ``x``; for ``σ_a ≠ σ_b`` it has two roots ``x₁ < x₂`` and
    ``TV = |A([x₁, x₂]) − B([x₁, x₂])|``; for ``σ_a = σ_b = σ``, ``TV = 2Φ(|μ_a − μ_b| / 2σ) − 1``.
    Two normals of one covariance ``Σ`` in ``R^d`` reduce to ``normal_tv(0, 1, δ, 1)`` with the
    Mahalanobis distance ``δ = ‖Σ^{−1/2}(μ_a − μ_b)‖``.

    Raises:
        ValueError: a standard deviation is not positive, or a parameter is not finite.
    """
    values = (mean_a, std_a, mean_b, std_b)
    if not all(math.isfinite(v) for v in values) or min(std_a, std_b) <= 0:
        raise ValueError(f"normal_tv needs finite means and positive standard deviations, got {values}")
    if std_a == std_b:
        return float(2 * special.ndtr(abs(mean_a - mean_b) / (2 * std_a)) - 1)
    alpha = 0.5 / std_b**2 - 0.5 / std_a**2  # log a − log b = αx² + βx + γ
    beta = mean_a / std_a**2 - mean_b / std_b**2
    gamma = 0.5 * mean_b**2 / std_b**2 - 0.5 * mean_a**2 / std_a**2 + math.log(std_b / std_a)
    q = -0.5 * (beta + math.copysign(math.sqrt(beta**2 - 4 * alpha * gamma), beta))  # stable roots q/α, γ/q
    x1, x2 = sorted((q / alpha, gamma / q))
    mass_a = special.ndtr((x2 - mean_a) / std_a) - special.ndtr((x1 - mean_a) / std_a)
    mass_b = special.ndtr((x2 - mean_b) / std_b) - special.ndtr((x1 - mean_b) / std_b)
    return float(abs(mass_a - mass_b))


def isotropic_normal_tv(dim: int, variance: float) -> float:
    """``TV(N(0, I_n), N(0, v I_n))`` in closed form (``n = dim``, ``v = variance``; ``docs/theory/tv.md`` §1).

    The densities cross on the sphere ``‖x‖² = r² = n v ln v / (v − 1)``; with ``F_n`` the χ²_n CDF and
    ``v ≥ 1`` (else swap the roles by scale invariance) ``TV = F_n(r²) − F_n(r²/v)``.

    Raises:
        ValueError: ``dim`` is negative or ``variance`` is not positive and finite.
    """
    if dim < 0 or not 0 < variance < math.inf:
        raise ValueError(f"isotropic_normal_tv needs dim >= 0 and a positive variance, got {dim} and {variance}")
    if dim == 0 or variance == 1:
        return 0.0
    v = max(variance, 1 / variance)
    r2 = dim * v * math.log(v) / (v - 1)
    return float(stats.chi2.cdf(r2, dim) - stats.chi2.cdf(r2 / v, dim))


# -- exact on R -----------------------------------------------------------------------------------


def _bisect(gap: LogDensity, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Roots of ``gap`` in the brackets ``[lo, hi]`` (sign change), all at once, to full precision.

    Each round evaluates ``gap`` once, at :data:`_SECTIONS` − 1 interior points of every bracket, and
    keeps the section where the sign changes: a bracket shrinks 64-fold per call, so ~10 calls reach
    full precision (bisection needs ~60). Stops when every bracket is two floats
    wide (or 1e-30 of its first width, for roots at 0).
    """
    if lo.size == 0:
        return lo
    sign_lo = np.sign(gap(lo))
    fractions = np.linspace(0.0, 1.0, _SECTIONS + 1)[1:-1]
    rows = np.arange(lo.size)
    floor = 1e-30 * (hi - lo)  # a root at 0 stops here, not at the smallest float
    for _ in range(_MAX_ROUNDS):
        points = lo[:, None] + (hi - lo)[:, None] * fractions
        same = np.sign(gap(points.ravel())).reshape(points.shape) == sign_lo[:, None]
        first = np.argmin(same, axis=1)  # the first point past the sign change (0 when none is)
        beyond = same.all(axis=1)  # the change lies in the last section
        new_lo = np.where(beyond, points[:, -1], np.where(first > 0, points[rows, first - 1], lo))
        new_hi = np.where(beyond, hi, points[rows, first])
        lo, hi = new_lo, new_hi
        if (hi - lo <= np.maximum(2 * np.spacing(np.maximum(np.abs(lo), np.abs(hi))), floor)).all():
            break
    return 0.5 * (lo + hi)


def _integrate(f: LogDensity, a: np.ndarray, b: np.ndarray, scale: float, tol: float) -> float:
    r"""``Σ_i ∫_{a_i}^{b_i} f`` by vectorised adaptive Gauss–Legendre quadrature.

    Semi-infinite intervals use ``x = a + s·t/(1 − t)``, ``t ∈ [0, 1)``. A part is accepted when its
    error estimate is below its share of ``tol`` (``tol / len(a)`` per interval, in proportion to the
    width in ``t``), or all are once the estimates sum to at most ``tol`` (jumps).

    Raises:
        ValueError: the tolerance is not met after 80 bisection rounds (a non-integrable density).
    """
    right, left = np.isinf(b), np.isinf(a)
    origin = np.where(left, b, a)
    t0, t1 = np.where(right | left, 0.0, a), np.where(right | left, 1.0, b)
    budget = tol / a.size / (t1 - t0)
    sign = np.where(left, -1.0, 1.0)

    nodes = np.concatenate([_NODES_HI, _NODES_LO])
    weights = np.concatenate([_WEIGHTS_HI, -_WEIGHTS_LO])  # one call gives G21 and G21 − G10

    def rules(lo: np.ndarray, hi: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        half = 0.5 * (hi - lo)[:, None]
        t = 0.5 * (hi + lo)[:, None] + half * nodes
        tail = (right | left)[i][:, None]
        s = np.where(tail, 1.0 - t, 1.0)
        x = np.where(tail, origin[i][:, None] + sign[i][:, None] * scale * t / s, t)
        jac = np.where(tail, scale / (s * s), 1.0)
        terms = half * weights * f(x.ravel()).reshape(x.shape) * jac
        fine = terms[:, : _NODES_HI.size].sum(-1)
        return fine, np.abs(fine + terms[:, _NODES_HI.size :].sum(-1))

    total, spent, lo, hi, idx = 0.0, 0.0, t0, t1, np.arange(a.size)
    for _ in range(_MAX_ROUNDS):
        fine, error = rules(lo, hi, idx)
        done = error <= budget[idx] * (hi - lo)
        if spent + error.sum() <= tol:  # e.g. the last few parts around a jump of a density
            done[:] = True
        total += float(fine[done].sum())
        spent += float(error[done].sum())
        mid = 0.5 * (lo + hi)
        lo, hi, idx = (np.concatenate([v[~done], w[~done]]) for v, w in ((lo, mid), (mid, hi), (idx, idx)))
        if lo.size == 0:
            return total
    raise ValueError("quadrature did not reach its tolerance (is the density integrable?)")


def tv_quadrature(
    log_p: LogDensity, log_q: LogDensity, breakpoints: np.ndarray, tol: float = 1e-10, probes: int = 9,
) -> float:
    r"""Exact TV of two log-density functions on ``R`` by adaptive quadrature (``docs/theory/tv.md`` §4).

    :math:`\mathrm{TV} = \tfrac12 \int_{\mathbb R} |p - q|`, integrated on each interval between
    consecutive points of ``{−∞, breakpoints, +∞}``, each split at the crossings of ``log p`` and
    ``log q`` (sign changes on ``probes`` equispaced points, geometrically spaced on the two tails,
    refined by bisection to full precision), so the integrand is smooth on every part. The parts
    are integrated by a vectorised adaptive Gauss–Legendre 21/10-point pair (semi-infinite tails
    after ``x = a + s t/(1 − t)``) until the estimated error is below ``tol`` in total.

    Args:
        log_p: Log-density of an array (``-inf`` allowed).
        log_q: Log-density of an array.
        breakpoints: Points where either density or its derivative may jump (sorted or not).
        tol: Absolute tolerance on ``∫|p − q|``.
        probes: Crossing-search points per finite interval.

    Returns:
        ``TV(p, q)`` in ``[0, 1]``.

    Raises:
        ValueError: a density is NaN somewhere it is evaluated.
    """
    knots = np.unique(np.asarray(breakpoints, dtype=float))
    knots = knots if knots.size else np.zeros(1)
    scale = float(np.ptp(knots)) / (knots.size - 1) if knots.size > 1 else 1.0
    scale = scale if scale > 0 else 1.0

    def log_values(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lp, lq = log_p(x), log_q(x)
        if np.isnan(lp).any() or np.isnan(lq).any():
            raise ValueError("a density is NaN inside the integration range")
        return lp, lq

    def gap(x: np.ndarray) -> np.ndarray:
        lp, lq = log_values(x)
        with np.errstate(invalid="ignore"):
            return np.where(np.isneginf(lp) & np.isneginf(lq), 0.0, lp - lq)

    def integrand(x: np.ndarray) -> np.ndarray:
        lp, lq = log_values(x)
        return np.abs(np.exp(lp) - np.exp(lq))

    finite = [np.linspace(a, b, probes) for a, b in zip(knots[:-1], knots[1:], strict=True)]
    groups = [knots[0] - scale * _TAIL_PROBES[::-1], *finite, knots[-1] + scale * _TAIL_PROBES]
    values = np.split(gap(np.concatenate(groups)), np.cumsum([g.size for g in groups])[:-1])
    brackets = []
    for points, g in zip(groups, values, strict=True):
        change = np.flatnonzero(np.sign(g[:-1]) * np.sign(g[1:]) < 0)
        brackets.append(points[np.stack([change, change + 1])])
    lo, hi = np.concatenate(brackets, axis=1)
    roots = _bisect(gap, lo, hi)
    cuts = np.unique(np.concatenate([knots, roots]))
    a, b = np.concatenate([[-np.inf], cuts]), np.concatenate([cuts, [np.inf]])
    return 0.5 * _integrate(integrand, a, b, scale, tol)


# -- estimates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TVEstimate:
    """A TV estimate and its interval. Tensors have the batch shape of the points (``()`` for one pair)
    and the dtype and device of the log-densities.

    Attributes:
        estimate: The estimate, in ``[0, 1]``.
        low: Lower end of the interval (clipped to ``[0, 1]``, where TV lies).
        high: Upper end of the interval.
        stderr: Standard error of the Monte-Carlo mean (0 for quadrature).
        samples: Terms averaged: samples of one side, or pairs for ``"combined"`` (0 for quadrature).
        level: Confidence level of a Monte-Carlo interval; 1.0 for quadrature, whose interval is the
            error estimate of the rule.
        method: ``"monte-carlo"`` (samples of one side), ``"combined"`` (both sides) or ``"quadrature"``.
        interval: ``"clt"``, ``"bernstein"`` or ``"quadrature"``.
    """

    estimate: Tensor
    low: Tensor
    high: Tensor
    stderr: Tensor
    samples: int
    level: float
    method: str
    interval: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain numbers (floats, nested lists for a batch), e.g. for JSON."""
        tensors = {name: getattr(self, name).tolist() for name in ("estimate", "low", "high", "stderr")}
        return {**tensors, "samples": self.samples, "level": self.level, "method": self.method,
                "interval": self.interval}


def _check_options(level: float, interval: str) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if interval not in ("clt", "bernstein"):
        raise ValueError(f"interval must be 'clt' or 'bernstein', got {interval!r}")


def _summary(terms: Tensor, level: float, interval: str, method: str) -> TVEstimate:
    r"""Mean of i.i.d. terms in ``[0, 1]`` (last axis) with its interval (``docs/theory/tv.md`` §3).

    ``clt``: ``mean ± z·s/√n``. ``bernstein``: the empirical Bernstein bound of Maurer & Pontil
    (2009, Theorem 4) on each side at ``δ = (1 − level)/2``,
    ``mean ± (√(2 s² ln(2/δ) / n) + 7 ln(2/δ) / (3(n − 1)))``, valid for every ``n ≥ 2``.
    """
    n = terms.shape[-1]
    mean, var = terms.mean(-1), terms.var(-1)
    stderr = (var / n).sqrt()
    if interval == "clt":
        half = float(special.ndtri(0.5 + level / 2)) * stderr
    else:
        log_term = math.log(4 / (1 - level))
        half = (2 * var * log_term / n).sqrt() + 7 * log_term / (3 * (n - 1))
    return TVEstimate(mean, (mean - half).clamp(0, 1), (mean + half).clamp(0, 1), stderr, n, level, method, interval)


def _terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``(1 − b/a)⁺`` at samples of ``a``, as ``−expm1(min(log b − log a, 0))``."""
    gap = log_b - log_a
    if bool(torch.isnan(gap).any()):
        raise ValueError("the log-densities are NaN (or both −inf) at some samples")
    return -torch.expm1(gap.clamp(max=0))


def tv_monte_carlo(
    log_a: Tensor | np.ndarray, log_b: Tensor | np.ndarray, level: float = 0.95, interval: Interval = "bernstein",
) -> TVEstimate:
    r"""Monte-Carlo TV from log-densities at samples ``x_i ∼ a``.

    :math:`\mathrm{TV}(a, b) = \int (a - b)^+ = \mathbb E_a\big[(1 - b/a)^+\big]`: the terms lie in
    ``[0, 1]``, so their mean has a finite-sample (empirical Bernstein) interval and a CLT one
    (``docs/theory/tv.md`` §2–3). Swap the arguments to sample the other density.

    Args:
        log_a: ``log a(x_i)`` at samples of ``a``, shape ``(..., N)``: one TV per leading index.
        log_b: ``log b(x_i)`` at the same points.
        level: Confidence level, in ``(0, 1)``.
        interval: ``"bernstein"`` (valid for every ``n``) or ``"clt"`` (asymptotic, narrower).

    Raises:
        ValueError: shapes differ, fewer than two samples, NaN values, or a bad ``level`` / ``interval``.
    """
    _check_options(level, interval)
    log_a = torch.as_tensor(log_a).detach()
    log_b = torch.as_tensor(log_b).detach().to(log_a)
    if log_a.shape != log_b.shape:
        raise ValueError(f"log_a and log_b must have one shape, got {tuple(log_a.shape)} and {tuple(log_b.shape)}")
    if log_a.dim() == 0 or log_a.shape[-1] < 2:
        raise ValueError("Monte-Carlo TV needs at least two samples along the last axis")
    return _summary(_terms(log_a, log_b), level, interval, "monte-carlo")


class _Density:
    """A density as the estimators see it: points ``(..., N, d)`` in, log-densities ``(..., N)`` out."""

    def __init__(self, density: Sampleable, name: str) -> None:
        if not (callable(getattr(density, "log_prob", None)) and callable(getattr(density, "sample", None))):
            raise ValueError(f"{name} must have log_prob(x) and sample(n), got {type(density).__name__}")
        self.density, self.name = density, name
        self.torch = isinstance(density, Distribution)
        if self.torch and len(density.event_shape) > 1:
            raise ValueError(f"{name} must have vector or scalar events, got event shape {tuple(density.event_shape)}")
        self.scalar = self.torch and len(density.event_shape) == 0

    @property
    def dim(self) -> int:
        """The dimension ``d`` of the points (one draw if the object does not say)."""
        if self.torch:
            return 1 if self.scalar else self.density.event_shape[0]
        dim = getattr(self.density, "dim", None)
        return dim if isinstance(dim, int) else self.sample(1).shape[-1]

    def sample(self, n: int) -> Tensor:
        if not self.torch:
            return self.density.sample(n)
        x = self.density.sample((n,))  # torch's layout: (sample, *batch, *event)
        return (x.unsqueeze(-1) if self.scalar else x).movedim(0, -2)

    def _log_prob(self, x: Tensor) -> Tensor:
        if not self.torch:
            if x.dim() > 2 and not getattr(self.density, "ensemble_shape", ()):  # one density: points (M, d)
                return self.density.log_prob(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])
            return self.density.log_prob(x)
        value = (x[..., 0] if self.scalar else x).movedim(x.dim() - 2, 0)
        return self.density.log_prob(value).movedim(0, -1)

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.cat([self._log_prob(chunk) for chunk in x.split(CHUNK, dim=-2)], dim=-1)

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` draws and their log-density; a :class:`~flowprobe.Flow` gives both from its forward pass."""
        draw = getattr(self.density, "rsample_and_log_prob", None)
        if callable(draw):
            return draw(n)
        x = self.sample(n)
        return x, self._log_prob(x)


def _count(n: int | None, **points: Tensor | None) -> int:
    """The number of draws per side: ``n``, or the ``N`` of the given points (all must agree)."""
    counts = {} if n is None else {"n": n}
    for name, x in points.items():
        if x is None:
            continue
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ValueError(f"{name} must be a floating-point tensor of shape (..., N, d), got {_describe(x)}")
        counts[name] = x.shape[-2]
    if not counts:
        raise ValueError("give the number of samples n or the points to use")
    if len(set(counts.values())) > 1:
        raise ValueError(f"the sample counts must agree, got {counts}")
    count = next(iter(counts.values()))
    if not isinstance(count, int) or count < 2:
        raise ValueError(f"Monte-Carlo TV needs an integer number of at least two samples per side, got {count!r}")
    return count


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def _side_terms(a: _Density, b: _Density, n: int, points: Tensor | None) -> Tensor:
    """``(1 − b/a)⁺`` at ``n`` samples of ``a`` (the given points, or drawn in chunks), shape ``(..., n)``."""
    if points is not None:
        return _terms(a.log_prob(points), b.log_prob(points))
    parts = []
    for size in [CHUNK] * (n // CHUNK) + ([n % CHUNK] if n % CHUNK else []):
        x, log_a = a.sample_and_log_prob(size)
        parts.append(_terms(log_a, b.log_prob(x)))
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def tv_sampled(
    a: Sampleable,
    b: Sampleable,
    n: int | None = None,
    *,
    points: Tensor | None = None,
    level: float = 0.95,
    interval: Interval = "bernstein",
) -> TVEstimate:
    r"""TV from samples of ``a`` only: :math:`\mathbb E_{x\sim a}[(1 - b(x)/a(x))^+]` (``docs/theory/tv.md`` §2).

    With ``a`` a :class:`~flowprobe.Flow` the samples and their exact log-density come from the
    forward pass (``rsample_and_log_prob``) and only ``b`` is evaluated; with ``b`` a flow, its
    density is evaluated through the inverse (``log_prob``).

    Args:
        a: The sampled density (``log_prob`` and ``sample``).
        b: The other density.
        n: Number of draws from ``a``.
        points: Samples of ``a``, ``(..., N, d)``, instead of drawing ``n``.
        level: Confidence level, in ``(0, 1)``.
        interval: ``"bernstein"`` (valid for every ``n``) or ``"clt"`` (asymptotic, narrower).

    Raises:
        ValueError: neither or conflicting ``n`` / ``points``, fewer than two samples, an object
            without ``log_prob`` and ``sample``, NaN log-densities, or a bad ``level`` / ``interval``.
    """
    _check_options(level, interval)
    count = _count(n, points=points)
    terms = _side_terms(_Density(a, "a"), _Density(b, "b"), count, points)
    return _summary(terms, level, interval, "monte-carlo")


@torch.no_grad()
def tv_combined(
    a: Sampleable,
    b: Sampleable,
    n: int | None = None,
    *,
    points_a: Tensor | None = None,
    points_b: Tensor | None = None,
    level: float = 0.95,
    interval: Interval = "bernstein",
) -> TVEstimate:
    r"""TV from samples of both densities, averaged pairwise (``docs/theory/tv.md`` §3).

    With ``x_i ∼ a`` and ``y_i ∼ b`` independent, the pair terms
    :math:`\tfrac12\big[(1 - b(x_i)/a(x_i))^+ + (1 - a(y_i)/b(y_i))^+\big]` are i.i.d. in ``[0, 1]``
    with mean ``TV(a, b)``, so the interval of their mean is valid exactly as for one side, and
    narrower: the variance is the average of the two sides' over ``2n`` draws.

    Args:
        a: A density (e.g. a :class:`~flowprobe.Flow`).
        b: The other density (e.g. the target).
        n: Draws per side; may be omitted when points are given.
        points_a: Samples of ``a``, ``(..., n, d)``, instead of drawing them.
        points_b: Samples of ``b``, ``(..., n, d)``.
        level: Confidence level, in ``(0, 1)``.
        interval: ``"bernstein"`` (valid for every ``n``) or ``"clt"`` (asymptotic, narrower).

    Raises:
        ValueError: as :func:`tv_sampled`, or sample counts that differ between the sides.
    """
    _check_options(level, interval)
    count = _count(n, points_a=points_a, points_b=points_b)
    da, db = _Density(a, "a"), _Density(b, "b")
    pairs = 0.5 * (_side_terms(da, db, count, points_a) + _side_terms(db, da, count, points_b))
    return _summary(pairs, level, interval, "combined")


def _numpy_log_density(density: _Density, like: Tensor) -> LogDensity:
    """``density.log_prob`` of a NumPy array of points on ``R``, evaluated in ``like``'s dtype and device."""

    def log_pdf(x: np.ndarray) -> np.ndarray:
        points = torch.as_tensor(x.reshape(-1, 1), dtype=like.dtype, device=like.device)
        return density.log_prob(points).cpu().numpy().astype(float).reshape(x.shape)

    return log_pdf


@torch.no_grad()
def tv_exact_1d(a: Sampleable, b: Sampleable, *, tol: float | None = None,
                breakpoints: np.ndarray | None = None) -> TVEstimate:
    r"""Exact TV of two densities on ``R`` by adaptive quadrature (:func:`tv_quadrature`).

    The densities are evaluated in the dtype and on the device of ``a``'s samples. Unless given,
    the breakpoints are quantiles of ``PILOT`` draws from each side (they only help the quadrature
    find the mass; the value does not depend on them beyond ``tol``).

    Args:
        a: A density on ``R`` (e.g. a 1-D :class:`~flowprobe.Flow`).
        b: The other density on ``R``.
        tol: Absolute tolerance on ``∫|a − b|`` (default ``1e-10`` in float64, ``1e-5`` otherwise);
            the interval is ``estimate ± tol/2``.
        breakpoints: Points where a density or its derivative may jump.

    Raises:
        ValueError: a density is not on ``R``, is batched, is NaN where evaluated, or the quadrature
            does not reach ``tol``.
    """
    da, db = _Density(a, "a"), _Density(b, "b")
    for side in (da, db):
        if side.dim != 1:
            raise ValueError(f"exact TV needs densities on R (d = 1); {side.name} has d = {side.dim}")
    pilot_a, pilot_b = da.sample(PILOT), db.sample(PILOT)
    if pilot_a.dim() != 2 or pilot_b.dim() != 2:
        raise ValueError("exact TV takes one pair of densities, not a batch; use tv_combined for a batch")
    like = pilot_a
    tol = (1e-10 if like.dtype == torch.float64 else 1e-5) if tol is None else tol
    if breakpoints is None:
        pooled = torch.cat([pilot_a, pilot_b.to(like)]).flatten()
        breakpoints = torch.quantile(pooled, pooled.new_tensor(_PILOT_QUANTILES)).cpu().numpy()
    value = like.new_tensor(tv_quadrature(_numpy_log_density(da, like), _numpy_log_density(db, like), breakpoints, tol))
    half = 0.5 * tol
    return TVEstimate(value, (value - half).clamp(0, 1), (value + half).clamp(0, 1), torch.zeros_like(value), 0, 1.0,
                      "quadrature", "quadrature")


def estimate_tv(
    a: Sampleable,
    b: Sampleable,
    n: int = 100_000,
    *,
    level: float = 0.95,
    interval: Interval = "bernstein",
    method: Literal["auto", "quadrature", "combined"] = "auto",
    tol: float | None = None,
) -> TVEstimate:
    """``TV(a, b)`` by the best estimator available: exact quadrature on ``R``, both sides otherwise.

    Args:
        a: A density, e.g. a :class:`~flowprobe.Flow`.
        b: The other density, e.g. the target.
        n: Draws per side for the Monte-Carlo estimate.
        level: Confidence level of the Monte-Carlo interval.
        interval: ``"bernstein"`` (valid for every ``n``) or ``"clt"`` (asymptotic, narrower).
        method: ``"auto"`` (``"quadrature"`` when ``d = 1``, else ``"combined"``),
            ``"quadrature"`` (:func:`tv_exact_1d`) or ``"combined"`` (:func:`tv_combined`).
        tol: Tolerance of the quadrature.

    Raises:
        ValueError: an unknown ``method``, or as the chosen estimator.
    """
    if method not in ("auto", "quadrature", "combined"):
        raise ValueError(f"method must be 'auto', 'quadrature' or 'combined', got {method!r}")
    if method == "auto":
        method = "quadrature" if _Density(a, "a").dim == 1 else "combined"
    if method == "quadrature":
        return tv_exact_1d(a, b, tol=tol)
    return tv_combined(a, b, n, level=level, interval=interval)
