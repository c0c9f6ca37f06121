r"""A VAE whose approximate posterior is a flow with per-point (amortised) parameters.

Generative model: :math:`p(z) = \mathcal N(0, I_d)`, :math:`p(x\mid z) = \prod_i
\mathrm{Bernoulli}(x_i; \sigma(\mathrm{dec}(z)_i))`. Posterior: the encoder maps ``x`` to features
``e(x)``, which give :math:`z_0 \sim q_0(z_0\mid x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma^2(x))`
and the raw parameters of every flow layer for this point; :math:`z_K = f_x(z_0)` and

.. math::

    \log q_K(z_K\mid x) = \log q_0(z_0\mid x) - \log\lvert\det \partial f_x/\partial z_0\rvert .

Amortisation uses the layers' one parameter mechanism: raw parameters with a point axis,
``flow(z0, params=[stack.unflatten(...) for each stack])``, so the constraints that make every layer
invertible, the log-dets and the inverses are those of the plain layers, per point. A stack's raw
parameters of point ``x`` are ``θ_stack + W e(x)``: the stack's own parameters act as the bias of
the head (its initialisation, near the identity, is every point's at the start, since ``W = 0``
initially) and the head is linear in the features, as in van den Berg et al.'s amortised flows.

References:
    D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014. https://arxiv.org/abs/1312.6114
    D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
    https://arxiv.org/abs/1505.05770
    R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling. Sylvester Normalizing Flows for
    Variational Inference. UAI 2018. https://arxiv.org/abs/1803.05649
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from flowprobe.distributions import StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers.base import RawParams
from flowprobe.spec import build_layers

__all__ = ["NO_FLOW", "PRESETS", "FlowVAE", "GatedDense", "LogWeights", "Posterior", "mlp", "posterior_spec"]

NO_FLOW = "none"
LOG_2PI = math.log(2 * math.pi)


def posterior_spec(name: str, latent: int) -> str:
    """The flow spec of a named posterior for a latent dimension ``latent`` (or ``name`` itself if it
    is a spec): the rows of van den Berg et al.'s Table 1 plus radial and Householder flows.

    ``o-snf`` uses ``M = max(1, latent // 2)`` orthonormal columns (van den Berg et al. use 32 for
    64 latent dimensions), ``h-snf`` 8 reflections per layer (their code's default), ``t-snf`` and
    ``h-snf`` ``M = latent``.
    """
    presets = {
        "vae": NO_FLOW,
        "planar16": "planar:16:tanh",
        "planar80": "planar:80:tanh",
        "radial": "radial:16",
        "householder": "householder:16",
        "o-snf": f"sylvester:16:orthogonal:m={max(1, latent // 2)}",
        "h-snf": "sylvester:16:householder",
        "t-snf": "sylvester:16:triangular",
    }
    return presets.get(name, name)


PRESETS = ("vae", "planar16", "planar80", "radial", "householder", "o-snf", "h-snf", "t-snf")


class GatedDense(nn.Module):
    r"""A gated dense layer :math:`h = (W x + b) \odot \sigma(V x + c)`.

    References:
        Y. N. Dauphin, A. Fan, M. Auli, D. Grangier. Language Modeling with Gated Convolutional
        Networks. ICML 2017 (gating); J. M. Tomczak, M. Welling (2016) use gated dense layers in
        their VAEs. https://arxiv.org/abs/1612.08083
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.value = nn.Linear(n_in, n_out)
        self.gate = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


def mlp(n_in: int, hidden: int, depth: int, gated: bool) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden``: ReLU-activated linear layers, or gated dense layers."""
    blocks: list[nn.Module] = []
    for i in range(depth):
        width = n_in if i == 0 else hidden
        blocks += [GatedDense(width, hidden)] if gated else [nn.Linear(width, hidden), nn.ReLU()]
    return nn.Sequential(*blocks)


class Posterior(NamedTuple):
    """The encoder's output for a batch: ``q_0``'s mean and log-variance ``(N, d)`` and the raw flow
    parameters of every stack (``{name: (N, K, *shape)}``)."""

    mean: Tensor
    log_var: Tensor
    params: list[RawParams]


class LogWeights(NamedTuple):
    """Per-sample terms of the ELBO, shape ``(..., N)``: ``log p(x|z_K)`` and
    ``log p(z_K) − log q_K(z_K|x)`` (minus the single-sample KL); their sum is the log importance
    weight ``log w``."""

    log_lik: Tensor
    log_ratio: Tensor

    @property
    def log_w(self) -> Tensor:
        return self.log_lik + self.log_ratio


def _standard_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


class FlowVAE(nn.Module):
    """A Bernoulli VAE with a flow posterior (module docstring).

    Args:
        data_dim: Pixels ``D`` per image.
        latent: Latent dimension ``d``.
        hidden: Width of the encoder's and decoder's hidden layers.
        depth: Hidden layers of the encoder and of the decoder.
        flow: ``"none"``, a preset name (:data:`PRESETS`) or a flow spec (:mod:`flowprobe.spec`),
            e.g. ``"planar:16:tanh"``, ``"sylvester:16:orthogonal:m=8"``.
        gated: Gated dense layers instead of ReLU ones.
    """

    def __init__(self, data_dim: int, latent: int = 8, hidden: int = 128, depth: int = 2, flow: str = NO_FLOW,
                 gated: bool = False) -> None:
        super().__init__()
        for name, value in {"data_dim": data_dim, "latent": latent, "hidden": hidden, "depth": depth}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.latent, self.spec = latent, posterior_spec(flow, latent)
        self.encoder = mlp(data_dim, hidden, depth, gated)
        self.mean = nn.Linear(hidden, latent)
        self.log_var = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(mlp(latent, hidden, depth, gated), nn.Linear(hidden, data_dim))
        # the flow is drawn last: under one seed, every posterior starts with the same encoder and decoder
        stacks = [] if self.spec == NO_FLOW else build_layers(self.spec, latent)
        self.flow = Flow(StandardNormal(latent), stacks)
        self.widths = [stack.raw_numel for stack in stacks]
        self.head = nn.Linear(hidden, sum(self.widths), bias=False) if stacks else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)  # every point starts with the stacks' own initialisation

    def encode(self, x: Tensor) -> Posterior:
        """``q``'s parameters for images ``x`` ``(N, D)``."""
        e = self.encoder(x)
        params: list[RawParams] = []
        if self.head is not None:
            for stack, flat in zip(self.flow.stacks, self.head(e).split(self.widths, -1)):
                own = stack.own_raw()
                params.append({name: own[name] + value for name, value in stack.unflatten(flat).items()})
        return Posterior(self.mean(e), self.log_var(e), params)

    def log_weights(self, x: Tensor, noise: Tensor, posterior: Posterior | None = None) -> LogWeights:
        """The ELBO's terms at ``z_K = f_x(μ + σ ε)`` for standard normal ``noise`` ε ``(..., N, d)``
        (leading sample dimensions broadcast against the points' parameters; run with validation off
        for them, :func:`flowprobe.validation`).

        Returns:
            :class:`LogWeights` of shape ``(..., N)``.
        """
        post = self.encode(x) if posterior is None else posterior
        z0 = post.mean + torch.exp(0.5 * post.log_var) * noise
        zk, logdet = self.flow(z0, params=post.params or None)
        log_q = _standard_log_prob(noise) - 0.5 * post.log_var.sum(-1) - logdet
        logits = self.decoder(zk)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        return LogWeights(log_lik, _standard_log_prob(zk) - log_q)

    def forward(self, x: Tensor, noise: Tensor, beta: float = 1.0) -> Tensor:
        """The training loss per point, ``−(log p(x|z_K) + β (log p(z_K) − log q_K(z_K|x)))`` ``(N,)``:
        the negative ELBO for ``β = 1`` (single-sample estimate; β < 1 during KL warm-up)."""
        terms = self.log_weights(x, noise)
        return -(terms.log_lik + beta * terms.log_ratio)
