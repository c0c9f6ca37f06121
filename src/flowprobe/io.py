"""Files: atomic writes, JSON, safetensors tensors and flow weights, checksums.

Every file flowprobe writes goes through :func:`atomic_write`: a temporary file next to the target
(named ``.<name>.flowprobe-<random>.tmp``, so it can never be mistaken for one of the user's files)
is written, flushed to disk and renamed over the target, so a reader or a killed process never sees
half a file. Loading uses JSON and safetensors only: nothing is ever unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "CorruptFileError",
    "TEMP_MARK",
    "append_line",
    "atomic_write",
    "is_temporary",
    "load_state",
    "load_tensors",
    "load_weights",
    "read_json",
    "save_tensors",
    "save_weights",
    "sha256_file",
    "write_json",
]

TEMP_MARK = ".flowprobe-"
"""Part of the name of every temporary file flowprobe writes (and the only ones it ever removes)."""


class CorruptFileError(ValueError):
    """A file that exists but does not hold what its checksum or format promises."""


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` (left behind by a killed process)."""
    return path.name.startswith(".") and TEMP_MARK in path.name and path.name.endswith(".tmp")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk, rename it to ``path``.

    Raises:
        IsADirectoryError: ``path`` is a directory.
        NotADirectoryError: a parent of ``path`` is a file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, expected a file name")
    _make_directory(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{path} (or a parent of it) is a file, expected a directory") from None


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (``NaN`` and infinities are refused: they are not JSON).

    Raises:
        ValueError: ``obj`` holds a non-finite float.
    """
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a one-line ``FileNotFoundError``/``CorruptFileError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON: {err}") from None


def append_line(path: str | Path, record: dict) -> None:
    """Append ``record`` as one JSON line with a single ``write`` (a killed run never leaves half a line)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, allow_nan=False) + "\n").encode())
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors to a safetensors file atomically; returns the file's SHA-256."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return sha256_file(path)


def load_tensors(path: str | Path, sha256: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, checked against ``sha256`` when given.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: a checksum mismatch or not a safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CorruptFileError(f"{path} does not match its recorded SHA-256 (corrupt or changed file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CorruptFileError(f"{path} is not a valid safetensors file: {err}") from None


def save_weights(flow: Any, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write a flow's ``state_dict`` to a safetensors file atomically; returns its SHA-256."""
    return save_tensors(path, dict(flow.state_dict()), metadata)


def load_weights(flow: Any, path: str | Path, sha256: str | None = None) -> Any:
    """Load weights written by :func:`save_weights` into ``flow`` (safetensors: nothing is unpickled).

    Raises:
        ValueError: the file does not match the flow's parameter names or shapes.
        CorruptFileError: the file is not safetensors or fails its checksum.
    """
    tensors, _ = load_tensors(path, sha256)
    load_state(flow, tensors, f"weights in {path}")
    return flow


def load_state(flow: Any, tensors: dict[str, Tensor], what: str) -> None:
    """``flow.load_state_dict(tensors)`` after checking names, shapes and that every value is finite.

    Raises:
        ValueError: naming ``what`` and the problem.
    """
    own = flow.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise ValueError(f"{what} do not match the flow (different spec or dimension)")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CorruptFileError(f"{what} hold non-finite values (first: {bad[0]})")
    flow.load_state_dict(tensors)
