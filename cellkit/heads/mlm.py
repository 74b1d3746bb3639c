"""BERT-style masked-LM token head (Geneformer, PerturbGene)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLMHead"]


class MLMHead(nn.Module):
    """``Linear(d, d) -> act -> LayerNorm -> Linear(d, vocab) + bias``; ``(B, L, d) -> (B, L, V)``.

    Parameters
    ----------
    tie_to
        An ``nn.Embedding`` whose weight the output projection shares (weight tying).
    """

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        *,
        activation: str = "gelu",
        eps: float = 1e-12,
        tie_to: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.activation = activation
        self.decoder = nn.Linear(d_model, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.tied = tie_to is not None
        if tie_to is not None:
            self.decoder.weight = tie_to.weight

    def forward(self, hidden: Tensor) -> Tensor:
        act = F.gelu if self.activation == "gelu" else F.relu
        x = self.norm(act(self.dense(hidden)))
        return self.decoder(x) + self.bias
