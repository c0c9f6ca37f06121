import math

import pytest
import torch
from scipy import stats

import flowprobe as fp


def test_standard_normal_matches_scipy():
    x = torch.randn(20, 3, dtype=torch.float64)
    ref = stats.multivariate_normal(mean=[0, 0, 0]).logpdf(x.numpy())
    got = fp.StandardNormal(3).double().log_prob(x)
    assert (got - torch.as_tensor(ref)).abs().max() < 1e-12


def test_diagonal_normal_matches_scipy_and_samples_have_its_moments():
    loc, scale = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 3.0], dtype=torch.float64)
    dist = fp.DiagonalNormal(loc, scale)
    x = torch.randn(10, 2, dtype=torch.float64)
    ref = stats.multivariate_normal(mean=loc.numpy(), cov=(scale**2).numpy()).logpdf(x.numpy())
    assert (dist.log_prob(x) - torch.as_tensor(ref)).abs().max() < 1e-12
    s = dist.sample(200000)
    assert (s.mean(0) - loc).abs().max() < 0.03 and (s.std(0) - scale).abs().max() < 0.03


def test_trainable_diagonal_normal_has_parameters():
    dist = fp.DiagonalNormal(torch.zeros(2), torch.ones(2), trainable=True)
    assert sum(p.numel() for p in dist.parameters()) == 4
    dist.rsample(5).sum().backward()
    assert dist.loc.grad is not None


@pytest.mark.parametrize("cov_kind", ["isotropic", "diagonal", "full"])
def test_gaussian_mixture_matches_scipy(cov_kind):
    means = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    full = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.4, 0.0], [0.0, 2.0]], [[1.5, -0.7], [-0.7, 1.0]]])
    cov = {"isotropic": torch.tensor([0.5, 1.0, 2.0]), "diagonal": torch.tensor([[0.5, 1.0], [1.0, 2.0], [0.3, 0.3]]),
           "full": full}[cov_kind]
    mix = fp.GaussianMixture(means, cov, weights)
    x = 2 * torch.randn(30, 2, dtype=torch.float64)
    dense = mix.scale_tril @ mix.scale_tril.transpose(-1, -2)
    ref = sum(w * stats.multivariate_normal(mean=m, cov=c).pdf(x.numpy())
              for w, m, c in zip(weights.numpy(), means.numpy(), dense.numpy()))
    assert (mix.log_prob(x) - torch.as_tensor(ref).log()).abs().max() < 1e-10
    samples = mix.sample(100000)
    expected_mean = (weights.unsqueeze(-1) * means).sum(0)
    assert (samples.mean(0) - expected_mean).abs().max() < 0.05


def test_gaussian_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="positive definite"):
        fp.GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(ValueError, match="covariances must have shape"):
        fp.GaussianMixture(torch.zeros(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        fp.GaussianMixture(torch.zeros(2, 2), torch.ones(2), torch.tensor([1.0, -1.0]))


def test_densities_move_with_to():
    dist = fp.StandardNormal(2).to(torch.float64)
    assert dist.sample(3).dtype == torch.float64
    assert math.isclose(float(dist.log_prob(torch.zeros(1, 2, dtype=torch.float64))), -math.log(2 * math.pi))
    with pytest.raises(ValueError, match="positive integer"):
        dist.sample(0)
