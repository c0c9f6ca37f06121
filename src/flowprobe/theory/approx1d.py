r"""Universal approximation on ``R`` with ReLU planar layers, by construction, with exact TV.

Kong & Chaudhuri (AISTATS 2020, result 1; ``docs/theory/approx1d.md``): a 1-D ReLU planar layer
:math:`f(z) = z + u\,\mathrm{ReLU}(wz + b)` fixes its breakpoint :math:`c = -b/w`, is the identity on
one side and the affine map :math:`z \mapsto c + s(z - c)`, :math:`s = 1 + uw > 0`, on the other.
Mass on each side of ``c`` is preserved and a Gaussian piece stays a Gaussian piece whose
standardised position at ``c`` is unchanged. Stacking ``n`` such layers pushes ``N(μ0, σ0²)`` to a
*piecewise-Gaussian* density.

Construction (centre-out, one layer per piece, ``docs/theory/approx1d.md`` §2):

1. Centre ``x*``: a crossing of the source and target CDFs, ``Φ((x* − μ0)/σ0) = P(x*)``. If the
   CDFs never cross (e.g. ``Exp(1)`` against ``N(0, 1)``), one *alignment* layer with a breakpoint
   ``38σ0`` away from ``μ0`` (mass ``Φ(−38) ≈ 3e-316`` beyond it) moves the source median onto the
   target median, which is then a crossing.
2. Knots ``t_0 < … < t_K`` containing ``x*`` (``K = n − 2``, one less with alignment).
3. Standardised knot positions ``τ_j = Φ⁻¹(P(t_j))``, so the Gaussian on piece ``[t_j, t_{j+1}]`` is
   ``N(μ_j, σ_j²)`` with ``σ_j = (t_{j+1} − t_j)/(τ_{j+1} − τ_j)``, ``μ_j = t_j − σ_j τ_j``: every piece
   carries exactly its target mass. Right of ``x*`` the layer at ``t_j`` acts on ``{z > t_j}`` with
   slope ``σ_j/σ_{j−1}``; left of ``x*`` mirrored; then one tail layer on each side (slope by
   height matching, or minimising the tail's TV).

Knot rules (``docs/theory/approx1d.md`` §4): ``equispaced`` on ``[lo, hi]`` and ``optimal``. The
latter follows from the leading error term: on a piece of width ``Δ`` with equal masses,
``½∫|g − p| ≈ p |d| Δ² / 8`` where ``d = (log p)′ − (log g)′``. The Gaussian's log-slope is forced,
``(log g)′ = −τ p / φ(τ)`` with ``τ = Φ⁻¹(P(x))`` (level and slope are tied through ``σ``), so
``d(x) = p′/p + τ p/φ(τ)`` depends on ``p`` alone. Minimising ``Σ p|d|Δ²/8`` under ``ΣΔ`` fixed gives
knot density ``ρ ∝ √(p|d|)`` and ``TV ≈ (∫√(p|d|))² / (8K)``, versus ``(hi − lo)∫p|d| / (8K)`` for
equispaced knots; both are ``O(1/n)``, the optimal constant is never larger (Cauchy–Schwarz).

Evaluation: the composed map is piecewise linear; :class:`PiecewiseLinearMap` collapses any 1-D
flow of piecewise-linear planar layers to sorted breakpoints, slopes and offsets, so the density
and CDF of ``N`` points cost ``O(N log n)``. Exact TV: :func:`flowprobe.theory.tv.tv_quadrature`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import optimize, special

from flowprobe.distributions import DiagonalNormal, StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers.planar import DEFAULT_MIN_SLOPE, Planar
from flowprobe.theory.targets1d import SCALE_RANGE, Target1D, parse_target
from flowprobe.theory.tv import TVEstimate, tv_monte_carlo, tv_quadrature

if TYPE_CHECKING:  # matplotlib is imported by the figure functions only (start-up time)
    from matplotlib.figure import Figure

__all__ = [
    "Construction",
    "PiecewiseLinearMap",
    "collapsed_tv",
    "construct",
    "convergence_study",
    "knot_density",
    "loglog_slope",
    "plot_approximation",
    "plot_pieces",
    "two_layer_example",
]

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
ALIGNMENT_DISTANCE = 38.0  # in source standard deviations; Φ(−38) ≈ 3e-316
KNOT_RULES = ("optimal", "equispaced")
TAIL_RULES = ("tv", "height")
ROOT_TOLERANCES = {"xtol": 1e-300, "rtol": 1e-15, "maxiter": 4000}  # relative: targets of any scale in SCALE_RANGE
MIN_LAYER_SLOPE = 1e-15  # a slope s below this makes u = s − 1 round to −1 (wᵀu = −1: not invertible)


# --------------------------------------------------------------------------------------------
# Collapsed evaluator
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PiecewiseLinearMap:
    r"""An increasing piecewise-linear map ``x = offsets[j] + slopes[j]·z`` on segment ``j``, pushing
    ``N(loc, scale²)`` forward.

    Segment ``j`` is ``(z_knots[j−1], z_knots[j]]`` (unbounded at both ends); its image carries the
    Gaussian piece ``N(offsets[j] + slopes[j]·loc, (slopes[j]·scale)²)``. Every evaluation is one
    ``searchsorted`` plus ``O(1)`` work per point.

    Attributes:
        z_knots: Sorted source-space breakpoints, shape ``(m,)``.
        x_knots: Their images, shape ``(m,)``.
        slopes: Positive slopes, shape ``(m + 1,)``.
        offsets: Offsets, shape ``(m + 1,)``.
        loc: Source mean ``μ0``.
        scale: Source standard deviation ``σ0``.
    """

    z_knots: np.ndarray
    x_knots: np.ndarray
    slopes: np.ndarray
    offsets: np.ndarray
    loc: float = 0.0
    scale: float = 1.0

    @classmethod
    def from_flow(cls, flow: Flow) -> PiecewiseLinearMap:
        """Collapse a 1-D flow of piecewise-linear ``Planar`` layers over a normal source.

        Each layer ``y = x + u h(wx + b)`` with kink slopes ``(k₋, k₊)`` is affine on both sides of
        ``c = −b/w``; composing means inserting the source-space preimage of ``c`` as a breakpoint
        and updating the slopes/offsets of the segments on each side (``O(n)`` per layer).

        Raises:
            ValueError: not a 1-D flow, a source that is not normal, a layer that is not a
                piecewise-linear planar layer, or a non-increasing layer.
        """
        loc, scale = _normal_source(flow)
        z_knots, slopes, offsets = np.empty(0), np.ones(1), np.zeros(1)
        for i, layer in enumerate(flow.layers):
            if not (isinstance(layer.stack, Planar) and layer.act.piecewise_linear):
                raise ValueError(f"layer {i} is {layer!r}; only piecewise-linear Planar layers collapse")
            params = layer.constrained()
            u, w, b = (float(t.detach().reshape(-1)[0]) for t in (params.u, params.w, params.b))
            low, high = layer.act.kink_slopes  # type: ignore[misc]
            if w == 0.0:
                offsets = offsets + u * low * b if b <= 0 else offsets + u * high * b
                continue
            k_above, k_below = (high, low) if w > 0 else (low, high)
            a_above, a_below = 1 + u * w * k_above, 1 + u * w * k_below
            if min(a_above, a_below) <= 0:
                raise ValueError(f"layer {i} is not increasing (slopes {a_below:g}, {a_above:g})")
            c = -b / w
            x_knots = offsets[:-1] + slopes[:-1] * z_knots
            j = int(np.searchsorted(x_knots, c))
            z_c = (c - offsets[j]) / slopes[j]
            i_c = int(np.searchsorted(z_knots, z_c))
            if i_c == z_knots.size or z_knots[i_c] != z_c:
                z_knots = np.insert(z_knots, i_c, z_c)
                slopes, offsets = np.insert(slopes, i_c, slopes[i_c]), np.insert(offsets, i_c, offsets[i_c])
            below = np.arange(slopes.size) <= i_c
            offsets = np.where(below, a_below * offsets + u * k_below * b, a_above * offsets + u * k_above * b)
            slopes = np.where(below, a_below * slopes, a_above * slopes)
        x_knots = offsets[:-1] + slopes[:-1] * z_knots
        return cls(z_knots, x_knots, slopes, offsets, loc, scale)

    def forward(self, z: np.ndarray) -> np.ndarray:
        """``x = f(z)``."""
        z = np.asarray(z, dtype=float)
        j = np.searchsorted(self.z_knots, z)
        return self.offsets[j] + self.slopes[j] * z

    def _standardised(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=float)
        j = np.searchsorted(self.x_knots, x)
        return ((x - self.offsets[j]) / self.slopes[j] - self.loc) / self.scale, j

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """``z = f⁻¹(x)``."""
        tau, _ = self._standardised(x)
        return self.loc + self.scale * tau

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """``log (f#q)(x) = log q(f⁻¹(x)) − log f′``."""
        tau, j = self._standardised(x)
        return -0.5 * tau * tau - np.log(self.scale * self.slopes[j]) - LOG_SQRT_2PI

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """``Q(x) = Φ((f⁻¹(x) − μ0)/σ0)`` (``f`` is increasing)."""
        return special.ndtr(self._standardised(x)[0])

    def sf(self, x: np.ndarray) -> np.ndarray:
        """``1 − Q(x)``, accurate in the upper tail."""
        return special.ndtr(-self._standardised(x)[0])

    def mass(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``Q([a, b])``, through the CDF in the lower half and the survival function above."""
        upper = self.cdf(a) > 0.5
        return np.where(upper, self.sf(a) - self.sf(b), self.cdf(b) - self.cdf(a))

    @property
    def means(self) -> np.ndarray:
        """Mean of the Gaussian of each segment."""
        return self.offsets + self.slopes * self.loc

    @property
    def stds(self) -> np.ndarray:
        """Standard deviation of the Gaussian of each segment."""
        return self.slopes * self.scale


def _normal_source(flow: Flow) -> tuple[float, float]:
    if flow.dim != 1:
        raise ValueError(f"only 1-D flows collapse, got dim {flow.dim}")
    if isinstance(flow.base, StandardNormal):
        return 0.0, 1.0
    if isinstance(flow.base, DiagonalNormal):
        return float(flow.base.loc[0]), float(flow.base.log_scale[0].exp())
    raise ValueError(f"the source must be StandardNormal or DiagonalNormal, got {type(flow.base).__name__}")


# --------------------------------------------------------------------------------------------
# Knots
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnotDensity:
    """A knot density on a grid: ``G`` is its normalised cumulative integral at ``x``.

    Attributes:
        x: Increasing grid.
        G: Increasing, from 0 to 1.
        tail_cells: Fraction of a cell left beyond each outer knot (0 puts knots at ``x[0]``, ``x[-1]``).
        constant: ``(∫√(p|d|))² / 8`` for the optimal rule (``TV ≈ constant/K``), else ``nan``.
    """

    x: np.ndarray
    G: np.ndarray
    tail_cells: float
    constant: float = float("nan")

    def knots(self, centre: float, pieces: int) -> np.ndarray:
        """``pieces + 1`` knots with one at ``centre``, in equal ``G`` steps on each side."""
        g_c = float(np.interp(centre, self.x, self.G))
        a = self.tail_cells
        if a > 0:
            left = int(np.clip(round(g_c * (pieces + 2 * a) - a), 0, pieces))
        elif pieces < 2 or not 0 < g_c < 1:
            raise ValueError(f"the interval [{self.x[0]:g}, {self.x[-1]:g}] must contain the centre {centre:g} "
                             "and at least two pieces")
        else:
            left = int(np.clip(round(g_c * pieces), 1, pieces - 1))
        right = pieces - left
        g = np.concatenate([
            g_c - g_c / (left + a) * np.arange(left, 0, -1), [g_c],
            g_c + (1 - g_c) / (right + a) * np.arange(1, right + 1),
        ])
        t = np.interp(g, self.G, self.x)
        t[left] = centre
        if not (np.diff(t) > 0).all():
            raise ValueError(f"{pieces} pieces do not fit the grid of the target; use fewer layers")
        return t


def knot_density(target: Target1D, rule: str, interval: tuple[float, float] | None = None,
                 floor: float = 0.05, grid: int = 8001) -> KnotDensity:
    r"""The knot density of ``rule`` for ``target``.

    * ``equispaced``: uniform on ``interval`` (default: ``target.interval``, else the quantiles
      ``1e-3`` and ``1 − 1e-3``), outer knots at its ends.
    * ``optimal``: :math:`\rho \propto \sqrt{p|d|} + \epsilon\, p \int\sqrt{p|d|}`,
      ``d = (log p)′ + τ p/φ(τ)``, ``τ = Φ⁻¹(P(x))`` (module docstring); the ``ε = floor`` term keeps
      knots where ``d`` vanishes and stays integrable for heavy tails. Outer knots half a cell
      inside the line.

    Args:
        target: The target.
        rule: ``optimal`` or ``equispaced``.
        interval: ``(lo, hi)`` for ``equispaced``.
        floor: Relative weight ``ε`` of the density term of the optimal rule.
        grid: Grid size (quantile levels equispaced in logit from ``1e-15`` to ``1 − 1e-15``).
    """
    if rule not in KNOT_RULES:
        raise ValueError(f"unknown knot rule {rule!r}; expected one of {', '.join(KNOT_RULES)}")
    if rule == "equispaced":
        lo, hi = interval or target.interval or tuple(float(v) for v in target.ppf(np.array([1e-3, 1 - 1e-3])))
        if not lo < hi:
            raise ValueError(f"interval must satisfy lo < hi, got [{lo:g}, {hi:g}]")
        return KnotDensity(np.array([lo, hi]), np.array([0.0, 1.0]), 0.0)
    u = special.expit(np.linspace(-34.5, 34.5, grid))
    x, first = np.unique(target.ppf(u), return_index=True)
    u = u[first]
    keep = np.isfinite(x)
    x, u = x[keep], u[keep]
    if x.size < 3:
        raise ValueError(f"the quantiles of target {target.name!r} are not resolvable in float64 (they collapse to "
                         f"{x.size} value(s)); move or scale the target nearer to 0")
    log_p = target.log_pdf(x)
    tau = special.ndtri(u)
    with np.errstate(all="ignore"):
        d = np.gradient(log_p, x) + tau * np.exp(log_p + 0.5 * tau * tau + LOG_SQRT_2PI)
        p = np.exp(log_p)
    d = np.where(np.isfinite(d), np.abs(d), 0.0)
    root = float(np.trapezoid(np.sqrt(p * d), x))
    rho = np.sqrt(p * d) + floor * (root if root > 0 else 1.0) * p
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (rho[1:] + rho[:-1]) * np.diff(x))])
    if not cum[-1] > 0:
        raise ValueError(f"target {target.name!r} has zero mass on its quantile grid")
    return KnotDensity(x, cum / cum[-1], 0.5, root**2 / 8)


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------
def _standardised_positions(target: Target1D, t: np.ndarray) -> np.ndarray:
    """``Φ⁻¹(P(t))``, through the survival function in the upper half."""
    lower = target.cdf(t)
    return np.where(lower < 0.5, special.ndtri(lower), -special.ndtri(target.sf(t)))


def _cdf_crossing(target: Target1D, loc: float, scale: float) -> float | None:
    """The crossing of ``Φ((x − loc)/scale)`` and ``P`` nearest the target median, if any."""
    u = np.linspace(1e-6, 1 - 1e-6, 1001)
    x = np.unique(target.ppf(u))

    def gap(t: np.ndarray) -> np.ndarray:
        return special.ndtr((t - loc) / scale) - target.cdf(t)

    g = gap(x)
    exact = np.flatnonzero(g == 0)
    brackets = np.flatnonzero(np.sign(g[:-1]) * np.sign(g[1:]) < 0)
    if exact.size == 0 and brackets.size == 0:
        return None
    mid_u = target.cdf(np.concatenate([x[exact], 0.5 * (x[brackets] + x[brackets + 1])]))
    k = int(np.argmin(np.abs(mid_u - 0.5)))
    if k < exact.size:
        return float(x[exact[k]])
    i = brackets[k - exact.size]
    return float(optimize.brentq(lambda t: float(gap(np.array(t))), x[i], x[i + 1], **ROOT_TOLERANCES))


def _median(target: Target1D) -> float:
    x0 = float(target.ppf(np.array(0.5)))
    width = max(1.0, abs(x0)) * 1e-3
    lo, hi = x0 - width, x0 + width
    while target.cdf(np.array(lo)) > 0.5:
        lo -= 2 * (hi - lo)
    while target.cdf(np.array(hi)) < 0.5:
        hi += 2 * (hi - lo)
    return float(optimize.brentq(lambda t: float(target.cdf(np.array(t))) - 0.5, lo, hi, **ROOT_TOLERANCES))


def _tail_std(target: Target1D, knot: float, tau: float, side: int, rule: str, reference: float) -> float:
    """Standard deviation of the tail Gaussian beyond ``knot`` (``side`` +1 right, −1 left).

    ``height``: the tail starts at the target's height, ``φ(τ)/σ = p(knot)``. ``tv``: minimise
    ``½∫_tail |g − p|`` over ``log σ`` (the tail mass is fixed whatever ``σ``).
    """
    log_p_knot = float(target.log_pdf(np.array([knot]))[0])
    height = math.exp(-0.5 * tau * tau - LOG_SQRT_2PI - log_p_knot) if np.isfinite(log_p_knot) else reference
    if rule == "height":
        if not np.isfinite(log_p_knot):
            raise ValueError(f"height matching needs p > 0 at the outer knot {knot:g}; use the tv tail rule")
        return height

    def outside(x: np.ndarray) -> np.ndarray:
        return side * (np.asarray(x) - knot) < 0

    def tail_tv(log_sigma: float) -> float:
        sigma = math.exp(log_sigma)
        mu = knot - sigma * tau
        log_g = lambda x: np.where(outside(x), -np.inf, -0.5 * ((x - mu) / sigma) ** 2 - log_sigma - LOG_SQRT_2PI)  # noqa: E731
        log_p = lambda x: np.where(outside(x), -np.inf, target.log_pdf(x))  # noqa: E731
        return tv_quadrature(log_p, log_g, np.array([knot, knot + side * sigma]), tol=1e-12)

    centre = math.log(height)
    best = optimize.minimize_scalar(tail_tv, bounds=(centre - 6, centre + 6), method="bounded",
                                    options={"xatol": 1e-4})
    return math.exp(best.x) if best.fun <= tail_tv(centre) else height


@dataclass(frozen=True)
class Construction:
    """A constructed ReLU planar flow and its collapsed form.

    Attributes:
        target: The target ``p``.
        flow: ``n`` layers ``Planar(1, "relu")`` over the normal source, float64.
        map: The collapsed piecewise-linear map (:class:`PiecewiseLinearMap`).
        knots: The knots ``t_0 < … < t_K``.
        centre: The centre knot ``x*``.
        aligned: Whether the first layer is an alignment layer (CDFs did not cross).
        knot_constant: ``(∫√(p|d|))²/8`` of the optimal rule (``TV ≈ constant / K``), else ``nan``.
    """

    target: Target1D
    flow: Flow
    map: PiecewiseLinearMap
    knots: np.ndarray
    centre: float
    aligned: bool
    knot_constant: float = float("nan")
    _tv: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def layers(self) -> int:
        """Number of layers ``n``."""
        return len(self.flow.layers)

    def piece_table(self) -> dict[str, np.ndarray]:
        """One row per output piece: ``lo, hi, mean, std, slope`` (of the composed map),
        ``mass`` (push-forward) and ``target_mass``."""
        edges = np.concatenate([[-np.inf], self.map.x_knots, [np.inf]])
        lo, hi = edges[:-1], edges[1:]
        return {
            "lo": lo, "hi": hi, "mean": self.map.means, "std": self.map.stds, "slope": self.map.slopes,
            "mass": self.map.mass(lo, hi), "target_mass": self.target.mass(lo, hi),
        }

    def tv(self, tol: float = 1e-10) -> float:
        """Exact ``TV(f#q, p)`` by per-piece quadrature (cached)."""
        if tol not in self._tv:
            self._tv[tol] = collapsed_tv(self.map, self.target, tol)
        return self._tv[tol]

    def tv_monte_carlo(self, samples: int = 200_000, level: float = 0.99, seed: int = 0) -> TVEstimate:
        """Monte-Carlo ``TV = E_q[(1 − p/q)⁺]`` with its empirical-Bernstein interval, from ``samples`` draws
        of the flow (through the collapsed map, which the tests check against the layers)."""
        z = self.map.loc + self.map.scale * np.random.default_rng(seed).standard_normal(samples)
        x = self.map.forward(z)
        return tv_monte_carlo(self.map.log_prob(x), self.target.log_pdf(x), level)


def collapsed_tv(pwl: PiecewiseLinearMap, target: Target1D, tol: float = 1e-10) -> float:
    """Exact ``TV(f#q, p)`` of a collapsed flow (:class:`PiecewiseLinearMap`, e.g. of a trained 1-D
    ReLU planar flow) by per-piece quadrature, with breakpoints at its knots and the target's finite ends."""
    ends = np.array(target.support)
    breakpoints = np.concatenate([pwl.x_knots, ends[np.isfinite(ends)]])
    return tv_quadrature(target.log_pdf, pwl.log_prob, breakpoints, tol=tol)


def _relu_stack(plan: list[tuple[float, float, int]], min_slope: float) -> Planar:
    """A stack of ``Planar(1, relu)`` layers, layer ``i`` with breakpoint ``c`` and slope ``s`` on
    ``{side·(z − c) > 0}`` for ``(c, s, side) = plan[i]``: ``w = side``, ``b = −w c``, ``u = (s − 1)/w``."""
    stack = Planar(1, "relu", min_slope=min_slope, layers=len(plan)).double()
    for layer, (c, s, side) in zip(stack, plan, strict=True):
        layer.set_constrained(torch.tensor([(s - 1) / side], dtype=torch.float64),
                              torch.tensor([float(side)], dtype=torch.float64), -side * c)
    return stack


def construct(
    target: str | Target1D,
    layers: int,
    knots: str = "optimal",
    interval: tuple[float, float] | None = None,
    tail: str = "tv",
    source: tuple[float, float] = (0.0, 1.0),
) -> Construction:
    """Build ``layers`` ReLU planar layers pushing ``N(source)`` to a piecewise Gaussian close to ``p``.

    Args:
        target: A :class:`~flowprobe.theory.targets1d.Target1D` or a spec for ``parse_target``.
        layers: Number of layers ``n ≥ 4``.
        knots: ``optimal`` or ``equispaced`` (:func:`knot_density`).
        interval: ``(lo, hi)`` of the equispaced rule.
        tail: ``tv`` (minimise each tail's TV) or ``height`` (``docs/theory/approx1d.md`` §3).
        source: ``(μ0, σ0)`` of the normal source.

    Returns:
        A :class:`Construction`.

    Raises:
        ValueError: bad arguments, or a target the construction cannot match (zero mass between
            knots, a knot outside the support, a density that is NaN).
    """
    target = parse_target(target)
    if not isinstance(layers, int) or layers < 4:
        raise ValueError(f"layers must be an integer >= 4, got {layers!r}")
    if tail not in TAIL_RULES:
        raise ValueError(f"unknown tail rule {tail!r}; expected one of {', '.join(TAIL_RULES)}")
    loc, scale = (float(v) for v in source)
    low, high = SCALE_RANGE
    if not (low <= scale <= high and abs(loc) <= high and loc - ALIGNMENT_DISTANCE * scale != loc):
        raise ValueError(f"the source N(μ0, σ0²) needs |μ0| ≤ {high:g} and {low:g} ≤ σ0 ≤ {high:g} with σ0 resolvable "
                         f"next to μ0 in float64, got μ0 = {loc:g}, σ0 = {scale:g}")
    density = knot_density(target, knots, interval)
    centre = _cdf_crossing(target, loc, scale)
    aligned = centre is None
    if aligned:  # one layer moves the source median onto the target median
        centre = _median(target)
        side = 1 if centre >= loc else -1
        c_align = loc - side * ALIGNMENT_DISTANCE * scale
        s_align = (centre - c_align) / (loc - c_align)
        loc_src, scale_src = centre, s_align * scale
    else:
        loc_src, scale_src = loc, scale
    t = density.knots(centre, layers - 2 - int(aligned))
    tau = _standardised_positions(target, t)
    i_c = int(np.flatnonzero(t == centre)[0])
    tau[i_c] = (centre - loc_src) / scale_src
    _check_positions(t, tau)
    sigma = np.diff(t) / np.diff(tau)
    tail_right = _tail_std(target, t[-1], tau[-1], 1, tail, sigma[-1] if sigma.size > i_c else scale_src)
    tail_left = _tail_std(target, t[0], tau[0], -1, tail, sigma[0] if i_c > 0 else scale_src)
    right = np.concatenate([[scale_src], sigma[i_c:], [tail_right]])  # σ before/after each right layer
    left = np.concatenate([[scale_src], sigma[:i_c][::-1], [tail_left]])
    plan = [(c, s, 1) for c, s in zip(t[i_c:], right[1:] / right[:-1], strict=True)]
    plan += [(c, s, -1) for c, s in zip(t[: i_c + 1][::-1], left[1:] / left[:-1], strict=True)]
    if aligned:
        plan.insert(0, (c_align, s_align, side))
    smallest = min(s for _, s, _ in plan)
    if not smallest > MIN_LAYER_SLOPE:
        raise ValueError(f"a layer would need slope {smallest:.3g}, below float64 resolution (the target is far "
                         "narrower than the source); rescale the target or give a narrower --source-scale")
    min_slope = min(DEFAULT_MIN_SLOPE, 0.5 * smallest)
    base = StandardNormal(1) if (loc, scale) == (0.0, 1.0) else DiagonalNormal(torch.tensor([loc]),
                                                                                torch.tensor([scale]))
    flow = Flow(base.double(), [_relu_stack(plan, min_slope)])
    return Construction(target, flow, PiecewiseLinearMap.from_flow(flow), t, centre, aligned, density.constant)


def _check_positions(t: np.ndarray, tau: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(tau))
    if bad.size:
        raise ValueError(f"knot {t[bad[0]]:g} lies outside the support of the target (CDF is 0 or 1 there)")
    flat = np.flatnonzero(np.diff(tau) <= 0)
    if flat.size:
        a, b = t[flat[0]], t[flat[0] + 1]
        raise ValueError(f"the target has zero mass on [{a:g}, {b:g}]; a ReLU planar flow cannot match that piece")


# --------------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------------
def loglog_slope(layers: Sequence[int], tv: Sequence[float]) -> float:
    """Least-squares slope of ``log TV`` against ``log n``."""
    return float(np.polyfit(np.log(np.asarray(layers, dtype=float)), np.log(np.asarray(tv, dtype=float)), 1)[0])


def convergence_study(
    target: str | Target1D,
    grid: Sequence[int] = (4, 10, 25, 50, 100, 300, 1000),
    mc_samples: int = 0,
    seed: int = 0,
    **options: object,
) -> dict:
    """Exact (and optionally Monte-Carlo) TV of the construction for every depth in ``grid``.

    Args:
        target: Target or spec.
        grid: Depths ``n``.
        mc_samples: Monte-Carlo samples per depth (0: skip).
        seed: Seed of the Monte-Carlo estimates.
        **options: Passed to :func:`construct`.

    Returns:
        ``{"target", "results": [{"layers", "tv", ["tv_mc", "tv_mc_ci"]}], "slope"}``.
    """
    target = parse_target(target)
    results = []
    for n in grid:
        built = construct(target, int(n), **options)  # type: ignore[arg-type]
        row: dict = {"layers": int(n), "tv": built.tv()}
        if mc_samples:
            mc = built.tv_monte_carlo(mc_samples, seed=seed)
            row |= {"tv_mc": float(mc.estimate), "tv_mc_ci": [float(mc.low), float(mc.high)]}
        results.append(row)
    slope = loglog_slope([r["layers"] for r in results], [r["tv"] for r in results]) if len(results) > 1 else None
    return {"target": target.name, "results": results, "slope": slope}


# --------------------------------------------------------------------------------------------
# Figures (``docs/theory/approx1d.md`` §7, F1–F3)
# --------------------------------------------------------------------------------------------
def two_layer_example() -> Flow:
    """The blog's split-and-scale example (F1): ``N(0, 1)`` through ``(w, b, u) = (1, 1, −0.2)``
    (breakpoint −1, slope 0.8) then ``(1, −1, 0.875)`` (breakpoint 1, slope 1.875). Pieces:
    ``(−∞, −1]: N(0, 1)``, ``[−1, 1]: N(−0.2, 0.8²)``, ``[1, ∞): N(−1.25, 1.5²)``."""
    stack = Planar(1, "relu", layers=2).double()
    for layer, (w, b, u) in zip(stack, ((1.0, 1.0, -0.2), (1.0, -1.0, 0.875)), strict=True):
        layer.set_constrained(torch.tensor([u], dtype=torch.float64), torch.tensor([w], dtype=torch.float64), b)
    return Flow(StandardNormal(1).double(), [stack])


def plot_pieces(flow: Flow, lo: float = -3.0, hi: float = 3.0, title: str | None = None) -> Figure:
    """The push-forward density of a collapsible 1-D flow, each Gaussian piece continued dashed
    beyond its piece (the blog's figure F1)."""
    import matplotlib.pyplot as plt

    pwl = PiecewiseLinearMap.from_flow(flow)
    x = np.linspace(lo, hi, 1201)
    edges = np.concatenate([[-np.inf], pwl.x_knots, [np.inf]])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        mean, std = pwl.means[k], pwl.stds[k]
        g = np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        inside = (x >= a) & (x <= b)
        (line,) = ax.plot(x[inside], g[inside], lw=2, label=f"N({mean:.3g}, {std:.3g}²) on [{a:.3g}, {b:.3g}]")
        ax.plot(x, g, ls="--", lw=0.8, color=line.get_color())
    for c in pwl.x_knots:
        ax.axvline(c, color="grey", lw=0.5)
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_xlim(lo, hi)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{len(flow.layers)} ReLU planar layers: a piecewise-Gaussian push-forward of N(0, 1)")
    fig.tight_layout()
    return fig


def plot_approximation(built: Construction, lo: float = -4.0, hi: float = 4.0) -> Figure:
    """``p``, the blog's ``q_pwc`` (value ``p(t_j)`` on ``[t_j, t_{j+1})``, ``t = linspace(lo, hi, n − 1)``)
    and the constructed ``q_pwg`` (figures F2/F3)."""
    import matplotlib.pyplot as plt

    n = built.layers
    x = np.linspace(lo, hi, 2001)
    t = np.linspace(lo, hi, n - 1)
    j = np.clip(np.searchsorted(t, x, side="right") - 1, 0, t.size - 2)
    pwc = np.where((x >= lo) & (x < hi), np.exp(built.target.log_pdf(t))[j], 0.0)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(x, np.exp(built.target.log_pdf(x)), lw=2.5, color="black", label="p (target)")
    ax.plot(x, pwc, lw=1, color="tab:orange", label="$q_{pwc}$ (piecewise constant)")
    ax.plot(x, np.exp(built.map.log_prob(x)), lw=1, color="tab:blue", label="$q_{pwg}$ (ReLU planar flow)")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(f"{built.target.name}: {n} ReLU planar layers, TV(q_pwg, p) = {built.tv():.3g}")
    fig.tight_layout()
    return fig
