"""Householder layers (Tomczak & Welling, 2016)."""

from __future__ import annotations

import torch
from torch import Tensor

from flowprobe.layers.base import FlowLayer, Invertibility, inner, normal_init

__all__ = ["Householder", "reflect", "householder_matrix"]


def reflect(z: Tensor, v: Tensor) -> Tensor:
    """``(I − 2vvᵀ/‖v‖²) z`` for points ``z`` (N, d) and ``v`` (..., d); ``v = 0`` is the identity."""
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


class Householder(FlowLayer):
    r"""Householder layer :math:`x = H_k \cdots H_1 z`, :math:`H_t = I - 2 v_t v_t^\top/\lVert v_t\rVert^2`.

    Log-det: 0 (each reflection has determinant −1, ``|det| = 1``).
    Constraint: none (``v_t = 0`` is treated as the identity).
    Inverse: exact, ``z = H_1 \cdots H_k x`` (each reflection is its own inverse).

    Args:
        dim: Dimension.
        reflections: Number ``k`` of reflections in the layer.

    References:
        J. M. Tomczak, M. Welling. Improving Variational Auto-Encoders using Householder Flow.
        NIPS 2016 workshop. https://arxiv.org/abs/1611.09630
    """

    def __init__(self, dim: int, reflections: int = 1) -> None:
        super().__init__(dim)
        if reflections < 1:
            raise ValueError(f"reflections must be >= 1, got {reflections}")
        self.reflections = reflections
        self.v = normal_init((reflections, dim), 1.0)

    def constrain(self, raw: dict[str, Tensor]) -> Tensor:
        return raw["v"]

    def _reflect_all(self, z: Tensor, v: Tensor, order: range) -> tuple[Tensor, Tensor]:
        for t in order:
            z = reflect(z, v[..., t, :])
        return z, z.new_zeros(z.shape[0])

    def transform(self, z: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        return self._reflect_all(z, p, range(self.reflections))

    def invert(self, x: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        return self._reflect_all(x, p, range(self.reflections - 1, -1, -1))

    def invertibility(self) -> Invertibility:
        return Invertibility(True, 1.0, "always (orthogonal)")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reflections={self.reflections}"
