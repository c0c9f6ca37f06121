"""A VAE training epoch on binarised digits: flowprobe's amortised flows against the same model written
with Pyro's conditional transforms, side by side in one run.

All models share the encoder and decoder (copies of the same modules), the Bernoulli likelihood and
the update rule (Adamax, lr 1e-3); only the posterior flow and the training code differ:

* flowprobe: :class:`flowprobe.vae.FlowVAE` — one linear head whose output is ``unflatten``-ed into
  per-point raw parameters of a ``Planar`` / ``Householder`` stack (``flow(z0, params=...)``),
  trained with :mod:`flowprobe.vae.training`'s optimiser (``adamax``: :class:`flowprobe.optim.FlatAdamax`,
  Adamax's update on one flat buffer);
* Pyro 1.9.2: ``ConditionalPlanar`` (K transforms) / ``ConditionalHouseholder`` (one transform of K
  reflections) — the classes that ``conditional_planar`` / ``conditional_householder`` build — each
  conditioned on the encoder's features through a *linear* hypernetwork holding the per-layer
  slices of flowprobe's head (the helpers' default hypernetwork is a DenseNN with two hidden layers
  of 10·d units, which would make Pyro's model bigger and slower): the same parameters, the same
  function. Two ways of training it:

  - "Pyro SVI": the idiomatic way, a model and a guide (``TransformedDistribution`` of the
    conditioned transforms) trained by ``SVI`` with ``Trace_ELBO`` and ``pyro.optim.Adamax``;
  - "Pyro loop": the leanest way, the transforms applied one by one (``t(z)``,
    ``t.log_abs_det_jacobian``) in a plain PyTorch loop with ``torch.optim.Adamax(foreach=True)``.

Before timing, flowprobe's model and the Pyro loop's are loaded with the same weights and must give
the same loss and gradients (planar with ``min_slope`` 1e-12, i.e. Pyro's constraint ``wᵀû ≥ −1``).
Times are the process's CPU seconds per epoch (one thread), so that other jobs on a shared machine
do not count; epochs alternate between the implementations and the table reports medians. Argument
validation is off in both libraries. Each posterior's rounds also time the plain VAE in each
implementation ("no flow": what every posterior's epoch shares), and a second table gives each flow's
own time per epoch (the median over the rounds of its epoch minus the plain VAE's in the same round).

Run with Pyro installed (``make bench`` installs the ``bench`` extra)::

    python benchmarks/vae_speed.py [--epochs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from flowprobe.vae.data import load_images
from flowprobe.vae.model import FlowVAE
from flowprobe.vae.training import OPTIMISERS
from flowprobe.validation import validation

THREADS = int(os.environ.get("FLOWPROBE_BENCH_THREADS", "1"))
CASES = {"planar K=16": "planar:16:tanh:min_slope=1e-12", "householder K=16": "householder:16"}
PLAIN = "none"  # the plain VAE, timed in the same rounds as each posterior
IMPLEMENTATIONS = ("flowprobe", "pyro_svi", "pyro_loop")


class LinearSlices(nn.Module):
    """A hypernetwork for one Pyro transform: ``x ↦ W x + b`` split into the transform's parameters."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sizes: list[int]) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.sizes = sizes

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        parts = self.linear(context).split(self.sizes, -1)
        return parts if len(parts) > 1 else parts[0]


class PyroVAE(nn.Module):
    """The same VAE with its flow written with Pyro's conditional transforms (weights copied from ``ours``)."""

    def __init__(self, ours: FlowVAE) -> None:
        from pyro.distributions.transforms import ConditionalHouseholder, ConditionalPlanar

        super().__init__()
        self.encoder, self.mean, self.log_var = (copy.deepcopy(m) for m in (ours.encoder, ours.mean, ours.log_var))
        self.decoder, self.latent = copy.deepcopy(ours.decoder), ours.latent
        if not ours.flow.stacks:  # the plain VAE: what every posterior's epoch shares
            self.flows = nn.ModuleList()
            return
        stack = ours.flow.stacks[0]
        own = {k: v.detach() for k, v in stack.own_raw().items()}  # (K, *shape): the head's bias
        head = ours.head.weight.detach().reshape(stack.depth, -1, ours.head.weight.shape[1])  # per layer
        d = ours.latent
        if stack.family == "planar":  # raw layout per layer: u (d), w (d), b (1); Pyro's nn returns (b, u, w)
            order = torch.cat([torch.arange(2 * d, 2 * d + 1), torch.arange(2 * d)])
            self.flows = nn.ModuleList(
                ConditionalPlanar(LinearSlices(head[k][order], torch.cat([own["b"][k].reshape(1), own["u"][k],
                                                                          own["w"][k]]), [1, d, d]))
                for k in range(stack.depth))
        else:  # householder: K layers of one reflection = one Pyro transform of K reflections
            with warnings.catch_warnings():  # K > d reflections: Pyro warns of over-parametrisation
                warnings.simplefilter("ignore")
                self.flows = nn.ModuleList([ConditionalHouseholder(d, LinearSlices(
                    head.reshape(-1, head.shape[-1]), own["v"].reshape(-1), [d] * stack.depth), stack.depth)])

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        e = self.encoder(x)
        mean, log_var = self.mean(e), self.log_var(e)
        z = mean + torch.exp(0.5 * log_var) * noise
        log_q = (-0.5 * noise.pow(2) - 0.5 * log_var).sum(-1)  # up to the constant both models drop alike below
        for t in self.flows:
            conditioned = t.condition(e)
            z_next = conditioned(z)
            log_q = log_q - conditioned.log_abs_det_jacobian(z, z_next)
            z = z_next
        log_prior = (-0.5 * z.pow(2)).sum(-1)
        log_lik = -nn.functional.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(-1)
        return -(log_lik + log_prior - log_q)


class PyroSVI:
    """The Pyro model trained the idiomatic way: ``SVI(model, guide, Adamax, Trace_ELBO())``."""

    def __init__(self, net: PyroVAE, prefix: str) -> None:
        import pyro
        import pyro.distributions as dist
        from pyro.infer import SVI, Trace_ELBO

        self.net, self.pyro, self.dist, self.prefix = net, pyro, dist, prefix  # prefix: its names in the param store
        self.svi = SVI(self.model, self.guide, pyro.optim.Adamax({"lr": 1e-3, "eps": 1e-7}), Trace_ELBO())

    def model(self, x: torch.Tensor) -> None:
        self.pyro.module(f"{self.prefix}decoder", self.net.decoder)
        prior = self.dist.Normal(x.new_zeros(x.shape[0], self.net.latent), 1.0).to_event(1)
        with self.pyro.plate("data", x.shape[0]):
            z = self.pyro.sample("z", prior)
            self.pyro.sample("x", self.dist.Bernoulli(logits=self.net.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        for name in ("encoder", "mean", "log_var", "flows"):
            self.pyro.module(f"{self.prefix}{name}", getattr(self.net, name))
        e = self.net.encoder(x)
        base = self.dist.Normal(self.net.mean(e), torch.exp(0.5 * self.net.log_var(e))).to_event(1)
        with self.pyro.plate("data", x.shape[0]):
            self.pyro.sample("z", self.dist.TransformedDistribution(base, [t.condition(e) for t in self.net.flows]))

    def epoch(self, train: torch.Tensor, batch: int) -> float:
        start = time.process_time()
        for s in range(train.shape[0] // batch):
            self.svi.step(train[s * batch : (s + 1) * batch])
        return time.process_time() - start


def check_same_model(ours: FlowVAE, pyro: PyroVAE, x: torch.Tensor) -> float:
    """Largest difference of the per-point losses and of the encoder's gradients of the two models."""
    noise = torch.randn(x.shape[0], ours.latent, dtype=x.dtype)
    a, b = ours(x, noise), pyro(x, noise)  # the −d/2·log 2π of q and of the prior cancel in flowprobe's loss
    ga = torch.autograd.grad(a.sum(), list(ours.encoder.parameters()))
    gb = torch.autograd.grad(b.sum(), list(pyro.encoder.parameters()))
    return max(float((a - b).abs().max().detach()), *(float((u - v).abs().max()) for u, v in zip(ga, gb)))


def epoch(model: nn.Module, train: torch.Tensor, noise: torch.Tensor, opt: torch.optim.Optimizer, batch: int) -> float:
    """CPU seconds of this process for one epoch of training steps (mini-batches in a fixed order)."""
    start = time.process_time()
    for s in range(train.shape[0] // batch):
        rows = slice(s * batch, (s + 1) * batch)
        loss = model(train[rows], noise[rows]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.process_time() - start


def implementations(spec: str, dim: int, train: torch.Tensor, noise: torch.Tensor, args: argparse.Namespace
                    ) -> tuple[dict[str, Callable[[], float]], float]:
    """One epoch of flowprobe, Pyro SVI and the Pyro loop for one posterior (the same weights, checked), and
    the largest difference of their losses and gradients."""
    torch.manual_seed(0)  # the same encoder and decoder for every posterior
    ours = FlowVAE(dim, args.latent, args.hidden, 2, spec)
    if ours.head is not None:
        with torch.no_grad():
            ours.head.weight.normal_(0, 0.05)  # per-point parameters that differ (the head starts at 0)
    loop, svi = PyroVAE(ours), PyroSVI(PyroVAE(ours), prefix=f"{spec}.")
    gap = check_same_model(copy.deepcopy(ours).double(), copy.deepcopy(loop).double(), train[:64].double())
    assert gap < 1e-9, f"{spec}: flowprobe's and Pyro's models differ by {gap:.3g}"
    ours_opt = OPTIMISERS["adamax"](ours.parameters(), 1e-3)
    loop_opt = torch.optim.Adamax(loop.parameters(), lr=1e-3, eps=1e-7, foreach=True)
    return {"flowprobe": lambda: epoch(ours, train, noise, ours_opt, args.batch_size),
            "pyro_svi": lambda: svi.epoch(train, args.batch_size),
            "pyro_loop": lambda: epoch(loop, train, noise, loop_opt, args.batch_size)}, gap


def time_case(spec: str, dim: int, train: torch.Tensor, noise: torch.Tensor, args: argparse.Namespace) -> dict:
    """Median epoch times of flowprobe, Pyro SVI and the Pyro loop for one posterior and for the plain VAE,
    all six alternating epoch by epoch; a flow's own time is the median over the rounds of its epoch minus
    the plain VAE's epoch of the same implementation in the same round."""
    import pyro

    pyro.clear_param_store()
    with validation(False):
        flow_runs, gap = implementations(spec, dim, train, noise, args)
        plain_runs, _ = implementations(PLAIN, dim, train, noise, args)
        runs = flow_runs | {f"{k}_plain": run for k, run in plain_runs.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(args.epochs + 1):
            for key, run in runs.items():
                seconds = run()
                if i > 0:  # the first epoch warms up allocators and caches
                    times[key].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    own = {k: statistics.median(a - b for a, b in zip(times[k], times[f"{k}_plain"], strict=True))
           for k in IMPLEMENTATIONS}
    return {f"{k}_s": v for k, v in median.items()} | {
        "speedup_vs_svi": median["pyro_svi"] / median["flowprobe"],
        "speedup_vs_loop": median["pyro_loop"] / median["flowprobe"],
        "flow_own_s": own, "max_difference": gap, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per implementation (after a warm-up one)")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import pyro

    pyro.enable_validation(False)
    torch.set_num_threads(THREADS)
    images = load_images()
    train = images.train.float()
    noise = torch.randn(train.shape[0], args.latent, generator=torch.Generator().manual_seed(0))
    results = {name: time_case(spec, images.dim, train, noise, args) for name, spec in CASES.items()}
    print(f"VAE training epoch on digits ({train.shape[0]} images, batch {args.batch_size}, latent {args.latent}, "
          f"hidden {args.hidden}, {THREADS} thread(s), torch {torch.__version__}, pyro {pyro.__version__}); "
          f"CPU seconds per epoch, median of {args.epochs} epochs")
    print("| posterior | flowprobe | Pyro SVI | Pyro loop | speed-up vs SVI | speed-up vs loop |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        plain = [r[f"{k}_plain_s"] for k in IMPLEMENTATIONS]
        print(f"| no flow (timed with {name}) | {plain[0]:.3f} | {plain[1]:.3f} | {plain[2]:.3f} | "
              f"{plain[1] / plain[0]:.2f}× | {plain[2] / plain[0]:.2f}× |")
        print(f"| {name} | {r['flowprobe_s']:.3f} | {r['pyro_svi_s']:.3f} | {r['pyro_loop_s']:.3f} | "
              f"{r['speedup_vs_svi']:.2f}× | {r['speedup_vs_loop']:.2f}× |")
    print("\nThe flows' own time per epoch (median over the rounds of the posterior's epoch minus the plain VAE's):")
    print("| posterior | flowprobe | Pyro SVI | Pyro loop | flow speed-up vs SVI | flow speed-up vs loop |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        own = r["flow_own_s"]
        print(f"| {name} | {own['flowprobe']:.3f} | {own['pyro_svi']:.3f} | {own['pyro_loop']:.3f} | "
              f"{own['pyro_svi'] / own['flowprobe']:.2f}× | {own['pyro_loop'] / own['flowprobe']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": THREADS, "torch": torch.__version__, "pyro": pyro.__version__, **vars(args),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
