"""Householder layers (Tomczak & Welling, 2016) and the reflection helpers Sylvester bases use."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from flowprobe.layers import native
from flowprobe.layers.base import FlowLayer, Invertibility, fused_kernels_allowed, inner, uses_fused_kernels
from flowprobe.layers.registry import Option, register

__all__ = ["Householder", "householder_matrix", "reflect", "reflect_all"]


def reflect(z: Tensor, v: Tensor) -> Tensor:
    """``(I − 2vvᵀ/‖v‖²) z`` for points ``z`` (..., d) and ``v`` (..., d); ``v = 0`` is the identity."""
    return _reflect_unit(z, _unit_vectors(v))


def _unit_vectors(v: Tensor) -> Tensor:
    """``v/‖v‖`` along the last dimension (``v = 0`` stays 0). ``v`` is rescaled by its largest entry
    first, so that ``‖v‖²`` neither underflows (``v ~ 1e-155`` would otherwise give a matrix that is no
    reflection) nor overflows."""
    return _normalised(v)[0]


def _normalised(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_unit_vectors`' ``u = (v/s) r`` with its factors: the scale ``s`` (the largest entry, 1 for
    ``v = 0``) and ``r = 1/‖v/s‖``, each ``(..., 1)``; then ``∂u/∂v = r (I − u uᵀ)/s`` (autograd's gradient of
    :func:`_unit_vectors`, to rounding, ``v = 0`` included)."""
    scale = v.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    w = v / scale
    inverse_norm = torch.rsqrt(inner(w, w).clamp_min(torch.finfo(v.dtype).tiny)).unsqueeze(-1)
    return w * inverse_norm, scale, inverse_norm


def _reflect_unit(z: Tensor, u: Tensor) -> Tensor:
    """``z − 2 (zᵀu) u`` for a unit vector ``u``."""
    return torch.addcmul(z, inner(z, u).unsqueeze(-1), u, value=-2)


def householder_matrix(vectors: Tensor, dim: int, columns: int) -> Tensor:
    """First ``columns`` columns of ``H_1 H_2 ⋯ H_T`` for reflection vectors ``(..., T, dim)``."""
    eye = torch.eye(dim, columns, dtype=vectors.dtype, device=vectors.device)
    q = eye.expand(*vectors.shape[:-2], dim, columns).transpose(-1, -2)  # rows: the columns of the product
    for u in reversed(_unit_vectors(vectors).unbind(-2)):
        q = _reflect_unit(q, u.unsqueeze(-2))
    return q.transpose(-1, -2)


def _in_order(v: Tensor) -> Tensor:
    """A run's reflection vectors ``(K, ..., T, d)`` as one sequence ``(..., K·T, d)`` in the order applied."""
    return v.movedim(0, -3).flatten(-3, -2)


def _run_matrix(v: Tensor) -> Tensor:
    """The ``d × d`` matrix ``A`` with ``x = z A`` for a run with reflection vectors ``(K, *B, T, d)``: a
    shared run (no ``B``), or one matrix per ensemble member (``B = (E,)``), ``(*B, d, d)``."""
    k, d = v.shape[0], v.shape[-1]
    rows = torch.eye(d, dtype=v.dtype, device=v.device).expand(*v.shape[:-2], d, d)  # rows = basis points
    for u in _unit_vectors(v).unbind(-2):
        rows = _reflect_unit(rows, u.unsqueeze(-2))
    if k == 1:
        return rows[0]
    if v.dim() == 3:
        return torch.linalg.multi_dot(list(rows.unbind(0)))
    return functools.reduce(torch.matmul, rows.unbind(0))


def _members_matrix(points: Tensor, v: Tensor) -> Tensor | None:
    """The members' matrices ``(E, d, d)`` (:func:`_run_matrix`) when ``v`` (run layout ``(K, E, 1, T, d)``) holds
    one vector set per member of an ensemble of points ``(E, N, d)`` and the fused kernels are on; else
    ``None``. A run is then one batched product of the points, whatever ``K``."""
    if not (points.dim() == 3 and v.dim() == 5 and v.shape[1:3] == (points.shape[0], 1) and fused_kernels_allowed()):
        return None
    return _run_matrix(v.squeeze(2))


MAX_REFLECTIONS = 4096  # per layer: each reflection is a step of a Python loop


def reflect_all(z: Tensor, v: Tensor) -> Tensor:
    """``H_m ⋯ H_1 z`` for reflection vectors ``v`` ``(..., m, d)`` (``H_1`` first; ``v = 0`` is the
    identity): the vectors are rescaled and normalised at once (:func:`_unit_vectors`), then each
    reflection is one fused update ``z ← z − 2 (zᵀû) û``. ``z`` is ``(..., d)``, its leading
    dimensions broadcasting against ``v``'s.

    With one vector set per point (``z.shape[:-1] == v.shape[:-2]``) and the fused kernels on, the
    normalisation and the reflections run as :class:`_Reflections` (analytic backward) under autograd,
    and on the CPU as one compiled call each way (``runs.cpp``), with or without autograd.
    """
    if z.shape[:-1] == v.shape[:-2] and fused_kernels_allowed():  # the layout _Reflections assumes
        if torch.is_grad_enabled():
            return _Reflections.apply(z, v)
        module = native.usable(z)
        if module is not None:
            return _compiled_reflections(module, z, v)[0]
    for u in _unit_vectors(v).unbind(-2):
        z = _reflect_unit(z, u)
    return z


class _Reflections(torch.autograd.Function):
    """``y_t = H_t y_{t−1} = y_{t−1} − 2 (y_{t−1}ᵀu_t) u_t``, ``t = 1 … m``, for the unit vectors ``u_t``
    of ``v`` ``(N, m, d)`` (:func:`_normalised`) and points ``y_0 = z`` ``(N, d)``, with an analytic backward.

    Backward (``g`` = ∂L/∂y_t, going down from ``t = m``; ``H_t`` is symmetric):
    ``∂L/∂u_t = −2 ((gᵀu_t) y_{t−1} + (y_{t−1}ᵀu_t) g)``, then ``g ← H_t g``; and
    ``∂L/∂v_t = r (∂L/∂u_t − (uᵀ∂L/∂u_t) u)/s``. The forward keeps every reflection's input; the ``u``
    gradients are formed at once from the stacked inputs and ``g``'s. On the CPU, the normalisation and the
    reflections are one compiled call each way (``runs.cpp``, the same formulas point by point).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, v: Tensor) -> Tensor:
        ctx.module = native.usable(z)
        if ctx.module is not None:  # the normalisation inside, and its backward
            y, kept = _compiled_reflections(ctx.module, z, v)
            ctx.save_for_backward(*kept)
            ctx.v_shape = v.shape
            return y
        unit, scale, inverse_norm = _normalised(v)
        inputs = []
        for u in unit.unbind(-2):
            inputs.append(z)
            z = _reflect_unit(z, u)
        ctx.save_for_backward(unit, torch.stack(inputs, -2), scale, inverse_norm)
        return z

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        if ctx.module is not None:
            inputs, unit, factors = ctx.saved_tensors
            grad_z, grad_v = ctx.module.reflections_backward(grad.reshape(-1, grad.shape[-1]), unit, factors, inputs)
            return grad_z.view(grad.shape), grad_v.view(ctx.v_shape)
        unit, inputs, scale, inverse_norm = ctx.saved_tensors
        grads = []
        for u in reversed(unit.unbind(-2)):
            grads.append(grad)
            grad = _reflect_unit(grad, u)
        outs = torch.stack(grads[::-1], -2)  # ∂L/∂y_t for t = 1 … m
        grad_unit = -2 * (inner(outs, unit).unsqueeze(-1) * inputs + inner(inputs, unit).unsqueeze(-1) * outs)
        tangent = torch.addcmul(grad_unit, inner(grad_unit, unit).unsqueeze(-1), unit, value=-1)
        return grad, tangent.mul_(inverse_norm).div_(scale)


def _compiled_reflections(module: ModuleType, z: Tensor, v: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The compiled per-point reflections (``runs.cpp``) of raw vectors ``v`` (normalised as
    :func:`_normalised` does) on any leading dimensions: ``y`` and what the backward needs (every
    reflection's input, the unit vectors and their factors ``s, r``, flattened to ``(-1, m, …)``)."""
    m, d = v.shape[-2:]
    y, *kept = module.reflections_forward(z.reshape(-1, d), v.reshape(-1, m, d))
    return y.view(z.shape), kept


def _check_reflections(reflections: int) -> int:
    if not isinstance(reflections, int) or not 1 <= reflections <= MAX_REFLECTIONS:
        raise ValueError(f"reflections must be an integer in [1, {MAX_REFLECTIONS}], got {reflections!r}")
    return reflections


@register(
    "householder",
    options=(Option("reflections", int, aliases=("k",)),),
    formula="H_k ⋯ H_1 z",
    inverse="exact (the reflections in reverse order)",
    examples=lambda dim: {"householder": {"reflections": 3}},
)
class Householder(FlowLayer):
    r"""Householder layers :math:`x = H_k \cdots H_1 z`, :math:`H_t = I - 2 v_t v_t^\top/\lVert v_t\rVert^2`.

    Log-det: 0 (each reflection has determinant −1, ``|det| = 1``).
    Constraint: none (``v_t = 0`` is treated as the identity).
    No identity to start at (:meth:`~flowprobe.layers.base.FlowLayer.start_at_identity` leaves it): ``v_t = 0``
    has no gradient to leave by, and a Gaussian source pulled back through a rotation is the same Gaussian.
    Inverse: exact, ``z = H_1 \cdots H_k x`` (each reflection is its own inverse). A run with
    shared parameters is applied as one ``d × d`` matrix; one with batched (per-point or ensemble)
    parameters reflects the points with every layer's normalised vectors in turn (:func:`reflect_all`).

    Args:
        dim: Dimension.
        reflections: Number ``k`` of reflections per layer.
        layers: Number of layers ``K`` in the stack.
        ensemble: Ensemble shape (see :class:`~flowprobe.layers.base.FlowLayer`).

    References:
        J. M. Tomczak, M. Welling. Improving Variational Auto-Encoders using Householder Flow.
        NIPS 2016 workshop. https://arxiv.org/abs/1611.09630
    """

    def __init__(
        self, dim: int, reflections: int = 1, *, layers: int = 1, ensemble: int | tuple[int, ...] = ()
    ) -> None:
        super().__init__(dim, layers, ensemble)
        self.reflections = _check_reflections(reflections)
        self._init_parameters()

    def init_raw(self) -> dict[str, Tensor]:
        return {"v": torch.randn(self.reflections, self.dim)}

    def constrain(self, raw: dict[str, Tensor]) -> Tensor:
        return raw["v"]

    def transform(self, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return reflect_all(z, v), z.new_zeros(z.shape[:-1])

    def invert(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return reflect_all(x, v.flip(-2)), x.new_zeros(x.shape[:-1])

    def forward_run(self, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if uses_fused_kernels(z, v.dim() == 3):
            return z @ _run_matrix(v), z.new_zeros(z.shape[0])
        matrices = _members_matrix(z, v)
        if matrices is not None:
            return z @ matrices, z.new_zeros(z.shape[:-1])
        return reflect_all(z, _in_order(v)), z.new_zeros(z.shape[:-1])

    def inverse_run(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if uses_fused_kernels(x, v.dim() == 3):
            return x @ _run_matrix(v).transpose(-1, -2), x.new_zeros(x.shape[0])
        matrices = _members_matrix(x, v)
        if matrices is not None:
            return x @ matrices.transpose(-1, -2), x.new_zeros(x.shape[:-1])
        return reflect_all(x, _in_order(v).flip(-2)), x.new_zeros(x.shape[:-1])

    def invertibility(self, layer: int | None = None) -> Invertibility:
        return Invertibility(True, 1.0, "always (orthogonal)")

    def _settings(self) -> str:
        return f"reflections={self.reflections}"
