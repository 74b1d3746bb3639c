"""The cellkit studio: point-and-click panels over the public API (JupyterLab widgets).

``cellkit.widgets`` is the only package that imports ipywidgets. Every panel is a thin
view: its buttons call plain methods (``ModelPanel.load``, ``DataPanel.tokenize``,
``FinetunePanel.start``, ...) that call the public API, and tests drive those methods without a
browser.

>>> studio = cellkit.Studio(adata=adata, model=cellkit.datasets.demo_model())  # doctest: +SKIP
>>> studio  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._base import Panel, guarded
from ._state import StudioState

if TYPE_CHECKING:  # pragma: no cover
    from ._attention import AttentionPanel
    from ._data import DataPanel
    from ._embedding import EmbeddingPanel
    from ._finetune import FinetunePanel
    from ._genes import GenePanel
    from ._insilico import InSilicoPanel
    from ._model import ModelPanel
    from ._response import PerturbationResponsePanel
    from ._studio import Studio

_LAZY = {
    "ModelPanel": "._model",
    "DataPanel": "._data",
    "FinetunePanel": "._finetune",
    "EmbeddingPanel": "._embedding",
    "GenePanel": "._genes",
    "AttentionPanel": "._attention",
    "InSilicoPanel": "._insilico",
    "PerturbationResponsePanel": "._response",
    "Studio": "._studio",
}

__all__ = [
    "AttentionPanel",
    "DataPanel",
    "EmbeddingPanel",
    "FinetunePanel",
    "GenePanel",
    "InSilicoPanel",
    "ModelPanel",
    "Panel",
    "PerturbationResponsePanel",
    "Studio",
    "StudioState",
    "guarded",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
