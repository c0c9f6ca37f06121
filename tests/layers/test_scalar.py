"""The scalar solver behind planar and Sylvester inverses (flowprobe.layers.scalar) and tanh's
fixed-budget Newton kernel (flowprobe.activations)."""

import math

import pytest
import torch

from flowprobe import activations
from flowprobe.activations import ACTIVATIONS, TANH_NEWTON_BUDGETS
from flowprobe.layers import scalar


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_budget_reaches_rounding_in_every_alpha_bin(dtype):
    """Every bin's budget solves s + α tanh(s) = c to rounding (one iteration fewer misses by ≥ 100×)."""
    s_true = torch.linspace(-14, 14, 2001, dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    for low, high, steps in TANH_NEWTON_BUDGETS[dtype]:
        for alpha in torch.linspace(max(low, -0.95), high, 41, dtype=torch.float64).tolist():
            budget = activations.tanh_newton_budget(alpha, dtype)  # this bin's or a smaller inner bin's
            assert budget <= steps
            c = (s_true + alpha * torch.tanh(s_true)).to(dtype)
            exact, root = torch.empty_like(c, dtype=torch.float64), torch.empty_like(c)
            one_plus = torch.tensor(1 + alpha, dtype=torch.float64)
            activations.tanh_newton(c.double(), alpha, one_plus, 12, exact, torch.empty_like(exact))
            activations.tanh_newton(c, alpha, one_plus.to(dtype), budget, root, torch.empty_like(c))
            condition = (1 + abs(alpha)) / min(1.0, 1 + alpha)
            error = ((root.double() - exact).abs() / (1 + exact.abs())).max()
            assert error <= 2 * eps * condition, (alpha, float(error))


def test_budget_bins_are_nested_intervals_around_zero():
    for bins in TANH_NEWTON_BUDGETS.values():
        for (low, high, steps), (outer_low, outer_high, outer_steps) in zip(bins, bins[1:]):
            assert outer_low <= low < 0 < high <= outer_high and steps < outer_steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus", "leaky_relu"])
def test_solve_scalar_with_per_point_coefficients(name, dtype):
    """v + α h(βv + γ) = y with α, β, γ given per point (amortised layers), α β down to −0.95."""
    torch.manual_seed(0)
    n = 2000
    act = ACTIVATIONS[name]
    beta = torch.randn(n, dtype=torch.float64) * 2
    alpha = (torch.rand(n, dtype=torch.float64) * 8 - 0.95 / act.sup_derivative) / beta
    gamma = torch.randn(n, dtype=torch.float64)
    v_true = torch.randn(n, dtype=torch.float64) * 5
    y = v_true + alpha * act.fn(beta * v_true + gamma)
    v = scalar.solve_scalar(*(t.to(dtype) for t in (y, alpha, beta, gamma)), act).double()
    slope = 1 + alpha * beta * act.derivative(beta * v_true + gamma)
    error = (v - v_true).abs() / (1 + v_true.abs() + alpha.abs())
    assert float((error * slope).max()) < 8 * torch.finfo(dtype).eps


def test_tanh_fast_path_falls_back_when_its_check_fails(monkeypatch):
    torch.manual_seed(1)
    y, alpha, gamma = torch.randn(100, dtype=torch.float64) * 3, torch.tensor(4.0, dtype=torch.float64), torch.zeros(())
    beta = torch.ones((), dtype=torch.float64)
    fast = scalar.solve_scalar(y, alpha, beta, gamma.double(), ACTIVATIONS["tanh"])
    assert scalar._solve_fixed_budget(y, alpha, beta, gamma.double(), ACTIVATIONS["tanh"]) is not None
    monkeypatch.setitem(TANH_NEWTON_BUDGETS, torch.float64, ((-1.0, math.inf, 1),))
    # one step: the check fails
    assert scalar._solve_fixed_budget(y, alpha, beta, gamma.double(), ACTIVATIONS["tanh"]) is None
    safe = scalar.solve_scalar(y, alpha, beta, gamma.double(), ACTIVATIONS["tanh"])
    torch.testing.assert_close(safe, fast, atol=1e-14, rtol=0)
    torch.testing.assert_close(fast + 4 * torch.tanh(fast), y, atol=1e-14, rtol=0)
