"""``torch.compile`` of a flow's methods gives the eager numbers (values, log-dets, gradients).

Most cases compile with the ``aot_eager`` backend: it traces exactly what inductor traces (Dynamo,
then AOTAutograd's forward and backward graphs) without generating code, so it is fast. One small
case (two planar-tanh layers) runs the inductor backend; the K = 32 inductor cases are slow.
"""

import copy
import math

import pytest
import torch
from tests.helpers import assert_same as assert_close_nested
from tests.helpers import outputs_and_grads
from torch._dynamo.testing import CompileCounter

import flowprobe as fp
from flowprobe.activations import TANH_NEWTON_BUDGETS
from flowprobe.distributions import rezende_energy
from flowprobe.layers import planar

TOL = 1e-10
FAMILIES = {
    "planar-tanh": lambda d, k: fp.Planar(d, "tanh", layers=k),
    "planar-sigmoid": lambda d, k: fp.Planar(d, "sigmoid", layers=k),
    "radial": lambda d, k: fp.Radial(d, layers=k),
    "householder": lambda d, k: fp.Householder(d, reflections=2, layers=k),
    "sylvester-O": lambda d, k: fp.Sylvester(d, kind="orthogonal", layers=k),
    "sylvester-T": lambda d, k: fp.Sylvester(d, kind="triangular", layers=k),
}
U1 = rezende_energy("U1")


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_flow(family, dim=2, k=3):
    flow = fp.Flow(fp.StandardNormal(dim), [FAMILIES[family](dim, k)]).double()
    with torch.no_grad():  # away from the near-identity initialisation
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def evaluate(flow, fn, points):
    return outputs_and_grads(flow, fn, points)


def assert_same(compiled, eager, tol=TOL):
    assert_close_nested(compiled, eager, tol)


def check_directions(flow, backend, directions=("forward", "inverse"), no_grad=False):
    z = torch.randn(17, flow.dim, dtype=torch.float64)
    with torch.no_grad():
        x = flow(z)[0]
    for direction in directions:
        method = flow.forward if direction == "forward" else flow.inverse
        points = z if direction == "forward" else x
        compiled = torch.compile(method, backend=backend)
        assert_same(evaluate(flow, compiled, points), evaluate(flow, method, points))
        if no_grad:
            with torch.no_grad():
                assert_same(compiled(points), method(points))


@pytest.mark.parametrize("family", ["planar-tanh", "planar-sigmoid", "radial", "sylvester-O"])
def test_traced_path_equals_eager(family):
    check_directions(make_flow(family), "aot_eager", no_grad=family == "planar-tanh")


def test_inductor_planar_tanh_equals_eager():
    check_directions(make_flow("planar-tanh", k=2), "inductor", ("forward",))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["planar-tanh", "radial", "sylvester-O"])
def test_inductor_deep_flows_equal_eager(family):
    directions = ("forward",) if family == "sylvester-O" else ("forward", "inverse")  # see the README
    check_directions(make_flow(family, k=32), "inductor", directions, no_grad=True)


@pytest.mark.parametrize("family", ["planar-tanh", "radial", "householder", "sylvester-O", "sylvester-T"])
def test_forward_and_sampling_compile_to_one_graph(family):
    flow = make_flow(family)
    counter = CompileCounter()

    def loss():
        x, log_p = flow.rsample_and_log_prob(8)
        return x.sum() + log_p.sum()

    loss = torch.compile(loss, backend=counter, fullgraph=True)
    loss().backward()
    torch.compile(flow.forward, backend=counter, fullgraph=True)(torch.randn(8, 2, dtype=torch.float64))
    assert counter.frame_count == 2


def test_planar_tanh_inverse_has_one_check_per_run():
    flow = make_flow("planar-tanh", k=4)
    explanation = torch._dynamo.explain(flow.log_prob)(flow.sample(8))
    sites = {(frame.filename, frame.name, frame.lineno) for reason in explanation.break_reasons
             for frame in reason.user_stack[-1:]}
    assert len(sites) == 1  # the run's one convergence check, run eagerly (layers/scalar.py: eager)
    (filename, name, _), = sites
    assert filename.endswith("layers/scalar.py") and name == "call"


def test_compiled_planar_inverse_falls_back_when_the_check_fails(monkeypatch):
    flow = make_flow("planar-tanh", k=4)
    x = flow.sample(13)
    eager = evaluate(flow, flow.inverse, x)
    calls = []

    def counting_solver(*args):
        calls.append(1)
        return fp.layers.scalar.solve_scalar(*args)

    monkeypatch.setattr(planar, "solve_scalar", counting_solver)
    monkeypatch.setitem(TANH_NEWTON_BUDGETS, torch.float64, ((-1.0, math.inf, 1),))  # check fails
    assert_same(evaluate(flow, torch.compile(flow.inverse, backend="aot_eager"), x), eager)
    assert len(calls) == 4  # the eager fallback: the safeguarded solver, once per layer


@pytest.mark.parametrize("family", ["planar-tanh", "radial"])
def test_compiled_training_steps_follow_eager_without_recompiling(family):
    flows = {"eager": make_flow(family, k=4)}
    flows["compiled"] = copy.deepcopy(flows["eager"])
    losses = {}
    for name, flow in flows.items():

        def loss_fn(flow=flow):
            x, log_q = flow.rsample_and_log_prob(64)
            return (log_q + U1.energy(x)).mean()

        step_loss = torch.compile(loss_fn, backend="aot_eager") if name == "compiled" else loss_fn
        opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
        torch.manual_seed(1)
        losses[name] = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                loss = step_loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[name].append(loss.item())
    torch.testing.assert_close(losses["compiled"], losses["eager"], atol=TOL, rtol=TOL)
    for p_c, p_e in zip(flows["compiled"].parameters(), flows["eager"].parameters(), strict=True):
        torch.testing.assert_close(p_c, p_e, atol=TOL, rtol=TOL)


def test_compiled_calls_still_check_shapes():
    flow = make_flow("planar-tanh")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\)"):
        torch.compile(flow.log_prob, backend="eager")(torch.zeros(3, 5, dtype=torch.float64))
