"""Radial layers: β at its bound, the inverse at the centre, set_constrained."""

import math

import pytest
import torch
from tests.conftest import DTYPES
from tests.helpers import set_raw

import flowprobe as fp

TOL = {torch.float64: dict(logdet=1e-8, trip=1e-8), torch.float32: dict(logdet=2e-4, trip=1e-4)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_radial_beta_just_above_minus_alpha(dtype):
    layer = fp.Radial(2).to(dtype)
    set_raw(layer, {"z0": torch.tensor([0.5, -0.5]), "alpha": torch.tensor(0.0), "beta": torch.tensor(-60.0)})
    with torch.no_grad():
        p = layer.constrained()
    assert float(p.beta) > -float(p.alpha)
    assert math.isclose(1 + float(p.beta / p.alpha), layer.min_slope, rel_tol=1e-5)
    z0 = p.z0[0].detach()
    z = torch.cat([z0 + 1e-3 * torch.randn(64, 2, dtype=dtype), torch.rand(448, 2, dtype=dtype) * 100 - 50])
    x, logdet = layer(z)
    z_back, logdet_inv = layer.inverse(x)
    assert (z_back - z).abs().max() < TOL[dtype]["trip"]
    assert (logdet + logdet_inv).abs().max() < TOL[dtype]["logdet"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_radial_inverse_at_the_centre(dtype):
    layer = fp.Radial(3).to(dtype)
    z0 = layer.z0.detach().clone()  # (1, 3): the centre of the one layer, as a point
    z, logdet_inv = layer.inverse(z0.clone())
    assert torch.equal(z, z0)
    x, logdet = layer(z0.clone())
    assert torch.equal(x, z0)
    p = layer.constrained()
    expected = 3 * math.log1p(float(p.beta / p.alpha))  # J = (1 + β/α) I at the centre
    assert abs(float(logdet) - expected) < 1e-5 and abs(float(logdet_inv) + expected) < 1e-5


def test_set_constrained_gives_exact_formula_parameters():
    radial = fp.Radial(2).double()
    radial.set_constrained(torch.tensor([1.0, 2.0]), 0.7, -0.5)
    r = radial.constrained()
    assert abs(float(r.alpha) - 0.7) < 1e-14 and abs(float(r.beta) + 0.5) < 1e-14
    with pytest.raises(ValueError, match="radial layer needs"):
        radial.set_constrained(torch.tensor([1.0, 2.0]), 0.7, -0.7)
