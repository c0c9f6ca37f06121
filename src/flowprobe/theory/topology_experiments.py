"""Training experiments on topology matching (Kong & Chaudhuri, AISTATS 2020, results 2 and 3).

* :func:`isotropic_split_experiment`: Sylvester flows ``N(0, I_d) → N(0, σ²I_d)`` with ``M`` neurons
  below, at and above the bound ``M = d``, with the reached TV and KL next to the derived floor.
* :func:`relu_impossibility`: ReLU Sylvester flows trained on a pair that no such flow maps exactly
  (:data:`FORBIDDEN_PAIRS`); the TV stalls above 0 and the pointwise residual stays large.

A run that trains poorly proves nothing by itself: the statements are the bounds of
:mod:`flowprobe.theory.topology` (``docs/theory/topology.md`` §5 says what each experiment shows).
TV is estimated by :func:`flowprobe.theory.tv.estimate_tv`, training is :func:`flowprobe.fit`.

References:
    Z. Kong, K. Chaudhuri. The Expressive Power of a Class of Normalizing Flow Models.
    AISTATS 2020. https://arxiv.org/abs/2006.00392
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flowprobe.distributions import Density, DiagonalNormal, Energy, FunctionEnergy, GaussianMixture, StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers import Sylvester
from flowprobe.metrics import reverse_kl
from flowprobe.theory.topology import LogDensity, isotropic_floor, off_kink_points, pointwise_residual
from flowprobe.theory.tv import TVEstimate, estimate_tv
from flowprobe.train import fit

__all__ = [
    "FORBIDDEN_PAIRS",
    "ImpossibilityRun",
    "SplitRun",
    "bimodal_product",
    "forbidden_pair",
    "four_peak_mixture",
    "isotropic_split_experiment",
    "relu_demo_flow",
    "relu_impossibility",
    "sylvester_stack",
    "target_energy",
]


# -- built-in pairs and flows ---------------------------------------------------------------------


def four_peak_mixture(dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """Equal-weight mixture of ``N(±1.2 e_i, 0.25 I)`` on ``R²`` (``docs/theory/topology.md`` §4)."""
    means = torch.tensor([[1.2, 0.0], [-1.2, 0.0], [0.0, 1.2], [0.0, -1.2]], dtype=dtype)
    return GaussianMixture(means, torch.full((4,), 0.25, dtype=dtype)).to(dtype)  # .to: also the sampling anchor


def bimodal_product(weight: float = 0.5, dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """``(w N(−1, 0.2) + (1−w) N(1, 0.2)) ⊗ (½ N(−1, 0.2) + ½ N(1, 0.2))``, a product density on ``R²``."""
    means = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=dtype)
    weights = torch.tensor([weight / 2, weight / 2, (1 - weight) / 2, (1 - weight) / 2], dtype=dtype)
    return GaussianMixture(means, torch.full((4,), 0.2, dtype=dtype), weights).to(dtype)


def relu_demo_flow(seed: int, layers: int = 3, source: Density | None = None) -> Flow:
    """Random VdB ReLU Sylvester layers (``M = d = 2`` each) on ``source`` (default the 4-peak mixture)."""
    torch.manual_seed(seed)
    source = four_peak_mixture() if source is None else source
    flow = Flow(source, [Sylvester(source.dim, activation="relu") for _ in range(layers)]).to(source.anchor.dtype)
    with torch.no_grad():
        for layer in flow.layers:
            layer.b.normal_(0, 0.5)
            layer.d1.normal_()
            layer.d2.normal_()
    return flow


FORBIDDEN_PAIRS = {
    "product": "N(0, I) → product of two bimodal marginals (a Gaussian's affine images are Gaussian)",
    "mixture": "equal-weight 4-peak mixture → product with unequal weights 0.35/0.35/0.15/0.15 "
    "(affine images keep the weights)",
}


def forbidden_pair(name: str) -> tuple[Density, Density]:
    """``(q, p)`` on ``R²`` that no ReLU Sylvester flow maps exactly (see :data:`FORBIDDEN_PAIRS`)."""
    if name == "product":
        return StandardNormal(2).double(), bimodal_product()
    if name == "mixture":
        return four_peak_mixture(), bimodal_product(0.7)
    raise ValueError(f"unknown pair {name!r}; expected one of: {', '.join(FORBIDDEN_PAIRS)}")


# -- the isotropic Gaussian split -----------------------------------------------------------------


def target_energy(target: LogDensity, dim: int) -> Energy:
    """``U = −log p`` as an :class:`~flowprobe.distributions.Energy`, so that ``fit(flow, energy=U)``
    minimises the reverse KL ``KL(f#q ‖ p)`` (exact, since ``p`` is normalised)."""
    return FunctionEnergy(lambda x: -target.log_prob(x), dim, getattr(target, "name", "target"))


def sylvester_stack(dim: int, neurons: int, layers: int = 1, activation: str = "identity") -> list[Sylvester]:
    """``layers`` orthogonal Sylvester layers with ``neurons`` in total (split evenly, ``≤ dim`` each).

    The number of layers is raised to ``⌈M/d⌉`` and capped at ``M`` where needed.
    """
    count = min(max(layers, math.ceil(neurons / dim)), neurons)
    sizes = [neurons // count + (i < neurons % count) for i in range(count)]
    return [Sylvester(dim, hidden=m, kind="orthogonal", activation=activation) for m in sizes]


@dataclass(frozen=True)
class SplitRun:
    """One trained flow of the isotropic Gaussian experiment.

    Attributes:
        neurons: ``M``.
        layers: Sylvester layers holding the ``M`` neurons.
        seed: Seed of the initialisation and the training.
        activation: Activation of the layers.
        kl: Monte-Carlo ``KL(f#q ‖ p)``.
        kl_stderr: Its standard error.
        tv: ``TV(f#q, p)`` with its interval.
        kl_floor: The floor of :func:`~flowprobe.theory.topology.isotropic_floor` for ``M``.
        tv_floor: Likewise for TV.
    """

    neurons: int
    layers: int
    seed: int
    activation: str
    kl: float
    kl_stderr: float
    tv: TVEstimate
    kl_floor: float
    tv_floor: float

    @property
    def above_floor(self) -> bool:
        """Whether the TV interval reaches the floor (an exact floor is never significantly beaten)."""
        return float(self.tv.high) >= self.tv_floor


def isotropic_split_experiment(
    dim: int,
    scale: float,
    neurons: Sequence[int],
    seeds: Sequence[int],
    steps: int = 1500,
    layers: int = 1,
    activation: str = "identity",
    lr: float = 2e-2,
    batch: int = 512,
    samples: int = 200_000,
) -> list[SplitRun]:
    """Train Sylvester flows ``N(0, I_d) → N(0, σ²I_d)`` for each ``M`` and seed (float64) with
    :func:`flowprobe.fit` on the reverse KL (cosine schedule, no clipping).

    The minimum admissible ``M`` is ``d``; below it the reached TV / KL cannot beat
    :func:`~flowprobe.theory.topology.isotropic_floor`, at and above it they can approach 0. TV and KL
    are estimated from ``samples`` draws (per side for TV).
    """
    runs = []
    for m in neurons:
        for seed in seeds:
            torch.manual_seed(seed)
            stack = sylvester_stack(dim, m, layers, activation)
            flow = Flow(StandardNormal(dim), stack).double()
            zeros = torch.zeros(dim, dtype=torch.float64)
            target = DiagonalNormal(zeros, torch.full_like(zeros, scale))
            energy = target_energy(target, dim)
            fit(flow, energy=energy, steps=steps, lr=lr, batch_size=batch, clip=None, log_every=steps, seed=seed,
                anneal=0)  # unimodal target: no temperature warm-up
            tv = estimate_tv(flow, target, samples)
            kl = reverse_kl(flow, energy, 0.0, samples, seed)  # p is normalised: log Z = 0
            tv_floor, kl_floor = isotropic_floor(dim, m, scale)
            runs.append(SplitRun(m, len(stack), seed, activation, kl["kl"], kl["kl_stderr"], tv, kl_floor, tv_floor))
    return runs


# -- the ReLU impossibility experiment -------------------------------------------------------------


@dataclass(frozen=True)
class ImpossibilityRun:
    """A ReLU Sylvester flow trained on a forbidden pair.

    Attributes:
        pair: Name in :data:`FORBIDDEN_PAIRS`.
        layers: Number of layers.
        seed: Seed.
        steps: Training steps done at each checkpoint.
        tv: ``TV(f#q, p)`` with its interval at each checkpoint.
        residual_median: Median of ``‖Cᵀ∇log p(f(z)) − ∇log q(z)‖`` over off-kink points of ``q``.
        residual_p90: Its 90th percentile.
        exact_residual_max: The same residual for ``p := f#q`` (control, round-off).
    """

    pair: str
    layers: int
    seed: int
    steps: list[int]
    tv: list[TVEstimate]
    residual_median: float
    residual_p90: float
    exact_residual_max: float


def relu_impossibility(
    pair: str,
    layers: int,
    seed: int,
    steps: int = 2000,
    checkpoints: int = 4,
    lr: float = 1e-2,
    batch: int = 512,
    points: int = 1000,
    samples: int = 50_000,
    train_samples: int = 100_000,
) -> ImpossibilityRun:
    """Fit a ReLU Sylvester flow to a forbidden pair and report what training cannot remove.

    Training is :func:`flowprobe.fit` by maximum likelihood (forward KL) on ``train_samples`` fixed
    draws of ``p``, in ``checkpoints`` consecutive runs (each a fresh Adam with its own cosine decay,
    i.e. warm restarts; chunk ``k`` uses seed ``checkpoints·seed + k``; no clipping, no validation
    split), with ``TV(f#q, p)`` estimated after each. The restarts matter: on ``mixture`` (4 layers,
    1500 steps) one cosine run stalls near TV 0.50 where three restarted chunks reach 0.24.
    """
    source, target = forbidden_pair(pair)
    flow = relu_demo_flow(seed, layers, source)
    data = target.sample(train_samples)
    done, tvs = [], []
    for k in range(checkpoints):
        chunk = steps * (k + 1) // checkpoints - steps * k // checkpoints
        if chunk:  # fewer steps than checkpoints: some chunks are empty
            fit(flow, data=data, steps=chunk, lr=lr, batch_size=batch, clip=None, val_fraction=0.0, log_every=chunk,
                seed=checkpoints * seed + k)
        done.append(steps * (k + 1) // checkpoints)
        tvs.append(estimate_tv(flow, target, samples))
    z = off_kink_points(flow, points)
    residual = pointwise_residual(flow, z, target=target)
    return ImpossibilityRun(
        pair,
        layers,
        seed,
        done,
        tvs,
        float(residual.median()),
        float(residual.quantile(0.9)),
        float(pointwise_residual(flow, z).max()),
    )
