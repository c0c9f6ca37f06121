"""The benchmark scripts run (smoke tests; their numbers are reported by running them, not here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
