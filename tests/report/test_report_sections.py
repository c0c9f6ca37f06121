"""The report's real sections with tiny settings: their numbers, checks and figures."""

import importlib.util
import math

import pytest

from flowprobe.report.core import MODES, Context, SectionOutput, verdict
from flowprobe.report.sections import SECTIONS, approx1d, relu, rezende, stages, topology, two_layer
from flowprobe.theory.tv import isotropic_normal_tv, normal_tv


def _run(section, **settings):
    out = section.run(Context("test", settings, seed=0))
    assert isinstance(out, SectionOutput) and out.checks and out.measured
    for name, (png, caption) in out.figures.items():
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and caption, name
    return out


def test_registry():
    assert [s.number for s in SECTIONS] == list(range(1, 9))
    assert len({s.key for s in SECTIONS}) == len(SECTIONS)
    for s in SECTIONS:
        assert s.claim.endswith(".") and s.claim.count(". ") == 0  # one sentence
        if s.settings:  # a section without settings is the same in every mode
            assert set(s.settings) == set(MODES) and set(s.settings["quick"]) == set(s.settings["full"]), s.key
    assert all(s.run is not None for s in SECTIONS)
    hooks = {s.key: s for s in SECTIONS if s.requires}
    assert {k: s.requires for k, s in hooks.items()} == {"depth": ("flowprobe.theory.depth_experiments",),
                                                         "vae": ("flowprobe.vae",)}
    for s in hooks.values():  # "not available" exactly when the capability is missing from this build
        try:
            present = importlib.util.find_spec(s.requires[0]) is not None
        except ModuleNotFoundError:
            present = False
        assert s.unavailable() is None if present else f"needs {s.requires[0]} ({s.issue})" in s.unavailable()


def test_two_layer_example():
    out = _run(two_layer.SECTION)
    assert verdict(out.checks) == "holds"
    pieces = out.numbers["pieces"]
    assert [(p["mean"], p["std"]) for p in pieces] == [(0.0, 1.0), (-0.2, 0.8), (-1.25, 1.5)]
    assert [p["mass"] for p in pieces] == pytest.approx([0.15865525393145707, 0.7745375447996853, 0.0668072012688581],
                                                        abs=1e-12)
    assert out.numbers["breakpoints"][0]["minus_log_slope"] == pytest.approx(-math.log(0.8))


def test_approx1d_section():
    out = _run(approx1d.SECTION, target="blog-mixture", depths=[4, 10, 50], figure_depths=[50], tv_goal=0.005,
               train_depths=[4], train_steps=10, train_samples=1000)
    tvs = [r["tv"] for r in out.numbers["construction"]]
    assert tvs == pytest.approx([0.0640218363172909, 0.021773284837988655, 0.004062282492555764], rel=1e-6)
    assert out.numbers["source_tv"] == pytest.approx(0.1352574320938546, rel=1e-8)
    assert [c.passed for c in out.checks[:3]] == [True, True, True]
    assert set(out.figures) == {"n50", "convergence"}


def test_stages_section():
    out = _run(stages.SECTION, flow="planar:2:tanh", energy="U1", steps=10, stages=[0, 1, 2], samples=2000,
               mass_bound=8.0, mass_points=201, mass_tolerance=1e-2, figure_points=12)
    rows = out.numbers["stages"]
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert max(r["max_log_density_difference"] for r in rows) < 1e-9
    assert all(abs(r["mass_on_grid"] - 1) < 1e-2 for r in rows)
    assert out.numbers["log_z"] == pytest.approx(1.877501626108419, abs=1e-9)
    assert out.checks[0].passed and out.checks[1].passed


def test_topology_section():
    out = _run(topology.SECTION, rank_points=40, dim=2, scale=1.5, neurons=[1, 2], seeds=[0], steps=30, samples=2000,
               ridge_grid=15)
    ranks = out.numbers["gradient_ranks"]
    assert [(r["neurons"], r["rank"]) for r in ranks] == [(1, 1), (2, 2), (3, 3), (3, 8)]
    assert [b["min_neurons"] for b in out.numbers["gaussian_bounds"]] == [2, 1, 3, 2]
    floors = [f["tv_floor"] for f in out.numbers["floors"]]
    assert floors == pytest.approx([isotropic_normal_tv(2, 2.25), normal_tv(0, 1, 0, 1.5), 0.0], abs=1e-12)
    below = [r for r in out.numbers["split_runs"] if r["neurons"] < 2]
    assert below and all(r["tv_high"] >= r["tv_floor"] for r in below)
    assert out.checks[0].passed and out.checks[1].passed and out.checks[4].passed


def test_relu_section():
    out = _run(relu.SECTION, mode_seeds=[0], points=100, pairs=["product"], layers=2, steps=20, checkpoints=2,
               samples=2000, train_samples=2000, figure_grid=15)
    exact = out.numbers["exact_pairs"][0]
    assert exact["residual_max"] < 1e-8 and exact["modes"] == exact["modes_mapped_to_modes"] == 4
    pair = out.numbers["forbidden_pairs"][0]
    assert pair["steps"] == [10, 20] and pair["tv_low"][-1] > 0 and pair["residual_median"] > 1e-3
    assert [c.passed for c in out.checks[:5]] == [True] * 5


def test_rezende_section():
    out = _run(rezende.SECTION, energies=["U1"], families=["planar"], depths=[1, 2], steps=20, samples=2000,
               figure_points=12)
    assert [(r["energy"], r["K"]) for r in out.numbers["runs"]] == [("U1", 1), ("U1", 2)]
    assert out.numbers["log_z"] == {"U1": pytest.approx(1.877501626108419, abs=1e-9)}
    assert set(out.numbers["best_by_depth"][0]) == {"energy", "best_kl_k1", "best_kl_k2"}
