"""VAE training and evaluation: warm-up, early stopping, exact resume, the importance-sampled NLL
against quadrature, and estimates that do not depend on batching or on the number of ranks."""

import math

import pytest
import torch

from flowprobe.vae.data import BinaryImages, load_images
from flowprobe.vae.distributed import Distributed
from flowprobe.vae.evaluation import Estimate, evaluate, per_point_estimates
from flowprobe.vae.model import FlowVAE
from flowprobe.vae.training import TEST_SEED, VAEConfig, load_vae, train_vae

TINY = dict(latent=2, hidden=16, depth=1, batch_size=200, nll_samples=16, dtype="float64")


@pytest.fixture(scope="module")
def digits():
    return load_images()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_training_lowers_the_validation_neg_elbo(digits):
    run = train_vae(digits, flow="planar:2:tanh", epochs=4, warmup=2, patience=None, lr=3e-3, **TINY)
    epochs = [r for r in run.records if r["kind"] == "epoch"]
    assert [r["beta"] for r in epochs] == [0.5, 1.0, 1.0, 1.0]
    assert epochs[-1]["val_neg_elbo"] < epochs[0]["val_neg_elbo"] - 1.0
    assert run.summary["steps"] == 4 * (1294 // 200) and run.summary["epochs_done"] == 4
    assert run.metrics.nll.mean <= run.metrics.neg_elbo.mean  # log-mean-exp ≥ mean, point by point
    assert run.metrics.points == 359 and run.metrics.samples == 16


def _stop_after(epoch):
    def callback(record):
        if record["epoch"] == epoch:
            raise KeyboardInterrupt

    return callback


def test_an_interrupted_run_resumes_bit_identically(digits, tmp_path):
    settings = dict(flow="sylvester:2:orthogonal:m=1", epochs=5, warmup=2, checkpoint_every=2, log_every=3, **TINY)
    reference = train_vae(digits, out=tmp_path / "ref", **settings)
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 3, after the checkpoint of epoch 2
        train_vae(digits, out=tmp_path / "run", callback=_stop_after(3), **settings)
    resumed = train_vae(digits, out=tmp_path / "run", resume=True, **settings)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert _timeless(resumed.records) == _timeless(reference.records)
    history = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert len(history) == len(reference.records) == 5 + 5 * 6 // 3
    assert resumed.metrics == reference.metrics


def _timeless(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_refuses_other_settings_and_other_data(digits, tmp_path):
    train_vae(digits, out=tmp_path, epochs=1, **TINY)
    with pytest.raises(ValueError, match=r"its vae differs \(lr: 0.001 in the run, 0.002 now\)"):
        train_vae(digits, out=tmp_path, resume=True, epochs=1, lr=2e-3, **TINY)
    other = BinaryImages("digits", digits.train[:-1], digits.val, digits.test, digits.shape)
    with pytest.raises(ValueError, match="its data_sha256 differs"):
        train_vae(other, out=tmp_path, resume=True, epochs=1, **TINY)
    with pytest.raises(ValueError, match="is not empty; pass --resume"):
        train_vae(digits, out=tmp_path, epochs=1, **TINY)


def test_early_stopping_counts_only_after_the_warm_up_and_keeps_the_best_weights(digits):
    run = train_vae(digits, epochs=40, warmup=3, patience=2, lr=0.05, optimizer="adam", **TINY)
    epochs = [r for r in run.records if r["kind"] == "epoch"]
    best = run.summary["best_epoch"]
    assert run.summary["stopped_early"] and run.summary["epochs_done"] < 40
    assert run.summary["epochs_done"] == max(best, 2) + 2  # two epochs without improvement after the warm-up
    values = [r["val_neg_elbo"] for r in epochs]
    assert min(values) == values[best - 1]
    assert abs(_validation_neg_elbo(run.model, digits, seed=0) - values[best - 1]) < 1e-10  # the best weights


def _validation_neg_elbo(model, images, seed):
    from flowprobe.vae.training import VALIDATION_SEED

    noise = torch.randn(images.val.shape[0], model.latent, generator=torch.Generator().manual_seed(
        seed + VALIDATION_SEED), dtype=torch.float64)
    with torch.no_grad():
        return float(model(images.val.double(), noise).mean())


def test_importance_sampled_nll_matches_quadrature():
    """With a 2-D latent space, ``log p(x) = log ∫ p(x|z) N(z; 0, I) dz`` by quadrature on a grid;
    the importance-sampled estimate agrees, and ``−ELBO ≥ NLL``."""
    torch.manual_seed(3)
    model = FlowVAE(6, latent=2, hidden=8, depth=1, flow="planar:2:tanh").double()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.3)
    x = (torch.rand(4, 6) < 0.5).double()
    grid = torch.linspace(-9, 9, 601, dtype=torch.float64)
    z = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            model.decoder(z).unsqueeze(1).expand(-1, 4, -1), x.expand(z.shape[0], -1, -1), reduction="none").sum(-1)
    log_prior = -0.5 * (z * z).sum(-1) - math.log(2 * math.pi)
    exact = -(torch.logsumexp(log_lik + log_prior.unsqueeze(1), 0) + 2 * math.log(float(grid[1] - grid[0])))
    neg_elbo, nll = per_point_estimates(model, x, samples=20_000, rows=50_000, seed=0)
    assert (nll - exact).abs().max() < 0.01
    assert (neg_elbo > nll).all() and (neg_elbo - nll).min() > 0.01


def test_estimates_do_not_depend_on_batching_or_on_the_ranks():
    model = FlowVAE(6, latent=3, hidden=8, depth=1, flow="radial:2").double()
    x = (torch.rand(10, 6) < 0.5).double()
    whole = per_point_estimates(model, x, samples=12, rows=1000, seed=5)
    small = per_point_estimates(model, x, samples=12, rows=5, seed=5)  # 5 samples per pass, one point at a time
    for a, b in zip(whole, small):
        assert (a - b).abs().max() < 1e-12
    ranks = [Distributed(rank=r, world=3) for r in range(3)]
    parts = [job.part(10) for job in ranks]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 7), (7, 10)]
    pieces = [per_point_estimates(model, x[p], samples=12, rows=1000, seed=5, first=p.start) for p in parts]
    assert (torch.cat([p[1] for p in pieces]) - whole[1]).abs().max() < 1e-12
    metrics = evaluate(model, x, samples=12, rows=1000, seed=5)
    assert abs(metrics.nll.mean - float(whole[1].mean())) < 1e-12
    assert abs(metrics.nll.stderr - float(whole[1].std()) / math.sqrt(10)) < 1e-12


def test_estimate_of_values():
    est = Estimate.of(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert est.mean == 3.0 and abs(est.stderr - math.sqrt(14 / 3) / 2) < 1e-12


def test_a_finished_run_loads_with_its_best_weights(digits, tmp_path):
    run = train_vae(digits, out=tmp_path, flow="householder:2", epochs=2, meta={"data": "digits"}, **TINY)
    model, config = load_vae(tmp_path)
    assert config["data"] == "digits" and config["vae"]["flow"] == "householder:2"
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])
    config = VAEConfig(**config["vae"])
    metrics = evaluate(model, digits.test, config.nll_samples, seed=config.seed + TEST_SEED)
    assert metrics == run.metrics
