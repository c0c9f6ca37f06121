"""The VAE's data: binarised digits, MNIST IDX and ``.amat`` files, and one-line errors for bad files."""

import gzip
import struct

import numpy as np
import pytest
import torch

from flowprobe.cli import main
from flowprobe.vae.data import AMAT_FILES, IDX_FILES, MNIST_VALIDATION, load_images, read_amat, read_idx_images


def write_idx(path, images, compress=False):
    images = np.asarray(images, dtype=np.uint8)
    raw = struct.pack(">iiii", 0x00000803, *images.shape) + images.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return raw


def write_amat(directory, sizes=(6, 3, 4), side=4, seed=0):
    rng = np.random.default_rng(seed)
    for name, n in zip(AMAT_FILES.values(), sizes):
        rows = rng.integers(0, 2, size=(n, side * side))
        (directory / name).write_text("".join(" ".join(str(v) for v in row) + "\n" for row in rows))
    return directory


def fake_idx_dir(directory, n_train=MNIST_VALIDATION + 20, n_test=7, compress=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    write_idx(directory / f"{IDX_FILES['train']}{suffix}", rng.integers(0, 256, (n_train, 4, 4)), compress)
    write_idx(directory / f"{IDX_FILES['test']}{suffix}", rng.integers(0, 256, (n_test, 4, 4)), compress)
    return directory


def test_digits_are_binary_with_fixed_splits():
    a, b = load_images(), load_images()
    assert a.name == "digits" and a.shape == (8, 8) and a.dim == 64
    assert a.sizes() == {"train": 1294, "val": 144, "test": 359}
    assert sum(a.sizes().values()) == 1797
    assert a.train.dtype == torch.uint8 and set(a.train.unique().tolist()) == {0, 1}
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)  # static binarisation and split
    assert 0.25 < float(a.train.float().mean()) < 0.35  # Bernoulli(v/16): about a third of the pixels are on


@pytest.mark.parametrize("compress", [False, True])
def test_idx_images_round_trip(tmp_path, compress):
    images = np.arange(3 * 2 * 5, dtype=np.uint8).reshape(3, 2, 5)
    path = tmp_path / ("images.gz" if compress else "images")
    write_idx(path, images, compress)
    assert torch.equal(read_idx_images(path), torch.from_numpy(images.reshape(3, 10)))


def test_idx_directory_gives_static_binarisation_and_mnist_splits(tmp_path):
    data = load_images(fake_idx_dir(tmp_path))
    assert data.name == "mnist-idx" and data.is_mnist and data.shape == (4, 4)
    assert data.sizes() == {"train": 20, "val": MNIST_VALIDATION, "test": 7}
    assert set(data.test.unique().tolist()) <= {0, 1}
    assert torch.equal(load_images(tmp_path).train, data.train)


def test_amat_directory(tmp_path):
    data = load_images(write_amat(tmp_path))
    assert data.name == "mnist-amat" and data.sizes() == {"train": 6, "val": 3, "test": 4} and data.dim == 16
    assert torch.equal(data.val, read_amat(tmp_path / AMAT_FILES["val"]))


def _error(capsys, data, tmp_path):
    code = main(["vae", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    return err


def test_truncated_idx_is_one_line_exit_2(tmp_path, capsys):
    directory = tmp_path / "mnist"
    directory.mkdir()
    fake_idx_dir(directory, compress=False)
    path = directory / IDX_FILES["test"]
    path.write_bytes(path.read_bytes()[:-5])
    err = _error(capsys, directory, tmp_path)
    assert "t10k-images-idx3-ubyte is truncated: 123 bytes, its header (7 images of 4×4) needs 128" in err


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:10], "is truncated: 10 bytes, an IDX header alone has 16"),
    (lambda raw: struct.pack(">i", 0x801) + raw[4:], "is not an IDX image file (magic number 0x00000801"),
    (lambda raw: raw + b"\0", "is longer than its header says"),
    (lambda raw: gzip.compress(raw)[:-12], "cannot read"),  # a gzip stream cut short
])
def test_malformed_idx_files(tmp_path, capsys, damage, message):
    directory = tmp_path / "mnist"
    directory.mkdir()
    fake_idx_dir(directory, compress=False)
    path = directory / IDX_FILES["test"]
    raw = damage(path.read_bytes())
    if message == "cannot read":
        path.unlink()
        path = directory / f"{IDX_FILES['test']}.gz"
    path.write_bytes(raw)
    assert message in _error(capsys, directory, tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda text: text[:-10] + "\n", "line 4 has 11 pixels, line 1 has 16 (truncated"),
    (lambda text: text.replace("1", "2", 1), "holds 2; binarised images hold 0 or 1"),
    (lambda text: text.replace("0", "x", 1), "holds a value that is not a number"),
    (lambda text: "", "holds no images"),
])
def test_malformed_amat_files(tmp_path, capsys, edit, message):
    directory = tmp_path / "mnist"
    directory.mkdir()
    write_amat(directory)
    path = directory / AMAT_FILES["test"]
    path.write_text(edit(path.read_text()))
    assert message in _error(capsys, directory, tmp_path)


def test_amat_images_must_be_square(tmp_path):
    (tmp_path / "x.amat").write_text("0 1 0\n1 1 0\n")
    with pytest.raises(ValueError, match="3 pixels per image, not a square image"):
        read_amat(tmp_path / "x.amat")


def test_missing_data_is_one_line_exit_2(tmp_path, capsys):
    assert "data not found" in _error(capsys, tmp_path / "nowhere", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no MNIST files in" in _error(capsys, empty, tmp_path)
    write_amat(empty)
    (empty / AMAT_FILES["val"]).unlink()
    assert "binarized_mnist_valid.amat (binarised MNIST needs" in _error(capsys, empty, tmp_path)
    only_train = tmp_path / "idx"
    only_train.mkdir()
    write_idx(only_train / IDX_FILES["train"], np.zeros((3, 2, 2)))
    assert "t10k-images-idx3-ubyte[.gz]" in _error(capsys, only_train, tmp_path)
    assert "is a file" in _error(capsys, only_train / IDX_FILES["train"], tmp_path)
