"""Scalar activations ``h`` of residual layers, with their derivatives and capabilities.

Every residual layer of flowprobe has the form ``z + A h(Bᵀz + b)``. Its Jacobian, its
invertibility condition and its inverse only need three facts about ``h``: the value ``h(t)``,
the derivative ``h'(t)`` and the bound ``sup h'`` (all activations here are non-decreasing, so
``0 ≤ h' ≤ sup h'``). Faster kernels are chosen by what an activation *declares it supports*,
never by its name:

* ``kink_slopes`` — piecewise linear with one kink at 0: closed-form inverses;
* ``derivative_from_value`` — ``h'`` as a function of ``h`` (tanh: ``1 − h²``), so a forward pass
  reuses ``h`` for its log-determinant;
* ``newton`` — a :class:`NewtonKernel` that solves ``s + α h(s) = c`` with a fixed iteration
  budget and one convergence check (tanh: from the exact hard-tanh root, see ``docs/layers.md``);
* ``native`` — the code of its implementation in the compiled run kernels (``layers/native.py``).

A custom :class:`Activation` declares none of them unless given: it is evaluated by the general
formulas and the safeguarded scalar solver, so it is always handled exactly.

Convention at the kink of ``relu`` / ``leaky_relu``: ``h'(0)`` is the left slope, as in autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = ["ACTIVATIONS", "Activation", "NewtonKernel", "TANH_NEWTON", "get_activation"]

LEAKY_SLOPE = 0.01


# -- fixed-budget Newton for s + α tanh(s) = c ----------------------------------------------------
# Iterations from the hard-tanh start: ``(low, high, steps)`` bins, nested, the first that holds α
# applies; the fewest iterations that reach rounding for every α in the bin (worst relative error
# over |s| ≤ 14 on a 0.01 α grid below 1e-15 in float64, below the unit roundoff 6e-8 in float32;
# checked in tests/layers/test_scalar.py). Other dtypes use the float64 table.
TANH_NEWTON_BUDGETS = {
    torch.float64: ((-0.02, 0.02, 2), (-0.3, 0.3, 3), (-0.5, 1.0, 4), (-0.9, 6.0, 5), (-1.0, 10.0, 6)),
    torch.float32: ((-0.01, 0.01, 1), (-0.3, 0.45, 2), (-0.72, 2.7, 3), (-0.92, 11.0, 4), (-1.0, 20.0, 5)),
}
NEWTON_EXTRA_STEPS = 2  # beyond the last bin: its budget plus these, then the check decides
TANH_CURVATURE = 0.385  # max|tanh''|/2 = 2/(3√3)


def tanh_newton_budget(alpha: float, dtype: torch.dtype) -> int:
    """Newton iterations for ``s + α tanh(s) = c`` (see :data:`TANH_NEWTON_BUDGETS`).

    The bins are nested intervals around 0, so the larger budget of two values covers every α
    between them.
    """
    bins = TANH_NEWTON_BUDGETS.get(dtype, TANH_NEWTON_BUDGETS[torch.float64])
    for low, high, steps in bins:
        if low <= alpha <= high:
            return steps
    return bins[-1][2] + NEWTON_EXTRA_STEPS


def tanh_widest_budget(dtype: torch.dtype) -> int:
    """The budget of the outermost bin: enough for every α it holds (used when α stays on the device)."""
    return TANH_NEWTON_BUDGETS.get(dtype, TANH_NEWTON_BUDGETS[torch.float64])[-1][2]


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
    ``|α| ≤ 0.01``) to 5 (float64, ``α ∈ [−0.9, 6]``), see :data:`TANH_NEWTON_BUDGETS`. Five ops per
    iteration for a Python-number α (one layer of a shared stack), six for a tensor α.

    Args:
        c: Right-hand sides.
        alpha: ``α``, a number or a tensor broadcasting with ``c``.
        one_plus: ``1 + α`` as a tensor.
        steps: Number of iterations (≥ 1).
        root: Optional output buffer for the root (shape of ``c``).
        last: Optional output buffer for the last Newton step (the input of :func:`tanh_converged`).

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


def tanh_converged(alpha: Tensor, last: Tensor, root: Tensor) -> Tensor:
    """Whether the last Newton steps of :func:`tanh_newton` leave its roots exact to rounding.

    After a step ``δ`` the error is at most ``C δ²`` with ``C = max|f''|/(2 min f')
    = 0.385 |α| / min(1, 1 + α)``; the check is ``C δ² ≤ 2 eps (1 + |s|)`` at every root ``s``
    (the relative accuracy :data:`TANH_NEWTON_BUDGETS` is tabulated for). ``alpha`` broadcasts with
    ``last`` and ``root``.

    Returns:
        A 0-d boolean tensor on the device of the inputs (no synchronisation).
    """
    curvature = TANH_CURVATURE * alpha.abs() / torch.clamp(1 + alpha, max=1.0)
    eps = torch.finfo(last.dtype).eps
    return (curvature * last.square() <= root.abs().add(1).mul_(2 * eps)).all()


@dataclass(frozen=True)
class NewtonKernel:
    """A fixed-budget Newton solver for ``s + α h(s) = c`` (``α > −1/sup h'``), no host syncs inside.

    Attributes:
        solve: ``solve(c, alpha, one_plus, steps, root=None, last=None) -> (root, last)``.
        budget: ``budget(alpha: float, dtype) -> steps`` for a known α.
        widest_budget: ``widest_budget(dtype) -> steps`` for any admissible α (α left on the device).
        converged: ``converged(alpha, last, root) -> 0-d bool tensor``: the roots are exact to rounding.
    """

    solve: Callable[..., tuple[Tensor, Tensor]]
    budget: Callable[[float, torch.dtype], int]
    widest_budget: Callable[[torch.dtype], int]
    converged: Callable[[Tensor, Tensor, Tensor], Tensor]


TANH_NEWTON = NewtonKernel(tanh_newton, tanh_newton_budget, tanh_widest_budget, tanh_converged)


# -- the activations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activation:
    """A non-decreasing scalar activation.

    Attributes:
        name: Registry name (a label only: no kernel is chosen by it).
        fn: ``h``.
        derivative: ``h'``.
        second_derivative: ``h''`` (zero on the pieces of a piecewise-linear ``h``); the analytic
            backwards of layer stacks differentiate log-determinants ``log(1 + α h')`` with it.
        sup_derivative: ``sup_t h'(t)``; invertibility bounds are ``−1 / sup h'``.
        kink_slopes: ``(left, right)`` slopes at 0 for piecewise-linear activations, else ``None``.
        bound: ``sup_t |h(t)|`` (``inf`` for unbounded activations): a planar layer with ``‖û‖ ≤ U``
            moves every point by at most ``U·bound``.
        derivative_from_value: ``h'`` as a function of ``h(t)``, if it is one (tanh: ``1 − h²``).
        newton: A fixed-budget solver of ``s + α h(s) = c``, if the activation has one.
        native: The code of its implementation in the compiled run kernels (``layers/runs.cpp``), if
            it has one.

    ``derivative`` and ``second_derivative`` return new tensors (stack kernels work on them in place).
    Custom activations must use module-level functions (not lambdas) to be picklable.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    second_derivative: Callable[[Tensor], Tensor]
    sup_derivative: float
    kink_slopes: tuple[float, float] | None = None
    bound: float = math.inf
    derivative_from_value: Callable[[Tensor], Tensor] | None = None
    newton: NewtonKernel | None = None
    native: int | None = None

    @property
    def piecewise_linear(self) -> bool:
        """Whether ``h`` is piecewise linear with one kink at 0 (closed-form inverses)."""
        return self.kink_slopes is not None

    def __reduce__(self) -> str | tuple:
        """Built-ins pickle by name (their functions include torch built-ins); others field by field."""
        if ACTIVATIONS.get(self.name) is self:
            return get_activation, (self.name,)
        fields = (self.name, self.fn, self.derivative, self.second_derivative, self.sup_derivative,
                  self.kink_slopes, self.bound, self.derivative_from_value, self.newton, self.native)
        return Activation, fields


def _identity(t: Tensor) -> Tensor:
    return t


def _ones(t: Tensor) -> Tensor:
    return torch.ones_like(t)


def _zeros(t: Tensor) -> Tensor:
    return torch.zeros_like(t)


def _tanh_derivative(t: Tensor) -> Tensor:
    return 1 - torch.tanh(t) ** 2


def _tanh_derivative_from_value(h: Tensor) -> Tensor:
    return 1 - h * h


def _tanh_second(t: Tensor) -> Tensor:
    y = torch.tanh(t)
    return y.square().sub_(1).mul_(y).mul_(2)  # −2 tanh (1 − tanh²)


def _sigmoid_derivative(t: Tensor) -> Tensor:
    return torch.sigmoid(t) * torch.sigmoid(-t)


def _sigmoid_second(t: Tensor) -> Tensor:
    y = torch.sigmoid(t)
    return _sigmoid_derivative(t).mul_(1 - 2 * y)  # σ(1 − σ)(1 − 2σ)


def _arctan_derivative(t: Tensor) -> Tensor:
    return 1 / (1 + t * t)


def _arctan_second(t: Tensor) -> Tensor:
    return t * (-2 / (1 + t * t).square())  # −2t/(1 + t²)²


def _softplus(t: Tensor) -> Tensor:
    # Exact log(1 + e^t): torch's F.softplus returns t above a threshold, whose derivative (1)
    # would then disagree with h' = sigmoid(t) by up to e^-20 in the log-det.
    return torch.logaddexp(t, torch.zeros_like(t))


def _elu_derivative(t: Tensor) -> Tensor:
    return torch.where(t > 0, torch.ones_like(t), torch.exp(t.clamp_max(0)))


def _elu_second(t: Tensor) -> Tensor:
    return torch.where(t > 0, torch.zeros_like(t), torch.exp(t.clamp_max(0)))


def _relu_derivative(t: Tensor) -> Tensor:
    return (t > 0).to(t.dtype)


def _leaky_relu(t: Tensor) -> Tensor:
    return F.leaky_relu(t, LEAKY_SLOPE)


def _leaky_relu_derivative(t: Tensor) -> Tensor:
    return torch.where(t > 0, torch.ones_like(t), torch.full_like(t, LEAKY_SLOPE))


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (  # native: the codes of layers/runs.cpp
        Activation("tanh", torch.tanh, _tanh_derivative, _tanh_second, 1.0, bound=1.0,
                   derivative_from_value=_tanh_derivative_from_value, newton=TANH_NEWTON, native=0),
        Activation("sigmoid", torch.sigmoid, _sigmoid_derivative, _sigmoid_second, 0.25, bound=1.0, native=1),
        Activation("arctan", torch.atan, _arctan_derivative, _arctan_second, 1.0, bound=math.pi / 2, native=2),
        Activation("softplus", _softplus, torch.sigmoid, _sigmoid_derivative, 1.0, native=3),
        Activation("elu", F.elu, _elu_derivative, _elu_second, 1.0, native=4),
        Activation("relu", torch.relu, _relu_derivative, _zeros, 1.0, (0.0, 1.0), native=5),
        Activation("leaky_relu", _leaky_relu, _leaky_relu_derivative, _zeros, 1.0, (LEAKY_SLOPE, 1.0), native=6),
        Activation("identity", _identity, _ones, _zeros, 1.0, (1.0, 1.0), native=7),
    )
}


def get_activation(name: str | Activation) -> Activation:
    """Look up an activation by name (an :class:`Activation` is returned as it is).

    Raises:
        ValueError: the name is unknown (the message lists the known names).
    """
    if isinstance(name, Activation):
        return name
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; expected one of: {known}") from None
