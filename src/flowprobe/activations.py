"""Scalar activations ``h`` of residual layers, with their derivatives.

Every residual layer of flowprobe has the form ``z + A h(Bᵀz + b)``. Its Jacobian, its
invertibility condition and its inverse only need three facts about ``h``: the value ``h(t)``,
the derivative ``h'(t)`` and the bound ``sup h'`` (all activations here are non-decreasing, so
``0 ≤ h' ≤ sup h'``). Piecewise-linear activations additionally expose their two slopes, which
gives closed-form inverses.

Convention at the kink of ``relu`` / ``leaky_relu``: ``h'(0)`` is the left slope, as in autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]

LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class Activation:
    """A non-decreasing scalar activation.

    Attributes:
        name: Registry name.
        fn: ``h``.
        derivative: ``h'``.
        second_derivative: ``h''`` (zero on the pieces of a piecewise-linear ``h``); the analytic
            backward of fused layer runs differentiates log-determinants ``log(1 + α h')`` with it.
        sup_derivative: ``sup_t h'(t)``; invertibility bounds are ``−1 / sup h'``.
        kink_slopes: ``(left, right)`` slopes at 0 for piecewise-linear activations, else ``None``.

    ``derivative`` and ``second_derivative`` return new tensors (fused runs work on them in place).
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    second_derivative: Callable[[Tensor], Tensor]
    sup_derivative: float
    kink_slopes: tuple[float, float] | None = None

    @property
    def piecewise_linear(self) -> bool:
        """Whether ``h`` is piecewise linear with one kink at 0 (closed-form inverses)."""
        return self.kink_slopes is not None


def _leaky_slope(t: Tensor, left: float) -> Tensor:
    return torch.where(t > 0, torch.ones_like(t), torch.full_like(t, left))


def _softplus(t: Tensor) -> Tensor:
    # Exact log(1 + e^t): torch's F.softplus returns t above a threshold, whose derivative (1)
    # would then disagree with h' = sigmoid(t) by up to e^-20 in the log-det.
    return torch.logaddexp(t, torch.zeros_like(t))


def _tanh_second(t: Tensor) -> Tensor:
    y = torch.tanh(t)
    return y.square().sub_(1).mul_(y).mul_(2)  # −2 tanh (1 − tanh²)


def _sigmoid_derivative(t: Tensor) -> Tensor:
    return torch.sigmoid(t) * torch.sigmoid(-t)


def _sigmoid_second(t: Tensor) -> Tensor:
    y = torch.sigmoid(t)
    return _sigmoid_derivative(t).mul_(1 - 2 * y)  # σ(1 − σ)(1 − 2σ)


def _arctan_second(t: Tensor) -> Tensor:
    return t * (-2 / (1 + t * t).square())  # −2t/(1 + t²)²


def _elu_derivative(t: Tensor) -> Tensor:
    return torch.where(t > 0, torch.ones_like(t), torch.exp(t.clamp_max(0)))


def _elu_second(t: Tensor) -> Tensor:
    return torch.where(t > 0, torch.zeros_like(t), torch.exp(t.clamp_max(0)))


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("tanh", torch.tanh, lambda t: 1 - torch.tanh(t) ** 2, _tanh_second, 1.0),
        Activation("sigmoid", torch.sigmoid, _sigmoid_derivative, _sigmoid_second, 0.25),
        Activation("arctan", torch.atan, lambda t: 1 / (1 + t * t), _arctan_second, 1.0),
        Activation("softplus", _softplus, torch.sigmoid, _sigmoid_derivative, 1.0),
        Activation("elu", F.elu, _elu_derivative, _elu_second, 1.0),
        Activation("identity", lambda t: t, torch.ones_like, torch.zeros_like, 1.0, (1.0, 1.0)),
        Activation("relu", torch.relu, lambda t: _leaky_slope(t, 0.0), torch.zeros_like, 1.0, (0.0, 1.0)),
        Activation(
            "leaky_relu",
            lambda t: F.leaky_relu(t, LEAKY_SLOPE),
            lambda t: _leaky_slope(t, LEAKY_SLOPE),
            torch.zeros_like,
            1.0,
            (LEAKY_SLOPE, 1.0),
        ),
    )
}


def get_activation(name: str | Activation) -> Activation:
    """Look up an activation by name.

    Raises:
        ValueError: the name is unknown (the message lists the known names).
    """
    if isinstance(name, Activation):
        return name
    try:
        return ACTIVATIONS[name]
    except KeyError:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; expected one of: {known}") from None
