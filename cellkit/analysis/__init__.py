"""Analysis on top of a model: cell embeddings, UMAP, reference mapping, metrics, gene programs, attention.

Every function takes AnnData first (scverse manners), writes results only under ``key_added`` and
keeps the input cell order. Figures live in :mod:`cellkit.viz` (arrays in, plotly figures out).
"""

from __future__ import annotations

from ._io import write_csv
from .attention import (
    CellAttention,
    attention_difference,
    attention_maps,
    gene_attention,
    top_influenced_genes,
)
from .embeddings import cell_embeddings, embed_cells, resolve_hidden_layer, umap
from .evaluate import evaluate_embeddings
from .genes import (
    contextual_gene_embeddings,
    gene_embeddings,
    gene_network,
    gene_programs,
    gene_similarity,
    score_programs,
    similar_genes,
)
from .mapping import embedding_metrics, transfer_labels
from .perturb import InSilicoResult, in_silico_perturb, perturb_tokens

__all__ = [
    "CellAttention",
    "InSilicoResult",
    "attention_difference",
    "attention_maps",
    "cell_embeddings",
    "contextual_gene_embeddings",
    "embed_cells",
    "embedding_metrics",
    "evaluate_embeddings",
    "gene_attention",
    "gene_embeddings",
    "gene_network",
    "gene_programs",
    "gene_similarity",
    "in_silico_perturb",
    "perturb_tokens",
    "resolve_hidden_layer",
    "score_programs",
    "similar_genes",
    "top_influenced_genes",
    "transfer_labels",
    "umap",
    "write_csv",
]
