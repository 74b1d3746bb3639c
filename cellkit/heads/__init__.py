"""Task heads on top of the core; each is a small ``nn.Module`` with documented numerics."""

from __future__ import annotations

from .adversarial import AdversarialDiscriminator, grad_reverse
from .classifier import ClassifierHead
from .dsbn import DomainSpecificBatchNorm
from .expression import ExpressionDecoder
from .mlm import MLMHead
from .mvc import MVCDecoder
from .pooling import POOLING_MODES, pool_cells

__all__ = [
    "POOLING_MODES",
    "AdversarialDiscriminator",
    "ClassifierHead",
    "DomainSpecificBatchNorm",
    "ExpressionDecoder",
    "MLMHead",
    "MVCDecoder",
    "grad_reverse",
    "pool_cells",
]
