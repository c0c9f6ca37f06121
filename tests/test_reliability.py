"""Issue 11, items 8–11, 13, 14: no silent NaN, one-line errors, sizes checked up front, no silent
acceptance, light start-up, vectorised user log-densities (items 1–4: ``test_rundir.py``; item 5:
``test_energies.py``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special

import flowprobe as fp
from flowprobe.cli import CliError, check_finite, main
from flowprobe.data import load_array
from flowprobe.distributions import rezende_energy
from flowprobe.metrics import nll_per_dim
from flowprobe.theory.approx1d import construct
from flowprobe.theory.targets1d import from_log_density

SRC = str(Path(__file__).resolve().parents[1] / "src")
QUICK = ["--steps", "20", "--log-every", "10", "--no-plots", "--kl-samples", "500"]


def _main(args, capsys):
    """Exit status, stdout and stderr of an in-process CLI call (argparse errors exit by SystemExit)."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.out, captured.err.strip()


@pytest.fixture(scope="module")
def u1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "u1"
    assert main(["fit", "--flow", "planar:2:tanh", "--energy", "U1", "--out", str(out), *QUICK]) == 0
    return out


# -- item 8 ------------------------------------------------------------------------------------------


def test_item8_no_nan_with_exit_0(u1_run, tmp_path, capsys):
    np.savetxt(tmp_path / "huge.csv", np.full((20, 2), 3e38), delimiter=",")
    code, out, _ = _main(["eval", str(u1_run), "--data", str(tmp_path / "huge.csv"), "--json"], capsys)
    assert code == 0  # was "nan nats/dim": the float32 flow cannot carry log q there, float64 can
    assert json.loads(out)["metrics"]["nll_flow"] == pytest.approx(0.5 * 3e38**2, rel=1e-6)
    for spec in ("radial:4", "planar:4:tanh"):  # float32 log_prob at 1e30: NaN (radial), -inf (planar)
        torch.manual_seed(0)
        value = nll_per_dim(fp.build_flow(spec, 2), torch.full((3, 2), 1e30, dtype=torch.float64))
        assert value == pytest.approx(0.5e60, rel=1e-6)
    with pytest.raises(CliError, match="metrics.kl is nan"):
        check_finite({"metrics": {"kl": float("nan")}})


# -- item 9 ------------------------------------------------------------------------------------------


def test_item9_crash_paths_are_one_line_errors(u1_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("user.py").write_text(
        "import numpy as np\n"
        "def shape3(z):\n    return z.sum(-1) if z.shape[0] == 3 else z.sum(-1)[:10]\n"
        "def needs_arg(a):\n    return a\n"
        "def raises(x):\n    raise RuntimeError('boom')\n")
    np.savetxt("const.csv", np.ones((50, 2)), delimiter=",")
    line = np.linspace(0, 1, 50)
    np.savetxt("collinear.csv", np.stack([line, 2 * line], 1), delimiter=",")
    np.savetxt("two.csv", [[0.0, 1.0], [1.0, 0.0]], delimiter=",")
    Path("afile").write_text("mine")
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(u1_run), str(run)], check=True)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"dtype": "float16"}))
    no_keys = tmp_path / "no_keys"
    subprocess.run(["cp", "-r", str(u1_run), str(no_keys)], check=True)
    (no_keys / "checkpoint.json").write_text("{}")
    wrong_types = tmp_path / "wrong_types"
    subprocess.run(["cp", "-r", str(u1_run), str(wrong_types)], check=True)
    state = json.loads((wrong_types / "checkpoint.json").read_text())
    (wrong_types / "checkpoint.json").write_text(json.dumps(state | {"step": "x", "config": 5}))
    fit = ["fit", "--flow", "planar:2:tanh", *QUICK]
    cases = {
        "energy fine at N=3 only": ([*fit, "--energy", "user.py:shape3", "--out", "a"], "got (10,) for N="),
        "checkpoint.json without keys": (["fit", "--resume", str(no_keys), *QUICK], "corrupt checkpoint"),
        "checkpoint.json wrong types": (["fit", "--resume", str(wrong_types), *QUICK], "corrupt checkpoint"),
        "config dtype float16": (["eval", str(run)], "bad or missing 'dtype': 'float16'"),
        "scipy loc 1e308": (["approx1d", "scipy:norm(loc=1e308)", "--layers", "10"], "rescale it"),
        "source loc 1e300": (["approx1d", "blog-mixture", "--layers", "10", "--source-loc", "1e300"],
                             "needs |μ0| ≤ 1e+100"),
        "log-density raises": (["approx1d", "user.py:raises", "--layers", "10"], "failed: RuntimeError: boom"),
        "flow function with an argument": (["topology", "rank", "--flow", "user.py:needs_arg"],
                                           "is a function with required arguments"),
        "gaussian dim 100000": (["topology", "gaussian", "--dim", "100000", "--scale", "2"], "must lie in [1, 2048]"),
        "figures grid 1": (["topology", "figures", "--grid", "1", "--out", "figs"], "must lie in [3, 2001]"),
        "figures out a file": (["topology", "figures", "--out", "afile"], "afile is a file, expected a directory"),
        "approx1d figures a file": (["approx1d", "blog-mixture", "--layers", "10", "--figures", "afile"],
                                    "afile is a file"),
        "fit out a file": ([*fit, "--energy", "U1", "--out", "afile"], "afile is a file"),
        "plot out a file": (["plot", str(u1_run), "--out", "afile"], "afile is a file"),
        "sample output exists": (["sample", str(u1_run), "--output", "afile.npy"], None),
        "constant data": ([*fit, "--data", "const.csv", "--out", "b"], "spans 0 of 2 dimensions"),
        "collinear data": ([*fit, "--data", "collinear.csv", "--out", "b"], "spans 1 of 2 dimensions"),
        "two rows": ([*fit, "--data", "two.csv", "--out", "b"], "no held-out points"),
        "kl-samples 0": ([*fit, "--energy", "U1", "--out", "b", "--kl-samples", "0"], "expected a positive integer"),
    }
    Path("afile.npy").write_text("mine")
    cases["sample output exists"] = (cases["sample output exists"][0], "afile.npy exists; pass --overwrite")
    for name, (args, message) in cases.items():
        code, _, err = _main(args, capsys)
        assert code == 2, (name, err)
        assert message in err.splitlines()[-1], (name, err)
        if not args[0] == "topology" and "must lie in" not in message and "positive integer" not in message:
            assert len(err.splitlines()) == 1, (name, err)  # argparse's own errors add a usage line
    assert not Path("a").exists() and not Path("b").exists()  # refused before anything was written
    assert Path("afile").read_text() == "mine" and Path("afile.npy").read_text() == "mine"


# -- item 10 -----------------------------------------------------------------------------------------


def test_item10_sizes_are_checked_up_front(tmp_path, capsys):
    (tmp_path / "flat.py").write_text("import numpy as np\ndef flat(x):\n    return 0.0 * np.asarray(x)\n")
    cases = {
        "householder k=1e8": (["fit", "--flow", "householder:1:k=100000000", "--energy", "U1", "--out",
                               str(tmp_path / "h")], "reflections=100000000 exceeds the limit of 4096"),
        "constant log-density": (["approx1d", f"{tmp_path / 'flat.py'}:flat", "--layers", "10"],
                                 "the mass of its density does not converge"),
        "layers 1e7": (["approx1d", "blog-mixture", "--layers", "10000000"], "layers must lie in [4, 10000]"),
    }
    for name, (args, message) in cases.items():
        code, _, err = _main(args, capsys)
        assert code == 2 and message in err, (name, err)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"a training step at batch_size 1000000000 \(\d+ bytes per point"):
        fp.fit(fp.build_flow("planar:2:tanh", 2), energy=rezende_energy("U1"), batch_size=10**9, steps=1)


# -- item 11 -----------------------------------------------------------------------------------------


def test_item11_nothing_is_accepted_silently(tmp_path, capsys):
    (tmp_path / "bom.csv").write_text("1,2\n3,4\n5,6\n", encoding="utf-8-sig")
    assert load_array(tmp_path / "bom.csv").tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    np.save(tmp_path / "complex.npy", np.array([[1 + 2j, 3j], [1, 2]]))
    with pytest.raises(ValueError, match="holds complex numbers"):
        load_array(tmp_path / "complex.npy")
    code, _, err = _main(["fit", "--flow", "planar:2", "--energy", "U1", "--out", str(tmp_path / "c"),
                          "--clip", "-1"], capsys)
    assert code == 2 and "argument --clip: expected a number >= 0, got '-1'" in err
    code, _, err = _main(["approx1d", "blog-mixture", "--layers", "10", "--interval", "5", "-5"], capsys)
    assert code == 2 and err == "flowprobe approx1d: error: --interval sets the equispaced knots; it needs " \
                               "--knots equispaced"
    code, _, err = _main(["approx1d", "blog-mixture", "--layers", "10", "--interval", "5", "-5", "--knots",
                          "equispaced"], capsys)
    assert code == 2 and "needs LO < HI, got 5 -5" in err


# -- item 13 -----------------------------------------------------------------------------------------


def test_item13_start_up_imports_no_plotting_scipy_or_compiler():
    """Start-up pays for torch only: no matplotlib, scipy, scikit-learn, and not torch's compiler
    (``torch._dynamo``, ~1 s, was imported by the layers; now only under ``torch.compile``)."""
    code = ("import sys; from flowprobe.cli import build_parser; build_parser(sys.argv[1:]);"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'scipy', 'sklearn'}"
            " | ({'torch._dynamo'} & set(sys.modules))))")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for argv in (["--help"], ["fit"]):  # fit, sample, eval and plot share one module
        proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.stdout.strip() == "[]", (argv, proc.stdout, proc.stderr)


# -- item 14 -----------------------------------------------------------------------------------------


def test_item14_user_log_density_is_called_with_arrays():
    calls = []

    def mixture(x):
        calls.append(np.shape(x))
        a = np.log(0.3) - 0.5 * ((x + 1) / 0.5) ** 2 - np.log(0.5)
        return np.logaddexp(a, np.log(0.7) - 0.5 * (x - 2) ** 2)

    target = from_log_density(mixture, "mixture")
    assert len(calls) <= 40 and all(len(shape) == 1 and shape[0] > 1 for shape in calls)
    x = np.linspace(-6, 8, 1001)
    exact = 0.3 * special.ndtr((x + 1) / 0.5) + 0.7 * special.ndtr(x - 2)
    before = len(calls)
    assert np.abs(target.cdf(x) - exact).max() < 1e-12
    assert np.abs(target.sf(x) - (1 - exact)).max() < 1e-12
    assert len(calls) - before <= 10
    built = construct(target, 50)
    # the TV of the construction as computed with scipy.integrate.quad per cell before (1.1e5 scalar calls)
    assert built.tv() == pytest.approx(0.007709312675889007, abs=1e-9)
    # arrays only: 7.3e4 scalar calls before; 2.8e3 array calls with per-interval probes and bisection;
    # the one-call-per-round root search and quadrature leave ~400 (two tail-width searches of ~20 TVs)
    assert all(len(shape) >= 1 for shape in calls) and len(calls) < 500
