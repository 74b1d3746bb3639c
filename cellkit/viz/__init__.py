"""Plotly figures of cellkit's results: embeddings, gene networks, heatmaps, training curves.

Every function takes plain arrays / DataFrames (and, where natural, an AnnData plus keys) and
returns a :class:`plotly.graph_objects.Figure`; nothing here imports a model or torch. Show a
figure with ``fig.show()`` (notebook or script), save it with :func:`save_html` (atomic) or
``fig.write_html(path)``, or hand it to a ``go.FigureWidget`` for live updates (the studio does).

- :func:`embedding` — WebGL scatter of a UMAP/PCA, coloured by an obs column or a gene;
  ``fig.data[i].customdata[:, 0]`` are obs positions (map lasso selections back to cells).
- :func:`gene_network` — genes joined by similarity above a threshold (networkx spring layout).
- :func:`attention_heatmap` — query genes × key genes.
- :func:`program_heatmap` — gene-program scores per cell type, scaled and clustered.
- :func:`training_curves` — loss/lr per step, metrics per epoch (``cellkit.train.History``).
- :func:`confusion_matrix` — true × predicted classes, normalised per true class.
"""

from __future__ import annotations

from ._common import save_html
from ._embedding import embedding
from ._heatmaps import attention_heatmap, confusion_matrix, program_heatmap
from ._network import gene_network
from ._palettes import default_palette
from ._training import training_curves

__all__ = [
    "attention_heatmap",
    "confusion_matrix",
    "default_palette",
    "embedding",
    "gene_network",
    "program_heatmap",
    "save_html",
    "training_curves",
]
