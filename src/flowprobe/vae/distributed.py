"""Data-parallel training: one process, or one rank of a ``torchrun`` job.

``torchrun --nproc_per_node=N -m flowprobe vae train …`` starts ``N`` processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment
(https://pytorch.org/docs/stable/elastic/run.html); :meth:`Distributed.from_environment` joins
them into one process group (NCCL with one GPU per process on CUDA, Gloo on the CPU) and the model
is wrapped in ``DistributedDataParallel``, which averages the gradients over the ranks
(https://pytorch.org/docs/stable/notes/ddp.html).

Every rank draws the same global mini-batch and noise from the same generator and takes its
contiguous share (:meth:`Distributed.part`); the loss a rank back-propagates is its share's sum
times ``world/B``, so the averaged gradient is that of the mean over the global batch ``B``: the
global batch size and the learning rate are those of one process, whatever the number of ranks.
Only rank 0 writes files; it sends what it read from a checkpoint to the others
(:meth:`Distributed.share`), so a resume needs the run directory on rank 0's host only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Distributed", "RankFailedError", "resolve_device"]


class RankFailedError(ValueError):
    """Rank 0 failed before sending what the other ranks wait for (it reports the cause)."""


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA if available, else the CPU), ``cpu``, ``cuda`` or ``cuda:i``.

    Raises:
        ValueError: an unknown device, or CUDA without a GPU.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda[:i]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; expected auto, cpu or cuda[:i]")
    return resolved


class Distributed:
    """This process's place in a data-parallel job (``world = 1``: a plain single process).

    Args:
        rank: This process's rank.
        world: Number of processes.
        device: This process's device.
        owned: Whether this object created the process group (and destroys it in :meth:`close`).
    """

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None, owned: bool = False) -> None:
        self.rank, self.world, self.owned = rank, world, owned
        self.device = torch.device("cpu") if device is None else device

    @classmethod
    @contextmanager
    def from_environment(cls, device: str = "auto") -> Iterator[Distributed]:
        """Join the ``torchrun`` job described by the environment (a single process without one) for
        the length of a ``with`` block.

        Args:
            device: ``auto``, ``cpu`` or ``cuda``; under torchrun with CUDA, rank ``r`` of a host uses GPU
                ``LOCAL_RANK``.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            yield cls(device=resolve_device(device))
            return
        wanted = resolve_device(device)
        if wanted.type == "cuda":
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=local)
        else:
            local = torch.device("cpu")
            dist.init_process_group("gloo")
        job = cls(dist.get_rank(), dist.get_world_size(), local, owned=True)
        try:
            yield job
        finally:
            job.close()

    def close(self) -> None:
        """Leave the process group (if this object joined it)."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False

    @property
    def writes(self) -> bool:
        """Whether this rank writes files (rank 0)."""
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (the first ``n mod world`` ranks get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks (in place; ``tensor`` itself for one process)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (which also copies rank 0's weights to every rank)."""
        if self.world == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def share(self, meta: dict[str, Any] | None, tensors: dict[str, Tensor] | None,
              error: str | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Rank 0's JSON-ready ``meta`` and CPU ``tensors`` on every rank (no pickling: a JSON header, then
        the tensors by name).

        Rank 0 passes ``error`` instead when it failed; every rank then raises it.

        Raises:
            RankFailedError: rank 0 passed an error.
        """
        if self.world == 1:
            if error is not None:
                raise RankFailedError(error)
            return meta or {}, tensors or {}
        if self.rank == 0:
            shapes = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in (tensors or {}).items()}
            header = json.dumps({"error": error} if error is not None else {"meta": meta, "tensors": shapes})
            data = torch.frombuffer(bytearray(header.encode()), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size)
        if self.rank != 0:
            data = torch.empty(int(size), dtype=torch.uint8)
        self._broadcast(data)
        received = json.loads(bytes(data.tolist()).decode())
        if "error" in received:
            raise RankFailedError(received["error"])
        out = {}
        for name, (shape, dtype) in received["tensors"].items():
            value = tensors[name] if self.rank == 0 else torch.empty(shape, dtype=getattr(torch, dtype))
            out[name] = self._broadcast(value.contiguous())
        return received["meta"], out

    def _broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every rank (through the device for NCCL)."""
        on_device = tensor.to(self.device)
        dist.broadcast(on_device, src=0)
        if on_device is not tensor:
            tensor.copy_(on_device.cpu())
        return tensor
