"""Micro-batches inside a training batch (``TrainerConfig(micro_batch=...)``): rows of a collated
batch, the share of each objective's mean a piece carries, and the RNG state a retried step restores.

A collated batch (masks already drawn by the collator) is run as pieces of ``micro_batch``
consecutive cells, padded to the batch's width. Each objective's term is a mean over its own
units (cells, labelled cells, masked positions; :meth:`~cellkit.train.objectives.Objective.units`),
so a piece's term is weighted by the piece's share of those units: the gradients add up to the
gradient of the whole batch's loss (up to float summation order), whatever the pieces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._errors import ConfigError

__all__ = ["check_micro_batch", "restore_rng", "rng_state", "rows"]


def check_micro_batch(value: Any) -> int | str | None:
    """``None`` (one forward per batch), a positive ``int`` or ``"auto"``; else a :class:`ConfigError`."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"micro_batch must be a positive integer, 'auto' (halve after out-of-memory) or None, got {value!r}.",
            param="micro_batch",
        )
    return value


def rows(batch: Mapping[str, Any], a: int, b: int, n: int) -> dict[str, Any]:
    """Cells ``a:b`` of a collated batch of ``n`` cells (every tensor whose first axis is the cells)."""
    return {
        k: (v[a:b] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n else v) for k, v in batch.items()
    }


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """torch's CPU (and the CUDA device's) RNG state: what dropout draws from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def restore_rng(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    """Put back an :func:`rng_state` (a retried step draws the same dropout masks)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
