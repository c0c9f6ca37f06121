"""A sweep's result store: one SQLite file (standard library, WAL mode), one row per finished run.

Tables:

- ``meta(name, value)``: JSON values — ``format`` ("flowprobe-sweep"), ``schema``, ``created_at``,
  ``created_by`` (flowprobe version) and, once a sweep has run on it, that sweep's ``name``, ``fn``,
  ``seed`` (its identity: another sweep is refused), ``grid``, ``fixed`` and ``updated_at``.
- ``runs``: one row per finished run, written by one transaction when the run ends (see ``COLUMNS``).
  ``status`` is ``ok`` (``result`` holds the run's JSON) or ``failed`` (``error`` holds one line,
  ``traceback`` the rest); ``attempts`` counts the runs of a key that were recorded.
- ``owners`` / ``claims``: the sweep processes working on the store (host, pid, heartbeat) and the
  keys each has in flight, so that concurrent processes do not run a key twice. A claim whose owner
  is dead (same host and its pid gone, or no heartbeat for ``stale_after`` seconds) is taken over.

A process killed by ``kill -9`` loses only the runs it had in flight: every row is committed when its
run ends, and its claims are taken over by the next process. Readers may open the store read-only
while sweeps write (WAL lets readers and one writer proceed together).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flowprobe import __version__

__all__ = ["COLUMNS", "HOST", "Store", "format_table", "utc_now"]

FORMAT = "flowprobe-sweep"
SCHEMA_VERSION = 1
IDENTITY = ("name", "fn", "seed")
HOST = socket.gethostname()

COLUMNS = (
    "key",
    "params",
    "seed",
    "status",
    "result",
    "error",
    "traceback",
    "wall_s",
    "host",
    "pid",
    "executor",
    "started_at",
    "finished_at",
    "attempts",
    "flowprobe_version",
    "torch_version",
)
"""The columns of ``runs``, in order; ``Store.rows`` returns dicts with these keys."""

_TABLES = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE runs (
        key TEXT PRIMARY KEY,
        params TEXT NOT NULL,
        seed INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        result TEXT,
        error TEXT,
        traceback TEXT,
        wall_s REAL NOT NULL,
        host TEXT,
        pid INTEGER,
        executor TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        flowprobe_version TEXT NOT NULL,
        torch_version TEXT NOT NULL
    )""",
    """CREATE TABLE owners (
        owner TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started_at TEXT NOT NULL,
        heartbeat REAL NOT NULL
    )""",
    "CREATE TABLE claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, claimed_at REAL NOT NULL)",
)
_STATUSES = ("ok", "failed")


def utc_now() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (POSIX; elsewhere only heartbeats tell)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A sweep store: read it with ``rows`` / ``table``; sweeps write it through ``run_sweep``.

    Args:
        path: the SQLite file; created (with its parent folders) unless ``readonly``.
        readonly: open without writing (for reports, while a sweep may be writing).
        timeout: seconds to wait for another process's write lock before failing.

    Raises:
        ValueError: ``path`` is a directory, is not a SQLite file, is a SQLite file that is not a sweep store,
            has an unknown schema, or (``readonly``) does not exist.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if self.path.is_dir():
            raise ValueError(f"sweep store {self.path} is a directory, not a file")
        if readonly and not self.path.is_file():
            raise ValueError(f"no sweep store at {self.path}")
        try:
            if readonly:
                uri = self.path.resolve().as_uri() + "?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except (sqlite3.Error, OSError) as err:
            raise ValueError(f"cannot open sweep store {self.path}: {err}") from None
        try:
            if not readonly:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes
                with self._write():
                    self._create()
            self._check_format()
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise ValueError(f"{self.path} is not a sweep store ({err})") from None
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (``BEGIN IMMEDIATE``) so that it cannot deadlock."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _create(self) -> None:
        """Create the tables in an empty database; leave an existing one to ``_check_format``."""
        if self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            return
        for statement in _TABLES:
            self._conn.execute(statement)
        self._set_meta({"format": FORMAT, "schema": SCHEMA_VERSION, "created_at": utc_now(), "created_by": __version__})

    def _check_format(self) -> None:
        tables = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables or self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path} is a SQLite database but not a sweep store")
        if self.meta.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{self.path} has sweep store schema {self.meta.get('schema')}, not {SCHEMA_VERSION}")

    def _set_meta(self, values: Mapping[str, Any]) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
            [(name, json.dumps(value)) for name, value in values.items()],
        )

    @property
    def meta(self) -> dict[str, Any]:
        """The ``meta`` table as a dict of decoded JSON values."""
        return {name: json.loads(value) for name, value in self._conn.execute("SELECT name, value FROM meta")}

    # --- used by run_sweep -------------------------------------------------------------------------

    def bind(self, definition: Mapping[str, Any], *, allow_mismatch: bool = False) -> None:
        """Record a sweep's definition, refusing a store that holds another sweep.

        Args:
            definition: ``Sweep.definition()``; its ``name``, ``fn`` and ``seed`` are the identity.
            allow_mismatch: record it even over another sweep's identity (the rows stay).

        Raises:
            ValueError: the store belongs to a sweep of another name, function or seed.
        """
        with self._write():
            meta = self.meta
            if "name" in meta and not allow_mismatch:
                theirs = {k: meta[k] for k in IDENTITY}
                ours = {k: definition[k] for k in IDENTITY}
                if theirs != ours:
                    raise ValueError(
                        f"store {self.path} holds sweep {_describe(theirs)}, not {_describe(ours)}: "
                        "use another store, or allow_mismatch=True to add to it"
                    )
            self._set_meta({**definition, "updated_at": utc_now()})

    def finished(self) -> dict[str, tuple[str, int]]:
        """``{key: (status, attempts)}`` of every recorded run."""
        return {key: (status, n) for key, status, n in self._conn.execute("SELECT key, status, attempts FROM runs")}

    def register(self) -> str:
        """Enter this process as an owner of claims; returns its owner id."""
        owner = f"{HOST}:{os.getpid()}:{time.time_ns()}"
        self.heartbeat(owner)
        return owner

    def heartbeat(self, owner: str) -> None:
        """Tell other processes that ``owner`` is alive (re-entering it if it was taken for dead)."""
        with self._write():
            self._conn.execute(
                "INSERT INTO owners (owner, host, pid, started_at, heartbeat) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat",
                (owner, HOST, os.getpid(), utc_now(), time.time()),
            )

    def claim(
        self, owner: str, keys: Sequence[str], retry: Mapping[str, int], stale_after: float
    ) -> tuple[list[str], list[str], list[str]]:
        """Claim the keys that still need a run, in one transaction.

        Args:
            owner: this process's owner id.
            keys: candidate keys.
            retry: ``{key: attempts}`` of failed runs to run again while their row still has that many attempts.
            stale_after: seconds without a heartbeat after which an owner on another host is taken for dead.

        Returns:
            ``(claimed, finished, busy)``: keys now claimed by ``owner``, keys recorded meanwhile, keys
            claimed by another live process.
        """
        claimed, finished, busy = [], [], []
        now = time.time()
        with self._write():
            self._reap(owner, now - stale_after)
            for key in keys:
                row = self._conn.execute("SELECT status, attempts FROM runs WHERE key = ?", (key,)).fetchone()
                if row is not None and not (row[0] == "failed" and retry.get(key) == row[1]):
                    finished.append(key)
                    continue
                holder = self._conn.execute("SELECT owner FROM claims WHERE key = ?", (key,)).fetchone()
                if holder is not None and holder[0] != owner:
                    busy.append(key)
                    continue
                self._conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key, owner, now))
                claimed.append(key)
        return claimed, finished, busy

    def _reap(self, owner: str, oldest_beat: float) -> None:
        """Drop the owners (and their claims) that are dead: on this host with no process, or silent."""
        for other, host, pid, beat in self._conn.execute("SELECT owner, host, pid, heartbeat FROM owners").fetchall():
            if other != owner and (beat < oldest_beat or (host == HOST and not _pid_alive(pid))):
                self._conn.execute("DELETE FROM claims WHERE owner = ?", (other,))
                self._conn.execute("DELETE FROM owners WHERE owner = ?", (other,))
        self._conn.execute("DELETE FROM claims WHERE owner NOT IN (SELECT owner FROM owners)")

    def record(self, owner: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """Commit a finished run and drop its claim, in one transaction; returns the row now stored.

        A key recorded ``ok`` keeps its first row (a duplicate run is dropped); a ``failed`` row is replaced
        and its ``attempts`` incremented.
        """
        names = [c for c in COLUMNS if c != "attempts"]
        updates = ", ".join(f"{c} = excluded.{c}" for c in names if c != "key")
        with self._write():
            self._conn.execute(
                f"INSERT INTO runs ({', '.join(names)}, attempts) VALUES ({', '.join('?' * len(names))}, 1) "
                f"ON CONFLICT (key) DO UPDATE SET {updates}, attempts = runs.attempts + 1 WHERE runs.status = 'failed'",
                [row[c] for c in names],
            )
            self._conn.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (row["key"], owner))
        return self.row(row["key"])  # type: ignore[return-value]  # written just above

    def release(self, owner: str) -> None:
        """Drop ``owner`` and whatever it still claims (the end of a sweep, or its interruption)."""
        with self._write():
            self._conn.execute("DELETE FROM claims WHERE owner = ?", (owner,))
            self._conn.execute("DELETE FROM owners WHERE owner = ?", (owner,))

    # --- queries -----------------------------------------------------------------------------------

    def rows(self, *, status: str | None = None, where: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The recorded runs as dicts (``COLUMNS``; ``params`` and ``result`` decoded), ordered by key.

        Args:
            status: only ``"ok"`` or only ``"failed"`` rows; all when None.
            where: only rows whose parameters have these values, e.g. ``{"d": 4}``.

        Raises:
            ValueError: an unknown status.
        """
        if status is not None and status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES} or None, got {status!r}")
        sql = f"SELECT {', '.join(COLUMNS)} FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY key"
        rows = [_decode(values) for values in self._conn.execute(sql, (status,) if status else ())]
        if where:
            rows = [r for r in rows if all(name in r["params"] and r["params"][name] == v for name, v in where.items())]
        return rows

    def row(self, key: str) -> dict[str, Any] | None:
        """The recorded run of ``key``, or None."""
        values = self._conn.execute(f"SELECT {', '.join(COLUMNS)} FROM runs WHERE key = ?", (key,)).fetchone()
        return None if values is None else _decode(values)

    def counts(self) -> dict[str, int]:
        """``{"ok": n, "failed": n, "claimed": n}``: recorded runs by status, and keys now in flight."""
        counts = dict.fromkeys((*_STATUSES, "claimed"), 0)
        counts.update(self._conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
        counts["claimed"] = self._conn.execute("SELECT count(*) FROM claims").fetchone()[0]
        return counts

    def table(
        self, *, status: str | None = "ok", where: Mapping[str, Any] | None = None
    ) -> tuple[list[str], list[list[Any]]]:
        """The runs as a flat table: one column per parameter, then ``status``, one per result, ``wall_s``.

        A result named like a parameter becomes ``result.NAME``; a run without a value leaves None.
        Format it with ``format_table``.

        Returns:
            ``(columns, values)``, one list of values per run.
        """
        rows = self.rows(status=status, where=where)
        params = list(dict.fromkeys(name for r in rows for name in r["params"]))
        results = list(dict.fromkeys(name for r in rows for name in (r["result"] or {})))
        result_columns = [f"result.{name}" if name in params else name for name in results]
        columns = [*params, "status", *result_columns, "wall_s"]
        values = [
            [
                *(r["params"].get(name) for name in params),
                r["status"],
                *((r["result"] or {}).get(name) for name in results),
                r["wall_s"],
            ]
            for r in rows
        ]
        return columns, values


def _describe(identity: Mapping[str, Any]) -> str:
    return f"{identity['name']!r} (fn {identity['fn']}, seed {identity['seed']})"


def _decode(values: Sequence[Any]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, values))
    row["params"] = json.loads(row["params"])
    row["result"] = None if row["result"] is None else json.loads(row["result"])
    return row


def format_table(columns: Sequence[str], values: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: floats to 6 significant digits, None as '-', columns left-aligned."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.6g}"
        return value if isinstance(value, str) else json.dumps(value)

    cells = [list(columns), *([cell(v) for v in row] for row in values)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in cells)
