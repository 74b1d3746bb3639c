"""Multi-head self-attention that owns its projections.

The packed projection ``qkv`` is ``Linear(d, 3d)`` whose output rows are ``[q; k; v]`` and, within
each block, head ``h`` owns rows ``h*dh ... (h+1)*dh - 1`` — the layout of torch's
``nn.MultiheadAttention.in_proj_weight`` and flash-attn's ``Wqkv``, so foreign checkpoints map
onto it by renaming alone.

Backends (a call argument, not part of the architecture):

``"sdpa"``
    ``torch.nn.functional.scaled_dot_product_attention`` with a boolean key-padding mask
    (flash / memory-efficient kernels on CUDA, the fused kernel on CPU).
``"explicit"``
    ``softmax(Q Kᵀ / √dh)`` computed in plain torch; the only path that can return the per-head
    probabilities (``need_weights=True``). Masked keys get probability exactly 0.
``"flash"`` / ``"varlen"``
    Run on packed, unpadded tokens (see :mod:`cellkit.core.varlen`); used by the encoder, which
    packs once for all layers.
``"native"``
    The encoder runs torch's own ``nn.TransformerEncoderLayer`` inference fast path (nested
    tensors, fused kernels) over these same parameters (inference only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellkit._errors import ConfigError

from .varlen import varlen_attention

__all__ = ["ATTN_BACKENDS", "MultiheadSelfAttention"]

ATTN_BACKENDS = ("sdpa", "explicit", "flash", "varlen", "native")


class MultiheadSelfAttention(nn.Module):
    """Self-attention with a packed QKV projection.

    Parameters
    ----------
    d_model
        Hidden size.
    n_heads
        Number of heads.
    dropout
        Dropout on attention probabilities (training only).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split the packed projection into ``(..., H, dh)`` query, key and value."""
        qkv = self.qkv(x)  # (..., 3d)
        qkv = qkv.unflatten(-1, (3, self.n_heads, self.head_dim))  # (..., 3, H, dh)
        return qkv.unbind(dim=-3)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        backend: str = "sdpa",
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend within each cell.

        Parameters
        ----------
        x
            ``(B, L, d)`` hidden states.
        padding_mask
            ``(B, L)`` bool, True at padding keys.
        backend
            ``"sdpa"`` or ``"explicit"`` (packed backends go through :meth:`forward_packed`).
        need_weights
            Return ``(B, H, L, L)`` probabilities (forces the explicit path).

        Returns
        -------
        out
            ``(B, L, d)``.
        probs
            ``(B, H, L, L)`` attention probabilities or ``None``.
        """
        b, length, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x))  # each (B, H, L, dh)
        p_drop = self.dropout if self.training else 0.0
        probs = None
        if need_weights or backend == "explicit":
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, L, L)
            if padding_mask is not None:
                scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(F.dropout(probs, p_drop, self.training), v)
        elif backend == "sdpa":
            mask = None if padding_mask is None else ~padding_mask[:, None, None, :]  # True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        else:
            raise ConfigError(f"Unknown attention backend {backend!r}; choose one of {ATTN_BACKENDS}.")
        out = out.transpose(1, 2).reshape(b, length, self.d_model)  # (B, L, d)
        return self.out_proj(out), (probs if need_weights else None)

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, impl: str) -> Tensor:
        """Attention on packed tokens ``(T, d)`` (see :func:`cellkit.core.varlen.varlen_attention`)."""
        q, k, v = self.project(x)  # each (T, H, dh)
        p_drop = self.dropout if self.training else 0.0
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=p_drop, impl=impl)
        return self.out_proj(out.reshape(x.shape[0], self.d_model))
