"""Real data sets bundled with scikit-learn (no download), standardised per feature.

* ``digits``: 8×8 images (64 features, integers 0–16), dequantised with uniform noise
  ``x + u``, ``u ~ U[0, 1)``, then standardised.
* ``iris`` (4), ``wine`` (13), ``breast_cancer`` (30): standardised.

Standardisation uses the mean and standard deviation of the whole set (constant features are
left centred with scale 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["REAL_SETS", "real_data"]

REAL_SETS = ("digits", "iris", "wine", "breast_cancer")


def _load(name: str) -> Tensor:
    try:
        from sklearn import datasets
    except ImportError:
        raise ValueError(f"data set {name!r} needs scikit-learn (pip install 'flowprobe[data]')") from None
    loader = getattr(datasets, f"load_{name}")
    return torch.as_tensor(loader().data, dtype=torch.float64)


def standardise(x: Tensor) -> Tensor:
    """Per-feature ``(x − mean)/std``; features with zero spread keep scale 1."""
    std = x.std(dim=0)
    return (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))


def real_data(name: str, seed: int = 0) -> Tensor:
    """The standardised scikit-learn set ``name`` as float64 ``(N, d)`` (digits dequantised with ``seed``)."""
    if name not in REAL_SETS:
        raise ValueError(f"unknown data set {name!r}; expected one of: {', '.join(REAL_SETS)}")
    x = _load(name)
    if name == "digits":
        x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype, device="cpu")
    return standardise(x)
