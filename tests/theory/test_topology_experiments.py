"""Topology-matching experiments (docs/theory/topology.md §5): built-in pairs, training helpers, runs."""

import pytest
import torch

import flowprobe as fp
from flowprobe.theory import topology as tp
from flowprobe.theory import topology_experiments as tx
from flowprobe.theory.tv import estimate_tv

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_forbidden_pairs_are_normalised_densities_on_the_plane():
    for name in tx.FORBIDDEN_PAIRS:
        source, target = tx.forbidden_pair(name)
        assert source.dim == target.dim == 2
        axis = torch.linspace(-6, 6, 241, dtype=F64)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        cell = float(axis[1] - axis[0]) ** 2
        for density in (source, target):
            assert float(density.log_prob(grid).exp().sum()) * cell == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown pair 'nope'"):
        tx.forbidden_pair("nope")


def test_sylvester_stack_holds_the_requested_neurons():
    for dim, neurons, layers in ((3, 1, 1), (3, 6, 1), (4, 7, 3), (2, 2, 5)):
        stack = tx.sylvester_stack(dim, neurons, layers)
        assert tp.neuron_count(stack) == neurons and all(tp.residual_form(s).b_matrix.shape[1] <= dim for s in stack)
        assert len(stack) == min(max(layers, -(-neurons // dim)), neurons)


def test_relu_demo_flow_is_seeded():
    one, two = tx.relu_demo_flow(4), tx.relu_demo_flow(4)
    z = one.base.sample(10)
    assert torch.equal(one(z)[0], two(z)[0]) and not torch.equal(one(z)[0], tx.relu_demo_flow(5)(z)[0])
    assert tp.neuron_count(one.layers) == 6


def test_fit_on_target_energy_reaches_the_isotropic_target_at_full_neuron_count():
    torch.manual_seed(1)
    flow = fp.Flow(fp.StandardNormal(2), tx.sylvester_stack(2, 2)).to(F64)
    target = fp.DiagonalNormal(torch.zeros(2, dtype=F64), torch.full((2,), 1.5, dtype=F64))
    energy = tx.target_energy(target, 2)
    x = target.sample(5)
    assert torch.equal(energy(x), -target.log_prob(x))
    history = fp.fit(flow, energy=energy, steps=150, lr=5e-2, batch_size=128, clip=None, log_every=1, anneal=0)
    reached = estimate_tv(flow, target, 20_000)
    assert history.records[0]["loss"] > 0.1 and float(reached.high) < 0.03


@pytest.mark.slow
def test_isotropic_split_below_bound_never_beats_the_floor():
    """Trained identity Sylvester flows, d = 3, σ = 1.5: M < 3 stalls at the floor, M ≥ 3 reaches p."""
    runs = tx.isotropic_split_experiment(3, 1.5, [1, 2, 3, 6], [0], steps=800, samples=200_000)
    for run in runs:
        if run.neurons < 3:
            assert run.above_floor and float(run.tv.estimate) < run.tv_floor + 0.02
        else:
            assert run.tv_floor == 0 and float(run.tv.high) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(tx.FORBIDDEN_PAIRS))
def test_relu_training_cannot_remove_the_residual_of_a_forbidden_pair(pair):
    run = tx.relu_impossibility(pair, layers=4, seed=0, steps=1500, checkpoints=3, samples=50_000)
    assert run.exact_residual_max < 1e-8
    assert run.residual_median > 0.3
    assert min(float(e.low) for e in run.tv) > 0.05
