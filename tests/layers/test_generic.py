"""The generic per-family harness (after Pyro's per-transform tests): every registered family's
examples × dtype, including families registered outside flowprobe (see ``custom_family.py``)."""

import pickle

import pytest
import torch
from tests.conftest import DTYPES
from tests.helpers import CASES, autograd_logdet, batch_jacobian, inverse_plain, make, perturb
from torch.autograd import gradcheck

import flowprobe as fp
from flowprobe.activations import Activation, _arctan_derivative, _arctan_second
from flowprobe.layers import families

NAMES = sorted(CASES)
TOL = {torch.float64: dict(logdet=1e-8, trip=1e-8), torch.float32: dict(logdet=2e-4, trip=1e-4)}
EXACT = 1e-12


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
    jac = batch_jacobian(lambda v: inverse_plain(layer, v)[0], x)
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
    """The implicit-function gradients of the iterative inverses are exact (gradcheck), per point."""
    layer = make(name, layers=2)
    perturb(layer, 0.0 if name == "general-sylvester" else 0.3)  # the general layer stays certified
    names = [n for n, _ in layer.named_parameters()]
    raw = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    x = (2 * torch.randn(6, 3, dtype=torch.float64)).requires_grad_(True)

    def inverse(x, *values):
        params = {n: v.expand(x.shape[0], *v.shape) for n, v in zip(names, values)}
        return layer.inverse(x, params=params)

    assert gradcheck(inverse, (x, *raw), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_per_point_parameters_equal_a_loop_over_points(name):
    """Amortised use: one parameter set per point (``(N, K, …)``) gives exactly the plain stack's
    results point by point, both ways."""
    layer = make(name, layers=2)
    n = 5
    scale = 0.2 if name == "general-sylvester" else 0.5  # keeps the general layer certified invertible
    params = layer.unflatten(scale * torch.randn(n, layer.raw_numel, dtype=torch.float64))
    z = torch.randn(n, 3, dtype=torch.float64)
    x, logdet = layer(z, params=params)
    z_back, logdet_inv = layer.inverse(x, params=params)
    for i in range(n):
        with torch.no_grad():
            for key, value in params.items():
                getattr(layer, key).copy_(value[i])
        xi, ldi = layer(z[i : i + 1])
        zi, ldii = layer.inverse(x[i : i + 1])
        assert (xi - x[i]).abs().max() < EXACT and (ldi - logdet[i]).abs().max() < EXACT
        assert (zi - z_back[i]).abs().max() < EXACT and (ldii - logdet_inv[i]).abs().max() < EXACT
    assert (z_back - z).abs().max() < 1e-10


def _grads(module, out, logdet):
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    loss = (out * weights).sum() + 0.7 * logdet.sum()
    return torch.autograd.grad(loss, list(module.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_a_stack_equals_its_layers_in_sequence(name):
    """``K`` layers in one stack = ``K`` one-layer stacks with the same raw values, with gradients."""
    stack = make(name, layers=4)
    perturb(stack, 0.0 if name == "general-sylvester" else 0.3)
    cls, kwargs = CASES[name]
    flips = getattr(stack, "flip", None)  # per-layer settings (Sylvester's alternating flips) go along
    singles = [cls(3, **kwargs | ({"flip": flips[i]} if flips else {})).double() for i in range(4)]
    for i, single in enumerate(singles):
        with torch.no_grad():
            for key, p in single.named_parameters():
                p.copy_(getattr(stack, key)[i])
    chain = fp.Flow(fp.StandardNormal(3), singles)
    z = torch.randn(9, 3, dtype=torch.float64)
    for direction in ("forward", "inverse"):
        out_s, ld_s = stack(z) if direction == "forward" else stack.inverse(z)
        out_c, ld_c = chain(z) if direction == "forward" else chain.inverse(z)
        torch.testing.assert_close(out_s, out_c, atol=EXACT, rtol=0)
        torch.testing.assert_close(ld_s, ld_c, atol=EXACT, rtol=0)
        grads_c = _grads(chain, out_c, ld_c)
        for j, (key, g) in enumerate(zip([k for k, _ in stack.named_parameters()], _grads(stack, out_s, ld_s))):
            per_layer = torch.cat([grads_c[i * len(grads_c) // 4 + j] for i in range(4)])
            torch.testing.assert_close(g, per_layer, atol=EXACT, rtol=EXACT, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_ensemble_members_equal_their_solo_stacks(name):
    """``ensemble=E``: member ``e`` of the batched evaluation equals member ``e`` run alone,
    values, log-dets and gradients, both directions."""
    stack = make(name, layers=2, ensemble=3)
    perturb(stack, 0.0 if name == "general-sylvester" else 0.3)
    flow = fp.Flow(fp.StandardNormal(3), [stack])
    z = torch.randn(3, 7, 3, dtype=torch.float64)
    for direction in ("forward", "inverse"):
        out, ld = flow(z) if direction == "forward" else flow.inverse(z)
        assert out.shape == (3, 7, 3) and ld.shape == (3, 7)
        grads = _grads(flow, out, ld)
        for e in range(3):
            solo = flow.member(e)
            out_e, ld_e = solo(z[e]) if direction == "forward" else solo.inverse(z[e])
            torch.testing.assert_close(out[e], out_e, atol=EXACT, rtol=0)
            torch.testing.assert_close(ld[e], ld_e, atol=EXACT, rtol=0)
            for g, g_e in zip(grads, _grads(solo, out_e, ld_e), strict=True):
                torch.testing.assert_close(g[e], g_e, atol=EXACT, rtol=EXACT)


@pytest.mark.parametrize("name", NAMES)
def test_device_and_dtype_follow_the_input(name):
    layer = make(name, dtype=torch.float32)
    z = torch.randn(8, 3)
    x, logdet = layer(z)
    z_back, logdet_inv = layer.inverse(x)
    for t in (x, logdet, z_back, logdet_inv):
        assert t.dtype == torch.float32 and t.device == z.device


@pytest.mark.parametrize("name", NAMES)
def test_layers_pickle_and_keep_their_numbers(name):
    layer = make(name, layers=2)
    copy = pickle.loads(pickle.dumps(layer))
    z = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(copy(z)[0], layer(z)[0])


ACTIVATION_FAMILIES = [f for f in families().values() if any(o.key == "activation" for o in f.options)]
# Named "tanh" but computing arctan: a kernel chosen by name would use tanh's Newton and be wrong.
IMPOSTOR = Activation("tanh", torch.atan, _arctan_derivative, _arctan_second, 1.0)


@pytest.mark.parametrize("family", ACTIVATION_FAMILIES, ids=lambda f: f.name)
def test_a_custom_activation_is_handled_exactly(family):
    kwargs = {"hidden": 2} if family.name == "general_sylvester" else {}
    layer = family.cls(3, activation=IMPOSTOR, layers=4, **kwargs).double()
    reference = family.cls(3, activation="arctan", layers=4, **kwargs).double()
    reference.load_state_dict(layer.state_dict())
    z = 3 * torch.randn(200, 3, dtype=torch.float64)
    x, logdet = layer(z)
    torch.testing.assert_close(x, reference(z)[0], atol=EXACT, rtol=0)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            z_back, logdet_inv = layer.inverse(x.detach())
        assert (z_back - z).abs().max() < 1e-10 and (logdet + logdet_inv).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_start_at_identity_is_the_identity_and_training_can_leave_it(name, dtype):
    layer = make(name, layers=3, ensemble=2, dtype=dtype)
    perturb(layer)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    if not layer.start_at_identity():  # a family without an identity is left exactly as it was
        assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())
        assert layer.identity_raw(layer.own_raw()) is None
        return
    z = (3 * torch.randn(2, 64, 3, dtype=torch.float64)).to(dtype)
    x, logdet = layer(z)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (x - z).abs().max() < tol and logdet.abs().max() < tol
    (x.pow(3).sum() + logdet.sum()).backward()  # a first gradient step moves the layers off the identity
    assert sum(float(p.grad.abs().sum()) for p in layer.parameters()) > 1e-3
    assert layer.family != "householder"  # reflections have no identity; every other built-in family has one


def test_no_identity_where_the_constraint_excludes_it():
    """``ε = 1`` keeps planar's ``α`` and radial's ``β`` strictly positive: no identity, nothing changed."""
    for layer in (fp.Planar(3, min_slope=1.0), fp.Radial(3, min_slope=1.0)):
        before = [p.detach().clone() for p in layer.parameters()]
        assert not layer.start_at_identity()
        assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before, strict=True))
