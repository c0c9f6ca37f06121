"""One-dimensional target densities for :mod:`flowprobe.theory.approx1d`.

A :class:`Target1D` bundles what the construction needs: a vectorised log-density, an exact CDF
and survival function (piece masses are differences of these), a quantile function (used only to
*place* knots, so it may be approximate) and, when available, an exact sampler.

Specs accepted by :func:`parse_target`:

* a built-in name (:data:`BUILTIN_TARGETS`), e.g. ``blog-mixture`` (Kong & Chaudhuri's blog figure),
* ``scipy:NAME(k=v, ...)``: any continuous ``scipy.stats`` distribution, e.g. ``scipy:t(df=3)``,
* ``path/to/file.py:name``: ``name`` is a frozen ``scipy.stats`` distribution or a function
  returning the (unnormalised) log-density of a NumPy array; the CDF is then computed numerically.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from flowprobe.theory.quadrature import integrate_intervals
from flowprobe.userfile import load_user_object

__all__ = ["BUILTIN_TARGETS", "Target1D", "from_log_density", "from_scipy", "normal_mixture", "parse_target"]

ArrayFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Target1D:
    """A continuous density ``p`` on ``R``.

    Attributes:
        name: What to call it in reports.
        log_pdf: ``log p`` of an array (``-inf`` outside the support).
        cdf: ``P(x)``, exact.
        sf: ``1 − P(x)``, exact (accurate in the upper tail).
        ppf: Quantile function; may be approximate (knot placement only).
        sample: ``sample(n, rng)`` draws exact samples, or ``None``.
        interval: A default interval ``[lo, hi]`` for equispaced knots, or ``None`` (quantiles).
        support: ``(a, b)``, the closure of ``{p > 0}`` where known (finite ends are breakpoints
            of the TV quadrature).
    """

    name: str
    log_pdf: ArrayFn
    cdf: ArrayFn
    sf: ArrayFn
    ppf: ArrayFn
    sample: Callable[[int, np.random.Generator], np.ndarray] | None = None
    interval: tuple[float, float] | None = None
    support: tuple[float, float] = (-np.inf, np.inf)

    def mass(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``P([a, b])``, through the CDF in the lower half and the survival function above."""
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        upper = self.cdf(a) > 0.5
        return np.where(upper, self.sf(a) - self.sf(b), self.cdf(b) - self.cdf(a))


def from_scipy(dist: object, name: str, interval: tuple[float, float] | None = None) -> Target1D:
    """Wrap a frozen continuous ``scipy.stats`` distribution.

    Raises:
        ValueError: ``dist`` has no density (e.g. a discrete distribution).
    """
    if not hasattr(dist, "logpdf"):
        raise ValueError(f"target {name!r} has no density (only continuous scipy.stats distributions are supported)")
    return Target1D(
        name=name,
        log_pdf=lambda x: dist.logpdf(x),
        cdf=lambda x: dist.cdf(x),
        sf=lambda x: dist.sf(x),
        ppf=lambda u: np.where(np.asarray(u) < 0.5, dist.ppf(u), dist.isf(1 - np.asarray(u))),
        sample=lambda n, rng: np.asarray(dist.rvs(size=n, random_state=rng), dtype=float),
        interval=interval,
        support=tuple(float(v) for v in dist.support()),
    )


def normal_mixture(
    weights: list[float], means: list[float], variances: list[float], name: str,
    interval: tuple[float, float] | None = None,
) -> Target1D:
    r"""``p(x) = Σ_k w_k N(x; m_k, v_k)`` (``v_k`` = variances), evaluated with NumPy (fast).

    Raises:
        ValueError: negative or all-zero weights, non-positive variances, mismatched lengths.
    """
    w, m, v = (np.asarray(a, dtype=float) for a in (weights, means, variances))
    if not (w.shape == m.shape == v.shape) or w.ndim != 1:
        raise ValueError("mixture weights, means and variances must be lists of one length")
    if (w < 0).any() or not w.sum() > 0 or not (v > 0).all():
        raise ValueError("mixture weights must be non-negative with a positive sum and variances positive")
    w, sd = w / w.sum(), np.sqrt(v)

    def log_pdf(x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=float)[..., None] - m) / sd
        return special.logsumexp(-0.5 * z * z - np.log(sd * np.sqrt(2 * np.pi)), b=w, axis=-1)

    def cdf(x: np.ndarray) -> np.ndarray:
        return (w * special.ndtr((np.asarray(x, dtype=float)[..., None] - m) / sd)).sum(-1)

    def sf(x: np.ndarray) -> np.ndarray:
        return (w * special.ndtr((m - np.asarray(x, dtype=float)[..., None]) / sd)).sum(-1)

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.choice(w.size, size=n, p=w)
        return m[k] + sd[k] * rng.standard_normal(n)

    lo, hi = float((m - 40 * sd).min()), float((m + 40 * sd).max())
    return Target1D(name, log_pdf, cdf, sf, _tabulated_ppf(cdf, lo, hi), sample, interval)


def _tabulated_ppf(cdf: ArrayFn, lo: float, hi: float, points: int = 20001) -> ArrayFn:
    """An approximate quantile function by interpolating the CDF on a grid (knot placement only)."""
    grid = np.linspace(lo, hi, points)
    values, first = np.unique(cdf(grid), return_index=True)
    return lambda u: np.interp(u, values, grid[first])


def _vectorised(log_density: Callable, name: str) -> ArrayFn:
    """``log_density`` as a checked array function: called with whole arrays when it accepts them (one
    call per array), one scalar at a time otherwise."""
    scalar_only = False

    def call(x: np.ndarray) -> np.ndarray:
        nonlocal scalar_only
        if not scalar_only:
            try:
                out = np.asarray(log_density(x), dtype=float)
                if out.shape == x.shape:
                    return out
            except Exception:  # noqa: BLE001 - a scalar-only function; tried one value at a time below
                pass
            scalar_only = True
        return np.vectorize(lambda t: float(log_density(t)), otypes=[float])(x)

    def log_f(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        try:
            out = call(x)
        except Exception as err:  # the user's function failed: one line, no traceback
            raise ValueError(f"log-density of target {name!r} failed: {type(err).__name__}: {err}") from None
        if np.isnan(out).any() or (out == np.inf).any():
            bad = x[np.isnan(out) | (out == np.inf)].ravel()[0]
            raise ValueError(f"log-density of target {name!r} returns NaN or +inf at x = {bad:g}")
        return out

    return log_f


def from_log_density(log_density: Callable, name: str) -> Target1D:
    """A target given by an unnormalised log-density; normaliser and CDF by vectorised quadrature.

    The function is probed on a wide, centre-dense grid (``sinh``-spaced up to ``±5e12``) to find where
    the mass lies; cells between nodes placed there are integrated all at once by adaptive
    Gauss–Legendre (:func:`~flowprobe.theory.quadrature.integrate_intervals`, absolute error 1e-15 of
    the mass per cell), and the CDF at any points by the same rule from the cell edges. A NumPy
    function is called with arrays, a few dozen times per CDF evaluation round. Narrow spikes far
    from the probe points may be missed.

    Raises:
        ValueError: the function fails, returns NaN or +inf, has no mass, or its mass does not converge.
    """
    log_f = _vectorised(log_density, name)
    probe = np.sinh(np.linspace(-30.0, 30.0, 12001))
    log_probe = log_f(probe)
    top = log_probe.max()
    if not np.isfinite(top):
        raise ValueError(f"target {name!r} has zero mass (its log-density is -inf at every probe point)")
    alive = np.flatnonzero(log_probe > top - 60)
    lo, hi = probe[max(alive[0] - 1, 0)], probe[min(alive[-1] + 1, probe.size - 1)]
    nodes = np.unique(np.concatenate([np.linspace(lo, hi, 1001), probe[(probe > lo) & (probe < hi)]]))
    shift = top

    def density(x: np.ndarray) -> np.ndarray:
        return np.exp(log_f(x) - shift)

    edges = np.concatenate([[-np.inf], nodes, [np.inf]])
    scale = (hi - lo) / 10
    rough = float(np.trapezoid(np.exp(log_probe - shift), probe))
    tol = 1e-15 * rough if np.isfinite(rough) and rough > 0 else 1e-300
    try:
        cells = integrate_intervals(density, edges[:-1], edges[1:], tol, scale)
    except ValueError:
        raise ValueError(f"target {name!r}: the mass of its density does not converge (not normalisable, "
                         "or tails too heavy)") from None
    total = cells.sum()
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"target {name!r} has zero or infinite mass")
    below = np.concatenate([[0.0], np.cumsum(cells)]) / total  # P at edges
    above = np.concatenate([np.cumsum(cells[::-1])[::-1], [0.0]]) / total  # 1 − P at edges
    log_norm = shift + np.log(total)

    def partial(x: np.ndarray, from_left: bool) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        flat = x.ravel()
        i = np.clip(np.searchsorted(nodes, flat), 0, nodes.size)  # flat lies in (edges[i], edges[i + 1]]
        if from_left:
            out = below[i] + integrate_intervals(density, edges[i], flat, tol, scale) / total
        else:
            out = above[i + 1] + integrate_intervals(density, flat, edges[i + 1], tol, scale) / total
        return np.clip(out, 0.0, 1.0).reshape(x.shape)

    return Target1D(
        name=name,
        log_pdf=lambda x: log_f(x) - log_norm,
        cdf=lambda x: partial(x, True),
        sf=lambda x: partial(x, False),
        ppf=lambda u: np.interp(u, below[1:-1], nodes),
    )


def _builtin(name: str) -> Target1D:
    s = stats
    table: dict[str, Callable[[], Target1D]] = {
        "blog-mixture": lambda: normal_mixture([0.4, 0.4, 0.2], [-1, 1, 0], [0.4, 0.4, 0.5], name, (-4.0, 4.0)),
        "skew-mixture": lambda: normal_mixture([0.5, 0.3, 0.2], [-2, 0.5, 3], [0.25, 1.0, 0.09], name),
        "laplace": lambda: from_scipy(s.laplace(0.0, 1.0), name),
        "uniform": lambda: from_scipy(s.uniform(0.0, 1.0), name),
        "beta": lambda: from_scipy(s.beta(2.0, 5.0), name),
        "exponential": lambda: from_scipy(s.expon(), name),
        "lognormal": lambda: from_scipy(s.lognorm(0.5), name),
        "cauchy": lambda: from_scipy(s.cauchy(), name),
        "student-t3": lambda: from_scipy(s.t(3.0), name),
    }
    return table[name]()


BUILTIN_TARGETS = (
    "blog-mixture", "skew-mixture", "laplace", "uniform", "beta", "exponential", "lognormal", "cauchy",
    "student-t3",
)
"""Names of the built-in targets: the blog's mixture ``0.4 N(−1, 0.4) + 0.4 N(1, 0.4) + 0.2 N(0, 0.5)``
(variances), an asymmetric three-component mixture, Laplace(0, 1), U(0, 1),
Beta(2, 5), Exp(1), LogNormal(σ = 0.5), Cauchy(0, 1) and Student-t(3)."""

_SCIPY_SPEC = re.compile(r"^scipy:([A-Za-z_][A-Za-z0-9_]*)(?:\((.*)\))?$")


def _parse_kwargs(text: str, spec: str) -> dict[str, float]:
    kwargs: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"bad argument {part!r} in target {spec!r}; expected key=value")
        try:
            kwargs[key.strip()] = float(ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError, TypeError):
            message = f"argument {key.strip()!r} of target {spec!r} must be a number, got {value.strip()!r}"
            raise ValueError(message) from None
    return kwargs


def _from_scipy_spec(spec: str) -> Target1D:
    match = _SCIPY_SPEC.match(spec.replace(" ", ""))
    if not match:
        raise ValueError(f"bad scipy target {spec!r}; expected scipy:NAME(k=v,...)")
    family = getattr(stats, match.group(1), None)
    if not isinstance(family, stats.rv_continuous):
        raise ValueError(f"{match.group(1)!r} is not a continuous scipy.stats distribution (no density)")
    try:
        frozen = family(**_parse_kwargs(match.group(2) or "", spec))
        frozen.cdf(0.0)  # surfaces invalid shape arguments now
    except TypeError as err:
        raise ValueError(f"bad arguments for target {spec!r}: {err}") from None
    if not np.isfinite(frozen.logpdf(frozen.median())):
        raise ValueError(f"target {spec!r} has invalid parameters (density is not finite at its median)")
    check_scale(spec, *(float(q) for q in frozen.ppf([0.25, 0.5, 0.75])))
    return from_scipy(frozen, spec)


SCALE_RANGE = (1e-100, 1e100)
"""Interquartile ranges and medians the construction handles (float64 quadrature and root finding)."""


def check_scale(name: str, q1: float, median: float, q3: float) -> None:
    """Refuse a density whose quartiles lie outside :data:`SCALE_RANGE` (or are not finite).

    Raises:
        ValueError: naming the quartiles and the range.
    """
    low, high = SCALE_RANGE
    spread = q3 - q1
    if not (np.isfinite(spread) and low <= spread <= high and abs(median) <= high):
        raise ValueError(f"target {name!r} has quartiles {q1:.3g}, {median:.3g}, {q3:.3g}: its spread and centre must "
                         f"lie within [{low:g}, {high:g}] for float64 quadrature; rescale it")


def _from_file_spec(spec: str) -> Target1D:
    obj = load_user_object(spec)
    if hasattr(obj, "dist") and hasattr(obj, "cdf"):
        return from_scipy(obj, spec)
    if callable(obj):
        return from_log_density(obj, spec)
    raise ValueError(f"{spec!r} is neither a frozen scipy.stats distribution nor a log-density function")


def parse_target(spec: str | Target1D) -> Target1D:
    """Resolve a target spec (see the module docstring); a :class:`Target1D` passes through.

    Raises:
        ValueError: unknown name, bad scipy spec, a target without density, NaN log-density, no mass.
        FileNotFoundError: the ``.py`` file of a ``file.py:name`` spec does not exist.
    """
    if isinstance(spec, Target1D):
        return spec
    if spec in BUILTIN_TARGETS:
        return _builtin(spec)
    if spec.startswith("scipy:"):
        return _from_scipy_spec(spec)
    if ".py:" in spec:
        return _from_file_spec(spec)
    raise ValueError(
        f"unknown target {spec!r}; expected one of {', '.join(BUILTIN_TARGETS)}, scipy:NAME(k=v,...) or file.py:name"
    )
