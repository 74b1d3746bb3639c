"""Figures of perturbation results: in-silico embedding shifts and predicted expression changes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._errors import DataError
from ._common import TEMPLATE

__all__ = ["perturbation_cells", "perturbation_response", "perturbation_shifts"]

#: per-cell points are drawn in the violins up to this many cells per perturbation
MAX_POINTS = 300


def _plain(values: Any) -> tuple[float | None, ...]:
    """Floats for plotly, ``None`` for missing / NaN / infinite values."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            out.append(None)
            continue
        out.append(f if math.isfinite(f) else None)
    return tuple(out)


def _require(frame: Any, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{what} must be a pandas DataFrame, got {type(frame).__name__}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what} lacks the column(s) {missing}; it has {list(frame.columns)}.")
    return frame


def perturbation_shifts(
    summary: pd.DataFrame, *, title: str = "Mean embedding shift (1 − cosine)"
) -> go.Figure:
    """Bar chart of the mean embedding shift per perturbation (an in-silico perturbation summary).

    Trace 0 has one bar per row (``mean_shift``; hover: the number of cells); then, when the
    summary has a null distribution, the null mean ± std of the random genes as black diamonds
    (``"null mean ± std (random genes)"``), and, with a goal, the ``goal_shift`` bars
    (``"shift toward goal"``).

    Parameters
    ----------
    summary
        :attr:`cellkit.analysis.InSilicoResult.summary` (``perturbation``, ``mean_shift``,
        ``n_cells``; optionally ``null_mean``, ``null_std``, ``goal_shift``).
    title
        Figure title.

    Returns
    -------
    :class:`plotly.graph_objects.Figure`.

    Examples
    --------
    >>> cellkit.viz.perturbation_shifts(res.summary).show()  # doctest: +SKIP
    """
    summary = _require(summary, ("perturbation", "mean_shift", "n_cells"), "summary")
    labels = [str(p) for p in summary["perturbation"]]
    fig = go.Figure(
        layout=go.Layout(
            title=title,
            template=TEMPLATE,
            xaxis_title="perturbation",
            yaxis_title="mean shift",
            barmode="group",
            margin=dict(l=60, r=10, t=40, b=80),
            legend=dict(orientation="h", y=-0.35),
        )
    )
    fig.add_bar(
        x=labels,
        y=_plain(summary["mean_shift"]),
        name="mean shift",
        customdata=np.asarray(summary["n_cells"]),
        hovertemplate="%{x}<br>mean shift %{y:.3g}<br>%{customdata} cells<extra></extra>",
    )
    if "null_mean" in summary and summary["null_mean"].notna().any():
        std = summary["null_std"] if "null_std" in summary else pd.Series(np.nan, index=summary.index)
        fig.add_scatter(
            x=labels,
            y=_plain(summary["null_mean"]),
            error_y=dict(type="data", array=[v or 0.0 for v in _plain(std)], visible=True),
            mode="markers",
            marker=dict(symbol="diamond", size=10, color="black"),
            name="null mean ± std (random genes)",
        )
    if "goal_shift" in summary:
        fig.add_bar(x=labels, y=_plain(summary["goal_shift"]), name="shift toward goal")
    return fig


def perturbation_cells(
    cells: pd.DataFrame, *, max_points: int = MAX_POINTS, title: str = "Per-cell shift"
) -> go.Figure:
    """Violins of the per-cell embedding shift, one per perturbation (counted cells only).

    Parameters
    ----------
    cells
        :attr:`cellkit.analysis.InSilicoResult.cells` (``perturbation``, ``cell``, ``counted``,
        ``shift``).
    max_points
        Draw the individual cells of a perturbation up to this many.
    title
        Figure title.

    Returns
    -------
    :class:`plotly.graph_objects.Figure` with one violin per perturbation, in the order they
    first appear (``name`` the perturbation, hover text the cell names).
    """
    cells = _require(cells, ("perturbation", "cell", "counted", "shift"), "cells")
    counted = cells[cells["counted"].astype(bool)]
    fig = go.Figure(
        layout=go.Layout(
            title=title,
            template=TEMPLATE,
            yaxis_title="shift (1 − cosine)",
            margin=dict(l=60, r=10, t=40, b=80),
            showlegend=False,
        )
    )
    for label in dict.fromkeys(str(p) for p in cells["perturbation"]):
        rows = counted[counted["perturbation"].astype(str) == label]
        y = rows["shift"].to_numpy(dtype=float)
        fig.add_violin(
            y=tuple(y.tolist()),
            name=label,
            box_visible=True,
            meanline_visible=True,
            points="all" if len(y) <= max_points else False,
            text=tuple(rows["cell"].astype(str)),
            hoverinfo="y+text",
        )
    return fig


def perturbation_response(changes: pd.DataFrame, *, top_k: int = 20, title: str | None = None) -> go.Figure:
    """Predicted (and observed) expression changes of the most-changed genes, per perturbation.

    The genes shown are the ``top_k`` with the largest ``|predicted_change|`` over the
    perturbations. One bar trace per perturbation (``name`` the perturbation), then one marker
    trace ``"<perturbation> observed"`` per perturbation with an observed change.

    Parameters
    ----------
    changes
        :meth:`cellkit.PerturbationModel.changes` (``perturbation``, ``gene``,
        ``predicted_change``, ``observed_change``).
    top_k
        Number of genes shown.
    title
        Figure title (default "Predicted expression change (top N genes)").

    Returns
    -------
    :class:`plotly.graph_objects.Figure`.
    """
    changes = _require(changes, ("perturbation", "gene", "predicted_change"), "changes")
    if top_k < 1:
        raise DataError(f"top_k must be a positive integer, got {top_k!r}.")
    labels = list(dict.fromkeys(str(p) for p in changes["perturbation"]))
    frame = changes.assign(perturbation=changes["perturbation"].astype(str), gene=changes["gene"].astype(str))
    predicted = frame.pivot(index="gene", columns="perturbation", values="predicted_change")
    strength = predicted.abs().max(axis=1).sort_values(ascending=False, kind="stable")
    shown = [str(g) for g in strength.index[:top_k]]
    fig = go.Figure(
        layout=go.Layout(
            title=title or f"Predicted expression change (top {len(shown)} genes)",
            template=TEMPLATE,
            xaxis_title="gene",
            yaxis_title="mean − control mean",
            barmode="group",
            margin=dict(l=60, r=10, t=40, b=90),
            legend=dict(orientation="h", y=-0.35),
        )
    )
    for p in labels:
        fig.add_bar(x=shown, y=_plain(predicted.loc[shown, p]), name=p)
    if "observed_change" in frame:
        observed = frame.pivot(index="gene", columns="perturbation", values="observed_change")
        for p in labels:
            if observed[p].notna().any():
                fig.add_scatter(
                    x=shown,
                    y=_plain(observed.loc[shown, p]),
                    mode="markers",
                    marker=dict(symbol="diamond", size=9, line=dict(width=1, color="black")),
                    name=f"{p} observed",
                )
    return fig
