"""Planar layers (Rezende & Mohamed, 2015): the formula, its constraint, its inverse and the fused
run kernels (``docs/layers.md``)."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.autograd.function import once_differentiable

from flowprobe.activations import ACTIVATIONS, Activation, get_activation
from flowprobe.layers import native
from flowprobe.layers.base import FlowLayer, Invertibility, fused_kernels_allowed, inner, uses_fused_kernels
from flowprobe.layers.registry import Option, activation_option, register
from flowprobe.layers.scalar import (
    eager,
    implicit_step,
    log_slopes,
    log_slopes_grads,
    needs_grad,
    solve_scalar,
    weighted_sums,
)

__all__ = ["DEFAULT_MIN_SLOPE", "Planar", "PlanarParams", "inverse_softplus", "check_min_slope"]

DEFAULT_MIN_SLOPE = 0.05


class PlanarParams(NamedTuple):
    """Constrained planar parameters (layer axis first, batch dimensions after it)."""

    u: Tensor  # (K, ..., d), already û
    w: Tensor  # (K, ..., d)
    b: Tensor  # (K, ...)
    wu: Tensor  # (K, ...), α = wᵀû


def inverse_softplus(y: Tensor) -> Tensor:
    """``softplus⁻¹(y) = log(expm1(y))`` for ``y > 0``, stable for large ``y``."""
    return torch.where(y > 20, y + torch.log(-torch.expm1(-y)), torch.log(torch.expm1(y.clamp_max(20))))


def check_min_slope(min_slope: float) -> float:
    """``min_slope`` as a float in ``(0, 1]``, else a ``ValueError``."""
    if not 0 < min_slope <= 1:
        raise ValueError(f"min_slope must lie in (0, 1], got {min_slope}")
    return float(min_slope)


@register(
    "planar",
    options=(activation_option(), Option("min_slope", float), Option("u_max", float, aliases=("umax",))),
    formula="z + û h(wᵀz + b)",
    inverse="bracketed Newton on a scalar monotone equation; closed form for relu / leaky_relu",
    examples=lambda dim: {f"planar-{a}": {"activation": a} for a in ACTIVATIONS}
    | {"planar-bounded-arctan": {"activation": "arctan", "u_max": 0.5}},
)
class Planar(FlowLayer):
    r"""Planar layers :math:`x = z + \hat u\, h(w^\top z + b)`.

    Log-det: :math:`\log(1 + \alpha\, h'(w^\top z + b))` with :math:`\alpha = w^\top \hat u`.

    Constraint: :math:`\alpha \ge -(1-\varepsilon)/\sup h'` for any raw ``(u, w, b)``, via
    Rezende & Mohamed's reparametrisation generalised to any bound,
    :math:`\hat u = u + (m(w^\top u) - w^\top u)\,w/\lVert w\rVert^2`,
    :math:`m(s) = (\mathrm{softplus}(s) - 1 + \varepsilon)/\sup h'` (``ε = 0``, ``sup h' = 1`` is
    exactly the official SNF code). Every point then has slope ``1 + α h' ≥ ε = min_slope`` along
    ``w``, which also bounds the inverse's condition number. ``α`` is the computed ``wᵀû``, held at
    the bound where rounding (raw values of order 1e3 in float32) would cross it, so the constraint
    holds in the arithmetic the log-det and the inverse use.

    Bounded layers (``u_max = U``): ``û`` is then shrunk radially, ``û ← û·U tanh(‖û‖/U)/‖û‖``, so
    ``‖û‖ ≤ U`` for any raw value (a reparametrisation, not clipping: smooth, and ``wᵀû`` only shrinks
    towards 0, so the slope bound still holds). With a bounded activation (``|h| ≤ H``: tanh,
    sigmoid, arctan) every layer moves every point by less than ``U·H`` — the class of Kong &
    Chaudhuri's depth lower bound (``docs/theory/depth.md``).

    Inverse: project on ``w``; ``s = wᵀz + b`` solves the scalar monotone equation
    ``s + α h(s) = wᵀx + b`` (the activation's fixed-budget Newton with one check per run, else
    bracketed Newton; closed form for relu / leaky_relu / identity); then ``z = x − û h(s)``.

    Args:
        dim: Dimension.
        activation: ``tanh``, ``sigmoid``, ``arctan``, ``softplus``, ``elu``, ``relu``,
            ``leaky_relu``, ``identity`` or an :class:`~flowprobe.activations.Activation`.
        min_slope: ``ε`` in ``(0, 1]``; the smallest slope any point may see.
        u_max: Optional bound ``U`` on ``‖û‖`` (default: unbounded).
        layers: Number of layers ``K`` in the stack.
        ensemble: Ensemble shape (see :class:`~flowprobe.layers.base.FlowLayer`).

    References:
        D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
        https://arxiv.org/abs/1505.05770
    """

    def __init__(
        self,
        dim: int,
        activation: str | Activation = "tanh",
        min_slope: float = DEFAULT_MIN_SLOPE,
        u_max: float | None = None,
        *,
        layers: int = 1,
        ensemble: int | tuple[int, ...] = (),
    ) -> None:
        super().__init__(dim, layers, ensemble)
        self.act = get_activation(activation)
        self.min_slope = check_min_slope(min_slope)
        if u_max is not None and not (isinstance(u_max, float | int) and 0 < u_max < math.inf):
            raise ValueError(f"u_max must be a positive number, got {u_max!r}")
        self.u_max = None if u_max is None else float(u_max)
        self._init_parameters()

    def init_raw(self) -> dict[str, Tensor]:
        scale = self.dim**-0.5
        return {"u": torch.randn(self.dim) * scale, "w": torch.randn(self.dim) * scale, "b": torch.zeros(())}

    def identity_raw(self, raw: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """``û = 0``: ``u ∥ w`` with ``wᵀu = m⁻¹(0) = softplus⁻¹(1 − ε)`` (none for ``ε = 1``, where ``α > 0``)."""
        if self.min_slope == 1:
            return None
        w = raw["w"]
        target = inverse_softplus(w.new_tensor(1 - self.min_slope))
        return raw | {"u": (target / inner(w, w).clamp_min(torch.finfo(w.dtype).tiny)).unsqueeze(-1) * w}

    @property
    def _alpha_floor(self) -> float:
        return (self.min_slope - 1) / self.act.sup_derivative

    def constrain(self, raw: dict[str, Tensor]) -> PlanarParams:
        u, w, b = raw["u"], raw["w"], raw["b"]
        wu = inner(w, u)
        w_sq = inner(w, w).clamp_min(torch.finfo(w.dtype).tiny)
        target = (F.softplus(wu) - 1 + self.min_slope) / self.act.sup_derivative
        # û = u⊥ + m(wᵀu) w/‖w‖², written so that no large terms cancel (w = 0 gives û = u, α = 0).
        u_hat = u - (wu / w_sq).unsqueeze(-1) * w + (target / w_sq).unsqueeze(-1) * w
        if self.u_max is not None:
            u_hat = u_hat * _squash(u_hat.norm(dim=-1, keepdim=True), self.u_max)
        alpha = inner(w, u_hat).clamp_min(self._alpha_floor)
        return PlanarParams(u_hat, w, b, alpha)

    def transform(self, z: Tensor, p: PlanarParams) -> tuple[Tensor, Tensor]:
        pre = inner(z, p.w) + p.b
        x = z + p.u * self.act.fn(pre).unsqueeze(-1)
        return x, torch.log1p(p.wu * self.act.derivative(pre))

    def invert(self, x: Tensor, p: PlanarParams) -> tuple[Tensor, Tensor]:
        pre = solve_scalar(inner(x, p.w) + p.b, p.wu, torch.ones_like(p.wu), torch.zeros_like(p.b), self.act)
        z = x - p.u * self.act.fn(pre).unsqueeze(-1)
        return z, -torch.log1p(p.wu * self.act.derivative(pre))

    def forward_run(self, z: Tensor, p: PlanarParams) -> tuple[Tensor, Tensor]:
        if not uses_fused_kernels(z, p.u.dim() == 2):
            members = _members(z, p)
            if (members or _per_point(z, p)) and needs_grad(z, p) and fused_kernels_allowed():
                module = self._compiled_kernels(z)
                if module is not None:  # members: (K, E, 1, d) read as (K, E, d); per point: each in its lane
                    return native.NativeRun.apply("planar", module, self.act.native, z, *p)
                if members:
                    return _PlanarMembersRun.apply(z, *(t.squeeze(2) for t in p), self.act)
            return super().forward_run(z, p)
        if not needs_grad(z, p):
            return _forward_eval(z, p, self.act)
        module = self._compiled_kernels(z)
        if module is not None:
            return native.NativeRun.apply("planar", module, self.act.native, z, *p)
        return _PlanarRun.apply(z, p.u, p.w, p.b, p.wu, self.act)

    def _compiled_kernels(self, z: Tensor) -> ModuleType | None:
        """The compiled run kernels for a run on ``z`` with this activation, if built and usable."""
        return native.usable(z) if self.act.native is not None else None

    def inverse_run(self, x: Tensor, p: PlanarParams) -> tuple[Tensor, Tensor]:
        if uses_fused_kernels(x, p.u.dim() == 2) or (_members(x, p) and fused_kernels_allowed()):
            if needs_grad(x, p):
                return _PlanarInverseRun.apply(x, p.u, p.w, p.b, p.wu, self.act)
            z, roots = _roots(x, p, self.act)
            return z, -log_slopes(roots, p.wu, self.act)
        if torch.compiler.is_compiling() and self.act.newton is not None and p.u.dim() == 2 and x.dim() == 2:
            return _inverse_traced(x, p, self.act)
        return super().inverse_run(x, p)

    @torch.no_grad()
    def set_constrained(self, u: Tensor, w: Tensor, b: Tensor | float, *, layer: int | None = None) -> None:
        """Set raw parameters so that layer ``layer`` has exactly ``(û = u, w, b)``.

        Raises:
            ValueError: ``wᵀu`` violates the layer's bound ``−(1−ε)/sup h'``.
        """
        index = self._layer_index(layer)
        anchor = self.u
        u = torch.as_tensor(u, dtype=anchor.dtype, device=anchor.device)
        w = torch.as_tensor(w, dtype=anchor.dtype, device=anchor.device)
        if self.u_max is not None:  # undo the radial squash: ‖û‖ = U tanh(n/U) ⇒ n = U atanh(‖û‖/U)
            norm = float(u.norm())
            if not norm < self.u_max:
                raise ValueError(f"planar layer needs ‖u‖ < u_max = {self.u_max:g}, got {norm:g}")
            u = u * (self.u_max * math.atanh(norm / self.u_max) / norm) if norm > 0 else u
        wu = inner(w, u)
        softplus_value = wu * self.act.sup_derivative + 1 - self.min_slope
        if bool(softplus_value <= 0):
            raise ValueError(f"planar layer needs wᵀu > {self._alpha_floor:g}, got {float(wu):g}")
        raw_wu = inverse_softplus(softplus_value)
        w_sq = inner(w, w).clamp_min(torch.finfo(w.dtype).tiny)
        self._write("u", index, u + ((raw_wu - wu) / w_sq) * w)
        self._write("w", index, w)
        self._write("b", index, torch.as_tensor(b, dtype=anchor.dtype, device=anchor.device))

    def invertibility(self, layer: int | None = None) -> Invertibility:
        margins = torch.clamp(1 + self.constrained().wu * self.act.sup_derivative, max=1.0)
        return self._report(margins, layer, f"1 + wᵀû·sup h' > 0 (sup h' = {self.act.sup_derivative:g})")

    def stream_width(self) -> int:
        return 2 * self.depth  # pre-activations and last Newton steps

    def residual_form(self, p: PlanarParams) -> tuple[Tensor, Tensor, Tensor]:
        return p.u.unsqueeze(-1), p.w.unsqueeze(-1), p.b.unsqueeze(-1)

    def _settings(self) -> str:
        bound = "" if self.u_max is None else f", u_max={self.u_max:g}"
        return f"activation={self.act.name!r}, min_slope={self.min_slope:g}{bound}"

    @property
    def displacement(self) -> float:
        """``sup_z ‖f(z) − z‖`` per layer: ``u_max · sup|h|`` (``inf`` unless both are bounded)."""
        return math.inf if self.u_max is None else self.u_max * self.act.bound


def _squash(norm: Tensor, bound: float) -> Tensor:
    """The factor ``U tanh(n/U)/n`` (1 at ``n = 0``) that maps a vector of norm ``n`` to norm ``< U``."""
    ratio = norm / bound
    return torch.where(ratio > 1e-4, torch.tanh(ratio) / ratio.clamp_min(1e-4), 1 - ratio * ratio / 3)


# -- fused kernels for runs with shared parameters: u, w (K, d), b, α (K,), points (N, d) ----------
def _forward_eval(z: Tensor, p: PlanarParams, act: Activation) -> tuple[Tensor, Tensor]:
    """The run without autograd: updates one buffer in place, keeps only the pre-activations."""
    x = z.clone()
    pre = z.new_empty(p.u.shape[0], z.shape[0])
    for i, (u, w, b) in enumerate(zip(p.u.unbind(0), p.w.unbind(0), p.b.unbind(0), strict=True)):
        torch.addmv(b, x, w, out=pre[i])
        x.addr_(act.fn(pre[i]), u)
    return x, log_slopes(pre, p.wu, act)


class _PlanarRun(torch.autograd.Function):
    """``K`` planar layers ``x ← x + û_k h(w_kᵀx + b_k)`` with an analytic backward.

    Backward (``g`` = ∂L/∂x after layer ``k``, ``ℓ`` = ∂L/∂logdet, ``s_k = h'(pre_k)``):
    ``∂L/∂pre_k = s_k (gᵀû_k) + ℓ ∂/∂pre log(1 + wᵀû h'(pre))``, then ``g ← g + (∂L/∂pre_k) w_k``;
    ``∂L/∂û_k = Σ_n h(pre_k) g``, ``∂L/∂w_k = Σ_n (∂L/∂pre_k) x_k``, ``∂L/∂b_k = Σ_n ∂L/∂pre_k``.
    The forward keeps each layer's input and pre-activation only.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, u: Tensor, w: Tensor, b: Tensor, wu: Tensor, act: Activation) -> Any:
        k, (n, d) = u.shape[0], z.shape
        inputs = z.new_empty(k, n, d)
        inputs[0] = z
        pre = z.new_empty(k, n)
        us, ws, bs = u.unbind(0), w.unbind(0), b.unbind(0)
        points, pres = inputs.unbind(0), pre.unbind(0)
        for i in range(k):
            torch.addmv(bs[i], points[i], ws[i], out=pres[i])
            x = torch.addr(points[i], act.fn(pres[i]), us[i], out=points[i + 1] if i + 1 < k else None)
        ctx.save_for_backward(inputs, pre, u, w, wu)
        ctx.act = act
        return x, log_slopes(pre, wu, act)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_x: Tensor, grad_logdet: Tensor) -> tuple:
        inputs, pre, u, w, wu = ctx.saved_tensors
        slope, d_pre, grad_wu = log_slopes_grads(pre, wu, grad_logdet, ctx.act)
        hidden = ctx.act.fn(pre)
        grad_u = torch.empty_like(u)
        us, ws = u.unbind(0), w.unbind(0)
        g = grad_x  # ∂L/∂(output of layer i); no (K, N, d) buffer, so the peak stays at the saved tensors
        for i in range(u.shape[0] - 1, -1, -1):
            d_pre_i = d_pre[i].addcmul_(slope[i], torch.mv(g, us[i]))  # ∂L/∂pre_i, in place
            torch.mv(g.t(), hidden[i], out=grad_u[i])
            g = torch.addr(g, d_pre_i, ws[i])
        return g, grad_u, weighted_sums(d_pre, inputs), d_pre.sum(1), grad_wu, None


# -- the forward kernel of an ensemble's runs: u, w (K, E, d), b, α (K, E), points (E, N, d) ---------
def _members(z: Tensor, p: PlanarParams) -> bool:
    """Whether ``p`` (run layout) holds one parameter set per member of an ensemble of points ``z``
    ``(E, N, d)``: ``û, w`` ``(K, E, 1, d)``, ``b, α`` ``(K, E, 1)``."""
    if z.dim() != 3:
        return False
    members = (p.u.shape[0], z.shape[0], 1)
    return p.u.shape == p.w.shape == (*members, z.shape[-1]) and p.b.shape == p.wu.shape == members


def _per_point(z: Tensor, p: PlanarParams) -> bool:
    """Whether ``p`` (run layout) holds one parameter set per point of ``z`` ``(N, d)`` (an amortised
    flow, e.g. a VAE's posterior): ``û, w`` ``(K, N, d)``, ``b, α`` ``(K, N)``."""
    if z.dim() != 2:
        return False
    points = (p.u.shape[0], z.shape[0])
    return p.u.shape == p.w.shape == (*points, z.shape[-1]) and p.b.shape == p.wu.shape == points


class _PlanarMembersRun(torch.autograd.Function):
    """:class:`_PlanarRun` for the ``E`` members of an ensemble at once, same formulas member by member.

    Points are kept as ``(E, d, N)`` (points innermost, so that every op runs along ``N`` whatever ``d``),
    and each layer is three batched ops over the members forward (``pre = b + wᵀx``, ``h(pre)``,
    ``x ← x + û h(pre)``) and four backward, whatever ``E``.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, u: Tensor, w: Tensor, b: Tensor, wu: Tensor, act: Activation) -> Any:
        k, (e, n, d) = u.shape[0], z.shape
        inputs = z.new_empty(k, e, d, n)
        inputs[0] = z.transpose(1, 2)
        pre = z.new_empty(k, e, 1, n)
        points = inputs.unbind(0)
        for i in range(k):
            torch.baddbmm(b[i].view(e, 1, 1), w[i].unsqueeze(1), points[i], out=pre[i])
            x = torch.addcmul(points[i], u[i].unsqueeze(-1), act.fn(pre[i]), out=points[i + 1] if i + 1 < k else None)
        pre = pre.squeeze(2)
        ctx.save_for_backward(inputs, pre, u, w, wu)
        ctx.act = act
        return x.transpose(1, 2), log_slopes(pre, wu, act)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_x: Tensor, grad_logdet: Tensor) -> tuple:
        inputs, pre, u, w, wu = ctx.saved_tensors
        k, e, d, n = inputs.shape
        slope, d_pre, grad_wu = (t.view(k, e, *t.shape[1:]) for t in log_slopes_grads(
            pre.flatten(0, 1), wu.flatten(), grad_logdet.expand(k, e, n).flatten(0, 1), ctx.act))
        hidden = ctx.act.fn(pre)
        grad_u = u.new_empty(u.shape)
        g = grad_x.transpose(1, 2)  # ∂L/∂(output of layer i), (E, d, N)
        for i in range(k - 1, -1, -1):
            d_pre_i = d_pre[i].addcmul_(slope[i], torch.bmm(u[i].unsqueeze(1), g).squeeze(1))
            torch.bmm(g, hidden[i].unsqueeze(-1), out=grad_u[i].unsqueeze(-1))
            g = torch.addcmul(g, w[i].unsqueeze(-1), d_pre_i.unsqueeze(1))
        grad_w = torch.bmm(inputs.flatten(0, 1), d_pre.flatten(0, 1).unsqueeze(-1)).view(k, e, d)
        return g.transpose(1, 2), grad_u, grad_w, d_pre.sum(-1), grad_wu, None


# One layer's products in the two layouts of a run: points (N, d) with vectors (d,), or an ensemble's
# points (E, N, d) with vectors (E, 1, d); per-point scalars (N,) or (E, N).
def _affine(z: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``c = wᵀz + b`` per point (``b`` ``()`` or ``(E, 1)``)."""
    if z.dim() == 2:
        return torch.addmv(b, z, w)
    return torch.baddbmm(b.unsqueeze(-1), z, w.transpose(-1, -2)).squeeze(-1)


def _project(z: Tensor, w: Tensor) -> Tensor:
    """``wᵀz`` per point."""
    return torch.mv(z, w) if z.dim() == 2 else torch.bmm(z, w.transpose(-1, -2)).squeeze(-1)


def _add_outer(z: Tensor, scalars: Tensor, u: Tensor, sign: int, out: Tensor | None = None) -> Tensor:
    """``z ± s û`` per point, into ``out`` if given."""
    if z.dim() == 2:
        return torch.addr(z, scalars, u, alpha=sign, out=out)
    return torch.addcmul(z, scalars.unsqueeze(-1), u, value=sign, out=out)


def _weigh(scalars: Tensor, z: Tensor, out: Tensor) -> Tensor:
    """``Σ_n s_n z_n`` into ``out`` (``(d,)`` or ``(E, 1, d)``)."""
    if z.dim() == 2:
        return torch.mv(z.t(), scalars, out=out)
    return torch.bmm(scalars.unsqueeze(1), z, out=out)


def _roots(x: Tensor, p: PlanarParams, act: Activation, inputs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Invert the run without autograd; returns ``z`` and the pre-activations ``(K, N)`` — or, for the
    ``E`` members of an ensemble (:func:`_members`), ``(K, E, N)``.

    With ``inputs`` ``(K, *x.shape)`` given, the point entering the inverse of layer ``k`` (the output
    of layer ``k``) is written into ``inputs[k]``.

    With a fixed-budget Newton kernel (tanh), each layer takes the budget its ``α`` needs (the largest
    of its members'; no synchronisation inside the run) and one convergence check covers the whole
    run; otherwise, or when the check fails, the run is redone with the safeguarded solver.
    """
    k, members = p.u.shape[0], x.dim() == 3
    pre = x.new_empty(k, *x.shape[:-1])
    us, ws, bs = p.u.unbind(0), p.w.unbind(0), p.b.unbind(0)
    outs: list[Tensor | None] = [None] * k
    if inputs is not None:
        inputs[-1] = x
        outs = [None, *inputs.unbind(0)[:-1]]  # layer k's inverse writes layer k − 1's input
    kernel = act.newton
    if kernel is not None:
        values = p.wu.flatten(1).tolist() if members else [[a] for a in p.wu.tolist()]
        alphas = p.wu.unbind(0) if members else [a for (a,) in values]
        last = torch.empty_like(pre)
        one_plus, roots, lasts = (1 + p.wu).unbind(0), pre.unbind(0), last.unbind(0)
        z = x
        for i in range(k - 1, -1, -1):
            steps = max(kernel.budget(a, x.dtype) for a in values[i])
            kernel.solve(_affine(z, ws[i], bs[i]), alphas[i], one_plus[i], steps, roots[i], lasts[i])
            z = _add_outer(z, act.fn(roots[i]), us[i], -1, outs[i])
        if bool(kernel.converged(p.wu if members else p.wu.unsqueeze(-1), last, pre)):
            return z, pre
    z = x
    one, zero = x.new_ones(()), x.new_zeros(())
    for i in range(k - 1, -1, -1):
        pre[i] = solve_scalar(_affine(z, ws[i], bs[i]), p.wu[i], one, zero, act)
        z = _add_outer(z, act.fn(pre[i]), us[i], -1, outs[i])
    return z, pre


class _PlanarInverseRun(torch.autograd.Function):
    """Inverse of ``K`` planar layers with an analytic backward (implicit-function gradients): a shared run
    (points ``(N, d)``, ``û, w`` ``(K, d)``, ``b, α`` ``(K,)``) or the ``E`` members of an ensemble at once
    (points ``(E, N, d)``, ``û, w`` ``(K, E, 1, d)``, ``b, α`` ``(K, E, 1)``), the same formulas.

    Layer ``k`` inverted at ``y``: ``c = wᵀy + b``, ``s + α h(s) = c`` (``α = wᵀû``),
    ``z = y − û h(s)``, ``ℓ = −log(1 + α h'(s))``. With ``D = 1 + α h'(s)``, ``g`` = ∂L/∂z and
    ``λ`` = ∂L/∂logdet: ``∂L/∂c = (−h'(s) gᵀû + λ ∂ℓ/∂s)/D``, ``∂L/∂y = g + (∂L/∂c) w``,
    ``∂L/∂û = −Σ_n h(s) g``, ``∂L/∂w = Σ_n (∂L/∂c) y``, ``∂L/∂b = Σ_n ∂L/∂c``,
    ``∂L/∂α = Σ_n (−h(s) ∂L/∂c + λ ∂ℓ/∂α)`` (``ds/dc = 1/D``, ``ds/dα = −h(s)/D``).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, u: Tensor, w: Tensor, b: Tensor, wu: Tensor, act: Activation) -> Any:
        inputs = x.new_empty(u.shape[0], *x.shape)
        z, roots = _roots(x, PlanarParams(u, w, b, wu), act, inputs)
        ctx.save_for_backward(inputs, roots, u, w, wu)
        ctx.act = act
        return z, -log_slopes(roots, wu, act)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor, grad_logdet: Tensor) -> tuple:
        inputs, roots, u, w, wu = ctx.saved_tensors
        n, d = inputs.shape[-2:]
        slope, d_c, grad_wu = log_slopes_grads(  # ℓ = −log D; layers (and members) as rows
            roots.reshape(-1, n), wu.reshape(-1), grad_logdet.neg().expand(roots.shape).reshape(-1, n), ctx.act)
        slope, d_c = slope.view(roots.shape), d_c.view(roots.shape)
        factor = (slope * wu.view(*roots.shape[:-1], 1)).add_(1).reciprocal_()  # 1/D for now
        d_c.mul_(factor)  # ∂L/∂c = d_c + factor gᵀû, completed in place below
        factor.mul_(slope).neg_()
        minus_hidden = -ctx.act.fn(roots)
        grad_u = torch.empty_like(u)
        g = grad_z
        for i in range(u.shape[0]):
            d_c_i = d_c[i].addcmul_(factor[i], _project(g, u[i]))
            _weigh(minus_hidden[i], g, grad_u[i])
            g = _add_outer(g, d_c_i, w[i], 1)
        rows = d_c.reshape(-1, n)
        grad_w = weighted_sums(rows, inputs.reshape(-1, n, d)).view_as(w)
        grad_wu = grad_wu.view_as(wu) + weighted_sums(rows, minus_hidden.reshape(-1, n, 1)).view_as(wu)
        return g, grad_u, grad_w, d_c.sum(-1).view_as(wu), grad_wu, None


@eager
def _inverse_eager(x: Tensor, p: PlanarParams, act: Activation) -> tuple[Tensor, Tensor]:
    """The eager inverse of a shared run (the traced inverse's fallback)."""
    if needs_grad(x, p):
        return _PlanarInverseRun.apply(x, p.u, p.w, p.b, p.wu, act)
    z, roots = _roots(x, p, act)
    return z, -log_slopes(roots, p.wu, act)


@eager
def _converged_eager(converged: Tensor) -> bool:
    return bool(converged)


def _inverse_traced(x: Tensor, p: PlanarParams, act: Activation) -> tuple[Tensor, Tensor]:
    """Inverse of a shared run for ``torch.compile``: one traceable graph, one host check.

    Every layer runs the activation's fixed-budget Newton with ``α`` left on the device and so the
    widest budget, then, with autograd, one :func:`~flowprobe.layers.scalar.implicit_step` (its
    value is the root, its gradients those of the implicit function theorem). The run's
    convergence check is its one synchronisation (a graph break); if it fails, the run is redone
    eagerly (fixed budgets per layer, then the safeguarded solver).
    """
    kernel = act.newton
    steps = kernel.widest_budget(x.dtype)  # type: ignore[union-attr]
    grad = needs_grad(x, p)
    one, zero = x.new_ones(()), x.new_zeros(())
    z, logdet, converged = x, x.new_zeros(x.shape[0]), x.new_ones((), dtype=torch.bool)
    for i in range(p.u.shape[0] - 1, -1, -1):
        c = torch.addmv(p.b[i], z, p.w[i])  # s + α h(s) = c = wᵀz + b, s = pre-activation
        with torch.no_grad():
            root, last = kernel.solve(c, p.wu[i], 1 + p.wu[i], steps)  # type: ignore[union-attr]
            converged = converged & kernel.converged(p.wu[i].detach(), last, root)  # type: ignore[union-attr]
        if grad:
            root = implicit_step(root, c, p.wu[i], one, zero, act)
        z = z - act.fn(root).unsqueeze(-1) * p.u[i]
        logdet = logdet - torch.log1p(p.wu[i] * act.derivative(root))
    if not _converged_eager(converged):
        return _inverse_eager(x, p, act)
    return z, logdet
