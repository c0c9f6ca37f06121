"""The scalar monotone equation behind every residual-layer inverse, and the log-det pieces
that planar and Sylvester stacks share.

Planar and Sylvester inverses reduce to equations of the form

.. math::

    g(v) = v + \\alpha\\, h(\\beta v + \\gamma) = y,
    \\qquad g'(v) = 1 + \\alpha\\beta\\, h'(\\beta v + \\gamma),

solved element-wise over a batch (``docs/layers.md``). With ``0 ≤ h' ≤ H`` the slope lies in
``[s_lo, s_hi] = [min(1, 1 + αβH), max(1, 1 + αβH)]``; the layers guarantee ``s_lo > 0``.
Then, with ``r = g(y) − y = α h(βy + γ)``, the root is bracketed exactly by
``y − r/s_lo`` and ``y − r/s_hi``, and a safeguarded Newton iteration (bisection when Newton
leaves the bracket) converges for every input. Piecewise-linear ``h`` is solved in closed form.

An activation with a :class:`~flowprobe.activations.NewtonKernel` (tanh) first tries its fixed
budget without synchronisation in ``s = βv + γ``, where the equation reads ``s + α' h(s) = c``
(``α' = αβ``, ``c = βy + γ``); one convergence check confirms the root is exact to rounding, else
the safeguarded iteration runs.

Gradients: the root is found without autograd, then one Newton step is taken with the slope
detached, ``v = v* − (g(v*) − y)/g'(v*)``. Its value is ``v*`` and its derivatives are those of the
implicit function theorem, so the inverse is differentiable in ``y`` and in ``α, β, γ`` at the cost
of one extra evaluation of ``g``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flowprobe.activations import Activation

__all__ = [
    "eager",
    "implicit_step",
    "log_slopes",
    "log_slopes_grads",
    "needs_grad",
    "solve_scalar",
    "weighted_sums",
]

MAX_ITERATIONS = 100


def eager(fn: Callable) -> Callable:
    """``fn`` run eagerly when called under ``torch.compile`` (a graph break without a warning).

    ``torch.compiler.disable`` imports the compiler (about a second); it is applied on first use so
    that importing flowprobe stays cheap.
    """

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if call.disabled is None:  # type: ignore[attr-defined]
            call.disabled = torch.compiler.disable(fn)  # type: ignore[attr-defined]
        return call.disabled(*args, **kwargs)  # type: ignore[attr-defined]

    call.disabled = None  # type: ignore[attr-defined]
    return call


def needs_grad(points: Tensor, params: Any) -> bool:
    """Whether autograd records a call on ``points`` with parameter tensors ``params``."""
    return torch.is_grad_enabled() and (points.requires_grad or any(t.requires_grad for t in params))


# -- log-determinants Σ log(1 + α h'(pre)) ---------------------------------------------------------
def log_slopes(pre: Tensor, alpha: Tensor, act: Activation) -> Tensor:
    """``Σ_k log(1 + α_k h'(pre_k))`` over the first axis of pre-activations ``(K, *B, N)``, ``α`` one value per
    ``(K, *B)`` (shaped so, or with a trailing 1; an ensemble's ``B = (E,)``).

    Computed in place on one buffer of ``pre``'s shape.
    """
    return act.derivative(pre).mul_(alpha.reshape(*pre.shape[:-1], 1)).log1p_().sum(0)


def weighted_sums(weights: Tensor, points: Tensor) -> Tensor:
    """``Σ_n weights[k, n] points[k, n]`` for every layer ``k``: ``(K, N)``, ``(K, N, d)`` → ``(K, d)``."""
    return torch.bmm(weights.unsqueeze(1), points).squeeze(1)


def log_slopes_grads(pre: Tensor, alpha: Tensor, grad: Tensor, act: Activation) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces of the gradient of ``Σ_k λ log D_k``, ``D_k = 1 + α_k h'(pre_k)``, ``λ = grad``.

    Returns:
        ``h'(pre)`` and ``∂/∂pre = λ α h''(pre)/D``, each ``(K, N)``, and ``∂/∂α = Σ_n λ h'(pre)/D``,
        ``(K,)``; no other ``(K, N)`` buffer outlives the call.
    """
    a = alpha.unsqueeze(-1)
    slope, curvature = act.derivative(pre), act.second_derivative(pre)
    weight = (slope * a).add_(1).reciprocal_().mul_(grad)
    grad_alpha = weighted_sums(slope, weight.unsqueeze(-1)).flatten()  # no (K, N) product
    return slope, curvature.mul_(weight).mul_(a), grad_alpha


# -- the scalar equation -------------------------------------------------------------------------
def _solve_piecewise_linear(y: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, act: Activation) -> Tensor:
    left, right = act.kink_slopes  # type: ignore[misc]
    active = (y - alpha * right * gamma) / (1 + alpha * beta * right)
    inactive = (y - alpha * left * gamma) / (1 + alpha * beta * left)
    return torch.where(beta * active + gamma > 0, active, inactive)


def _solve_newton(y: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, act: Activation) -> Tensor:
    ab_max = alpha * beta * act.sup_derivative
    slope_lo = torch.clamp(1 + ab_max, max=1.0)
    slope_hi = torch.clamp(1 + ab_max, min=1.0)
    excess = alpha * act.fn(beta * y + gamma)  # g(y) - y
    a, b = y - excess / slope_lo, y - excess / slope_hi
    eps = torch.finfo(y.dtype).eps
    rounding = 4 * eps * (1 + y.abs() + excess.abs() / slope_lo)  # keep the root inside despite rounding
    lo, hi = torch.minimum(a, b) - rounding, torch.maximum(a, b) + rounding
    v = y - excess / (0.5 * (slope_lo + slope_hi))
    step = step_before = hi - lo
    done = torch.zeros_like(v, dtype=torch.bool)
    for _ in range(MAX_ITERATIONS):  # rtsafe: Newton; bisection if it leaves the bracket or stalls
        pre = beta * v + gamma
        residual = v + alpha * act.fn(pre) - y
        slope = 1 + alpha * beta * act.derivative(pre)
        lo = torch.where(residual < 0, v, lo)
        hi = torch.where(residual > 0, v, hi)
        newton = v - residual / slope
        converged = (newton - v).abs() <= 2 * eps * (1 + v.abs())
        outside = (newton <= lo) | (newton >= hi)
        stalled = 2 * (newton - v).abs() > step_before
        bisect = ~converged & (outside | stalled)
        new_v = torch.where(done, v, torch.where(bisect, 0.5 * (lo + hi), newton))
        step_before, step = step, (new_v - v).abs()
        v, done = new_v, done | converged
        if bool(done.all()):
            break
    return v


def _solve_fixed_budget(y: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, act: Activation) -> Tensor | None:
    """``v`` by the activation's fixed-budget Newton in ``s = βv + γ``, or ``None`` when its check fails."""
    kernel = act.newton
    ab = alpha * beta
    c = beta * y + gamma
    low, high = torch.stack([ab.min(), ab.max()]).tolist()
    steps = max(kernel.budget(low, y.dtype), kernel.budget(high, y.dtype))  # type: ignore[union-attr]
    s, last = kernel.solve(c, ab, 1 + ab, steps)  # type: ignore[union-attr]
    if not bool(kernel.converged(ab, last, s)):  # type: ignore[union-attr]
        return None
    return y - alpha * act.fn(s)


@eager
def _find_root(y: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, act: Activation) -> Tensor:
    """The root without autograd: the fixed budget when the activation has one, else (or if its
    check fails) rtsafe. Host checks: run eagerly under ``torch.compile``."""
    root = _solve_fixed_budget(y, alpha, beta, gamma, act) if act.newton is not None else None
    return _solve_newton(y, alpha, beta, gamma, act) if root is None else root


def solve_scalar(y: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, act: Activation) -> Tensor:
    """Solve ``v + α h(βv + γ) = y`` element-wise (all arguments broadcast).

    Requires ``1 + αβ·sup h' > 0`` (guaranteed by the layers' reparametrisations).

    Args:
        y: Right-hand side.
        alpha: ``α``.
        beta: ``β``.
        gamma: ``γ``.
        act: The activation ``h``.

    Returns:
        The root ``v``, differentiable with respect to all arguments (implicit gradients).
    """
    with torch.no_grad():
        args = (y.detach(), alpha.detach(), beta.detach(), gamma.detach())
        root = _solve_piecewise_linear(*args, act) if act.piecewise_linear else _find_root(*args, act)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (y, alpha, beta, gamma)):
        return root
    return implicit_step(root, y, alpha, beta, gamma, act)


def implicit_step(root: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, act: Activation) -> Tensor:
    """One Newton step from a root ``v*`` of ``v + α h(βv + γ) = y``, with the slope detached.

    ``v = v* − (g(v*) − y)/g'(v*)``: its value is ``v*`` (up to rounding) and its derivatives with
    respect to ``y, α, β, γ`` are those of the implicit function theorem.
    """
    pre = beta * root + gamma
    residual = root + alpha * act.fn(pre) - y
    slope = (1 + alpha * beta * act.derivative(pre)).detach()
    return root - residual / slope
