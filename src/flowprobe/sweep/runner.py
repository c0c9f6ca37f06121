"""``run_sweep``: run a sweep's missing runs on an executor and commit each one to the store as it ends."""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flowprobe.sweep.executors import Executor, InProcessExecutor, LocalExecutor, RayExecutor, Task
from flowprobe.sweep.grid import Run, Sweep, resolve_fn
from flowprobe.sweep.progress import Progress
from flowprobe.sweep.store import Store

__all__ = ["SweepSummary", "run_sweep"]

_RAY_ADDRESS = re.compile(r"local|auto|(ray://)?[\w.\-\[\]:]+:\d+")
_WAIT_S = 1.0


@dataclass(frozen=True)
class SweepSummary:
    """What one ``run_sweep`` call did.

    Attributes:
        name: the sweep's name.
        store: the store's path.
        total: runs in the sweep.
        skipped: runs already recorded when the call began (and not retried).
        ran: runs this call executed and recorded.
        ok: runs of the sweep recorded ``ok`` when the call ended.
        failed: runs of the sweep recorded ``failed`` when the call ended.
        elsewhere: runs left unfinished because another live process had claimed them.
        wall_s: the call's wall time in seconds.
    """

    name: str
    store: str
    total: int
    skipped: int
    ran: int
    ok: int
    failed: int
    elsewhere: int
    wall_s: float


class _Heartbeat(threading.Thread):
    """Refreshes this process's heartbeat in the store, on its own connection, until stopped."""

    def __init__(self, path: Path, owner: str, every: float) -> None:
        super().__init__(name="flowprobe-sweep-heartbeat", daemon=True)
        self._path, self._owner, self._every = path, owner, every
        self._done = threading.Event()

    def run(self) -> None:
        with Store(self._path) as store:
            while not self._done.wait(self._every):
                try:
                    store.heartbeat(self._owner)
                except sqlite3.OperationalError:  # the store stayed locked past its timeout: beat again later
                    continue

    def stop(self) -> None:
        self._done.set()
        self.join()


def _check_arguments(
    sweep: Sweep, workers: int | None, ray_address: str | None, threads: int, stale_after: float
) -> None:
    if not isinstance(sweep, Sweep):
        raise ValueError(f"expected a Sweep, got {type(sweep).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be a non-negative int or None, got {workers!r}")
    if ray_address is not None and (not isinstance(ray_address, str) or not _RAY_ADDRESS.fullmatch(ray_address)):
        raise ValueError(f"ray_address must be 'local', 'auto', 'host:port' or 'ray://host:port', got {ray_address!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if not stale_after > 0:
        raise ValueError(f"stale_after must be positive, got {stale_after!r}")


def _executor(workers: int | None, ray_address: str | None) -> Executor:
    if ray_address is not None:
        return RayExecutor(ray_address, workers)
    size = (os.cpu_count() or 1) if workers is None else workers
    return LocalExecutor(size) if size > 1 else InProcessExecutor()


def run_sweep(
    sweep: Sweep,
    store: str | os.PathLike[str],
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    threads: int = 1,
    retry_failed: bool = False,
    allow_mismatch: bool = False,
    progress: bool | TextIO = True,
    best: Callable[[dict[str, Any]], str | None] | None = None,
    stale_after: float = 60.0,
) -> SweepSummary:
    """Run the runs of ``sweep`` that ``store`` lacks, committing each row as its run ends.

    Runs already recorded are skipped (failed ones too, unless ``retry_failed``). Several processes may
    run the same sweep on one store at once: each claims the keys it starts, skips keys claimed by a
    live process, and takes over the claims of a dead one; should a key still run twice (a claim taken
    for dead while alive), the first ``ok`` row is kept and the other dropped. A process killed at any
    point loses only its runs in flight.

    Args:
        sweep: the runs.
        store: path of the SQLite store (created if missing).
        workers: runs at once: 0 or 1 runs them in this process (debugging), N > 1 in N spawned worker
            processes; default ``os.cpu_count()``. With ``ray_address``: at most this many Ray tasks at
            once (and the CPUs of a local instance).
        ray_address: run on Ray: ``"local"`` (start a local instance), ``"auto"``, ``"host:port"`` or
            ``"ray://host:port"``. Needs ``pip install 'flowprobe[ray]'``.
        threads: torch threads per run, the same for every executor (so that numbers agree).
        retry_failed: run again the runs recorded as failed.
        allow_mismatch: write to a store that holds another sweep (name, function or seed).
        progress: show a progress line on stderr (True), on the given stream, or not at all (False).
        best: called in this process with every finished run's row of the sweep (recorded ones first, once
            each); the last string it returned is shown on the progress line as ``best: ...``.
        stale_after: seconds without a heartbeat after which another host's claims are taken over.

    Returns:
        What this call did, with the counts of the sweep's runs in the store.

    Raises:
        ValueError: bad arguments, a run function that cannot be imported, an unusable store or one holding
            another sweep, Ray missing or unreachable.
    """
    _check_arguments(sweep, workers, ray_address, threads, stale_after)
    begin = time.perf_counter()
    resolve_fn(sweep.fn)
    stream = sys.stderr if progress is True else (progress or None)
    with Store(store) as db:
        db.bind(sweep.definition(), allow_mismatch=allow_mismatch)
        session = _Session(sweep, db, threads, retry_failed, stale_after, best, stream)
        skipped = len(session.status)
        owner = beat = executor = None
        try:
            if session.pending:
                owner = db.register()
                beat = _Heartbeat(db.path, owner, stale_after / 12)
                beat.start()
                executor = _executor(workers, ray_address)
                session.drive(executor, owner)
        finally:
            if executor is not None:
                executor.close()
            if beat is not None:
                beat.stop()
            if owner is not None:
                db.release(owner)
            session.show(final=True)
        statuses = list(session.status.values())
        return SweepSummary(
            name=sweep.name,
            store=str(db.path),
            total=len(sweep),
            skipped=skipped,
            ran=session.ran,
            ok=statuses.count("ok"),
            failed=statuses.count("failed"),
            elsewhere=len(session.elsewhere),
            wall_s=time.perf_counter() - begin,
        )


class _Session:
    """The state of one ``run_sweep`` call: what is recorded, pending, in flight, and the progress line."""

    def __init__(
        self,
        sweep: Sweep,
        db: Store,
        threads: int,
        retry_failed: bool,
        stale_after: float,
        best: Callable[[dict[str, Any]], str | None] | None,
        stream: TextIO | None,
    ) -> None:
        self.sweep, self.db, self.threads, self.stale_after, self.best = sweep, db, threads, stale_after, best
        self.by_key = {run.key: run for run in sweep}
        recorded = {key: value for key, value in db.finished().items() if key in self.by_key}
        failed = {key: n for key, (status, n) in recorded.items() if status == "failed"}
        self.retry = failed if retry_failed else {}
        self.status = {key: status for key, (status, _) in recorded.items() if key not in self.retry}
        self.pending: deque[Run] = deque(run for run in sweep if run.key not in self.status)
        self.in_flight: set[str] = set()
        self.elsewhere: list[str] = []
        self.ran = 0
        self.note: str | None = None
        self.reporter = Progress(sweep.name, len(sweep), stream) if stream else None
        if best is not None:
            for row in db.rows():
                if row["key"] in self.status:
                    self.finished(row)
        self.show()

    def finished(self, row: dict[str, Any]) -> None:
        """Count a finished run of the sweep and hand it to ``best``."""
        self.status[row["key"]] = row["status"]
        if self.best is not None:
            self.note = self.best(row) or self.note

    def show(self, final: bool = False) -> None:
        """Update the progress line."""
        if self.reporter is not None:
            failed = sum(status == "failed" for status in self.status.values())
            self.reporter.update(len(self.status), failed, len(self.in_flight), self.note, final=final)

    def _submit(self, executor: Executor, owner: str, deferred: list[str]) -> int:
        """Claim and submit pending runs while the executor has room; returns how many were submitted."""
        submitted = 0
        while self.pending and executor.free() > 0:
            batch = [self.pending.popleft() for _ in range(min(executor.free(), len(self.pending)))]
            claimed, done, busy = self.db.claim(owner, [run.key for run in batch], self.retry, self.stale_after)
            for key in done:  # recorded meanwhile by another process
                self.finished(self.db.row(key))  # type: ignore[arg-type]
            deferred.extend(busy)
            for key in claimed:
                executor.submit(Task(key, self.sweep.fn, self.by_key[key].seed, self.threads))
                self.in_flight.add(key)
            submitted += len(claimed)
        return submitted

    def drive(self, executor: Executor, owner: str) -> None:
        """Run the pending runs, recording each outcome as it comes.

        Keys claimed by another live process are set aside and claimed again once this process is idle;
        those still claimed then are left to their process and counted in ``elsewhere``.
        """
        deferred: list[str] = []
        recheck = False
        while True:
            submitted = self._submit(executor, owner, deferred)
            if recheck and not submitted:  # every key set aside is still claimed by a live process
                self.elsewhere.extend(deferred)
                return
            recheck = False
            if self.in_flight:
                for outcome in executor.wait(_WAIT_S):
                    row = self.db.record(owner, {**outcome, "executor": executor.kind})
                    self.in_flight.discard(row["key"])
                    self.ran += 1
                    self.finished(row)
                self.show()
                continue
            if not deferred:
                return
            self.pending.extend(self.by_key[key] for key in deferred)
            deferred.clear()
            recheck = True
