import math

import pytest
import torch
from torch.distributions import AffineTransform, TransformedDistribution

import flowprobe as fp


def mixed_stack(dim: int, depth: int = 32, scale: float = 2.0) -> fp.Flow:
    torch.manual_seed(1)
    families = [
        lambda: fp.Planar(dim, "tanh"),
        lambda: fp.Radial(dim),
        lambda: fp.Sylvester(dim, kind="orthogonal", activation="softplus"),
        lambda: fp.Planar(dim, "leaky_relu"),
        lambda: fp.Sylvester(dim, kind="triangular", activation="relu"),
        lambda: fp.Householder(dim, reflections=2),
        lambda: fp.Planar(dim, "sigmoid"),
        lambda: fp.Sylvester(dim, kind="householder", activation="elu"),
    ]
    flow = fp.Flow(fp.StandardNormal(dim), [families[i % len(families)]() for i in range(depth)]).double()
    with torch.no_grad():
        for layer in flow.stacks:
            if isinstance(layer, fp.Planar):
                layer.u.mul_(scale)
                layer.b.normal_()
    return flow


@pytest.mark.parametrize("dim", [1, 2])
def test_density_of_a_32_layer_mixed_stack_integrates_to_one(dim):
    """Riemann sum over a box that holds the samples with a margin (the density is continuous
    except along the kinks of the piecewise-linear layers)."""
    flow = mixed_stack(dim, scale=0.5)
    with torch.no_grad():
        x = flow.sample(100000)
        lo, hi = x.min(0).values - 1.5, x.max(0).values + 1.5
        n = 100001 if dim == 1 else 801
        axes = [torch.linspace(float(a), float(b), n, dtype=torch.float64) for a, b in zip(lo, hi)]
        pts = axes[0].unsqueeze(-1) if dim == 1 else torch.cartesian_prod(*axes)
        density = flow.log_prob(pts).exp()
    cell = torch.tensor([float(a[1] - a[0]) for a in axes]).prod()
    assert abs(float(density.sum() * cell) - 1) < 1e-3


def test_log_prob_of_samples_matches_the_forward_log_prob():
    flow = mixed_stack(3, depth=16)
    x, log_p = flow.rsample_and_log_prob(500)
    assert (flow.log_prob(x) - log_p).abs().max() < 1e-8


def test_inverse_undoes_forward_through_the_whole_stack():
    flow = mixed_stack(2)
    z = torch.randn(300, 2, dtype=torch.float64)
    x, logdet = flow(z)
    z_back, logdet_inv = flow.inverse(x)
    assert (z_back - z).abs().max() < 1e-8 and (logdet + logdet_inv).abs().max() < 1e-8


def test_stages_trace_every_layer():
    flow = mixed_stack(2, depth=5)
    z = torch.randn(10, 2, dtype=torch.float64)
    stages = flow.stages(z)
    assert len(stages) == 6 and torch.equal(stages[0], z)
    assert (stages[-1] - flow(z)[0]).abs().max() < 1e-14
    assert (stages[2] - flow.layers[1](flow.layers[0](z)[0])[0]).abs().max() < 1e-14


def test_samples_follow_the_module_dtype_and_the_seed():
    flow = mixed_stack(2, depth=3)
    torch.manual_seed(5)
    a = flow.sample(7)
    torch.manual_seed(5)
    b = flow.sample(7)
    assert a.dtype == torch.float64 and a.shape == (7, 2) and torch.equal(a, b) and not a.requires_grad
    assert flow.rsample(3).requires_grad


def test_per_layer_batched_parameters_through_the_flow():
    flow = mixed_stack(2, depth=4)
    z = torch.randn(6, 2, dtype=torch.float64)
    params = [None, flow.layers[1].unflatten(torch.randn(6, flow.layers[1].raw_numel, dtype=torch.float64)), None, None]
    x, logdet = flow(z, params=params)
    z_back, logdet_inv = flow.inverse(x, params=params)
    assert (z_back - z).abs().max() < 1e-10 and (logdet + logdet_inv).abs().max() < 1e-10
    with pytest.raises(ValueError, match="one entry per layer"):
        flow(z, params=[None])


def test_gradients_of_log_prob_reach_every_parameter():
    flow = mixed_stack(2, depth=8)
    x = flow.sample(64)
    flow.log_prob(x).mean().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_as_distribution_agrees_with_the_flow():
    flow = mixed_stack(2, depth=6)
    dist = flow.as_distribution()
    assert isinstance(dist, TransformedDistribution)
    x = flow.sample(12)
    assert (dist.log_prob(x) - flow.log_prob(x)).abs().max() < 1e-10
    batch = x.reshape(3, 4, 2)
    assert dist.log_prob(batch).shape == (3, 4)
    assert (dist.log_prob(batch).reshape(-1) - flow.log_prob(x)).abs().max() < 1e-10
    assert dist.sample((4, 5)).shape == (4, 5, 2) and dist.rsample((4, 5)).requires_grad
    assert dist.sample().shape == (2,)
    torch.manual_seed(3)
    y = dist.rsample((8,))
    torch.manual_seed(3)
    assert (y - flow.rsample(8)).abs().max() < 1e-12
    # the cached forward log-det is used for samples it produced
    assert (dist.log_prob(y) - flow.log_prob(y)).abs().max() < 1e-8


def test_as_distribution_inside_another_transformed_distribution():
    flow = mixed_stack(2, depth=4)
    loc, scale = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    outer = TransformedDistribution(flow.as_distribution(), [AffineTransform(loc, scale, event_dim=1)])
    y = outer.sample((3, 2))
    assert y.shape == (3, 2, 2)
    expected = flow.log_prob(((y - loc) / scale).reshape(-1, 2)).reshape(3, 2) - torch.log(scale).sum()
    assert (outer.log_prob(y) - expected).abs().max() < 1e-10


def test_layer_dimensions_must_match_the_base():
    with pytest.raises(ValueError, match="layer 1 .* has dim 3, base has dim 2"):
        fp.Flow(fp.StandardNormal(2), [fp.Planar(2), fp.Planar(3)])


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(5, 3), r"must have shape \(N, 2\), got \(5, 3\)"),
        (torch.randn(2), r"must have shape \(N, 2\), got \(2,\)"),
        (torch.randn(0, 2), "empty batch"),
        (torch.tensor([[0.0, math.nan]]), "NaN"),
        (torch.tensor([[math.inf, 0.0]]), "inf"),
        (torch.ones(3, 2, dtype=torch.long), "floating-point"),
        ([[0.0, 1.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_inputs_get_a_one_line_error_naming_the_problem(bad, message):
    flow = fp.Flow(fp.StandardNormal(2), [fp.Planar(2), fp.Radial(2)])
    for call in (flow.log_prob, flow.forward, flow.inverse, flow.layers[0].forward, flow.base.log_prob):
        with pytest.raises(ValueError, match=message) as err:
            call(bad)
        assert "\n" not in str(err.value)


def test_validation_accepts_finite_values_whose_sum_overflows():
    big = torch.full((4, 2), 3e38)  # finite in float32, but the sum is inf: the fast check must not decide
    flow = fp.Flow(fp.StandardNormal(2), [fp.Planar(2)])
    assert flow.base.log_prob(big).shape == (4,)
    with pytest.raises(ValueError, match="NaN values in 1 row"):
        flow.base.log_prob(torch.cat([big, torch.tensor([[math.nan, -math.inf]])]))
    with pytest.raises(ValueError, match="inf values in 1 row"):
        flow.base.log_prob(torch.cat([big, torch.tensor([[1.0, -math.inf]])]))


def test_validation_can_be_switched_off_for_hot_loops():
    layer = fp.Planar(2)
    with fp.validation(False):
        x, _ = layer(torch.tensor([[0.0, math.nan]]))  # no check: NaN propagates
    assert torch.isnan(x).any()
    with pytest.raises(ValueError):
        layer(torch.tensor([[0.0, math.nan]]))


def test_readme_quick_start_runs():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = text.split("## Quick start")[1].split("```python")[1].split("```")[0]
    exec(compile(code, "README quick start", "exec"), {})


def test_a_flow_never_changes_the_stacks_it_is_given():
    torch.manual_seed(0)
    stacks = [fp.Planar(2, "tanh", layers=4), fp.Radial(2, layers=2), fp.Planar(2, "tanh", layers=3)]
    before = [(list(s.parameters()), {k: v.clone() for k, v in s.state_dict().items()}) for s in stacks]
    flow = fp.Flow(fp.StandardNormal(2), stacks)
    for stack, (params, state) in zip(stacks, before, strict=True):
        assert all(a is b for a, b in zip(stack.parameters(), params, strict=True))
        assert all(torch.equal(v, state[k]) for k, v in stack.state_dict().items())
    assert stacks[0].u is stacks[0].u and flow.stacks[0] is stacks[0]
    names = [name for name, _ in flow.named_parameters()]
    assert names == [k for k in flow.state_dict() if not k.startswith("base.")]
    assert names[:3] == ["stacks.0.u", "stacks.0.w", "stacks.0.b"]


def test_an_optimiser_built_on_the_layers_before_the_flow_trains_the_flow():
    torch.manual_seed(0)
    stacks = [fp.Planar(2, "tanh", layers=8), fp.Radial(2, layers=2)]
    opt = torch.optim.Adam([p for s in stacks for p in s.parameters()], lr=0.05)
    flow = fp.Flow(fp.StandardNormal(2), stacks)
    data = torch.randn(512, 2) * torch.tensor([3.0, 0.3]) + 2.0
    start = -flow.log_prob(data).mean().item()
    for _ in range(60):
        opt.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        opt.step()
    assert loss.item() < start - 0.5
    assert all(p.grad is not None for p in flow.parameters())


def test_an_ensemble_of_eight_equals_its_members_run_alone():
    """Loss, log-det and gradients of every member of E = 8 equal the member's solo flow to 1e-12."""
    torch.manual_seed(2)
    flow = fp.build_flow("planar:6:tanh+radial:2+sylvester:3:orthogonal:m=2+householder:1:k=2", 3,
                         torch.float64, ensemble=8)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    data = torch.randn(8, 40, 3, dtype=torch.float64)
    log_p = flow.log_prob(data)
    z, logdet = flow.inverse(data)
    losses = -log_p.mean(-1)
    grads = torch.autograd.grad(losses.sum(), list(flow.parameters()))
    for e in range(8):
        solo = flow.member(e)
        loss_e = -solo.log_prob(data[e]).mean()
        z_e, logdet_e = solo.inverse(data[e])
        torch.testing.assert_close(losses[e], loss_e, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet[e], logdet_e, atol=1e-12, rtol=0)
        torch.testing.assert_close(z[e], z_e, atol=1e-12, rtol=0)
        for g, g_e in zip(grads, torch.autograd.grad(loss_e, list(solo.parameters())), strict=True):
            torch.testing.assert_close(g[e], g_e, atol=1e-12, rtol=1e-12)
    assert flow.rsample_and_log_prob(5)[0].shape == (8, 5, 3)
    assert flow.log_prob(data[0]).shape == (8, 40)  # (N, d) points are seen by every member


def test_ensemble_shapes_must_agree_and_members_need_an_ensemble():
    with pytest.raises(ValueError, match="different ensemble shapes"):
        fp.Flow(fp.StandardNormal(2), [fp.Planar(2, ensemble=3), fp.Planar(2, ensemble=4)])
    with pytest.raises(ValueError, match="not an ensemble"):
        fp.Flow(fp.StandardNormal(2), [fp.Planar(2)]).member(0)
    flow = fp.Flow(fp.StandardNormal(2), [fp.Planar(2, ensemble=3)])
    with pytest.raises(ValueError, match=r"must have shape \(N, 2\) or \(3, N, 2\)"):
        flow.log_prob(torch.randn(4, 5, 2))


def test_evaluation_without_gradients_streams_in_bounded_memory():
    """No-grad log_prob of 10⁶ points through planar K = 300 in d = 1: the peak resident-set increase
    (VmHWM reset before the call) stays below 300 MB; keeping every layer's pre-activations and
    Newton steps would need 2.4 GB."""
    script = """
import torch, flowprobe as fp
torch.manual_seed(0)
flow = fp.build_flow("planar:300:tanh", 1)
x = torch.randn(1_000_000, 1)
flow.log_prob(x[:10])
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
with torch.no_grad():
    lp = flow.log_prob(x)
assert torch.isfinite(lp).all()
print((status("VmHWM:") - before) / 1024)
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    peak_mb = float(out.stdout.strip())
    assert peak_mb < 300, peak_mb


def test_layers_and_flows_pickle_and_torch_save(tmp_path):
    """Issue 11 item 12: activations were lambdas, so pickling a layer or ``torch.save(flow)`` failed."""
    import pickle

    layer = fp.Planar(2, "tanh")
    assert pickle.loads(pickle.dumps(layer)).act is layer.act  # built-ins unpickle to the registered object
    flow = mixed_stack(2, depth=8)
    torch.save(flow, tmp_path / "flow.pt")
    loaded = torch.load(tmp_path / "flow.pt", weights_only=False)  # the user's own file, on purpose
    z = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(loaded(z)[0], flow(z)[0])


def test_the_distribution_follows_the_torch_distributions_contract():
    """Issue 11 item 12: ``with_cache(0)``, ``expand`` and empty samples."""
    flow = mixed_stack(2, depth=4)
    dist = flow.as_distribution()
    transform = dist.transforms[0]
    uncached = transform.with_cache(0)
    assert uncached._cache_size == 0 and transform.with_cache(1) is transform
    x = dist.sample((5,))
    torch.testing.assert_close(uncached.inv(x), transform.inv(x))
    wide = dist.expand((3,))
    assert wide.batch_shape == (3,) and wide.sample((4,)).shape == (4, 3, 2)
    assert wide.log_prob(x.unsqueeze(1).expand(5, 3, 2)).shape == (5, 3)
    empty = dist.sample((0,))
    assert empty.shape == (0, 2) and dist.log_prob(empty).shape == (0,)
    assert dist.rsample((2, 0)).shape == (2, 0, 2)
