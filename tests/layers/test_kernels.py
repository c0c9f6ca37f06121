"""The families' fused run kernels equal the one-layer formulas applied layer by layer
(``fused_kernels(False)``): values, log-dets and gradients, with and without autograd."""

import math

import pytest
import torch
from tests.helpers import CASES, make, outputs_and_grads, perturb
from tests.helpers import assert_same as assert_close_nested

import flowprobe as fp
from flowprobe.activations import TANH_NEWTON_BUDGETS
from flowprobe.layers import fused_kernels, native, planar, radial, sylvester

TOL = 1e-12
KERNEL_CASES = ["planar-tanh", "planar-sigmoid", "planar-arctan", "planar-softplus", "planar-elu",
                "planar-leaky_relu", "radial", "householder", "sylvester-orthogonal-tanh",
                "sylvester-householder-tanh", "sylvester-triangular-tanh", "sylvester-orthogonal-softplus"]


@pytest.fixture
def solver_calls(monkeypatch):
    """Counts the planar inverse's calls of the safeguarded solver (a list, one entry per call)."""
    calls = []

    def counting_solver(*args):
        calls.append(1)
        return fp.layers.scalar.solve_scalar(*args)

    monkeypatch.setattr(planar, "solve_scalar", counting_solver)
    return calls


def make_stack(case, dim=3, k=5, seed=0):
    torch.manual_seed(seed)
    stack = make(case, dim=dim, layers=k)
    perturb(stack)
    return stack


def evaluate(stack, direction, points, fused):
    """Output, log-det and gradients of the stack's forward or inverse, fused kernels on or off."""
    with fused_kernels(fused):
        return outputs_and_grads(stack, stack if direction == "forward" else stack.inverse, points)


def assert_same(a, b, tol=TOL):
    assert_close_nested(a, b, tol)


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_fused_run_equals_layer_by_layer(case, direction):
    stack = make_stack(case)
    points = torch.randn(9, 3, dtype=torch.float64)
    if direction == "inverse":
        with torch.no_grad():
            points = stack(points)[0]
    assert_same(evaluate(stack, direction, points, True), evaluate(stack, direction, points, False))


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "leaky_relu"])
def test_fused_ensemble_run_equals_layer_by_layer(activation, compiled, monkeypatch):
    """The members' fused run (the compiled kernel where built, else the PyTorch one) = layer by layer."""
    if not compiled:
        monkeypatch.setenv("FLOWPROBE_NATIVE", "0")
    elif native.kernels(build=True) is None:
        pytest.skip("no C++ compiler: the compiled kernels are optional")
    torch.manual_seed(3)
    stack = fp.Planar(3, activation, layers=7, ensemble=4, u_max=2.0).double()
    perturb(stack, 0.5)
    points = 2 * torch.randn(4, 50, 3, dtype=torch.float64)
    assert_same(evaluate(stack, "forward", points, True), evaluate(stack, "forward", points, False))
    x, _ = stack(points)
    assert type(x.grad_fn).__name__ == ("NativeRunBackward" if compiled else "_PlanarMembersRunBackward")


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_ensemble_householder_run_is_one_product_per_member(direction):
    """An ensemble's Householder run: each member's reflections multiplied into one d × d matrix, the points
    one batched product (values and gradients = the reflections one by one)."""
    torch.manual_seed(6)
    stack = fp.Householder(4, layers=3, reflections=2, ensemble=5).double()
    perturb(stack, 0.5)
    points = torch.randn(5, 40, 4, dtype=torch.float64)
    assert_same(evaluate(stack, direction, points, True), evaluate(stack, direction, points, False))
    out, _ = stack(points) if direction == "forward" else stack.inverse(points)
    assert type(out.grad_fn).__name__ in ("UnsafeViewBackward0", "ViewBackward0", "BmmBackward0")


@pytest.mark.parametrize("newton_fails", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "leaky_relu"])
def test_fused_ensemble_inverse_equals_layer_by_layer(activation, newton_fails, monkeypatch, solver_calls):
    """The members' inverse run (roots of every member per layer at once, the implicit-function backward
    batched over members) = layer by layer: values, log-dets and gradients, with and without autograd; with
    tanh also when the fixed Newton budget fails its check and the safeguarded solver redoes the run."""
    torch.manual_seed(5)
    stack = fp.Planar(3, activation, layers=6, ensemble=4, u_max=2.0).double()
    perturb(stack, 0.5)
    with torch.no_grad():
        x = stack(2 * torch.randn(4, 50, 3, dtype=torch.float64))[0]
    reference = evaluate(stack, "inverse", x, False)
    solver_calls.clear()  # the layer-by-layer reference's own calls
    if newton_fails:
        monkeypatch.setitem(TANH_NEWTON_BUDGETS, torch.float64, ((-1.0, math.inf, 1),))
    assert_same(evaluate(stack, "inverse", x, True), reference)
    with torch.no_grad():
        assert_same(stack.inverse(x), reference[:2])
    assert type(stack.inverse(x)[0].grad_fn).__name__ == "_PlanarInverseRunBackward"
    assert len(solver_calls) == (0 if activation == "tanh" and not newton_fails else 18)  # three inverses of 6 layers


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_run_without_autograd_equals_layer_by_layer(case, dtype):
    """The no-grad paths (in-place buffers, fixed Newton budgets) against the layers, both directions."""
    stack = make_stack(case, dim=4, k=6).to(dtype)
    z = 2 * torch.randn(300, 4, dtype=dtype)
    tol = TOL if dtype == torch.float64 else 5e-5
    with torch.no_grad():
        for direction, points in (("forward", z), ("inverse", stack(z)[0])):
            outputs = []
            for fused in (True, False):
                with fused_kernels(fused):
                    outputs.append(stack(points) if direction == "forward" else stack.inverse(points))
            (out_f, ld_f), (out_l, ld_l) = outputs
            torch.testing.assert_close(out_f, out_l, atol=tol * (1 + float(out_l.abs().max())), rtol=0)
            torch.testing.assert_close(ld_f, ld_l, atol=tol, rtol=0)
        torch.testing.assert_close(stack.inverse(stack(z)[0])[0], z, atol=tol * 10, rtol=0)
        if case.startswith("sylvester") and case.endswith("tanh"):  # the fixed-budget path passed its check
            assert sylvester._newton_inverse(stack(z)[0], stack.constrained(), stack.act) is not None


def test_stacked_parameters_are_few_and_views_read_them():
    stack = make_stack("planar-tanh", k=6)
    assert len(list(stack.parameters())) == 3  # u, w, b of all six layers, not 18 tensors
    view = stack[2]
    assert view.u.shape == (3,) and view.u.data_ptr() == stack.u[2].data_ptr()
    z = torch.randn(4, 3, dtype=torch.float64)
    x = z
    for layer in stack:  # the per-layer API evaluates each layer alone
        x = layer(x)[0]
    torch.testing.assert_close(stack(z)[0], x, atol=TOL, rtol=0)
    back = stack[-1].inverse(x)[0]
    torch.testing.assert_close(stack[-1](back)[0], x, atol=TOL, rtol=0)


def test_set_constrained_writes_into_the_stack_at_its_layer():
    stack = make_stack("planar-tanh", dim=2, k=3)
    before = stack.u.detach().clone()
    u, w = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    stack[1].set_constrained(u, w, 0.5)
    torch.testing.assert_close(stack[1].constrained().u[0], u, atol=TOL, rtol=0)
    assert float(stack.b.detach()[1]) == 0.5
    assert torch.equal(stack.u.detach()[[0, 2]], before[[0, 2]])
    with pytest.raises(ValueError, match="this stack has 3 layers"):
        stack.set_constrained(u, w, 0.5)


def test_planar_inverse_falls_back_when_the_newton_budget_is_too_small(monkeypatch, solver_calls):
    stack = make_stack("planar-tanh", dim=2, k=4)
    x = stack(torch.randn(50, 2, dtype=torch.float64))[0].detach()
    with torch.no_grad():
        z_ok, ld_ok = stack.inverse(x)
    assert not solver_calls  # the fixed Newton budget passed its check
    monkeypatch.setitem(TANH_NEWTON_BUDGETS, torch.float64, ((-1.0, math.inf, 1),))  # now the check fails
    with torch.no_grad():
        z_fb, ld_fb = stack.inverse(x)
    assert len(solver_calls) == 4
    torch.testing.assert_close(z_fb, z_ok, atol=TOL, rtol=0)
    torch.testing.assert_close(ld_fb, ld_ok, atol=TOL, rtol=0)


def test_planar_inverse_gradients_survive_the_fallback(monkeypatch, solver_calls):
    stack = make_stack("planar-tanh", dim=3, k=4)
    x = stack(torch.randn(7, 3, dtype=torch.float64))[0].detach()
    reference = evaluate(stack, "inverse", x, False)
    solver_calls.clear()  # the layer-by-layer reference's own calls
    monkeypatch.setitem(TANH_NEWTON_BUDGETS, torch.float64, ((-1.0, math.inf, 1),))  # check fails: safeguarded
    fused = evaluate(stack, "inverse", x, True)
    assert len(solver_calls) == 4
    assert_same(fused, reference)


def test_fused_training_step_matches_layer_by_layer():
    results = []
    for fused in (True, False):
        flow = fp.Flow(fp.StandardNormal(2), [make_stack("planar-tanh", dim=2, k=8, seed=7)]).double()
        opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
        torch.manual_seed(11)
        with fused_kernels(fused):
            for _ in range(3):
                x, log_q = flow.rsample_and_log_prob(64)
                loss = (log_q + 0.5 * (x * x).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        results.append(torch.cat([p.detach().flatten() for p in flow.parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=1e-12, rtol=0)


def test_radial_run_backward_passes_gradcheck():
    torch.manual_seed(8)
    k, d = 4, 3
    z = torch.randn(6, d, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(k, d, dtype=torch.float64, requires_grad=True)
    alpha = (0.2 + torch.rand(k, dtype=torch.float64)).requires_grad_(True)
    beta = (torch.rand(k, dtype=torch.float64) - 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(radial._RadialRun.apply, (z, z0, alpha, beta), eps=1e-6, atol=1e-8)


def test_radial_run_gradient_at_a_centre_equals_autograd():
    stack = make_stack("radial", dim=3, k=3)
    with torch.no_grad():
        centre = stack.z0[0].clone()
    points = torch.cat([centre.unsqueeze(0), torch.randn(4, 3, dtype=torch.float64)])  # r = 0 at layer 0
    fused, plain = evaluate(stack, "forward", points, True), evaluate(stack, "forward", points, False)
    assert all(bool(torch.isfinite(g).all()) for g in fused[2])
    assert_same(fused, plain)


def test_radial_inverse_run_at_a_centre():
    """``x = z0`` of the last layer: zero radius there. Values equal the layer path; the log-det has a
    kink in ``‖x − z0‖`` there (no gradient), so the gradients only need to be finite."""
    stack = make_stack("radial", dim=3, k=4)
    x = torch.cat([stack[-1].z0.detach().unsqueeze(0), torch.randn(5, 3, dtype=torch.float64)])
    out_f, ld_f, grads_f = evaluate(stack, "inverse", x, True)
    out_l, ld_l, _ = evaluate(stack, "inverse", x, False)
    torch.testing.assert_close(out_f, out_l, atol=TOL, rtol=0)
    torch.testing.assert_close(ld_f, ld_l, atol=TOL, rtol=0)
    assert all(bool(torch.isfinite(g).all()) for g in grads_f)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_planar_inverse_run_backward_passes_gradcheck(activation):
    torch.manual_seed(9)
    layer = fp.Planar(2, activation, layers=3).double()
    perturb(layer, 0.5)
    p = layer.constrained()
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    inputs = (x, *(t.detach().requires_grad_(True) for t in p))

    def run(x, u, w, b, wu):
        return planar._PlanarInverseRun.apply(x, u, w, b, wu, layer.act)

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-8)


def test_kernel_cases_are_registered_examples():
    assert set(KERNEL_CASES) <= set(CASES)
