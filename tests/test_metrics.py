import math

import pytest
import torch

from flowprobe import Flow, Planar, StandardNormal
from flowprobe.distributions import FunctionEnergy
from flowprobe.metrics import gaussian_nll, kde_nll, log_partition, nll_per_dim, reverse_kl


def _identity_flow():
    layer = Planar(2)
    layer.set_constrained(torch.zeros(2), torch.tensor([1.0, 0.0]), 0.0)
    return Flow(StandardNormal(2), [layer])


def test_exact_flow_has_zero_kl_and_full_ess():
    flow = _identity_flow()
    energy = FunctionEnergy(lambda z: 0.5 * (z * z).sum(-1), 2)
    result = reverse_kl(flow, energy, log_partition(energy).value, n=20_000)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["ess_fraction"] == pytest.approx(1.0, abs=1e-9)


def test_kl_and_ess_between_gaussians_are_exact():
    # q = N(0, I), p = N(0, s²I): KL = 2 [log s + 1/(2s²) − 1/2], ESS/n → 1/E_q[(p/q)²] = s²(2 − s²)
    s = 0.8
    flow = _identity_flow()
    energy = FunctionEnergy(lambda z: (z * z).sum(-1) / (2 * s * s), 2)
    result = reverse_kl(flow, energy, log_partition(energy).value, n=200_000)
    assert result["kl"] == pytest.approx(2 * (math.log(s) + 0.5 / s**2 - 0.5), abs=4 * result["kl_stderr"] + 1e-4)
    assert result["ess_fraction"] == pytest.approx(s * s * (2 - s * s), abs=0.01)


def test_nll_references():
    torch.manual_seed(0)
    x = torch.randn(4000, 2, dtype=torch.float64)
    gauss_entropy_per_dim = 0.5 * math.log(2 * math.pi * math.e)
    assert nll_per_dim(_identity_flow(), x) == pytest.approx(gauss_entropy_per_dim, abs=0.03)
    assert gaussian_nll(x[:2000], x[2000:]) == pytest.approx(gauss_entropy_per_dim, abs=0.03)
    assert kde_nll(x[:2000], x[2000:]) == pytest.approx(gauss_entropy_per_dim, abs=0.06)
