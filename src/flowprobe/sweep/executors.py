"""Where a sweep's runs execute: in this process, in local worker processes, or on a Ray cluster.

Every executor calls the same ``execute(task)``, which seeds Python's, NumPy's and torch's global
generators with the run's seed and sets torch's thread count to the sweep's ``threads``: a run gives
the same numbers wherever it executes. The driver (``run_sweep``) is the only process that writes the
store; executors hand it outcome dicts, one per run, shaped like a store row.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from flowprobe import __version__
from flowprobe.sweep.grid import SEED_PARAM, resolve_fn
from flowprobe.sweep.store import HOST, utc_now

__all__ = ["Executor", "InProcessExecutor", "LocalExecutor", "RayExecutor", "Task", "execute", "one_line"]

_MESSAGE_CHARS = 2000
_READY = "ready"


@dataclass(frozen=True)
class Task:
    """What a worker needs for one run: its key (the parameters' JSON), function name, seed and threads."""

    key: str
    fn: str
    seed: int
    threads: int


def one_line(err: BaseException) -> str:
    """``"Type: message"`` on one line (whitespace collapsed, cut at 2000 characters)."""
    text = " ".join(str(err).split())
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return line[:_MESSAGE_CHARS]


@contextmanager
def _seeded(seed: int, threads: int) -> Iterator[None]:
    """Seed the global generators and set torch's threads; restore all of them afterwards."""
    py_state, np_state, torch_threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_num_threads(torch_threads)


def _result_json(value: Any) -> str:
    if not isinstance(value, Mapping):
        raise TypeError(f"the run function returned a {type(value).__name__}, not a dict")
    try:
        return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"the run's result is not JSON: {err}") from None


def _outcome(task: Task, **fields: Any) -> dict[str, Any]:
    """A store row (less ``executor`` and ``attempts``) for ``task``."""
    return {
        "key": task.key,
        "params": task.key,
        "seed": task.seed,
        "result": None,
        "error": None,
        "traceback": None,
        "flowprobe_version": __version__,
        "torch_version": torch.__version__,
        "finished_at": utc_now(),
        **fields,
    }


def failed_outcome(task: Task, error: str, started_at: str, since: float, pid: int | None) -> dict[str, Any]:
    """The outcome of a run whose worker died: no result, the error as seen by the driver."""
    host = HOST if pid is not None else None
    return _outcome(
        task,
        status="failed",
        error=error,
        wall_s=time.perf_counter() - since,
        started_at=started_at,
        host=host,
        pid=pid,
    )


_resolve = functools.lru_cache(maxsize=None)(resolve_fn)


def execute(task: Task) -> dict[str, Any]:
    """Run one task and return its outcome; the run's own errors become a ``failed`` outcome.

    The run function receives the parameters decoded from the key plus ``params["_seed"]``, with the
    global generators seeded from that seed and torch set to ``task.threads`` threads. Its result must be
    a dict of JSON values (NaN and infinities allowed); anything else fails the run.
    """
    started_at = utc_now()
    start = time.perf_counter()
    result = error = trace = None
    try:
        fn = _resolve(task.fn)
        params = json.loads(task.key)
        params[SEED_PARAM] = task.seed
        with _seeded(task.seed, task.threads):
            value = fn(params)
        result = _result_json(value)
    except (Exception, SystemExit) as err:  # the run's failure is data, recorded in the store
        error, trace = one_line(err), traceback.format_exc()
    return _outcome(
        task,
        status="ok" if error is None else "failed",
        result=result,
        error=error,
        traceback=trace,
        wall_s=time.perf_counter() - start,
        started_at=started_at,
        host=HOST,
        pid=os.getpid(),
    )


class Executor(Protocol):
    """What ``run_sweep`` drives: ``submit`` while ``free() > 0``, collect outcomes with ``wait``."""

    kind: str

    def free(self) -> int:
        """How many more tasks ``submit`` accepts now."""

    def submit(self, task: Task) -> None:
        """Start a task."""

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Outcomes of tasks that finished, waiting up to ``timeout`` seconds for the first."""

    def close(self) -> None:
        """Stop: tasks still in flight are abandoned."""


class InProcessExecutor:
    """Runs each task in this process when ``wait`` is called: for debugging (breakpoints, tracebacks)."""

    kind = "inprocess"

    def __init__(self) -> None:
        self._tasks: list[Task] = []

    def free(self) -> int:
        """One task at a time."""
        return 0 if self._tasks else 1

    def submit(self, task: Task) -> None:
        """Queue the task for the next ``wait``."""
        self._tasks.append(task)

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Run the queued task now (``timeout`` does not apply)."""
        tasks, self._tasks = self._tasks, []
        return [execute(task) for task in tasks]

    def close(self) -> None:
        """Forget a queued task."""
        self._tasks.clear()


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """A local worker: say it is ready, then execute tasks from the driver until it sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    try:
        conn.send(_READY)
        while (task := conn.recv()) is not None:
            conn.send(execute(task))
    except (EOFError, OSError):  # the driver died: a run in flight is lost, as the driver's are
        return


class _Worker:
    """One spawned worker process, its pipe, and the task it runs."""

    def __init__(self, context: multiprocessing.context.SpawnContext) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), name="flowprobe-sweep-worker")
        self.process.start()
        child.close()
        self.ready = False
        self.task: Task | None = None
        self.started_at = ""
        self.since = 0.0

    def death(self, before_ready: bool = False) -> str:
        """How the process ended, for the error of the run it had."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        when = "before it was ready" if before_ready else "during the run"
        return f"WorkerDied: worker process {self.process.pid} died {when} ({how})"

    def stop(self, graceful: bool) -> None:
        if graceful:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


class LocalExecutor:
    """Runs tasks in up to ``workers`` spawned processes on this machine, started as needed.

    A worker that dies during a run (killed, out of memory, a crash in native code) fails that run
    only, with the signal or exit code as its error, and is replaced.
    """

    kind = "local"

    def __init__(self, workers: int) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._size = workers
        self._workers: list[_Worker] = []

    def free(self) -> int:
        """Workers idle or not yet started."""
        return self._size - sum(w.task is not None for w in self._workers)

    def submit(self, task: Task) -> None:
        """Send the task to an idle live worker, starting one if none is."""
        for worker in [w for w in self._workers if w.task is None and not w.process.is_alive()]:
            self._workers.remove(worker)
            worker.stop(graceful=False)
        worker = next((w for w in self._workers if w.task is None), None)
        if worker is None:
            worker = _Worker(self._context)
            self._workers.append(worker)
        worker.task, worker.started_at, worker.since = task, utc_now(), time.perf_counter()
        worker.conn.send(task)

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Outcomes from workers that answered or died.

        Raises:
            ValueError: a worker died before it was ready (typically a script that starts a sweep without
                an ``if __name__ == "__main__":`` guard, which every spawned worker re-runs).
        """
        busy = [w for w in self._workers if w.task is not None]
        if not busy:
            return []
        ready = multiprocessing.connection.wait([h for w in busy for h in (w.conn, w.process.sentinel)], timeout)
        outcomes = []
        for worker in busy:
            if worker.conn not in ready and worker.process.sentinel not in ready:
                continue
            task = worker.task
            assert task is not None
            outcome = self._receive(worker)
            if outcome is None and worker.process.is_alive():  # it only said it is ready
                continue
            if outcome is None:
                if not worker.ready:
                    raise ValueError(
                        f"{worker.death(before_ready=True)}: a script that starts a sweep must guard it with "
                        "'if __name__ == \"__main__\":' (spawned workers import the main module)"
                    )
                outcome = failed_outcome(task, worker.death(), worker.started_at, worker.since, worker.process.pid)
                self._workers.remove(worker)
                worker.stop(graceful=False)
            worker.task = None
            outcomes.append(outcome)
        return outcomes

    @staticmethod
    def _receive(worker: _Worker) -> dict[str, Any] | None:
        """The worker's outcome if it sent one (noting its ready message on the way), else None."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message != _READY:
                    return message
                worker.ready = True
        except (EOFError, OSError):  # it died
            pass
        return None

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit, busy ones terminated."""
        for worker in self._workers:
            worker.stop(graceful=worker.task is None)
        self._workers.clear()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError("the Ray executor needs Ray: pip install 'flowprobe[ray]'") from None
    return ray


def _python_path() -> str:
    """This process's import path less the interpreter's own folders, for a local Ray's workers."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.curdir)
        if os.path.isdir(path) and not any(path == p or path.startswith(p + os.sep) for p in prefixes):
            paths.append(path)
    return os.pathsep.join(dict.fromkeys(paths))


class RayExecutor:
    """Runs tasks as Ray tasks (one CPU each, no automatic retry).

    Args:
        address: ``"local"`` starts a local Ray instance (its workers see this process's import path);
            ``"auto"``, ``"host:port"`` or ``"ray://host:port"`` connect to a running cluster, whose nodes
            must be able to import flowprobe and the run function. If Ray is already initialised in this
            process, that connection is used as it is.
        workers: at most this many runs at once (and the CPUs of a local instance); default: twice the
            cluster's CPUs in flight.

    Raises:
        ValueError: Ray is not installed, or cannot be started or reached.
    """

    kind = "ray"

    def __init__(self, address: str, workers: int | None) -> None:
        ray = self._ray = _import_ray()
        self._owned = not ray.is_initialized()
        if self._owned:
            try:
                if address == "local":
                    env = {"env_vars": {"PYTHONPATH": _python_path()}}
                    cpus = workers or os.cpu_count()
                    ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env)
                else:
                    ray.init(address=address)
            except Exception as err:  # Ray's own errors: connection refused, no cluster, bad address
                raise ValueError(f"cannot start or reach Ray at {address!r}: {one_line(err)}") from None
        self._capacity = workers or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: Callable[..., Any] = ray.remote(num_cpus=1, max_retries=0)(execute)
        self._pending: dict[Any, tuple[Task, str, float]] = {}

    def free(self) -> int:
        """Tasks Ray may take before the in-flight limit."""
        return self._capacity - len(self._pending)

    def submit(self, task: Task) -> None:
        """Submit the task to Ray."""
        self._pending[self._remote.remote(task)] = (task, utc_now(), time.perf_counter())

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Outcomes of the tasks Ray has finished; a task that Ray lost (its worker died) fails."""
        refs = list(self._pending)
        if not refs:
            return []
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        outcomes = []
        for ref in ready:
            task, started_at, since = self._pending.pop(ref)
            try:
                outcomes.append(self._ray.get(ref))
            except self._ray.exceptions.RayError as err:
                first = next((line for line in str(err).splitlines() if line.strip()), "")
                error = f"{type(err).__name__}: {first.strip()}"[:_MESSAGE_CHARS]
                outcomes.append(failed_outcome(task, error, started_at, since, None))
        return outcomes

    def close(self) -> None:
        """Cancel tasks in flight; shut Ray down if this executor started it."""
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        if self._owned:
            self._ray.shutdown()
