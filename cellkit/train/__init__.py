"""The training engine: objectives, the trainer loop, checkpoints, events (tensor level; no AnnData)."""

from __future__ import annotations

from .checkpoint import CheckpointManager, read_checkpoint
from .distributed import DistInfo, dist_info, init_distributed
from .events import EVENT_KINDS, Callback, Event
from .metrics import Accuracy, MacroF1, Metric, MetricSet
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
from .sampling import EpochBatchSampler
from .state import History, TrainerState, TrainResult
from .trainer import FORWARD_KEYS, Trainer, TrainerConfig, TrainingError

__all__ = [
    "CCE",
    "DAB",
    "ECS",
    "EVENT_KINDS",
    "FORWARD_KEYS",
    "MVC",
    "OBJECTIVES",
    "Accuracy",
    "Callback",
    "CheckpointManager",
    "Classification",
    "DistInfo",
    "EpochBatchSampler",
    "Event",
    "History",
    "MVCZeroProbNLL",
    "MacroF1",
    "MaskedTokenLM",
    "MaskedValueMSE",
    "Metric",
    "MetricSet",
    "Objective",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "TrainerState",
    "TrainingError",
    "ZeroProbNLL",
    "dist_info",
    "init_distributed",
    "make_objectives",
    "read_checkpoint",
]
