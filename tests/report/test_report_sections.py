"""The report's real sections with tiny settings (conftest.TINY), run once: their numbers, checks,
figures, and the page against results.json."""

import importlib.util
import math

import pytest
from page_check import check_page_against_results

from flowprobe.report.core import MODES
from flowprobe.report.sections import SECTIONS
from flowprobe.theory.tv import isotropic_normal_tv, normal_tv


def _record(tiny_report, key):
    out, results = tiny_report
    record = next(s for s in results["sections"] if s["key"] == key)
    if record["status"] == "unavailable":
        pytest.skip(record["reason"])
    assert record["status"] in ("holds", "fails", "inconclusive"), record.get("traceback", record["status"])
    assert record["measured"] and record["criterion"]
    for figure in record["figures"]:
        assert (out / figure["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure["caption"]
    return record


def _passed(record):
    return [c["passed"] for c in record["criterion"]]


def _present(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_registry():
    assert [s.number for s in SECTIONS] == list(range(1, 9))
    assert len({s.key for s in SECTIONS}) == len(SECTIONS)
    for s in SECTIONS:
        assert s.claim.endswith(".") and s.claim.count(". ") == 0  # one sentence
        assert s.run is not None
        if s.settings:  # a section without settings is the same in every mode
            assert set(s.settings) == set(MODES) and set(s.settings["quick"]) == set(s.settings["full"]), s.key
    hooks = {s.key: s for s in SECTIONS if s.requires}
    assert {k: s.requires for k, s in hooks.items()} == {"depth": ("flowprobe.theory.depth_experiments",),
                                                         "vae": ("flowprobe.vae",)}
    for s in hooks.values():  # "not available" exactly when the capability is missing from this build
        reason = s.unavailable()
        assert reason is None if _present(s.requires[0]) else f"needs {s.requires[0]} ({s.issue})" in reason


def test_page_of_the_real_sections(tiny_report):
    out, results = tiny_report
    assert results["finished"] and not [s for s in results["sections"] if s["status"] == "error"]
    _, page = check_page_against_results(out)
    assert [key for key, _ in page.sections] == [s.key for s in SECTIONS]


def test_two_layer_example(tiny_report):
    record = _record(tiny_report, "two_layer")
    assert record["status"] == "holds"
    pieces = record["numbers"]["pieces"]
    assert [(p["mean"], p["std"]) for p in pieces] == [(0.0, 1.0), (-0.2, 0.8), (-1.25, 1.5)]
    assert [p["mass"] for p in pieces] == pytest.approx([0.15865525393145707, 0.7745375447996853, 0.0668072012688581],
                                                        abs=1e-12)
    assert record["numbers"]["breakpoints"][0]["minus_log_slope"] == pytest.approx(-math.log(0.8))


def test_approx1d_section(tiny_report):
    record = _record(tiny_report, "approx1d")
    tvs = [r["tv"] for r in record["numbers"]["construction"]]
    assert tvs == pytest.approx([0.0640218363172909, 0.021773284837988655, 0.004062282492555764], rel=1e-6)
    assert record["numbers"]["source_tv"] == pytest.approx(0.1352574320938546, rel=1e-8)
    assert _passed(record)[:3] == [True, True, True]
    assert [f["name"] for f in record["figures"]] == ["n50", "convergence"]


def test_stages_section(tiny_report):
    record = _record(tiny_report, "stages")
    rows = record["numbers"]["stages"]
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert max(r["max_log_density_difference"] for r in rows) < 1e-9
    assert all(abs(r["mass_on_grid"] - 1) < 1e-2 for r in rows)
    assert record["numbers"]["log_z"] == pytest.approx(1.877501626108419, abs=1e-9)
    assert _passed(record)[:2] == [True, True]


def test_topology_section(tiny_report):
    record = _record(tiny_report, "topology")
    numbers = record["numbers"]
    assert [(r["neurons"], r["rank"]) for r in numbers["gradient_ranks"]] == [(1, 1), (2, 2), (3, 3), (3, 8)]
    assert [b["min_neurons"] for b in numbers["gaussian_bounds"]] == [2, 1, 3, 2]
    floors = [f["tv_floor"] for f in numbers["floors"]]
    assert floors == pytest.approx([isotropic_normal_tv(2, 2.25), normal_tv(0, 1, 0, 1.5), 0.0], abs=1e-12)
    below = [r for r in numbers["split_runs"] if r["neurons"] < 2]
    assert below and all(r["tv_high"] >= r["tv_floor"] for r in below)
    passed = _passed(record)
    assert passed[0] and passed[1] and passed[4]


def test_relu_section(tiny_report):
    record = _record(tiny_report, "relu")
    exact = record["numbers"]["exact_pairs"][0]
    assert exact["residual_max"] < 1e-8 and exact["modes"] == exact["modes_mapped_to_modes"] == 4
    pair = record["numbers"]["forbidden_pairs"][0]
    assert pair["steps"] == [10, 20] and pair["tv_low"][-1] > 0 and pair["residual_median"] > 1e-3
    assert _passed(record)[:5] == [True] * 5


def test_rezende_section(tiny_report):
    record = _record(tiny_report, "rezende")
    assert [(r["energy"], r["K"]) for r in record["numbers"]["runs"]] == [("U1", 1), ("U1", 2)]
    assert record["numbers"]["log_z"] == {"U1": pytest.approx(1.877501626108419, abs=1e-9)}
    assert set(record["numbers"]["best_by_depth"][0]) == {"energy", "best_kl_k1", "best_kl_k2"}


def test_depth_section(tiny_report):
    """Runs once flowprobe.theory.depth_experiments is in the build: the proven bounds of the two
    constructions (Householder d/2; planar ⌈(R − 2Φ⁻¹(0.55))/Δ⌉ with R = √2, Δ = 1)."""
    record = _record(tiny_report, "depth")
    rows = record["numbers"]["brackets"]
    assert [(r["series"], r["d"], r["proven_lower"]) for r in rows] == [("householder", 2, 1), ("planar κ=0.5", 2, 2)]
    assert rows[1]["real_bound"] == pytest.approx(math.sqrt(2) - 0.251323, abs=1e-6)
    assert rows[0]["depths"] == [0, 1] and rows[1]["depths"] == [1, 2]
    assert _passed(record)[:2] == [True, True]  # nothing below a proven bound reached ε


def test_vae_section(tiny_report):
    """Runs once flowprobe.vae is in the build: the table's rows and the paired comparison."""
    record = _record(tiny_report, "vae")
    table = record["numbers"]["table"]
    assert [r["posterior"] for r in table] == ["vae", "planar16"] and all(r["epochs"] == [1] for r in table)
    assert all(r["neg_elbo"] >= r["nll"] > 0 for r in table)  # Jensen: the IS NLL never exceeds the −ELBO
    (comparison,) = record["numbers"]["comparisons"]
    assert comparison["posterior"] == "planar16" and comparison["against"] == "vae"
    assert comparison["nll_difference"] == pytest.approx(table[1]["nll"] - table[0]["nll"], abs=1e-9)
    assert comparison["z"] == pytest.approx(comparison["nll_difference"] / comparison["se"])


@pytest.mark.parametrize(("converged", "z_flows", "z_sylvester", "expected"), [
    (False, (-5.0, -3.0), 1.0, "holds"),  # every flow significantly better at the budget
    (False, (-5.0, -1.0), -1.0, "inconclusive"),  # better, not significantly: the budget decides nothing
    (False, (-5.0, 3.0), -1.0, "inconclusive"),  # worse, but training was cut short: no contradiction
    (False, (-5.0, -3.0), 2.5, "inconclusive"),
    (True, (-5.0, -3.0), 1.0, "holds"),  # a Sylvester tie with planar is "at least as good"
    (True, (-5.0, 0.5), -1.0, "inconclusive"),  # a converged flow not below the VAE, not significantly worse
    (True, (-5.0, 2.5), -1.0, "fails"),
    (True, (-5.0, -3.0), 2.5, "fails"),
])
def test_vae_verdict_separates_noise_budget_and_contradiction(converged, z_flows, z_sylvester, expected):
    from flowprobe.report.core import verdict
    from flowprobe.report.sections.vae import _checks

    rows = [{"posterior": p, "stopped_early": [converged]} for p in ("vae", "planar16", "o-snf")]
    comparisons = [{"posterior": p, "against": "vae", "z": z, "nll_difference": 0.1 * z}
                   for p, z in zip(("planar16", "o-snf"), z_flows, strict=True)]
    comparisons.append({"posterior": "o-snf", "against": "planar16", "z": z_sylvester,
                        "nll_difference": 0.1 * z_sylvester})
    assert verdict(_checks(rows, comparisons, 2.0)) == expected
