"""Input embeddings: gene tokens, expression values, positions, token types, batch labels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cellkit._errors import ConfigError

from .config import EncoderConfig

__all__ = ["BatchLabelEmbedding", "CategoryValueEncoder", "CellEmbeddings", "ContinuousValueEncoder"]


class ContinuousValueEncoder(nn.Module):
    """``Dropout(LayerNorm(W2 · ReLU(W1 · min(x, value_max) + b1) + b2))``; ``(B, L) -> (B, L, d)``.

    Only the top is clamped, so sentinel values such as -1 (mask) and -2 (pad) pass through.
    """

    def __init__(self, d_model: int, *, value_max: float, dropout: float, eps: float) -> None:
        super().__init__()
        self.value_max = value_max
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: Tensor) -> Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.value_max)  # (B, L, 1)
        x = self.linear2(torch.relu(self.linear1(x)))
        return self.dropout(self.norm(x))


class CategoryValueEncoder(nn.Module):
    """Binned values as ids: ``LayerNorm(Embedding(values.long()))``; ``(B, L) -> (B, L, d)``."""

    def __init__(self, n_bins: int, d_model: int, *, padding_idx: int | None, eps: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_bins, d_model, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, values: Tensor) -> Tensor:
        return self.norm(self.embedding(values.long()))


class BatchLabelEmbedding(nn.Module):
    """``LayerNorm(Embedding(batch_label))``; ``(B,) -> (B, d)``. Consumed by heads, not the input."""

    def __init__(self, n_labels: int, d_model: int, *, eps: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_labels, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, batch_labels: Tensor) -> Tensor:
        return self.norm(self.embedding(batch_labels))


class CellEmbeddings(nn.Module):
    """Sum of the configured input embeddings.

    ``g = gene_norm(E_gene[ids])``; ``x = g + value_encoder(values)`` (or ``g * values`` for
    ``"scaling"``); ``+ E_pos[position_ids]``; ``+ E_type[token_type_ids]``; then optional
    LayerNorm and dropout (BERT).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        eps = c.layer_norm_eps
        self.gene = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.gene_norm = nn.LayerNorm(c.d_model, eps=eps) if c.gene_norm else None
        if c.value_encoder == "continuous":
            self.values: nn.Module | None = ContinuousValueEncoder(
                c.d_model, value_max=c.value_max, dropout=c.dropout, eps=eps
            )
        elif c.value_encoder == "category":
            self.values = CategoryValueEncoder(c.n_value_bins, c.d_model, padding_idx=c.value_pad_id, eps=eps)
        else:
            self.values = None
        self.position = (
            nn.Embedding(c.max_position_embeddings, c.d_model) if c.max_position_embeddings else None
        )
        self.token_type = nn.Embedding(c.type_vocab_size, c.d_model) if c.type_vocab_size else None
        self.norm = nn.LayerNorm(c.d_model, eps=eps) if c.embedding_norm else None
        self.dropout = nn.Dropout(c.dropout) if c.embedding_dropout else None

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Embed a batch.

        Parameters
        ----------
        gene_ids
            ``(B, L)`` int64 token ids.
        values
            ``(B, L)`` float expression values (required when the config has a value encoder).
        position_ids
            ``(B, L)`` or ``(L,)`` int64; defaults to ``0 … L-1``.
        token_type_ids
            ``(B, L)`` int64; defaults to zeros.

        Returns
        -------
        embeddings
            ``(B, L, d)`` input to the first layer.
        gene_embeddings
            ``(B, L, d)`` gene-token part alone (after ``gene_norm``).
        """
        c = self.config
        g = self.gene(gene_ids)  # (B, L, d)
        if self.gene_norm is not None:
            g = self.gene_norm(g)
        x = g
        if c.value_encoder != "none":
            if values is None:
                raise ConfigError(
                    f"This model encodes expression values (value_encoder={c.value_encoder!r}); pass `values`."
                )
            if values.shape != gene_ids.shape:
                raise ConfigError(
                    f"values shape {tuple(values.shape)} != gene_ids shape {tuple(gene_ids.shape)}."
                )
            if c.value_encoder == "scaling":
                x = g * values.unsqueeze(-1).to(g.dtype)
            else:
                x = g + self.values(values)
        if self.position is not None:
            length = gene_ids.shape[1]
            if length > c.max_position_embeddings:
                raise ConfigError(
                    f"Sequence length {length} exceeds max_position_embeddings={c.max_position_embeddings}; "
                    "truncate the cells (max_len) before encoding."
                )
            if position_ids is None:
                position_ids = torch.arange(length, device=gene_ids.device)
            x = x + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(gene_ids)
            x = x + self.token_type(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return x, g
