"""Out-of-memory errors: recognising them, freeing what a failed try left, and the test hook that
injects them (``CELLKIT_OOM_ABOVE_CELLS``). Used by ``batch_size="auto"`` (:mod:`cellkit._inference`)
and ``micro_batch="auto"`` (:class:`cellkit.train.Trainer`)."""

from __future__ import annotations

import gc
import os

import torch

__all__ = ["OOM_ABOVE_CELLS_ENV", "free_memory", "injected_oom", "is_out_of_memory"]

#: test hook: any forward over more than this many cells raises ``torch.OutOfMemoryError`` (used
#: by the out-of-memory tests, and to rehearse ``batch_size="auto"`` on a machine with memory to spare)
OOM_ABOVE_CELLS_ENV = "CELLKIT_OOM_ABOVE_CELLS"

_OOM_MESSAGES = (
    "out of memory",  # CUDA ("CUDA out of memory", "CUDA error: out of memory"), MPS, XPU
    "DefaultCPUAllocator: can't allocate memory",
    "not enough memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure of a device or the CPU (and nothing else).

    ``torch.OutOfMemoryError`` (CUDA's ``torch.cuda.OutOfMemoryError`` is the same class) and the
    ``RuntimeError`` s allocators raise with "out of memory", "DefaultCPUAllocator: can't allocate
    memory" or "not enough memory" in their message; other errors are not.
    """
    kinds = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
    )
    if kinds and isinstance(exc, kinds):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def injected_oom(n_cells: int) -> None:
    """The test hook: raise an out-of-memory error when ``n_cells`` exceeds :data:`OOM_ABOVE_CELLS_ENV`."""
    limit = os.environ.get(OOM_ABOVE_CELLS_ENV)
    if limit and n_cells > int(limit):
        kind = getattr(torch, "OutOfMemoryError", RuntimeError)
        raise kind(f"CUDA out of memory (injected: {n_cells} cells > {OOM_ABOVE_CELLS_ENV}={limit})")


def free_memory(device: torch.device) -> None:
    """Drop what an out-of-memory attempt left behind: garbage, and the CUDA cache on a GPU."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


