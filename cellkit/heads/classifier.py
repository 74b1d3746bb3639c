"""Cell-level classification head (scGPT's ``ClsDecoder``)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ClassifierHead"]


class ClassifierHead(nn.Module):
    """``[Linear(d, d), ReLU, LayerNorm(d)] × (n_layers - 1)`` then ``Linear(d, n_classes)``.

    Applied to the (unnormalised) cell embedding ``(B, d)``; returns logits ``(B, n_classes)``.
    """

    def __init__(self, d_model: int, n_classes: int, *, n_layers: int = 3, eps: float = 1e-5) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(n_layers - 1):
            blocks += [nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model, eps=eps)]
        self.layers = nn.Sequential(*blocks)
        self.out = nn.Linear(d_model, n_classes)

    def forward(self, cell_embedding: Tensor) -> Tensor:
        return self.out(self.layers(cell_embedding))
