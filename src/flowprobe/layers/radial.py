"""Radial layers (Rezende & Mohamed, 2015): the formula, its constraint, its closed-form inverse and
the fused run kernels (``docs/layers.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.autograd.function import once_differentiable

from flowprobe.layers import native
from flowprobe.layers.base import FlowLayer, Invertibility, uses_fused_kernels
from flowprobe.layers.planar import DEFAULT_MIN_SLOPE, check_min_slope, inverse_softplus
from flowprobe.layers.registry import Option, register
from flowprobe.layers.scalar import needs_grad

__all__ = ["Radial", "RadialParams", "source_radius"]

MIN_ALPHA = 1e-3


class RadialParams(NamedTuple):
    """Constrained radial parameters (layer axis first, batch dimensions after it)."""

    z0: Tensor  # (K, ..., d)
    alpha: Tensor  # (K, ...)
    beta: Tensor  # (K, ...)


def source_radius(y_norm: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``r = ‖z − z0‖`` from ``ŷ = ‖x − z0‖``: the non-negative root of ``r² + (α + β − ŷ) r − αŷ = 0``.

    Computed without cancellation (``2αŷ/(l + √D)`` when ``l = α + β − ŷ > 0``, else ``(√D − l)/2``)
    and without overflow (``√D`` as a hypotenuse), so float32 points at ``1e30`` stay finite.
    """
    lin = alpha + beta - y_norm
    disc = torch.hypot(lin, 2 * torch.sqrt(alpha * y_norm))  # √(l² + 4αŷ) without overflowing l²
    return torch.where(lin > 0, 2 * alpha * y_norm / (lin + disc), (disc - lin) / 2)


def _logdet(dim: int, radius: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``(d−1) log(1 + βh) + log(1 + αβh²)``, ``h = 1/(α + r)`` (broadcasting)."""
    h = 1 / (alpha + radius)
    bh = beta * h
    return (dim - 1) * torch.log1p(bh) + torch.log1p(bh * alpha * h)


@register(
    "radial",
    options=(Option("min_slope", float),),
    formula="z + β (z − z0)/(α + ‖z − z0‖)",
    inverse="closed form",
    examples=lambda dim: {"radial": {}},
)
class Radial(FlowLayer):
    r"""Radial layers :math:`x = z + \beta\,h(r)\,(z - z_0)`, :math:`r = \lVert z - z_0\rVert`,
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
        layers: Number of layers ``K`` in the stack.
        ensemble: Ensemble shape (see :class:`~flowprobe.layers.base.FlowLayer`).

    References:
        D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
        https://arxiv.org/abs/1505.05770
    """

    def __init__(
        self,
        dim: int,
        min_slope: float = DEFAULT_MIN_SLOPE,
        *,
        layers: int = 1,
        ensemble: int | tuple[int, ...] = (),
    ) -> None:
        super().__init__(dim, layers, ensemble)
        self.min_slope = check_min_slope(min_slope)
        self._init_parameters()

    def init_raw(self) -> dict[str, Tensor]:
        return {"z0": torch.randn(self.dim), "alpha": torch.zeros(()), "beta": torch.zeros(())}

    def identity_raw(self, raw: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """``β = 0`` (none for ``ε = 1``, where ``β > 0``)."""
        if self.min_slope == 1:
            return None
        alpha = F.softplus(raw["alpha"]) + MIN_ALPHA
        return raw | {"beta": inverse_softplus((1 - self.min_slope) * alpha)}

    def constrain(self, raw: dict[str, Tensor]) -> RadialParams:
        alpha = F.softplus(raw["alpha"]) + MIN_ALPHA
        beta = -(1 - self.min_slope) * alpha + F.softplus(raw["beta"])
        return RadialParams(raw["z0"], alpha, beta)

    def transform(self, z: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
        diff = z - p.z0
        radius = diff.norm(dim=-1)
        x = z + (p.beta / (p.alpha + radius)).unsqueeze(-1) * diff
        return x, _logdet(self.dim, radius, p.alpha, p.beta)

    def invert(self, x: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
        diff = x - p.z0
        radius = source_radius(diff.norm(dim=-1), p.alpha, p.beta)
        z = p.z0 + diff / (1 + p.beta / (p.alpha + radius)).unsqueeze(-1)
        return z, -_logdet(self.dim, radius, p.alpha, p.beta)

    def forward_run(self, z: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
        if not uses_fused_kernels(z, p.z0.dim() == 2):
            return super().forward_run(z, p)
        if not needs_grad(z, p):
            radius = z.new_empty(p.z0.shape[0], z.shape[0])
            x = _steps(z, p, [torch.empty_like(z)] * p.z0.shape[0], radius)  # one x − z0 buffer, reused
            return x, _logdet(z.shape[-1], radius, p.alpha.unsqueeze(-1), p.beta.unsqueeze(-1)).sum(0)
        module = native.usable(z)
        if module is not None:
            return native.NativeRun.apply("radial", module, 0, z, p.z0, p.alpha, p.beta)
        return _RadialRun.apply(z, p.z0, p.alpha, p.beta)

    def inverse_run(self, x: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
        if not uses_fused_kernels(x, p.z0.dim() == 2):
            return super().inverse_run(x, p)
        return _inverse(x, p)

    @torch.no_grad()
    def set_constrained(self, z0: Tensor, alpha: float, beta: float, *, layer: int | None = None) -> None:
        """Set raw parameters so that layer ``layer`` has exactly ``(z0, α, β)``."""
        index = self._layer_index(layer)
        anchor = self.alpha
        alpha_t = torch.as_tensor(alpha, dtype=anchor.dtype, device=anchor.device)
        beta_t = torch.as_tensor(beta, dtype=anchor.dtype, device=anchor.device)
        if bool(alpha_t <= MIN_ALPHA) or bool(beta_t + (1 - self.min_slope) * alpha_t <= 0):
            raise ValueError(f"radial layer needs α > {MIN_ALPHA:g} and β > −(1−ε)α, got α={alpha:g}, β={beta:g}")
        self._write("z0", index, z0)
        self._write("alpha", index, inverse_softplus(alpha_t - MIN_ALPHA))
        self._write("beta", index, inverse_softplus(beta_t + (1 - self.min_slope) * alpha_t))

    def invertibility(self, layer: int | None = None) -> Invertibility:
        p = self.constrained()
        margins = torch.where(p.alpha > 0, torch.clamp(1 + p.beta / p.alpha, max=1.0), torch.zeros_like(p.alpha))
        return self._report(margins, layer, "α > 0 and 1 + β/α > 0 (β > −α)")

    def _settings(self) -> str:
        return f"min_slope={self.min_slope:g}"


# -- fused kernels for runs with shared parameters: z0 (K, d), α, β (K,), points (N, d) -----------
def _steps(z: Tensor, p: RadialParams, diffs: Sequence[Tensor], radius: Tensor) -> Tensor:
    """The ``K`` radial updates ``x ← x + β_k/(α_k + r_k) (x − z0_k)``, two passes over the points per layer.

    Only ``δ_k = x − z0_k`` is carried: ``δ_{k+1} = (1 + a_k) δ_k + (z0_k − z0_{k+1})`` with
    ``1 + a_k = (α_k + β_k + r_k)/(α_k + r_k)``, and the output is ``(1 + a_K) δ_K + z0_K``: per layer
    one read of the points for the norm and one read/write for the update. Writes ``δ_k`` into
    ``diffs[k]`` (the same buffer may be passed ``K`` times) and ``r_k = ‖δ_k‖`` into ``radius[k]``.
    """
    k = p.z0.shape[0]
    z0s, shifts = p.z0.unbind(0), (p.z0[:-1] - p.z0[1:]).unbind(0)
    offset = p.alpha + p.beta
    diff = torch.sub(z, z0s[0], out=diffs[0])
    for i in range(k):
        r = torch.linalg.vector_norm(diff, dim=-1, out=radius[i])
        scale = torch.div(r + offset[i], r + p.alpha[i]).unsqueeze(-1)
        if i + 1 < k:
            diff = torch.addcmul(shifts[i], diff, scale, out=diffs[i + 1])
        else:
            diff = torch.addcmul(z0s[i], diff, scale)  # the output x
    return diff


class _RadialRun(torch.autograd.Function):
    """``K`` radial layers with an analytic backward.

    Layer ``k``: ``x = z + a δ``, ``δ = z − z0``, ``r = ‖δ‖``, ``h = 1/(α + r)``, ``a = βh``,
    ``ℓ = (d−1) log(1 + βh) + log(1 + αβh²)``. The forward keeps only every ``δ`` and ``r``.
    Backward (``g`` = ∂L/∂x, ``λ`` = ∂L/∂logdet, ``γ = gᵀδ``):
    ``∂L/∂h = βγ + λ ((d−1)β/(1+βh) + 2αβh/(1+αβh²))``, ``c = −h² (∂L/∂h)/r`` (0 at ``r = 0``),
    ``∂L/∂z = (1 + a) g + c δ``, ``∂L/∂z0 = −Σ_n (a g + c δ)``,
    ``∂L/∂α = Σ_n (−h² ∂L/∂h + λ βh²/(1+αβh²))``, ``∂L/∂β = Σ_n (hγ + λ ((d−1)h/(1+βh) + αh²/(1+αβh²)))``.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, z0: Tensor, alpha: Tensor, beta: Tensor) -> Any:
        k, (n, d) = z0.shape[0], z.shape
        diffs, radius = z.new_empty(k, n, d), z.new_empty(k, n)
        x = _steps(z, RadialParams(z0, alpha, beta), diffs.unbind(0), radius)
        ctx.save_for_backward(diffs, radius, alpha, beta)
        return x, _logdet(d, radius, alpha.unsqueeze(-1), beta.unsqueeze(-1)).sum(0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_x: Tensor, grad_logdet: Tensor) -> tuple:
        diffs, radius, alpha, beta = ctx.saved_tensors
        k, d = diffs.shape[0], diffs.shape[-1]
        al, be = alpha.unsqueeze(-1), beta.unsqueeze(-1)
        h = 1 / (al + radius)
        bh = be * h
        one_plus_bh, one_plus_abh2 = 1 + bh, 1 + bh * al * h
        dl_dh = grad_logdet * ((d - 1) * be / one_plus_bh + 2 * al * bh / one_plus_abh2)
        dl_db = grad_logdet * ((d - 1) * h / one_plus_bh + al * h * h / one_plus_abh2)
        dl_da = grad_logdet * (bh * h / one_plus_abh2)
        m = torch.where(radius > 0, -h * h / radius, torch.zeros_like(radius))  # ∂L/∂h → c
        m_beta, m_dl_dh = m * be, m * dl_dh
        gamma, coef, grad_a = torch.empty_like(radius), torch.empty_like(radius), torch.empty_like(diffs[:, 0])
        scale, coef_cols = one_plus_bh.unsqueeze(-1).unbind(0), coef.unsqueeze(-1).unbind(0)
        g = grad_x
        for i in range(k - 1, -1, -1):
            torch.linalg.vecdot(g, diffs[i], out=gamma[i])
            torch.addcmul(m_dl_dh[i], m_beta[i], gamma[i], out=coef[i])
            torch.mv(g.t(), bh[i], out=grad_a[i])
            g = torch.addcmul(g * scale[i], coef_cols[i], diffs[i])
        d_h = be * gamma + dl_dh
        grad_z0 = -grad_a - torch.bmm(coef.unsqueeze(1), diffs).squeeze(1)
        return g, grad_z0, (dl_da - h * h * d_h).sum(1), (h * gamma + dl_db).sum(1)


def _roots(x: Tensor, p: RadialParams) -> tuple[Tensor, Tensor, Tensor]:
    """Invert the run without autograd (closed form per layer).

    Layer ``k`` at ``y``: ``δ = y − z0_k``, ``r`` = :func:`source_radius` of ``‖δ‖`` and
    ``z − z0_k = δ (α + r)/(α + β + r)``; only ``δ`` is carried from layer to layer.

    Returns:
        ``z``, every layer's source-side ``z − z0_k`` ``(K, N, d)`` and radius ``(K, N)``.
    """
    k = p.z0.shape[0]
    diffs, radius = x.new_empty(k, *x.shape), x.new_empty(k, x.shape[0])
    z0s, shifts = p.z0.unbind(0), (p.z0[1:] - p.z0[:-1]).unbind(0)
    delta = x - z0s[-1]
    for i in range(k - 1, -1, -1):
        r = torch.linalg.vector_norm(delta, dim=-1, out=radius[i])
        r.copy_(source_radius(r, p.alpha[i], p.beta[i]))
        scale = torch.div(r + p.alpha[i], r + (p.alpha[i] + p.beta[i])).unsqueeze(-1)
        torch.mul(delta, scale, out=diffs[i])
        delta = diffs[i] + shifts[i - 1] if i > 0 else diffs[0] + z0s[0]
    return delta, diffs, radius


def _inverse(x: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
    """Inverse of the run: :func:`_roots`, with autograd plus one implicit step.

    With autograd, ``z = z* − J⁻¹ (f(z*) − x)`` where ``z*`` is the root, ``f`` the run's forward
    (:class:`_RadialRun`, parameters attached) and ``J⁻¹`` the inverse Jacobian at ``z*`` with
    detached coefficients: its value is ``z*`` and its derivatives are the implicit function
    theorem's. Layer ``k``'s Jacobian is ``A I + c δδᵀ`` (``A = 1 + βh``, ``c = −βh²/r``), inverted
    by Sherman–Morrison; the log-det is the forward's at ``z``.
    """
    dim = x.shape[-1]
    if not needs_grad(x, p):
        z, _, radius = _roots(x, p)
        return z, -_logdet(dim, radius, p.alpha.unsqueeze(-1), p.beta.unsqueeze(-1)).sum(0)
    with torch.no_grad():
        root, diffs, radius = _roots(x, RadialParams(*(t.detach() for t in p)))
        h = 1 / (p.alpha.detach().unsqueeze(-1) + radius)
        scale = 1 + p.beta.detach().unsqueeze(-1) * h  # A
        c = torch.where(radius > 0, -p.beta.detach().unsqueeze(-1) * h * h / radius, torch.zeros_like(radius))
        coef = (c / (scale + c * radius * radius)).unsqueeze(-1)
        inv_scale = (1 / scale).unsqueeze(-1)
    v = _RadialRun.apply(root, p.z0, p.alpha, p.beta)[0] - x
    for i in range(p.z0.shape[0] - 1, -1, -1):  # J⁻¹ = J_1⁻¹ ⋯ J_K⁻¹
        v = (v - coef[i] * torch.linalg.vecdot(diffs[i], v).unsqueeze(-1) * diffs[i]) * inv_scale[i]
    z = root - v
    return z, -_RadialRun.apply(z, p.z0, p.alpha, p.beta)[1]
