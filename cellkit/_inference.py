"""Batched, length-bucketed inference over tokenized cells (results in the input order)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ._utils import Progress, track
from .data.collate import Collator
from .data.tokenized import ShardedTokens, TokenizedCells
from .train.trainer import FORWARD_KEYS

__all__ = ["FORWARD_KEYS", "inference_batches", "resolve_device", "run_inference"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_batches(
    lengths: np.ndarray, batch_size: int, max_tokens: int | None = None
) -> Iterator[np.ndarray]:
    """Cell indices sorted by length and cut into batches (``max_tokens`` caps ``B × L``)."""
    order = np.argsort(lengths, kind="stable")
    i, n = 0, len(order)
    while i < n:
        j = min(n, i + batch_size)
        if max_tokens is not None:
            while j - i > 1 and lengths[order[j - 1]] * (j - i) > max_tokens:
                j -= 1
        yield order[i:j]
        i = j


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    tokens: TokenizedCells | ShardedTokens,
    fn: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    heads: tuple[str, ...] = (),
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    amp: str | None = None,
    attn_backend: str = "sdpa",
    progress: bool | Progress = True,
    desc: str = "inference",
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``model`` over all cells and collect ``fn(output, batch)`` arrays in input order.

    Parameters
    ----------
    fn
        Turns a model output and its batch into ``{name: (B, ...) tensor}``.
    heads
        Heads to run.
    progress
        ``True``: a ``tqdm`` bar; a :class:`cellkit.Progress` is advanced after each batch (and
        raises :class:`cellkit.Cancelled` once cancelled; inside an outer call, its count goes on).
    output_hidden_states, output_attentions
        Ask the model for per-layer states / attention probabilities (see :class:`CellModelOutput`).

    Returns
    -------
    ``{name: (n_cells, ...) array}``.
    """
    dev = resolve_device(device)
    cells = tokens.to_memory() if isinstance(tokens, ShardedTokens) else tokens
    collate = Collator.for_tokens(cells)
    was_training = model.training
    model.eval()
    model.to(dev)
    out: dict[str, np.ndarray] = {}
    lengths = cells.lengths
    ctx = (
        torch.autocast(dev.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        if amp
        else torch.autocast(dev.type, enabled=False)
    )
    try:
        with track(progress, total=len(cells), desc=desc) as bar, ctx:
            for idx in inference_batches(lengths, batch_size):
                items = []
                for i in idx.tolist():
                    item = {k: np.asarray(v) for k, v in cells.cell(i).items()}
                    item["index"] = i
                    items.append(item)
                batch = collate(items)
                inputs = {k: batch[k].to(dev) for k in FORWARD_KEYS if k in batch}
                out_ = model(
                    **inputs,
                    heads=heads,
                    attn_backend=attn_backend,
                    output_hidden_states=output_hidden_states,
                    output_attentions=output_attentions,
                )
                res = fn(out_, batch)
                for name, t in res.items():
                    arr = t.detach().float().cpu().numpy()
                    if name not in out:
                        out[name] = np.empty((len(cells), *arr.shape[1:]), dtype=arr.dtype)
                    out[name][idx] = arr
                bar.advance(len(idx))
    finally:
        model.train(was_training)
    return out
