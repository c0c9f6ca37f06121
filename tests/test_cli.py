import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowprobe.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ["--no-plots", "--kl-samples", "2000"]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [sys.executable, "-m", "flowprobe.cli", *args], env


def _run(*args, timeout=120):
    cmd, env = _cli(*args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _digest(directory):
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _check_every_file_parses(directory):
    for path in Path(directory).iterdir():
        if path.name == ".flowprobe":
            continue  # the lock and the record of what flowprobe wrote
        if path.name.startswith(".") and path.suffix == ".tmp":
            continue  # a temporary file being written when the process died; never read, removed on resume
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            assert all(json.loads(line) for line in path.read_text().splitlines())
        elif path.suffix == ".safetensors":
            load_file(path)
        else:
            raise AssertionError(f"unexpected file {path.name}")


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons")
    assert main(["fit", "--flow", "planar:4:tanh", "--data", "moons", "--n-data", "2000", "--steps", "60",
                 "--log-every", "20", "--out", str(out), *FAST]) == 0
    return out


def test_fit_json_output_and_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--flow", "radial:2", "--energy", "U2", "--steps", "40", "--log-every", "20",
                 "--out", str(out), "--json", *FAST]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps_done"] == 40 and result["metrics"]["kl"] > 0
    assert 0 < result["metrics"]["ess_fraction"] <= 1
    assert {"config.json", "weights.safetensors", "history.jsonl", "results.json", "checkpoint.json"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["flow"] == "radial:2" and config["target"]["name"] == "U2" and config["fit"]["steps"] == 40


def test_eval_sample_plot(moons_run, tmp_path, capsys):
    assert main(["eval", str(moons_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["held_out"] == "fresh test set"
    assert metrics["nll_kde"] < metrics["nll_gaussian"]
    assert main(["sample", str(moons_run), "-n", "50", "--output", str(tmp_path / "s.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 50
    assert np.load(tmp_path / "s.npy").shape == (50, 2)
    np.savetxt(tmp_path / "two.csv", np.load(tmp_path / "s.npy"), delimiter=",")
    assert main(["eval", str(moons_run), "--data", str(tmp_path / "two.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["n"] == 50
    assert main(["plot", str(moons_run), "--out", str(tmp_path / "fig"), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)["figures"]
    assert sorted(Path(f).name for f in figures) == ["density.png", "stages.png", "training.png"]
    assert all(Path(f).stat().st_size > 10_000 for f in figures)


def _bad(tmp_path, moons_run):
    (tmp_path / "wide.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "nan.csv").write_text("1,2\nnan,3\n")
    (tmp_path / "energy.py").write_text("def other(z):\n    return z.sum(-1)\n")
    fit = ["fit", "--out", str(moons_run), "--steps", "5"]
    return {
        "unknown flow": ([*fit, "--flow", "planr:3", "--data", "moons"], "unknown layer family 'planr'"),
        "bad option": ([*fit, "--flow", "planar:3:tanhh", "--data", "moons"], "unknown option 'tanhh'"),
        "unknown target": ([*fit, "--flow", "planar:3", "--data", "mooons"], "unknown data 'mooons'"),
        "unknown energy": ([*fit, "--flow", "planar:3", "--energy", "U9"], "unknown energy 'U9'"),
        "nan rows": ([*fit, "--flow", "planar:3", "--data", str(tmp_path / "nan.csv")], "NaN values in 1 row"),
        "no function": ([*fit, "--flow", "planar:3", "--energy", f"{tmp_path / 'energy.py'}:missing"],
                        "has no attribute 'missing'"),
        "wrong width": (["eval", str(moons_run), "--data", str(tmp_path / "wide.csv")], "has 3 columns, expected 2"),
        "bad lr": ([*fit, "--flow", "planar:3", "--data", "moons", "--lr", "-1"], "lr must be a positive"),
        "no run": (["eval", str(tmp_path / "nothing")], "run directory not found"),
    }


def test_bad_input_is_one_line_exit_2_and_leaves_the_run_intact(moons_run, tmp_path, capsys):
    before = _digest(moons_run)
    for name, (args, message) in _bad(tmp_path, moons_run).items():
        assert main(args) == 2, name
        err = capsys.readouterr().err.strip()
        assert message in err, (name, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, name
    assert _digest(moons_run) == before


def test_bad_input_through_the_console_process(tmp_path):
    proc = _run("fit", "--flow", "householder:2:q=3", "--energy", "U1", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flowprobe fit: error: flow spec term 'householder:2:q=3': "
        "option 'q' does not apply to householder layers (keys: reflections, k)"
    ]
    assert not (tmp_path / "x").exists()


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["fit", "--flow", "planar:4:tanh", "--energy", "U1", "--steps", "240", "--log-every", "10",
            "--checkpoint-every", "20", "--seed", "3", *FAST]
    killed = tmp_path / "killed"
    cmd, env = _cli(*args, "--out", str(killed))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoint.json").exists():
            step = json.loads((killed / "checkpoint.json").read_text())["step"]
            if step >= 40:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step >= 40
    _check_every_file_parses(killed)  # no half-written checkpoint, history line or config
    assert not (killed / "weights.safetensors").exists()
    resumed = _run("fit", "--resume", str(killed), "--json", *FAST)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps_done"] == 240
    assert not list(killed.glob(".*.tmp"))
    reference = tmp_path / "reference"
    assert _run(*args, "--out", str(reference)).returncode == 0
    a, b = load_file(killed / "weights.safetensors"), load_file(reference / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 241, 10))
