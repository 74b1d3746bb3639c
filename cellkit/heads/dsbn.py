"""Domain-specific batch normalisation (one BatchNorm1d per batch/domain)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DomainSpecificBatchNorm"]


class DomainSpecificBatchNorm(nn.Module):
    """Normalise ``(B, L, d)`` embeddings over channels with the statistics of one domain.

    As scGPT does, the domain of the *whole batch* is ``batch_labels[0]``, so batches must be drawn
    from a single domain (cellkit's samplers do that when DSBN is on).

    Parameters
    ----------
    d_model
        Channels.
    n_domains
        Number of domains (batches).
    eps, momentum, affine
        BatchNorm1d settings (scGPT: eps 6.1e-5, affine False).
    """

    def __init__(
        self,
        d_model: int,
        n_domains: int,
        *,
        eps: float = 6.1e-5,
        momentum: float = 0.1,
        affine: bool = False,
    ) -> None:
        super().__init__()
        self.bns = nn.ModuleList(
            nn.BatchNorm1d(d_model, eps=eps, momentum=momentum, affine=affine) for _ in range(n_domains)
        )

    def forward(self, x: Tensor, batch_labels: Tensor) -> Tensor:
        domain = int(batch_labels[0].item())
        if not 0 <= domain < len(self.bns):
            raise ValueError(f"Batch label {domain} is outside the {len(self.bns)} DSBN domains.")
        return self.bns[domain](x.transpose(1, 2)).transpose(1, 2)
