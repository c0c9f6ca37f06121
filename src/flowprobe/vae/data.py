"""Binary images for the VAE: scikit-learn's digits (bundled), or MNIST files the user provides.

``load_images(source)`` returns a :class:`BinaryImages` (train / validation / test splits of 0/1
pixels, ``uint8``):

* ``"digits"`` (default): scikit-learn's 1797 8×8 digits (pixel values 0–16), binarised once with
  fixed noise, ``x ~ Bernoulli(v/16)`` (seed 0: the same images every run); 20 % test, then 10 %
  of the rest for validation, by a fixed permutation.
* a directory holding the statically binarised MNIST of Larochelle & Murray (2011), the set of the
  papers' tables: ``binarized_mnist_{train,valid,test}.amat`` (text, one image of 784 zeros and
  ones per line; 50 000 / 10 000 / 10 000 images);
* a directory holding MNIST's IDX files ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``
  (each optionally ``.gz``; LeCun et al. 1998): grey levels binarised once with fixed noise,
  ``x ~ Bernoulli(v/255)``; the last 10 000 training images are the validation split.

A missing, truncated or malformed file is a one-line ``FileNotFoundError`` / ``ValueError`` naming
the file and what is wrong.

References:
    H. Larochelle, I. Murray. The Neural Autoregressive Distribution Estimator. AISTATS 2011.
    Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied to document
    recognition. Proc. IEEE 1998. http://yann.lecun.com/exdb/mnist/ (the IDX format)
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowprobe.io import CorruptFileError

__all__ = ["AMAT_FILES", "BUILTIN", "IDX_FILES", "BinaryImages", "load_images", "read_amat", "read_idx_images"]

BUILTIN = "digits"
AMAT_FILES = {"train": "binarized_mnist_train.amat", "val": "binarized_mnist_valid.amat",
              "test": "binarized_mnist_test.amat"}
IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IDX_IMAGES = 0x00000803  # magic number: unsigned bytes, 3 dimensions
MNIST_VALIDATION = 10_000
BINARISE_SEED = 0
SPLIT_SEED = 0


@dataclass(frozen=True)
class BinaryImages:
    """Train, validation and test images as ``(N, D)`` tensors of 0/1 (``uint8``).

    Attributes:
        name: ``digits``, ``mnist-amat`` or ``mnist-idx``.
        train: Training images.
        val: Validation images (early stopping).
        test: Test images (reported metrics).
        shape: Image shape ``(rows, cols)``, ``rows·cols = D``.
    """

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    shape: tuple[int, int]

    @property
    def dim(self) -> int:
        """Pixels per image ``D``."""
        return self.train.shape[1]

    @property
    def is_mnist(self) -> bool:
        """Whether these are MNIST images (the published numbers apply)."""
        return self.name.startswith("mnist")

    def sizes(self) -> dict[str, int]:
        """Images per split."""
        return {"train": self.train.shape[0], "val": self.val.shape[0], "test": self.test.shape[0]}


def _binarise(grey: Tensor, top: float) -> Tensor:
    """``Bernoulli(grey/top)`` drawn once with a fixed seed (a static binarisation)."""
    noise = torch.rand(grey.shape, generator=torch.Generator().manual_seed(BINARISE_SEED), dtype=torch.float64)
    return (noise < grey.to(torch.float64) / top).to(torch.uint8)


def _digits() -> BinaryImages:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the digits data set needs scikit-learn (pip install 'flowprobe[data]')") from None
    images = _binarise(torch.as_tensor(load_digits().data), 16.0)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(0.2 * images.shape[0])
    n_val = round(0.1 * (images.shape[0] - n_test))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return BinaryImages(BUILTIN, images[train], images[val], images[test], (8, 8))


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip: bad header, CRC, a stream cut short
        raise CorruptFileError(f"cannot read {path}: {str(err).splitlines()[0] or type(err).__name__}") from None


def read_idx_images(path: str | Path) -> Tensor:
    """The images of an IDX file (``uint8``, 3 dimensions), flattened to ``(N, rows·cols)``.

    Format: big-endian ``int32`` magic ``0x00000803``, then ``N``, ``rows``, ``cols``, then
    ``N·rows·cols`` bytes; gzip-compressed if the name ends in ``.gz``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an IDX image file, or fewer / more bytes than its header says (truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 16:
        raise CorruptFileError(f"{path} is truncated: {len(raw)} bytes, an IDX header alone has 16")
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">i4")
    if magic != IDX_IMAGES:
        raise CorruptFileError(f"{path} is not an IDX image file (magic number {magic:#010x}, expected "
                               f"{IDX_IMAGES:#010x})")
    if min(n, rows, cols) < 1:
        raise CorruptFileError(f"{path} has an empty or negative shape ({n}, {rows}, {cols}) in its header")
    expected = 16 + int(n) * int(rows) * int(cols)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise CorruptFileError(f"{path} is {what}: {len(raw)} bytes, its header ({n} images of {rows}×{cols}) "
                               f"needs {expected}")
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(int(n), int(rows) * int(cols))
    return torch.from_numpy(pixels.copy())


def read_amat(path: str | Path) -> Tensor:
    """The images of a binarised-MNIST ``.amat`` file: one image per line, pixels ``0``/``1``
    separated by spaces, every line of one square length.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, a line of another length (a truncated file), a value other than
            0 or 1, or a line length that is not a square number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise CorruptFileError(f"cannot read {path} as text: {str(err).splitlines()[0]}") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise CorruptFileError(f"{path} holds no images")
    width = len(lines[0].split())
    rows = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) != width:
            raise CorruptFileError(f"{path} line {number} has {len(fields)} pixels, line 1 has {width} (truncated or "
                                   "malformed file)")
        rows.append(fields)
    try:
        values = np.asarray(rows, dtype=np.float64)
    except ValueError:
        raise CorruptFileError(f"{path} holds a value that is not a number") from None
    if not np.isin(values, (0.0, 1.0)).all():
        bad = np.argwhere(~np.isin(values, (0.0, 1.0)))[0]
        raise CorruptFileError(f"{path} line {bad[0] + 1} holds {values[tuple(bad)]:g}; binarised images hold 0 or 1")
    if math.isqrt(width) ** 2 != width:
        raise CorruptFileError(f"{path} has {width} pixels per image, not a square image")
    return torch.from_numpy(values.astype(np.uint8))


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _mnist(directory: Path) -> BinaryImages:
    if any((directory / name).exists() for name in AMAT_FILES.values()):
        missing = [name for name in AMAT_FILES.values() if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"data file not found: {directory / missing[0]} (binarised MNIST needs "
                                    f"{', '.join(AMAT_FILES.values())})")
        splits = {split: read_amat(directory / name) for split, name in AMAT_FILES.items()}
        kind = "mnist-amat"
    elif any(_idx_file(directory, stem) for stem in IDX_FILES.values()):
        files = {split: _idx_file(directory, stem) for split, stem in IDX_FILES.items()}
        missing = [IDX_FILES[split] for split, f in files.items() if f is None]
        if missing:
            raise FileNotFoundError(f"data file not found: {directory / missing[0]}[.gz]")
        grey = {split: read_idx_images(f) for split, f in files.items()}  # type: ignore[arg-type]
        if grey["train"].shape[0] <= MNIST_VALIDATION:
            raise CorruptFileError(f"{files['train']} has {grey['train'].shape[0]} images; the validation split "
                                   f"alone takes the last {MNIST_VALIDATION}")
        train = _binarise(grey["train"], 255.0)
        splits = {"train": train[:-MNIST_VALIDATION], "val": train[-MNIST_VALIDATION:],
                  "test": _binarise(grey["test"], 255.0)}
        kind = "mnist-idx"
    else:
        raise FileNotFoundError(f"no MNIST files in {directory}: expected {', '.join(AMAT_FILES.values())} or "
                                f"{' and '.join(IDX_FILES.values())}[.gz]")
    widths = {split: x.shape[1] for split, x in splits.items()}
    if len(set(widths.values())) > 1:
        raise CorruptFileError(f"the MNIST files in {directory} hold images of different sizes: {widths}")
    side = math.isqrt(widths["train"])
    return BinaryImages(kind, splits["train"], splits["val"], splits["test"], (side, side))


def load_images(source: str | Path = BUILTIN) -> BinaryImages:
    """The binary images of ``source``: ``"digits"`` or a directory of MNIST files (module docstring).

    Raises:
        FileNotFoundError: no such directory, or a file of the set is missing.
        ValueError: a truncated or malformed file (one line naming it).
    """
    if str(source) == BUILTIN:
        return _digits()
    directory = Path(source)
    if not directory.exists():
        raise FileNotFoundError(f"data not found: {directory} (give 'digits' or a directory of MNIST files)")
    if not directory.is_dir():
        raise NotADirectoryError(f"--data {directory} is a file; give the directory that holds the MNIST files")
    return _mnist(directory)
