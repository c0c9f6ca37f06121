"""The fused evaluation of same-family runs equals the layer-by-layer path (flowprobe.layers.fused)."""

import copy
import math

import pytest
import torch

import flowprobe as fp
from flowprobe.layers import fused, scalar

TOL = 1e-12
FAMILIES = {
    "planar-tanh": lambda d, i: fp.Planar(d, "tanh"),
    "planar-sigmoid": lambda d, i: fp.Planar(d, "sigmoid"),
    "planar-arctan": lambda d, i: fp.Planar(d, "arctan"),
    "planar-softplus": lambda d, i: fp.Planar(d, "softplus"),
    "planar-elu": lambda d, i: fp.Planar(d, "elu"),
    "planar-leaky_relu": lambda d, i: fp.Planar(d, "leaky_relu"),
    "radial": lambda d, i: fp.Radial(d),
    "householder": lambda d, i: fp.Householder(d, reflections=3),
    "sylvester-O": lambda d, i: fp.Sylvester(d, kind="orthogonal"),
    "sylvester-H": lambda d, i: fp.Sylvester(d, kind="householder", reflections=3),
    "sylvester-T": lambda d, i: fp.Sylvester(d, kind="triangular", flip=i % 2 == 1),
    "general-sylvester": lambda d, i: fp.GeneralSylvester(d, hidden=2),
}


def make_flow(family, dim=3, k=5, seed=0):
    torch.manual_seed(seed)
    layers = [FAMILIES[family](dim, i) for i in range(k)]
    flow = fp.Flow(fp.StandardNormal(dim), layers).double()
    scale = 0.0 if family == "general-sylvester" else 0.3  # keep GeneralSylvester certified invertible
    with torch.no_grad():  # move away from the (near-identity) initialisation
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


def evaluate(flow, direction, points, fusion):
    """Output, log-det and the gradients of a fixed scalar w.r.t. the points and every parameter."""
    points = points.clone().requires_grad_(True)
    with fused.fusion(fusion):
        out, logdet = flow(points) if direction == "forward" else flow.inverse(points)
    loss = (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum() + 0.7 * logdet.sum()
    params = list(flow.parameters())
    grads = torch.autograd.grad(loss, [points, *params])
    return out.detach(), logdet.detach(), grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_fused_equals_layer_by_layer(family, direction):
    flow = make_flow(family)
    assert len(flow.stacks) == 1
    points = torch.randn(9, 3, dtype=torch.float64)
    if direction == "inverse":
        with torch.no_grad():
            points = flow(points)[0]
    out_f, ld_f, grads_f = evaluate(flow, direction, points, fusion=True)
    out_l, ld_l, grads_l = evaluate(flow, direction, points, fusion=False)
    torch.testing.assert_close(out_f, out_l, atol=TOL, rtol=0)
    torch.testing.assert_close(ld_f, ld_l, atol=TOL, rtol=0)
    for g_f, g_l in zip(grads_f, grads_l, strict=True):
        torch.testing.assert_close(g_f, g_l, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_evaluation_without_autograd_equals_layer_by_layer(family, dtype):
    """The no-grad paths (in-place buffers, fixed Newton budgets) against the layers, both directions."""
    flow = make_flow(family, dim=4, k=6).to(dtype)
    z = 2 * torch.randn(300, 4, dtype=dtype)
    tol = TOL if dtype == torch.float64 else 5e-5
    with torch.no_grad():
        for direction, points in (("forward", z), ("inverse", flow(z)[0])):
            outputs = []
            for fusion in (True, False):
                with fused.fusion(fusion):
                    outputs.append(flow(points) if direction == "forward" else flow.inverse(points))
            (out_f, ld_f), (out_l, ld_l) = outputs
            torch.testing.assert_close(out_f, out_l, atol=tol * (1 + float(out_l.abs().max())), rtol=0)
            torch.testing.assert_close(ld_f, ld_l, atol=tol, rtol=0)
        torch.testing.assert_close(flow.inverse(flow(z)[0])[0], z, atol=tol * 10, rtol=0)
        if family.startswith("sylvester"):  # the fixed-budget path itself passed its check (no fallback)
            params = fused._sylvester_params(flow.stacks[0], 0, 6)
            assert fused._sylvester_tanh_inverse(flow(z)[0], params, flow.layers[0].act) is not None


@pytest.mark.parametrize("family", ["planar-tanh", "radial", "sylvester-O"])
def test_stacked_parameters_are_few_and_layers_read_views(family):
    flow = make_flow(family, k=6)
    n_raw = len(fp.Flow(fp.StandardNormal(3), [FAMILIES[family](3, 0)]).layers[0].raw_shapes())
    assert len(list(flow.parameters())) == n_raw  # one stacked tensor per raw parameter, not 6 × n_raw
    z = torch.randn(4, 3, dtype=torch.float64)
    with fused.fusion(False):
        expected = z
        for layer in flow.layers:
            expected = layer.transform(expected, layer.constrained())[0]
    x = z
    for layer in flow.layers:  # the public per-layer API still works on a fused flow
        x = layer(x)[0]
    torch.testing.assert_close(x, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(flow(z)[0], expected, atol=TOL, rtol=0)
    back = flow.layers[-1].inverse(x)[0]
    torch.testing.assert_close(flow.layers[-1](back)[0], x, atol=TOL, rtol=0)


def test_set_constrained_writes_through_to_the_stack():
    flow = make_flow("planar-tanh", dim=2, k=3)
    u, w = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    flow.layers[1].set_constrained(u, w, 0.5)
    p = flow.layers[1].constrained()
    torch.testing.assert_close(p.u, u, atol=TOL, rtol=0)
    assert float(flow.stacks[0].b.detach()[1]) == 0.5


def test_state_dict_keeps_per_layer_keys_and_round_trips():
    torch.manual_seed(3)
    plain_layers = [fp.Planar(2) for _ in range(4)]
    reference = {
        f"layers.{i}.{name}": p.detach().clone()
        for i, layer in enumerate(plain_layers)
        for name, p in layer.named_parameters()
    }
    flow = fp.Flow(fp.StandardNormal(2), plain_layers)
    state = flow.state_dict()
    unfused = fp.Flow(fp.StandardNormal(2), [fp.Householder(2), fp.Planar(2)]).state_dict()
    assert set(state) == set(reference) | {k for k in unfused if not k.startswith("layers.")}
    for key, value in reference.items():
        assert torch.equal(state[key], value)
    torch.manual_seed(4)
    other = fp.Flow(fp.StandardNormal(2), [fp.Planar(2) for _ in range(4)])
    other.load_state_dict(state)
    z = torch.randn(5, 2)
    torch.testing.assert_close(other(z)[0], flow(z)[0], atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="Missing"):
        other.load_state_dict({k: v for k, v in state.items() if k != "layers.2.u"})


def test_amortised_parameters_fall_back_to_the_layers():
    flow = make_flow("planar-tanh", dim=2, k=3)
    z = torch.randn(6, 2, dtype=torch.float64)
    own = [{n: t.expand(6, *t.shape).clone() for n, t in layer.own_raw().items()} for layer in flow.layers]
    x_given, ld_given = flow(z, params=own)
    x, ld = flow(z)
    torch.testing.assert_close(x_given, x, atol=TOL, rtol=0)
    torch.testing.assert_close(ld_given, ld, atol=TOL, rtol=0)


def test_planar_inverse_falls_back_when_the_newton_budget_is_too_small(monkeypatch):
    flow = make_flow("planar-tanh", dim=2, k=4)
    x = flow(torch.randn(50, 2, dtype=torch.float64))[0].detach()
    calls = []

    def counting_solver(*args):
        calls.append(1)
        return fp.layers.scalar.solve_scalar(*args)

    monkeypatch.setattr(fused, "solve_scalar", counting_solver)
    with torch.no_grad():
        z_ok, ld_ok = flow.inverse(x)
    assert not calls  # the fixed Newton budget passed its check
    # now the check fails: safeguarded solver
    monkeypatch.setitem(scalar.NEWTON_BUDGETS, torch.float64, ((-1.0, math.inf, 1),))
    with torch.no_grad():
        z_fb, ld_fb = flow.inverse(x)
    assert len(calls) == 4
    torch.testing.assert_close(z_fb, z_ok, atol=TOL, rtol=0)
    torch.testing.assert_close(ld_fb, ld_ok, atol=TOL, rtol=0)


def test_mixed_runs_sub_flows_and_copies_share_or_copy_parameters():
    torch.manual_seed(5)
    layers = [fp.Planar(2), fp.Planar(2), fp.Radial(2), fp.Householder(2), fp.Radial(2), fp.Radial(2)]
    flow = fp.Flow(fp.StandardNormal(2), layers)
    assert len(flow.stacks) == 2  # the planar pair and the last radial pair; the rest stay as they are
    head = fp.Flow(fp.StandardNormal(2), list(flow.layers[:3]))
    assert head.stacks[0] is flow.stacks[0]  # shared parameters, as the layers were shared
    z = torch.randn(5, 2)
    x_head = head(z)[0]
    with fused.fusion(False):
        torch.testing.assert_close(x_head, head(z)[0])
    clone = copy.deepcopy(flow)
    with torch.no_grad():
        clone.stacks[0].u.add_(1.0)
    assert not torch.equal(clone(z)[0], flow(z)[0])
    torch.testing.assert_close(flow(z)[0], fp.Flow(fp.StandardNormal(2), list(flow.layers))(z)[0])


def test_fused_training_step_matches_layer_by_layer():
    results = []
    for fusion in (True, False):
        flow = make_flow("planar-tanh", dim=2, k=8, seed=7)
        opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
        torch.manual_seed(11)
        with fused.fusion(fusion):
            for _ in range(3):
                x, log_q = flow.rsample_and_log_prob(64)
                loss = (log_q + 0.5 * (x * x).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        results.append(torch.cat([p.detach().flatten() for p in flow.parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_evaluation_without_grad_equals_layer_by_layer(family):
    flow = make_flow(family)
    z = torch.randn(9, 3, dtype=torch.float64)
    with torch.no_grad():
        x_f, ld_f = flow(z)
        z_f, ldi_f = flow.inverse(x_f)
        with fused.fusion(False):
            x_l, ld_l = flow(z)
            z_l, ldi_l = flow.inverse(x_l)
    for fused_value, layered in ((x_f, x_l), (ld_f, ld_l), (z_f, z_l), (ldi_f, ldi_l)):
        torch.testing.assert_close(fused_value, layered, atol=TOL, rtol=0)


def test_radial_run_backward_passes_gradcheck():
    torch.manual_seed(8)
    k, d = 4, 3
    z = torch.randn(6, d, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(k, d, dtype=torch.float64, requires_grad=True)
    alpha = (0.2 + torch.rand(k, dtype=torch.float64)).requires_grad_(True)
    beta = (torch.rand(k, dtype=torch.float64) - 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(fused._RadialRun.apply, (z, z0, alpha, beta), eps=1e-6, atol=1e-8)


def test_radial_run_gradient_at_a_centre_equals_autograd():
    flow = make_flow("radial", dim=3, k=3)
    with torch.no_grad():
        centre = flow.stacks[0].z0[0].clone()
    points = torch.cat([centre.unsqueeze(0), torch.randn(4, 3, dtype=torch.float64)])  # r = 0 at layer 0
    out_f, ld_f, grads_f = evaluate(flow, "forward", points, fusion=True)
    out_l, ld_l, grads_l = evaluate(flow, "forward", points, fusion=False)
    torch.testing.assert_close(ld_f, ld_l, atol=TOL, rtol=0)
    for g_f, g_l in zip(grads_f, grads_l, strict=True):
        assert torch.isfinite(g_f).all()
        torch.testing.assert_close(g_f, g_l, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_planar_inverse_run_backward_passes_gradcheck(activation):
    torch.manual_seed(9)
    k, d = 3, 2
    layer = fp.Planar(d, activation).double()
    raw = {name: (torch.randn(k, *p.shape, dtype=torch.float64) * 0.5) for name, p in layer.named_parameters()}
    p = layer.constrain(raw)
    x = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    inputs = (x, *(t.detach().requires_grad_(True) for t in p))

    def run(x, u, w, b, wu):
        return fused._PlanarInverseRun.apply(x, u, w, b, wu, layer.act)

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-8)


def test_planar_inverse_gradients_survive_the_fallback(monkeypatch):
    flow = make_flow("planar-tanh", dim=3, k=4)
    x = flow(torch.randn(7, 3, dtype=torch.float64))[0].detach()
    out_l, ld_l, grads_l = evaluate(flow, "inverse", x, fusion=False)
    calls = []

    def counting_solver(*args):
        calls.append(1)
        return fp.layers.scalar.solve_scalar(*args)

    monkeypatch.setattr(fused, "solve_scalar", counting_solver)
    monkeypatch.setitem(scalar.NEWTON_BUDGETS, torch.float64, ((-1.0, math.inf, 1),))  # check fails: safeguarded
    out_f, ld_f, grads_f = evaluate(flow, "inverse", x, fusion=True)
    assert len(calls) == 4
    torch.testing.assert_close(out_f, out_l, atol=TOL, rtol=0)
    torch.testing.assert_close(ld_f, ld_l, atol=TOL, rtol=0)
    for g_f, g_l in zip(grads_f, grads_l, strict=True):
        torch.testing.assert_close(g_f, g_l, atol=1e-12, rtol=1e-12)


def test_radial_inverse_run_at_a_centre():
    """``x = z0`` of the last layer: zero radius there. Values equal the layer path; the log-det has a
    kink in ``‖x − z0‖`` there (no gradient), so the gradients only need to be finite."""
    flow = make_flow("radial", dim=3, k=4)
    x = torch.cat([flow.layers[-1].z0.detach().unsqueeze(0), torch.randn(5, 3, dtype=torch.float64)])
    out_f, ld_f, grads_f = evaluate(flow, "inverse", x, fusion=True)
    out_l, ld_l, _ = evaluate(flow, "inverse", x, fusion=False)
    torch.testing.assert_close(out_f, out_l, atol=TOL, rtol=0)
    torch.testing.assert_close(ld_f, ld_l, atol=TOL, rtol=0)
    assert all(bool(torch.isfinite(g).all()) for g in grads_f)
