"""Topology matching math (docs/theory/topology.md): gradient-set rank, Gaussian bounds, ReLU maps."""

import math

import pytest
import torch

import flowprobe as fp
from flowprobe.metrics import reverse_kl
from flowprobe.theory import topology as tp
from flowprobe.theory import topology_experiments as tx
from flowprobe.theory.tv import estimate_tv

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


def random_covariance(dim, condition, generator):
    """``Q diag(1 … 1/condition) Qᵀ`` with a random rotation ``Q``."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=F64, generator=generator))
    cov = q @ torch.diag(torch.logspace(0, -math.log10(condition), dim, dtype=F64)) @ q.T
    return 0.5 * (cov + cov.T)


def push_forward(cov, c):
    """``CΣCᵀ``, the covariance of ``Cz`` for ``Cov(z) = Σ`` (symmetrised)."""
    cov = c @ cov @ c.T
    return 0.5 * (cov + cov.T)


def whitened_signature(cov_q, a, b):
    """``(n₊, n₋)`` for ``C = I + ABᵀ`` computed without round-off eigenvalues: with ``Σ_q = LLᵀ``,
    ``U = L⁻¹A``, ``V = LᵀB``, ``S − I = UVᵀ + VUᵀ + U(VᵀV)Uᵀ`` lives in ``span(U, V)``; its signature is
    that of the compression to an orthonormal basis ``W`` of that span (2m × 2m)."""
    chol = torch.linalg.cholesky(cov_q)
    u, v = torch.linalg.solve_triangular(chol, a, upper=False), chol.T @ b
    w, _ = torch.linalg.qr(torch.cat([u, v], dim=1))
    wu, wv = w.T @ u, w.T @ v
    k = wu @ wv.T + wv @ wu.T + wu @ (v.T @ v) @ wu.T
    eig = torch.linalg.eigvalsh(0.5 * (k + k.T))
    tol = 100 * torch.finfo(F64).eps * float(eig.abs().max())  # the eigensolver's absolute accuracy, with margin
    return int((eig > tol).sum()), int((eig < -tol).sum())


def test_gaussian_neuron_bound_reproduces_the_ill_conditioned_report():
    """Issue 11 item 7: Σ_q = diag(1, 1e-2, 1e-4), C = I + abᵀ (one neuron) was reported as needing 2."""
    cov_q = torch.diag(torch.tensor([1.0, 1e-2, 1e-4], dtype=F64))
    for a, b in (([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]), ([0.3, -1.2, 0.5], [1.1, 0.4, -0.7])):
        c = torch.eye(3, dtype=F64) + torch.outer(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64))
        bound = tp.gaussian_neuron_bound(cov_q, c @ cov_q @ c.T)
        assert (bound.positive, bound.negative, bound.min_neurons) == (1, 1, 1)
        unit = min(bound.variance_ratios, key=lambda r: abs(r - 1))
        assert abs(unit - 1) < 1e-11 < bound.tolerance < 1e-8  # the round-off ratio, and the tolerance above it


@pytest.mark.parametrize("neurons", [1, 2])
def test_gaussian_neuron_bound_is_exact_from_condition_1_to_1e8(neurons):
    """Random maps C = I + Σ_k a_k b_kᵀ with m neurons in d = 6: the bound is the whitened signature
    (m, m) at every condition of Σ_q, and ``m`` neurons always suffice."""
    generator = torch.Generator().manual_seed(neurons)
    dim = 6
    for condition in (1.0, 1e2, 1e4, 1e6, 1e8):
        for _ in range(40):
            cov_q = random_covariance(dim, condition, generator)
            a = torch.randn(dim, neurons, dtype=F64, generator=generator)
            b = torch.randn(dim, neurons, dtype=F64, generator=generator)
            bound = tp.gaussian_neuron_bound(cov_q, push_forward(cov_q, torch.eye(dim, dtype=F64) + a @ b.T))
            assert (bound.positive, bound.negative) == whitened_signature(cov_q, a, b) == (neurons, neurons)
            assert bound.min_neurons == neurons


def test_gaussian_neuron_bound_in_float32_follows_the_input():
    generator = torch.Generator().manual_seed(5)
    cov_q = random_covariance(4, 1e3, generator)
    c = torch.eye(4, dtype=F64) + torch.outer(torch.randn(4, dtype=F64, generator=generator),
                                              torch.randn(4, dtype=F64, generator=generator))
    bound = tp.gaussian_neuron_bound(cov_q.float(), push_forward(cov_q, c).float())
    assert bound.min_neurons == 1 and bound.tolerance > 1e3 * tp.gaussian_neuron_bound(cov_q, cov_q).tolerance


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
    energy = tx.target_energy(target, dim)
    for neurons in (1, 2, 3):
        tv_floor, kl_floor = tp.isotropic_floor(dim, neurons, scale)
        flow = scaling_flow(dim, neurons, scale)
        tv = estimate_tv(flow, target, 50_000)
        kl = reverse_kl(flow, energy, 0.0, 100_000)
        assert float(tv.low) <= tv_floor <= float(tv.high) and float(tv.high - tv.low) < 0.02
        assert abs(kl["kl"] - kl_floor) < 4 * kl["kl_stderr"] + 1e-12
    assert tp.isotropic_floor(dim, 1, scale)[0] > tp.isotropic_floor(dim, 2, scale)[0] > 0.05
    assert tp.isotropic_floor(dim, 3, scale) == (0.0, 0.0)


def test_relu_local_linear_map_matches_autograd():
    flow = tx.relu_demo_flow(0)
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
    flow = tx.relu_demo_flow(seed)
    z = flow.base.sample(1200)
    _, margin = tp.local_linear_map(flow, z)
    z = z[margin > 1e-6][:1000]
    assert z.shape[0] == 1000
    assert float(tp.pointwise_residual(flow, z).max()) < 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_modes_map_to_modes_with_peak_height_relation(seed):
    flow = tx.relu_demo_flow(seed)
    modes = tp.find_modes(flow.base, flow.base.means)
    assert modes.shape[0] == 4
    for image in tp.mode_images(flow, modes):
        assert image.kink_margin > 1e-6
        assert image.source_gradient_norm < 1e-10
        assert image.is_mode and image.image_gradient_norm < 1e-6 and image.image_hessian_max_eigenvalue < 0
        assert image.log_p_image == pytest.approx(image.predicted_log_p_image, abs=1e-10)


def test_relu_residual_is_large_for_a_forbidden_target():
    flow = tx.relu_demo_flow(0)
    means = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    target = fp.GaussianMixture(means, torch.full((4,), 0.3, dtype=F64), torch.tensor([0.35, 0.35, 0.15, 0.15]))
    residual = tp.pointwise_residual(flow, flow.base.sample(300), target=target)
    assert float(residual.median()) > 0.1
