"""Ensembles train in one ``fit`` call exactly as their members would alone (issue: architecture)."""

import pytest
import torch

import flowprobe as fp
from flowprobe.data import load_data
from flowprobe.distributions import rezende_energy

SPEC = "planar:4:tanh+radial:2+sylvester:2:orthogonal:m=1"


def perturbed_ensemble(members: int, seed: int = 0) -> fp.Flow:
    torch.manual_seed(seed)
    flow = fp.build_flow(SPEC, 2, torch.float64, ensemble=members)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow


def test_eight_members_trained_together_equal_each_member_trained_alone():
    """200 steps, float64, gradient clipping that bites, a cosine schedule and early stopping per
    member: every member's final weights, history and split equal its solo run to 1e-8."""
    data = load_data("moons", n=600, seed=0).double()
    settings = dict(steps=200, lr=0.02, batch_size=64, clip=0.5, log_every=10, patience=3, val_fraction=0.2)
    ensemble = perturbed_ensemble(8)
    solos = [ensemble.member(m) for m in range(8)]
    seeds = [11 * m + 3 for m in range(8)]
    histories = fp.fit(ensemble, data=data, seeds=seeds, **settings)
    assert len(histories) == 8
    stopped = [h.stopped_early for h in histories]
    assert any(stopped) and not all(stopped)  # early stopping acted on some members only
    assert any(r["grad_norm"] > 0.5 for h in histories for r in h.records)  # clipping acted
    for m, solo in enumerate(solos):
        alone = fp.fit(solo, data=data, seed=seeds[m], **settings)
        assert alone.stopped_early == histories[m].stopped_early and alone.best_step == histories[m].best_step
        assert torch.equal(alone.val_index, histories[m].val_index)
        assert [r["step"] for r in alone.records] == [r["step"] for r in histories[m].records]
        member = ensemble.member(m)
        for (name, p), q in zip(member.named_parameters(), solo.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-8, rtol=0, msg=name)
        torch.testing.assert_close(alone.best_val_nll, histories[m].best_val_nll, atol=1e-8, rtol=0)


def test_reverse_kl_members_equal_their_solo_runs():
    energy = rezende_energy("U1")
    settings = dict(steps=60, lr=0.01, batch_size=128, clip=1.0, log_every=20)
    ensemble = perturbed_ensemble(3, seed=1)
    solos = [ensemble.member(m) for m in range(3)]
    histories = fp.fit(ensemble, energy=energy, seed=5, **settings)
    for m, solo in enumerate(solos):
        alone = fp.fit(solo, energy=energy, seed=5 + m, **settings)
        torch.testing.assert_close(alone.final_loss, histories[m].final_loss, atol=1e-9, rtol=0)
        for p, q in zip(ensemble.member(m).parameters(), solo.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-8, rtol=0)


@pytest.mark.parametrize("target", ["data", "energy"])
def test_compiled_member_draws_give_the_runs_of_per_member_torch_draws(target, monkeypatch):
    """The members' mini-batch indices and source noise drawn in one compiled call train exactly the ensemble
    that one torch.randint / torch.randn per member trains (the compiled draws hidden from fit, the layers'
    kernels left as they are)."""
    import types

    from flowprobe import train
    from flowprobe.layers import native

    if native.kernels(build=True) is None:
        pytest.skip("no C++ compiler: the compiled kernels are optional")
    kwargs = {"data": load_data("moons", n=300, seed=0).double()} if target == "data" else {
        "energy": rezende_energy("U1")}
    runs = []
    for hidden in (False, True):
        if hidden:
            monkeypatch.setattr(train, "native", types.SimpleNamespace(usable=lambda points: None,
                                                                       kernels=native.kernels))
        flow = perturbed_ensemble(3, seed=2)
        fp.fit(flow, seeds=[4, 0, 9], steps=15, lr=0.01, batch_size=32, log_every=5, **kwargs)
        runs.append([p.detach().clone() for p in flow.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_a_diverging_member_stops_alone():
    data = load_data("moons", n=400, seed=0).double()
    ensemble = perturbed_ensemble(3)
    with torch.no_grad():  # member 1 starts from NaN weights: its loss is NaN from the first step
        ensemble.stacks[0].u[1].fill_(float("nan"))
    histories = fp.fit(ensemble, data=data, steps=30, lr=0.01, batch_size=64, log_every=10)
    assert histories[1].failed is not None and "diverged at step 0" in histories[1].failed
    assert histories[0].failed is None and histories[2].failed is None and len(histories[0].records) == 3
    assert torch.isfinite(ensemble.member(0).log_prob(data[:10])).all()


def test_ensemble_fit_refuses_shared_parameters_and_wrong_seeds():
    data = load_data("moons", n=200, seed=0)
    shared = fp.Flow(fp.StandardNormal(2), [fp.Planar(2, ensemble=2), fp.Radial(2)])
    with pytest.raises(ValueError, match="stacks.1.z0 is shared by every member"):
        fp.fit(shared, data=data, steps=2)
    with pytest.raises(ValueError, match=r"one seed per ensemble member \(2\), got 3"):
        fp.fit(fp.build_flow("planar:2", 2, ensemble=2), data=data, steps=2, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="seeds= is for ensembles"):
        fp.fit(fp.build_flow("planar:2", 2), data=data, steps=2, seeds=[1])


def test_an_ensemble_run_directory_resumes_and_loads(tmp_path):
    """Killed after its checkpoint at step 20, resumed: the same weights as an uninterrupted run."""
    data = load_data("moons", n=400, seed=0).double()
    settings = dict(steps=40, lr=0.01, batch_size=64, log_every=10)
    reference = perturbed_ensemble(2)
    fp.fit(reference, data=data, **settings)

    def crash(record):
        if record["step"] == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fp.fit(perturbed_ensemble(2), data=data, out=tmp_path / "run", meta={"flow": SPEC}, callback=crash,
               checkpoint_every=20, **settings)
    histories = fp.fit(perturbed_ensemble(2), data=data, out=tmp_path / "run", resume=True, meta={"flow": SPEC},
                       checkpoint_every=20, **settings)
    assert [len(h.records) for h in histories] == [4, 4]
    loaded, config = fp.load_run(tmp_path / "run")
    assert config["ensemble"] == [2] and config["seeds"] == [0, 1] and loaded.ensemble_shape == (2,)
    for p, q in zip(loaded.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
