"""``flowprobe topology …`` end to end: numbers in --json, one-line errors with exit status 2."""

import json

import pytest

from flowprobe.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run_json(capsys, *argv):
    assert main(["topology", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fail(capsys, *argv):
    assert main(["topology", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


USER_FILE = """
import torch
import flowprobe as fp

def flow():
    torch.manual_seed(0)
    return fp.Flow(fp.StandardNormal(5), [fp.Planar(5, "tanh"), fp.Sylvester(5, hidden=2)]).double()

wide = fp.DiagonalNormal(torch.zeros(5, dtype=torch.float64), torch.full((5,), 2.0, dtype=torch.float64))
radial = fp.Flow(fp.StandardNormal(3), [fp.Radial(3)])
not_a_flow = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(USER_FILE)
    return path


def test_rank_default_and_user_flow(capsys, user_file):
    report = run_json(capsys, "rank", "--points", "100")
    assert report["rank"] == report["neurons"] == 3 and report["outside_residual"] < 1e-8
    assert len(report["singular_values"]) == 8 and report["consistent"]
    mine = run_json(capsys, "rank", "--flow", f"{user_file}:flow", "--points", "100")
    assert mine["neurons"] == 3 and mine["rank"] <= 3 and mine["outside_residual"] < 1e-8
    wrong = run_json(capsys, "rank", "--flow", f"{user_file}:flow", "--target", f"{user_file}:wide")
    assert wrong["rank"] == 5 and not wrong["consistent"]


def test_gaussian_bound_floors_and_training(capsys):
    iso = run_json(capsys, "gaussian", "--dim", "3", "--scale", "1.5")
    assert iso["bound"]["min_neurons"] == 3
    assert [f["neurons"] for f in iso["floors"]] == [0, 1, 2, 3] and iso["floors"][3]["tv_floor"] == 0
    general = run_json(capsys, "gaussian", "--cov-q", "[[1,0],[0,1]]", "--cov-p", "[[2,0],[0,0.5]]")
    assert general["bound"]["min_neurons"] == 1
    trained = run_json(capsys, "gaussian", "--dim", "2", "--scale", "1.5", "--train", "--neurons", "1,2",
                       "--seeds", "0", "--steps", "60", "--samples", "5000")
    below, at = trained["runs"]
    assert below["neurons"] == 1 and below["above_floor"] and below["tv"]["low"] > 0.15
    assert at["tv_floor"] == 0


def test_relu_condition(capsys):
    result = run_json(capsys, "relu", "--points", "300")
    assert result["residual_max"] < 1e-8
    assert len(result["modes"]) == 4 and all(m["is_mode"] for m in result["modes"])


def test_relu_fit_reports_residual_and_tv(capsys):
    run = run_json(capsys, "relu", "--fit", "mixture", "--layers", "1", "--steps", "8")
    assert run["steps"] == [2, 4, 6, 8] and len(run["tv"]) == 4
    assert run["exact_residual_max"] < 1e-8 < run["residual_median"]


def test_figures(capsys, tmp_path):
    result = run_json(capsys, "figures", "--out", str(tmp_path), "--grid", "25")
    assert [p.rsplit("/", 1)[1] for p in result["figures"]] == ["topology_ridge.png", "topology_modes.png"]
    for name in ("topology_ridge.png", "topology_modes.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_user_errors(capsys, user_file):
    assert "file not found" in fail(capsys, "rank", "--flow", "missing.py:flow")
    assert "expected path/to/file.py:name" in fail(capsys, "rank", "--flow", "flow")
    assert "must be a flowprobe.Flow" in fail(capsys, "rank", "--flow", f"{user_file}:not_a_flow")
    assert "has no attribute 'nope'" in fail(capsys, "rank", "--flow", f"{user_file}:nope")
    assert "Radial layers are not of the form" in fail(capsys, "rank", "--flow", f"{user_file}:radial")
    assert "--scale" in fail(capsys, "gaussian", "--dim", "3")
    assert "either --dim" in fail(capsys, "gaussian")
    assert "symmetric positive definite" in fail(capsys, "gaussian", "--cov-q", "[[1,0],[0,1]]", "--cov-p", "[[1]]")
