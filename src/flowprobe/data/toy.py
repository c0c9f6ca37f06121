"""2-D toy data sets generated in code (the FFJORD / normflows family), all roughly in ``[−4, 4]²``.

Every generator takes ``(n, generator)`` and returns a float64 tensor ``(n, 2)``; the same seed
gives the same points.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TOY_SETS", "toy_data"]

F64 = torch.float64


def _randn(n: int, g: torch.Generator, d: int = 2) -> Tensor:
    return torch.randn(n, d, generator=g, dtype=F64)


def _rand(n: int, g: torch.Generator, d: int = 1) -> Tensor:
    return torch.rand(n, d, generator=g, dtype=F64)


def moons(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved half circles with noise 0.1, scaled by 2 and centred."""
    upper = torch.rand(n, generator=g, dtype=F64) < 0.5
    t = math.pi * _rand(n, g)[:, 0]
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x, y], -1) + 0.1 * _randn(n, g)
    return 2 * pts - torch.tensor([1.0, 0.5], dtype=F64)


def circles(n: int, g: torch.Generator) -> Tensor:
    """Two concentric circles of radii 3 and 1.5 with noise 0.1."""
    radius = torch.where(torch.rand(n, generator=g, dtype=F64) < 0.5, 3.0, 1.5)
    t = 2 * math.pi * _rand(n, g)[:, 0]
    return radius.unsqueeze(-1) * torch.stack([torch.cos(t), torch.sin(t)], -1) + 0.1 * _randn(n, g)


def eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    """Eight Gaussians of std 0.5/√2 on a circle of radius 2√2."""
    k = torch.randint(0, 8, (n,), generator=g)
    angle = k.to(F64) * math.pi / 4
    centres = 2 * math.sqrt(2) * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return centres + 0.5 / math.sqrt(2) * _randn(n, g)


def pinwheel(n: int, g: torch.Generator) -> Tensor:
    """Five curved arms (FFJORD's pinwheel)."""
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    labels = torch.randint(0, arms, (n,), generator=g).to(F64)
    features = _randn(n, g) * torch.tensor([radial_std, tangential_std], dtype=F64)
    features[:, 0] += 1.0
    angle = labels * 2 * math.pi / arms + rate * torch.exp(features[:, 0])
    rot = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], -1).reshape(n, 2, 2)
    return 2 * (rot @ features.unsqueeze(-1)).squeeze(-1)


def checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 black squares of a 4×4 checkerboard on ``[−4, 4]²``."""
    x1 = 4 * _rand(n, g)[:, 0] - 2
    x2 = _rand(n, g)[:, 0] - 2 * torch.randint(0, 2, (n,), generator=g).to(F64) + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], -1)


def two_spirals(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved spirals."""
    t = torch.sqrt(_rand(n, g)[:, 0]) * 540 * (2 * math.pi) / 360
    sign = torch.where(torch.rand(n, generator=g, dtype=F64) < 0.5, 1.0, -1.0)
    pts = sign.unsqueeze(-1) * torch.stack([-torch.cos(t) * t, torch.sin(t) * t], -1)
    return (pts + 0.5 * _rand(n, g, 2)) / 3


def rings(n: int, g: torch.Generator) -> Tensor:
    """Four concentric rings of radii 1, 2, 3, 4 (mass ∝ radius) with noise 0.08."""
    radius = torch.multinomial(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64), n, True, generator=g).to(F64) + 1
    t = 2 * math.pi * _rand(n, g)[:, 0]
    return radius.unsqueeze(-1) * torch.stack([torch.cos(t), torch.sin(t)], -1) + 0.08 * _randn(n, g)


TOY_SETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "moons": moons,
    "circles": circles,
    "8gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "rings": rings,
}


def toy_data(name: str, n: int, seed: int = 0) -> Tensor:
    """``n`` points of the toy set ``name`` (float64, ``(n, 2)``), reproducible from ``seed``."""
    if name not in TOY_SETS:
        raise ValueError(f"unknown toy data set {name!r}; expected one of: {', '.join(TOY_SETS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of points must be a positive integer, got {n!r}")
    with torch.device("cpu"):  # generated on the CPU whatever torch's default device (the seed's stream)
        return TOY_SETS[name](n, torch.Generator().manual_seed(seed))
