import numpy as np
import pytest
import torch

from flowprobe.data import DATASETS, TOY_SETS, load_array, load_data


@pytest.mark.parametrize("name", list(TOY_SETS))
def test_toy_sets_are_reproducible_and_in_range(name):
    x = load_data(name, 500, seed=3)
    assert x.shape == (500, 2) and x.dtype == torch.float64
    assert torch.equal(x, load_data(name, 500, seed=3))
    assert not torch.equal(x, load_data(name, 500, seed=4))
    assert float(x.abs().max()) < 5.0
    assert float(x.std(0).min()) > 0.5


def test_moons_has_two_arcs():
    x = load_data("moons", 4000)
    # the upper arc's centre (0, 0)·2 − (1, 0.5) lies in the gap between the arcs
    radius_upper = ((x + torch.tensor([1.0, 0.5], dtype=x.dtype)) / 2).norm(dim=1)
    assert float(((radius_upper > 0.7) & (radius_upper < 1.3)).double().mean()) > 0.45


@pytest.mark.parametrize(("name", "shape"), [("iris", (150, 4)), ("wine", (178, 13)), ("breast_cancer", (569, 30)),
                                             ("digits", (1797, 64))])
def test_sklearn_sets_are_standardised(name, shape):
    x = load_data(name)
    assert x.shape == shape
    assert torch.allclose(x.mean(0), torch.zeros(shape[1], dtype=x.dtype), atol=1e-10)
    std = x.std(0)
    assert torch.allclose(std[std > 1e-6], torch.ones_like(std[std > 1e-6]), atol=1e-10)


def test_digits_are_dequantised():
    x = load_data("digits")
    assert len(torch.unique(x[:, 20])) > 1000  # integers 0..16 become continuous


def test_user_files(tmp_path):
    pts = np.arange(12, dtype=float).reshape(6, 2)
    np.save(tmp_path / "a.npy", pts)
    (tmp_path / "b.csv").write_text("x,y\n" + "\n".join(f"{a},{b}" for a, b in pts))
    assert torch.equal(load_data(str(tmp_path / "a.npy")), torch.as_tensor(pts))
    assert torch.equal(load_array(tmp_path / "b.csv", dim=2), torch.as_tensor(pts))


def test_bad_files(tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((4, 3)))
    with pytest.raises(ValueError, match="has 3 columns, expected 2"):
        load_array(tmp_path / "wide.npy", dim=2)
    (tmp_path / "nan.csv").write_text("1,2\nnan,3\n4,5\n")
    with pytest.raises(ValueError, match="NaN values in 1 row\\(s\\), first at row 1"):
        load_array(tmp_path / "nan.csv")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    with pytest.raises(ValueError, match="cannot read"):
        load_array(tmp_path / "ragged.csv")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot read"):
        load_array(tmp_path / "obj.npy")  # never unpickled
    with pytest.raises(FileNotFoundError):
        load_array(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="unknown data 'mons'"):
        load_data("mons")
    assert "moons" in DATASETS and "digits" in DATASETS
