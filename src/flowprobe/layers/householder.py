"""Householder layers (Tomczak & Welling, 2016) and the reflection helpers Sylvester bases use."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowprobe.layers.base import FlowLayer, Invertibility, inner, uses_fused_kernels
from flowprobe.layers.registry import Option, register

__all__ = ["Householder", "householder_matrix", "reflect", "reflect_all"]


def reflect(z: Tensor, v: Tensor) -> Tensor:
    """``(I − 2vvᵀ/‖v‖²) z`` for points ``z`` (..., d) and ``v`` (..., d); ``v = 0`` is the identity."""
    return _reflect_unit(z, _unit_vectors(v))


def _rescaled(v: Tensor) -> Tensor:
    """``v / max_i |v_i|`` along the last dimension (``v = 0`` stays 0)."""
    scale = v.abs().amax(-1, keepdim=True)
    return v / torch.where(scale > 0, scale, torch.ones_like(scale))


def _unit_vectors(v: Tensor) -> Tensor:
    """``v/‖v‖`` along the last dimension (``v = 0`` stays 0). ``v`` is rescaled by its largest entry
    first, so that ``‖v‖²`` neither underflows (``v ~ 1e-155`` would otherwise give a matrix that is no
    reflection) nor overflows."""
    v = _rescaled(v)
    return v * torch.rsqrt(inner(v, v).clamp_min(torch.finfo(v.dtype).tiny)).unsqueeze(-1)


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
    """The ``d × d`` matrix ``A`` with ``x = z A`` for a shared run with reflection vectors ``(K, T, d)``."""
    k, _, d = v.shape
    rows = torch.eye(d, dtype=v.dtype, device=v.device).expand(k, d, d)  # rows = basis points
    for u in _unit_vectors(v).unbind(-2):
        rows = _reflect_unit(rows, u.unsqueeze(-2))
    return torch.linalg.multi_dot(list(rows.unbind(0))) if k > 1 else rows[0]


MAX_REFLECTIONS = 4096  # per layer: each reflection is a step of a Python loop


def reflect_all(z: Tensor, v: Tensor) -> Tensor:
    """``H_m ⋯ H_1 z`` for reflection vectors ``v`` ``(..., m, d)`` (``H_1`` first; ``v = 0`` is the
    identity): the vectors are rescaled and normalised at once (:func:`_unit_vectors`), then each
    reflection is one fused update ``z ← z − 2 (zᵀû) û``. ``z`` is ``(..., d)``, its leading
    dimensions broadcasting against ``v``'s.

    With autograd, one vector set per point (``z.shape[:-1] == v.shape[:-2]``) and the fused kernels
    on, the reflections run as :class:`_Reflections` (analytic backward, about half the operations).
    """
    unit = _unit_vectors(v)
    # uses_fused_kernels' "shared" gate: here, the per-point layout that _Reflections' backward assumes
    if torch.is_grad_enabled() and uses_fused_kernels(z, z.shape[:-1] == unit.shape[:-2]):
        return _Reflections.apply(z, unit)
    for u in unit.unbind(-2):
        z = _reflect_unit(z, u)
    return z


class _Reflections(torch.autograd.Function):
    """``y_t = H_t y_{t−1} = y_{t−1} − 2 (y_{t−1}ᵀu_t) u_t``, ``t = 1 … m``, for unit vectors ``u``
    ``(N, m, d)`` and points ``y_0 = z`` ``(N, d)``, with an analytic backward.

    Backward (``g`` = ∂L/∂y_t, going down from ``t = m``; ``H_t`` is symmetric):
    ``∂L/∂u_t = −2 ((gᵀu_t) y_{t−1} + (y_{t−1}ᵀu_t) g)``, then ``g ← H_t g``. The forward keeps every
    reflection's input; the ``u`` gradients are formed at once from the stacked inputs and ``g``'s.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, unit: Tensor) -> Tensor:
        inputs = []
        for u in unit.unbind(-2):
            inputs.append(z)
            z = _reflect_unit(z, u)
        ctx.save_for_backward(unit, torch.stack(inputs, -2))
        return z

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        unit, inputs = ctx.saved_tensors
        grads = []
        for u in reversed(unit.unbind(-2)):
            grads.append(grad)
            grad = _reflect_unit(grad, u)
        outs = torch.stack(grads[::-1], -2)  # ∂L/∂y_t for t = 1 … m
        grad_unit = -2 * (inner(outs, unit).unsqueeze(-1) * inputs + inner(inputs, unit).unsqueeze(-1) * outs)
        return grad, grad_unit


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
        return reflect_all(z, _in_order(v)), z.new_zeros(z.shape[:-1])

    def inverse_run(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if uses_fused_kernels(x, v.dim() == 3):
            return x @ _run_matrix(v).transpose(-1, -2), x.new_zeros(x.shape[0])
        return reflect_all(x, _in_order(v).flip(-2)), x.new_zeros(x.shape[:-1])

    def invertibility(self, layer: int | None = None) -> Invertibility:
        return Invertibility(True, 1.0, "always (orthogonal)")

    def _settings(self) -> str:
        return f"reflections={self.reflections}"
