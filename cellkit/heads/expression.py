"""Per-token expression decoder (scGPT's GEP/MLM head)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ExpressionDecoder"]


def _mlp(d_in: int, d_model: int) -> nn.Sequential:
    # Linear -> LeakyReLU(0.01) -> Linear -> LeakyReLU(0.01) -> Linear(d, 1)
    return nn.Sequential(
        nn.Linear(d_in, d_model),
        nn.LeakyReLU(0.01),
        nn.Linear(d_model, d_model),
        nn.LeakyReLU(0.01),
        nn.Linear(d_model, 1),
    )


class ExpressionDecoder(nn.Module):
    """Predict a value per token from the last hidden state.

    Parameters
    ----------
    d_model
        Hidden size.
    explicit_zero_prob
        Add a parallel MLP whose sigmoid is the probability that the value is non-zero
        (scGPT's ``zero_logit``; trained with a Bernoulli NLL).
    use_batch_labels
        The input is ``[h, batch_embedding]`` (``2d`` wide) per token.
    """

    def __init__(
        self, d_model: int, *, explicit_zero_prob: bool = False, use_batch_labels: bool = False
    ) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model
        self.use_batch_labels = use_batch_labels
        self.fc = _mlp(d_in, d_model)
        self.zero_logit = _mlp(d_in, d_model) if explicit_zero_prob else None

    def forward(self, hidden: Tensor, batch_embedding: Tensor | None = None) -> dict[str, Tensor]:
        """``hidden`` ``(B, L, d)`` (+ ``batch_embedding`` ``(B, d)``) -> ``pred`` ``(B, L)`` [, ``zero_probs``]."""
        if self.use_batch_labels:
            if batch_embedding is None:
                raise ValueError("This expression decoder was built with batch labels; pass batch_embedding.")
            hidden = torch.cat([hidden, batch_embedding.unsqueeze(1).expand(-1, hidden.shape[1], -1)], dim=2)
        out = {"pred": self.fc(hidden).squeeze(-1)}
        if self.zero_logit is not None:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(hidden).squeeze(-1))
        return out
