"""``flowprobe vae train | eval | table`` and the speed benchmark's model equivalence."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tests.vae.test_vae_data import write_amat

from flowprobe.cli import main
from flowprobe.io import read_json

TINY = ["--latent", "2", "--hidden", "8", "--depth", "1", "--batch-size", "200", "--nll-samples", "8"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_train_eval_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["vae", "train", "--out", str(run), "--flow", "radial", "--epochs", "2", *TINY, "--json"]) == 0
    result = _json(capsys)
    assert result["flow"] == "radial:16" and result["epochs_done"] == 2 and result["data"] == "digits"
    assert result["nll"] <= result["neg_elbo"] and result["n_test"] == 359
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "history.jsonl", "checkpoint.json", "weights.safetensors", "results.json"} <= names
    config = read_json(run / "config.json")
    assert config["posterior"] == "radial:16" and config["vae"]["flow"] == "radial" and config["data_dim"] == 64
    assert read_json(run / "results.json")["nll"] == result["nll"]

    assert main(["vae", "eval", str(run), "--json"]) == 0  # the run's test samples: its numbers again
    assert _json(capsys)["nll"] == result["nll"]
    assert main(["vae", "eval", str(run), "--nll-samples", "32", "--json"]) == 0
    assert _json(capsys)["nll_samples"] == 32

    assert main(["vae", "train", "--resume", str(run), "--json"]) == 0  # a finished run: scored again
    assert _json(capsys)["nll"] == result["nll"]
    assert main(["vae", "train", "--resume", str(run), "--lr", "0.01"]) == 2
    assert "--lr 0.01 conflicts with the run's 0.001" in _one_line_error(capsys)
    assert main(["vae", "train", "--out", str(run), *TINY]) == 2
    assert "is not empty; pass --resume" in _one_line_error(capsys)
    assert main(["vae", "train", "--out", str(tmp_path / "x"), "--flow", "planar:2:bogus", *TINY]) == 2
    assert "planar" in _one_line_error(capsys)
    assert main(["vae", "train", "--out", str(tmp_path / "y"), "--batch-size", "5000"]) == 2
    assert "batch_size 5000 must lie in [1 (ranks), 1294 (training images)]" in _one_line_error(capsys)


def test_table_on_mnist_files_prints_the_published_numbers_beside_ours(tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    write_amat(data, sizes=(8, 4, 4))
    out = tmp_path / "table"
    args = ["vae", "table", "--data", str(data), "--out", str(out), "--posteriors", "vae", "planar16", "t-snf",
            "--seeds", "0", "1", "--epochs", "1", "--batch-size", "4", "--latent", "2", "--hidden", "8",
            "--nll-samples", "4", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| No flow |" in text and "−ELBO published (approx.)" in text
    assert "| 86.55 ± 0.06 | 82.14 ± 0.07 [vdB18] |" in text and "83.40 ± 0.10" in text
    table = read_json(out / "table.json")
    assert [r["posterior"] for r in table["rows"]] == ["vae", "planar16", "t-snf"]
    assert all(r["seeds"] == [0, 1] for r in table["rows"])
    row = table["rows"][0]
    runs = [read_json(out / "vae" / f"seed-{s}" / "results.json")["nll"] for s in (0, 1)]
    assert abs(row["nll"] - sum(runs) / 2) < 1e-12
    assert set(table["acceptance"]["improve_nll_over_vae"]) == {"planar16", "t-snf"}
    assert (out / "table.md").read_text().startswith("| Posterior |")

    assert main(args) == 0  # every run is finished: read, not retrained
    assert read_json(out / "table.json")["rows"] == table["rows"]
    assert main([*args[:-1], "--epochs", "2"]) == 2  # other settings than the runs there
    assert "holds a run with other settings (epochs: 1 there, 2 now)" in _one_line_error(capsys)


def test_the_speed_benchmark_compares_equal_models():
    """flowprobe's amortised planar and Householder flows (and the plain VAE) and Pyro's conditional transforms
    loaded with the same weights give the same loss and gradients (the benchmark's premise)."""
    pytest.importorskip("pyro")
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import vae_speed

    from flowprobe.vae.model import FlowVAE
    from flowprobe.validation import validation

    for spec in [*vae_speed.CASES.values(), vae_speed.PLAIN]:
        torch.manual_seed(0)
        ours = FlowVAE(64, 4, 16, 2, spec).double()
        if ours.head is not None:
            with torch.no_grad():
                ours.head.weight.normal_(0, 0.1)
        x = (torch.rand(16, 64) < 0.3).double()
        with validation(False):
            assert vae_speed.check_same_model(ours, vae_speed.PyroVAE(ours), x) < 1e-10
