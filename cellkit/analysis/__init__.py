"""Analysis on top of a model: cell embeddings, UMAP, reference mapping, metrics, gene programs, attention.

Every function takes AnnData first (scverse manners), writes results only under ``key_added`` and
keeps the input cell order. Figures live in :mod:`cellkit.viz` (arrays in, plotly figures out).
"""

from __future__ import annotations

from .embeddings import cell_embeddings, embed_cells, resolve_hidden_layer, umap
from .mapping import embedding_metrics, transfer_labels

__all__ = [
    "cell_embeddings",
    "embed_cells",
    "embedding_metrics",
    "resolve_hidden_layer",
    "transfer_labels",
    "umap",
]
