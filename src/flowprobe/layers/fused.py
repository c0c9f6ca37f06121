"""Fused execution of runs of consecutive same-family layers.

For residual layers the arithmetic of a training step is tiny (a 32-layer planar flow in ``d = 2``
at batch 256 is about a megaflop); the time goes to per-op and autograd overhead and to the
optimiser walking one tensor per parameter per layer. A :class:`~flowprobe.Flow` therefore groups
every run of at least two consecutive layers of one family and configuration into a
:class:`LayerStack` that owns the run's raw parameters stacked along a leading layer axis (the
``u`` of ``K`` planar layers is one ``(K, d)`` parameter, so Adam walks 3 tensors, not ``3K``).
Every layer keeps working on its own — ``flow.layers[i](z)``, ``inverse``, ``set_constrained``,
``invertibility`` — and reads views ``stack.u[i]`` of the stacked parameters; the flow's
``state_dict`` keeps the per-layer keys ``layers.{i}.u`` (see :func:`state_dict_hook`).

On the stacked parameters, a run is evaluated with:

* the reparametrisations (``û``, tanh-bounded diagonals, ``Q`` bases) of all ``K`` layers in one
  batched call of the layer's own ``constrain``;
* **planar**: one autograd Function for the whole run with an analytic backward (the forward keeps
  only each layer's input and pre-activation; three ops per layer each way), and an inverse whose
  Newton iterations run with a fixed budget per layer (set by ``α = wᵀû``, no synchronisation
  inside the run) and a single convergence check for the whole run (falling back to the layer's
  safeguarded solver when the check fails); with autograd the inverse run is one Function too, its
  backward the implicit-function gradients in five ops per layer;
* **radial**: one autograd Function for the whole run with an analytic backward (the forward keeps
  each layer's ``z − z0`` and radius; five ops and two passes over the points per layer each way,
  everything else batched over the run); the inverse in closed form carrying only ``x − z0``, with
  autograd plus one implicit-function step through the forward Function (:func:`_radial_inverse`);
* **Householder**: the product of all reflections of the run as one ``d × d`` matrix (built for
  the ``K`` layers at once), applied with one matrix product; the inverse uses its transpose;
* **Sylvester**: the products ``QR`` and ``QR̃ᵀ`` precomputed for the run, two matrix products
  per layer, log-determinants of the whole run in one batched expression;
  the inverse of a tanh run without autograd is one back-substitution per layer with fixed Newton
  budgets per column and one convergence check for the run (:func:`_sylvester_tanh_inverse`);
* other families (general Sylvester) and other Sylvester inverses: the batched
  reparametrisation, then the layer's own ``transform`` / ``invert`` per layer.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) the planar and radial runs are traced as
plain differentiable ops (the batched reparametrisation, then the layer's own ``transform`` per
layer), so that the compiler fuses the elementwise chains and derives the backward itself; a
planar-tanh inverse run becomes :func:`_planar_tanh_inverse_traced` (device-side ``α``, the largest
Newton budget, one convergence check per run, the eager run as its fallback); iterations that stop
on a host check (``solve_scalar``) run eagerly. ``tests/test_compile.py`` checks compiled against
eager.

Every fused path evaluates the same formulas as the layers; ``tests/test_fused.py`` checks values,
log-dets and gradients against the layer-by-layer path to ``1e-12`` in float64. Amortised
(per-point) parameters, ``torch.func`` transforms and ``set_fusion(False)`` use the layer-by-layer
path. The analytic backwards are once-differentiable (no double backward through a fused planar or
radial run: switch fusion off for Hessian-vector products).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from flowprobe.activations import Activation
from flowprobe.layers.base import FlowLayer
from flowprobe.layers.householder import Householder, reflect
from flowprobe.layers.planar import Planar, PlanarParams
from flowprobe.layers.radial import Radial, RadialParams, source_radius
from flowprobe.layers.scalar import (
    implicit_step,
    newton_budget,
    newton_converged,
    solve_scalar,
    tanh_newton,
    widest_budget,
)
from flowprobe.layers.sylvester import GeneralSylvester, Sylvester, SylvesterParams

__all__ = [
    "LayerStack",
    "forward_layers",
    "fuse",
    "fusion",
    "fusion_enabled",
    "inverse_layers",
    "load_state_dict_pre_hook",
    "set_fusion",
    "state_dict_hook",
]

FUSABLE = (Planar, Radial, Sylvester, GeneralSylvester, Householder)
PER_LAYER_ATTRIBUTES = ("flip",)  # configuration that may differ inside a run (triangular Sylvester)

_ENABLED = True


def set_fusion(enabled: bool) -> None:
    """Switch fused evaluation of same-family runs on or off globally (on by default)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def fusion_enabled() -> bool:
    """Whether runs of same-family layers are evaluated fused."""
    return _ENABLED


@contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Context manager that switches fusion on or off for a block."""
    previous = _ENABLED
    set_fusion(enabled)
    try:
        yield
    finally:
        set_fusion(previous)


# -- grouping layers into stacks ----------------------------------------------------------------
def _config(layer: FlowLayer) -> tuple[type, dict[str, Any], tuple]:
    """What must agree for two layers to share a stack: type, settings, parameter shapes."""
    settings = {
        k: v
        for k, v in vars(layer).items()
        if not k.startswith("_") and k != "training" and k not in PER_LAYER_ATTRIBUTES
    }
    params = tuple((n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in layer._parameters.items())
    return type(layer), settings, params


def _fusable(layer: nn.Module) -> bool:
    return type(layer) in FUSABLE and "_fused_slot" not in layer.__dict__ and len(layer._parameters) > 0


class LayerStack(nn.Module):
    """The stacked raw parameters of a run of ``K`` layers of one family and configuration.

    Each parameter has the layer's shape with a leading axis of length ``K``. The layers are bound
    to the stack: they drop their own parameters and read views (``layer.u`` is ``stack.u[i]``).

    Args:
        layers: At least two layers with equal :func:`_config`, none of them bound yet.
    """

    def __init__(self, layers: Sequence[FlowLayer]) -> None:
        super().__init__()
        template = layers[0]
        for name in list(template._parameters):
            values = torch.stack([layer._parameters[name].detach() for layer in layers])
            self.register_parameter(name, nn.Parameter(values, requires_grad=template._parameters[name].requires_grad))
        object.__setattr__(self, "template", template)  # the formulas; not a submodule
        self.size = len(layers)
        self.flips = [bool(getattr(layer, "flip", False)) for layer in layers]
        for index, layer in enumerate(layers):
            for name in list(layer._parameters):
                del layer._parameters[name]
            object.__setattr__(layer, "_fused_slot", (self, index))

    def raw(self, start: int, stop: int) -> dict[str, Tensor]:
        """Raw parameters of slots ``start:stop`` (views), batched along the layer axis."""
        return {name: p[start:stop] for name, p in self._parameters.items()}

    def extra_repr(self) -> str:
        return f"{type(self.template).__name__} x {self.size}"


def fuse(layers: Sequence[FlowLayer]) -> list[LayerStack]:
    """Bind every run of ≥ 2 consecutive unbound same-configuration layers to a new stack.

    Returns:
        Every stack the layers are bound to afterwards (new ones and ones bound before), in order.
    """
    layers = list(layers)
    i = 0
    while i < len(layers):
        j = i + 1
        if _fusable(layers[i]):
            key = _config(layers[i])
            while j < len(layers) and _fusable(layers[j]) and _config(layers[j]) == key:
                j += 1
            if j - i >= 2:
                LayerStack(layers[i:j])
        i = j
    stacks: list[LayerStack] = []
    for layer in layers:
        slot = layer.__dict__.get("_fused_slot")
        if slot is not None and all(slot[0] is not s for s in stacks):
            stacks.append(slot[0])
    return stacks


Segment = FlowLayer | tuple[LayerStack, int, int]


def segments(layers: Sequence[FlowLayer]) -> list[Segment]:
    """Split a layer sequence into single layers and runs ``(stack, start, stop)`` of consecutive slots."""
    out: list[Segment] = []
    for layer in layers:
        slot = layer.__dict__.get("_fused_slot")
        last = out[-1] if out else None
        if slot is not None and isinstance(last, tuple) and last[0] is slot[0] and last[2] == slot[1]:
            out[-1] = (slot[0], last[1], slot[1] + 1)
        elif slot is not None:
            out.append((slot[0], slot[1], slot[1] + 1))
        else:
            out.append(layer)
    return out


def _slice(params: Any, i: int) -> Any:
    """Layer ``i`` of batched constrained parameters (NamedTuple, dict or tensor)."""
    if isinstance(params, Tensor):
        return params[i]
    if isinstance(params, dict):
        return {k: v[i] for k, v in params.items()}
    return type(params)(*(v[i] for v in params))


# -- planar --------------------------------------------------------------------------------------
class _PlanarRun(torch.autograd.Function):
    """``K`` planar layers ``x ← x + û_k h(w_kᵀx + b_k)`` with an analytic backward.

    Backward (``g`` = ∂L/∂x after layer ``k``, ``ℓ`` = ∂L/∂logdet, ``s_k = h'(pre_k)``):
    ``∂L/∂pre_k = s_k (gᵀû_k) + ℓ ∂/∂pre log(1 + wᵀû h'(pre))``, then ``g ← g + (∂L/∂pre_k) w_k``;
    ``∂L/∂û_k = Σ_n h(pre_k) g``, ``∂L/∂w_k = Σ_n (∂L/∂pre_k) x_k``, ``∂L/∂b_k = Σ_n ∂L/∂pre_k``.
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
        return x, _planar_logdet(pre, wu, act)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_x: Tensor, grad_logdet: Tensor) -> tuple:
        inputs, pre, u, w, wu = ctx.saved_tensors
        slope, d_pre, grad_wu = _logdet_grads(pre, wu, grad_logdet, ctx.act)
        hidden = ctx.act.fn(pre)
        grad_u = torch.empty_like(u)
        us, ws = u.unbind(0), w.unbind(0)
        g = grad_x  # ∂L/∂(output of layer i); no (K, N, d) buffer, so the peak stays at the saved tensors
        for i in range(u.shape[0] - 1, -1, -1):
            d_pre_i = d_pre[i].addcmul_(slope[i], torch.mv(g, us[i]))  # ∂L/∂pre_i, in place
            torch.mv(g.t(), hidden[i], out=grad_u[i])
            g = torch.addr(g, d_pre_i, ws[i])
        return g, grad_u, _weighted_sums(d_pre, inputs), d_pre.sum(1), grad_wu, None


def _weighted_sums(weights: Tensor, points: Tensor) -> Tensor:
    """``Σ_n weights[k, n] points[k, n]`` for every layer ``k``: ``(K, N)``, ``(K, N, d)`` → ``(K, d)``."""
    return torch.bmm(weights.unsqueeze(1), points).squeeze(1)


def _logdet_grads(pre: Tensor, wu: Tensor, grad_logdet: Tensor, act: Activation) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces of the gradient of ``Σ_k λ log D_k``, ``D_k = 1 + α_k h'(pre_k)``, ``λ = grad_logdet``.

    Returns:
        ``h'(pre)`` and ``∂/∂pre = λ α h''(pre)/D``, each ``(K, N)``, and ``∂/∂α = Σ_n λ h'(pre)/D``,
        ``(K,)``; no other ``(K, N)`` buffer outlives the call.
    """
    alpha = wu.unsqueeze(-1)
    slope, curvature = act.derivative(pre), act.second_derivative(pre)
    weight = (slope * alpha).add_(1).reciprocal_().mul_(grad_logdet)
    grad_alpha = _weighted_sums(slope, weight.unsqueeze(-1)).flatten()  # no (K, N) product
    return slope, curvature.mul_(weight).mul_(alpha), grad_alpha


def _needs_grad(points: Tensor, params: Any) -> bool:
    return torch.is_grad_enabled() and (points.requires_grad or any(t.requires_grad for t in params))


def _planar_logdet(pre: Tensor, wu: Tensor, act: Activation) -> Tensor:
    """``Σ_k log(1 + α_k h'(pre_k))`` for pre-activations ``(K, N)``, in place on one ``(K, N)`` buffer."""
    return act.derivative(pre).mul_(wu.unsqueeze(-1)).log1p_().sum(0)


def _planar_forward_eval(z: Tensor, p: PlanarParams, act: Activation) -> tuple[Tensor, Tensor]:
    """Planar run without autograd: updates one buffer in place, keeps only the pre-activations."""
    x = z.clone()
    pre = z.new_empty(p.u.shape[0], z.shape[0])
    for i, (u, w, b) in enumerate(zip(p.u.unbind(0), p.w.unbind(0), p.b.unbind(0), strict=True)):
        torch.addmv(b, x, w, out=pre[i])
        x.addr_(act.fn(pre[i]), u)
    return x, _planar_logdet(pre, p.wu, act)


def _radial_steps(z: Tensor, p: RadialParams, diffs: Sequence[Tensor], radius: Tensor) -> Tensor:
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


def _radial_logdet(dim: int, radius: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``Σ_k (d−1) log(1 + β_k h_k) + log(1 + α_k β_k h_k²)``, ``h_k = 1/(α_k + r_k)``, for ``(K, N)`` radii."""
    h = 1 / (alpha.unsqueeze(-1) + radius)
    bh = beta.unsqueeze(-1) * h
    return ((dim - 1) * torch.log1p(bh) + torch.log1p(bh * alpha.unsqueeze(-1) * h)).sum(0)


def _radial_forward_eval(z: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
    """Radial run without autograd: one ``x − z0`` buffer reused by every layer."""
    radius = z.new_empty(p.z0.shape[0], z.shape[0])
    x = _radial_steps(z, p, [torch.empty_like(z)] * p.z0.shape[0], radius)
    return x, _radial_logdet(z.shape[-1], radius, p.alpha, p.beta)


class _RadialRun(torch.autograd.Function):
    """``K`` radial layers (Rezende & Mohamed, 2015) with an analytic backward.

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
        x = _radial_steps(z, RadialParams(z0, alpha, beta), diffs.unbind(0), radius)
        ctx.save_for_backward(diffs, radius, alpha, beta)
        return x, _radial_logdet(d, radius, alpha, beta)

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


def _planar_roots(x: Tensor, p: PlanarParams, act: Activation, inputs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Invert a planar run without autograd; returns ``z`` and the pre-activations ``(K, N)``.

    With ``inputs`` ``(K, N, d)`` given, the point entering the inverse of layer ``k`` (the output
    of layer ``k``) is written into ``inputs[k]``.

    ``tanh`` layers use :func:`~flowprobe.layers.scalar.tanh_newton` (a fixed budget per layer, no
    synchronisation inside the run) with one convergence check for the whole run
    (:func:`~flowprobe.layers.scalar.newton_converged`: the last Newton step of every layer leaves
    its root exact to rounding); otherwise the run is redone with the safeguarded solver.
    """
    k = p.u.shape[0]
    alphas = p.wu.tolist()
    pre = x.new_empty(k, x.shape[0])
    us, ws, bs = p.u.unbind(0), p.w.unbind(0), p.b.unbind(0)
    outs: list[Tensor | None] = [None] * k
    if inputs is not None:
        inputs[-1] = x
        outs = [None, *inputs.unbind(0)[:-1]]  # layer k's inverse writes layer k − 1's input
    if act.name == "tanh":
        last = torch.empty_like(pre)
        one_plus, roots, lasts = (1 + p.wu).unbind(0), pre.unbind(0), last.unbind(0)
        z = x
        for i in range(k - 1, -1, -1):
            alpha = alphas[i]
            tanh_newton(torch.addmv(bs[i], z, ws[i]), alpha, one_plus[i], newton_budget(alpha, x.dtype), roots[i],
                         lasts[i])
            z = torch.addr(z, torch.tanh(roots[i]), us[i], alpha=-1, out=outs[i])
        if newton_converged(p.wu.unsqueeze(-1), last, pre):
            return z, pre
    z = x
    one = x.new_ones(())
    zero = x.new_zeros(())
    for i in range(k - 1, -1, -1):
        c = torch.addmv(bs[i], z, ws[i])
        pre[i] = solve_scalar(c, p.wu[i], one, zero, act)
        z = torch.addr(z, act.fn(pre[i]), us[i], alpha=-1, out=outs[i])
    return z, pre


class _PlanarInverseRun(torch.autograd.Function):
    """Inverse of ``K`` planar layers with an analytic backward (implicit-function gradients).

    Layer ``k`` inverted at ``y``: ``c = wᵀy + b``, ``s + α h(s) = c`` (``α = wᵀû``),
    ``z = y − û h(s)``, ``ℓ = −log(1 + α h'(s))``. With ``D = 1 + α h'(s)``, ``g`` = ∂L/∂z and
    ``λ`` = ∂L/∂logdet: ``∂L/∂c = (−h'(s) gᵀû + λ ∂ℓ/∂s)/D``, ``∂L/∂y = g + (∂L/∂c) w``,
    ``∂L/∂û = −Σ_n h(s) g``, ``∂L/∂w = Σ_n (∂L/∂c) y``, ``∂L/∂b = Σ_n ∂L/∂c``,
    ``∂L/∂α = Σ_n (−h(s) ∂L/∂c + λ ∂ℓ/∂α)`` (``ds/dc = 1/D``, ``ds/dα = −h(s)/D``).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, u: Tensor, w: Tensor, b: Tensor, wu: Tensor, act: Activation) -> Any:
        inputs = x.new_empty(u.shape[0], *x.shape)
        z, roots = _planar_roots(x, PlanarParams(u, w, b, wu), act, inputs)
        ctx.save_for_backward(inputs, roots, u, w, wu)
        ctx.act = act
        return z, -_planar_logdet(roots, wu, act)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor, grad_logdet: Tensor) -> tuple:
        inputs, roots, u, w, wu = ctx.saved_tensors
        slope, d_c, grad_wu = _logdet_grads(roots, wu, -grad_logdet, ctx.act)  # ℓ = −log D
        factor = (slope * wu.unsqueeze(-1)).add_(1).reciprocal_()  # 1/D for now
        d_c.mul_(factor)  # ∂L/∂c = d_c + factor gᵀû, completed in place below
        factor.mul_(slope).neg_()
        minus_hidden = -ctx.act.fn(roots)
        grad_u = torch.empty_like(u)
        us, ws = u.unbind(0), w.unbind(0)
        g = grad_z
        for i in range(u.shape[0]):
            d_c_i = d_c[i].addcmul_(factor[i], torch.mv(g, us[i]))
            torch.mv(g.t(), minus_hidden[i], out=grad_u[i])
            g = torch.addr(g, d_c_i, ws[i])
        grad_w = _weighted_sums(d_c, inputs)
        grad_wu += _weighted_sums(d_c, minus_hidden.unsqueeze(-1)).flatten()
        return g, grad_u, grad_w, d_c.sum(1), grad_wu, None


def _planar_inverse(x: Tensor, p: PlanarParams, act: Activation) -> tuple[Tensor, Tensor]:
    """Inverse of a planar run: :func:`_planar_roots`, or :class:`_PlanarInverseRun` with autograd."""
    if _needs_grad(x, p):
        return _PlanarInverseRun.apply(x, p.u, p.w, p.b, p.wu, act)
    z, roots = _planar_roots(x, p, act)
    return z, -_planar_logdet(roots, p.wu, act)


def _planar_tanh_inverse_traced(x: Tensor, p: PlanarParams, act: Activation) -> tuple[Tensor, Tensor]:
    """Inverse of a planar-tanh run for ``torch.compile``: one traceable graph, one host check.

    Every layer runs :func:`~flowprobe.layers.scalar.tanh_newton` with ``α`` left on the device and
    so the budget of the outermost bin (:func:`~flowprobe.layers.scalar.widest_budget`), then, with
    autograd, one :func:`~flowprobe.layers.scalar.implicit_step` (its value is the root, its
    gradients those of the implicit function theorem, as in ``solve_scalar``). The run's
    convergence check is its one synchronisation (a graph break); if it fails, the run is redone
    eagerly by :func:`_planar_inverse` (fixed budgets per layer, then the safeguarded solver).
    """
    steps = widest_budget(x.dtype)
    grad = _needs_grad(x, p)
    one, zero = x.new_ones(()), x.new_zeros(())
    z, logdet, roots, lasts = x, x.new_zeros(x.shape[0]), [], []
    for i in range(p.u.shape[0] - 1, -1, -1):
        c = torch.addmv(p.b[i], z, p.w[i])  # s + α tanh(s) = c = wᵀz + b, s = pre-activation
        with torch.no_grad():
            root, last = tanh_newton(c, p.wu[i], 1 + p.wu[i], steps)
        roots.append(root)
        lasts.append(last)
        if grad:
            root = implicit_step(root, c, p.wu[i], one, zero, act)
        z = z - torch.tanh(root).unsqueeze(-1) * p.u[i]
        logdet = logdet - torch.log1p(p.wu[i] * act.derivative(root))
    alpha = p.wu.detach().flip(0).unsqueeze(-1)  # the layers in the order solved
    if not _newton_converged_eager(alpha, torch.stack(lasts), torch.stack(roots)):
        return _planar_inverse_eager(x, p, act)
    return z, logdet


_newton_converged_eager = torch.compiler.disable(newton_converged)  # the graph break, without a warning
_planar_inverse_eager = torch.compiler.disable(_planar_inverse)


def _radial_roots(x: Tensor, p: RadialParams) -> tuple[Tensor, Tensor, Tensor]:
    """Invert a radial run without autograd (closed form per layer, see :class:`Radial`).

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


def _radial_inverse(x: Tensor, p: RadialParams) -> tuple[Tensor, Tensor]:
    """Inverse of a radial run: :func:`_radial_roots`, with autograd plus one implicit step.

    With autograd, ``z = z* − J⁻¹ (f(z*) − x)`` where ``z*`` is the root, ``f`` the run's forward
    (:class:`_RadialRun`, parameters attached) and ``J⁻¹`` the inverse Jacobian at ``z*`` with
    detached coefficients: its value is ``z*`` and its derivatives are the implicit function
    theorem's. Layer ``k``'s Jacobian is ``A I + c δδᵀ`` (``A = 1 + βh``, ``c = −βh²/r``), inverted
    by Sherman–Morrison; the log-det is the forward's at ``z``.
    """
    dim = x.shape[-1]
    if not _needs_grad(x, p):
        z, _, radius = _radial_roots(x, p)
        return z, -_radial_logdet(dim, radius, p.alpha, p.beta)
    with torch.no_grad():
        root, diffs, radius = _radial_roots(x, RadialParams(*(t.detach() for t in p)))
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


# -- Householder ---------------------------------------------------------------------------------
def _householder_product(v: Tensor) -> Tensor:
    """The ``d × d`` matrix ``A`` with ``x = z A`` for a run with reflection vectors ``(K, T, d)``."""
    k, t, d = v.shape
    rows = torch.eye(d, dtype=v.dtype, device=v.device).expand(k, d, d)  # rows = basis points
    for j in range(t):
        rows = reflect(rows, v[:, j : j + 1, :])
    return torch.linalg.multi_dot(list(rows.unbind(0))) if k > 1 else rows[0]


# -- Sylvester -----------------------------------------------------------------------------------
def _sylvester_params(stack: LayerStack, start: int, stop: int) -> SylvesterParams:
    layer: Sylvester = stack.template  # type: ignore[assignment]
    p = layer.constrain(stack.raw(start, stop))
    if layer.kind == "triangular":
        eye = torch.eye(layer.dim, dtype=p.r.dtype, device=p.r.device)
        q = torch.stack([eye.flip(-1) if flip else eye for flip in stack.flips[start:stop]])
        p = p._replace(q=q)
    return p


def _log_slopes(act: Activation, pre: Tensor, h: Tensor, diag: Tensor) -> Tensor:
    """``Σ_i log(1 + h'(pre_i) diag_i)`` over the last axis; for tanh ``h' = 1 − h²`` reuses ``h``."""
    if act.name == "tanh":
        return torch.log(torch.addcmul(1 + diag, h, h * -diag)).sum(-1)
    return torch.log1p(act.derivative(pre) * diag).sum(-1)


def _sylvester_forward(stack: LayerStack, z: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    layer: Sylvester = stack.template  # type: ignore[assignment]
    p = _sylvester_params(stack, start, stop)
    into_hidden = p.q @ p.r_tilde.transpose(-1, -2)  # (K, d, m): pre = z Q R̃ᵀ + b
    out_of_hidden = (p.q @ p.r).transpose(-1, -2)  # (K, m, d): x = z + h (QR)ᵀ
    diag = layer._diag_product(p)
    logdet = z.new_zeros(z.shape[0])
    for i in range(stop - start):
        pre = torch.addmm(p.b[i], z, into_hidden[i])
        h = layer.act.fn(pre)
        z = torch.addmm(z, h, out_of_hidden[i])
        logdet = logdet + _log_slopes(layer.act, pre, h, diag[i])
    return z, logdet


def _sylvester_tanh_inverse(x: Tensor, p: SylvesterParams, act: Activation) -> tuple[Tensor, Tensor] | None:
    """Invert a tanh Sylvester run without autograd by back-substitution with fixed Newton budgets.

    Layer ``k`` at ``y``: with ``c = Qᵀy`` and ``v = Qᵀz``, ``c = v + R h(R̃v + b)``; for
    ``i = m−1 … 0``, ``γ_i = b_i + Σ_{j>i} R̃_ij v_j`` and ``c_i' = c_i − Σ_{j>i} R_ij h_j`` are
    known, ``s_i = R̃_ii v_i + γ_i`` solves ``s + R_ii R̃_ii tanh(s) = R̃_ii c_i' + γ_i``
    (:func:`~flowprobe.layers.scalar.tanh_newton`, budget by ``α = R_ii R̃_ii``) and
    ``v_i = c_i' − R_ii tanh(s_i)``; then ``z = y − Q Qᵀ y + Q v``. The columns live in rows of
    ``(m, N)`` buffers updated in place.

    Returns:
        ``(z, log|det ∂z/∂x|)``, or ``None`` when the one convergence check of the run fails.
    """
    k, m = p.r.shape[0], p.r.shape[-1]
    r_diag, rt_diag = torch.diagonal(p.r, dim1=-2, dim2=-1), torch.diagonal(p.r_tilde, dim1=-2, dim2=-1)
    alpha = r_diag * rt_diag
    alphas, r_diags, rt_diags = alpha.tolist(), r_diag.tolist(), rt_diag.tolist()
    one_plus = (1 + alpha).unbind(-1)  # no (K, m) unbind: one row of 0-d tensors per layer below
    pre = x.new_empty(k, m, x.shape[0])
    last = torch.empty_like(pre)
    z = x
    for layer in range(k - 1, -1, -1):
        q, r, r_tilde = p.q[layer], p.r[layer], p.r_tilde[layer]
        coords = z @ q
        outside = torch.addmm(z, coords, q.t(), alpha=-1)
        c = coords.t().contiguous()  # (m, N): c' of every column, reduced in place
        gamma = p.b[layer].unsqueeze(-1).expand(m, x.shape[0]).clone()
        v = torch.empty_like(c)
        for i in range(m - 1, -1, -1):
            target = torch.add(gamma[i], c[i], alpha=rt_diags[layer][i])
            a = alphas[layer][i]
            tanh_newton(target, a, one_plus[i][layer], newton_budget(a, x.dtype), pre[layer, i], last[layer, i])
            h = torch.tanh(pre[layer, i])
            torch.add(c[i], h, alpha=-r_diags[layer][i], out=v[i])
            if i > 0:
                c[:i].addr_(r[:i, i], h, alpha=-1)
                gamma[:i].addr_(r_tilde[:i, i], v[i])
        z = torch.addmm(outside, v.t(), q.t())
    if not newton_converged(alpha.unsqueeze(-1), last, pre):
        return None
    return z, -_planar_logdet(pre.flatten(0, 1), alpha.flatten(), act)


# -- dispatch ------------------------------------------------------------------------------------
def _forward_run(stack: LayerStack, z: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    layer = stack.template
    eager = not torch.compiler.is_compiling()  # compiled: plain ops (below), fused by the compiler
    if isinstance(layer, Planar) and eager:
        p = layer.constrain(stack.raw(start, stop))
        if not _needs_grad(z, p):
            return _planar_forward_eval(z, p, layer.act)
        return _PlanarRun.apply(z, p.u, p.w, p.b, p.wu, layer.act)
    if isinstance(layer, Radial) and eager:
        p = layer.constrain(stack.raw(start, stop))
        if not _needs_grad(z, p):
            return _radial_forward_eval(z, p)
        return _RadialRun.apply(z, p.z0, p.alpha, p.beta)
    if isinstance(layer, Householder):
        return z @ _householder_product(stack.raw(start, stop)["v"]), z.new_zeros(z.shape[0])
    if isinstance(layer, Sylvester):
        return _sylvester_forward(stack, z, start, stop)
    params = layer.constrain(stack.raw(start, stop))
    logdet = z.new_zeros(z.shape[0])
    for i in range(stop - start):
        z, ld = layer.transform(z, _slice(params, i))
        logdet = logdet + ld
    return z, logdet


def _inverse_run(stack: LayerStack, x: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    layer = stack.template
    eager = not torch.compiler.is_compiling()
    if isinstance(layer, Planar) and eager:
        return _planar_inverse(x, layer.constrain(stack.raw(start, stop)), layer.act)
    if isinstance(layer, Planar) and layer.act.name == "tanh":
        return _planar_tanh_inverse_traced(x, layer.constrain(stack.raw(start, stop)), layer.act)
    if isinstance(layer, Radial) and eager:
        return _radial_inverse(x, layer.constrain(stack.raw(start, stop)))
    if isinstance(layer, Householder):
        return x @ _householder_product(stack.raw(start, stop)["v"]).transpose(-1, -2), x.new_zeros(x.shape[0])
    if isinstance(layer, Sylvester):
        params = _sylvester_params(stack, start, stop)
        if layer.act.name == "tanh" and not _needs_grad(x, params):
            solved = _sylvester_tanh_inverse(x, params, layer.act)
            if solved is not None:
                return solved
    else:
        params = layer.constrain(stack.raw(start, stop))
    logdet = x.new_zeros(x.shape[0])
    for i in range(stop - start - 1, -1, -1):
        x, ld = layer.invert(x, _slice(params, i))
        logdet = logdet + ld
    return x, logdet


def forward_layers(layers: Sequence[FlowLayer], z: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, Σ log|det J|)`` of the layers in order, runs of a stack evaluated fused."""
    logdet = None
    for seg in segments(layers):
        if isinstance(seg, tuple):
            z, ld = _forward_run(seg[0], z, seg[1], seg[2])
        else:
            z, ld = seg.transform(z, seg.constrained())
        logdet = ld if logdet is None else logdet + ld
    return z, logdet  # type: ignore[return-value]


def inverse_layers(layers: Sequence[FlowLayer], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(z, Σ log|det ∂z/∂x|)`` through the layers in reverse, runs of a stack evaluated fused."""
    logdet = None
    for seg in reversed(segments(layers)):
        if isinstance(seg, tuple):
            x, ld = _inverse_run(seg[0], x, seg[1], seg[2])
        else:
            x, ld = seg.invert(x, seg.constrained())
        logdet = ld if logdet is None else logdet + ld
    return x, logdet  # type: ignore[return-value]


def usable(params: Sequence[Any] | None) -> bool:
    """Whether a call may take the fused path (own parameters, fusion on, no torch.func transform)."""
    if not _ENABLED or torch._C._are_functorch_transforms_active():
        return False
    return params is None or all(p is None for p in params)


# -- state dict: per-layer keys, whatever the stacking -------------------------------------------
def _bound(flow: nn.Module) -> Iterator[tuple[int, LayerStack, int]]:
    for i, layer in enumerate(flow.layers):
        slot = layer.__dict__.get("_fused_slot")
        if slot is not None:
            yield i, slot[0], slot[1]


def state_dict_hook(flow: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Replace the stacked entries ``stacks.{j}.u`` by the per-layer entries ``layers.{i}.u``."""
    for i, stack, index in _bound(flow):
        for name, p in stack._parameters.items():
            state_dict[f"{prefix}layers.{i}.{name}"] = p.detach()[index].clone()
    for j, stack in enumerate(flow.stacks):
        for name in stack._parameters:
            state_dict.pop(f"{prefix}stacks.{j}.{name}", None)


def load_state_dict_pre_hook(
    flow: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Gather per-layer entries ``layers.{i}.u`` into the stacked parameters they are views of."""
    gathered: dict[tuple[int, str], Tensor] = {}
    complete: dict[tuple[int, str], bool] = {}
    position = {id(stack): j for j, stack in enumerate(flow.stacks)}
    for i, stack, index in _bound(flow):
        j = position[id(stack)]
        for name, p in stack._parameters.items():
            key = f"{prefix}layers.{i}.{name}"
            if (j, name) not in gathered:
                gathered[(j, name)] = p.detach().clone()
                complete[(j, name)] = True
            if key in state_dict:
                value = state_dict.pop(key)
                if value.shape != p.shape[1:]:
                    expected = tuple(p.shape[1:])
                    error_msgs.append(f"size mismatch for {key}: expected {expected}, got {tuple(value.shape)}")
                    complete[(j, name)] = False
                    continue
                gathered[(j, name)][index] = value
            else:
                complete[(j, name)] = False
    for (j, name), value in gathered.items():
        if complete[(j, name)]:
            state_dict[f"{prefix}stacks.{j}.{name}"] = value
