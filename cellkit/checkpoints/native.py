"""cellkit's own format: ``config.json`` + ``model.safetensors`` + ``vocab.json``.

An optional ``resources.json`` holds named tables a tokenizer needs (e.g. Geneformer's gene
medians). ``config.json`` holds ``{"format": "cellkit", "format_version": 1, "cellkit_version": ...,
"model": <CellModelConfig dict>}``. Tensors are safetensors (no pickle); tied aliases are not
stored twice. A save replaces the directory as a whole (:func:`cellkit._utils.atomic_directory`:
written into a hidden sibling, then swapped in), so after a crash at any moment the directory holds
the old model or the new one; :func:`cellkit._utils.recover_directory` finds the old copy when the
crash fell between the swap's two renames.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cellkit._errors import CheckpointError
from cellkit._utils import atomic_directory, read_json
from cellkit._version import __version__
from cellkit.data.vocab import GeneVocab

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "is_native",
    "read_native",
    "replaceable_model_dir",
    "write_native",
]

FORMAT_NAME = "cellkit"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, VOCAB, RESOURCES = "config.json", "model.safetensors", "vocab.json", "resources.json"
#: files cellkit itself writes into model directories (its own and scGPT's format, CLI --out extras)
_MODEL_DIR_FILES = frozenset(
    {CONFIG, WEIGHTS, VOCAB, RESOURCES, "args.json", "best_model.pt", "run.json"}
    | {"history_steps.csv", "history_epochs.csv", "metrics.json"}
)


def is_native(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a directory whose ``config.json`` says ``"format": "cellkit"``.

    Raises
    ------
    cellkit.CheckpointError
        ``config.json`` exists but is not a readable JSON object (every format that has one needs
        it to be), so the error names the damaged file instead of "not a model directory".
    """
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    doc = _read_config(cfg)
    return doc.get("format") == FORMAT_NAME


def _read_config(cfg: Path) -> dict[str, Any]:
    """``config.json`` as an object; a damaged file is an error (naming it), not "some other format"."""
    return read_json(cfg, what="model config", expect=dict, error=CheckpointError)


def replaceable_model_dir(path: str | os.PathLike[str]) -> bool:
    """True if directory ``path`` may be replaced by a save: a saved model (cellkit or scGPT
    format), or a directory holding only files cellkit writes into model directories."""
    from .scgpt import detect as is_scgpt

    path = Path(path)
    try:
        if is_native(path) or is_scgpt(path):
            return True
    except CheckpointError:  # a damaged config.json: judge the directory by its file names
        pass
    return all(p.name in _MODEL_DIR_FILES and p.is_file() for p in path.iterdir())


def write_native(
    path: str | os.PathLike[str],
    model_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    vocab: GeneVocab,
    resources: dict[str, Any] | None = None,
) -> Path:
    """Write a cellkit model directory ``path`` as a whole (see :func:`cellkit._utils.atomic_directory`).

    An existing ``path`` is replaced only when it is a saved model (or empty); anything else is
    refused with a :class:`~cellkit.ConfigError`.
    """
    with atomic_directory(path, may_replace=replaceable_model_dir, what="model directory") as tmp:
        write_native_files(tmp, model_config, state, vocab, resources)
    return Path(path)


def write_native_files(
    directory: Path,
    model_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    vocab: GeneVocab,
    resources: dict[str, Any] | None = None,
) -> None:
    """Write the files of a cellkit model into the existing, empty ``directory`` (no swap)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT_NAME})
    vocab.to_json(directory / VOCAB)
    if resources:
        (directory / RESOURCES).write_text(json.dumps(resources, sort_keys=True), encoding="utf-8")
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "cellkit_version": __version__,
        "model": model_config,
    }
    (directory / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")


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
    cfg = path / CONFIG
    doc = _read_config(cfg)
    if doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{cfg} is not a cellkit config (field 'format' is {doc.get('format')!r:.80}).")
    version = doc.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{cfg}: field 'format_version' must be an integer >= 0, got {version!r:.80}.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in cellkit format version {version}, newer than this cellkit "
            f"understands ({FORMAT_VERSION}); upgrade cellkit."
        )
    model = doc.get("model")
    if not isinstance(model, dict):
        what = "missing" if model is None else f"a {type(model).__name__}"
        raise CheckpointError(
            f"{cfg}: field 'model' is {what}; it must be an object with the model's architecture "
            "(encoder, heads, specials …)."
        )
    specials = model.get("specials") or {}
    if not isinstance(specials, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in specials.items()
    ):
        raise CheckpointError(
            f'{cfg}: field \'model.specials\' must map roles to token strings (e.g. {{"pad": "<pad>"}}), '
            f"got {specials!r:.80}."
        )
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path / WEIGHTS} cannot be read as safetensors ({exc}); the file is truncated or corrupt."
        ) from None
    vocab = GeneVocab.from_json(path / VOCAB, specials=specials)
    resources: dict[str, Any] = {}
    if (path / RESOURCES).is_file():
        resources = read_json(
            path / RESOURCES, what="tokenizer resources file", expect=dict, error=CheckpointError
        )
    return model, tensors, vocab, resources
