"""cellkit's own format: ``config.json`` + ``model.safetensors`` + ``vocab.json``.

An optional ``resources.json`` holds named tables a tokenizer needs (e.g. Geneformer's gene
medians). ``config.json`` holds ``{"format": "cellkit", "format_version": 1, "cellkit_version": ...,
"model": <CellModelConfig dict>}``. Tensors are safetensors (no pickle); tied aliases are not
stored twice. Every file is written atomically (temporary file + rename) and ``config.json`` is
written last, so an interrupted save never leaves something that loads as a valid model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cellkit._errors import CheckpointError
from cellkit._utils import atomic_path, atomic_write_text
from cellkit._version import __version__
from cellkit.data.vocab import GeneVocab

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "is_native", "read_native", "write_native"]

FORMAT_NAME = "cellkit"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, VOCAB, RESOURCES = "config.json", "model.safetensors", "vocab.json", "resources.json"


def is_native(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a directory whose ``config.json`` says ``"format": "cellkit"``."""
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def write_native(
    path: str | os.PathLike[str],
    model_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    vocab: GeneVocab,
    resources: dict[str, Any] | None = None,
) -> Path:
    """Write the files into directory ``path`` (created if needed)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"{path} exists and is not a directory; choose a directory path to save a model."
        )
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME})
    vocab.to_json(path / VOCAB)
    if resources:
        atomic_write_text(path / RESOURCES, json.dumps(resources, sort_keys=True))
    elif (path / RESOURCES).exists():
        (path / RESOURCES).unlink()
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "cellkit_version": __version__,
        "model": model_config,
    }
    atomic_write_text(path / CONFIG, json.dumps(doc, indent=2, sort_keys=True))
    return path


def read_native(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor], GeneVocab, dict[str, Any]]:
    """Read a cellkit directory: ``(model config dict, tensors, vocab, resources)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG, WEIGHTS, VOCAB):
        if not (path / name).is_file():
            raise CheckpointError(
                f"{path} is missing {name}; a cellkit model directory holds {CONFIG}, {WEIGHTS} and {VOCAB}."
            )
    try:
        doc = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG} is not valid JSON ({exc}).") from None
    if doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path / CONFIG} is not a cellkit config (format={doc.get('format')!r}).")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in cellkit format version {doc['format_version']}, newer than this cellkit "
            f"understands ({FORMAT_VERSION}); upgrade cellkit."
        )
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path / WEIGHTS} cannot be read as safetensors ({exc}); the file is truncated or corrupt."
        ) from None
    specials = doc["model"].get("specials") or {}
    vocab = GeneVocab.from_json(path / VOCAB, specials=specials)
    resources: dict[str, Any] = {}
    if (path / RESOURCES).is_file():
        try:
            resources = json.loads((path / RESOURCES).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path / RESOURCES} is not valid JSON ({exc}).") from None
    return doc["model"], tensors, vocab, resources
