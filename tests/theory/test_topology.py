"""Topology matching diagnostics (theory.md §2.2, §2.3): gradient-set rank, Gaussian bounds, ReLU maps."""

import math

import pytest
import torch
from scipy.integrate import quad

import flowprobe as fp
from flowprobe.theory import topology as tp

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def random_smooth_stack(dim, seed):
    """Planar, Sylvester (orthogonal, Householder) and GeneralSylvester layers with M < dim neurons."""
    torch.manual_seed(seed)
    m = max(1, dim // 4)
    layers = [
        fp.Sylvester(dim, hidden=m, kind="orthogonal", activation="tanh"),
        fp.Planar(dim, "softplus"),
        fp.Sylvester(dim, hidden=m, kind="householder", activation="sigmoid"),
        fp.GeneralSylvester(dim, hidden=m, activation="arctan"),
    ]
    while tp.neuron_count(layers) >= dim:
        layers.pop()
    flow = fp.Flow(fp.StandardNormal(dim), layers).to(F64)
    with torch.no_grad():
        for layer in flow.layers:
            layer.b.normal_()
    return flow


@pytest.mark.parametrize("dim", [4, 8, 12, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_set_of_exact_pair_lies_in_span_b(dim, seed):
    flow = random_smooth_stack(dim, seed)
    report = tp.gradient_set(flow, flow.base.sample(150))
    assert report.neurons < dim
    assert report.rank <= report.neurons
    assert report.rank == report.subspace_dim == report.neurons  # generic parameters: the bound is attained
    assert report.outside_residual < 1e-8
    gap = report.singular_values[report.rank - 1] / report.singular_values[report.rank]
    assert gap > 1e6  # the discarded singular values are round-off


def test_subspace_is_the_raw_span_of_all_b_columns():
    """Two layers: ∇L lies in span(B_1, B_2) in source coordinates, but in neither span alone."""
    torch.manual_seed(3)
    flow = fp.Flow(fp.StandardNormal(5), [fp.Planar(5, "tanh"), fp.Planar(5, "tanh")]).to(F64)
    with torch.no_grad():
        flow.layers[0].u.mul_(3)
        flow.layers[1].b.fill_(0.7)
    grads = tp.log_ratio_gradient(flow, flow.base.sample(200))
    scale = float(grads.norm(dim=-1).max())
    for keep in ([0, 1], [0], [1]):
        basis = tp.neuron_subspace([flow.layers[i] for i in keep])
        outside = float((grads - grads @ basis @ basis.T).norm(dim=-1).max())
        assert (outside < 1e-12 * scale) if keep == [0, 1] else (outside > 1e-2 * scale)


def test_log_ratio_of_exact_pair_is_minus_log_det():
    flow = random_smooth_stack(6, 0)
    z = flow.base.sample(50)
    _, logdet = flow(z)
    assert torch.allclose(tp.log_ratio(flow, z), -logdet, atol=1e-12, rtol=0)


def test_full_neuron_count_gives_full_rank_and_adding_layers_keeps_it():
    """Planar stacks in d = 4: the true rank is dim span(w_1..w_T) = min(T, 4); it never drops."""
    torch.manual_seed(7)
    dim, layers, ranks = 4, [], []
    for _ in range(dim + 3):
        layer = fp.Planar(dim, "tanh").to(F64)
        with torch.no_grad():
            layer.b.normal_()
        layers.append(layer)
        report = tp.gradient_set(fp.Flow(fp.StandardNormal(dim), layers).to(F64), torch.randn(200, dim, dtype=F64))
        ranks.append(report.rank)
        assert report.outside_residual < 1e-8
    assert ranks == [min(t + 1, dim) for t in range(dim + 3)]
    torch.manual_seed(8)
    one_layer = fp.Flow(fp.StandardNormal(dim), [fp.Sylvester(dim, hidden=dim, activation="tanh")]).to(F64)
    assert tp.gradient_set(one_layer, one_layer.base.sample(200)).rank == dim


def test_gradient_set_detects_a_pair_the_flow_does_not_map():
    flow = fp.Flow(fp.StandardNormal(4), [fp.Planar(4, "tanh")]).to(F64)
    target = fp.DiagonalNormal(torch.zeros(4, dtype=F64), torch.full((4,), 1.5, dtype=F64))
    report = tp.gradient_set(flow, flow.base.sample(100), target=target)
    assert report.rank == 4 > report.neurons and not report.consistent
    assert report.relative_outside_residual > 0.1


def test_neuron_count_is_undefined_for_radial_and_householder():
    assert tp.neuron_count([fp.Sylvester(5, hidden=3), fp.Planar(5), fp.GeneralSylvester(5, hidden=2)]) == 6
    for layer in (fp.Radial(3), fp.Householder(3)):
        with pytest.raises(ValueError, match="not of the form z \\+ A h"):
            tp.neuron_count([fp.Planar(3), layer])


def test_gaussian_neuron_bound():
    eye = torch.eye(4, dtype=F64)
    assert tp.gaussian_neuron_bound(eye, 2.25 * eye).min_neurons == 4
    mixed = tp.gaussian_neuron_bound(eye, torch.diag(torch.tensor([2.0, 0.5, 1.0, 1.0], dtype=F64)))
    assert (mixed.positive, mixed.negative, mixed.min_neurons) == (1, 1, 1)
    assert tp.gaussian_neuron_bound(eye, eye).min_neurons == 0
    with pytest.raises(ValueError, match="cov_p must be a symmetric positive definite"):
        tp.gaussian_neuron_bound(eye, -eye)


@pytest.mark.parametrize("dim, variance", [(1, 2.0), (2, 2.25), (3, 0.5)])
def test_isotropic_tv_matches_radial_quadrature(dim, variance):
    area = 2 * math.pi ** (dim / 2) / math.gamma(dim / 2)  # surface of the unit sphere in R^dim

    def density(r, v):
        return math.exp(-r * r / (2 * v)) / (2 * math.pi * v) ** (dim / 2)

    integral = quad(lambda r: area * r ** (dim - 1) * abs(density(r, 1) - density(r, variance)), 0, 40, limit=200)[0]
    assert tp.isotropic_tv(dim, variance) == pytest.approx(0.5 * integral, abs=1e-9)
    assert tp.isotropic_tv(1, 2.0) == pytest.approx(0.166064075, abs=1e-9)  # theory.md §2.4


def scaling_flow(dim, neurons, scale):
    """The linear Sylvester flow that scales an M-dimensional subspace by σ (attains the floor)."""
    layer = fp.Sylvester(dim, hidden=neurons, activation="identity").to(F64)
    with torch.no_grad():
        layer.D.zero_()
        layer.d1.fill_(math.atanh(math.sqrt(scale - 1) / layer.diag_scale))
        layer.d2.copy_(layer.d1)
    return fp.Flow(fp.StandardNormal(dim).to(F64), [layer])


def test_isotropic_floor_is_attained_and_monte_carlo_agrees():
    torch.manual_seed(0)
    dim, scale = 3, 1.5
    target = fp.DiagonalNormal(torch.zeros(dim, dtype=F64), torch.full((dim,), scale, dtype=F64))
    for neurons in (1, 2, 3):
        tv_floor, kl_floor = tp.isotropic_floor(dim, neurons, scale)
        est = tp.monte_carlo_divergences(scaling_flow(dim, neurons, scale), target, 200_000)
        assert abs(est["tv"].value - tv_floor) < est["tv"].half_width + 1e-3
        assert abs(est["kl"].value - kl_floor) < est["kl"].half_width + 1e-3
    assert tp.isotropic_floor(dim, 1, scale)[0] > tp.isotropic_floor(dim, 2, scale)[0] > 0.05
    assert tp.isotropic_floor(dim, 3, scale) == (0.0, 0.0)


def test_fit_on_target_energy_reaches_the_isotropic_target_at_full_neuron_count():
    torch.manual_seed(1)
    flow = fp.Flow(fp.StandardNormal(2), tp.sylvester_stack(2, 2)).to(F64)
    target = fp.DiagonalNormal(torch.zeros(2, dtype=F64), torch.full((2,), 1.5, dtype=F64))
    energy = tp.target_energy(target, 2)
    x = target.sample(5)
    assert torch.equal(energy(x), -target.log_prob(x))
    history = fp.fit(flow, energy=energy, steps=150, lr=5e-2, batch_size=128, clip=None, log_every=1, anneal=0)
    reached = tp.monte_carlo_divergences(flow, target, 20_000)
    assert history.records[0]["loss"] > 0.1 and reached["kl"].value < 5e-3 and reached["tv"].value < 0.03


def test_relu_local_linear_map_matches_autograd():
    flow = tp.relu_demo_flow(0)
    z = flow.base.sample(20)
    c, margin = tp.local_linear_map(flow, z)
    for i in range(20):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.unsqueeze(0))[0].squeeze(0), z[i])
        assert torch.allclose(c[i], jac, atol=1e-13, rtol=0)
    assert bool((margin > 0).all())
    _, logdet = flow(z)
    assert torch.allclose(torch.linalg.slogdet(c).logabsdet, logdet, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_pointwise_residual_vanishes_off_kinks(seed):
    flow = tp.relu_demo_flow(seed)
    z = flow.base.sample(1200)
    _, margin = tp.local_linear_map(flow, z)
    z = z[margin > 1e-6][:1000]
    assert z.shape[0] == 1000
    assert float(tp.pointwise_residual(flow, z).max()) < 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_modes_map_to_modes_with_peak_height_relation(seed):
    flow = tp.relu_demo_flow(seed)
    modes = tp.find_modes(flow.base, flow.base.means)
    assert modes.shape[0] == 4
    for image in tp.mode_images(flow, modes):
        assert image.kink_margin > 1e-6
        assert image.source_gradient_norm < 1e-10
        assert image.is_mode and image.image_gradient_norm < 1e-6 and image.image_hessian_max_eigenvalue < 0
        assert image.log_p_image == pytest.approx(image.predicted_log_p_image, abs=1e-10)


def test_relu_residual_is_large_for_a_forbidden_target():
    flow = tp.relu_demo_flow(0)
    means = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    target = fp.GaussianMixture(means, torch.full((4,), 0.3, dtype=F64), torch.tensor([0.35, 0.35, 0.15, 0.15]))
    residual = tp.pointwise_residual(flow, flow.base.sample(300), target=target)
    assert float(residual.median()) > 0.1


@pytest.mark.slow
def test_isotropic_split_below_bound_never_beats_the_floor():
    """Trained identity Sylvester flows, d = 3, σ = 1.5: M < 3 stalls at the floor, M ≥ 3 reaches p."""
    runs = tp.isotropic_split_experiment(3, 1.5, [1, 2, 3, 6], [0], steps=800, samples=200_000)
    for run in runs:
        if run.neurons < 3:
            assert run.above_floor and run.tv.value < run.tv_floor + 0.02
        else:
            assert run.tv_floor == 0 and run.tv.value < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(tp.FORBIDDEN_PAIRS))
def test_relu_training_cannot_remove_the_residual_of_a_forbidden_pair(pair):
    run = tp.relu_impossibility(pair, layers=4, seed=0, steps=1500, checkpoints=3, samples=50_000)
    assert run.exact_residual_max < 1e-8
    assert run.residual_median > 0.3
    assert min(e.value - e.half_width for e in run.tv) > 0.05
