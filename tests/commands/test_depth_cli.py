"""``flowprobe depth …`` end to end: brackets in --json, reruns, reports, kill -9, Ray, one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.special import ndtri
from tests.processes import kill_9_when

from flowprobe.cli import main
from flowprobe.sweep import Store, run_sweep
from flowprobe.theory import depth_experiments as dx

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[2]
QUICK = ["--steps", "50", "--train-samples", "1024", "--tv-samples", "2000", "--no-progress"]
RAY_REQUIRED = bool(os.environ.get("CI"))  # CI installs flowprobe[ray]: there the Ray test must run


def run_json(capsys, *argv):
    assert main(["depth", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fail(capsys, *argv):
    assert main(["depth", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def _rows(path):
    with Store(path, readonly=True) as store:
        return store.rows()


def test_householder_json_figure_rerun_and_report(capsys, tmp_path):
    store, figures = tmp_path / "h.sqlite", tmp_path / "figs"
    args = ["householder", "--dims", "2", "--depths", "0,1", "--store", str(store), "--workers", "0", *QUICK]
    first = run_json(capsys, *args, "--figures", str(figures))
    assert first["summary"]["ran"] == 2 and first["summary"]["skipped"] == 0 and first["runs_per_s"] > 0
    (c,) = first["brackets"]
    assert c["label"] == "householder d=2" and c["bracket"]["text"] == "[1, 1]" and c["bracket"]["closed"]
    assert [r["result"]["status"] for r in c["runs"]] == ["above", "reached"]
    assert (figures / "depth_brackets.png").stat().st_size > 10_000
    again = run_json(capsys, *args)  # a rerun runs nothing and reports the same numbers
    assert (again["summary"]["ran"], again["summary"]["skipped"]) == (0, 2)
    assert again["brackets"] == first["brackets"]
    report = run_json(capsys, "report", str(store))
    assert report["sweep"] == "depth-householder" and report["brackets"] == first["brackets"]
    assert main(["depth", "report", str(store)]) == 0
    text = capsys.readouterr().out
    assert "T_ε ∈ [1, 1]" in text and "depths where training did not reach ε are not lower bounds" in text


USER_FILE = """
import torch
from torch.distributions import MultivariateNormal

q = MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)))
p = MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
"""


def test_pair_from_user_files_and_builtins(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("pair.py").write_text(USER_FILE)
    out = run_json(capsys, "pair", "--family", "householder", "--source", "pair.py:q", "--target", "pair.py:p",
                   "--store", "p.sqlite", "--workers", "0", *QUICK)
    (c,) = out["brackets"]
    assert c["bracket"]["lower"] == 1 and c["bracket"]["upper"] == 1  # the theory applies to torch normals
    assert c["params"]["source"].startswith(f"{tmp_path.resolve()}/pair.py:q@sha256=")
    assert [r["depth"] for r in c["runs"]] == [0, 1, 2, 3]
    planar = run_json(capsys, "pair", "--family", "planar:tanh:umax=0.5", "--source", "normal", "--target",
                      "normal:mean=[1.5,0]", "--dim", "2", "--depths", "1", "--store", "q.sqlite", "--workers",
                      "0", *QUICK)
    (c,) = planar["brackets"]
    assert c["bracket"]["lower"] == 3 and c["bound"] == pytest.approx((1.5 - 2 * ndtri(0.55)) / 0.5)
    assert c["runs"][0]["result"]["status"] == "above"  # one layer moves points by at most 0.5 < 1.5


def _driver(store, *extra):
    cmd = [sys.executable, "-m", "flowprobe.cli", "depth", "householder", "--dims", "2,4", "--depths", "0,1,2,3",
           "--store", str(store), "--workers", "0", *QUICK, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_kill_9_then_rerun_completes_only_the_missing_runs(capsys, tmp_path):
    store = tmp_path / "k.sqlite"
    driver = _driver(store)
    kill_9_when(driver, lambda: store.exists() and len(_rows(store)) >= 1, timeout=120)
    before = _rows(store)
    assert 1 <= len(before) < 8
    out = run_json(capsys, "householder", "--dims", "2,4", "--depths", "0,1,2,3", "--store", str(store),
                   "--workers", "0", *QUICK)
    assert (out["summary"]["skipped"], out["summary"]["ran"], out["summary"]["ok"]) == (len(before), 8 - len(before), 8)
    after = {r["key"]: r for r in _rows(store)}
    assert all(after[r["key"]] == r for r in before)  # finished rows untouched
    assert all(r["attempts"] == 1 for r in after.values())
    assert [c["bracket"]["text"] for c in out["brackets"]] == ["[1, 1]", "[2, 2]"]


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None and not RAY_REQUIRED,
    reason="Ray is not installed (pip install 'flowprobe[ray]'); CI installs it and runs this test",
)
def test_ray_gives_the_rows_of_the_local_path(ray_local, tmp_path):
    sweep = dx.householder_sweep((2,), 0.1, (0, 1), dx.Training(steps=50, train_samples=1024, tv_samples=2000),
                                 depths=(0, 1))
    local, ray = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    run_sweep(sweep, local, workers=0, progress=False)
    run_sweep(sweep, ray, ray_address="local", workers=2, progress=False)
    local_rows, ray_rows = _rows(local), _rows(ray)
    assert [r["key"] for r in ray_rows] == [r["key"] for r in local_rows] and len(ray_rows) == 2
    for a, b in zip(ray_rows, local_rows):
        assert a["executor"] == "ray" and b["executor"] == "inprocess"
        assert (a["seed"], a["status"], a["result"]) == (b["seed"], b["status"], b["result"])


def test_bad_input_is_one_line_with_status_2(capsys, tmp_path):
    store = str(tmp_path / "s.sqlite")
    common = ["--store", store, "--workers", "0", *QUICK]
    assert "even integers" in fail(capsys, "householder", "--dims", "3", *common)
    assert "ε must lie in (0, 1)" in fail(capsys, "householder", "--dims", "2", "--eps", "nan", *common)
    assert "ε must lie in (0, 1)" in fail(capsys, "householder", "--dims", "2", "--eps", "1.5", *common)
    assert "without a layer count" in fail(capsys, "pair", "--family", "planar:3:tanh", "--source", "normal",
                                           "--target", "shift:2", "--dim", "2", *common)
    assert "unknown" in fail(capsys, "pair", "--family", "cubic", "--source", "normal", "--target", "shift:2",
                             "--dim", "2", *common)
    assert "give the depths" in fail(capsys, "pair", "--family", "radial", "--source", "normal", "--target",
                                     "shift:2", "--dim", "2", *common)
    assert "file not found" in fail(capsys, "pair", "--family", "householder", "--source", "nope.py:q",
                                    "--target", "normal", "--dim", "2", *common)
    assert "u_max must be a positive number" in fail(capsys, "planar", "--dims", "2", "--umax", "nan", *common)
    assert "seeds must differ" in fail(capsys, "householder", "--dims", "2", "--seeds", "1,1", *common)
    assert "parameters, more than 1e+09" in fail(capsys, "householder", "--dims", "4096", "--depths", "9000",
                                                 "--seeds", ",".join(map(str, range(64))), *common)
    assert "needs about" in fail(capsys, "householder", "--dims", "4096", "--depths", "1", "--train-samples",
                                 "100000000", "--store", store, "--no-progress")
    assert run_json(capsys, "householder", "--dims", "2", "--depths", "0", *common)["summary"]["ran"] == 1
    refused = fail(capsys, "planar", "--dims", "2", "--depths", "0", *common)
    assert "holds the sweep 'depth-householder', not 'depth-planar': give another --store" in refused
    assert "no store at" in fail(capsys, "report", str(tmp_path / "absent.sqlite"))
    (tmp_path / "text.sqlite").write_text("not a database")
    assert "is not a sweep store" in fail(capsys, "report", str(tmp_path / "text.sqlite"))
    assert "is not a sweep store" in fail(capsys, "householder", "--store", str(tmp_path / "text.sqlite"))
    figures = tmp_path / "figs"
    figures.mkdir()
    (figures / "depth_brackets.png").write_text("mine")
    assert "was not written by flowprobe" in fail(capsys, "report", store, "--figures", str(figures))
    assert (figures / "depth_brackets.png").read_text() == "mine"
