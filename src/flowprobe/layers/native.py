"""Compiled CPU kernels for shared-parameter planar and radial runs (``runs.cpp``), built once per machine.

A training step of these flows is mostly per-op overhead: a planar run of ``K`` layers costs ``~3K``
ops forward and ``~4K`` backward, each a few microseconds of dispatch for a few hundred flops. The
compiled kernels do a whole run (all layers, all points, in parallel over points) in one call each
way, with the analytic backwards of :class:`~flowprobe.layers.planar._PlanarRun` and
:class:`~flowprobe.layers.radial._RadialRun` (the tests compare them to ``1e-12``).

They are an accelerator, never a requirement: the module is built with PyTorch's C++ extension
loader into ``~/.cache/flowprobe`` (``FLOWPROBE_CACHE``) by :func:`main`
(``make install`` does it), or by :func:`kernels` when asked to; without a C++ compiler, or with
``FLOWPROBE_NATIVE=0``, every run uses the PyTorch kernels. A built module is used for CPU runs of
activations that declare a compiled implementation (:attr:`~flowprobe.activations.Activation.native`).
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = ["NativeRun", "build_directory", "kernels", "usable"]

NAME = "flowprobe_runs"
SOURCE = Path(__file__).with_name("runs.cpp")
# -fopenmp: ATen's parallel_for runs in parallel only in code compiled with OpenMP (the one runtime is
# PyTorch's libgomp); -fno-trapping-math lets the compiler vectorise the kernels' branch-free selects.
FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wno-psabi"]

_module: ModuleType | None = None
_error: str | None = None
_lock = threading.Lock()


def build_directory() -> Path:
    """Where the module of this source and this torch lives (a new source or torch gets a new one)."""
    key = SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    root = Path(os.environ.get("FLOWPROBE_CACHE", Path.home() / ".cache" / "flowprobe"))
    return root / f"native-{digest}"


def kernels(build: bool = False) -> ModuleType | None:
    """The compiled module, or ``None``: switched off (``FLOWPROBE_NATIVE=0``), not built yet and
    ``build`` false (``FLOWPROBE_NATIVE=1`` builds on first use), or the build failed (a warning says why,
    once)."""
    global _module, _error
    setting = os.environ.get("FLOWPROBE_NATIVE", "")
    if _module is not None or setting == "0" or _error is not None:
        return None if setting == "0" else _module
    path = build_directory()
    if not (build or setting == "1" or (path / f"{NAME}.so").exists()):
        return None
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import load

                from flowprobe.io import atomic_write

                path.mkdir(parents=True, exist_ok=True)
                source = path / SOURCE.name  # built from a copy: checkouts elsewhere share the module
                if not source.is_file() or source.read_bytes() != SOURCE.read_bytes():
                    atomic_write(source, lambda tmp: Path(tmp).write_bytes(SOURCE.read_bytes()))
                _module = load(name=NAME, sources=[str(source)], build_directory=str(path),
                               extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as err:  # no compiler, no ninja, a failed build: the PyTorch kernels remain
                _error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                warnings.warn(f"flowprobe: compiled run kernels unavailable, using PyTorch's ({_error})",
                              RuntimeWarning, stacklevel=2)
    return _module


def usable(points: Tensor) -> ModuleType | None:
    """The module, if it is built and a run on ``points`` (CPU, float32/float64) may use it."""
    if points.device.type != "cpu" or points.dtype not in (torch.float32, torch.float64):
        return None
    return kernels()


class NativeRun(torch.autograd.Function):
    """A compiled run as an autograd Function: ``forward(kind, module, code, z, *params)``.

    ``kind`` is ``"planar"`` (points ``(N, d)``, params ``u, w`` ``(K, d)``, ``b, α`` ``(K,)``; or the runs
    of ``E`` members at once: points ``(E, N, d)``, params ``(K, E[, 1], d)``, ``(K, E[, 1])``; or one
    parameter set per point: points ``(N, d)``, params ``(K, N, d)``, ``(K, N)``) or ``"radial"`` (points
    ``(N, d)``, params ``z0, α, β``); the forward keeps every layer's input (and, for planar,
    pre-activation, or for tanh its value) for the backward.
    """

    @staticmethod
    def forward(ctx: Any, kind: str, module: ModuleType, code: int, z: Tensor, *params: Tensor) -> Any:
        if kind == "planar":
            x, logdet, inputs, kept = module.planar_forward(z, *params, code)
            ctx.save_for_backward(inputs, kept, params[0], params[1], params[3])
        else:
            x, logdet, inputs = module.radial_forward(z, *params)
            ctx.save_for_backward(inputs, *params)
        ctx.kind, ctx.module, ctx.code = kind, module, code
        return x, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_x: Tensor, grad_logdet: Tensor) -> tuple:
        saved = ctx.saved_tensors
        if ctx.kind == "planar":
            inputs, kept, u, w, wu = saved
            grad_z, grad_u, grad_w, grad_b, grad_wu = ctx.module.planar_backward(
                grad_x, grad_logdet, inputs, kept, u, w, wu, ctx.code)
            return None, None, None, grad_z, grad_u, grad_w, grad_b, grad_wu
        grads = ctx.module.radial_backward(grad_x, grad_logdet, *saved)
        return None, None, None, *grads


def main(argv: list[str] | None = None) -> int:
    """Build the module now and print where, or why not (``make install`` calls it)."""
    del argv
    module = kernels(build=True)
    if module is None:
        print(f"flowprobe: compiled run kernels not built ({_error or 'switched off by FLOWPROBE_NATIVE=0'})")
        return 1
    print(f"flowprobe: compiled run kernels ready in {build_directory()}")
    return 0

