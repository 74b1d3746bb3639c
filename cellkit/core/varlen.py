"""Unpadding ("varlen") helpers for the ``flash`` backend.

A padded batch ``(B, L, ...)`` with a boolean padding mask becomes one packed tensor
``(T, ...)`` holding only the ``T`` real tokens, plus ``cu_seqlens`` (``(B + 1,)`` int32
cumulative lengths, starting at 0) that tell the kernel where each cell starts. Layer norms and
feed-forward layers work per token, so the whole encoder can run on the packed tensor and
attention never touches padding. These helpers are pure torch and run on CPU, which is how they
are tested; the kernels that consume them are CUDA-only (flash-attn, or torch's own varlen op).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cellkit._errors import ConfigError, MissingDependencyError

__all__ = ["Packing", "pack", "unpack", "varlen_attention", "varlen_kernel_available"]


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded batch live.

    Attributes
    ----------
    indices
        ``(T,)`` flat indices of real tokens in the ``B * L`` padded layout (row-major).
    cu_seqlens
        ``(B + 1,)`` int32 cumulative sequence lengths, ``cu_seqlens[0] == 0``.
    max_seqlen
        Longest real length in the batch.
    batch_size, seq_len
        Shape of the padded layout.
    """

    indices: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    batch_size: int
    seq_len: int


def pack(x: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Packing]:
    """Drop padded positions.

    Parameters
    ----------
    x
        ``(B, L, *)`` padded tensor.
    padding_mask
        ``(B, L)`` bool, True at padding (``None`` = no padding).

    Returns
    -------
    packed
        ``(T, *)`` real tokens, cell after cell, in position order.
    packing
        What :func:`unpack` needs to restore the padded layout.
    """
    b, length = x.shape[:2]
    if padding_mask is None:
        keep = torch.ones(b, length, dtype=torch.bool, device=x.device)
    else:
        keep = ~padding_mask.to(device=x.device, dtype=torch.bool)
    lengths = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.reshape(-1), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max().item()) if b else 0
    packed = x.reshape(b * length, *x.shape[2:]).index_select(0, indices)
    return packed, Packing(indices, cu_seqlens, max_seqlen, b, length)


def unpack(packed: Tensor, packing: Packing, fill: float = 0.0) -> Tensor:
    """Inverse of :func:`pack`: scatter ``(T, *)`` back to ``(B, L, *)``, pads set to ``fill``."""
    out = packed.new_full((packing.batch_size * packing.seq_len, *packed.shape[1:]), fill)
    out.index_copy_(0, packing.indices, packed)
    return out.reshape(packing.batch_size, packing.seq_len, *packed.shape[1:])


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_kernel_available() -> bool:
    """True when flash-attn is importable and a CUDA device is present."""
    return torch.cuda.is_available() and _flash_attn_func() is not None


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    impl: str = "flash_attn",
) -> Tensor:
    """Attention over packed sequences (each cell attends only within itself).

    Parameters
    ----------
    q, k, v
        ``(T, H, D)`` packed projections.
    cu_seqlens
        ``(B + 1,)`` int32 cumulative lengths.
    max_seqlen
        Longest sequence.
    impl
        ``"flash_attn"`` (flash-attn's ``flash_attn_varlen_func``; CUDA, fp16/bf16),
        ``"torch"`` (``torch.nn.attention.varlen.varlen_attn``; CUDA) or ``"reference"``
        (a loop of SDPA calls, one per sequence; any device — for tests).

    Returns
    -------
    ``(T, H, D)`` attention output.
    """
    if impl == "flash_attn":
        fn = _flash_attn_func()
        if fn is None:
            raise MissingDependencyError(
                "attn_backend='flash' needs flash-attn; install it on a CUDA machine with "
                '`pip install --no-build-isolation "cellkit[flash]"`, or use attn_backend="sdpa".'
            )
        if not q.is_cuda:
            raise ConfigError(
                "attn_backend='flash' runs on CUDA tensors only; move the model to a GPU or use 'sdpa'."
            )
        return fn(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout_p, softmax_scale=scale
        )
    if impl == "torch":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    if impl == "reference":
        outs = []
        bounds = cu_seqlens.tolist()
        for start, end in itertools.pairwise(bounds):
            # (1, H, n, D) per sequence
            qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, scale=scale)
            outs.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
    raise ConfigError(f"Unknown varlen implementation {impl!r}; use 'flash_attn', 'torch' or 'reference'.")
