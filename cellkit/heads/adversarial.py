"""Adversarial batch discriminator behind a gradient-reversal layer (scGPT's DAB)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AdversarialDiscriminator", "grad_reverse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.lambd, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Identity forward; multiplies the gradient by ``-lambd`` backward."""
    return _GradReverse.apply(x, lambd)


class AdversarialDiscriminator(nn.Module):
    """``[Linear(d, d), LeakyReLU(0.01), LayerNorm(d)] × (n_layers - 1)`` + ``Linear(d, n_batches)``.

    Parameters
    ----------
    reverse_grad
        Put a gradient-reversal layer (``lambd``) in front, so minimising the discriminator loss
        pushes the encoder to *remove* batch information.
    """

    def __init__(
        self,
        d_model: int,
        n_batches: int,
        *,
        n_layers: int = 3,
        reverse_grad: bool = True,
        lambd: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(n_layers - 1):
            blocks += [nn.Linear(d_model, d_model), nn.LeakyReLU(0.01), nn.LayerNorm(d_model, eps=eps)]
        self.layers = nn.Sequential(*blocks)
        self.out = nn.Linear(d_model, n_batches)
        self.reverse_grad = reverse_grad
        self.lambd = lambd

    def forward(self, cell_embedding: Tensor) -> Tensor:
        x = grad_reverse(cell_embedding, self.lambd) if self.reverse_grad else cell_embedding
        return self.out(self.layers(x))
