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

``tanh`` (the default activation) first tries a fixed Newton budget without synchronisation in
``s = βv + γ``, where the equation reads ``s + α' tanh(s) = c`` (``α' = αβ``, ``c = βy + γ``):
:func:`tanh_newton` starts at the exact root for hard-tanh and takes the iterations
:data:`NEWTON_BUDGETS` assigns to ``α'``; one check of the last Newton step
(:func:`newton_converged`) confirms the root is exact to rounding, else the safeguarded
iteration runs. Fused planar runs use the same two functions with one budget per layer.

Gradients: the root is found without autograd, then one Newton step is taken with the slope
detached, ``v = v* − (g(v*) − y)/g'(v*)``. Its value is ``v*`` and its derivatives are those of the
implicit function theorem, so the inverse is differentiable in ``y`` and in ``α, β, γ`` at the cost
of one extra evaluation of ``g``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowprobe.activations import Activation

__all__ = [
    "NEWTON_BUDGETS",
    "implicit_step",
    "newton_budget",
    "newton_converged",
    "solve_scalar",
    "tanh_newton",
    "widest_budget",
]

MAX_ITERATIONS = 100
# Newton iterations for ``s + α tanh(s) = c`` from the hard-tanh start: ``(low, high, steps)`` bins,
# nested, the first that holds α applies; the fewest iterations that reach rounding for every α in
# the bin (worst relative error over |s| ≤ 14 on a 0.01 α grid below 1e-15 in float64, below the
# unit roundoff 6e-8 in float32; checked in tests/test_scalar.py). Other dtypes use the float64 table.
NEWTON_BUDGETS = {
    torch.float64: ((-0.02, 0.02, 2), (-0.3, 0.3, 3), (-0.5, 1.0, 4), (-0.9, 6.0, 5), (-1.0, 10.0, 6)),
    torch.float32: ((-0.01, 0.01, 1), (-0.3, 0.45, 2), (-0.72, 2.7, 3), (-0.92, 11.0, 4), (-1.0, 20.0, 5)),
}
NEWTON_EXTRA_STEPS = 2  # beyond the last bin: its budget plus these, then the check decides
TANH_CURVATURE = 0.385  # max|tanh''|/2 = 2/(3√3)


def newton_budget(alpha: float, dtype: torch.dtype) -> int:
    """Newton iterations for ``s + α tanh(s) = c`` (see :data:`NEWTON_BUDGETS`).

    The bins are nested intervals around 0, so the larger budget of two values covers every α
    between them.
    """
    bins = NEWTON_BUDGETS.get(dtype, NEWTON_BUDGETS[torch.float64])
    for low, high, steps in bins:
        if low <= alpha <= high:
            return steps
    return bins[-1][2] + NEWTON_EXTRA_STEPS


def widest_budget(dtype: torch.dtype) -> int:
    """The budget of the outermost bin: enough for every α it holds (used when α stays on the device)."""
    return NEWTON_BUDGETS.get(dtype, NEWTON_BUDGETS[torch.float64])[-1][2]


def tanh_newton(
    c: Tensor,
    alpha: float | Tensor,
    one_plus: Tensor,
    steps: int,
    root: Tensor | None = None,
    last: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Solve ``s + α tanh(s) = c`` (``α > −1``) with ``steps`` Newton iterations, no synchronisation.

    Start: the exact root for ``h = clamp(·, −1, 1)``, ``s₀ = c − α/(1+α) clamp(c, −(1+α), 1+α)``.
    Its error grows with ``|α|`` and so do the iterations needed to reach rounding: from 1 (float32,
    ``|α| ≤ 0.01``) to 5 (float64, ``α ∈ [−0.9, 6]``), see :data:`NEWTON_BUDGETS`. Five ops per
    iteration for a Python-number α (a fused layer), six for a tensor α (one per point).

    Args:
        c: Right-hand sides.
        alpha: ``α``, a number or a tensor broadcasting with ``c``.
        one_plus: ``1 + α`` as a tensor.
        steps: Number of iterations (≥ 1).
        root: Optional output buffer for the root (shape of ``c``).
        last: Optional output buffer for the last Newton step (the input of :func:`newton_converged`).

    Returns:
        ``(root, last)``.
    """
    scalar = not isinstance(alpha, Tensor)
    if scalar:
        bound = 1.0 + alpha
        s = torch.add(c, torch.clamp(c, -bound, bound), alpha=-alpha / bound, out=root)
    else:
        s = torch.addcmul(c, alpha / one_plus, torch.clamp(c, -one_plus, one_plus), value=-1, out=root)
    for j in range(steps):
        t = torch.tanh(s)
        if scalar:
            residual = torch.add(s, t, alpha=alpha).sub_(c)
            slope = torch.addcmul(one_plus, t, t, value=-alpha)  # 1 + α(1 − t²)
        else:
            alpha_t = alpha * t
            residual = torch.add(s, alpha_t).sub_(c)
            slope = torch.addcmul(one_plus, alpha_t, t, value=-1)
        if j + 1 < steps:
            s.addcdiv_(residual, slope, value=-1)
        else:
            last = torch.div(residual, slope, out=last)
            s.sub_(last)
    return s, last  # type: ignore[return-value]


def newton_converged(alpha: Tensor, last: Tensor, root: Tensor) -> bool:
    """Whether the last Newton steps of :func:`tanh_newton` leave its roots exact to rounding (one sync).

    After a step ``δ`` the error is at most ``C δ²`` with ``C = max|f''|/(2 min f')
    = 0.385 |α| / min(1, 1 + α)``; the check is ``C δ² ≤ 2 eps (1 + |s|)`` at every root ``s``
    (the relative accuracy :data:`NEWTON_BUDGETS` is tabulated for). ``alpha`` broadcasts with
    ``last`` and ``root``.
    """
    curvature = TANH_CURVATURE * alpha.abs() / torch.clamp(1 + alpha, max=1.0)
    eps = torch.finfo(last.dtype).eps
    return bool((curvature * last.square() <= root.abs().add_(1).mul_(2 * eps)).all())


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


def _solve_tanh(y: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tensor | None:
    """``v`` by a fixed Newton budget in ``s = βv + γ``, or ``None`` when the check fails."""
    ab = alpha * beta
    c = beta * y + gamma
    low, high = torch.stack([ab.min(), ab.max()]).tolist()
    steps = max(newton_budget(low, y.dtype), newton_budget(high, y.dtype))
    s, last = tanh_newton(c, ab, 1 + ab, steps)
    if not newton_converged(ab, last, s):
        return None
    return y - alpha * torch.tanh(s)


def _find_root(y: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, act: Activation) -> Tensor:
    """The root without autograd: fixed-budget Newton for tanh, else (or if its check fails) rtsafe."""
    root = _solve_tanh(y, alpha, beta, gamma) if act.name == "tanh" else None
    return _solve_newton(y, alpha, beta, gamma, act) if root is None else root


_find_root_eager = torch.compiler.disable(_find_root)  # under torch.compile: host checks, run eagerly


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
        if act.piecewise_linear:
            root = _solve_piecewise_linear(*args, act)
        else:
            root = (_find_root_eager if torch.compiler.is_compiling() else _find_root)(*args, act)
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
