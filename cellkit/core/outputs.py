"""Output container of the core encoder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["EncoderOutput"]


@dataclass
class EncoderOutput:
    """What :class:`~cellkit.core.CellEncoder` returns.

    Attributes
    ----------
    last_hidden_state
        ``(B, L, d)`` output of the last layer (after ``final_norm`` when configured). Values at
        padded positions are not meaningful.
    gene_embeddings
        ``(B, L, d)`` gene-token embeddings *before* values were added (after ``gene_norm``) —
        scGPT's MVC decoder queries these.
    hidden_states
        When requested: ``n_layers + 1`` tensors ``(B, L, d)``: the embedding output, then each
        layer's output (Hugging Face convention, so ``hidden_states[-1]`` is the last layer).
    attentions
        When requested: ``n_layers`` tensors ``(B, H, L, L)`` of softmax probabilities.
    padding_mask
        ``(B, L)`` bool, True at padding (as given to the forward call; ``None`` if none).
    """

    last_hidden_state: Tensor
    gene_embeddings: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    padding_mask: Tensor | None = None
