"""Analysis on top of a model: cell embeddings, UMAP, reference mapping, metrics, gene programs, attention.

Every function takes AnnData first (scverse manners), writes results only under ``key_added`` and
keeps the input cell order. Figures live in :mod:`cellkit.viz` (arrays in, plotly figures out).
"""

from __future__ import annotations

from .embeddings import cell_embeddings, embed_cells, resolve_hidden_layer, umap

__all__ = ["cell_embeddings", "embed_cells", "resolve_hidden_layer", "umap"]
