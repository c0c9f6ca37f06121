"""Sylvester layers: diagonals at their bound, orthonormal bases, alternating flips, both branches of
ReLU, and the general (certified) residual layer."""

import math

import pytest
import torch
from tests.helpers import autograd_logdet, set_raw

import flowprobe as fp


@pytest.mark.parametrize("kind", ["orthogonal", "householder", "triangular"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_sylvester_diagonals_near_the_bound(kind, activation):
    layer = fp.Sylvester(4, hidden=4, kind=kind, activation=activation).double()
    set_raw(layer, {"d1": torch.full((4,), 40.0), "d2": torch.full((4,), -40.0), "D": 3 * torch.randn(4, 4)})
    report = layer.invertibility()
    assert report.invertible and math.isclose(report.margin, layer.min_slope, rel_tol=1e-6)
    z = torch.rand(256, 4, dtype=torch.float64) * 100 - 50
    x, logdet = layer(z)
    z_back, _ = layer.inverse(x)
    assert (z_back - z).abs().max() < 1e-8 * (1 + float(x.abs().max()))
    assert (logdet - autograd_logdet(layer, z)).abs().max() < 1e-8


@pytest.mark.parametrize("kind", ["orthogonal", "householder", "triangular"])
def test_sylvester_basis_is_orthonormal(kind):
    layer = fp.Sylvester(5, hidden=5 if kind == "triangular" else 3, kind=kind, layers=3).double()
    q = layer.constrained().q
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    assert (q.transpose(-1, -2) @ q - eye).abs().max() < 1e-12


def test_triangular_stacks_alternate_the_flip_and_views_report_it():
    layer = fp.Sylvester(3, kind="triangular", layers=4)
    assert layer.flip == (False, True, False, True)
    assert [view.flip for view in layer] == [False, True, False, True]
    q = layer.constrained().q
    assert torch.equal(q[1], torch.eye(3).flip(-1)) and torch.equal(q[2], torch.eye(3))
    with pytest.raises(ValueError, match="one value per layer"):
        fp.Sylvester(3, kind="triangular", layers=2, flip=(True,))


def test_both_branches_of_relu():
    layer = fp.Sylvester(2, kind="triangular", activation="relu").double()
    z = 3 * torch.randn(400, 2, dtype=torch.float64)
    p = layer.constrained()
    pre = z @ p.q[0] @ p.r_tilde[0].T + p.b[0]
    assert ((pre > 0).all(1).sum() > 20) and ((pre < 0).all(1).sum() > 20)
    x, logdet = layer(z)
    assert (logdet - autograd_logdet(layer, z)).abs().max() < 1e-12
    assert (layer.inverse(x)[0] - z).abs().max() < 1e-12


def test_general_sylvester_refuses_an_uncertified_inverse():
    layer = fp.GeneralSylvester(3, hidden=2).double()
    assert layer.invertibility().invertible  # the initialisation is certified
    with torch.no_grad():
        layer.A.fill_(2.0)
        layer.B.fill_(2.0)
    report = layer.invertibility()
    assert not report.invertible and report.margin < 0
    x, _ = layer(torch.randn(4, 3, dtype=torch.float64))  # forward is always available
    with pytest.raises(fp.InverseNotAvailable, match="not certified invertible"):
        layer.inverse(x)


@pytest.mark.parametrize("factory", [lambda: fp.Sylvester(3, kind="diagonal"), lambda: fp.Sylvester(3, hidden=4),
                                     lambda: fp.Sylvester(3, hidden=2, kind="triangular"),
                                     lambda: fp.GeneralSylvester(3, hidden=0)])
def test_bad_constructor_arguments_are_named(factory):
    with pytest.raises(ValueError):
        factory()
