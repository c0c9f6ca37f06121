"""Data-parallel training under ``torchrun`` (two CPU ranks, Gloo): the loss curve of one process
with the same global batch, step by step; ``kill -9`` of a rank, then ``--resume``, completes with
that curve."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowprobe.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")
# 50 steps: batch 256 of the 1294 training digits is 5 steps an epoch; a checkpoint every epoch
RUN = ["--flow", "planar:2:tanh", "--latent", "2", "--hidden", "16", "--depth", "1", "--batch-size", "256",
       "--epochs", "10", "--warmup", "3", "--log-every", "1", "--checkpoint-every", "1", "--nll-samples", "8",
       "--dtype", "float64", "--device", "cpu"]


def _torchrun(*args):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "flowprobe", "vae", "train", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(run):
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "step"]


def _worker(parent, rank):
    """The pid of ``parent``'s descendant whose environment says ``RANK=rank``."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return int(child)
        found = _worker(int(child), rank)
        if found:
            return found
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
def test_two_ranks_follow_one_process_and_survive_kill_9_then_resume(tmp_path, capsys, one_thread):
    assert main(["vae", "train", "--out", str(tmp_path / "one"), *RUN, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    reference = _steps(tmp_path / "one")
    assert len(reference) == 50

    run = tmp_path / "two"
    proc = _torchrun("--out", str(run), *RUN)
    deadline = time.monotonic() + 240
    while not (run / "checkpoint.json").is_file():  # the first checkpoint: epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    rank1 = _worker(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    interrupted = json.loads((run / "checkpoint.json").read_text())["epoch"]
    assert 1 <= interrupted < 10 and not (run / "results.json").exists()

    resumed = _torchrun("--resume", str(run), "--json")
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])  # rank 0 prints; rank 1 is silent
    assert result["ranks"] == 2 and result["epochs_done"] == 10

    steps = _steps(run)
    assert len(steps) == 50
    assert max(abs(a - b) for a, b in zip(steps, reference)) < 1e-9 * max(abs(v) for v in reference)
    assert abs(result["nll"] - single["nll"]) < 1e-8 and abs(result["neg_elbo"] - single["neg_elbo"]) < 1e-8
