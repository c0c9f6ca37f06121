"""The scalar monotone equation behind every residual-layer inverse.

Planar and Sylvester inverses reduce to equations of the form

.. math::

    g(v) = v + \\alpha\\, h(\\beta v + \\gamma) = y,
    \\qquad g'(v) = 1 + \\alpha\\beta\\, h'(\\beta v + \\gamma),

solved element-wise over a batch. With ``0 ≤ h' ≤ H`` the slope lies in
``[s_lo, s_hi] = [min(1, 1 + αβH), max(1, 1 + αβH)]``; the layers guarantee ``s_lo > 0``.
Then, with ``r = g(y) − y = α h(βy + γ)``, the root is bracketed exactly by
``y − r/s_lo`` and ``y − r/s_hi``, and a safeguarded Newton iteration (bisection when Newton
leaves the bracket) converges for every input. Piecewise-linear ``h`` is solved in closed form.

Gradients: the root is found without autograd, then one Newton step is taken with the slope
detached, ``v = v* − (g(v*) − y)/g'(v*)``. Its value is ``v*`` and its derivatives are those of the
implicit function theorem, so the inverse is differentiable in ``y`` and in ``α, β, γ`` at the cost
of one extra evaluation of ``g``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowprobe.activations import Activation

__all__ = ["implicit_step", "solve_scalar"]

MAX_ITERATIONS = 100


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


_solve_newton_eager = torch.compiler.disable(_solve_newton)


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
        if act.piecewise_linear:
            solve = _solve_piecewise_linear
        else:  # under torch.compile the iteration, which stops on a host check, runs eagerly
            solve = _solve_newton_eager if torch.compiler.is_compiling() else _solve_newton
        root = solve(y.detach(), alpha.detach(), beta.detach(), gamma.detach(), act)
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
