"""Run directories (issue 11, items 1–4): no lost runs, one writer, no code from a run directory, safe resume."""

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
from safetensors.torch import load_file, save_file

import flowprobe as fp
from flowprobe.cli import main
from flowprobe.distributions import rezende_energy
from flowprobe.rundir import DirectoryBusyError, OutputDir, RunWriter, state_checksum

SRC = str(Path(__file__).resolve().parents[1] / "src")
QUICK = ["--steps", "40", "--checkpoint-every", "20", "--log-every", "10", "--no-plots", "--kl-samples", "500"]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [sys.executable, "-m", "flowprobe.cli", *args], env


def _run(*args, cwd=None):
    cmd, env = _cli(*args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def _digest(directory):
    """SHA-256 of every file below ``directory`` except the lock (whose holder note every writer rewrites)."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != "lock")
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _users_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in {"config.json": '{"mine": 1}\n', "results.json": "{}\n", "history.jsonl": "x\n",
                       ".notes.tmp": "notes\n"}.items():
        (directory / name).write_text(text)


# -- item 1: data loss ---------------------------------------------------------------------------------


def test_item1_a_directory_of_the_users_files_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    _users_files(out)
    before = _digest(out)
    proc = _run("fit", "--flow", "planar:2:tanh", "--energy", "U1", "--out", str(out), *QUICK)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"flowprobe fit: error: {out} is not empty; pass --resume to continue the run there or --overwrite to "
        "replace it (files flowprobe did not write are kept)"]
    assert main(["fit", "--flow", "planar:2:tanh", "--energy", "U1", "--out", str(out), "--overwrite", *QUICK]) == 2
    assert f"{out / 'config.json'} was not written by flowprobe" in _error(capsys)
    assert _digest(out) == before  # not one byte changed, nothing created
    assert sorted(p.name for p in out.iterdir()) == [".notes.tmp", "config.json", "history.jsonl", "results.json"]


def test_item1_a_failing_overwrite_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--flow", "planar:2:tanh", "--energy", "U1", "--out", str(out), *QUICK]) == 0
    (out / ".notes.tmp").write_text("mine")
    (out / "notes.txt").write_text("mine")
    before = _digest(out)
    np.save(tmp_path / "huge.npy", np.random.default_rng(0).standard_normal((100, 2)) * 1e38)
    # the input: data near 3e38 make the new run diverge at its first step
    proc = _run("fit", "--flow", "planar:2:tanh", "--data", str(tmp_path / "huge.npy"), "--out", str(out),
                "--overwrite", *QUICK)
    assert proc.returncode == 2 and "training diverged at step 0" in proc.stderr
    assert _digest(out) == before
    flow, config = fp.load_run(out)
    assert config["target"]["name"] == "U1"


def test_item1_an_overwrite_replaces_the_old_run_at_its_first_checkpoint(tmp_path):
    out = tmp_path / "run"
    energy = rezende_energy("U1")
    torch.manual_seed(0)
    fit_kwargs = {"energy": energy, "steps": 40, "log_every": 10, "checkpoint_every": 30}
    fp.fit(fp.build_flow("planar:2:tanh", 2), out=out, meta={"flow": "planar:2:tanh"}, **fit_kwargs)
    (out / "notes.txt").write_text("mine")
    (out / ".notes.tmp").write_text("mine")
    seen = []

    def look(record):  # until the checkpoint at step 30 readers see the old run, then the new one
        seen.append((record["step"], sorted(p.name for p in out.glob("checkpoint-*")), fp.load_run(out)[1]["fit"]))

    fp.fit(fp.build_flow("radial:3", 2), out=out, overwrite=True, callback=look, meta={"flow": "radial:3"},
           **(fit_kwargs | {"steps": 50}))
    assert [s for s, _, _ in seen] == [10, 20, 30, 40, 50]
    assert all(files == ["checkpoint-00000040.safetensors"] and fit["steps"] == 40 for _, files, fit in seen[:3])
    assert all(files == ["checkpoint-00000030.safetensors"] and fit["steps"] == 50 for _, files, fit in seen[3:])
    assert (out / "notes.txt").read_text() == "mine" and (out / ".notes.tmp").read_text() == "mine"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000050.safetensors"]
    assert json.loads((out / "config.json").read_text())["fit"]["steps"] == 50
    with pytest.raises(ValueError, match="is not empty; pass --resume"):
        fp.fit(fp.build_flow("radial:3", 2), out=out, **fit_kwargs)


# -- item 2: one writer ------------------------------------------------------------------------------


def test_item2_second_writer_refused_readers_work_kill_9_releases_the_lock(tmp_path, capsys):
    out = tmp_path / "run"
    cmd, env = _cli("fit", "--flow", "planar:4:tanh", "--energy", "U1", "--out", str(out), "--steps", "100000",
                    "--checkpoint-every", "20", "--log-every", "10", "--no-plots")
    log = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.json").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and (out / "checkpoint.json").is_file(), (tmp_path / "stderr.txt").read_text()
        # a second writer (another process) is refused, naming the holder
        assert main(["fit", "--flow", "planar:2:tanh", "--energy", "U1", "--out", str(out), "--overwrite",
                     *QUICK]) == 2
        assert f"is being written by flowprobe fit (pid {proc.pid} on host" in _error(capsys)
        assert main(["plot", str(out)]) == 2  # plot into the run directory writes too
        assert f"(pid {proc.pid} on host" in _error(capsys)
        # readers work on the last complete checkpoint
        for _ in range(3):
            flow, config = fp.load_run(out)
            assert config["flow"] == "planar:4:tanh" and torch.isfinite(flow.sample(10)).all()
        assert main(["sample", str(out), "-n", "7", "--output", str(tmp_path / "s.npy")]) == 0
        assert np.load(tmp_path / "s.npy").shape == (7, 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    # the OS released the killed writer's lock: a new writer starts (and replaces the killed run)
    assert main(["fit", "--flow", "planar:2:tanh", "--energy", "U1", "--out", str(out), "--overwrite", *QUICK]) == 0
    assert fp.load_run(out)[1]["flow"] == "planar:2:tanh"


def test_item2_lock_in_process(tmp_path):
    with OutputDir(tmp_path / "d", "first"):
        with pytest.raises(DirectoryBusyError, match=rf"flowprobe first \(pid {os.getpid()} on host"):
            OutputDir(tmp_path / "d", "second").open()
    with OutputDir(tmp_path / "d", "third") as d:
        assert d.path == tmp_path / "d"


# -- item 3: no code from a run directory ------------------------------------------------------------


def test_item3_opening_a_run_never_imports_code_it_names(tmp_path, capsys, monkeypatch):
    energy_file = tmp_path / "gauss.py"
    energy_file.write_text("def U(z):\n    return 0.5 * (z ** 2).sum(-1)\n")
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef U(z):\n    return z.sum(-1)\n")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--flow", "planar:2:tanh", "--energy", "gauss.py:U", "--out", "run", *QUICK]) == 0
    recorded = json.loads((run / "config.json").read_text())["target"]
    assert recorded["name"] == f"{energy_file}:U"  # absolute: usable from any directory
    assert recorded["sha256"] == hashlib.sha256(energy_file.read_bytes()).hexdigest()
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(run), "--kl-samples", "500"]) == 2
    assert "imports it only if you name it again" in _error(capsys)
    assert main(["eval", str(run), "--kl-samples", "500", "--energy", "../gauss.py:U", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["kl"] > 0
    assert main(["eval", str(run), "--kl-samples", "500", "--trust-code"]) == 0
    capsys.readouterr()
    # a downloaded run directory naming someone else's code (a ../ path) runs nothing
    config = json.loads((run / "config.json").read_text())
    config["target"]["name"] = "../evil.py:U"
    (run / "config.json").write_text(json.dumps(config))
    assert main(["sample", str(run), "-n", "5", "--output", "s.npy"]) == 0
    for args in (["eval", str(run)], ["plot", str(run), "--out", "figs"], ["fit", "--resume", str(run)]):
        assert main(args) == 2, args
        assert "imports it only if you name it again" in _error(capsys)
    assert main(["eval", str(run), "--trust-code"]) == 2  # the recorded checksum is gauss.py's
    assert "changed since the run was trained" in _error(capsys)
    assert not marker.exists()
    # the user's own file, changed since the run: refused
    energy_file.write_text("def U(z):\n    return (z ** 2).sum(-1)\n")
    config["target"]["name"] = f"{energy_file}:U"
    (run / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(run), "--energy", str(energy_file) + ":U"]) == 2
    assert "changed since the run was trained" in _error(capsys)


# -- item 4: resume safety ---------------------------------------------------------------------------


def _rewrite_checkpoint(run, change_state=None, change_tensors=None):
    """Edit a checkpoint as a hostile user would: fix up every checksum afterwards."""
    state = json.loads((run / "checkpoint.json").read_text())
    path = run / state["tensors"]
    if change_tensors is not None:
        tensors = load_file(path)
        change_tensors(tensors)
        save_file(tensors, path)
    state.pop("checksum")
    state["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if change_state is not None:
        change_state(state)
    (run / "checkpoint.json").write_text(json.dumps(state | {"checksum": state_checksum(state)}))


def test_item4_resume_checks_spec_settings_flags_and_checksums(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["fit", "--flow", "planar:2:tanh", "--energy", "U1", "--out", str(base), *QUICK]) == 0
    capsys.readouterr()

    def copy(name):
        target = tmp_path / name
        subprocess.run(["cp", "-r", str(base), str(target)], check=True)
        (target / "weights.safetensors").unlink()  # a killed run: resume has work to do
        return target

    cases = {}
    run = copy("activation")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"flow": "planar:2:relu"}))
    cases["activation"] = (["fit", "--resume", str(run)], "differs from the configuration its checkpoint recorded")
    cases["flow flag"] = (["fit", "--resume", str(copy("flag")), "--flow", "radial:3"],
                          "--flow radial:3 conflicts with the run's 'planar:2:tanh'")
    cases["data flag"] = (["fit", "--resume", str(tmp_path / "flag"), "--data", "moons"],
                          "--data moons conflicts with the run's target 'U1'")
    cases["out flag"] = (["fit", "--resume", str(tmp_path / "flag"), "--out", str(tmp_path / "x")],
                         "conflicts with --resume")
    run = copy("bitflip")
    state = json.loads((run / "checkpoint.json").read_text())
    raw = bytearray((run / state["tensors"]).read_bytes())
    raw[-3] ^= 0x40
    (run / state["tensors"]).write_bytes(bytes(raw))
    cases["bit flip"] = (["fit", "--resume", str(run)], f"corrupt checkpoint in {run}: checkpoint-00000040")
    run = copy("edited")
    (run / "checkpoint.json").write_text((run / "checkpoint.json").read_text().replace('"step": 40', '"step": 41'))
    cases["edited json"] = (["fit", "--resume", str(run)], "checkpoint.json fails its checksum")
    for name, change in {"steps 1e6": lambda s: s.update(step=10**6), "steps -5": lambda s: s.update(step=-5),
                         "no key": lambda s: s.pop("bad_evals"), "bad type": lambda s: s.update(step="x")}.items():
        run = copy(name.replace(" ", "_"))
        _rewrite_checkpoint(run, change_state=change)
        cases[name] = (["fit", "--resume", str(run)], f"corrupt checkpoint in {run}")
    run = copy("no_adam")
    _rewrite_checkpoint(run, change_tensors=lambda t: [t.pop(k) for k in list(t) if k.startswith("optim.0.")])
    cases["missing Adam state"] = (["fit", "--resume", str(run)], "Adam state of parameter 0 is missing")
    for name, (args, message) in cases.items():
        assert main([*args, "--no-plots", "--kl-samples", "500"]) == 2, name
        err = _error(capsys)
        assert message in err, (name, err)
        assert "diverged" not in err
    resumed = copy("fine")
    assert main(["fit", "--resume", str(resumed), "--no-plots", "--kl-samples", "500", "--steps", "40"]) == 0
    a, b = load_file(resumed / "weights.safetensors"), load_file(base / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_item4_python_resume_refuses_another_flow(tmp_path):
    energy = rezende_energy("U1")
    torch.manual_seed(0)
    fp.fit(fp.build_flow("planar:2:tanh", 2), energy=energy, steps=20, checkpoint_every=10, out=tmp_path / "r")
    (tmp_path / "r" / "weights.safetensors").unlink()
    with pytest.raises(ValueError, match="written by a different flow"):
        fp.fit(fp.build_flow("planar:2:sigmoid", 2), energy=energy, steps=20, checkpoint_every=10,
               out=tmp_path / "r", resume=True)
    with pytest.raises(ValueError, match="exclude each other"):
        fp.fit(fp.build_flow("planar:2:tanh", 2), energy=energy, out=tmp_path / "r", resume=True, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        RunWriter(tmp_path / "nothing", "resume").open()


def test_item3_bookkeeping_cannot_name_files_outside_the_directory(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    meta = tmp_path / "run" / ".flowprobe"
    meta.mkdir(parents=True)
    (meta / "commit.json").write_text(json.dumps({"delete": ["../victim.txt"], "move": [], "files": {}}))
    with pytest.raises(ValueError, match="is not a flowprobe journal"):
        OutputDir(tmp_path / "run", "test").open()
    (meta / "commit.json").unlink()
    (meta / "manifest.json").write_text(json.dumps({"format": 1, "files": {"../victim.txt": None}}))
    with pytest.raises(ValueError, match="is not a flowprobe manifest"):
        OutputDir(tmp_path / "run", "test").open()
    assert victim.read_text() == "mine"
