"""Householder layers (Tomczak & Welling, 2016) and the reflection helpers Sylvester bases use."""

from __future__ import annotations

import torch
from torch import Tensor

from flowprobe.layers.base import FlowLayer, Invertibility, inner, uses_fused_kernels
from flowprobe.layers.registry import Option, register

__all__ = ["Householder", "householder_matrix", "reflect"]


def reflect(z: Tensor, v: Tensor) -> Tensor:
    """``(I − 2vvᵀ/‖v‖²) z`` for points ``z`` (..., d) and ``v`` (..., d); ``v = 0`` is the identity.

    ``v`` is rescaled by its largest entry first, so that ``‖v‖²`` neither underflows (``v ~ 1e-155``
    would otherwise give a matrix that is no reflection) nor overflows.
    """
    scale = v.abs().amax(-1, keepdim=True)
    v = v / torch.where(scale > 0, scale, torch.ones_like(scale))
    v_sq = inner(v, v).clamp_min(torch.finfo(v.dtype).tiny)
    return z - (2 * inner(z, v) / v_sq).unsqueeze(-1) * v


def householder_matrix(vectors: Tensor, dim: int, columns: int) -> Tensor:
    """First ``columns`` columns of ``H_1 H_2 ⋯ H_T`` for reflection vectors ``(..., T, dim)``."""
    eye = torch.eye(dim, columns, dtype=vectors.dtype, device=vectors.device)
    q = eye.expand(*vectors.shape[:-2], dim, columns)
    for t in reversed(range(vectors.shape[-2])):
        v = vectors[..., t, :].unsqueeze(-2)  # (..., 1, d)
        q = reflect(q.transpose(-1, -2), v).transpose(-1, -2)
    return q


def _run_matrix(v: Tensor) -> Tensor:
    """The ``d × d`` matrix ``A`` with ``x = z A`` for a shared run with reflection vectors ``(K, T, d)``."""
    k, t, d = v.shape
    rows = torch.eye(d, dtype=v.dtype, device=v.device).expand(k, d, d)  # rows = basis points
    for j in range(t):
        rows = reflect(rows, v[:, j : j + 1, :])
    return torch.linalg.multi_dot(list(rows.unbind(0))) if k > 1 else rows[0]


MAX_REFLECTIONS = 4096  # per layer: each reflection is a step of a Python loop


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
    Inverse: exact, ``z = H_1 \cdots H_k x`` (each reflection is its own inverse). A run with
    shared parameters is applied as one ``d × d`` matrix.

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
        for t in range(self.reflections):
            z = reflect(z, v[..., t, :])
        return z, z.new_zeros(z.shape[:-1])

    def invert(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        for t in range(self.reflections - 1, -1, -1):
            x = reflect(x, v[..., t, :])
        return x, x.new_zeros(x.shape[:-1])

    def forward_run(self, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if not uses_fused_kernels(z, v.dim() == 3):
            return super().forward_run(z, v)
        return z @ _run_matrix(v), z.new_zeros(z.shape[0])

    def inverse_run(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if not uses_fused_kernels(x, v.dim() == 3):
            return super().inverse_run(x, v)
        return x @ _run_matrix(v).transpose(-1, -2), x.new_zeros(x.shape[0])

    def invertibility(self, layer: int | None = None) -> Invertibility:
        return Invertibility(True, 1.0, "always (orthogonal)")

    def _settings(self) -> str:
        return f"reflections={self.reflections}"
