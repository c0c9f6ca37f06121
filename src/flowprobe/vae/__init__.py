"""Variational auto-encoders whose posteriors are flowprobe flows with per-point parameters.

* :mod:`~flowprobe.vae.model`: :class:`FlowVAE` (MLP or gated encoder/decoder, Bernoulli
  likelihood, amortised planar / radial / Householder / Sylvester O, H, T posteriors);
* :mod:`~flowprobe.vae.data`: binarised digits (bundled) and MNIST files (IDX, ``.amat``);
* :mod:`~flowprobe.vae.training`: :func:`train_vae` (KL warm-up, early stopping, checkpoints and
  resume, data-parallel under ``torchrun``);
* :mod:`~flowprobe.vae.evaluation`: ``−ELBO`` and importance-sampled NLL with standard errors;
* :mod:`~flowprobe.vae.table`: van den Berg et al.'s Table 1 over seeds.

The math is in ``docs/vae.md``; the command line is ``flowprobe vae``.
"""

from flowprobe.vae.data import BinaryImages, load_images
from flowprobe.vae.distributed import Distributed
from flowprobe.vae.evaluation import Estimate, TestMetrics, evaluate
from flowprobe.vae.model import PRESETS, FlowVAE, posterior_spec
from flowprobe.vae.training import TrainedVAE, VAEConfig, load_vae, train_vae

__all__ = [
    "PRESETS",
    "BinaryImages",
    "Distributed",
    "Estimate",
    "FlowVAE",
    "TestMetrics",
    "TrainedVAE",
    "VAEConfig",
    "evaluate",
    "load_images",
    "load_vae",
    "posterior_spec",
    "train_vae",
]
