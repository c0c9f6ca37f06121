"""Data for maximum-likelihood training: 2-D toy sets, scikit-learn sets, the user's files.

``load_data(name)`` accepts a toy name (:data:`~flowprobe.data.toy.TOY_SETS`), a scikit-learn
name (:data:`~flowprobe.data.real.REAL_SETS`) or a path ending in ``.npy`` / ``.csv``.
"""

from __future__ import annotations

from torch import Tensor

from flowprobe.data.files import load_array
from flowprobe.data.real import REAL_SETS, real_data, standardise
from flowprobe.data.toy import TOY_SETS, toy_data

__all__ = ["DATASETS", "REAL_SETS", "TOY_SETS", "load_array", "load_data", "real_data", "standardise", "toy_data"]

DATASETS = (*TOY_SETS, *REAL_SETS)
DEFAULT_TOY_SIZE = 10_000


def load_data(name: str, n: int | None = None, seed: int = 0) -> Tensor:
    """Points ``(N, d)`` (float64) of a named set or a file.

    Args:
        name: Toy set, scikit-learn set, or a ``.npy`` / ``.csv`` path.
        n: Number of points to generate for toy sets (default 10 000); ignored otherwise.
        seed: Seed of the generator (toy sets; digits' dequantisation noise).

    Raises:
        ValueError / FileNotFoundError: unknown name, unreadable file (one-line messages).
    """
    if name in TOY_SETS:
        return toy_data(name, DEFAULT_TOY_SIZE if n is None else n, seed)
    if name in REAL_SETS:
        return real_data(name, seed)
    if name.lower().endswith((".npy", ".csv")):
        return load_array(name)
    raise ValueError(f"unknown data {name!r}; expected a .npy/.csv file or one of: {', '.join(DATASETS)}")
