"""Sylvester layers (van den Berg, Hasenclever, Tomczak & Welling, 2018) and the general residual
form ``z + A h(Bᵀz + b)`` studied by Kong & Chaudhuri (2020): formulas, constraints, inverses and
the fused run kernels (``docs/layers.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from flowprobe.activations import TANH_NEWTON, Activation, get_activation
from flowprobe.layers import native
from flowprobe.layers.base import FlowLayer, InverseNotAvailable, Invertibility, uses_fused_kernels
from flowprobe.layers.householder import _check_reflections, householder_matrix
from flowprobe.layers.planar import DEFAULT_MIN_SLOPE, check_min_slope
from flowprobe.layers.registry import Option, activation_option, choice, register
from flowprobe.layers.scalar import log_slopes, needs_grad, solve_scalar

__all__ = ["GeneralSylvester", "Sylvester", "SylvesterParams", "vecmat"]

KINDS = ("orthogonal", "householder", "triangular")
MAX_HIDDEN = 4096  # neurons of a general layer (its log-det is an m × m determinant per point)
BLOCK = 8  # rows per block of the blocked back-substitution (see _newton_inverse)
DEFAULT_HOUSEHOLDER_REFLECTIONS = 8  # as in the official SNF code


def vecmat(v: Tensor, m: Tensor) -> Tensor:
    """Row vectors times matrices, ``(..., r) @ (..., r, c) -> (..., c)``, broadcasting leading dimensions.

    ``einsum`` folds a parameter batch of size 1 into the matrix product instead of expanding it.
    """
    return torch.einsum("...i,...ij->...j", v, m)


class SylvesterParams(NamedTuple):
    """Constrained VdB Sylvester parameters (layer axis first, batch dimensions after it)."""

    q: Tensor  # (K, ..., d, m), orthonormal columns
    r: Tensor  # (K, ..., m, m), upper triangular
    r_tilde: Tensor  # (K, ..., m, m), upper triangular
    b: Tensor  # (K, ..., m)


def _sylvester_examples(dim: int) -> dict[str, dict]:
    cases = {}
    for kind in KINDS:
        for act in ("tanh", "sigmoid", "softplus", "elu", "relu", "leaky_relu"):
            hidden = dim if kind == "triangular" else max(1, dim - 1)
            cases[f"sylvester-{kind}-{act}"] = {"kind": kind, "activation": act, "hidden": hidden}
    cases["sylvester-triangular-flip"] = {"kind": "triangular", "flip": True}
    return cases


@register(
    "sylvester",
    options=(
        Option("kind", choice(*KINDS), words=KINDS),
        activation_option(),
        Option("hidden", int, aliases=("m",)),
        Option("reflections", int, aliases=("k",)),
        Option("min_slope", float),
    ),
    formula="z + Q R h(R̃ Qᵀ z + b)",
    inverse="back-substitution of scalar monotone equations",
    examples=_sylvester_examples,
)
class Sylvester(FlowLayer):
    r"""Sylvester layers in van den Berg's form :math:`x = z + Q R\, h(\tilde R Q^\top z + b)`.

    ``Q ∈ R^{d×m}`` has orthonormal columns, ``R`` and ``R̃`` are upper triangular. The three
    variants differ in how ``Q`` is built:

    * ``orthogonal`` (O-SNF, ``m ≤ d``): an orthonormal basis of the column space of a free
      ``d×m`` matrix. VdB orthogonalise iteratively; we use Householder QR, which is exactly
      orthonormal for *every* raw value (the exact log-det below relies on ``QᵀQ = I``).
    * ``householder`` (H-SNF): the first ``m`` columns of a product of ``reflections``
      Householder matrices (default 8, as in the official code; ``m ≤ d``).
    * ``triangular`` (T-SNF, ``m = d``): ``Q`` is the identity or the reversal permutation;
      by default consecutive layers of a stack alternate, starting with the identity.

    Log-det: :math:`\sum_i \log|1 + h'((\tilde R Q^\top z + b)_i)\, R_{ii}\tilde R_{ii}|`.

    Constraint: ``R = triu(D, 1) + diag(s·tanh d₁)``, ``R̃ = triu(Dᵀ, 1) + diag(s·tanh d₂)`` with
    ``s = sqrt((1−ε)/sup h')``, so ``R_ii R̃_ii ≥ −(1−ε)/sup h'`` for any raw value (VdB's tanh
    diagonals, scaled to the activation and a margin ``ε = min_slope``).

    Inverse: ``r = Qᵀx``, the part of ``x`` outside ``range(Q)`` is untouched, and
    ``v + R h(R̃v + b) = r`` is solved by back-substitution, one scalar monotone equation per row
    from ``i = m`` down to 1; then ``z = Qv + (I − QQᵀ)x``.

    Args:
        dim: Dimension ``d``.
        hidden: Number of neurons ``m`` (default ``d``).
        kind: ``orthogonal``, ``householder`` or ``triangular``.
        activation: Any activation of :mod:`flowprobe.activations`.
        reflections: Reflections per layer for ``householder``.
        flip: For ``triangular``: ``None`` alternates identity and reversal along the stack; a
            bool applies to every layer; a sequence gives each layer's.
        min_slope: ``ε`` in ``(0, 1]``.
        layers: Number of layers ``K`` in the stack.
        ensemble: Ensemble shape (see :class:`~flowprobe.layers.base.FlowLayer`).

    References:
        R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling. Sylvester Normalizing Flows
        for Variational Inference. UAI 2018. https://arxiv.org/abs/1803.05649
    """

    per_layer_attributes = ("flip",)

    def __init__(
        self,
        dim: int,
        hidden: int | None = None,
        kind: str = "orthogonal",
        activation: str | Activation = "tanh",
        reflections: int = DEFAULT_HOUSEHOLDER_REFLECTIONS,
        flip: bool | Sequence[bool] | None = None,
        min_slope: float = DEFAULT_MIN_SLOPE,
        *,
        layers: int = 1,
        ensemble: int | tuple[int, ...] = (),
    ) -> None:
        super().__init__(dim, layers, ensemble)
        hidden = dim if hidden is None else hidden
        if kind not in KINDS:
            raise ValueError(f"unknown Sylvester kind {kind!r}; expected one of: {', '.join(KINDS)}")
        if not isinstance(hidden, int) or not 1 <= hidden <= dim:
            raise ValueError(f"hidden must lie in [1, dim={dim}], got {hidden}")
        if kind == "triangular" and hidden != dim:
            raise ValueError(f"triangular Sylvester layers need hidden == dim ({dim}), got {hidden}")
        self.hidden, self.kind = hidden, kind
        self.reflections = _check_reflections(reflections)
        if flip is None:
            flips = tuple(i % 2 == 1 for i in range(layers))
        elif isinstance(flip, bool):
            flips = (flip,) * layers
        else:
            flips = tuple(bool(f) for f in flip)
            if len(flips) != layers:
                raise ValueError(f"flip must give one value per layer ({layers}), got {len(flips)}")
        self.flip = flips
        self.act = get_activation(activation)
        self.min_slope = check_min_slope(min_slope)
        self.diag_scale = math.sqrt((1 - self.min_slope) / self.act.sup_derivative)
        self._init_parameters()

    def init_raw(self) -> dict[str, Tensor]:
        raw = {}
        if self.kind == "orthogonal":
            raw["q"] = torch.randn(self.dim, self.hidden)
        elif self.kind == "householder":
            raw["v"] = torch.randn(self.reflections, self.dim)
        m = self.hidden
        raw |= {"D": torch.randn(m, m) * (0.1 / m**0.5), "d1": torch.randn(m) * 0.5, "d2": torch.randn(m) * 0.5}
        return raw | {"b": torch.zeros(m)}

    def identity_raw(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """``R = 0`` (the strict upper triangle of ``D`` and ``d1`` zero); ``R̃``, ``Q`` and ``b`` unchanged."""
        return raw | {"D": raw["D"].tril(), "d1": torch.zeros_like(raw["d1"])}

    def _basis(self, raw: dict[str, Tensor]) -> Tensor:
        if self.kind == "orthogonal":
            return torch.linalg.qr(raw["q"]).Q
        if self.kind == "householder":
            return householder_matrix(raw["v"], self.dim, self.hidden)
        d = raw["D"]
        eye = torch.eye(self.dim, dtype=d.dtype, device=d.device)
        q = torch.stack([eye.flip(-1) if f else eye for f in self.flip])
        return q.reshape(q.shape[0], *(1,) * (d.dim() - 3), self.dim, self.dim)

    def constrain(self, raw: dict[str, Tensor]) -> SylvesterParams:
        d = raw["D"]
        scale = self.diag_scale
        r = torch.triu(d, 1) + torch.diag_embed(scale * torch.tanh(raw["d1"]))
        r_tilde = torch.triu(d.transpose(-1, -2), 1) + torch.diag_embed(scale * torch.tanh(raw["d2"]))
        return SylvesterParams(self._basis(raw), r, r_tilde, raw["b"])

    @staticmethod
    def _diag_product(p: SylvesterParams) -> Tensor:
        return torch.diagonal(p.r, dim1=-2, dim2=-1) * torch.diagonal(p.r_tilde, dim1=-2, dim2=-1)

    def transform(self, z: Tensor, p: SylvesterParams) -> tuple[Tensor, Tensor]:
        pre = vecmat(vecmat(z, p.q), p.r_tilde.transpose(-1, -2)) + p.b
        x = z + vecmat(vecmat(self.act.fn(pre), p.r.transpose(-1, -2)), p.q.transpose(-1, -2))
        logdet = torch.log1p(self.act.derivative(pre) * self._diag_product(p)).sum(-1)
        return x, logdet

    def invert(self, x: Tensor, p: SylvesterParams) -> tuple[Tensor, Tensor]:
        coords = vecmat(x, p.q)  # (..., m)
        outside = x - vecmat(coords, p.q.transpose(-1, -2))
        r_diag = torch.diagonal(p.r, dim1=-2, dim2=-1)
        rt_diag = torch.diagonal(p.r_tilde, dim1=-2, dim2=-1)
        pre: list[Tensor] = []
        v_after = x.new_zeros(*x.shape[:-1], 0)
        h_after = x.new_zeros(*x.shape[:-1], 0)
        for i in reversed(range(self.hidden)):
            gamma = p.b[..., i] + (p.r_tilde[..., i, i + 1 :] * v_after).sum(-1)
            known = (p.r[..., i, i + 1 :] * h_after).sum(-1)
            v_i = solve_scalar(coords[..., i] - known, r_diag[..., i], rt_diag[..., i], gamma, self.act)
            pre_i = rt_diag[..., i] * v_i + gamma
            pre.insert(0, pre_i)
            v_after = torch.cat([v_i.unsqueeze(-1), v_after], -1)
            h_after = torch.cat([self.act.fn(pre_i).unsqueeze(-1), h_after], -1)
        z = vecmat(v_after, p.q.transpose(-1, -2)) + outside
        logdet = torch.log1p(self.act.derivative(torch.stack(pre, -1)) * self._diag_product(p)).sum(-1)
        return z, -logdet

    def forward_run(self, z: Tensor, p: SylvesterParams) -> tuple[Tensor, Tensor]:
        if not uses_fused_kernels(z, p.b.dim() == 2):
            return super().forward_run(z, p)
        into_hidden = p.q @ p.r_tilde.transpose(-1, -2)  # (K, d, m): pre = z Q R̃ᵀ + b
        out_of_hidden = (p.q @ p.r).transpose(-1, -2)  # (K, m, d): x = z + h (QR)ᵀ
        diag = self._diag_product(p)
        logdet = z.new_zeros(z.shape[0])
        for i in range(p.b.shape[0]):
            pre = torch.addmm(p.b[i], z, into_hidden[i])
            h = self.act.fn(pre)
            z = torch.addmm(z, h, out_of_hidden[i])
            logdet = logdet + _log_slopes(self.act, pre, h, diag[i])
        return z, logdet

    def inverse_run(self, x: Tensor, p: SylvesterParams) -> tuple[Tensor, Tensor]:
        """The run's inverse. Shared parameters, without autograd: :func:`_newton_inverse` when the
        activation has fixed Newton budgets. With autograd: the root ``z*`` without it (exact to
        rounding: Newton's convergence is checked), then ``z = z* − G(f(z*) − x)`` where ``G``
        (:class:`_InverseJacobian`) has the value 0 and the derivative ``J⁻¹`` of the run at ``z*``: the
        value ``z*``, the derivatives those of the implicit function theorem; and the log-det of the
        forward at ``z``. Batched parameters: layer by layer (:meth:`invert`)."""
        if not uses_fused_kernels(x, p.b.dim() == 2):
            return super().inverse_run(x, p)
        if not needs_grad(x, p):
            solved = _newton_inverse(x, p, self.act) if self.act.newton is not None else None
            return super().inverse_run(x, p) if solved is None else solved[:2]
        with torch.no_grad():
            fixed = SylvesterParams(*(t.detach() for t in p))
            newton = self.act.newton is not None
            solved = _newton_inverse(x.detach(), fixed, self.act, with_slopes=True) if newton else None
            if solved is None:
                root = super().inverse_run(x.detach(), fixed)[0]
                slopes = self._slopes_along(root, fixed)
            else:  # the Newton solve gives the slopes without another forward
                root, _, slopes = solved
        image, _ = self.forward_run(root, p)
        z = root - _InverseJacobian.apply(image - x, fixed.q, fixed.r, fixed.r_tilde, slopes)
        return z, -self.forward_run(z, p)[1]

    def _slopes_along(self, z: Tensor, p: SylvesterParams) -> Tensor:
        """``h'(pre)`` of every layer of the run from ``z``, ``(K, m, N)`` (the run's Jacobians)."""
        into_hidden = p.q @ p.r_tilde.transpose(-1, -2)
        out_of_hidden = (p.q @ p.r).transpose(-1, -2)
        slopes = z.new_empty(p.b.shape[0], p.b.shape[-1], z.shape[0])
        for i in range(p.b.shape[0]):
            pre = torch.addmm(p.b[i], z, into_hidden[i])
            h = self.act.fn(pre)
            slopes[i] = (
                self.act.derivative(pre)
                if self.act.derivative_from_value is None
                else self.act.derivative_from_value(h)
            ).t()
            z = torch.addmm(z, h, out_of_hidden[i])
        return slopes

    def invertibility(self, layer: int | None = None) -> Invertibility:
        margins = torch.clamp(1 + self._diag_product(self.constrained()) * self.act.sup_derivative, max=1.0)
        condition = f"1 + R_ii·R̃_ii·sup h' > 0 for all i (sup h' = {self.act.sup_derivative:g})"
        return self._report(margins, layer, condition)

    def stream_width(self) -> int:
        return 2 * self.depth * self.hidden + self.dim

    def residual_form(self, p: SylvesterParams) -> tuple[Tensor, Tensor, Tensor]:
        return p.q @ p.r, p.q @ p.r_tilde.transpose(-1, -2), p.b

    def _settings(self) -> str:
        flips = f", flip={self.flip}" if self.kind == "triangular" else ""
        return f"hidden={self.hidden}, kind={self.kind!r}, activation={self.act.name!r}{flips}"


def _log_slopes(act: Activation, pre: Tensor, h: Tensor, diag: Tensor) -> Tensor:
    """``Σ_i log(1 + h'(pre_i) diag_i)`` over the last axis, reusing ``h`` when ``h'`` is a function of it."""
    slope = act.derivative(pre) if act.derivative_from_value is None else act.derivative_from_value(h)
    return torch.log(torch.addcmul(torch.ones_like(diag), slope, diag)).sum(-1)  # log: vectorised, log1p is not


def _newton_inverse(
    x: Tensor, p: SylvesterParams, act: Activation, with_slopes: bool = False
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Invert a shared run without autograd by blocked back-substitution with the activation's fixed budgets.

    Layer ``k`` at ``y``: with ``c = Qᵀy`` and ``v = Qᵀz``, ``c = v + R h(R̃v + b)``; for
    ``i = m−1 … 0``, ``γ_i = b_i + Σ_{j>i} R̃_ij v_j`` and ``c_i' = c_i − Σ_{j>i} R_ij h_j`` are
    known, ``s_i = R̃_ii v_i + γ_i`` solves ``s + R_ii R̃_ii h(s) = R̃_ii c_i' + γ_i`` (budget by
    ``α = R_ii R̃_ii``) and ``v_i = c_i' − R_ii h(s_i)``; then ``z = y − Q Qᵀ y + Q v``. The columns
    live in rows of ``(m, N)`` buffers. Rows are solved in blocks of :data:`BLOCK` from the bottom:
    inside a block each solved row updates the rows above it in the block (rank-1), and a finished
    block updates every row above it with two matrix products — the memory traffic of the updates
    falls by the block size. With the compiled kernels (CPU, tanh): :func:`_compiled_newton_inverse`.

    Returns:
        ``(z, log|det ∂z/∂x|, slopes)``, ``slopes`` every layer's ``h'`` at the root ``(K, m, N)`` when
        ``with_slopes`` (else ``None``); or ``None`` when the convergence check of the run fails.
    """
    kernel = act.newton
    module = native.usable(x) if kernel is TANH_NEWTON else None  # the compiled solver is tanh's
    if module is not None:
        return _compiled_newton_inverse(module, x, p, with_slopes)
    k, m, n = p.r.shape[0], p.r.shape[-1], x.shape[0]
    r_diag, rt_diag = torch.diagonal(p.r, dim1=-2, dim2=-1), torch.diagonal(p.r_tilde, dim1=-2, dim2=-1)
    alpha = r_diag * rt_diag
    alphas, r_diags, rt_diags = alpha.tolist(), r_diag.tolist(), rt_diag.tolist()
    one_plus = (1 + alpha).unbind(-1)  # no (K, m) unbind: one row of 0-d tensors per layer below
    pre = x.new_empty(k, m, n)
    last = torch.empty_like(pre)
    hidden = x.new_empty(m, n)
    z = x
    for layer in range(k - 1, -1, -1):
        q, r, r_tilde = p.q[layer], p.r[layer], p.r_tilde[layer]
        coords = z @ q
        outside = torch.addmm(z, coords, q.t(), alpha=-1)
        c = coords.t().contiguous()  # (m, N): c' of every row, reduced in place
        gamma = p.b[layer].unsqueeze(-1).expand(m, n).clone()
        v = torch.empty_like(c)
        for hi in range(m, 0, -BLOCK):
            lo = max(0, hi - BLOCK)
            for i in range(hi - 1, lo - 1, -1):
                target = torch.add(gamma[i], c[i], alpha=rt_diags[layer][i])
                a = alphas[layer][i]
                kernel.solve(target, a, one_plus[i][layer], kernel.budget(a, x.dtype), pre[layer, i], last[layer, i])
                h = hidden[i].copy_(act.fn(pre[layer, i]))
                torch.add(c[i], h, alpha=-r_diags[layer][i], out=v[i])
                if i > lo:
                    c[lo:i].addr_(r[lo:i, i], h, alpha=-1)
                    gamma[lo:i].addr_(r_tilde[lo:i, i], v[i])
            if lo > 0:
                c[:lo].addmm_(r[:lo, lo:hi], hidden[lo:hi], alpha=-1)
                gamma[:lo].addmm_(r_tilde[:lo, lo:hi], v[lo:hi])
        z = torch.addmm(outside, v.t(), q.t())
    if not bool(kernel.converged(alpha.unsqueeze(-1), last, pre)):
        return None
    return z, -log_slopes(pre.flatten(0, 1), alpha.flatten(), act), act.derivative(pre) if with_slopes else None


def _compiled_newton_inverse(
    module: ModuleType, x: Tensor, p: SylvesterParams, with_slopes: bool
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """:func:`_newton_inverse` for tanh with one compiled call per layer (``runs.cpp``): the same steps
    point by point, points in SIMD lanes, the log-det and the convergence check in the same pass."""
    k, m, n = p.r.shape[0], p.r.shape[-1], x.shape[0]
    alpha = torch.diagonal(p.r, dim1=-2, dim2=-1) * torch.diagonal(p.r_tilde, dim1=-2, dim2=-1)
    budgets = torch.tensor([[TANH_NEWTON.budget(a, x.dtype) for a in row] for row in alpha.tolist()], device=x.device)
    logdet = x.new_zeros(n)
    slopes = x.new_empty(k, m, n) if with_slopes else None
    z = x
    for layer in range(k - 1, -1, -1):
        q = p.q[layer]
        coords = z @ q
        outside = torch.addmm(z, coords, q.t(), alpha=-1)
        v, converged = module.sylvester_newton(coords.t(), p.r[layer], p.r_tilde[layer], p.b[layer], alpha[layer],
                                               budgets[layer], logdet, None if slopes is None else slopes[layer])
        if not converged:
            return None
        z = torch.addmm(outside, v.t(), q.t())
    return z, -logdet, slopes


def _solve_linearised(w: Tensor, r: Tensor, r_tilde: Tensor, slopes: Tensor) -> Tensor:
    """Solve ``(I + R diag(s) R̃) y = w`` for every point (columns of ``(m, N)`` buffers), ``R, R̃``
    upper triangular: a layer's Jacobian in the coordinates ``Qᵀz``.

    Blocked back-substitution as in :func:`_newton_inverse`: with ``σ_j = Σ_{k≥j} R̃_jk y_k``, row
    ``i`` reads ``y_i + Σ_{j≥i} R_ij s_j σ_j = w_i``; ``γ_i = Σ_{k>i} R̃_ik y_k`` and
    ``c_i = w_i − Σ_{j>i} R_ij s_j σ_j`` are known when row ``i`` is reached, so
    ``y_i = (c_i − R_ii s_i γ_i) / (1 + R_ii R̃_ii s_i)`` (a positive denominator by the layer's
    constraint). With the compiled kernels (CPU), one call (``runs.cpp``, the same steps point by point).
    """
    module = native.usable(w)
    if module is not None:
        return module.sylvester_linear(w, r, r_tilde, slopes)
    m = w.shape[0]
    c, gamma = w.clone(), torch.zeros_like(w)
    y, scaled = torch.empty_like(w), torch.empty_like(w)
    r_diag, rt_diag = torch.diagonal(r), torch.diagonal(r_tilde)
    gain = slopes * r_diag.unsqueeze(-1)  # R_ii s_i
    denominator = gain * rt_diag.unsqueeze(-1) + 1
    rows = [t.unbind(0) for t in (c, gamma, y, scaled, slopes, gain, denominator)]
    rt_values = rt_diag.tolist()
    for hi in range(m, 0, -BLOCK):
        lo = max(0, hi - BLOCK)
        for i in range(hi - 1, lo - 1, -1):
            c_i, gamma_i, y_i, scaled_i, slope_i, gain_i, denominator_i = (t[i] for t in rows)
            torch.addcmul(c_i, gain_i, gamma_i, value=-1, out=y_i).div_(denominator_i)
            torch.add(gamma_i, y_i, alpha=rt_values[i], out=scaled_i).mul_(slope_i)
            if i > lo:
                c[lo:i].addr_(r[lo:i, i], scaled_i, alpha=-1)
                gamma[lo:i].addr_(r_tilde[lo:i, i], y_i)
        if lo > 0:
            c[:lo].addmm_(r[:lo, lo:hi], scaled[lo:hi], alpha=-1)
            gamma[:lo].addmm_(r_tilde[:lo, lo:hi], y[lo:hi])
    return y


class _InverseJacobian(torch.autograd.Function):
    """The implicit step's correction ``G(v)``: value 0, derivative ``J⁻¹`` for a shared run's Jacobian
    ``J = J_K ⋯ J_1`` at fixed coefficients (the backward applies ``J⁻ᵀ``). Its argument
    ``v = f(z*) − x`` is rounding at a root exact to rounding, so the Newton correction ``J⁻¹ v`` would
    move ``z*`` by rounding only; it is not computed. Layer ``k``: ``J_k = I + Q R D R̃ Qᵀ``
    (``D = diag h'(pre)``), so ``J_k⁻ᵀ u = u + Q (y − w)`` with ``w = Qᵀu`` and the lower-triangular
    ``(I + R̃ᵀ D Rᵀ) y = w``, upper triangular once the coordinates are taken in reverse order
    (:func:`_solve_linearised`)."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, q: Tensor, r: Tensor, r_tilde: Tensor, slopes: Tensor) -> Tensor:
        ctx.save_for_backward(q, r, r_tilde, slopes)
        return torch.zeros_like(v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple:
        q, r, r_tilde, slopes = ctx.saved_tensors
        for k in range(q.shape[0]):
            w = (grad @ q[k]).t()
            flipped = _solve_linearised(
                w.flip(0), r_tilde[k].t().flip((0, 1)), r[k].t().flip((0, 1)), slopes[k].flip(0)
            )
            grad = torch.addmm(grad, (flipped.flip(0) - w).t(), q[k].t())
        return grad, None, None, None, None


@register(
    "general_sylvester",
    options=(activation_option(), Option("hidden", int, aliases=("m",))),
    formula="z + A h(Bᵀz + b)",
    inverse="when certified (‖BᵀA‖₂ sup h' < 1), else InverseNotAvailable",
    examples=lambda dim: {"general-sylvester": {"hidden": 2}},
    guaranteed=False,
)
class GeneralSylvester(FlowLayer):
    r"""Unconstrained residual layers :math:`x = z + A\, h(B^\top z + b)`, ``A, B ∈ R^{d×m}``.

    This is the layer of Kong & Chaudhuri's theory (``m`` neurons). Log-det by Sylvester's
    determinant identity: :math:`\log|\det(I_m + \mathrm{diag}(h'(B^\top z + b))\, B^\top A)|`.

    Invertibility is *not* enforced. A layer is certified invertible when
    ``‖BᵀA‖₂ · sup h' < 1``: then ``t = Bᵀz + b`` is the unique solution of
    ``t + BᵀA h(t) = Bᵀx + b`` (a contraction perturbation of the identity), solved by Newton
    steps safeguarded with fixed-point steps, and ``z = x − A h(t)``. Otherwise ``inverse``
    raises :class:`InverseNotAvailable`. The initialisation is certified (``A`` is scaled so that
    the bound is at most ½).

    Args:
        dim: Dimension ``d``.
        hidden: Number of neurons ``m``.
        activation: Any activation of :mod:`flowprobe.activations`.
        layers: Number of layers ``K`` in the stack.
        ensemble: Ensemble shape (see :class:`~flowprobe.layers.base.FlowLayer`).

    References:
        Z. Kong, K. Chaudhuri. The Expressive Power of a Class of Normalizing Flow Models.
        AISTATS 2020. https://arxiv.org/abs/2006.00392
    """

    max_iterations = 200

    def __init__(
        self,
        dim: int,
        hidden: int = 1,
        activation: str | Activation = "tanh",
        *,
        layers: int = 1,
        ensemble: int | tuple[int, ...] = (),
    ) -> None:
        super().__init__(dim, layers, ensemble)
        if not isinstance(hidden, int) or not 1 <= hidden <= MAX_HIDDEN:
            raise ValueError(f"hidden must be an integer in [1, {MAX_HIDDEN}], got {hidden!r}")
        self.hidden = hidden
        self.act = get_activation(activation)
        self._init_parameters()

    def init_raw(self) -> dict[str, Tensor]:
        a = torch.randn(self.dim, self.hidden) * (0.5 / (self.dim * self.hidden) ** 0.5)
        b = torch.randn(self.dim, self.hidden) * (1.0 / self.dim**0.5)
        bound = float(torch.linalg.matrix_norm(b.t() @ a, ord=2)) * self.act.sup_derivative
        return {"A": a * min(1.0, 0.5 / max(bound, 1e-300)), "B": b, "b": torch.zeros(self.hidden)}

    def identity_raw(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """``A = 0``."""
        return raw | {"A": torch.zeros_like(raw["A"])}

    def constrain(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return raw

    def _log_abs_det(self, pre: Tensor, coupling: Tensor) -> Tensor:
        eye = torch.eye(self.hidden, dtype=pre.dtype, device=pre.device)
        return torch.linalg.slogdet(eye + self.act.derivative(pre).unsqueeze(-1) * coupling).logabsdet

    def transform(self, z: Tensor, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        pre = vecmat(z, p["B"]) + p["b"]
        x = z + vecmat(self.act.fn(pre), p["A"].transpose(-1, -2))
        return x, self._log_abs_det(pre, p["B"].transpose(-1, -2) @ p["A"])

    def lipschitz_bound(self, p: dict[str, Tensor] | None = None) -> Tensor:
        """``‖BᵀA‖₂ · sup h'`` per layer (run layout); a layer is certified invertible if < 1."""
        p = self.constrained() if p is None else p
        coupling = p["B"].transpose(-1, -2) @ p["A"]
        return torch.linalg.matrix_norm(coupling, ord=2) * self.act.sup_derivative

    def invert(self, x: Tensor, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        bound = self.lipschitz_bound(p).detach()
        if bool((bound >= 1).any()):
            raise InverseNotAvailable(
                f"GeneralSylvester is not certified invertible: ‖BᵀA‖₂·sup h' = {float(bound.max()):.4g} >= 1; "
                "use Sylvester (constrained) layers for guaranteed inverses"
            )
        coupling = p["B"].transpose(-1, -2) @ p["A"]  # K = BᵀA
        target = vecmat(x, p["B"]) + p["b"]
        eye = torch.eye(self.hidden, dtype=x.dtype, device=x.device)

        def residual(t: Tensor, k: Tensor, s: Tensor) -> Tensor:  # F(t) = t + K h(t) − s
            return t + vecmat(self.act.fn(t), k.transpose(-1, -2)) - s

        with torch.no_grad():
            k, s = coupling.detach(), target.detach()
            t = s.clone()
            res = residual(t, k, s)
            tol = 8 * torch.finfo(x.dtype).eps * (1 + s.norm(dim=-1))
            for _ in range(self.max_iterations):  # Newton, or the contraction step where it does better
                jac = eye + k * self.act.derivative(t).unsqueeze(-2)
                newton = t - torch.linalg.solve(jac, res.unsqueeze(-1)).squeeze(-1)
                fixed = t - res
                res_newton, res_fixed = residual(newton, k, s), residual(fixed, k, s)
                take_newton = (res_newton.norm(dim=-1) <= res_fixed.norm(dim=-1)).unsqueeze(-1)
                t = torch.where(take_newton, newton, fixed)
                res = torch.where(take_newton, res_newton, res_fixed)
                if not bool((res.norm(dim=-1) > tol).any()):
                    break
        if torch.is_grad_enabled():  # one implicit-function step (value unchanged, exact gradients)
            jac = (eye + coupling * self.act.derivative(t).unsqueeze(-2)).detach()
            t = t - torch.linalg.solve(jac, residual(t, coupling, target).unsqueeze(-1)).squeeze(-1)
        z = x - vecmat(self.act.fn(t), p["A"].transpose(-1, -2))
        return z, -self._log_abs_det(t, coupling)

    def invertibility(self, layer: int | None = None) -> Invertibility:
        margins = 1 - self.lipschitz_bound()
        return self._report(margins, layer, "‖BᵀA‖₂·sup h' < 1 (sufficient; contraction)")

    def residual_form(self, p: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return p["A"], p["B"], p["b"]

    def _settings(self) -> str:
        return f"hidden={self.hidden}, activation={self.act.name!r}"
