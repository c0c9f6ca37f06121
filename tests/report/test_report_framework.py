"""The report framework on tiny fake sections (report_fakes.py): verdicts, the page against results.json,
the cache, failures, parallel workers, the output directory's rules and the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from page_check import check_page_against_results
from report_fakes import fails, holds, kill_sections, not_a_number, sections

from flowprobe.cli import main
from flowprobe.report.core import Check, Section, check, fmt, verdict
from flowprobe.report.runner import FAIL_ENV, exit_status, reproduce, select
from flowprobe.rundir import DirectoryBusyError, OutputDir

SRC = str(Path(__file__).resolve().parents[2] / "src")  # the kill -9 test's child imports these
HERE = str(Path(__file__).resolve().parent)


def test_verdict_rules():
    assert verdict([check("a", 1, "<", 2)]) == "holds"
    assert verdict([check("a", 3, "<", 2), check("b", 1, "<", 2, decisive=False)]) == "fails"
    assert verdict([check("a", 1, "≤", 1), check("b", 3, "<", 2, decisive=False)]) == "inconclusive"
    assert check("x", float("nan"), "<", 2) == Check("x = nan < 2", False)
    assert check("TV", 0.00066782, "≤", 0.002, bound_name="goal").text == "TV = 0.0006678 ≤ goal = 0.002"
    with pytest.raises(ValueError, match="at least one check"):
        verdict([])
    assert (fmt(3), fmt(0.123456789), fmt(True)) == ("3", "0.1235", "yes")


def test_report_of_fake_sections(tmp_path, capsys):
    out = tmp_path / "report"
    results = reproduce(out, sections(), mode="quick")
    assert [s["status"] for s in results["sections"]] == ["holds", "inconclusive", "unavailable", "unavailable"]
    assert "needs flowprobe.no_such_module (issue 99)" in results["sections"][2]["reason"]
    assert "not wired yet (issue 98)" in results["sections"][3]["reason"]
    assert results["summary"] == {"holds": 1, "inconclusive": 1, "unavailable": 2}
    assert exit_status(results) == 1
    alpha = results["sections"][0]
    assert alpha["numbers"]["rows"][1]["tv"] == 0.25 and alpha["settings"] == {"size": 1, "counter": None,
                                                                              "sleepy": False}
    assert alpha["criterion"] == [{"text": "value = 0.1235 < 1", "passed": True, "decisive": True}]
    assert [f["file"] for f in alpha["figures"]] == ["alpha_curve.png", "alpha_second.png"]
    assert (out / "alpha_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"flowprobe", "torch", "numpy", "python"} <= set(alpha["versions"]) and len(alpha["cache_key"]) == 64
    _, page = check_page_against_results(out)
    assert page.sections == [("alpha", "holds"), ("beta", "inconclusive"), ("gamma", "unavailable"),
                             ("delta", "unavailable")]
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # nothing from the network
    assert html.count("data:image/png;base64,") == 2
    assert "running 2 section(s)" in capsys.readouterr().err


def test_cache_force_and_settings(tmp_path):
    out, counter = tmp_path / "report", tmp_path / "runs.txt"
    fakes = sections(counter)
    first = reproduce(out, fakes)
    again = reproduce(out, fakes)
    assert counter.read_text().count("run") == 1  # reused
    assert again["sections"][0]["cached"] and again["sections"][0]["numbers"] == first["sections"][0]["numbers"]
    check_page_against_results(out)
    reproduce(out, fakes, only=["beta"], force=True)  # --force re-runs only what --only names
    assert counter.read_text().count("run") == 1
    reproduce(out, fakes, only=["1"], force=True)
    assert counter.read_text().count("run") == 2
    full = reproduce(out, fakes, mode="full", only=["alpha"])  # other settings: a new key
    assert counter.read_text().count("run") == 3
    changed = reproduce(out, fakes, mode="full", only=["alpha"], overrides={"alpha": {"size": 7}})
    assert changed["sections"][0]["settings"]["size"] == 7 and counter.read_text().count("run") == 4
    full = reproduce(out, fakes, mode="full", only=["alpha"])  # back: the override was part of the key
    assert counter.read_text().count("run") == 5
    assert full["sections"][1]["status"] == "not run"  # beta has no result for --full yet
    (out / "alpha_curve.png").write_bytes(b"changed")  # a figure that is not what flowprobe wrote
    reproduce(out, fakes, mode="full")
    assert counter.read_text().count("run") == 6 and (out / "alpha_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_section_leaves_the_others(tmp_path, monkeypatch, jobs):
    monkeypatch.setenv(FAIL_ENV, "alpha")
    out = tmp_path / "report"
    results = reproduce(out, sections(), jobs=jobs)
    alpha, beta = results["sections"][:2]
    assert alpha["status"] == "error" and "failure injected" in alpha["error"] and "Traceback" in alpha["traceback"]
    assert beta["status"] == "inconclusive" and beta["numbers"] == {"a": 1.0, "b": 3.0}
    assert exit_status(results) == 11
    results, page = check_page_against_results(out)
    assert ("alpha", "error") in page.sections and results["finished"]
    monkeypatch.delenv(FAIL_ENV)
    assert reproduce(out, sections())["sections"][0]["status"] == "holds"  # an error is never reused


def test_errors_of_a_section_are_records(tmp_path):
    broken = (Section("nan", 1, "NaN", "NaN is refused.", not_a_number),
              Section("no", 2, "No", "Fails.", fails),
              Section("ok", 3, "Ok", "Holds.", holds))
    results = reproduce(tmp_path / "r", broken)
    assert [s["status"] for s in results["sections"]] == ["error", "fails", "holds"]
    assert "Out of range float values are not JSON compliant" in results["sections"][0]["error"]
    assert exit_status(results) == 11
    assert exit_status({"sections": results["sections"][1:]}) == 1


def test_output_directory_rules(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no flowprobe report"):
        reproduce(user, sections())
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]  # nothing created there
    out = tmp_path / "report"
    reproduce(out, sections())
    (out / "notes.txt").write_text("kept")  # a user's file inside a report: kept, never touched
    with OutputDir(out, "test"), pytest.raises(DirectoryBusyError, match="being written by flowprobe test"):
        reproduce(out, sections())
    with pytest.raises(ValueError, match="unknown section 'nope'"):
        select(sections(), ["nope"])
    with pytest.raises(ValueError, match="section 'alpha' has no setting 'nope'"):
        reproduce(out, sections(), overrides={"alpha": {"nope": 1}})
    with pytest.raises(ValueError, match="unknown section 'zeta'"):
        reproduce(out, sections(), overrides={"zeta": {}})
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        reproduce(out, sections(), jobs=0)
    reproduce(out, sections()[1:])  # a report without alpha: its figures are deleted, the user's file is kept
    assert not (out / "alpha_curve.png").exists() and (out / "notes.txt").read_text() == "kept"


def test_cli_injected_failure_and_bad_input(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    monkeypatch.setenv(FAIL_ENV, "stages")
    assert main(["reproduce", "--out", str(out), "--only", "two_layer", "stages"]) == 11
    printed = capsys.readouterr()
    assert "section(s) failed to run: (1) stages" in printed.err
    assert f"report: {out.resolve() / 'index.html'}" in printed.out
    results = json.loads((out / "results.json").read_text())
    status = {s["key"]: s["status"] for s in results["sections"]}
    assert status == {"stages": "error", "two_layer": "holds", "approx1d": "not run", "topology": "not run",
                      "relu": "not run", "depth": "not run", "rezende": "not run", "vae": "not run"}
    assert results["command"].startswith("flowprobe ")
    check_page_against_results(out)
    for args, message in ((["--only", "nope", "--out", str(out)], "unknown section 'nope'"),
                          ([], "--out DIR is required"),
                          (["--out", str(out), "--mnist", str(tmp_path / "none")], "--mnist"),
                          (["--out", str(tmp_path)], "holds no flowprobe report")):
        assert main(["reproduce", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["reproduce", "--list"]) == 0
    assert "6  depth" in capsys.readouterr().out


def test_kill_9_keeps_finished_sections(tmp_path):
    out = tmp_path / "report"
    code = (f"import sys; sys.path[:0] = [{SRC!r}, {HERE!r}]\n"
            "from report_fakes import kill_sections\nfrom flowprobe.report.runner import reproduce\n"
            f"reproduce({str(out)!r}, kill_sections())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, REPORT_FAKE_SLEEP="60"))
    try:  # kill -9 while "slow" sleeps, once "fast" is recorded
        deadline = time.time() + 120
        while time.time() < deadline and b'"inconclusive"' not in _read(out / "results.json"):
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    results = json.loads((out / "results.json").read_text())  # the last complete state: fast done, slow pending
    assert [s["status"] for s in results["sections"]] == ["inconclusive", "pending"] and not results["finished"]
    check_page_against_results(out)
    done = reproduce(out, kill_sections())
    assert [(s["status"], s["cached"]) for s in done["sections"]] == [("inconclusive", True), ("holds", False)]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _read(path):
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
