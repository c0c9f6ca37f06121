"""Planar layers (Rezende & Mohamed, 2015)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from flowprobe.activations import Activation, get_activation
from flowprobe.layers.base import FlowLayer, Invertibility, inner, normal_init
from flowprobe.layers.scalar import solve_scalar

__all__ = ["Planar", "PlanarParams", "inverse_softplus"]

DEFAULT_MIN_SLOPE = 0.05


class PlanarParams(NamedTuple):
    """Constrained planar parameters; leading batch dimensions optional."""

    u: Tensor  # (..., d), already û
    w: Tensor  # (..., d)
    b: Tensor  # (...)
    wu: Tensor  # (...), wᵀû


def inverse_softplus(y: Tensor) -> Tensor:
    """``softplus⁻¹(y) = log(expm1(y))`` for ``y > 0``, stable for large ``y``."""
    return torch.where(y > 20, y + torch.log(-torch.expm1(-y)), torch.log(torch.expm1(y.clamp_max(20))))


class Planar(FlowLayer):
    r"""Planar layer :math:`x = z + \hat u\, h(w^\top z + b)`.

    Log-det: :math:`\log|1 + w^\top\hat u\; h'(w^\top z + b)|`.

    Constraint: :math:`w^\top \hat u \ge -(1-\varepsilon)/\sup h'` for any raw ``(u, w, b)``, via
    Rezende & Mohamed's reparametrisation generalised to any bound,
    :math:`\hat u = u + (m(w^\top u) - w^\top u)\,w/\lVert w\rVert^2`,
    :math:`m(s) = (\mathrm{softplus}(s) - 1 + \varepsilon)/\sup h'` (``ε = 0``, ``sup h' = 1`` is
    exactly the official SNF code). Every point then has slope ``1 + wᵀû h' ≥ ε = min_slope``
    along ``w``, which also bounds the inverse's condition number.

    Inverse: project on ``w``; ``a = wᵀz`` solves the scalar monotone equation
    ``a + wᵀû h(a + b) = wᵀx`` (bracketed Newton, closed form for relu / leaky_relu / identity);
    then ``z = x − û h(a + b)``.

    Args:
        dim: Dimension.
        activation: ``tanh``, ``sigmoid``, ``arctan``, ``softplus``, ``elu``, ``relu``,
            ``leaky_relu`` or ``identity``.
        min_slope: ``ε`` in ``(0, 1]``; the smallest slope any point may see.

    References:
        D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
        https://arxiv.org/abs/1505.05770
    """

    def __init__(self, dim: int, activation: str | Activation = "tanh", min_slope: float = DEFAULT_MIN_SLOPE) -> None:
        super().__init__(dim)
        if not 0 < min_slope <= 1:
            raise ValueError(f"min_slope must lie in (0, 1], got {min_slope}")
        self.act = get_activation(activation)
        self.min_slope = float(min_slope)
        scale = dim**-0.5
        self.u = normal_init((dim,), scale)
        self.w = normal_init((dim,), scale)
        self.b = nn.Parameter(torch.zeros(()))

    def _wu_hat(self, wu: Tensor) -> Tensor:
        return (F.softplus(wu) - 1 + self.min_slope) / self.act.sup_derivative

    def constrain(self, raw: dict[str, Tensor]) -> PlanarParams:
        u, w, b = raw["u"], raw["w"], raw["b"]
        wu = inner(w, u)
        w_sq = inner(w, w).clamp_min(torch.finfo(w.dtype).tiny)
        # û = u⊥ + m(wᵀu) w/‖w‖², written so that no large terms cancel; wᵀû equals m(wᵀu) up to
        # one rounding, and the formula uses the value it actually sees (w = 0 gives 0).
        u_hat = u - (wu / w_sq).unsqueeze(-1) * w + (self._wu_hat(wu) / w_sq).unsqueeze(-1) * w
        return PlanarParams(u_hat, w, b, inner(w, u_hat))

    def transform(self, z: Tensor, p: PlanarParams) -> tuple[Tensor, Tensor]:
        pre = inner(z, p.w) + p.b
        x = z + p.u * self.act.fn(pre).unsqueeze(-1)
        return x, torch.log1p(p.wu * self.act.derivative(pre))

    def invert(self, x: Tensor, p: PlanarParams) -> tuple[Tensor, Tensor]:
        a = solve_scalar(inner(x, p.w), p.wu, torch.ones_like(p.wu), p.b, self.act)
        pre = a + p.b
        z = x - p.u * self.act.fn(pre).unsqueeze(-1)
        return z, -torch.log1p(p.wu * self.act.derivative(pre))

    @torch.no_grad()
    def set_constrained(self, u: Tensor, w: Tensor, b: Tensor | float) -> None:
        """Set the raw parameters so that the constrained ones are exactly ``(û = u, w, b)``.

        Raises:
            ValueError: ``wᵀu`` violates the layer's bound ``−(1−ε)/sup h'``.
        """
        u = torch.as_tensor(u, dtype=self.u.dtype, device=self.u.device)
        w = torch.as_tensor(w, dtype=self.w.dtype, device=self.w.device)
        wu = inner(w, u)
        softplus_value = wu * self.act.sup_derivative + 1 - self.min_slope
        if bool(softplus_value <= 0):
            bound = -(1 - self.min_slope) / self.act.sup_derivative
            raise ValueError(f"planar layer needs wᵀu > {bound:g}, got {float(wu):g}")
        raw_wu = inverse_softplus(softplus_value)
        w_sq = inner(w, w).clamp_min(torch.finfo(w.dtype).tiny)
        self.u.copy_(u + ((raw_wu - wu) / w_sq) * w)
        self.w.copy_(w)
        self.b.copy_(torch.as_tensor(b, dtype=self.b.dtype))

    def invertibility(self) -> Invertibility:
        wu = self.constrained().wu.detach()
        margin = float(torch.clamp(1 + wu * self.act.sup_derivative, max=1.0))
        return Invertibility(margin > 0, margin, f"1 + wᵀû·sup h' > 0 (sup h' = {self.act.sup_derivative:g})")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, activation={self.act.name!r}, min_slope={self.min_slope:g}"
