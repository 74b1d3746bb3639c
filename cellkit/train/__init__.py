"""The training engine: objectives, the trainer loop, checkpoints, events (tensor level; no AnnData)."""

from __future__ import annotations

from .objectives import (
    CCE,
    DAB,
    ECS,
    MVC,
    OBJECTIVES,
    Classification,
    MaskedTokenLM,
    MaskedValueMSE,
    MVCZeroProbNLL,
    Objective,
    ZeroProbNLL,
    make_objectives,
)

__all__ = [
    "CCE",
    "DAB",
    "ECS",
    "MVC",
    "OBJECTIVES",
    "Classification",
    "MVCZeroProbNLL",
    "MaskedTokenLM",
    "MaskedValueMSE",
    "Objective",
    "ZeroProbNLL",
    "make_objectives",
]
