"""Output and run directories: one writer at a time, a record of what flowprobe wrote, safe replacement.

Every command that writes into a directory holds it through an :class:`OutputDir` for its whole
life. Its bookkeeping lives in ``DIR/.flowprobe/``:

* ``lock``: ``fcntl.flock``-ed by the writer (the operating system releases it when the process
  ends, ``kill -9`` included); it holds the writer's pid, host, command and start time, which a
  second writer names when it is refused.
* ``manifest.json``: every file flowprobe wrote in ``DIR``, with its SHA-256 once it is complete
  (``null`` while it is written or for files that grow, like ``history.jsonl``). A name that is
  not in the manifest is the user's: flowprobe never replaces or deletes it.
* ``staging/``: a new training run's files until its first checkpoint (:class:`RunWriter`), so an
  old run in ``DIR`` survives a new run that fails early.
* ``commit.json``: the journal of moving a staged run into ``DIR``; the next writer finishes an
  interrupted one, readers wait while it exists.

Readers (:func:`load_run`) take no lock: they load the finished weights or, while a run is in
progress, the last complete checkpoint, and check that every file belongs to the same run.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowprobe.io import (
    CorruptFileError,
    append_line,
    atomic_write,
    is_temporary,
    load_state,
    load_tensors,
    read_json,
    save_tensors,
    save_weights,
    sha256_file,
    write_json,
)

__all__ = [
    "DirectoryBusyError",
    "OutputDir",
    "RunWriter",
    "check_probe",
    "load_run",
    "new_run_id",
    "probe_outputs",
    "run_config",
    "state_checksum",
]

META = ".flowprobe"
MANIFEST_FORMAT = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}
RUN_FILES = ("config.json", "history.jsonl", "checkpoint.json", "weights.safetensors", "results.json",
             "training.png", "density.png", "stages.png")
"""Names a training run writes (besides ``checkpoint-<step>.safetensors``)."""
PROBE_POINTS = 8
READ_ATTEMPTS = 60  # a reader waits up to 3 s for a writer to finish moving files
READ_PAUSE = 0.05


class DirectoryBusyError(ValueError):
    """Another process is writing the directory."""


class _ChangingError(Exception):
    """The run directory changed under a reader (a checkpoint replaced, a run being moved in)."""


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"flowprobe {h['command']} (pid {h['pid']} on host {h['host']}, since {h['since']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another flowprobe process"


def _plain_name(name: object) -> bool:
    """Whether ``name`` names a file directly inside the directory (no path, not the bookkeeping)."""
    return isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..", META)


class OutputDir:
    """A directory flowprobe writes files into, locked for the life of the writer.

    Use as a context manager; :meth:`claim` a name before writing it.

    Args:
        path: The directory (created if missing).
        command: What is writing (named to a second writer that is refused).
    """

    def __init__(self, path: str | Path, command: str) -> None:
        self.path = Path(path)
        self.command = command
        self.files: dict[str, str | None] = {}
        self.staged: dict[str, str | None] | None = None
        self._fd: int | None = None

    @property
    def meta(self) -> Path:
        """The bookkeeping directory ``DIR/.flowprobe``."""
        return self.path / META

    @property
    def dir(self) -> Path:
        """Where files go now (a training run's staging directory until its first checkpoint)."""
        return self.meta / "staging" if self.staged is not None else self.path

    def __enter__(self) -> OutputDir:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the directory if needed, take its lock and read its manifest.

        Raises:
            NotADirectoryError: the path is a file.
            DirectoryBusyError: another process holds the lock.
        """
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"{self.path} is a file, expected a directory")
        try:
            self.meta.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"{self.path} (or a parent of it) is a file, expected a directory") from None
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise DirectoryBusyError(f"{self.path} is being written by {_holder_text(holder)}; "
                                "wait for it to end or choose another directory") from None
        self._fd = fd
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": since})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        try:
            self.files = self._read_manifest()
            self._finish_commit()
        except BaseException:
            self.close()
            raise
        for path in self.path.iterdir():
            if is_temporary(path):  # left by a killed writer of ours; never read by anyone
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read_manifest(self) -> dict[str, str | None]:
        path = self.meta / "manifest.json"
        if not path.is_file():
            return {}
        manifest = read_json(path)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, str | None) for v in files.values()) \
                or not all(_plain_name(n) for n in files):
            raise CorruptFileError(f"{path} is not a flowprobe manifest")
        return files

    def _save_manifest(self) -> None:
        write_json(self.meta / "manifest.json", {"format": MANIFEST_FORMAT, "files": self.files})

    def _finish_commit(self) -> None:
        """Finish moving a staged run in if a writer was killed while doing it."""
        journal_path = self.meta / "commit.json"
        if journal_path.is_file():
            journal = read_json(journal_path)
            names = [*journal.get("delete", []), *journal.get("move", []), *journal.get("files", {})] \
                if isinstance(journal, dict) else [None]
            if not all(_plain_name(n) for n in names) or not isinstance(journal.get("files"), dict):
                raise CorruptFileError(f"{journal_path} is not a flowprobe journal (names outside the directory?)")
            self._apply(journal)

    def _apply(self, journal: dict[str, Any]) -> None:
        """Delete the old run's files, move the staged ones in, record them (idempotent)."""
        staging = self.meta / "staging"
        for name in journal["delete"]:
            (self.path / name).unlink(missing_ok=True)
        for name in journal["move"]:
            if (staging / name).exists():
                os.replace(staging / name, self.path / name)
        self.files = dict(journal["files"])
        self._save_manifest()
        shutil.rmtree(staging, ignore_errors=True)
        (self.meta / "commit.json").unlink()
        self.staged = None

    def entries(self) -> list[str]:
        """Names in the directory besides the bookkeeping and our temporaries."""
        return sorted(p.name for p in self.path.iterdir() if p.name != META and not is_temporary(p))

    def foreign(self, names: list[str]) -> list[str]:
        """Those of ``names`` that exist in the directory but were not written by flowprobe."""
        return [n for n in names if (self.path / n).exists() and n not in self.files]

    def claim(self, name: str) -> Path:
        """The path to write ``name`` to, recorded in the manifest before it is written.

        Raises:
            ValueError: a file of that name exists and flowprobe did not write it.
        """
        path = self.path / name
        if name not in self.files:
            if path.exists() or path.is_symlink():
                raise ValueError(f"{path} exists and was not written by flowprobe; move it away or choose another "
                                 "directory (flowprobe never replaces files it did not write)")
            self.files[name] = None
            self._save_manifest()
        elif path.is_dir():
            raise IsADirectoryError(f"{path} is a directory, expected a file name")
        return path

    def seal(self, name: str, sha256: str | None) -> None:
        """Record the SHA-256 of a complete file (``None``: a file that grows or is being replaced)."""
        if self.files.get(name, "") != sha256:
            self.files[name] = sha256
            self._save_manifest()

    def forget(self, name: str) -> None:
        """Delete a file flowprobe wrote and drop it from the record."""
        record = self.staged if self.staged is not None else self.files
        if name in record:
            (self.dir / name).unlink(missing_ok=True)
            del record[name]
            if record is self.files:
                self._save_manifest()


class RunWriter(OutputDir):
    """The run directory of one training run: a new run, a resumed one, or one replacing an old run.

    A new run is written into ``.flowprobe/staging/`` and moved into the directory when it writes
    its first checkpoint; only then are the old run's files (those in the manifest) deleted.

    Args:
        path: The run directory.
        mode: ``new`` (the directory must be empty or missing), ``overwrite`` (replace a run, keep
            every file flowprobe did not write) or ``resume``.
        command: What is writing (named to a second writer that is refused).
    """

    MODES = ("new", "overwrite", "resume")

    def __init__(self, path: str | Path, mode: str = "new", command: str = "fit") -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        super().__init__(path, command)
        self.mode = mode
        self._created = False

    def open(self) -> None:
        """Lock the directory and check it suits the mode.

        Raises:
            ValueError: a non-empty directory for ``new``, a user's file in the way of ``overwrite``,
                nothing to resume for ``resume``.
            FileNotFoundError: ``resume`` of a missing directory.
        """
        if self.mode == "resume" and not self.path.is_dir():
            raise FileNotFoundError(f"no run to resume: {self.path} does not exist")
        self._created = not self.path.exists()
        if self.mode == "new":
            self._refuse_non_empty()  # before anything is created in a user's directory
        if self.mode == "overwrite" and self.path.is_dir():
            self.files = self._read_manifest()
            self._refuse_foreign()
        super().open()
        try:
            self._check_mode()
        except BaseException:
            self.close()
            raise

    def _refuse_non_empty(self) -> None:
        if self.path.is_dir() and any(p.name != META and not is_temporary(p) for p in self.path.iterdir()):
            raise ValueError(f"{self.path} is not empty; pass --resume to continue the run there or --overwrite to "
                             "replace it (files flowprobe did not write are kept)")

    def _refuse_foreign(self) -> None:
        in_the_way = self.foreign([*RUN_FILES, *(p.name for p in self.path.glob("checkpoint-*.safetensors"))])
        if in_the_way:
            raise ValueError(f"{self.path / in_the_way[0]} was not written by flowprobe; move it away or choose "
                             "another --out (flowprobe never replaces files it did not write)")

    def _check_mode(self) -> None:
        if self.mode == "resume":
            if "checkpoint.json" not in self.files or not (self.path / "checkpoint.json").is_file():
                raise FileNotFoundError(f"no flowprobe checkpoint to resume in {self.path}")
            return
        if self.mode == "new":
            self._refuse_non_empty()
        self._refuse_foreign()
        staging = self.meta / "staging"
        shutil.rmtree(staging, ignore_errors=True)  # a killed new run's files, never moved in
        staging.mkdir()
        self.staged = {}

    def close(self) -> None:
        """Drop a staged run that never reached its first checkpoint (and the directory, if this writer
        created it and it holds nothing else), release the lock."""
        if self.staged is not None and self._fd is not None:
            shutil.rmtree(self.meta / "staging", ignore_errors=True)
            self.staged = None
            if self._created and not self.entries():
                shutil.rmtree(self.path, ignore_errors=True)
        super().close()

    def claim(self, name: str) -> Path:
        """Like :meth:`OutputDir.claim`, into the staging directory while a new run is staged."""
        if self.staged is None:
            return super().claim(name)
        self.staged.setdefault(name, None)
        return self.dir / name

    def seal(self, name: str, sha256: str | None) -> None:
        """Like :meth:`OutputDir.seal`, in the staged record while a new run is staged."""
        if self.staged is None:
            super().seal(name, sha256)
        else:
            self.staged[name] = sha256

    # -- files of a run --
    def write_json(self, name: str, obj: Any) -> None:
        """Write a JSON file of the run."""
        path = self.claim(name)
        write_json(path, obj)
        self.seal(name, sha256_file(path))

    def append_history(self, record: dict) -> None:
        """Append one record to ``history.jsonl``."""
        append_line(self.claim("history.jsonl"), record)

    def truncate_history(self, keep: int) -> list[dict]:
        """Keep the first ``keep`` lines of ``history.jsonl`` (those of the checkpoint) and return them.

        Raises:
            CorruptFileError: fewer lines than the checkpoint counted, or a line that is not JSON.
        """
        path = self.claim("history.jsonl")
        lines = path.read_text().splitlines() if path.is_file() else []
        if len(lines) < keep:
            raise CorruptFileError(f"corrupt checkpoint in {self.path}: history.jsonl has {len(lines)} records, "
                              f"the checkpoint counts {keep}")
        try:
            records = [json.loads(line) for line in lines[:keep]]
        except json.JSONDecodeError:
            raise CorruptFileError(f"corrupt checkpoint in {self.path}: history.jsonl is not JSON lines") from None
        text = "".join(line + "\n" for line in lines[:keep])
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return records

    def save_checkpoint(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Write the tensors, then ``checkpoint.json`` naming them with their SHA-256 and a checksum of
        its own; delete the previous checkpoint's tensors; move a staged run in."""
        name = f"checkpoint-{state['step']:08d}.safetensors"
        path = self.claim(name)
        sha = save_tensors(path, tensors)
        self.seal(name, sha)
        state = state | {"tensors": name, "sha256": sha}
        self.write_json("checkpoint.json", state | {"checksum": state_checksum(state)})
        record = self.staged if self.staged is not None else self.files
        for old in [n for n in record if n.startswith("checkpoint-") and n != name]:
            self.forget(old)
        if self.staged is not None:
            self._commit()

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The checkpoint's state and tensors, checksums verified.

        Raises:
            CorruptFileError: "corrupt checkpoint …" naming the file that fails.
        """
        return _read_checkpoint(self.path)

    def save_weights(self, flow: Any, metadata: dict[str, str]) -> None:
        """Write ``weights.safetensors``; the manifest holds its SHA-256 only once it is complete."""
        path = self.claim("weights.safetensors")
        self.seal("weights.safetensors", None)
        self.seal("weights.safetensors", save_weights(flow, path, metadata))

    # -- replacing a run --
    def _commit(self) -> None:
        assert self.staged is not None
        moves = sorted(self.staged, key=lambda n: n == "checkpoint.json")  # checkpoint.json last
        journal = {"delete": [n for n in self.files if n not in self.staged], "move": moves, "files": self.staged}
        write_json(self.meta / "commit.json", journal)
        self._apply(journal)



def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a JSON-ready dict in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(state, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _read_checkpoint(run: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    where = f"corrupt checkpoint in {run}"
    try:
        state = read_json(run / "checkpoint.json")
    except CorruptFileError:
        raise CorruptFileError(f"{where}: checkpoint.json is not valid JSON") from None
    if not isinstance(state, dict) or not isinstance(state.get("checksum"), str):
        raise CorruptFileError(f"{where}: checkpoint.json has no checksum (not written by this version of flowprobe?)")
    body = {k: v for k, v in state.items() if k != "checksum"}
    try:
        intact = state_checksum(body) == state["checksum"]
    except (TypeError, ValueError):
        intact = False
    if not intact:
        raise CorruptFileError(f"{where}: checkpoint.json fails its checksum")
    name, sha = state.get("tensors"), state.get("sha256")
    if not (isinstance(name, str) and isinstance(sha, str) and Path(name).name == name):
        raise CorruptFileError(f"{where}: checkpoint.json does not name its tensor file")
    try:
        tensors, _ = load_tensors(run / name, sha)
    except CorruptFileError:
        raise CorruptFileError(f"{where}: {name} fails its checksum") from None
    return state, tensors


# -- reading a run ------------------------------------------------------------------------------------


def run_config(run: str | Path) -> dict[str, Any]:
    """``config.json`` of a run directory, checked: ``flow`` (spec), ``dim``, ``dtype``, ``fit`` and, if
    present, ``target``.

    Raises:
        FileNotFoundError: no such directory or no ``config.json``.
        ValueError: a field is missing or has the wrong type.
    """
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    if not (run / "config.json").is_file() and (run / META).is_dir():
        raise FileNotFoundError(f"{run} holds no run yet (a new run there is staged until its first checkpoint)")
    config = read_json(run / "config.json")
    where = f"{run / 'config.json'} is not a flowprobe run configuration"
    if not isinstance(config, dict):
        raise ValueError(f"{where} (not a JSON object)")
    if "flow" not in config:
        raise ValueError(f"{run / 'config.json'} records no flow spec (a run trained from Python without "
                         "meta={'flow': spec}); load its weights into your flow with flowprobe.io.load_weights")
    checks = {"flow": isinstance(config.get("flow"), str),
              "dim": isinstance(config.get("dim"), int) and not isinstance(config.get("dim"), bool)
              and config.get("dim", 0) >= 1,
              "dtype": config.get("dtype", "float32") in DTYPES,
              "target": isinstance(config.get("target", {}), dict),
              "fit": isinstance(config.get("fit"), dict)}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        value = config.get(bad[0])
        expected = {"dtype": " (expected float32 or float64)", "dim": " (expected a positive integer)"}
        raise ValueError(f"{where}: bad or missing {bad[0]!r}: {value!r}{expected.get(bad[0], '')}")
    return config


def probe_outputs(flow: Any) -> Tensor:
    """``(x, logdet, log q(z))`` of the flow at fixed probe points ``z``, as one ``(PROBE_POINTS, dim + 2)``
    float64 tensor (``(*E, PROBE_POINTS, dim + 2)`` for an ensemble): a fingerprint of the function the
    weights and the spec compute together, the source's log-density included."""
    anchor = next(flow.parameters())
    z = torch.randn(PROBE_POINTS, flow.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                    device="cpu").to(device=anchor.device, dtype=anchor.dtype)
    with torch.no_grad():
        x, logdet = flow(z)
        log_q = flow.base.log_prob(z).expand(logdet.shape)
    return torch.stack([*x.unbind(-1), logdet, log_q], -1).to(device="cpu", dtype=torch.float64)


def check_probe(flow: Any, recorded: Tensor, what: str) -> None:
    """Refuse weights whose flow does not reproduce the recorded probe outputs (recorded before the
    source's column existed, ``dim + 1`` columns: the layers' only).

    Raises:
        ValueError: the flow computes another function (a changed spec, e.g. another activation or source).
    """
    now = probe_outputs(flow)
    if recorded.shape[-1] == now.shape[-1] - 1:
        now = now[..., :-1]
    tol = 1e-4 if next(flow.parameters()).dtype == torch.float32 else 1e-9
    if recorded.shape != now.shape or not torch.allclose(now, recorded.to(torch.float64), rtol=tol, atol=tol):
        raise ValueError(f"{what} were written by a different flow (its outputs at the probe points differ): "
                         "the flow spec, activation or source changed")


def load_run(run: str | Path) -> tuple[Any, dict[str, Any]]:
    """The trained flow of a run directory and its ``config.json``, without importing any code.

    A finished run gives its final weights (``weights.safetensors``); a run in progress gives its last
    complete checkpoint (the best weights so far with a validation split, else the latest). Checksums
    are verified and every file must belong to the same run.

    Args:
        run: The directory written by ``fit(..., out=DIR)`` or ``flowprobe fit --out DIR``.

    Returns:
        ``(flow, config)``: the flow on the CPU in the run's dtype, and the run's settings (flow spec,
        dimension, dtype, target, training settings).

    Raises:
        FileNotFoundError: no run directory or no weights or checkpoint yet.
        ValueError: a malformed configuration, corrupt or mismatched files.
    """
    run = Path(run)
    error: Exception | None = None
    for _ in range(READ_ATTEMPTS):
        if (run / META / "commit.json").exists():  # a new run is being moved in
            time.sleep(READ_PAUSE)
            continue
        try:
            return _load_run_once(run)
        except _ChangingError as err:
            error = err
            time.sleep(READ_PAUSE)
    if error is None:
        raise ValueError(f"{run} holds an interrupted replacement of its run; `flowprobe fit --resume {run}` "
                         "finishes it")
    raise ValueError(f"{run}: {error}")


def _load_run_once(run: Path) -> tuple[Any, dict[str, Any]]:
    from flowprobe.spec import build_flow

    config = run_config(run)
    try:
        flow = build_flow(config["flow"], config["dim"], DTYPES[config.get("dtype", "float32")],
                          ensemble=tuple(config.get("ensemble", ())))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{run / 'config.json'}: {err}") from None
    run_id = config.get("run_id")
    manifest = _manifest(run)
    weights = run / "weights.safetensors"
    if weights.is_file() and (run_id is None or manifest.get("weights.safetensors")):
        try:
            tensors, metadata = load_tensors(weights, manifest.get("weights.safetensors"))
        except FileNotFoundError:
            raise _ChangingError("weights.safetensors vanished while being read") from None
        if run_id is not None and metadata.get("run_id") != run_id:
            raise _ChangingError("weights.safetensors and config.json belong to different runs")
        load_state(flow, tensors, f"weights in {weights}")
        if "probe" in metadata:
            check_probe(flow, torch.tensor(json.loads(metadata["probe"]), dtype=torch.float64), f"weights in {weights}")
        return flow, config
    if not (run / "checkpoint.json").is_file():
        raise FileNotFoundError(f"{run} has no weights or checkpoint yet")
    try:
        state, tensors = _read_checkpoint(run)
    except (FileNotFoundError, CorruptFileError) as err:
        if run_id is not None and _manifest(run) != manifest:
            raise _ChangingError("a checkpoint was replaced while being read") from None
        raise err from None
    if run_id is not None and state.get("config", {}).get("run_id") != run_id:
        raise _ChangingError("checkpoint.json and config.json belong to different runs")
    prefix = "best." if any(k.startswith("best.") for k in tensors) else "flow."
    load_state(flow, {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
               f"checkpoint tensors in {run}")
    if prefix == "flow." and "probe" in tensors:
        check_probe(flow, tensors["probe"], f"checkpoint tensors in {run}")
    return flow, config


def _manifest(run: Path) -> dict[str, str | None]:
    with contextlib.suppress(FileNotFoundError, CorruptFileError):
        manifest = read_json(run / META / "manifest.json")
        if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
            return manifest["files"]
    return {}


def new_run_id() -> str:
    """A random identifier tying a run's files together."""
    return secrets.token_hex(8)
