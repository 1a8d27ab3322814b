"""Process groups for ``torchrun``: one process per GPU (nccl) or several CPU processes (gloo).

``init_distributed()`` reads the variables torchrun sets (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); with ``WORLD_SIZE`` unset or 1 it returns a
single-process :class:`DistInfo` and creates no process group, so the same code runs with and
without torchrun. Only rank 0 writes files (``info.is_main``); every collective below is a
no-op in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .config import ConfigError
from .threads import apply_threads, resolve_threads

__all__ = [
    "DistInfo",
    "init_distributed",
    "shutdown",
    "barrier",
    "all_gather_object",
    "shard",
    "resolve_device",
    "sum_tensor",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: the device this process computes on.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that prints tables and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is active."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:<local_rank>`` when CUDA is available, else CPU."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but CUDA is not available; use train.device=cpu")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device(device)


def init_distributed(device: str = "auto", threads: int = 0, recorded: tuple[int, str] | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (or stay single).

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; the backend follows it
            (nccl for CUDA, gloo for CPU).
        threads: torch CPU threads per process; 0: the thread policy of
            :mod:`mmpeft_isprs.threads` (the cores free for this process, divided among the
            local ranks, ``LOCAL_WORLD_SIZE``).
        recorded: (count, file) of a resumed run's threads, reused when ``threads`` is 0 and
            ``OMP_NUM_THREADS`` unset (:func:`~mmpeft_isprs.threads.resolve_threads`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    count, where = recorded or (None, "")
    apply_threads(
        resolve_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), recorded=count, recorded_in=where)
    )
    if world <= 1:
        return DistInfo(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    return DistInfo(rank, world, local, dev, backend)


def shutdown() -> None:
    """Destroy the process group if one is active."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) ``t`` in place across ranks; returns it."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items ``rank, rank + world, ...``: a disjoint cover of ``items`` over the ranks."""
    return list(items[rank::world_size])
