"""flowprobe.sweep: keys and seeds, the SQLite store, executors (in-process, local workers, Ray)."""

import importlib.util
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.processes import kill_9_when

from flowprobe.sweep import (
    COLUMNS,
    Progress,
    Store,
    Sweep,
    SweepSummary,
    canonical_key,
    derive_seed,
    format_table,
    run_sweep,
)
from flowprobe.sweep.store import HOST

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [{"x": list(range(6)), "steps": [5]}, {"x": [99], "crash": [True]}]  # the last run kills its worker
RAY_REQUIRED = bool(os.environ.get("CI"))  # CI installs flowprobe[ray]: there the Ray test must run


def _driver(store, name, fn, n, workers, sleep):
    """A sweep in a separate Python process (tests/sweep_fns.py's main), its runs of ``sleepy`` taking ``sleep`` s."""
    cmd = [sys.executable, "-m", "tests.sweep_fns", str(store), name, fn, str(n), str(workers)]
    env = dict(os.environ, SWEEP_SLEEP=str(sleep))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return SweepSummary(**json.loads(out.splitlines()[-1]))


def _rows(path):
    with Store(path, readonly=True) as store:
        return store.rows()


# --- keys, seeds, grids -----------------------------------------------------------------------------


def test_keys_are_canonical_and_seeds_fixed_by_key():
    key = canonical_key({"depth": 3, "family": "planar", "d": 2.5, "tags": ["a", {"z": None, "b": True}]})
    assert key == '{"d":2.5,"depth":3,"family":"planar","tags":["a",{"b":true,"z":null}]}'
    assert canonical_key({"family": "planar", "tags": ["a", {"b": True, "z": None}], "depth": 3, "d": 2.5}) == key
    assert derive_seed('{"x":1}') == 5660605522937413712
    assert derive_seed('{"x":1}', salt=1) == 4195610189922392446
    assert 0 <= derive_seed(key) < 2**63

    sweep = Sweep("s", "tests.sweep_fns:square", {"x": [1, 2], "y": ["a", "b", "c"]}, fixed={"eps": 0.1})
    assert len(sweep) == 6
    assert [run.params for run in sweep][:2] == [{"eps": 0.1, "x": 1, "y": "a"}, {"eps": 0.1, "x": 1, "y": "b"}]
    assert all(run.key == canonical_key(run.params) and run.seed == derive_seed(run.key) for run in sweep)
    assert len({run.seed for run in sweep}) == 6
    assert [r.seed for r in Sweep("s", "m:f", {"x": [1]}, seed=1)] == [4195610189922392446]

    # a union of grids (depths that depend on d); runs in both are kept once
    union = Sweep(
        "s", "m:f", [{"d": [2], "depth": [0, 1, 2]}, {"d": [4], "depth": [1, 2, 3]}, {"d": [2], "depth": [2]}]
    )
    assert [(r.params["d"], r.params["depth"]) for r in union] == [(2, 0), (2, 1), (2, 2), (4, 1), (4, 2), (4, 3)]
    assert union.definition()["grid"][1] == {"d": [4], "depth": [1, 2, 3]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": {"a": range(1000), "b": range(1000)}}, r"1000000 runs \(1000×1000\), more than max_runs=100000"),
        ({"grid": [{"a": [1, 2]}, {"b": range(10)}], "max_runs": 11}, r"12 runs \(2 \+ 10\), more than max_runs=11"),
        ({"grid": {"a": []}}, "axis 'a' has no values"),
        ({"grid": {"a": "abc"}}, "axis 'a' needs a list of values, got str"),
        ({"grid": {"a": [(1, 2)]}}, r"params\['a'\] is a tuple, not a JSON value \(use a list\)"),
        ({"grid": {"a": [float("nan")]}}, "params\\['a'\\] is nan: parameters must be finite"),
        ({"grid": {"a": [{1: 2}]}}, "has the key 1: JSON object keys must be strings"),
        ({"grid": {"a": [{1, 2}]}}, "is a set, not a JSON value"),
        ({"grid": {"_seed": [1]}}, "not starting with '_'"),
        ({"grid": {"a": [1]}, "fixed": {"a": 2}}, "'a' is both a grid axis and a fixed parameter"),
        ({"grid": {"a": [1]}, "fn": "tests/sweep_fns.py"}, "'package.module:function'"),
        ({"grid": {"a": [1]}, "name": " "}, "non-empty name"),
        ({"grid": []}, "at least one grid"),
        ({"grid": {"a": [1]}, "max_runs": 0}, "max_runs must be a positive int"),
        ({"grid": {"a": [1]}, "seed": 1.5}, "seed must be an int"),
        ({"grid": {"a": [1]}, "fixed": [("b", 1)]}, "fixed must be a mapping"),
    ],
)
def test_bad_sweeps_are_refused_up_front(kwargs, message):
    arguments = {"name": "s", "fn": "tests.sweep_fns:square", **kwargs}
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        Sweep(**arguments)
    assert time.perf_counter() - start < 0.5  # the size is checked before any run is built


def test_non_json_params_name_the_value():
    import torch

    with pytest.raises(ValueError, match=r"params\['w'\] is a Tensor, not a JSON value"):
        canonical_key({"w": torch.ones(2)})


# --- in-process runs, the store, failures -----------------------------------------------------------


def test_in_process_sweep_records_rows_and_skips_finished_runs(tmp_path):
    path = tmp_path / "sub" / "store.sqlite"
    sweep = Sweep("squares", "tests.sweep_fns:square", {"x": [0, 1, 2, 3]})
    summary = run_sweep(sweep, path, workers=0, progress=False)
    assert (summary.total, summary.skipped, summary.ran, summary.ok, summary.failed) == (4, 0, 4, 4, 0)
    rows = _rows(path)
    assert [r["result"]["y"] for r in rows] == [0, 1, 4, 9]
    assert set(rows[0]) == set(COLUMNS)
    for row, run in zip(rows, sweep):
        assert row["key"] == run.key and row["params"] == run.params and row["seed"] == run.seed
        assert (row["status"], row["attempts"], row["executor"], row["error"]) == ("ok", 1, "inprocess", None)
        assert (row["host"], row["pid"]) == (HOST, os.getpid())
        assert row["torch_version"].startswith("2.") and row["flowprobe_version"]
        assert row["started_at"] <= row["finished_at"] and row["wall_s"] >= 0

    again = run_sweep(sweep, path, workers=1, progress=False)
    assert (again.skipped, again.ran, again.ok) == (4, 0, 4)
    grown = Sweep("squares", "tests.sweep_fns:square", {"x": [0, 1, 2, 3, 4, 5]})
    summary = run_sweep(grown, path, workers=0, progress=False)
    assert (summary.skipped, summary.ran, summary.ok) == (4, 2, 6)
    assert [r["result"]["y"] for r in _rows(path)] == [0, 1, 4, 9, 16, 25]
    assert _rows(path)[:4] == rows  # the first rows were not touched

    with Store(path, readonly=True) as store:
        assert store.counts() == {"ok": 6, "failed": 0, "claimed": 0}
        assert store.meta["grid"] == [{"x": [0, 1, 2, 3, 4, 5]}] and store.meta["name"] == "squares"
        assert [r["result"]["y"] for r in store.rows(where={"x": 5})] == [25]
        columns, values = store.table()
    assert columns == ["x", "status", "y", "wall_s"]
    assert [v[:3] for v in values] == [[x, "ok", x * x] for x in range(6)]
    text = format_table(columns, [[1, "ok", 0.123456789, None]])
    assert text.splitlines() == ["x  status  y         wall_s", "1  ok      0.123457  -"]


def test_run_function_sees_its_seed_and_global_generators_are_seeded(tmp_path):
    import torch

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    sweep = Sweep("train", "tests.sweep_fns:train", {"x": [0, 1]}, fixed={"steps": 3})
    run_sweep(sweep, tmp_path / "s.sqlite", workers=0, progress=False)
    assert torch.equal(torch.rand(1), before)  # the caller's generator state is restored
    rows = _rows(tmp_path / "s.sqlite")
    assert [r["result"]["threads"] for r in rows] == [1, 1]
    own = torch.rand(2, generator=torch.Generator().manual_seed(rows[0]["seed"])).tolist()
    assert rows[0]["result"]["own"] == own
    assert rows[0]["result"]["loss"] != rows[1]["result"]["loss"]


def test_failing_runs_are_recorded_and_retried_only_on_request(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    sweep = Sweep("flaky", "tests.sweep_fns:flaky", {"x": [1, 2, 3, 4]})
    monkeypatch.setenv("SWEEP_FLAKY", "1")
    summary = run_sweep(sweep, path, workers=0, progress=False)
    assert (summary.ran, summary.ok, summary.failed) == (4, 3, 1)
    failed = {r["params"]["x"]: r for r in _rows(path) if r["status"] == "failed"}
    assert list(failed) == [3]
    assert failed[3]["error"] == "ValueError: x = 3 is unlucky"
    assert "raise ValueError" in failed[3]["traceback"] and failed[3]["result"] is None

    assert run_sweep(sweep, path, workers=0, progress=False).ran == 0
    again = run_sweep(sweep, path, workers=0, progress=False, retry_failed=True)
    assert (again.skipped, again.ran, again.failed) == (3, 1, 1)
    monkeypatch.delenv("SWEEP_FLAKY")
    fixed = run_sweep(sweep, path, workers=0, progress=False, retry_failed=True)
    assert (fixed.ran, fixed.ok, fixed.failed) == (1, 4, 0)
    row = [r for r in _rows(path) if r["params"]["x"] == 3][0]
    assert (row["status"], row["attempts"], row["error"], row["result"]) == ("ok", 3, None, {"y": 9})


@pytest.mark.parametrize(
    ("fn", "error"),
    [
        ("tensor_result", "TypeError: the run's result is not JSON: Object of type Tensor is not JSON serializable"),
        ("list_result", "TypeError: the run function returned a list, not a dict"),
    ],
)
def test_results_that_are_not_json_objects_fail_the_run(tmp_path, fn, error):
    summary = run_sweep(
        Sweep("bad", f"tests.sweep_fns:{fn}", {"x": [1]}), tmp_path / "s.sqlite", workers=0, progress=False
    )
    assert summary.failed == 1
    assert _rows(tmp_path / "s.sqlite")[0]["error"] == error


def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch):
    sweep = Sweep("s", "tests.sweep_fns:square", {"x": [1]})
    path = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match="cannot import the run function 'tests.nowhere:f': ModuleNotFoundError"):
        run_sweep(Sweep("s", "tests.nowhere:f", {"x": [1]}), path)
    with pytest.raises(ValueError, match="module 'tests.sweep_fns' has no function 'nothing'"):
        run_sweep(Sweep("s", "tests.sweep_fns:nothing", {"x": [1]}), path)
    for kwargs, message in [
        ({"workers": -1}, "workers must be a non-negative int"),
        ({"threads": 0}, "threads must be a positive int"),
        ({"ray_address": "somewhere"}, "ray_address must be 'local', 'auto', 'host:port'"),
        ({"stale_after": 0}, "stale_after must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_sweep(sweep, path, **kwargs)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ValueError, match=r"^the Ray executor needs Ray: pip install 'flowprobe\[ray\]'$"):
        run_sweep(sweep, path, ray_address="local", progress=False)
    assert Store(path, readonly=True).counts() == {"ok": 0, "failed": 0, "claimed": 0}


# --- hostile stores -----------------------------------------------------------------------------------


def test_unusable_stores_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory, not a file"):
        Store(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not a database, but long enough to have a header of sorts\n" * 20)
    with pytest.raises(ValueError, match="notes.txt is not a sweep store \\(file is not a database\\)"):
        Store(text)
    with pytest.raises(ValueError, match="is not a sweep store"):
        Store(text, readonly=True)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    for readonly in (False, True):
        with pytest.raises(ValueError, match="other.sqlite is a SQLite database but not a sweep store"):
            Store(other, readonly=readonly)
    with sqlite3.connect(other) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]  # left as it was
    with pytest.raises(ValueError, match="no sweep store at"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    with pytest.raises(ValueError, match="cannot open sweep store"):
        Store(text / "store.sqlite")  # a parent that is a file
    with pytest.raises(ValueError, match="status must be one of"):
        Store(tmp_path / "s.sqlite").rows(status="done")


def test_a_store_refuses_another_sweep_unless_allowed(tmp_path):
    path = tmp_path / "s.sqlite"
    run_sweep(Sweep("a", "tests.sweep_fns:square", {"x": [1]}), path, workers=0, progress=False)
    for other in (
        Sweep("b", "tests.sweep_fns:square", {"x": [1]}),
        Sweep("a", "tests.sweep_fns:flaky", {"x": [1]}),
        Sweep("a", "tests.sweep_fns:square", {"x": [1]}, seed=7),
    ):
        with pytest.raises(ValueError, match=r"holds sweep 'a' \(fn tests.sweep_fns:square, seed 0\), not"):
            run_sweep(other, path, workers=0, progress=False)
    summary = run_sweep(
        Sweep("b", "tests.sweep_fns:square", {"x": [2]}), path, workers=0, allow_mismatch=True, progress=False
    )
    assert summary.ran == 1
    with Store(path, readonly=True) as store:
        assert store.meta["name"] == "b" and [r["result"]["y"] for r in store.rows()] == [1, 4]


def test_claims_keep_live_processes_apart_and_dead_ones_are_taken_over(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    me = store.register()
    keys = ['{"x":1}', '{"x":2}', '{"x":3}']
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with store._write() as conn:  # three other owners: alive here, dead here, silent on another host
        conn.execute("INSERT INTO owners VALUES ('live', ?, ?, '', ?)", (HOST, os.getppid(), time.time()))
        conn.execute("INSERT INTO owners VALUES ('dead', ?, ?, '', ?)", (HOST, dead.pid, time.time()))
        conn.execute("INSERT INTO owners VALUES ('far', 'elsewhere', 1, '', ?)", (time.time() - 120,))
        conn.executemany("INSERT INTO claims VALUES (?, ?, 0)", zip(keys, ["live", "dead", "far"]))
    assert store.claim(me, keys, {}, stale_after=60) == (keys[1:], [], keys[:1])
    assert store.counts()["claimed"] == 3

    row = {c: None for c in COLUMNS} | {
        "key": keys[1],
        "params": keys[1],
        "seed": 1,
        "status": "failed",
        "wall_s": 0.5,
        "executor": "test",
        "started_at": "t",
        "finished_at": "t",
        "flowprobe_version": "v",
        "torch_version": "v",
        "error": "E: boom",
    }
    assert store.record(me, row)["attempts"] == 1
    assert store.claim(me, keys[1:2], {}, 60) == ([], keys[1:2], [])  # failed: finished unless retried
    assert store.claim(me, keys[1:2], {keys[1]: 1}, 60) == (keys[1:2], [], [])
    ok = store.record(me, row | {"status": "ok", "result": '{"y":1}', "error": None})
    assert (ok["status"], ok["attempts"], ok["result"]) == ("ok", 2, {"y": 1})
    duplicate = store.record(me, row | {"status": "ok", "result": '{"y":2}', "wall_s": 9.0})
    assert (duplicate["attempts"], duplicate["result"], duplicate["wall_s"]) == (2, {"y": 1}, 0.5)  # first ok kept
    store.release(me)
    assert store.counts() == {"ok": 1, "failed": 0, "claimed": 1}  # the live owner's claim stays
    store.close()


# --- progress -------------------------------------------------------------------------------------------


def test_progress_line_and_best(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_FLAKY", "1")
    seen = []

    def best(row):
        seen.append(row["key"])
        return f"{len(seen)} seen, last x={row['params']['x']}"

    sweep = Sweep("flaky", "tests.sweep_fns:flaky", {"x": [1, 2, 3, 4, 5]})
    out = io.StringIO()
    run_sweep(sweep, tmp_path / "s.sqlite", workers=0, progress=out, best=best)
    lines = out.getvalue().splitlines()
    assert lines[0] == "flaky: 0/5 runs done, 0 failed, 0 running, 0:00:00 elapsed"
    assert lines[-1] == "flaky: 5/5 runs done, 1 failed, 0 running, 0:00:00 elapsed | best: 5 seen, last x=5"
    assert sorted(seen) == sorted(run.key for run in sweep)

    seen.clear()
    out = io.StringIO()
    run_sweep(
        Sweep("flaky", "tests.sweep_fns:flaky", {"x": [1, 2, 6]}),
        tmp_path / "s.sqlite",
        progress=out,
        workers=0,
        best=best,
    )
    assert seen == ['{"x":1}', '{"x":2}', '{"x":6}']  # recorded rows first, each once
    assert (
        out.getvalue().splitlines()[0]
        == "flaky: 2/3 runs done, 0 failed, 0 running, 0:00:00 elapsed | best: 2 seen, last x=2"
    )

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = Progress("sweep", 10, terminal)
    assert bar.line(2, 0, 2, None) == "sweep: 2/10 runs done, 0 failed, 2 running, 0:00:00 elapsed"
    assert (
        bar.line(4, 1, 2, "n=3")
        == "sweep: 4/10 runs done, 1 failed, 2 running, 0:00:00 elapsed, ~0:00:00 left | best: n=3"
    )
    bar.update(4, 1, 2, "n=3")
    bar.update(5, 1, 2, "n=3")  # within 0.2 s of the last write: not drawn
    bar.update(10, 1, 0, "n=3", final=True)
    assert terminal.getvalue().count("\r") == 2 and terminal.getvalue().endswith("\x1b[K\n")


# --- worker processes, interruption, concurrency, Ray -----------------------------------------------------


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """TRAIN on two spawned worker processes."""
    path = tmp_path_factory.mktemp("local") / "s.sqlite"
    summary = run_sweep(Sweep("train", "tests.sweep_fns:train", TRAIN), path, workers=2, progress=False)
    assert (summary.ran, summary.ok, summary.failed) == (7, 6, 1)
    return path


def test_local_workers_give_the_numbers_of_the_in_process_run(local_store, tmp_path):
    path = tmp_path / "s.sqlite"
    run_sweep(Sweep("train", "tests.sweep_fns:train", TRAIN[0]), path, workers=0, progress=False)
    local = {r["key"]: r for r in _rows(local_store)}
    rows = _rows(path)
    assert len(rows) == 6
    for row in rows:
        assert local[row["key"]]["executor"] == "local" and local[row["key"]]["pid"] != os.getpid()
        assert (local[row["key"]]["seed"], local[row["key"]]["result"]) == (row["seed"], row["result"])
    assert rows[0]["result"]["loss"] == pytest.approx(0.8227653, rel=1e-5)


def test_a_worker_killed_mid_run_fails_only_that_run(local_store):
    rows = {r["params"]["x"]: r for r in _rows(local_store)}
    crashed = rows.pop(99)
    assert crashed["status"] == "failed" and crashed["host"] == HOST and crashed["result"] is None
    assert crashed["error"] == f"WorkerDied: worker process {crashed['pid']} died during the run (killed by SIGKILL)"
    assert all(r["status"] == "ok" for r in rows.values())


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None and not RAY_REQUIRED,
    reason="Ray is not installed (pip install 'flowprobe[ray]'); CI installs it and runs this test",
)
def test_ray_gives_the_rows_of_local_workers(ray_local, local_store, tmp_path):
    path = tmp_path / "s.sqlite"
    summary = run_sweep(
        Sweep("train", "tests.sweep_fns:train", TRAIN), path, ray_address="local", workers=2, progress=False
    )
    assert (summary.ran, summary.ok, summary.failed) == (7, 6, 1)
    ray_rows, local_rows = _rows(path), _rows(local_store)
    assert [r["key"] for r in ray_rows] == [r["key"] for r in local_rows]
    for ray_row, local_row in zip(ray_rows, local_rows):
        assert ray_row["executor"] == "ray"
        assert (ray_row["seed"], ray_row["status"], ray_row["result"]) == (
            local_row["seed"],
            local_row["status"],
            local_row["result"],
        )
    assert ray_rows[0]["error"].startswith("WorkerCrashedError: The worker died unexpectedly")


def test_kill_9_loses_only_the_runs_in_flight(tmp_path):
    path = tmp_path / "s.sqlite"
    driver = _driver(path, "sleepy", "sleepy", 20, 2, 0.4)

    def three_done() -> bool:  # the store, read-only while the driver writes it
        if not path.exists():
            return False
        with Store(path, readonly=True) as store:
            return store.counts()["ok"] >= 3

    kill_9_when(driver, three_done, timeout=90)
    before = _rows(path)
    assert 3 <= len(before) < 20
    summary = run_sweep(
        Sweep("sleepy", "tests.sweep_fns:sleepy", {"x": list(range(20))}), path, workers=0, progress=False
    )
    assert (summary.skipped, summary.ran, summary.ok) == (len(before), 20 - len(before), 20)
    after = {r["key"]: r for r in _rows(path)}
    assert all(after[r["key"]] == r for r in before)  # finished rows untouched
    assert all(r["attempts"] == 1 for r in after.values())
    assert Store(path, readonly=True).counts()["claimed"] == 0


def test_concurrent_sweeps_on_one_store_run_each_key_once(tmp_path):
    path = tmp_path / "s.sqlite"
    drivers = [_driver(path, "sleepy", "sleepy", 24, 0, 0.1) for _ in range(2)]
    summaries = [_summary(d) for d in drivers]
    rows = _rows(path)
    assert len(rows) == 24 and all(r["status"] == "ok" and r["attempts"] == 1 for r in rows)
    assert sum(s.ran for s in summaries) == 24
    assert {r["pid"] for r in rows} <= {d.pid for d in drivers}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT count(*) FROM claims").fetchone() == (0,)


def test_a_script_without_main_guard_gets_a_clear_error(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from flowprobe.sweep import Sweep, run_sweep\n"
        "sweep = Sweep('s', 'tests.sweep_fns:square', {'x': list(range(6))})\n"
        f"run_sweep(sweep, {str(tmp_path / 's.sqlite')!r}, workers=2)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("ValueError: WorkerDied: worker process ")
    assert "died before it was ready (exit code 1): a script that starts a sweep must guard it with" in done.stderr
    assert Store(tmp_path / "s.sqlite", readonly=True).counts() == {"ok": 0, "failed": 0, "claimed": 0}
