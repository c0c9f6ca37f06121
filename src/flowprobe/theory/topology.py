r"""Topology matching (Kong & Chaudhuri, AISTATS 2020, results 2 and 3): the math of whether a flow can
map ``q`` to ``p`` exactly, and why not. Derivations: ``docs/theory/topology.md``.

Planar, Sylvester and GeneralSylvester layers have the residual form ``f_t(y) = y + A_t h(B_tᵀy + b_t)``
with ``m_t`` neurons; ``M = Σ_t m_t`` is the flow's neuron count (:func:`residual_form`,
:func:`neuron_count`). For ``f = f_T ∘ ⋯ ∘ f_1``, a source ``q`` and a target ``p`` let

.. math:: L(z) = \log p(f(z)) - \log q(z).

* *Smooth h* (§2): if ``f#q = p`` then ``∇L(z) ∈ span(B_1, …, B_T)`` for every ``z``
  (:func:`gradient_set`).
* *Gaussian pairs* (§3): exact transport needs ``M ≥ max(n₊, n₋)`` of ``Σ_q⁻¹ − Σ_p⁻¹``
  (:func:`gaussian_neuron_bound`); for ``q = N(0, I)``, ``p = N(0, σ²I)`` and ``M < d`` the TV and KL
  are bounded below (:func:`isotropic_floor`).
* *ReLU h* (§4): off the kinks ``f(z) = Cz + c`` and ``Cᵀ∇log p(f(z)) = ∇log q(z)``; modes of ``q``
  map to modes of ``p`` with ``p(f(z*)) = q(z*)/|det C|`` (:func:`local_linear_map`,
  :func:`pointwise_residual`, :func:`mode_images`).

Training experiments on these results: :mod:`flowprobe.theory.topology_experiments`; figures:
:mod:`flowprobe.theory.topology_figures`.

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
from torch import Tensor

from flowprobe.activations import Activation
from flowprobe.flow import Flow
from flowprobe.layers import FlowLayer, LayerView
from flowprobe.layers.base import fused_kernels, layer_slice
from flowprobe.theory.tv import isotropic_normal_tv

__all__ = [
    "GaussianNeuronBound",
    "GradientSet",
    "LogDensity",
    "ModeImage",
    "ResidualForm",
    "find_modes",
    "gaussian_neuron_bound",
    "gradient_set",
    "isotropic_floor",
    "isotropic_kl",
    "local_linear_map",
    "log_ratio",
    "log_ratio_gradient",
    "mode_images",
    "neuron_count",
    "neuron_subspace",
    "numerical_rank",
    "off_kink_points",
    "pointwise_residual",
    "residual_form",
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
    """The gradient-set diagnostic (``docs/theory/topology.md`` §2).

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
    """Minimum admissible neuron count for ``N(μ_q, Σ_q) → N(μ_p, Σ_p)`` (``docs/theory/topology.md`` §3).

    Attributes:
        positive: ``n₊``, positive eigenvalues of ``Δ = Σ_q⁻¹ − Σ_p⁻¹`` (ratios ``λ > 1``).
        negative: ``n₋``, negative eigenvalues of ``Δ`` (ratios ``λ < 1``).
        min_neurons: ``max(n₊, n₋)``.
        variance_ratios: The generalised eigenvalues ``λ`` of ``Σ_p v = λ Σ_q v``, ascending.
        tolerance: ``|λ − 1| ≤ tolerance`` counts as ``λ = 1`` (round-off).
        statement: What the bound rules out, in words.
    """

    positive: int
    negative: int
    min_neurons: int
    variance_ratios: list[float]
    tolerance: float
    statement: str


def _check_covariance(cov: Tensor, name: str, dim: int) -> None:
    if not dim or cov.shape != (dim, dim) or not torch.allclose(cov, cov.mT) or torch.linalg.cholesky_ex(cov).info:
        size = f"({dim}, {dim})" if dim else "(d, d)"
        raise ValueError(f"{name} must be a symmetric positive definite {size} matrix")


def gaussian_neuron_bound(cov_q: Tensor, cov_p: Tensor) -> GaussianNeuronBound:
    r"""``max(n₊, n₋)`` of ``Δ = Σ_q⁻¹ − Σ_p⁻¹``: no residual-form flow with fewer neurons maps q to p exactly.

    The inertia of ``Δ`` comes from the generalised eigenvalues ``λ`` of ``(Σ_p, Σ_q)``: with
    ``Σ_q = LLᵀ`` and ``S = L⁻¹Σ_pL⁻ᵀ`` (eigenvalues ``λ``), ``LᵀΔL = I − S⁻¹``, so by Sylvester's law
    of inertia ``n₊ = #{λ > 1}`` and ``n₋ = #{λ < 1}`` (``docs/theory/topology.md`` §3). ``λ`` counts
    as 1 within

    .. math:: \tau = 8d\,\varepsilon\,\big((\|\Sigma_p\| + \|\Sigma_q\|)\,\|\Sigma_q^{-1}\| + \|S\|\big),

    the first-order change of ``λ`` under relative perturbations ``ε`` of the inputs, the Cholesky
    factor and the triangular solves, plus the eigensolver's ``ε‖S‖`` (spectral norms). Inverting
    ``Σ_q`` and ``Σ_p`` separately instead loses ``cond(Σ)·ε`` in ``Δ``, and its round-off
    eigenvalues were counted as neurons once ``Σ_q`` was ill-conditioned.

    Raises:
        ValueError: the covariances are not symmetric positive definite ``(d, d)`` matrices of one size.
    """
    cov_q = torch.as_tensor(cov_q)
    cov_p = torch.as_tensor(cov_p).to(cov_q)
    dim = cov_q.shape[-1] if cov_q.dim() == 2 else 0
    _check_covariance(cov_q, "cov_q", dim)
    _check_covariance(cov_p, "cov_p", dim)
    chol = torch.linalg.cholesky(cov_q)
    half = torch.linalg.solve_triangular(chol, cov_p, upper=False)  # L⁻¹Σ_p
    whitened = torch.linalg.solve_triangular(chol, half.mT, upper=False)  # L⁻¹Σ_pL⁻ᵀ
    ratios = torch.linalg.eigvalsh(0.5 * (whitened + whitened.mT))
    spectrum_q = torch.linalg.eigvalsh(cov_q)
    scale = (torch.linalg.eigvalsh(cov_p)[-1] + spectrum_q[-1]) / spectrum_q[0] + ratios[-1]
    tol = float(8 * dim * torch.finfo(cov_q.dtype).eps * scale)
    positive, negative = int((ratios > 1 + tol).sum()), int((ratios < 1 - tol).sum())
    bound = max(positive, negative)
    statement = (
        f"Σ_q⁻¹ − Σ_p⁻¹ has {positive} positive and {negative} negative eigenvalues: no stack of "
        f"planar/Sylvester layers z + A h(Bᵀz + b), for any smooth h, with fewer than {bound} neurons in "
        f"total maps q exactly onto p (the quadratic form would have to vanish on span(B)^⊥, of dimension "
        f"≥ {dim} − M)."
        if bound
        else "Σ_q = Σ_p (to round-off): this covariance test rules out no neuron count."
    )
    return GaussianNeuronBound(positive, negative, bound, ratios.tolist(), tol, statement)


def isotropic_kl(dim: int, variance: float) -> float:
    """``KL(N(0, I_n) ‖ N(0, v I_n)) = n/2 · (1/v − 1 + ln v)``."""
    return 0.5 * dim * (1 / variance - 1 + math.log(variance))


def isotropic_floor(dim: int, neurons: int, scale: float) -> tuple[float, float]:
    r"""Lower bounds on ``TV`` and reverse ``KL`` between ``f#N(0, I_d)`` and ``N(0, σ²I_d)`` for any
    residual-form flow ``f`` with ``M`` neurons (any activation; ``docs/theory/topology.md`` §3).

    With ``n = d − min(M, d)`` coordinates outside ``span(B)``, ``TV ≥ TV(N(0, I_n), N(0, σ²I_n))``
    and ``KL ≥ KL(N(0, I_n) ‖ N(0, σ²I_n))``; the linear flow that scales ``span(B)`` by ``σ``
    attains both, so they are the exact infima.

    Returns:
        ``(tv_floor, kl_floor)``.
    """
    n = dim - min(neurons, dim)
    return isotropic_normal_tv(n, scale**2), isotropic_kl(n, scale**2)


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

    Zero off the kinks when ``f#q = p`` and ``h`` is ReLU (``docs/theory/topology.md`` §4); defaults as in
    :func:`log_ratio`.
    """
    source = flow.base if source is None else source
    target = flow if target is None else target
    c, _ = local_linear_map(flow, z)
    with torch.no_grad():
        x, _ = flow(z)
    pulled = (c.transpose(-1, -2) @ _grad_log(target, x).unsqueeze(-1)).squeeze(-1)
    return (pulled - _grad_log(source, z)).norm(dim=-1)


def off_kink_points(flow: Flow, count: int, margin: float = 1e-6) -> Tensor:
    """``count`` samples of the flow's source at distance ``> margin`` from every kink."""
    z = flow.base.sample(2 * count)
    _, distance = local_linear_map(flow, z)
    z = z[distance > margin]
    if z.shape[0] < count:
        raise ValueError(f"only {z.shape[0]} of {2 * count} points lie off the kinks (margin {margin:g})")
    return z[:count]


def _gradient_and_hessian(density: LogDensity, x: Tensor) -> tuple[Tensor, Tensor]:
    """``∇ log density`` and ``∇² log density`` at each point, ``(N, d)`` and ``(N, d, d)``.

    Twice differentiated, so a flow's layers run layer by layer (the fused run kernels' backwards are
    once-differentiable: :func:`~flowprobe.layers.base.fused_kernels`).
    """
    with torch.enable_grad(), fused_kernels(False):
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
