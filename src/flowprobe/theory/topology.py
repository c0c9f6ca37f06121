r"""Topology matching (Kong & Chaudhuri, AISTATS 2020, results 2 and 3): can a flow map ``q`` to ``p``
exactly, and if not, why not.

Every Planar / Sylvester / GeneralSylvester layer has the residual form
``f_t(y) = y + A_t h(B_tᵀy + b_t)`` with ``m_t`` neurons; ``M = Σ_t m_t`` is the flow's neuron count.
For a flow ``f = f_T ∘ ⋯ ∘ f_1`` and densities ``q`` (source), ``p`` (target) let

.. math:: L(z) = \log p(f(z)) - \log q(z).

*Smooth h (theory.md §2.2).* If ``f#q = p`` then ``L = −log|det J_f|`` and
``∇L(z) ∈ U = span(B_1, …, B_T)`` for every ``z`` — the raw columns of the ``B_t`` in the common
coordinates of ``R^d``, no pull-back needed: ``J_sᵀ v = v + B_s diag(h') A_sᵀ v`` only adds vectors of
``span(B_s)``. Hence ``dim span{∇L(z)} ≤ dim U ≤ M``. :func:`gradient_set` measures the numerical
rank and the part of the gradients outside ``U``.

*Gaussians.* For ``e, e' ⊥ U``: ``J_f e = e`` and ``f(z + te') = f(z) + te'``, so ``f#q = p`` forces
``eᵀ(Σ_q⁻¹ − Σ_p⁻¹)e' = 0``: the quadratic form of ``Δ = Σ_q⁻¹ − Σ_p⁻¹`` vanishes on ``U^⊥``, which
needs ``M ≥ max(n₊(Δ), n₋(Δ))`` (:func:`gaussian_neuron_bound`). For ``q = N(0, I)``,
``p = N(0, σ²I)`` and ``M < d`` even *approximation* is limited (:func:`isotropic_floor`).

*ReLU h (theory.md §2.3).* ``f`` is piecewise linear; off the kinks ``f(z) = Cz + c`` near ``z`` with
``C = Π_t (I + A_t diag(1[B_tᵀy_{t−1} + b_t > 0]) B_tᵀ)`` and, if ``f#q = p``,
``Cᵀ∇log p(f(z)) = ∇log q(z)``; modes of ``q`` map to modes of ``p`` with
``p(f(z*)) = q(z*)/|det C|``. For real-analytic ``q, p`` (Gaussian mixtures) the identity
``p(Cz + c)|det C| = q(z)`` on one open region extends to all of ``R^d``: ``p`` must be an affine image
of ``q`` (our derivation), so e.g. a Gaussian cannot be mapped exactly onto a product of bimodal
marginals, nor an equal-weight 4-mixture onto an unequal-weight one.

Training uses :func:`flowprobe.fit` (reverse KL through :func:`target_energy`, forward KL on a fixed
target sample); the Monte-Carlo estimator :func:`monte_carlo_divergences` is a small stand-in meant to
be swapped for ``flowprobe.theory.tv``.

References:
    Z. Kong, K. Chaudhuri. The Expressive Power of a Class of Normalizing Flow Models.
    AISTATS 2020. https://arxiv.org/abs/2006.00392
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.stats import chi2
from torch import Tensor

from flowprobe.activations import Activation
from flowprobe.distributions import Density, DiagonalNormal, Energy, FunctionEnergy, GaussianMixture, StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers import FlowLayer, LayerView, Planar, Sylvester
from flowprobe.layers.base import layer_slice
from flowprobe.plots import plt
from flowprobe.train import fit

__all__ = [
    "FORBIDDEN_PAIRS",
    "Estimate",
    "GaussianNeuronBound",
    "GradientSet",
    "ImpossibilityRun",
    "LogDensity",
    "ModeImage",
    "ResidualForm",
    "SplitRun",
    "bimodal_product",
    "find_modes",
    "forbidden_pair",
    "four_peak_mixture",
    "gaussian_neuron_bound",
    "gradient_set",
    "isotropic_floor",
    "isotropic_kl",
    "isotropic_split_experiment",
    "isotropic_tv",
    "local_linear_map",
    "log_ratio",
    "log_ratio_gradient",
    "mode_images",
    "modes_figure",
    "monte_carlo_divergences",
    "neuron_count",
    "neuron_subspace",
    "numerical_rank",
    "off_kink_points",
    "pointwise_residual",
    "relu_demo_flow",
    "relu_impossibility",
    "residual_form",
    "ridge_figure",
    "ridge_rows",
    "sylvester_stack",
    "target_energy",
]


class LogDensity(Protocol):
    """Anything with ``log_prob(x: (N, d)) -> (N,)``: a :class:`~flowprobe.Density`, a :class:`Flow`, …"""

    def log_prob(self, x: Tensor) -> Tensor: ...


# -- residual form and neuron count --------------------------------------------------------------


class ResidualForm(NamedTuple):
    """A layer written as ``y + A h(Bᵀy + b)``: ``a`` and ``b_matrix`` are ``(d, m)``, ``bias`` is ``(m,)``."""

    a: Tensor
    b_matrix: Tensor
    bias: Tensor
    act: Activation


def residual_form(layer: FlowLayer | LayerView) -> ResidualForm:
    """The ``(A, B, b, h)`` of one layer (a view ``flow.layers[i]`` or a one-layer stack) at its
    current parameters, as its family states it (:meth:`FlowLayer.residual_form`).

    Raises:
        ValueError: the family has no such form (``Radial``, ``Householder``), or the layer is an
            ensemble or a stack of several layers.
    """
    stack = layer.stack if isinstance(layer, LayerView) else layer
    if stack.ensemble_shape or (isinstance(layer, FlowLayer) and layer.depth != 1):
        raise ValueError("residual forms are read one layer at a time (flow.layers[i]), not of ensembles")
    form = stack.residual_form(layer_slice(layer.constrained(), 0))
    if form is None:
        raise ValueError(
            f"{type(stack).__name__} layers are not of the form z + A h(Bᵀz + b); the neuron count M and "
            "span(B) are defined only for families with that form (planar, Sylvester, general Sylvester)"
        )
    return ResidualForm(*form, stack.activation)


def neuron_count(layers: Sequence[FlowLayer]) -> int:
    """``M = Σ_t m_t``, the total number of neurons of a stack of residual-form layers."""
    return sum(residual_form(layer).b_matrix.shape[-1] for layer in layers)


def numerical_rank(matrix: Tensor) -> tuple[int, Tensor, float]:
    """Numerical rank of an ``(N, d)`` matrix: singular values ``σ_i > max(N, d)·eps·σ_max``.

    Returns:
        ``(rank, singular values (descending), threshold)``.
    """
    values = torch.linalg.svdvals(matrix)
    threshold = max(matrix.shape) * torch.finfo(matrix.dtype).eps * float(values[0]) if values.numel() else 0.0
    return int((values > threshold).sum()), values, threshold


def neuron_subspace(layers: Sequence[FlowLayer]) -> Tensor:
    """An orthonormal basis ``(d, k)`` of ``U = span(B_1, …, B_T)`` (``k ≤ M``)."""
    stacked = torch.cat([residual_form(layer).b_matrix for layer in layers], dim=-1).detach()
    rank, _, _ = numerical_rank(stacked)
    return torch.linalg.svd(stacked, full_matrices=False).U[:, :rank]


# -- L and its gradient set ----------------------------------------------------------------------


def log_ratio(flow: Flow, z: Tensor, target: LogDensity | None = None, source: LogDensity | None = None) -> Tensor:
    """``L(z) = log p(f(z)) − log q(z)``, shape ``(N,)``.

    Args:
        flow: The map ``f`` (its forward direction).
        z: Source points ``(N, d)``.
        target: ``p``; default the flow itself, i.e. the exact pair ``p = f#q`` (``L = −log|det J_f|``).
        source: ``q``; default ``flow.base``.
    """
    source = flow.base if source is None else source
    target = flow if target is None else target
    x, _ = flow(z)
    return target.log_prob(x) - source.log_prob(z)


def log_ratio_gradient(
    flow: Flow, z: Tensor, target: LogDensity | None = None, source: LogDensity | None = None
) -> Tensor:
    """``∇_z L(z)`` by autograd, shape ``(N, d)`` (arguments as in :func:`log_ratio`)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_ratio(flow, z, target, source).sum(), z)
    return grad


@dataclass(frozen=True)
class GradientSet:
    """The gradient-set diagnostic of theory.md §2.2.

    Attributes:
        rank: Numerical rank of ``{∇L(z_i)}``.
        singular_values: All singular values of the ``(N, d)`` gradient matrix, descending.
        threshold: Rank threshold ``max(N, d)·eps·σ_max``.
        neurons: The flow's neuron count ``M``.
        subspace_dim: ``dim span(B_1..B_T)``.
        outside_residual: ``max_i ‖(I − P_U) ∇L(z_i)‖``.
        relative_outside_residual: The same divided by ``max_i ‖∇L(z_i)‖``.
        points: Number of points ``N``.
    """

    rank: int
    singular_values: list[float]
    threshold: float
    neurons: int
    subspace_dim: int
    outside_residual: float
    relative_outside_residual: float
    points: int

    @property
    def consistent(self) -> bool:
        """Whether the necessary condition ``rank ≤ M`` of an exact transport holds."""
        return self.rank <= self.neurons

    def to_dict(self) -> dict:
        return {**asdict(self), "consistent": self.consistent}


def gradient_set(
    flow: Flow, z: Tensor, target: LogDensity | None = None, source: LogDensity | None = None
) -> GradientSet:
    """Rank of ``{∇L(z_i)}`` next to ``M`` and ``span(B_1..B_T)``.

    If ``f#q = p`` (the default ``target``) and ``h`` is smooth, ``rank ≤ M`` and the outside residual
    is round-off; a rank above ``M`` (or a large residual) proves ``f#q ≠ p``.

    Raises:
        ValueError: a layer is not of the residual form (``M`` is undefined).
    """
    grads = log_ratio_gradient(flow, z, target, source).detach()
    basis = neuron_subspace(flow.layers).to(grads)
    outside = (grads - (grads @ basis) @ basis.T).norm(dim=-1).max()
    rank, values, threshold = numerical_rank(grads)
    scale = float(grads.norm(dim=-1).max())
    return GradientSet(
        rank=rank,
        singular_values=values.tolist(),
        threshold=threshold,
        neurons=neuron_count(flow.layers),
        subspace_dim=basis.shape[1],
        outside_residual=float(outside),
        relative_outside_residual=float(outside) / scale if scale > 0 else 0.0,
        points=z.shape[0],
    )


# -- Gaussian pairs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianNeuronBound:
    """Minimum admissible neuron count for ``N(μ_q, Σ_q) → N(μ_p, Σ_p)`` (theory.md §2.2(b)).

    Attributes:
        positive: ``n₊``, positive eigenvalues of ``Δ = Σ_q⁻¹ − Σ_p⁻¹``.
        negative: ``n₋``, negative eigenvalues.
        min_neurons: ``max(n₊, n₋)``.
        eigenvalues: Eigenvalues of ``Δ``, ascending.
        statement: What the bound rules out, in words.
    """

    positive: int
    negative: int
    min_neurons: int
    eigenvalues: list[float]
    statement: str


def gaussian_neuron_bound(cov_q: Tensor, cov_p: Tensor) -> GaussianNeuronBound:
    """``max(n₊, n₋)`` of ``Σ_q⁻¹ − Σ_p⁻¹``: no residual-form flow with fewer neurons maps q to p exactly.

    Eigenvalues count as zero below ``d·eps·max(‖Σ_q⁻¹‖, ‖Σ_p⁻¹‖)``.

    Raises:
        ValueError: the covariances are not symmetric positive definite ``(d, d)`` matrices of one size.
    """
    cov_q, cov_p = torch.as_tensor(cov_q), torch.as_tensor(cov_p)
    dim = cov_q.shape[-1] if cov_q.dim() == 2 else 0
    for name, cov in (("cov_q", cov_q), ("cov_p", cov_p)):
        if not dim or cov.shape != (dim, dim) or not torch.allclose(cov, cov.T) or torch.linalg.cholesky_ex(cov).info:
            size = f"({dim}, {dim})" if dim else "(d, d)"
            raise ValueError(f"{name} must be a symmetric positive definite {size} matrix")
    prec_q, prec_p = torch.linalg.inv(cov_q), torch.linalg.inv(cov_p.to(cov_q))
    eig = torch.linalg.eigvalsh(prec_q - prec_p)
    scale = max(float(torch.linalg.eigvalsh(prec_q).max()), float(torch.linalg.eigvalsh(prec_p).max()))
    tol = dim * torch.finfo(eig.dtype).eps * scale
    positive, negative = int((eig > tol).sum()), int((eig < -tol).sum())
    bound = max(positive, negative)
    statement = (
        f"Σ_q⁻¹ − Σ_p⁻¹ has {positive} positive and {negative} negative eigenvalues: no stack of "
        f"planar/Sylvester layers z + A h(Bᵀz + b), for any smooth h, with fewer than {bound} neurons in "
        f"total maps q exactly onto p (the quadratic form would have to vanish on span(B)^⊥, of dimension "
        f"≥ {dim} − M)."
        if bound
        else "Σ_q = Σ_p: this covariance test rules out no neuron count."
    )
    return GaussianNeuronBound(positive, negative, bound, eig.tolist(), statement)


def isotropic_tv(dim: int, variance: float) -> float:
    """``TV(N(0, I_n), N(0, v I_n))`` in closed form (``n = dim``, ``v = variance``).

    The densities cross at ``‖x‖² = r² = n v ln v / (v − 1)``, so with ``F_n`` the χ²_n CDF and
    ``v ≥ 1`` (else swap the roles by scale invariance) ``TV = F_n(r²) − F_n(r²/v)``.
    """
    if dim == 0 or variance == 1:
        return 0.0
    v = max(variance, 1 / variance)
    r2 = dim * v * math.log(v) / (v - 1)
    return float(chi2.cdf(r2, dim) - chi2.cdf(r2 / v, dim))


def isotropic_kl(dim: int, variance: float) -> float:
    """``KL(N(0, I_n) ‖ N(0, v I_n)) = n/2 · (1/v − 1 + ln v)``."""
    return 0.5 * dim * (1 / variance - 1 + math.log(variance))


def isotropic_floor(dim: int, neurons: int, scale: float) -> tuple[float, float]:
    r"""Lower bounds on ``TV`` and reverse ``KL`` between ``f#N(0, I_d)`` and ``N(0, σ²I_d)`` for any
    residual-form flow ``f`` with ``M`` neurons (any activation).

    Derivation: write ``z = (z_U, z_⊥)`` for ``U = span(B_1..B_T)``, ``n = d − dim U ≥ d − M``.
    ``f(z) − z`` depends on ``z`` only through ``z_U``, so ``x_U`` is a bijective function of ``z_U``
    and, given ``x_U``, ``x_⊥ = z_⊥ + c(x_U) ~ N(c, I_n)`` (``z_⊥`` is independent of ``z_U``). Under
    ``p``, ``x_⊥ | x_U ~ N(0, σ²I_n)``. Per ``x_U``, ``min_{t ≥ 0, c} ‖tN(c, I) − N(0, σ²I)‖₁`` is
    attained at ``c = 0`` (the level sets are concentric balls) and is convex in ``t``; Jensen over
    ``x_U ~ p`` gives ``TV ≥ TV(N(0, I_n), N(0, σ²I_n))``. The chain rule of KL gives
    ``KL(f#q ‖ p) ≥ KL(N(0, I_n) ‖ N(0, σ²I_n))``. Both are attained by the linear flow that scales
    ``U`` by ``σ`` and leaves ``U^⊥`` alone, so they are the exact infima.

    Returns:
        ``(tv_floor, kl_floor)`` with ``n = d − min(M, d)``.
    """
    n = dim - min(neurons, dim)
    return isotropic_tv(n, scale**2), isotropic_kl(n, scale**2)


# -- Monte-Carlo estimates and training (stand-ins for flowprobe.theory.tv and flowprobe.fit) ------


class Estimate(NamedTuple):
    """A Monte-Carlo mean with the half-width of its 95% normal confidence interval."""

    value: float
    half_width: float


def _mean_ci(samples: Tensor) -> Estimate:
    return Estimate(float(samples.mean()), 1.96 * float(samples.std()) / math.sqrt(samples.numel()))


@torch.no_grad()
def monte_carlo_divergences(model: Flow, target: LogDensity, samples: int, batch: int = 65536) -> dict[str, Estimate]:
    """``TV(model, p)`` and ``KL(model ‖ p)`` from samples of the model (forward direction only).

    ``TV = E_{x∼model}[(1 − p(x)/model(x))₊]`` (bounded integrand, unbiased) and
    ``KL = E_{x∼model}[log model(x) − log p(x)]``, each with a 95% CI.
    """
    tv_terms, kl_terms = [], []
    for start in range(0, samples, batch):
        x, log_model = model.rsample_and_log_prob(min(batch, samples - start))
        log_ratio_values = target.log_prob(x) - log_model
        tv_terms.append((1 - log_ratio_values.exp()).clamp_min(0))
        kl_terms.append(-log_ratio_values)
    return {"tv": _mean_ci(torch.cat(tv_terms)), "kl": _mean_ci(torch.cat(kl_terms))}


def target_energy(target: LogDensity, dim: int) -> Energy:
    """``U = −log p`` as an :class:`~flowprobe.distributions.Energy`, so that ``fit(flow, energy=U)``
    minimises the reverse KL ``KL(f#q ‖ p)`` (exact, since ``p`` is normalised)."""
    return FunctionEnergy(lambda x: -target.log_prob(x), dim, getattr(target, "name", "target"))


def sylvester_stack(dim: int, neurons: int, layers: int = 1, activation: str = "identity") -> list[Sylvester]:
    """``layers`` orthogonal Sylvester layers with ``neurons`` in total (split evenly, ``≤ dim`` each).

    The number of layers is raised to ``⌈M/d⌉`` and capped at ``M`` where needed.
    """
    count = min(max(layers, math.ceil(neurons / dim)), neurons)
    sizes = [neurons // count + (i < neurons % count) for i in range(count)]
    return [Sylvester(dim, hidden=m, kind="orthogonal", activation=activation) for m in sizes]


@dataclass(frozen=True)
class SplitRun:
    """One trained flow of the isotropic Gaussian experiment."""

    neurons: int
    layers: int
    seed: int
    activation: str
    kl: Estimate
    tv: Estimate
    kl_floor: float
    tv_floor: float

    @property
    def above_floor(self) -> bool:
        """Whether the TV estimate is not significantly below the derived floor."""
        return self.tv.value + self.tv.half_width >= self.tv_floor


def isotropic_split_experiment(
    dim: int,
    scale: float,
    neurons: Sequence[int],
    seeds: Sequence[int],
    steps: int = 1500,
    layers: int = 1,
    activation: str = "identity",
    lr: float = 2e-2,
    batch: int = 512,
    samples: int = 200_000,
) -> list[SplitRun]:
    """Train Sylvester flows ``N(0, I_d) → N(0, σ²I_d)`` for each ``M`` and seed (float64) with
    :func:`flowprobe.fit` on the reverse KL (cosine schedule, no clipping).

    The minimum admissible ``M`` is ``d``; below it the reached TV / KL cannot beat
    :func:`isotropic_floor`, at and above it they can approach 0.
    """
    runs = []
    for m in neurons:
        for seed in seeds:
            torch.manual_seed(seed)
            stack = sylvester_stack(dim, m, layers, activation)
            flow = Flow(StandardNormal(dim), stack).double()
            zeros = torch.zeros(dim, dtype=torch.float64)
            target = DiagonalNormal(zeros, torch.full_like(zeros, scale))
            fit(flow, energy=target_energy(target, dim), steps=steps, lr=lr, batch_size=batch, clip=None,
                log_every=steps, seed=seed, anneal=0)  # unimodal target: no temperature warm-up
            est = monte_carlo_divergences(flow, target, samples)
            tv_floor, kl_floor = isotropic_floor(dim, m, scale)
            runs.append(SplitRun(m, len(stack), seed, activation, est["kl"], est["tv"], kl_floor, tv_floor))
    return runs


# -- ReLU flows: local linear maps, pointwise residual, modes --------------------------------------


def _layer_jacobian(form: ResidualForm, y: Tensor) -> Tensor:
    """``I + A diag(h'(Bᵀy + b)) Bᵀ`` at every point, ``(N, d, d)``."""
    slopes = form.act.derivative(y @ form.b_matrix + form.bias)  # (N, m)
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    return eye + (form.a * slopes.unsqueeze(-2)) @ form.b_matrix.T


def local_linear_map(flow: Flow, z: Tensor) -> tuple[Tensor, Tensor]:
    """The Jacobian ``C = J_T ⋯ J_1`` of ``f`` at ``z`` from the layers' formulas, and the kink margin.

    For ReLU layers ``C`` is the exact local linear map (``h' = 1[pre > 0]``, the active pattern).
    The margin is ``min_{t,i} |(B_tᵀy_{t−1} + b_t)_i| / ‖B_t e_i‖``, the smallest distance of an
    intermediate point to a kink hyperplane of its layer (0: on a kink).

    Returns:
        ``(C (N, d, d), margin (N,))``.

    Raises:
        ValueError: a layer is not of the residual form.
    """
    y = z.detach()
    c = torch.eye(flow.dim, dtype=z.dtype, device=z.device).expand(z.shape[0], -1, -1)
    margin = torch.full_like(y[:, 0], math.inf)
    with torch.no_grad():
        for layer in flow.layers:
            form = residual_form(layer)
            distance = (y @ form.b_matrix + form.bias).abs() / form.b_matrix.norm(dim=0)
            margin = torch.minimum(margin, distance.min(dim=-1).values)
            c = _layer_jacobian(form, y) @ c
            y, _ = layer(y)
    return c, margin


def _grad_log(density: LogDensity, x: Tensor) -> Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(density.log_prob(x).sum(), x)
    return grad


def pointwise_residual(
    flow: Flow, z: Tensor, target: LogDensity | None = None, source: LogDensity | None = None
) -> Tensor:
    """``‖Cᵀ∇log p(f(z)) − ∇log q(z)‖`` per point, ``(N,)`` (``C`` from :func:`local_linear_map`).

    Zero off the kinks when ``f#q = p`` and ``h`` is ReLU (theory.md §2.3); defaults as in
    :func:`log_ratio`.
    """
    source = flow.base if source is None else source
    target = flow if target is None else target
    c, _ = local_linear_map(flow, z)
    with torch.no_grad():
        x, _ = flow(z)
    pulled = (c.transpose(-1, -2) @ _grad_log(target, x).unsqueeze(-1)).squeeze(-1)
    return (pulled - _grad_log(source, z)).norm(dim=-1)


def _gradient_and_hessian(density: LogDensity, x: Tensor) -> tuple[Tensor, Tensor]:
    """``∇ log density`` and ``∇² log density`` at each point, ``(N, d)`` and ``(N, d, d)``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(density.log_prob(x).sum(), x, create_graph=True)
        rows = [torch.autograd.grad(grad[:, i].sum(), x, retain_graph=True)[0] for i in range(x.shape[1])]
    return grad.detach(), torch.stack(rows, dim=1).detach()


def find_modes(density: LogDensity, starts: Tensor, iterations: int = 200, tol: float = 1e-12) -> Tensor:
    """Local maxima of ``log density`` by ascent from ``starts`` (e.g. the means of a mixture).

    Each step is a Newton step where the Hessian is negative definite and a gradient step otherwise;
    duplicates (points closer than ``1e-6``) are merged.

    Returns:
        The modes, ``(K, d)``.
    """
    z = starts.detach().clone()
    for _ in range(iterations):
        grad, hess = _gradient_and_hessian(density, z)
        if float(grad.norm(dim=-1).max()) < tol:
            break
        concave = torch.linalg.eigvalsh(hess).max(dim=-1).values < 0
        eye = torch.eye(z.shape[1], dtype=hess.dtype, device=hess.device)
        newton = -torch.linalg.solve(torch.where(concave[:, None, None], hess, -eye), grad)
        z = z + torch.where(concave[:, None], newton, 0.1 * grad)
    keep = [i for i in range(z.shape[0]) if all((z[i] - z[j]).norm() > 1e-6 for j in range(i))]
    return z[keep]


@dataclass(frozen=True)
class ModeImage:
    """A mode ``z*`` of ``q`` and its image ``f(z*)`` checked as a mode of ``p``.

    Attributes:
        mode: ``z*``.
        image: ``f(z*)``.
        source_gradient_norm: ``‖∇log q(z*)‖``.
        image_gradient_norm: ``‖∇log p(f(z*))‖``.
        image_hessian_max_eigenvalue: Largest eigenvalue of ``∇²log p`` at ``f(z*)`` (< 0: a mode).
        log_p_image: ``log p(f(z*))``.
        predicted_log_p_image: ``log q(z*) − log|det C|``.
        kink_margin: Distance of ``z*`` to the nearest kink (see :func:`local_linear_map`).
    """

    mode: list[float]
    image: list[float]
    source_gradient_norm: float
    image_gradient_norm: float
    image_hessian_max_eigenvalue: float
    log_p_image: float
    predicted_log_p_image: float
    kink_margin: float

    @property
    def is_mode(self) -> bool:
        """``‖∇log p(f(z*))‖ < 1e-6`` and ``∇²log p(f(z*))`` negative definite."""
        return self.image_gradient_norm < 1e-6 and self.image_hessian_max_eigenvalue < 0


def mode_images(
    flow: Flow, modes: Tensor, target: LogDensity | None = None, source: LogDensity | None = None
) -> list[ModeImage]:
    """Map modes of ``q`` through ``f`` and test them as modes of ``p`` with ``p(f(z*)) = q(z*)/|det C|``."""
    source = flow.base if source is None else source
    target = flow if target is None else target
    c, margin = local_linear_map(flow, modes)
    with torch.no_grad():
        images, _ = flow(modes)
        log_p = target.log_prob(images)
        predicted = source.log_prob(modes) - torch.linalg.slogdet(c).logabsdet
    grad_p, hess_p = _gradient_and_hessian(target, images)
    grad_q = _grad_log(source, modes)
    top = torch.linalg.eigvalsh(hess_p).max(dim=-1).values
    return [
        ModeImage(
            modes[i].tolist(),
            images[i].tolist(),
            float(grad_q[i].norm()),
            float(grad_p[i].norm()),
            float(top[i]),
            float(log_p[i]),
            float(predicted[i]),
            float(margin[i]),
        )
        for i in range(modes.shape[0])
    ]


# -- built-in pairs and the ReLU impossibility experiment -----------------------------------------


def four_peak_mixture(dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """Equal-weight mixture of ``N(±1.2 e_i, 0.25 I)`` on ``R²`` (theory.md §2.3(c))."""
    means = torch.tensor([[1.2, 0.0], [-1.2, 0.0], [0.0, 1.2], [0.0, -1.2]], dtype=dtype)
    return GaussianMixture(means, torch.full((4,), 0.25, dtype=dtype)).to(dtype)  # .to: also the sampling anchor


def bimodal_product(weight: float = 0.5, dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """``(w N(−1, 0.2) + (1−w) N(1, 0.2)) ⊗ (½ N(−1, 0.2) + ½ N(1, 0.2))``, a product density on ``R²``."""
    means = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=dtype)
    weights = torch.tensor([weight / 2, weight / 2, (1 - weight) / 2, (1 - weight) / 2], dtype=dtype)
    return GaussianMixture(means, torch.full((4,), 0.2, dtype=dtype), weights).to(dtype)


def relu_demo_flow(seed: int, layers: int = 3, source: Density | None = None) -> Flow:
    """Random VdB ReLU Sylvester layers (``M = d = 2`` each) on ``source`` (default the 4-peak mixture)."""
    torch.manual_seed(seed)
    source = four_peak_mixture() if source is None else source
    flow = Flow(source, [Sylvester(source.dim, activation="relu") for _ in range(layers)]).to(source.anchor.dtype)
    with torch.no_grad():
        for layer in flow.layers:
            layer.b.normal_(0, 0.5)
            layer.d1.normal_()
            layer.d2.normal_()
    return flow


FORBIDDEN_PAIRS = {
    "product": "N(0, I) → product of two bimodal marginals (a Gaussian's affine images are Gaussian)",
    "mixture": "equal-weight 4-peak mixture → product with unequal weights 0.35/0.35/0.15/0.15 "
    "(affine images keep the weights)",
}


def forbidden_pair(name: str) -> tuple[Density, Density]:
    """``(q, p)`` on ``R²`` that no ReLU Sylvester flow maps exactly (see :data:`FORBIDDEN_PAIRS`)."""
    if name == "product":
        return StandardNormal(2).double(), bimodal_product()
    if name == "mixture":
        return four_peak_mixture(), bimodal_product(0.7)
    raise ValueError(f"unknown pair {name!r}; expected one of: {', '.join(FORBIDDEN_PAIRS)}")


def off_kink_points(flow: Flow, count: int, margin: float = 1e-6) -> Tensor:
    """``count`` samples of the flow's source at distance ``> margin`` from every kink."""
    z = flow.base.sample(2 * count)
    _, distance = local_linear_map(flow, z)
    z = z[distance > margin]
    if z.shape[0] < count:
        raise ValueError(f"only {z.shape[0]} of {2 * count} points lie off the kinks (margin {margin:g})")
    return z[:count]


@dataclass(frozen=True)
class ImpossibilityRun:
    """A ReLU Sylvester flow trained on a forbidden pair.

    Attributes:
        pair: Name in :data:`FORBIDDEN_PAIRS`.
        layers: Number of layers.
        seed: Seed.
        steps: Training steps done at each checkpoint.
        tv: MC estimate of ``TV(f#q, p)`` at each checkpoint.
        residual_median: Median of ``‖Cᵀ∇log p(f(z)) − ∇log q(z)‖`` over off-kink points of ``q``.
        residual_p90: Its 90th percentile.
        exact_residual_max: The same residual for ``p := f#q`` (control, round-off).
    """

    pair: str
    layers: int
    seed: int
    steps: list[int]
    tv: list[Estimate]
    residual_median: float
    residual_p90: float
    exact_residual_max: float


def relu_impossibility(
    pair: str,
    layers: int,
    seed: int,
    steps: int = 2000,
    checkpoints: int = 4,
    lr: float = 1e-2,
    batch: int = 512,
    points: int = 1000,
    samples: int = 100_000,
    train_samples: int = 100_000,
) -> ImpossibilityRun:
    """Fit a ReLU Sylvester flow to a forbidden pair and report what training cannot remove.

    Training is :func:`flowprobe.fit` by maximum likelihood (forward KL) on ``train_samples`` fixed
    draws of ``p``, in ``checkpoints`` consecutive runs (each a fresh Adam with its own cosine decay,
    i.e. warm restarts; chunk ``k`` uses seed ``checkpoints·seed + k``; no clipping, no validation
    split), with ``TV(f#q, p)`` estimated after each. The restarts matter: on ``mixture`` (4 layers,
    1500 steps) one cosine run stalls near TV 0.50 where three restarted chunks reach 0.24.
    """
    source, target = forbidden_pair(pair)
    flow = relu_demo_flow(seed, layers, source)
    data = target.sample(train_samples)
    done, tvs = [], []
    for k in range(checkpoints):
        chunk = steps * (k + 1) // checkpoints - steps * k // checkpoints
        if chunk:  # fewer steps than checkpoints: some chunks are empty
            fit(flow, data=data, steps=chunk, lr=lr, batch_size=batch, clip=None, val_fraction=0.0, log_every=chunk,
                seed=checkpoints * seed + k)
        done.append(steps * (k + 1) // checkpoints)
        tvs.append(monte_carlo_divergences(flow, target, samples)["tv"])
    z = off_kink_points(flow, points)
    residual = pointwise_residual(flow, z, target=target)
    return ImpossibilityRun(
        pair,
        layers,
        seed,
        done,
        tvs,
        float(residual.median()),
        float(residual.quantile(0.9)),
        float(pointwise_residual(flow, z).max()),
    )


# -- figures ---------------------------------------------------------------------------------------


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
