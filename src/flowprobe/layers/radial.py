"""Radial layers (Rezende & Mohamed, 2015)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from flowprobe.layers.base import FlowLayer, Invertibility, normal_init
from flowprobe.layers.planar import DEFAULT_MIN_SLOPE, inverse_softplus

__all__ = ["Radial", "RadialParams", "source_radius"]

MIN_ALPHA = 1e-3


class RadialParams(NamedTuple):
    """Constrained radial parameters; leading batch dimensions optional."""

    z0: Tensor  # (..., d)
    alpha: Tensor  # (...)
    beta: Tensor  # (...)


def source_radius(y_norm: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``r = ‖z − z0‖`` from ``ŷ = ‖x − z0‖``: the non-negative root of ``r² + (α + β − ŷ) r − αŷ = 0``.

    Computed without cancellation (``2αŷ/(l + √D)`` when ``l = α + β − ŷ > 0``, else ``(√D − l)/2``).
    """
    lin = alpha + beta - y_norm
    disc = torch.sqrt(lin * lin + 4 * alpha * y_norm)
    return torch.where(lin > 0, 2 * alpha * y_norm / (lin + disc), (disc - lin) / 2)


class Radial(FlowLayer):
    r"""Radial layer :math:`x = z + \beta\,h(r)\,(z - z_0)`, :math:`r = \lVert z - z_0\rVert`,
    :math:`h(r) = 1/(\alpha + r)`.

    Log-det: :math:`(d-1)\log(1 + \beta h) + \log(1 + \beta\alpha h^2)`.

    Constraint: ``α = softplus(α̂) + 1e-3 > 0`` and ``β = −(1−ε)α + softplus(β̂)``, i.e.
    ``β ≥ −(1−ε)α`` (Rezende & Mohamed's ``β ≥ −α`` with margin ``ε = min_slope``): the radial
    profile ``g(r) = r(1 + βh(r))`` then has slope ``≥ ε`` everywhere.

    Inverse (closed form): with ``ŷ = ‖x − z0‖``, ``r`` is the non-negative root of
    ``r² + (α + β − ŷ) r − αŷ = 0`` (computed without cancellation), and
    ``z = z0 + (x − z0)/(1 + βh(r))`` (also valid at ``x = z0``).

    Args:
        dim: Dimension.
        min_slope: ``ε`` in ``(0, 1]``.

    References:
        D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
        https://arxiv.org/abs/1505.05770
    """

    def __init__(self, dim: int, min_slope: float = DEFAULT_MIN_SLOPE) -> None:
        super().__init__(dim)
        if not 0 < min_slope <= 1:
            raise ValueError(f"min_slope must lie in (0, 1], got {min_slope}")
        self.min_slope = float(min_slope)
        self.z0 = normal_init((dim,), 1.0)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.beta = nn.Parameter(torch.zeros(()))

    def constrain(self, raw: dict[str, Tensor]) -> RadialParams:
        alpha = F.softplus(raw["alpha"]) + MIN_ALPHA
        beta = -(1 - self.min_slope) * alpha + F.softplus(raw["beta"])
        return RadialParams(raw["z0"], alpha, beta)

    def transform(self, z: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
        diff = z - p.z0
        h = 1 / (p.alpha + diff.norm(dim=-1))
        bh = p.beta * h
        x = z + bh.unsqueeze(-1) * diff
        logdet = (self.dim - 1) * torch.log1p(bh) + torch.log1p(bh * p.alpha * h)
        return x, logdet

    def invert(self, x: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
        diff = x - p.z0
        r = source_radius(diff.norm(dim=-1), p.alpha, p.beta)
        h = 1 / (p.alpha + r)
        bh = p.beta * h
        z = p.z0 + diff / (1 + bh).unsqueeze(-1)
        logdet = (self.dim - 1) * torch.log1p(bh) + torch.log1p(bh * p.alpha * h)
        return z, -logdet

    @torch.no_grad()
    def set_constrained(self, z0: Tensor, alpha: float, beta: float) -> None:
        """Set raw parameters so that the constrained ones are exactly ``(z0, α, β)``."""
        alpha_t = torch.as_tensor(alpha, dtype=self.alpha.dtype, device=self.alpha.device)
        beta_t = torch.as_tensor(beta, dtype=self.beta.dtype, device=self.beta.device)
        if bool(alpha_t <= MIN_ALPHA) or bool(beta_t + (1 - self.min_slope) * alpha_t <= 0):
            raise ValueError(f"radial layer needs α > {MIN_ALPHA:g} and β > −(1−ε)α, got α={alpha:g}, β={beta:g}")
        self.z0.copy_(torch.as_tensor(z0, dtype=self.z0.dtype))
        self.alpha.copy_(inverse_softplus(alpha_t - MIN_ALPHA))
        self.beta.copy_(inverse_softplus(beta_t + (1 - self.min_slope) * alpha_t))

    def invertibility(self) -> Invertibility:
        p = self.constrained()
        margin = float(torch.clamp(1 + p.beta / p.alpha, max=1.0).detach())
        return Invertibility(margin > 0 and float(p.alpha.detach()) > 0, margin, "α > 0 and 1 + β/α > 0 (β > −α)")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, min_slope={self.min_slope:g}"
