"""Planar layers: the reparametrisation at extreme inner products, both branches of piecewise-linear
activations, set_constrained."""

import math

import pytest
import torch
from tests.conftest import DTYPES
from tests.helpers import autograd_logdet, set_raw

import flowprobe as fp

TOL = {torch.float64: dict(logdet=1e-8, trip=1e-8), torch.float32: dict(logdet=2e-4, trip=1e-4)}


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "arctan", "softplus", "elu", "relu", "leaky_relu"])
@pytest.mark.parametrize("wu", [-1e3, 1e3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_planar_extreme_inner_products(activation, wu, dtype):
    layer = fp.Planar(2, activation).to(dtype)
    w = torch.tensor([1.0, 0.0])
    set_raw(layer, {"w": w, "u": w * wu, "b": torch.tensor(0.3)})
    with torch.no_grad():
        p = layer.constrained()
    bound = -(1 - layer.min_slope) / layer.act.sup_derivative
    assert float(p.wu) >= bound
    if wu < 0:
        assert math.isclose(float(p.wu), bound, rel_tol=1e-6)  # pushed to the bound, not beyond
    z = torch.rand(512, 2, dtype=dtype) * 100 - 50
    x, logdet = layer(z)
    z_back, _ = layer.inverse(x)
    tol = TOL[dtype]["trip"] * (1 + float(x.detach().abs().max()) / 50)  # |x| reaches ~1e3 when wᵀu = 1e3
    assert (z_back - z).abs().max() < tol
    reference = autograd_logdet(layer.double(), z.double()).detach()
    assert (logdet.double() - reference).abs().max() < TOL[dtype]["logdet"] * (1 + float(reference.abs().max()))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_both_branches_of_piecewise_linear_activations(activation):
    layer = fp.Planar(2, activation).double()
    layer.set_constrained(u=torch.tensor([0.8, -0.3]), w=torch.tensor([1.0, 0.5]), b=0.2)
    z = 3 * torch.randn(400, 2, dtype=torch.float64)
    p = layer.constrained()
    pre = z @ p.w[0] + p.b[0]
    assert (pre > 0).sum() > 50 and (pre < 0).sum() > 50
    left = 0.0 if activation == "relu" else 0.01
    expected = torch.where(pre > 0, torch.log1p(p.wu[0]), torch.log1p(left * p.wu[0]))
    x, logdet = layer(z)
    assert (logdet - expected).abs().max() < 1e-14
    assert (logdet - autograd_logdet(layer, z)).abs().max() < 1e-12
    assert (layer.inverse(x)[0] - z).abs().max() < 1e-12


def test_set_constrained_gives_exact_formula_parameters():
    planar = fp.Planar(2, "tanh").double()
    u, w = torch.tensor([0.3, -2.0], dtype=torch.float64), torch.tensor([1.5, 0.5], dtype=torch.float64)
    planar.set_constrained(u, w, -0.7)
    p = planar.constrained()
    assert (p.u[0] - u).abs().max() < 1e-14 and (p.w[0] - w).abs().max() == 0 and float(p.b[0].detach()) == -0.7
    with pytest.raises(ValueError, match="planar layer needs wᵀu >"):
        planar.set_constrained(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0]), 0.0)


def test_zero_w_is_a_translation_with_zero_log_det():
    layer = fp.Planar(3, "tanh").double()
    set_raw(layer, {"w": torch.zeros(3), "u": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor(0.5)})
    z = torch.randn(5, 3, dtype=torch.float64)
    x, logdet = layer(z)
    assert torch.equal(logdet, torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(x - z, torch.tanh(torch.tensor(0.5, dtype=torch.float64)) * torch.tensor(
        [[1.0, 2.0, 3.0]], dtype=torch.float64).expand(5, 3))
    assert (layer.inverse(x)[0] - z).abs().max() < 1e-14


@pytest.mark.parametrize("factory", [lambda: fp.Planar(2, "softmax"), lambda: fp.Planar(2, min_slope=0),
                                     lambda: fp.Planar(2, layers=0), lambda: fp.Planar(0),
                                     lambda: fp.Planar(2, ensemble=(2, 0))])
def test_bad_constructor_arguments_are_named(factory):
    with pytest.raises(ValueError):
        factory()


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "arctan"])
def test_bounded_planar_layers_move_points_less_than_u_max_times_sup_h(activation):
    torch.manual_seed(0)
    layer = fp.build_flow(f"planar:16:{activation}:umax=0.7", 3, torch.float64).stacks[0]
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 30.0)  # raw values far outside the bound
    p = layer.constrained()
    assert float(p.u.detach().norm(dim=-1).max()) <= 0.7 * (1 + 1e-12) and layer.invertibility().invertible
    z = 5 * torch.randn(2000, 3, dtype=torch.float64)
    x = layer(z)[0].detach()
    assert float((x - z).norm(dim=-1).max()) <= 16 * layer.displacement * (1 + 1e-12)
    assert layer.displacement == 0.7 * layer.act.bound
    assert (layer.inverse(x)[0] - z).abs().max() < 1e-8


def test_bounded_set_constrained_round_trips_and_refuses_long_u():
    layer = fp.Planar(2, "tanh", u_max=1.0).double()
    u, w = torch.tensor([0.3, -0.5], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    layer.set_constrained(u, w, 0.1)
    torch.testing.assert_close(layer.constrained().u[0], u, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="needs ‖u‖ < u_max = 1"):
        layer.set_constrained(torch.tensor([1.0, 0.5]), w, 0.0)
    with pytest.raises(ValueError, match="u_max must be a positive number"):
        fp.Planar(2, u_max=0)
