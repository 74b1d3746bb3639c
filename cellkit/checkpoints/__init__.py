"""The edge of cellkit: the only code that knows file layouts and foreign key names.

Each foreign format is a module with ``detect(path) -> bool`` and
``read(path, **options) -> ForeignCheckpoint``; :func:`cellkit.load_model` picks one.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from cellkit._errors import CheckpointError

from .keymap import load_state_strict
from .native import is_native, read_native, write_native
from .report import ForeignCheckpoint, LoadReport

__all__ = [
    "FOREIGN_FORMATS",
    "ForeignCheckpoint",
    "LoadReport",
    "detect_format",
    "foreign_reader",
    "is_native",
    "load_state_strict",
    "read_native",
    "write_native",
]

#: format name -> module implementing detect/read
FOREIGN_FORMATS = {"scgpt": "cellkit.checkpoints.scgpt", "geneformer": "cellkit.checkpoints.geneformer"}


def foreign_reader(name: str) -> ModuleType:
    """The reader module of a foreign format."""
    if name not in FOREIGN_FORMATS:
        raise CheckpointError(
            f"Unknown checkpoint format {name!r}; known: 'cellkit', {', '.join(map(repr, FOREIGN_FORMATS))}."
        )
    return importlib.import_module(FOREIGN_FORMATS[name])


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"cellkit"``, ``"scgpt"`` or ``"geneformer"`` for a model directory; a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass the directory of a saved model.")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the model *directory* that contains it.")
    if is_native(path):
        return "cellkit"
    for name in FOREIGN_FORMATS:
        if foreign_reader(name).detect(path):
            return name
    present = sorted(p.name for p in path.iterdir())[:12]
    if (path / "model").is_dir() and is_native(path / "model"):
        raise CheckpointError(
            f"{path} is a run directory (the --out of cellkit finetune / pretrain); its model is in "
            f"{path / 'model'}: load that directory."
        )
    raise CheckpointError(
        f"{path} is not a model directory cellkit recognises (it holds {present}). Expected one of: a cellkit "
        "directory (config.json with format 'cellkit', model.safetensors, vocab.json); an scGPT directory "
        "(args.json, best_model.pt, vocab.json); a Geneformer/Hugging Face BERT directory (config.json with "
        "model_type 'bert', model.safetensors or pytorch_model.bin, plus token_dictionary*.pkl)."
    )
