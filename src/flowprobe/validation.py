"""Input validation shared by layers, flows and distributions.

Validation is on by default. It can be switched off globally (``flowprobe.set_validation(False)``)
or for a block (``with flowprobe.validation(False): ...``) once inputs are known to be clean, e.g.
inside a training loop whose data were checked once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "available_memory",
    "check_like",
    "check_memory",
    "check_points",
    "set_validation",
    "validation",
    "validation_enabled",
]

MEMORY_SHARE = 0.8  # a computation may use this share of the memory available when it starts

_ENABLED = True


def set_validation(enabled: bool) -> None:
    """Switch input validation on or off globally."""
    global _ENABLED
    _ENABLED = bool(enabled)


def validation_enabled() -> bool:
    """Whether input validation is currently on."""
    return _ENABLED


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that sets validation on or off for a block."""
    previous = _ENABLED
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def check_points(x: object, dim: int, name: str = "input", ensemble_shape: tuple[int, ...] = ()) -> Tensor:
    """Check that ``x`` is a finite, non-empty float tensor of shape ``(N, dim)`` (or ``(*E, N, dim)``).

    Under ``torch.compile`` only the shape and dtype are checked (they are known while tracing);
    finiteness needs the values, so it is left to eager calls.

    Args:
        x: The value to check.
        dim: The expected event dimension.
        name: What the value is, for the message.
        ensemble_shape: ``E`` of an ensemble: ``(*E, N, dim)`` is accepted besides ``(N, dim)``.

    Returns:
        ``x`` unchanged.

    Raises:
        ValueError: with a one-line message naming the problem and the expected shape.
    """
    if not _ENABLED:
        return x  # type: ignore[return-value]
    expected = f"(N, {dim})" + (f" or {(*ensemble_shape, 'N', dim)}".replace("'", "") if ensemble_shape else "")
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    batched = ensemble_shape and x.dim() == len(ensemble_shape) + 2 and tuple(x.shape[:-2]) == tuple(ensemble_shape)
    if not (x.dim() == 2 or batched) or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"{name} is an empty batch; expected shape {expected} with N >= 1")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if torch.compiler.is_compiling():  # the finiteness check is a host sync: a graph break per call
        return x
    if bool(torch.isfinite(x.sum())):  # one read-only pass: a finite sum means every value is finite
        return x
    finite = torch.isfinite(x)  # the sum is NaN/inf: a non-finite value, or an overflow of finite ones
    if not bool(finite.all()):
        rows = (~finite.all(dim=-1)).reshape(-1, x.shape[-2]).any(0).nonzero().flatten()
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise ValueError(f"{name} contains {kind} values in {rows.numel()} row(s), first at row {int(rows[0])}")
    return x


def check_like(x: Tensor, module: torch.nn.Module, name: str = "input") -> Tensor:
    """Check that points ``x`` have the floating-point type and the device of ``module``'s parameters.

    A module's arithmetic follows its parameters; mixing types or devices would either fail deep
    inside an op or silently compute in one of them, so a mismatch is a one-line error saying how to
    fix it.

    Raises:
        ValueError: the types or the devices differ.
    """
    if not _ENABLED:
        return x
    param = next(module.parameters(), None)
    if param is None:
        return x
    if x.dtype != param.dtype:
        have, want = str(x.dtype).removeprefix("torch."), str(param.dtype).removeprefix("torch.")
        raise ValueError(f"{name} has dtype {have} but the parameters are {want}; convert the points "
                         f"(x.to(torch.{want})) or the model (.to(torch.{have}))")
    if x.device != param.device:
        raise ValueError(f"{name} is on {x.device} but the parameters are on {param.device}; move the points "
                         f"(x.to('{param.device}')) or the model (.to('{x.device}'))")
    return x


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated on ``device`` (``MemAvailable`` on Linux for the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(need: float, what: str, device: torch.device | str = "cpu") -> None:
    """Refuse a computation that needs more than :data:`MEMORY_SHARE` of the available memory.

    Raises:
        ValueError: naming ``what``, the estimate and what is available.
    """
    available = available_memory(device)
    if need > MEMORY_SHARE * available:
        raise ValueError(f"{what} needs about {need / 2**30:.3g} GiB, but {available / 2**30:.3g} GiB are available")
