"""Masked value prediction from the cell embedding (scGPT's MVC / GEPC head)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MVCDecoder"]


class MVCDecoder(nn.Module):
    """Inner-product MVC decoder.

    ``q_l = sigmoid(gene2query(g_l))``; ``pred_l = ⟨W q_l, c⟩`` where ``g`` are gene-token
    embeddings (without values) and ``c`` is the cell embedding (``[cell, batch_emb]`` when batch
    labels are used, so ``W`` maps ``d -> 2d``).

    Parameters
    ----------
    d_model
        Hidden size.
    detach
        Detach the gene embeddings (scGPT's ``"inner product, detach"`` style).
    explicit_zero_prob
        Also predict the non-zero probability with ``W_zero_logit`` (with bias).
    use_batch_labels
        Cell embedding is concatenated with the batch embedding.
    """

    def __init__(
        self,
        d_model: int,
        *,
        detach: bool = False,
        explicit_zero_prob: bool = False,
        use_batch_labels: bool = False,
    ) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model
        self.detach = detach
        self.use_batch_labels = use_batch_labels
        self.gene2query = nn.Linear(d_model, d_model)
        self.W = nn.Linear(d_model, d_in, bias=False)
        self.W_zero_logit = nn.Linear(d_model, d_in) if explicit_zero_prob else None

    def forward(
        self, cell_embedding: Tensor, gene_embeddings: Tensor, batch_embedding: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``cell_embedding`` ``(B, d)``, ``gene_embeddings`` ``(B, L, d)`` -> ``pred`` ``(B, L)``."""
        if self.use_batch_labels:
            if batch_embedding is None:
                raise ValueError("This MVC decoder was built with batch labels; pass batch_embedding.")
            cell_embedding = torch.cat([cell_embedding, batch_embedding], dim=1)
        g = gene_embeddings.detach() if self.detach else gene_embeddings
        query = torch.sigmoid(self.gene2query(g))  # (B, L, d)
        c = cell_embedding.unsqueeze(2)  # (B, d_in, 1)
        out = {"pred": torch.bmm(self.W(query), c).squeeze(2)}
        if self.W_zero_logit is not None:
            out["zero_probs"] = torch.sigmoid(torch.bmm(self.W_zero_logit(query), c).squeeze(2))
        return out
