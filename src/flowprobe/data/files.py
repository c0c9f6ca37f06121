"""The user's own data: ``.npy`` (never unpickled; real numbers) or ``.csv`` (numbers; one optional header
line; a UTF-8 byte-order mark is ignored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowprobe.validation import check_points

__all__ = ["load_array"]


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> np.ndarray:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first field
            first = f.readline()
        header = not all(_is_number(field) for field in first.split(","))  # one header line is allowed
        return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=int(header), dtype=np.float64, encoding="utf-8-sig")
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path} as CSV of numbers: {str(err).splitlines()[0]}") from None


def load_array(path: str | Path, dim: int | None = None) -> Tensor:
    """Points ``(N, d)`` from ``path`` (``.npy`` or ``.csv``) as float64, validated.

    Args:
        path: The file.
        dim: Required width ``d``; ``None`` accepts the file's width.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown extension, not a 2-D numeric array, wrong width, NaN/inf rows, empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"cannot read {path} as a numeric .npy array: {str(err).splitlines()[0]}") from None
    elif suffix == ".csv":
        array = _read_csv(path)
    else:
        raise ValueError(f"data file {path} must end in .npy or .csv, got {suffix or 'no extension'!r}")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"data file {path} must hold a 2-D numeric array (N, d), not {array.shape} {array.dtype}")
    if np.iscomplexobj(array):
        raise ValueError(f"data file {path} holds complex numbers ({array.dtype}); expected real values")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"data file {path} has {array.shape[1]} columns, expected {dim}")
    return check_points(torch.as_tensor(array, dtype=torch.float64), array.shape[1], f"data file {path.name}")
