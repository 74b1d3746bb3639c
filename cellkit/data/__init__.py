"""The data boundary: vocabularies, gene resolution, tokenizers, token storage, datasets, sources
(AnnData, ``.h5ad`` partitions, scBank, TileDB-SOMA / CELLxGENE Census via :class:`SomaSource`).

Submodules load lazily so ``import cellkit.data`` stays cheap (no scanpy/anndata until used).
"""

from __future__ import annotations

import importlib
from typing import Any

from .vocab import SPECIAL_ROLES, Coverage, GeneVocab, unknown_gene_error

_LAZY = {
    "InputSpec": "cellkit.data.input_spec",
    "TokenizedCells": "cellkit.data.tokenized",
    "ShardedTokens": "cellkit.data.tokenized",
    "ShardSubset": "cellkit.data.tokenized",
    "ShardWriter": "cellkit.data.tokenized",
    "open_shards": "cellkit.data.tokenized",
    "GeneMatch": "cellkit.data.genes",
    "resolve_genes": "cellkit.data.genes",
    "CellDataset": "cellkit.data.dataset",
    "ShardStreamDataset": "cellkit.data.dataset",
    "LengthBucketSampler": "cellkit.data.dataset",
    "Collator": "cellkit.data.collate",
    "scgpt_random_mask_value": "cellkit.data.collate",
    "select_cells": "cellkit.data.selection",
    "parse_query": "cellkit.data.selection",
    "CellQuery": "cellkit.data.selection",
    "scheme_options": "cellkit.data.tokenize",
    "SomaSource": "cellkit.data.soma",
}

__all__ = ["SPECIAL_ROLES", "Coverage", "GeneVocab", "unknown_gene_error", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cellkit.data' has no attribute {name!r}")
