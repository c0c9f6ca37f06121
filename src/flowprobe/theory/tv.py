r"""Total-variation distance estimators.

Convention (theory.md §1.1): :math:`\mathrm{TV}(p, q) = \sup_A |P(A) - Q(A)| = \tfrac12\int|p - q|`,
the metric of Kong & Chaudhuri (AISTATS 2020) for approximation by normalizing flows.

* :func:`tv_quadrature`: deterministic, for densities on ``R`` that are smooth between known
  breakpoints. Every interval between breakpoints is split further at the crossings of the two
  densities, so ``|p − q|`` is smooth on each sub-interval and ``scipy.integrate.quad`` meets its
  tolerance.
* :func:`tv_monte_carlo`: any dimension, from log-densities at samples of one of the two, with a
  CLT confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special

__all__ = ["MonteCarloTV", "tv_monte_carlo", "tv_quadrature"]

LogDensity = Callable[[np.ndarray], np.ndarray]

# Probe points of a semi-infinite interval, as multiples of a length scale from its finite end.
_TAIL_PROBES = np.concatenate([[0.0], np.geomspace(1e-3, 1e8, 45)])
# Gauss–Legendre pair: the 21-point rule integrates, |G21 − G10| estimates its error (conservatively).
_NODES_LO, _WEIGHTS_LO = np.polynomial.legendre.leggauss(10)
_NODES_HI, _WEIGHTS_HI = np.polynomial.legendre.leggauss(21)
_MAX_ROUNDS = 80


def _bisect(gap: LogDensity, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Roots of ``gap`` in the brackets ``[lo, hi]`` (sign change), all at once, to full precision."""
    sign_lo = np.sign(gap(lo))
    for _ in range(_MAX_ROUNDS):
        mid = 0.5 * (lo + hi)
        same = np.sign(gap(mid)) == sign_lo
        lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
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

    def rule(lo: np.ndarray, hi: np.ndarray, i: np.ndarray, nodes: np.ndarray, weights: np.ndarray) -> np.ndarray:
        half = 0.5 * (hi - lo)[:, None]
        t = 0.5 * (hi + lo)[:, None] + half * nodes
        tail = (right | left)[i][:, None]
        s = np.where(tail, 1.0 - t, 1.0)
        x = np.where(tail, origin[i][:, None] + sign[i][:, None] * scale * t / s, t)
        jac = np.where(tail, scale / (s * s), 1.0)
        return (half * weights * f(x) * jac).sum(-1)

    total, spent, lo, hi, idx = 0.0, 0.0, t0, t1, np.arange(a.size)
    for _ in range(_MAX_ROUNDS):
        fine = rule(lo, hi, idx, _NODES_HI, _WEIGHTS_HI)
        error = np.abs(fine - rule(lo, hi, idx, _NODES_LO, _WEIGHTS_LO))
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
    r"""Exact TV of two densities on ``R`` by adaptive quadrature.

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
    brackets = []
    for points in [knots[0] - scale * _TAIL_PROBES[::-1], *finite, knots[-1] + scale * _TAIL_PROBES]:
        g = gap(points)
        change = np.flatnonzero(np.sign(g[:-1]) * np.sign(g[1:]) < 0)
        brackets.append(points[np.stack([change, change + 1])])
    lo, hi = np.concatenate(brackets, axis=1)
    roots = _bisect(gap, lo, hi)
    cuts = np.unique(np.concatenate([knots, roots]))
    a, b = np.concatenate([[-np.inf], cuts]), np.concatenate([cuts, [np.inf]])
    return 0.5 * _integrate(integrand, a, b, scale, tol)


def _check_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    if a != b:
        raise ValueError(f"log_a and log_b must have one shape, got {a} and {b}")


@dataclass(frozen=True)
class MonteCarloTV:
    """A Monte-Carlo TV estimate.

    Attributes:
        estimate: The sample mean.
        ci: ``(low, high)`` CLT confidence interval at ``level``.
        stderr: Standard error of the mean.
        samples: Number of samples.
        level: Confidence level.
    """

    estimate: float
    ci: tuple[float, float]
    stderr: float
    samples: int
    level: float


def tv_monte_carlo(
    log_a: np.ndarray | torch.Tensor, log_b: np.ndarray | torch.Tensor, level: float = 0.99,
) -> MonteCarloTV:
    r"""Monte-Carlo TV from log-densities at samples ``x_i ~ a``.

    Uses :math:`\mathrm{TV}(a, b) = \int (a - b)^+ = \mathbb E_{a}\big[(1 - b/a)^+\big]`; the terms lie in
    ``[0, 1]``, so the CLT interval ``mean ± z·sd/√N`` is reliable for moderate ``N``. Swap the
    arguments to sample from the other density: ``TV`` is symmetric.

    Args:
        log_a: ``log a(x_i)`` at ``N`` samples of ``a`` (NumPy array or tensor, any device).
        log_b: ``log b(x_i)`` at the same points.
        level: Confidence level of the interval, in ``(0, 1)``.

    Returns:
        A :class:`MonteCarloTV`.

    Raises:
        ValueError: shapes differ, fewer than two samples, NaN values, or a level outside ``(0, 1)``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if isinstance(log_a, torch.Tensor):
        log_b = torch.as_tensor(log_b).to(log_a)
        _check_shapes(tuple(log_a.shape), tuple(log_b.shape))
        terms = -torch.expm1(torch.clamp(log_b - log_a, max=0.0)).detach().double().cpu().numpy()
    else:
        log_a, log_b = np.asarray(log_a, dtype=float), np.asarray(log_b, dtype=float)
        _check_shapes(log_a.shape, log_b.shape)
        terms = -np.expm1(np.minimum(log_b - log_a, 0.0))
    terms = terms.reshape(-1)
    if terms.size < 2:
        raise ValueError("Monte-Carlo TV needs at least two samples")
    if np.isnan(terms).any():
        raise ValueError("log-densities contain NaN")
    mean = float(terms.mean())
    stderr = float(terms.std(ddof=1) / np.sqrt(terms.size))
    z = float(special.ndtri(0.5 + level / 2))
    return MonteCarloTV(mean, (mean - z * stderr, mean + z * stderr), stderr, terms.size, level)
