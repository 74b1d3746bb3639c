"""Cell pooling: from token states ``(B, L, d)`` to one vector per cell ``(B, d)``."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["POOLING_MODES", "pool_cells"]

PoolingMode = Literal["cls", "mean", "weighted"]
POOLING_MODES = ("cls", "mean", "weighted")


def pool_cells(
    hidden: Tensor,
    *,
    mode: PoolingMode = "cls",
    padding_mask: Tensor | None = None,
    values: Tensor | None = None,
    exclude_mask: Tensor | None = None,
) -> Tensor:
    """Pool token states into cell embeddings.

    Parameters
    ----------
    hidden
        ``(B, L, d)`` token states.
    mode
        ``"cls"``: position 0 (raw, unnormalised). ``"mean"``: mean over non-pad tokens.
        ``"weighted"``: ``normalize(Σ_l h_l · x_l)`` with the input values as weights (scGPT's
        ``w-pool``; pads should carry weight 0 or be masked).
    padding_mask
        ``(B, L)`` bool, True at padding (excluded from ``mean``/``weighted``).
    values
        ``(B, L)`` weights for ``"weighted"``.
    exclude_mask
        ``(B, L)`` bool, True at tokens to leave out of the mean as well (e.g. ``<cls>``/``<eos>``,
        as Geneformer's ``cell`` mode does).

    Returns
    -------
    ``(B, d)`` cell embeddings.
    """
    b, length, _ = hidden.shape
    if mode == "cls":
        return hidden[:, 0, :]
    keep = torch.ones(b, length, dtype=torch.bool, device=hidden.device)
    if padding_mask is not None:
        keep &= ~padding_mask.to(hidden.device, torch.bool)
    if mode == "mean":
        if exclude_mask is not None:
            keep &= ~exclude_mask.to(hidden.device, torch.bool)
        w = keep.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        count = w.sum(dim=1).clamp_min(1.0)
        return (hidden * w).sum(dim=1) / count
    if mode == "weighted":
        if values is None:
            raise ValueError("pooling mode 'weighted' needs `values`.")
        w = (values.to(hidden.dtype) * keep.to(hidden.dtype)).unsqueeze(-1)
        return F.normalize((hidden * w).sum(dim=1), p=2, dim=1)
    raise ValueError(f"Unknown pooling mode {mode!r}; choose one of {POOLING_MODES}.")
