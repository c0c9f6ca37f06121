r"""Test metrics of a VAE: the negative ELBO and the importance-sampled negative log-likelihood.

For each test image ``x``, ``S`` samples :math:`z^{(s)} \sim q_K(\cdot\mid x)` give the log
importance weights :math:`\log w_s = \log p(x\mid z^{(s)}) + \log p(z^{(s)}) - \log q_K(z^{(s)}\mid x)`;

.. math::

    -\mathrm{ELBO}(x) \approx -\frac1S \sum_s \log w_s, \qquad
    -\log p(x) \approx -\log \frac1S \sum_s w_s
    = -\Big(\operatorname{logsumexp}_s \log w_s - \log S\Big),

the second being the importance-sampling estimate of Burda et al. (2016) (an upper bound on
``−log p(x)`` in expectation that tightens as ``S`` grows), computed with log-sum-exp so that no
weight is exponentiated. Reported: the mean over test images and its standard error
``std/√N`` (which includes the Monte-Carlo noise of each image's estimate).

The ``S`` samples of image ``i`` come from a generator seeded by ``(seed, i)``: the numbers do not
depend on the batch size or on the number of ranks sharing the work (``docs/vae.md``).

References:
    Y. Burda, R. Grosse, R. Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016.
    https://arxiv.org/abs/1509.00519
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from flowprobe.vae.distributed import Distributed
from flowprobe.vae.model import FlowVAE
from flowprobe.validation import validation

__all__ = ["Estimate", "TestMetrics", "evaluate", "per_point_estimates", "point_noise"]

SEED_STRIDE = 2**32


class Estimate(NamedTuple):
    """A mean over points and its standard error."""

    mean: float
    stderr: float

    @classmethod
    def of(cls, values: Tensor) -> Estimate:
        n = values.numel()
        spread = float(values.double().std()) if n > 1 else math.nan
        return cls(float(values.double().mean()), spread / math.sqrt(n))


class TestMetrics(NamedTuple):
    """``−ELBO`` and importance-sampled ``NLL`` (nats per image) with standard errors."""

    neg_elbo: Estimate
    nll: Estimate
    samples: int
    points: int

    def to_json(self) -> dict[str, float | int]:
        return {"neg_elbo": self.neg_elbo.mean, "neg_elbo_se": self.neg_elbo.stderr, "nll": self.nll.mean,
                "nll_se": self.nll.stderr, "nll_samples": self.samples, "n_test": self.points}


def point_noise(index: int, samples: int, latent: int, seed: int, dtype: torch.dtype) -> Tensor:
    """The ``(samples, latent)`` standard normal draws of test point ``index`` (CPU)."""
    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
    return torch.randn(samples, latent, generator=generator, dtype=dtype)


@torch.no_grad()
def per_point_estimates(model: FlowVAE, images: Tensor, samples: int, rows: int, seed: int,
                        first: int = 0) -> tuple[Tensor, Tensor]:
    """``(−ELBO, NLL)`` estimates ``(N,)`` of images ``(N, D)`` whose indices start at ``first``.

    Points are processed in chunks of ``max(1, rows // samples)`` and each chunk's samples in blocks
    of at most ``rows``, so a decoder pass sees at most ``rows`` rows whatever ``samples`` is.
    """
    anchor = model.mean.weight
    per_chunk = max(1, rows // samples)
    neg_elbo, nll = [], []
    with validation(False):  # samples × points broadcast against the points' flow parameters
        for start in range(0, images.shape[0], per_chunk):
            x = images[start : start + per_chunk].to(device=anchor.device, dtype=anchor.dtype)
            noise = torch.stack([point_noise(first + start + i, samples, model.latent, seed, anchor.dtype)
                                 for i in range(x.shape[0])], 1).to(anchor.device)
            posterior = model.encode(x)
            log_w = torch.cat([model.log_weights(x, block, posterior).log_w for block in noise.split(rows, 0)])
            neg_elbo.append(-log_w.mean(0))
            nll.append(math.log(samples) - torch.logsumexp(log_w, 0))
    return torch.cat(neg_elbo), torch.cat(nll)


def evaluate(model: FlowVAE, images: Tensor, samples: int, rows: int = 20_000, seed: int = 0,
             job: Distributed | None = None) -> TestMetrics:
    """Mean ``−ELBO`` and importance-sampled ``NLL`` over ``images`` with ``samples`` samples per image,
    shared among the ranks of ``job`` (each takes a contiguous part of the images).

    Args:
        model: The trained VAE (its device and dtype are used).
        images: Test images ``(N, D)`` (0/1).
        samples: ``S`` per image.
        rows: At most this many image-sample pairs per decoder pass.
        seed: Seed of the samples (see :func:`point_noise`).
        job: The data-parallel job (default: one process).
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"the number of importance samples must be a positive integer, got {samples!r}")
    job = job or Distributed(device=model.mean.weight.device)
    part = job.part(images.shape[0])
    anchor = model.mean.weight
    values = torch.zeros(2, images.shape[0], dtype=anchor.dtype, device=job.device)
    if part.stop > part.start:
        neg_elbo, nll = per_point_estimates(model, images[part], samples, rows, seed, first=part.start)
        values[0, part], values[1, part] = neg_elbo, nll
    job.sum(values)
    return TestMetrics(Estimate.of(values[0]), Estimate.of(values[1]), samples, images.shape[0])
