"""Thin helpers over ``torch.distributed`` (torchrun): rank info, set-up, reductions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._utils import get_logger

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_sum", "barrier", "dist_info", "init_distributed"]

log = get_logger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The current process group's rank and size (``0`` of ``1`` when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (``RANK``/``WORLD_SIZE`` in the environment).

    Parameters
    ----------
    backend
        ``"nccl"`` (default on CUDA) or ``"gloo"`` (default on CPU).

    Returns
    -------
    This process's :class:`DistInfo`; a single process (no torchrun) gets rank 0 of 1 and no
    process group.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    info = dist_info()
    log.info("joined process group: rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks (a no-op without a process group)."""
    if dist_info().enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    info = dist_info()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()
