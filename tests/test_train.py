import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from flowprobe import fit
from flowprobe.data import load_data
from flowprobe.distributions import rezende_energy
from flowprobe.io import load_weights, save_weights
from flowprobe.metrics import log_partition, nll_per_dim, reverse_kl
from flowprobe.spec import build_flow
from flowprobe.train import FitConfig, split_data


def _flow(spec="planar:4:tanh", seed=0):
    torch.manual_seed(seed)
    return build_flow(spec, 2)


def test_reverse_kl_training_lowers_the_kl():
    energy = rezende_energy("U1")
    log_z = log_partition(energy).value
    flow = _flow("planar:8:tanh")
    before = reverse_kl(flow, energy, log_z, n=20_000)["kl"]
    history = fit(flow, energy=energy, steps=400, log_every=100)
    after = reverse_kl(flow, energy, log_z, n=20_000)["kl"]
    assert before > 1.0
    assert after < 0.5 * before
    assert [r["step"] for r in history.records] == [100, 200, 300, 400]
    # the training loss is KL − log Z (up to Monte-Carlo noise of the last interval)
    assert history.final_loss + log_z == pytest.approx(after, abs=0.15)


def test_maximum_likelihood_with_validation_keeps_the_best_weights():
    data = load_data("moons", 1000)
    flow = _flow("planar:4:tanh")
    history = fit(flow, data=data, steps=150, log_every=30, val_fraction=0.2)
    _, val = split_data(data.float(), 0.2, 0)
    assert val.shape == (200, 2)
    vals = [r["val_nll"] for r in history.records]
    assert history.best_val_nll == min(vals) < vals[0]
    assert nll_per_dim(flow, val) == pytest.approx(history.best_val_nll, abs=1e-4)


def test_early_stopping():
    data = load_data("8gaussians", 300)
    history = fit(_flow(), data=data, steps=2000, log_every=1, patience=1, lr=0.05, val_fraction=0.3)
    assert history.stopped_early
    assert history.steps_done == len(history.records) < 2000
    assert history.records[-1]["val_nll"] >= history.best_val_nll


def test_same_seed_same_result_different_seed_different_result():
    energy = rezende_energy("U1")
    runs = [_flow() for _ in range(3)]
    for flow, seed in zip(runs, (1, 1, 2), strict=True):
        fit(flow, energy=energy, steps=30, seed=seed)
    w = [torch.cat([p.flatten() for p in f.parameters()]) for f in runs]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


class _StopTrainingError(Exception):
    pass


def _stop_at(step):
    def callback(record):
        if record["step"] == step:
            raise _StopTrainingError

    return callback


@pytest.mark.parametrize(("target", "spec"), [("energy", "planar:4:tanh"), ("data", "planar:4:tanh"),
                                              ("data", "gaussian:full>planar:4:tanh")])
def test_resume_is_bit_identical(tmp_path, target, spec):
    """A trainable source initialised at the data's moments resumes from its checkpoint, not re-initialised."""
    kwargs = {"energy": rezende_energy("U3")} if target == "energy" else {"data": load_data("moons", 500)}
    settings = {"steps": 60, "log_every": 10, "checkpoint_every": 20, "seed": 5,
                "init_source": spec.startswith("gaussian")}
    reference = _flow(spec)
    full = fit(reference, out=tmp_path / "a", **kwargs, **settings)
    interrupted = _flow(spec)
    with pytest.raises(_StopTrainingError):
        fit(interrupted, out=tmp_path / "b", callback=_stop_at(50), **kwargs, **settings)
    state = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert state["step"] == 40 and state["history_length"] == 4
    assert len((tmp_path / "b" / "history.jsonl").read_text().splitlines()) == 5  # one line past the checkpoint
    resumed = _flow(spec, seed=123)  # different initial weights: everything must come from the checkpoint
    history = fit(resumed, out=tmp_path / "b", resume=True, **kwargs, **settings)
    for p, q in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in history.records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full.records]
    lines = (tmp_path / "b" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40, 50, 60]
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-00000060.safetensors"]
    saved = load_file(tmp_path / "b" / "weights.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in resumed.state_dict().items())


def test_resume_with_other_settings_is_refused(tmp_path):
    energy = rezende_energy("U1")
    fit(_flow(), energy=energy, steps=20, checkpoint_every=10, out=tmp_path)
    with pytest.raises(ValueError, match="settings differ"):
        fit(_flow(), energy=energy, steps=30, checkpoint_every=10, out=tmp_path, resume=True)
    with pytest.raises(FileNotFoundError):
        fit(_flow(), energy=energy, steps=20, out=tmp_path / "empty", resume=True)


def test_weights_round_trip_and_never_unpickle(tmp_path):
    flow = _flow()
    save_weights(flow, tmp_path / "w.safetensors")
    other = load_weights(_flow(seed=9), tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(flow.parameters(), other.parameters(), strict=True))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_weights(_flow(), tmp_path / "evil.safetensors")
    assert not marker.exists()
    with pytest.raises(ValueError, match="do not match the flow"):
        load_weights(_flow("planar:5"), tmp_path / "w.safetensors")


def test_bad_arguments():
    energy = rezende_energy("U1")
    with pytest.raises(ValueError, match="exactly one of"):
        fit(_flow())
    with pytest.raises(ValueError, match="exactly one of"):
        fit(_flow(), data=torch.zeros(3, 2), energy=energy)
    with pytest.raises(ValueError, match="data contains NaN"):
        fit(_flow(), data=torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="shape \\(N, 2\\)"):
        fit(_flow(), data=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="unknown schedule"):
        FitConfig(schedule="linear")
    with pytest.raises(ValueError, match="checkpoint_every needs an output directory"):
        fit(_flow(), energy=energy, checkpoint_every=5)


def test_cosine_schedule():
    config = FitConfig(steps=100, lr=1e-2)
    assert config.lr_at(0) == 1e-2
    assert config.lr_at(50) == pytest.approx(5e-3)
    assert config.lr_at(100) == pytest.approx(0.0)


def test_annealing_scales_the_energy_term():
    """With anneal, step t minimises E_q[log q + β_t U], β_t = min(1, 0.01 + t/anneal)."""
    energy = rezende_energy("U1")
    shifted = type("Shifted", (), {"dim": 2, "energy": lambda self, x: energy.energy(x) + 100.0})()
    plain = fit(_flow(), energy=shifted, steps=1, log_every=1, lr=1e-12, seed=3, anneal=0)
    annealed = fit(_flow(), energy=shifted, steps=1, log_every=1, lr=1e-12, seed=3, anneal=0.5)
    # same flow and noise at step 0: the losses differ by (1 − 0.01)·E_q[U] = 0.99·(100 + E_q[U1])
    mean_u1 = float(energy.energy(_flow().sample(100_000)).mean())
    assert plain.final_loss - annealed.final_loss == pytest.approx(0.99 * (100 + mean_u1), rel=0.02)
    with pytest.raises(ValueError, match="anneal must be a share of the steps"):
        FitConfig(anneal=1.5)
