r"""Minimum depth :math:`T_\varepsilon(p, q, F)`: proven lower bounds, the two constructions, brackets.

Kong & Chaudhuri (AISTATS 2020, result 4) show that planar flows with bounded parameters and
Householder flows need a depth that grows with the dimension to come within TV ``ε`` of some
targets. For a family ``F`` of layers, a source ``q``, a target ``p`` and ``ε > 0``,

.. math:: T_\varepsilon(p, q, F) = \min\{n : \exists f_1, \dots, f_n \in F,\
          \mathrm{TV}((f_n \circ \cdots \circ f_1)_\# q, p) \le \varepsilon\}.

A *TV floor* is a number that every flow of ``n`` layers of ``F`` stays above; it is non-increasing
in ``n``, so ``T_ε`` is at least the smallest ``n`` whose floor is ``≤ ε`` (:meth:`DepthTheory.lower_bound`).
The math is in ``docs/theory/depth.md``:

* :func:`reflection_tv_floor` (§2): Householder layers fix a subspace of dimension ``d − n`` after
  ``n`` reflections; for Gaussians with one mean, Courant–Fischer on the variance ratios gives the floor.
* :func:`displacement_tv_floor` (§3): layers that move every point by at most ``Δ`` (planar with
  ``‖û‖ ≤ U`` and ``|h| ≤ H``, ``Δ = U H``); for Gaussians with one covariance a half-space test gives
  ``2Φ((‖μ_p − μ_q‖ − nΔ)/2s) − 1``.
* :func:`householder_construction` and :func:`shift_construction` (§4): the pairs on which these
  bounds are ``d/2`` exactly and ``Ω(d^κ)``.
* :func:`bracket` (§5): the smallest depth at which a trained flow provably reached ``ε`` (an upper
  bound on ``T_ε``) next to the proven lower bound. A depth where training did not reach ``ε`` is
  **not** a lower bound: the optimiser may have failed.

Training and measuring live in :mod:`flowprobe.theory.depth_experiments`, figures in
:mod:`flowprobe.theory.depth_figures`.

References:
    Z. Kong, K. Chaudhuri. The Expressive Power of a Class of Normalizing Flow Models.
    AISTATS 2020. https://arxiv.org/abs/2006.00392
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy import special
from torch import Tensor

from flowprobe.layers import FlowLayer, Householder
from flowprobe.theory.topology import gaussian_neuron_bound
from flowprobe.theory.tv import normal_tv

__all__ = [
    "HOUSEHOLDER_GAP",
    "Bracket",
    "DepthOutcome",
    "DepthTheory",
    "GaussianForm",
    "bracket",
    "depth_theory",
    "displacement_tv_floor",
    "householder_construction",
    "reflection_tv_floor",
    "shift_construction",
]

HOUSEHOLDER_GAP = normal_tv(0.0, math.sqrt(2.0), 0.0, 1.0)
"""``TV(N(0, 2), N(0, 1)) = 0.166064…``: the floor of the Householder construction below ``d/2`` layers."""


@dataclass(frozen=True)
class GaussianForm:
    """A normal density ``N(mean, cov)``, as far as the bounds need to know it.

    Attributes:
        mean: ``(d,)``.
        cov: ``(d, d)``, symmetric positive definite.
    """

    mean: Tensor
    cov: Tensor

    @property
    def dim(self) -> int:
        """The dimension ``d``."""
        return self.mean.shape[-1]


# -- floors -------------------------------------------------------------------------------------


def reflection_tv_floor(cov_source: Tensor, cov_target: Tensor, reflections: int) -> float:
    r"""A floor on ``TV(O#q, p)`` for every product ``O`` of ``n`` reflections (``docs/theory/depth.md`` §2).

    ``q = N(μ, Σ_q)``, ``p = N(μ, Σ_p)`` (one mean). ``O`` is the identity on a subspace ``V`` of
    dimension ``≥ d − n``; along ``v ∈ V`` the variances stay ``vᵀΣ_q v`` against ``vᵀΣ_p v``. With the
    ratios ``r_1 ≥ … ≥ r_d`` of ``Σ_q v = r Σ_p v``, Courant–Fischer gives ``max_V r ≥ r_{n+1}`` and
    ``min_V r ≤ r_{d−n}``, so with ``g(r) = TV(N(0, r), N(0, 1))``

    .. math:: \mathrm{TV}(O_\# q, p) \ge \max\big(g(r_{n+1})\,[r_{n+1} > 1],\ g(r_{d-n})\,[r_{d-n} < 1]\big)

    for ``n < d``, and nothing for ``n ≥ d``.

    Raises:
        ValueError: the covariances are not symmetric positive definite ``(d, d)`` matrices of one size,
            or ``reflections`` is negative.
    """
    if isinstance(reflections, bool) or not isinstance(reflections, int) or reflections < 0:
        raise ValueError(f"reflections must be a non-negative integer, got {reflections!r}")
    # λ of Σ_p v = λ Σ_q v, ascending; the ratios r of Σ_q v = r Σ_p v are 1/λ, descending.
    ratios = [1.0 / lam for lam in gaussian_neuron_bound(cov_source, cov_target).variance_ratios]
    dim, n = len(ratios), reflections
    if n >= dim:
        return 0.0
    top, bottom = ratios[n], ratios[dim - n - 1]  # r_{n+1}, r_{d−n}
    floors = [0.0]
    floors += [normal_tv(0.0, math.sqrt(top), 0.0, 1.0)] if top > 1 else []
    floors += [normal_tv(0.0, math.sqrt(bottom), 0.0, 1.0)] if bottom < 1 else []
    return max(floors)


def displacement_tv_floor(distance: float, scale: float, reach: float) -> float:
    r"""A floor on ``TV(f#q, p)`` when ``f`` moves every point by at most ``reach`` (``docs/theory/depth.md`` §3).

    ``q = N(μ_q, Σ)``, ``p = N(μ_p, Σ)``; ``distance = ‖μ_p − μ_q‖``, ``scale = s = √(eᵀΣe)`` along
    ``e = (μ_p − μ_q)/‖μ_p − μ_q‖``. Since ``eᵀf(z) ≤ eᵀz + reach``, the half-space ``{eᵀx > a}`` at the
    midpoint ``a`` separates the two by

    .. math:: \mathrm{TV}(f_\# q, p) \ge 2\Phi\Big(\frac{\mathrm{distance} - \mathrm{reach}}{2s}\Big) - 1

    when ``distance > reach`` (else nothing).

    Raises:
        ValueError: a negative or non-finite ``distance`` / ``reach``, or a non-positive ``scale``.
    """
    if not (math.isfinite(distance) and distance >= 0 and reach >= 0 and math.isfinite(reach)):
        raise ValueError(f"distance and reach must be finite and non-negative, got {distance!r} and {reach!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    gap = distance - reach
    return normal_tv(0.0, scale, gap, scale) if gap > 0 else 0.0


# -- the theory of a family on a pair -----------------------------------------------------------


@dataclass(frozen=True)
class DepthTheory:
    """A proven floor on TV for every flow of ``n`` layers of a family, on one pair.

    Attributes:
        kind: ``"reflections"`` (§2) or ``"displacement"`` (§3).
        floor: ``n ↦`` the floor, non-increasing in ``n``.
        horizon: A depth from which the floor is 0 (the search for the lower bound stops there).
        statement: The theorem for this family and pair, in words.
        continuous: ``ε ↦`` the bound as a real number before rounding up, where it has a closed form.
    """

    kind: str
    floor: Callable[[int], float] = field(repr=False)
    horizon: int
    statement: str
    continuous: Callable[[float], float] | None = field(default=None, repr=False)

    def lower_bound(self, eps: float) -> int:
        """The smallest depth ``n`` with ``floor(n) ≤ ε``: every shallower flow has TV above ``ε``, so
        ``T_ε ≥ n`` (bisection over ``[0, horizon]``; the floor is non-increasing).

        Raises:
            ValueError: ``ε`` outside ``(0, 1)``.
        """
        _check_eps(eps)
        lo, hi = 0, self.horizon  # floor(hi) = 0 ≤ ε
        while lo < hi:
            mid = (lo + hi) // 2
            if self.floor(mid) <= eps:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def real_bound(self, eps: float) -> float:
        """The lower bound as a real number (the theoretical line of a figure): the closed form where there
        is one, else :meth:`lower_bound`."""
        return self.continuous(eps) if self.continuous is not None else float(self.lower_bound(eps))


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, float | int) and 0 < eps < 1):
        raise ValueError(f"ε must lie in (0, 1), got {eps!r}")


def depth_theory(layer: FlowLayer, source: GaussianForm | None, target: GaussianForm | None) -> DepthTheory | None:
    """The floor that applies to flows made of layers like ``layer`` on the pair ``(source, target)``, if any.

    * Householder layers (``k`` reflections each), Gaussians with one mean: :func:`reflection_tv_floor`
      with ``n k`` reflections.
    * Layers with a finite ``displacement`` (planar with ``u_max`` and a bounded activation), Gaussians
      with one covariance: :func:`displacement_tv_floor` with reach ``n Δ``.

    Means and covariances must be *equal* (not close): the theorems do not cover near misses.

    Returns:
        The theory, or ``None`` when neither theorem applies (no proven lower bound).
    """
    if source is None or target is None or source.dim != target.dim:
        return None
    cov_q, cov_p = source.cov.double().cpu(), target.cov.double().cpu()
    mean_q, mean_p = source.mean.double().cpu(), target.mean.double().cpu()
    dim = source.dim
    if isinstance(layer, Householder) and torch.equal(mean_q, mean_p):
        k = layer.reflections
        ratios = [1.0 / lam for lam in gaussian_neuron_bound(cov_q, cov_p).variance_ratios]
        per = "n" if k == 1 else f"{k}n"
        statement = (f"Householder, {k} reflection(s) per layer, Gaussians with one mean: after n layers a "
                     f"subspace of dimension ≥ {dim} − {per} is fixed; variance ratios "
                     f"{min(ratios):.4g}..{max(ratios):.4g} give TV ≥ g(r_({per}+1)) (docs/theory/depth.md §2)")

        def floor(n: int) -> float:
            return reflection_tv_floor(cov_q, cov_p, n * k)

        return DepthTheory("reflections", floor, math.ceil(dim / k), statement)
    delta = getattr(layer, "displacement", math.inf)
    if math.isfinite(delta) and delta > 0 and torch.equal(cov_q, cov_p):
        gaussian_neuron_bound(cov_q, cov_p)  # checks the covariance
        shift = mean_p - mean_q
        distance = float(shift.norm())
        scale = float((shift @ cov_q @ shift).sqrt() / distance) if distance > 0 else 1.0
        statement = (f"every layer moves every point by at most Δ = {delta:.4g}; Gaussians with one covariance, "
                     f"‖μ_p − μ_q‖ = {distance:.4g}, s = {scale:.4g}: TV ≥ 2Φ((‖μ_p − μ_q‖ − nΔ)/2s) − 1 "
                     "(docs/theory/depth.md §3)")

        def continuous(eps: float) -> float:
            _check_eps(eps)
            return max(0.0, (distance - 2 * scale * float(special.ndtri((1 + eps) / 2))) / delta)

        return DepthTheory("displacement", lambda n: displacement_tv_floor(distance, scale, n * delta),
                           math.ceil(distance / delta), statement, continuous)
    return None


# -- constructions ------------------------------------------------------------------------------


def householder_construction(dim: int, dtype: torch.dtype = torch.float64) -> tuple[GaussianForm, GaussianForm]:
    """``q = N(0, Λ)``, ``p = N(0, Λ′)`` with ``Λ = diag(2, …, 2, 1, …, 1)`` (``d/2`` twos) and ``Λ′`` its mirror.

    ``d/2`` reflections with ``v_i = e_i − e_{i+d/2}`` swap the halves, so ``T_0 ≤ d/2``; below ``d/2``
    the floor is :data:`HOUSEHOLDER_GAP`, so ``T_ε = d/2`` exactly for ``ε < 0.166064``
    (``docs/theory/depth.md`` §4).

    Raises:
        ValueError: ``dim`` is not a positive even integer.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"the Householder construction needs an even dimension d >= 2, got {dim!r}")
    half = dim // 2
    variances = torch.tensor([2.0] * half + [1.0] * half, dtype=dtype)
    zero = torch.zeros(dim, dtype=dtype)
    return GaussianForm(zero, torch.diag(variances)), GaussianForm(zero.clone(), torch.diag(variances.flip(0)))


def shift_construction(
    dim: int, distance: float, dtype: torch.dtype = torch.float64
) -> tuple[GaussianForm, GaussianForm]:
    """``q = N(0, I_d)``, ``p = N(R e₁, I_d)`` with ``R = distance``; with ``R = d^κ`` bounded planar
    flows need ``(R − 2Φ⁻¹((1+ε)/2))/Δ = Ω(d^κ)`` layers (``docs/theory/depth.md`` §4).

    Raises:
        ValueError: ``dim`` is not a positive integer or ``distance`` is negative or not finite.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not (math.isfinite(distance) and distance >= 0):
        raise ValueError(f"the shift R must be finite and non-negative, got {distance!r}")
    mean = torch.zeros(dim, dtype=dtype)
    mean[0] = distance
    eye = torch.eye(dim, dtype=dtype)
    return GaussianForm(torch.zeros(dim, dtype=dtype), eye), GaussianForm(mean, eye.clone())


# -- brackets -----------------------------------------------------------------------------------

STATUSES = ("reached", "above", "inconclusive", "failed")


@dataclass(frozen=True)
class DepthOutcome:
    """What training at one depth showed.

    Attributes:
        depth: The number of layers.
        status: ``reached`` (some flow's TV interval lies at or below ``ε``: its upper end ``≤ ε``),
            ``above`` (every trained flow's interval lies above ``ε``), ``inconclusive`` (neither), or
            ``failed`` (no flow trained: the run failed or every member diverged).
        best_high: The smallest upper end of a TV interval at this depth (``None`` if none).
        note: Why the depth failed, if it did.
    """

    depth: int
    status: str
    best_high: float | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class Bracket:
    """``lower ≤ T_ε ≤ upper``: a proven lower bound and a measured upper bound.

    Attributes:
        lower: The proven lower bound (``None``: no theorem applies to this family and pair).
        upper: The smallest depth that reached ``ε`` (``None``: none of the depths tried did).
        outcomes: Every depth tried, in increasing order.
        contradiction: ``upper < lower``: a TV interval missed its true value (or a bug); the upper bound
            is then not to be trusted.
        unreached_above: Depths above ``upper`` where training did not reach ``ε`` although a shallower
            flow did (deeper flows can express shallower ones): the optimiser failed there.
    """

    lower: int | None
    upper: int | None
    outcomes: tuple[DepthOutcome, ...]
    contradiction: bool
    unreached_above: tuple[int, ...]

    @property
    def closed(self) -> bool:
        """Whether the bracket pins ``T_ε`` down: ``lower == upper``."""
        return self.lower is not None and self.lower == self.upper

    def text(self) -> str:
        """The bracket as ``[lower, upper]`` (``?`` for an unknown end; ``>n`` when no depth reached ε)."""
        low = "?" if self.lower is None else str(self.lower)
        tried = [o.depth for o in self.outcomes]
        high = str(self.upper) if self.upper is not None else (f">{max(tried)}" if tried else "?")
        return f"[{low}, {high}]"

    def statement(self, eps: float) -> str:
        """The bracket in words, including what it does not show."""
        parts = []
        if self.lower is not None:
            parts.append(f"T_ε ≥ {self.lower} (proven: every flow of fewer layers has TV > ε = {eps:g})")
        else:
            parts.append("no lower bound is proven for this family and pair")
        if self.upper is not None:
            parts.append(f"T_ε ≤ {self.upper} (measured: a trained flow of {self.upper} layers has TV ≤ ε, "
                         "by its confidence interval)")
        else:
            parts.append("no depth tried reached ε (no upper bound)")
        if self.closed:
            parts.append(f"the bracket is closed: T_ε = {self.lower}")
        if self.contradiction:
            parts.append("CONTRADICTION: a depth below the proven bound reached ε (an interval missed its "
                         "true value, or a bug) — do not trust the upper bound")
        if self.unreached_above:
            parts.append(f"training did not reach ε at depth(s) {', '.join(map(str, self.unreached_above))} above "
                         "the upper bound (optimisation failure)")
        parts.append("depths where training did not reach ε are not lower bounds")
        return "; ".join(parts)

    def to_dict(self, eps: float) -> dict[str, Any]:
        """JSON-ready fields and the statement."""
        return {"lower": self.lower, "upper": self.upper, "closed": self.closed, "text": self.text(),
                "contradiction": self.contradiction, "unreached_above": list(self.unreached_above),
                "outcomes": [o.__dict__ for o in self.outcomes], "statement": self.statement(eps)}


def bracket(outcomes: Sequence[DepthOutcome], lower: int | None) -> Bracket:
    """The bracket of ``T_ε`` from the outcomes at the depths tried and the proven lower bound.

    The upper bound is the smallest depth whose status is ``reached``; every other status is reported,
    never turned into a lower bound.

    Raises:
        ValueError: a depth appears twice.
    """
    ordered = tuple(sorted(outcomes, key=lambda o: o.depth))
    depths = [o.depth for o in ordered]
    if len(set(depths)) != len(depths):
        raise ValueError(f"each depth may appear once, got {depths}")
    reached = [o.depth for o in ordered if o.status == "reached"]
    upper = min(reached) if reached else None
    contradiction = upper is not None and lower is not None and upper < lower
    unreached = tuple(o.depth for o in ordered if upper is not None and o.depth > upper and o.status != "reached")
    return Bracket(lower, upper, ordered, contradiction, unreached)
