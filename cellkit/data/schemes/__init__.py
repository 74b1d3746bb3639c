"""Tokenization schemes, one module each, with ``OPTIONS`` (defaults) and ``run(ctx)``.

=============== ==================================================================================
``scgpt``       per-cell quantile binning of expression (scGPT's Preprocessor + tokenizer);
                ``mode="compat"`` reproduces scGPT 0.2.4 bit-for-bit for a seed,
                ``mode="deterministic"`` (default) gives a cell the same tokens in any batch
``geneformer``  rank-value encoding (Geneformer's TranscriptomeTokenizer), V1 and V2
``teddy``       TEDDY's tokenization options (ranks or bins, ``<cls>``, random genes, annotations)
``perturbgene`` PerturbGene's bin tokens with gene identity as token type, plus phenotype tokens
=============== ==================================================================================

The maximum tokens per cell (special tokens included) is the option ``max_length`` in every
scheme; each also takes the upstream tool's name for it (``scgpt``: ``max_len``, ``geneformer``:
``model_input_size``, ``teddy``: ``max_seq_len``), and the two must agree when both are given.
Left at ``None`` it is the model's :attr:`InputSpec.max_length <cellkit.InputSpec.max_length>`
(``scgpt`` excepted: no limit, as scGPT's tokenizer), and every scheme records the effective
value as ``options["max_length"]`` (:attr:`TokenizedCells.max_length
<cellkit.TokenizedCells.max_length>`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..._errors import DataError

__all__ = ["get_scheme"]

_MODULES = {name: f"cellkit.data.schemes.{name}" for name in ("scgpt", "geneformer", "teddy", "perturbgene")}


def get_scheme(name: str) -> ModuleType:
    """The module implementing scheme ``name``."""
    if name not in _MODULES:
        raise DataError(f"Unknown tokenization scheme {name!r}; choose one of {sorted(_MODULES)}.")
    return importlib.import_module(_MODULES[name])
