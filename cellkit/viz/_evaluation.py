"""The embedding evaluation table (:func:`cellkit.evaluate_embeddings`) as one heatmap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._errors import DataError
from ._common import TEMPLATE

__all__ = ["evaluation"]

#: columns drawn, in this order (the metrics, then the aggregates); others are ignored
_METRICS = ("nmi", "ari", "asw_label", "isolated_label", "asw_batch", "graph_connectivity")
_AGGREGATES = ("bio", "batch", "total")
_NAMES = {
    "nmi": "NMI",
    "ari": "ARI",
    "asw_label": "cell-type ASW",
    "isolated_label": "isolated label",
    "asw_batch": "batch ASW",
    "graph_connectivity": "graph conn.",
    "bio": "Bio",
    "batch": "Batch",
    "total": "Total",
}


def evaluation(table: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """One heatmap of an embedding evaluation: embeddings × metrics, each cell labelled with its score.

    Parameters
    ----------
    table
        A :func:`cellkit.evaluate_embeddings` table (rows: embeddings; columns: ``nmi``, ``ari``,
        ``asw_label``, ... and the aggregates ``bio``, ``batch``, ``total``). Columns that are NaN
        in every row (the batch metrics without a ``batch_key``) are left out; baseline rows
        (``table.attrs["baselines"]``) are named in italics.
    title
        Figure title (default ``"embedding evaluation (scIB metrics, higher is better)"``).

    Returns
    -------
    plotly.graph_objects.Figure
        One ``go.Heatmap`` named ``"scores"`` (``z``: rows × drawn columns, top row first on
        screen; colour scale 0–1); a vertical line separates the metrics from the aggregates.

    Raises
    ------
    DataError
        A table without any of the metric columns, or without rows.
    """
    cols = [c for c in (*_METRICS, *_AGGREGATES) if c in table.columns and table[c].notna().any()]
    if not cols or not len(table):
        raise DataError(
            "evaluation needs a cellkit.evaluate_embeddings table (rows: embeddings; columns such as 'nmi', "
            f"'ari', 'bio'); got columns {list(table.columns)} and {len(table)} rows."
        )
    baselines = set(table.attrs.get("baselines", ()))
    rows = [str(r) for r in table.index][::-1]  # plotly draws y bottom-up: the first row on top
    labels = [f"<i>{r}</i>" if r in baselines else r for r in rows]
    z = table[cols].to_numpy(np.float64)[::-1]
    text = np.where(np.isfinite(z), np.char.mod("%.3f", np.nan_to_num(z)), "")
    heat = go.Heatmap(
        z=z,
        x=[_NAMES[c] for c in cols],
        y=labels,
        text=text,
        texttemplate="%{text}",
        zmin=0.0,
        zmax=1.0,
        colorscale="Viridis",
        name="scores",
        hovertemplate="%{y} · %{x}: %{z:.3f}<extra></extra>",
        colorbar={"title": {"text": "score"}},
    )
    fig = go.Figure(heat)
    n_metrics = sum(c in _METRICS for c in cols)
    if 0 < n_metrics < len(cols):
        fig.add_vline(x=n_metrics - 0.5, line={"color": "white", "width": 4})
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title or "embedding evaluation (scIB metrics, higher is better)"},
        height=max(260, 40 * len(rows) + 140),
        margin={"l": 110, "r": 20, "t": 50, "b": 60},
        xaxis={"side": "bottom", "type": "category"},
        yaxis={"type": "category"},
    )
    return fig
