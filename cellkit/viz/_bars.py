"""Bar charts of small results: genes most similar to a gene, tokens per cell."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._errors import DataError
from ._common import TEMPLATE

__all__ = ["similar_genes_bar", "token_length_histogram"]

#: the one colour of single-series bars
_BAR_COLOR = "#1f77b4"


def similar_genes_bar(
    table: pd.DataFrame | None, *, gene: str | None = None, title: str | None = None
) -> go.Figure:
    """Horizontal bars of the genes most similar to a gene, the most similar on top.

    Parameters
    ----------
    table
        A :func:`cellkit.analysis.similar_genes` table (columns ``gene`` and ``similarity``, most
        similar first); ``None`` or empty: an empty figure with the axes titled.
    gene
        The query gene, for the title.
    title
        Figure title (default ``"genes most similar to <gene>"``).

    Returns
    -------
    plotly.graph_objects.Figure
        One ``go.Bar`` trace named ``"similarity"`` (``x`` cosine similarity, ``y`` genes); the
        height grows with the number of genes (18 px each) so every name stays readable.

    Raises
    ------
    DataError
        A table without the ``gene`` / ``similarity`` columns.
    """
    if table is None:
        table = pd.DataFrame({"gene": [], "similarity": []})
    missing = [c for c in ("gene", "similarity") if c not in table.columns]
    if missing:
        raise DataError(
            f"similar_genes_bar needs a table with columns 'gene' and 'similarity' "
            f"(cellkit.analysis.similar_genes); missing {missing}."
        )
    genes = table["gene"].astype(str).to_numpy()[::-1]
    sims = table["similarity"].to_numpy(np.float64)[::-1]
    bar = go.Bar(
        x=sims,
        y=genes,
        orientation="h",
        marker={"color": _BAR_COLOR},
        name="similarity",
        hovertemplate="%{y}: %{x:.3f}<extra></extra>",
    )
    if title is None:
        title = f"genes most similar to {gene}" if gene else "similar genes"
    fig = go.Figure(bar)
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title},
        height=max(300, 18 * len(table) + 90),
        margin={"l": 90, "r": 20, "t": 40, "b": 40},
        xaxis={"title": {"text": "cosine similarity"}},
        yaxis={"type": "category"},
    )
    return fig


def token_length_histogram(
    lengths: Any, *, nbins: int = 50, max_length: int | None = None, title: str = "Tokens per cell"
) -> go.Figure:
    """Histogram of tokens per cell (e.g. ``tokens.lengths``), with the length limit marked.

    Parameters
    ----------
    lengths
        ``(n_cells,)`` integer tokens per cell (:attr:`cellkit.TokenizedCells.lengths`).
    nbins
        Number of bins (plotly's ``nbinsx``).
    max_length
        The tokenizer's limit (:attr:`cellkit.TokenizedCells.max_length`): a dashed line, so cells
        cut at the limit are visible as a pile-up against it.
    title
        Figure title.

    Returns
    -------
    plotly.graph_objects.Figure
        One ``go.Histogram`` trace named ``"cells"``.
    """
    x = np.asarray(lengths if lengths is not None else [], dtype=np.int64).reshape(-1)
    fig = go.Figure(go.Histogram(x=x, nbinsx=int(nbins), marker_color=_BAR_COLOR, name="cells"))
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title},
        height=260,
        margin={"l": 50, "r": 10, "t": 40, "b": 40},
        xaxis_title="tokens per cell",
        yaxis_title="cells",
        bargap=0.05,
    )
    if max_length is not None:
        fig.add_vline(x=int(max_length), line_dash="dash", line_color="#777777", annotation_text="limit")
    return fig
