"""Per-layer harness (after Pyro's per-transform tests): every family × activation × dtype."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tests.conftest import DTYPES
from tests.helpers import CASES, autograd_logdet, batch_jacobian, set_raw
from torch.autograd import gradcheck

import flowprobe as fp
from flowprobe.layers.householder import householder_matrix

NAMES = sorted(CASES)
TOL = {torch.float64: dict(logdet=1e-8, trip=1e-8), torch.float32: dict(logdet=2e-4, trip=1e-4)}


def make(name, dim=3, dtype=torch.float64):
    layer = CASES[name](dim).to(dtype)
    if name == "general-sylvester":  # certified invertible: ‖BᵀA‖·sup h' < 1
        with torch.no_grad():
            layer.A.mul_(0.5 / max(1.0, float(layer.lipschitz_bound())))
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_logdet_matches_autograd_slogdet(name, dtype):
    layer = make(name, dtype=dtype)
    z = 2 * torch.randn(64, 3, dtype=torch.float64).to(dtype)
    x, logdet = layer(z)
    reference = autograd_logdet(layer.double(), z.double())
    assert x.dtype == dtype and logdet.dtype == dtype and logdet.shape == (64,)
    assert torch.isfinite(logdet).all()
    assert (logdet.double() - reference).abs().max() < TOL[dtype]["logdet"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_inverse_round_trip(name, dtype):
    layer = make(name, dtype=dtype)
    z = (torch.rand(256, 3, dtype=torch.float64) * 100 - 50).to(dtype)  # |z| <= 50
    x, logdet = layer(z)
    z_back, logdet_inv = layer.inverse(x)
    assert z_back.dtype == dtype
    assert (z_back - z).abs().max() < TOL[dtype]["trip"]
    assert (logdet + logdet_inv).abs().max() < TOL[dtype]["logdet"]


@pytest.mark.parametrize("name", NAMES)
def test_inverse_log_det_matches_autograd_of_inverse(name):
    layer = make(name)
    x = 2 * torch.randn(16, 3, dtype=torch.float64)
    p = layer.constrained()
    jac = batch_jacobian(lambda v: layer.invert(v, p)[0], x)
    _, logdet_inv = layer.inverse(x)
    assert (logdet_inv - torch.linalg.slogdet(jac).logabsdet).abs().max() < 1e-8


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_raw_parameter(name):
    layer = make(name)
    z = torch.randn(32, 3, dtype=torch.float64)
    x, logdet = layer(z)
    (x.sum() + logdet.sum()).backward()
    forward_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    z_back, logdet_inv = layer.inverse(x.detach())
    (z_back.sum() + logdet_inv.sum()).backward()
    for n, p in layer.named_parameters():
        assert torch.isfinite(forward_grads[n]).all() and forward_grads[n].abs().sum() > 0, n
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", ["planar-tanh", "planar-softplus", "planar-leaky_relu", "radial",
                                  "sylvester-orthogonal-tanh", "sylvester-triangular-elu", "general-sylvester"])
def test_inverse_gradients_match_finite_differences(name):
    """The implicit-function gradients of the iterative inverses are exact (gradcheck)."""
    layer = make(name)
    names = [n for n, _ in layer.named_parameters()]
    raw = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    x = (2 * torch.randn(6, 3, dtype=torch.float64)).requires_grad_(True)

    def inverse(x, *values):
        params = {n: v.unsqueeze(0).expand(x.shape[0], *v.shape) for n, v in zip(names, values)}
        z, logdet_inv = layer.inverse(x, params=params)
        return z, logdet_inv

    assert gradcheck(inverse, (x, *raw), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_batched_raw_parameters_take_the_same_code_path(name):
    """Amortised use: one parameter set per point gives exactly the per-point results."""
    layer = make(name)
    n = 5
    flat = 0.5 * torch.randn(n, layer.raw_numel, dtype=torch.float64)
    params = layer.unflatten(flat)
    z = torch.randn(n, 3, dtype=torch.float64)
    x, logdet = layer(z, params=params)
    if name != "general-sylvester":
        z_back, logdet_inv = layer.inverse(x, params=params)
        assert (z_back - z).abs().max() < 1e-10
        assert (logdet + logdet_inv).abs().max() < 1e-10
    for i in range(n):
        set_raw(layer, {k: v[i] for k, v in params.items()})
        xi, ldi = layer(z[i : i + 1])
        assert (xi - x[i]).abs().max() < 1e-12 and (ldi - logdet[i]).abs().max() < 1e-12


def test_batched_params_with_wrong_shape_are_rejected():
    layer = fp.Planar(3)
    with pytest.raises(ValueError, match=r"params\['u'\] must have shape \(4, 3\)"):
        layer(torch.randn(4, 3), params={"u": torch.randn(2, 3), "w": torch.randn(4, 3), "b": torch.randn(4)})
    with pytest.raises(ValueError, match="flat parameters must have shape"):
        layer.unflatten(torch.randn(4, 6))


# -- adversarial raw parameters (hypothesis) -------------------------------------------------

EXTREME = st.one_of(
    st.floats(-1e3, 1e3, allow_subnormal=False),
    st.sampled_from([0.0, -1e3, 1e3, -60.0, 60.0, 1e-8]),
)


@st.composite
def raw_parameters(draw, layer):
    return {
        name: draw(arrays(np.float64, shape, elements=EXTREME))
        for name, shape in layer.raw_shapes().items()
    }


INVERTIBLE_BY_CONSTRUCTION = [n for n in NAMES if n != "general-sylvester"]


@pytest.mark.parametrize("name", INVERTIBLE_BY_CONSTRUCTION)
@given(data=st.data())
def test_any_raw_parameters_give_an_invertible_layer(name, data):
    layer = make(name)
    set_raw(layer, data.draw(raw_parameters(layer)))
    report = layer.invertibility()
    assert report.invertible
    if hasattr(layer, "min_slope"):  # the margin holds up to rounding of raw values as large as 1e3
        assert report.margin >= layer.min_slope * (1 - 1e-6)
    z = torch.rand(32, 3, dtype=torch.float64) * 20 - 10
    x, logdet = layer(z)
    assert torch.isfinite(x).all() and torch.isfinite(logdet).all()
    reference, accuracy = autograd_logdet(layer, z, with_accuracy=True)
    assert ((logdet - reference).abs() - accuracy).max() < 1e-8
    z_back, logdet_inv = layer.inverse(x)
    scale = 1 + x.abs().max()
    assert (z_back - z).abs().max() < 1e-8 * scale
    assert torch.isfinite(logdet_inv).all()


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
    assert float(p.wu) >= bound - 1e-6 * abs(bound)
    if wu < 0:
        assert math.isclose(float(p.wu), bound, rel_tol=1e-6)  # pushed to the bound, not beyond
    z = torch.rand(512, 2, dtype=dtype) * 100 - 50
    x, logdet = layer(z)
    z_back, _ = layer.inverse(x)
    tol = TOL[dtype]["trip"] * (1 + float(x.detach().abs().max()) / 50)  # |x| reaches ~1e3 when wᵀu = 1e3
    assert (z_back - z).abs().max() < tol
    reference = autograd_logdet(layer.double(), z.double())
    assert (logdet.double() - reference).abs().max() < TOL[dtype]["logdet"] * (1 + float(reference.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_radial_beta_just_above_minus_alpha(dtype):
    layer = fp.Radial(2).to(dtype)
    set_raw(layer, {"z0": torch.tensor([0.5, -0.5]), "alpha": torch.tensor(0.0), "beta": torch.tensor(-60.0)})
    p = layer.constrained()
    assert float(p.beta) > -float(p.alpha)
    assert math.isclose(1 + float(p.beta / p.alpha), layer.min_slope, rel_tol=1e-5)
    z = torch.cat([p.z0.detach() + 1e-3 * torch.randn(64, 2, dtype=dtype), torch.rand(448, 2, dtype=dtype) * 100 - 50])
    x, logdet = layer(z)
    z_back, logdet_inv = layer.inverse(x)
    assert (z_back - z).abs().max() < TOL[dtype]["trip"]
    assert (logdet + logdet_inv).abs().max() < TOL[dtype]["logdet"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_radial_inverse_at_the_centre(dtype):
    layer = fp.Radial(3).to(dtype)
    z0 = layer.z0.detach().unsqueeze(0)
    z, logdet_inv = layer.inverse(z0.clone())
    assert torch.equal(z, z0)
    x, logdet = layer(z0.clone())
    assert torch.equal(x, z0)
    p = layer.constrained()
    expected = 3 * math.log1p(float(p.beta / p.alpha))  # J = (1 + β/α) I at the centre
    assert abs(float(logdet) - expected) < 1e-5 and abs(float(logdet_inv) + expected) < 1e-5


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
    layer = fp.Sylvester(5, hidden=5 if kind == "triangular" else 3, kind=kind).double()
    q = layer.constrained().q
    assert (q.T @ q - torch.eye(q.shape[1], dtype=q.dtype)).abs().max() < 1e-12


@pytest.mark.parametrize("layer", [fp.Planar(2, "relu"), fp.Planar(2, "leaky_relu"),
                                   fp.Sylvester(2, kind="triangular", activation="relu")], ids=repr)
def test_both_branches_of_piecewise_linear_activations(layer):
    layer = layer.double()
    with torch.no_grad():
        if isinstance(layer, fp.Planar):
            layer.set_constrained(u=torch.tensor([0.8, -0.3]), w=torch.tensor([1.0, 0.5]), b=0.2)
    z = 3 * torch.randn(400, 2, dtype=torch.float64)
    p = layer.constrained()
    if isinstance(layer, fp.Planar):
        pre = z @ p.w + p.b
        assert (pre > 0).sum() > 50 and (pre < 0).sum() > 50
        left = 0.0 if layer.act.name == "relu" else 0.01
        expected = torch.where(pre > 0, torch.log1p(p.wu), torch.log1p(left * p.wu))
        assert (layer(z)[1] - expected).abs().max() < 1e-14
    else:
        pre = z @ p.q @ p.r_tilde.T + p.b
        assert ((pre > 0).all(1).sum() > 20) and ((pre < 0).all(1).sum() > 20)
    x, logdet = layer(z)
    assert (logdet - autograd_logdet(layer, z)).abs().max() < 1e-12
    z_back, _ = layer.inverse(x)
    assert (z_back - z).abs().max() < 1e-12


def test_householder_is_an_involution_with_unit_determinant():
    layer = fp.Householder(4, reflections=1).double()
    z = torch.randn(10, 4, dtype=torch.float64)
    x, logdet = layer(z)
    assert torch.equal(logdet, torch.zeros(10, dtype=torch.float64))
    assert (layer(x)[0] - z).abs().max() < 1e-14  # H² = I
    h = householder_matrix(layer.v.detach(), 4, 4)
    assert (h @ h - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-14
    assert math.isclose(float(torch.linalg.det(h)), -1.0, abs_tol=1e-12)


def test_set_constrained_gives_exact_formula_parameters():
    planar = fp.Planar(2, "tanh").double()
    u, w = torch.tensor([0.3, -2.0], dtype=torch.float64), torch.tensor([1.5, 0.5], dtype=torch.float64)
    planar.set_constrained(u, w, -0.7)
    p = planar.constrained()
    assert (p.u - u).abs().max() < 1e-14 and (p.w - w).abs().max() == 0 and float(p.b) == -0.7
    with pytest.raises(ValueError, match="planar layer needs wᵀu >"):
        planar.set_constrained(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0]), 0.0)
    radial = fp.Radial(2).double()
    radial.set_constrained(torch.tensor([1.0, 2.0]), 0.7, -0.5)
    r = radial.constrained()
    assert abs(float(r.alpha) - 0.7) < 1e-14 and abs(float(r.beta) + 0.5) < 1e-14
    with pytest.raises(ValueError, match="radial layer needs"):
        radial.set_constrained(torch.tensor([1.0, 2.0]), 0.7, -0.7)


def test_general_sylvester_refuses_an_uncertified_inverse():
    layer = fp.GeneralSylvester(3, hidden=2).double()
    with torch.no_grad():
        layer.A.copy_(torch.full((3, 2), 2.0))
        layer.B.copy_(torch.full((3, 2), 2.0))
    report = layer.invertibility()
    assert not report.invertible and report.margin < 0
    x, _ = layer(torch.randn(4, 3, dtype=torch.float64))  # forward is always available
    with pytest.raises(fp.InverseNotAvailable, match="not certified invertible"):
        layer.inverse(x)


@pytest.mark.parametrize("factory", [lambda: fp.Planar(2, "softmax"), lambda: fp.Planar(2, min_slope=0),
                                     lambda: fp.Sylvester(3, kind="diagonal"), lambda: fp.Sylvester(3, hidden=4),
                                     lambda: fp.Sylvester(3, hidden=2, kind="triangular"),
                                     lambda: fp.Householder(3, reflections=0), lambda: fp.Radial(0)])
def test_bad_constructor_arguments_are_named(factory):
    with pytest.raises(ValueError):
        factory()


@pytest.mark.parametrize("name", NAMES)
def test_device_and_dtype_follow_the_input(name):
    layer = make(name, dtype=torch.float32)
    z = torch.randn(8, 3)
    x, logdet = layer(z)
    z_back, logdet_inv = layer.inverse(x)
    for t in (x, logdet, z_back, logdet_inv):
        assert t.dtype == torch.float32 and t.device == z.device
