"""Figures of perturbation results: in-silico embedding shifts and predicted expression changes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._errors import DataError
from ._common import TEMPLATE, add_note

__all__ = ["perturbation_cells", "perturbation_response", "perturbation_shifts"]

#: per-cell points are drawn in the violins up to this many cells per perturbation
MAX_POINTS = 300
#: the rule of ``InSilicoResult.summary["distinguishable"]``, used when a summary lacks that column
DISTINGUISHABLE_P, DISTINGUISHABLE_Z = 0.05, 2.0
#: bar colours: a shift that stands out from the random genes', and one that does not
SHIFT_COLOR, NULL_LIKE_COLOR = "#1f77b4", "#c7c7c7"
#: legend names of the two bar colours
DISTINGUISHABLE_NAME = "distinguishable from random genes (p < 0.05, z ≥ 2)"
NOT_DISTINGUISHABLE_NAME = "not distinguishable from random genes"
#: the note of a summary without a null distribution
NO_NULL_NOTE = "no null computed (n_null=0): not compared with random genes"


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


def value_axis(*columns: Any) -> dict[str, Any]:
    """Tick format of an axis of shifts: plain numbers (``0.25``), or ``2.0e-7`` for tiny ones.

    Never plotly's SI prefixes ("800n", "2µ"), which read as units.
    """
    values = np.concatenate([np.asarray(_plain(c), dtype=float) for c in columns]) if columns else np.zeros(0)
    finite = np.abs(values[np.isfinite(values)])
    largest = float(finite.max()) if len(finite) else 0.0
    tickformat = ".1e" if 0 < largest < 1e-2 else ".3~g"
    return {"tickformat": tickformat, "exponentformat": "e"}


def null_verdicts(summary: pd.DataFrame) -> np.ndarray | None:
    """Per row: whether the shift stands out from the random genes' (``None``: no null computed).

    The summary's ``distinguishable`` column when there is one, else ``p < 0.05`` and ``z >= 2``.
    """
    p = pd.to_numeric(summary["p"], errors="coerce") if "p" in summary else None
    if p is None or not p.notna().any():
        return None
    if "distinguishable" in summary:
        return summary["distinguishable"].astype(bool).to_numpy()
    z = pd.to_numeric(summary["z"], errors="coerce") if "z" in summary else pd.Series(np.inf, index=p.index)
    return ((p < DISTINGUISHABLE_P) & (z >= DISTINGUISHABLE_Z)).to_numpy()


def _verdict_legend(fig: go.Figure, verdicts: np.ndarray) -> None:
    """Legend entries (no data) naming the two bar colours that occur."""
    for flag, name, color in (
        (True, DISTINGUISHABLE_NAME, SHIFT_COLOR),
        (False, NOT_DISTINGUISHABLE_NAME, NULL_LIKE_COLOR),
    ):
        if (verdicts == flag).any():
            fig.add_scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker=dict(symbol="square", size=12, color=color),
                name=name,
                hoverinfo="skip",
            )


def perturbation_shifts(
    summary: pd.DataFrame, *, title: str = "Mean embedding shift (1 − cosine)"
) -> go.Figure:
    """Bar chart of the mean embedding shift per perturbation (an in-silico perturbation summary).

    Trace 0 has one bar per row (``mean_shift``; hover: the number of cells, and p and z with a
    null); then, when the summary has a null distribution, the null mean ± std of the random genes
    as black diamonds (``"null mean ± std (random genes)"``), and, with a goal, the ``goal_shift``
    bars (``"shift toward goal"``).

    With a null, a bar is blue when its shift stands out from the random genes' (the summary's
    ``distinguishable``: ``p < 0.05`` and ``z >= 2``) and grey when it does not; the last traces
    are legend entries naming the two colours. Without a null a note says that none was
    computed. Tiny shifts are written ``2.0e-7`` on the axis, never with SI prefixes ("200n").

    Parameters
    ----------
    summary
        :attr:`cellkit.analysis.InSilicoResult.summary` (``perturbation``, ``mean_shift``,
        ``n_cells``; optionally ``null_mean``, ``null_std``, ``z``, ``p``, ``distinguishable``,
        ``goal_shift``).
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
    verdicts = null_verdicts(summary)
    shown = [summary[c] for c in ("mean_shift", "null_mean", "goal_shift") if c in summary]
    fig = go.Figure(
        layout=go.Layout(
            title=title,
            template=TEMPLATE,
            xaxis_title="perturbation",
            yaxis=dict(title="mean shift (1 − cosine)", **value_axis(*shown)),
            barmode="group",
            margin=dict(l=70, r=10, t=60, b=80),
            legend=dict(orientation="h", y=-0.35),
        )
    )
    bars = go.Bar(
        x=labels,
        y=_plain(summary["mean_shift"]),
        name="mean shift",
        customdata=np.asarray(summary["n_cells"]),
        hovertemplate="%{x}<br>mean shift %{y:.3g}<br>%{customdata} cells<extra></extra>",
    )
    if verdicts is not None:
        bars.marker.color = [SHIFT_COLOR if v else NULL_LIKE_COLOR for v in verdicts]
        bars.showlegend = False
        words = [DISTINGUISHABLE_NAME if v else NOT_DISTINGUISHABLE_NAME for v in verdicts]
        bars.customdata = np.column_stack(
            [
                np.asarray(summary["n_cells"], dtype=object),
                _plain(summary["p"]),
                _plain(summary["z"] if "z" in summary else [None] * len(summary)),
                words,
            ]
        )
        bars.hovertemplate = (
            "%{x}<br>mean shift %{y:.3g}<br>%{customdata[0]} cells<br>"
            "p %{customdata[1]:.3g}, z %{customdata[2]:.3g}<br>%{customdata[3]}<extra></extra>"
        )
    fig.add_trace(bars)
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
    if verdicts is None:
        add_note(fig, NO_NULL_NOTE)
        fig.layout.annotations[-1].update(y=1.0, yanchor="bottom")
    else:
        _verdict_legend(fig, verdicts)
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
    first appear (``name`` the perturbation, hover text the cell names); tiny shifts are written
    ``2.0e-7`` on the axis, never with SI prefixes.
    """
    cells = _require(cells, ("perturbation", "cell", "counted", "shift"), "cells")
    counted = cells[cells["counted"].astype(bool)]
    fig = go.Figure(
        layout=go.Layout(
            title=title,
            template=TEMPLATE,
            yaxis=dict(title="shift (1 − cosine)", **value_axis(counted["shift"])),
            margin=dict(l=70, r=10, t=40, b=80),
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
            yaxis=dict(title="mean − control mean", **value_axis(predicted.to_numpy().ravel())),
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
