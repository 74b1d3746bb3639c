"""cellkit: a notebook-first kit for single-cell foundation models.

One PyTorch transformer core (:mod:`cellkit.core`) runs scGPT, Geneformer and PerturbGene-style
models; loaders, tokenizers, training, analysis and widgets are built around it.

``import cellkit`` is light: submodules (and torch) load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    Cancelled,
    CellkitError,
    CheckpointError,
    ConfigError,
    DataError,
    MissingDependencyError,
    UnknownGeneError,
    VocabError,
)
from ._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from ._utils import Progress
    from ._utils._run import RunRecord, load_run
    from .analysis import embed_cells, embedding_metrics, evaluate_embeddings, transfer_labels
    from .analysis._runs import rerun
    from .core import CellEncoder, EncoderConfig, EncoderOutput
    from .data import Coverage, GeneVocab
    from .data.input_spec import InputSpec
    from .data.selection import select_cells
    from .data.tokenize import tokenize
    from .data.tokenized import TokenizedCells, open_shards
    from .model import CellModel, CellModelConfig, CellModelOutput, inspect_checkpoint, load_model
    from .perturbation import (
        PerturbationArchitecture,
        PerturbationModel,
        evaluate_perturbation,
        fit_perturbation_model,
        load_perturbation_model,
        parse_condition,
    )
    from .tasks import FinetuneResult, PretrainResult, finetune, predict, pretrain
    from .train import Callback, Event, History, Trainer, TrainerConfig
    from .widgets import Studio

# public name -> module that defines it (imported lazily)
_LAZY = {
    "EncoderConfig": "cellkit.core",
    "CellEncoder": "cellkit.core",
    "EncoderOutput": "cellkit.core",
    "GeneVocab": "cellkit.data",
    "Coverage": "cellkit.data",
    "InputSpec": "cellkit.data.input_spec",
    "CellModel": "cellkit.model",
    "CellModelConfig": "cellkit.model",
    "CellModelOutput": "cellkit.model",
    "load_model": "cellkit.model",
    "inspect_checkpoint": "cellkit.model",
    "tokenize": "cellkit.data.tokenize",
    "select_cells": "cellkit.data.selection",
    "TokenizedCells": "cellkit.data.tokenized",
    "open_shards": "cellkit.data.tokenized",
    "finetune": "cellkit.tasks",
    "predict": "cellkit.tasks",
    "pretrain": "cellkit.tasks",
    "FinetuneResult": "cellkit.tasks",
    "PretrainResult": "cellkit.tasks",
    "fit_perturbation_model": "cellkit.perturbation",
    "evaluate_perturbation": "cellkit.perturbation",
    "load_perturbation_model": "cellkit.perturbation",
    "parse_condition": "cellkit.perturbation",
    "PerturbationModel": "cellkit.perturbation",
    "PerturbationArchitecture": "cellkit.perturbation",
    "Trainer": "cellkit.train",
    "TrainerConfig": "cellkit.train",
    "Callback": "cellkit.train",
    "Event": "cellkit.train",
    "History": "cellkit.train",
    "Progress": "cellkit._utils",
    "RunRecord": "cellkit._utils._run",
    "load_run": "cellkit._utils._run",
    "rerun": "cellkit.analysis._runs",
    "embed_cells": "cellkit.analysis",
    "transfer_labels": "cellkit.analysis",
    "embedding_metrics": "cellkit.analysis",
    "evaluate_embeddings": "cellkit.analysis",
    "Studio": "cellkit.widgets",
}
_SUBMODULES = {
    "core",
    "heads",
    "data",
    "checkpoints",
    "model",
    "train",
    "presets",
    "perturbation",
    "datasets",
    "genes",
    "analysis",
    "viz",
    "widgets",
}

__all__ = [
    "Callback",
    "Cancelled",
    "CellEncoder",
    "CellModel",
    "CellModelConfig",
    "CellModelOutput",
    "CellkitError",
    "CheckpointError",
    "ConfigError",
    "Coverage",
    "DataError",
    "EncoderConfig",
    "EncoderOutput",
    "Event",
    "FinetuneResult",
    "GeneVocab",
    "History",
    "InputSpec",
    "MissingDependencyError",
    "PerturbationArchitecture",
    "PerturbationModel",
    "PretrainResult",
    "Progress",
    "RunRecord",
    "Studio",
    "TokenizedCells",
    "Trainer",
    "TrainerConfig",
    "UnknownGeneError",
    "VocabError",
    "__version__",
    "embed_cells",
    "embedding_metrics",
    "evaluate_embeddings",
    "evaluate_perturbation",
    "finetune",
    "fit_perturbation_model",
    "inspect_checkpoint",
    "load_model",
    "load_perturbation_model",
    "load_run",
    "open_shards",
    "parse_condition",
    "predict",
    "pretrain",
    "rerun",
    "select_cells",
    "tokenize",
    "transfer_labels",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"cellkit.{name}")
    raise AttributeError(f"module 'cellkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | _SUBMODULES)
