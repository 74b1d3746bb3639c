"""Plotly figures of cellkit's results: embeddings, gene networks, heatmaps, training curves.

Every function takes plain arrays / DataFrames (and, where natural, an AnnData plus keys) and
returns a :class:`plotly.graph_objects.Figure`; nothing here imports a model or torch. Show a
figure with ``fig.show()`` (notebook or script), save it with :func:`save_html` (atomic) or
``fig.write_html(path)``, or hand it to a ``go.FigureWidget`` for live updates (the studio does).

- :func:`embedding` — WebGL scatter of a UMAP/PCA, coloured by an obs column or a gene;
  ``fig.data[i].customdata[:, 0]`` are obs positions (map lasso selections back to cells);
  ``figure=`` updates an on-screen ``go.FigureWidget`` in place, sending only what changed.
- :func:`embedding_selection` — every cell inside a lasso / box, also those a subsample left out.
- :func:`embedding_colors` — the cells and colours :func:`embedding` draws, as flat arrays for a
  WebGL renderer of millions of points (the studio's jupyter-scatter view).
- :func:`gene_network` — genes joined by similarity above a threshold (networkx spring layout).
- :func:`similar_genes_bar` — the genes most similar to a gene; :func:`token_length_histogram` —
  tokens per cell against the tokenizer's limit.
- :func:`draw_into` — show a figure in an existing ``go.FigureWidget``, sending only what changed
  (how the studio's panels update their plots).
- :func:`attention_heatmap` — query genes × key genes.
- :func:`program_heatmap` — gene-program scores per cell type, scaled and clustered.
- :func:`training_curves` — loss/lr per step, metrics per epoch (``cellkit.train.History``).
- :func:`loss_figure`, :func:`epoch_figure` — compact loss-per-step and metrics-per-epoch figures that
  a live view fills as training events arrive (:func:`fill_training_figure`; the studio does).
- :func:`confusion_matrix` — true × predicted classes, normalised per true class.
- :func:`evaluation` — an embedding evaluation (:func:`cellkit.evaluate_embeddings`): embeddings ×
  scIB metrics, the baselines' rows beside the model's.
- :func:`perturbation_shifts`, :func:`perturbation_cells` — in-silico perturbation: mean embedding
  shift per perturbation (with its random-gene null), per-cell shift violins.
- :func:`perturbation_response` — predicted (and observed) expression changes of a response model.

Static figures for papers (matplotlib, PDF / SVG / PNG without a browser), with the same inputs:
:func:`static_embedding`, :func:`static_attention_heatmap`, :func:`static_confusion_matrix` (counts
and row fractions in the cells), :func:`static_training_curves`; write them with
:func:`save_figure` (atomic, format by suffix). They load matplotlib on first use only.

>>> cellkit.viz.save_figure(cellkit.viz.static_embedding(adata, color="cell_type"), "umap.pdf")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._bars import similar_genes_bar, token_length_histogram
from ._colors import EmbeddingColors, embedding_colors
from ._common import draw_into, save_html
from ._embedding import embedding, embedding_selection
from ._evaluation import evaluation
from ._heatmaps import attention_heatmap, confusion_matrix, program_heatmap
from ._network import gene_network
from ._palettes import default_palette
from ._perturbation import perturbation_cells, perturbation_response, perturbation_shifts
from ._training import epoch_figure, fill_training_figure, loss_figure, training_curves

if TYPE_CHECKING:  # pragma: no cover
    from ._static import (
        save_figure,
        static_attention_heatmap,
        static_confusion_matrix,
        static_embedding,
        static_training_curves,
    )

#: static (matplotlib) figures, imported on first use so that ``import cellkit.viz`` stays light
_LAZY = {
    name: "._static"
    for name in (
        "save_figure",
        "static_attention_heatmap",
        "static_confusion_matrix",
        "static_embedding",
        "static_training_curves",
    )
}

__all__ = [
    "EmbeddingColors",
    "attention_heatmap",
    "confusion_matrix",
    "default_palette",
    "draw_into",
    "embedding",
    "embedding_colors",
    "embedding_selection",
    "epoch_figure",
    "evaluation",
    "fill_training_figure",
    "gene_network",
    "loss_figure",
    "perturbation_cells",
    "perturbation_response",
    "perturbation_shifts",
    "program_heatmap",
    "save_figure",
    "save_html",
    "similar_genes_bar",
    "static_attention_heatmap",
    "static_confusion_matrix",
    "static_embedding",
    "static_training_curves",
    "token_length_histogram",
    "training_curves",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
