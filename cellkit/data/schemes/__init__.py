"""Tokenization schemes, one module each, with ``OPTIONS`` (defaults) and ``run(ctx)``.

=============== ==================================================================================
``scgpt``       per-cell quantile binning of expression (scGPT's Preprocessor + tokenizer);
                ``mode="compat"`` reproduces scGPT 0.2.4 bit-for-bit for a seed,
                ``mode="deterministic"`` (default) gives a cell the same tokens in any batch
``geneformer``  rank-value encoding (Geneformer's TranscriptomeTokenizer), V1 and V2
``teddy``       TEDDY's tokenization options (ranks or bins, ``<cls>``, random genes, annotations)
``perturbgene`` PerturbGene's bin tokens with gene identity as token type, plus phenotype tokens
=============== ==================================================================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..._errors import DataError

__all__ = ["MAX_LENGTH_OPTION", "get_scheme"]

#: each scheme's option for the maximum tokens per cell (specials included)
MAX_LENGTH_OPTION: dict[str, str] = {
    "scgpt": "max_len",
    "geneformer": "model_input_size",
    "teddy": "max_seq_len",
    "perturbgene": "max_length",
}

_MODULES = {name: f"cellkit.data.schemes.{name}" for name in ("scgpt", "geneformer", "teddy", "perturbgene")}


def get_scheme(name: str) -> ModuleType:
    """The module implementing scheme ``name``."""
    if name not in _MODULES:
        raise DataError(f"Unknown tokenization scheme {name!r}; choose one of {sorted(_MODULES)}.")
    return importlib.import_module(_MODULES[name])
