"""The benchmark scripts run (smoke tests; their numbers are reported by running them, not here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def run(*args):
    env = {**os.environ, "FLOWPROBE_BENCH_THREADS": "1"}  # a smoke test: no thread contention with other jobs
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True, cwd=ROOT, timeout=300,
                         env=env)
    return out.stdout


def test_compare_anchors_quick_row_writes_json(tmp_path):
    target = tmp_path / "bench.json"
    stdout = run("benchmarks/compare_anchors.py", "--quick", "--rows", "a1", "--no-memory", "--json", str(target))
    result = json.loads(target.read_text())
    assert result["speed"]["a1:rkl"]["flowprobe"] > 0  # steps/s
    assert result["logdet_error"]["planar-tanh-2"]["flowprobe"] < 1e-10
    assert "| (a) reverse-KL on U1, planar-tanh K=32 d=2 | steps/s |" in stdout


def test_ensemble_speed_times_a_depth_configuration(tmp_path):
    """The Householder depth-sweep workload: ensemble and sequential runs timed, the members equal the solo runs."""
    target = tmp_path / "ensemble.json"
    stdout = run("benchmarks/ensemble_speed.py", "--workload", "householder", "--quick", "--json", str(target))
    result = json.loads(target.read_text())
    assert result["workload"] == "householder" and result["speedup_vs_flowprobe_sequential"] > 0
    assert result["max_member_vs_solo_difference"] < 1e-10  # float64, 30 steps
    runs = result["seconds_per_repetition"]  # 4 ensemble runs interleaved with each repetition's 4 solo runs
    each = result["ensemble_seconds_per_run"]
    assert result["ensemble_runs_per_repetition"] == 4 and len(each) == 4 * len(runs["ensemble"])
    assert runs["ensemble"] == pytest.approx([sum(each[4 * r : 4 * r + 4]) / 4 for r in range(len(runs["ensemble"]))])
    per_repetition = [b / a for a, b in zip(runs["ensemble"], runs["flowprobe sequential"], strict=True)]
    assert result["speedup_vs_flowprobe_sequential_range"] == [min(per_repetition), max(per_repetition)]
    assert "| flowprobe sequential   |" in stdout and "normflows" not in stdout


def test_compare_checkouts_interleaves_two_checkouts(tmp_path):
    """This checkout against itself: both workers answer, and the paired ratio is a ratio of their rates."""
    target = tmp_path / "checkouts.json"
    stdout = run("benchmarks/compare_checkouts.py", "--before", ".", "--rows", "c-planar-tanh-2:sample", "--reps", "3",
                 "--target", "0.02", "--pause", "0", "--no-memory", "--json", str(target))
    speed = json.loads(target.read_text())["speed"]["c-planar-tanh-2:sample"]
    assert speed["before"]["flowprobe"] > 0 and speed["after"]["flowprobe"] > 0
    assert 0.2 < speed["paired_ratio"] < 5
    assert "| (c) sample, planar-tanh K=16 d=2 | points/s |" in stdout


@pytest.mark.slow
def test_compare_anchors_times_compiled_reverse_kl_rows(tmp_path):
    target = tmp_path / "bench.json"
    stdout = run("benchmarks/compare_anchors.py", "--quick", "--compiled", "--rows", "a1", "--no-memory",
                 "--json", str(target))
    assert json.loads(target.read_text())["speed"]["a1:rkl"]["flowprobe-compiled"] > 0
    assert "planar-tanh K=32 d=2, flowprobe under torch.compile | steps/s |" in stdout


def test_peak_tensor_memory_counts_the_saved_tensors(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import compare_anchors

    def peak(k):
        model = compare_anchors.build("flowprobe", "planar-tanh", k, 2)
        step = compare_anchors.rkl_step(model, torch.optim.Adam(model.parameters()), 256)
        step()
        return compare_anchors._peak_tensor_bytes(step)

    shallow, deep = peak(8), peak(80)
    saved_per_layer = 256 * 3 * 4  # each layer's input (d = 2) and pre-activation, float32
    assert shallow > 8 * saved_per_layer
    assert deep - shallow > 72 * saved_per_layer
