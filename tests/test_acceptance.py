"""The long acceptance experiments of issue 3 (``pytest -m slow``; single thread, ~10–30 min each)."""

import pytest
import torch

from flowprobe.experiments import Target, train_and_score
from flowprobe.train import FitConfig

pytestmark = pytest.mark.slow


def test_planar_32_reaches_kl_003_on_u1_with_default_settings():
    torch.set_num_threads(1)
    _, history, metrics = train_and_score("planar:32:tanh", Target.load("energy", "U1"), FitConfig())
    assert history.steps_done == 20_000
    assert metrics["kl"] + 3 * metrics["kl_stderr"] <= 0.03


def test_moons_mle_beats_the_best_gaussian_by_half_a_nat():
    torch.set_num_threads(1)
    target = Target.load("data", "moons", n=10_000)
    _, _, m = train_and_score("planar:32:tanh", target, FitConfig(steps=3000))
    assert 2 * (m["nll_gaussian"] - m["nll_flow"]) >= 0.5  # nats per point (2 dims)
    assert m["nll_kde"] < m["nll_gaussian"]
