"""Heatmaps: attention between genes, gene programs per cell type, confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._errors import ConfigError, DataError
from ._common import TEMPLATE, add_note, is_anndata, labelled_matrix

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["attention_heatmap", "confusion_matrix", "program_heatmap"]

#: show the numbers in the cells of a confusion matrix up to this many classes (``annotate=None``)
ANNOTATE_MAX = 25
#: pixels given to each labelled row / column of a program heatmap (room for a legible label)
LABEL_PX = 16
#: tick label font size (px) of a program heatmap axis with many labels (never smaller)
MIN_FONT = 10


def _axis(title: str, n: int, *, reverse: bool = False, angle: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"title": {"text": title}, "type": "category", "showgrid": False, "ticks": ""}
    if n <= 120:
        out["dtick"] = 1  # every label
    if reverse:
        out["autorange"] = "reversed"
    if angle is not None:
        out["tickangle"] = angle
    return out


# -- attention ---------------------------------------------------------------------------------


def attention_heatmap(
    matrix: pd.DataFrame | np.ndarray,
    *,
    rows: Sequence[str] | None = None,
    cols: Sequence[str] | None = None,
    head: int | None = None,
    title: str | None = None,
    zmid: float | None = None,
    colorscale: str | None = None,
    max_genes: int | None = 60,
    value_name: str = "attention",
) -> go.Figure:
    """Heatmap of gene-to-gene attention (query genes as rows, key genes as columns).

    Parameters
    ----------
    matrix
        ``(n_query, n_key)`` DataFrame (index: query genes, columns: key genes), or an array of
        that shape with ``rows``/``cols`` labels, or ``(n_heads, n_query, n_key)`` (heads averaged,
        or one picked with ``head``).
    rows, cols
        Query/key gene labels for array input (or to relabel a DataFrame).
    head
        With a 3-D array: the head to show; ``None`` averages the heads.
    title
        Figure title.
    zmid
        Centre of a diverging colour scale (e.g. ``0`` for attention differences between
        conditions); then the default colour scale is ``"RdBu_r"`` and the colour range is
        symmetric around it (``zmid ± max|z − zmid|``), so equal changes up and down get equal colours.
    colorscale
        plotly colour scale; default ``"Viridis"`` (``"RdBu_r"`` with ``zmid``).
    max_genes
        Keep at most this many query genes (rows with the largest total attention) and key genes
        (columns with the largest total), in their original order; a note says so. ``None``
        keeps all.
    value_name
        What the values are, for hover text and the colour bar.

    Returns
    -------
    plotly.graph_objects.Figure
        One ``go.Heatmap``; the first query gene is the top row.
    """
    frame, note = attention_frame(
        matrix, rows=rows, cols=cols, head=head, zmid=zmid, max_genes=max_genes, value_name=value_name
    )
    scale = attention_scale(colorscale, zmid)
    z = frame.to_numpy()
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(frame.columns),
            y=list(frame.index),
            colorscale=scale,
            zmid=zmid,
            **_symmetric_range(z, zmid),
            colorbar={"title": {"text": value_name}, "thickness": 14},
            hovertemplate=f"query: %{{y}}<br>key: %{{x}}<br>{value_name}: %{{z:.4g}}<extra></extra>",
            hoverongaps=False,
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title or ""},
        xaxis=_axis("key gene", frame.shape[1], angle=-90),
        yaxis=_axis("query gene", frame.shape[0], reverse=True),
        margin={"b": 90},
    )
    if note:
        add_note(fig, note)
        fig.layout.annotations[-1].y = 1.0
        fig.layout.annotations[-1].yanchor = "bottom"
    return fig


def _symmetric_range(z: np.ndarray, zmid: float | None) -> dict[str, Any]:
    """``zmin`` / ``zmax`` equidistant from ``zmid`` (none without ``zmid``)."""
    if zmid is None:
        return {}
    finite = np.isfinite(z)
    bound = float(np.max(np.abs(z[finite] - zmid))) if finite.any() else 0.0
    bound = bound or 1.0
    return {"zauto": False, "zmin": zmid - bound, "zmax": zmid + bound}


def attention_frame(
    matrix: Any,
    *,
    rows: Sequence[str] | None,
    cols: Sequence[str] | None,
    head: int | None,
    zmid: float | None,
    max_genes: int | None,
    value_name: str,
) -> tuple[pd.DataFrame, str | None]:
    """The query × key frame :func:`attention_heatmap` draws, and the note when genes were dropped."""
    arr = matrix
    if not isinstance(matrix, pd.DataFrame):
        arr = np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float64)
        if arr.ndim == 3:
            if head is None:
                arr = np.nanmean(arr, axis=0)
            else:
                if not -arr.shape[0] <= head < arr.shape[0]:
                    raise ConfigError(f"head={head} is out of range; the array has {arr.shape[0]} heads.")
                arr = arr[head]
    frame = labelled_matrix(
        arr, rows, cols, what="the attention matrix", row_name="query genes", col_name="key genes"
    )
    n_rows, n_cols = frame.shape
    note = None
    if max_genes is not None:
        if max_genes < 1:
            raise ConfigError(f"max_genes must be a positive integer or None; got {max_genes}.")
        values = np.abs(frame.to_numpy()) if zmid is not None else frame.to_numpy()
        keep_r = _top(np.nansum(values, axis=1), max_genes)
        keep_c = _top(np.nansum(values, axis=0), max_genes)
        if len(keep_r) < n_rows or len(keep_c) < n_cols:
            frame = frame.iloc[keep_r, keep_c]
            note = (
                f"top {len(keep_r)} of {n_rows} query genes × top {len(keep_c)} of {n_cols} key genes "
                f"by total {'|' + value_name + '|' if zmid is not None else value_name}"
            )
    return frame, note


def attention_scale(colorscale: str | None, zmid: float | None) -> str:
    """The colour scale name: ``colorscale``, else diverging ``"RdBu_r"`` around ``zmid``, else Viridis."""
    return colorscale or ("RdBu_r" if zmid is not None else "Viridis")


def _top(totals: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest totals, in their original order."""
    if len(totals) <= k:
        return np.arange(len(totals))
    keep = np.argsort(-np.nan_to_num(totals, nan=-np.inf), kind="stable")[:k]
    return np.sort(keep)


# -- programs ----------------------------------------------------------------------------------


def program_heatmap(
    scores: pd.DataFrame | AnnData,
    programs: Sequence[str] | None = None,
    groupby: str | Sequence[Any] | pd.Series | None = None,
    *,
    standard_scale: Literal["var", "obs"] | None = "var",
    cluster: bool | Literal["rows", "cols"] = True,
    title: str | None = None,
    colorscale: str = "Viridis",
    max_programs: int | None = 50,
) -> go.Figure:
    """Heatmap of gene-program scores per cell type, like scGPT's metagene clustermap.

    Parameters
    ----------
    scores
        One of

        - a ``(n_groups, n_programs)`` DataFrame of (mean) scores: rows cell types, columns
          programs (used as is);
        - a ``(n_cells, n_programs)`` DataFrame of per-cell scores with ``groupby`` one label per
          cell: averaged per group;
        - an AnnData with per-cell program scores in obs columns ``programs`` (e.g. from
          ``sc.tl.score_genes``) and ``groupby`` an obs column: averaged per group.
    programs
        AnnData input: the obs columns holding the scores (required). DataFrame input: a subset of
        its columns (default: all).
    groupby
        AnnData input: an obs column of cell types. DataFrame input: ``None`` (already one row per
        group) or one label per row.
    standard_scale
        ``"var"``: scale each program (column) to 0–1 across groups (scGPT's view: which cell
        type uses a program most); ``"obs"``: each group (row) to 0–1; ``None``: raw means.
    cluster
        Order rows and columns by average-linkage hierarchical clustering (scipy, Euclidean);
        ``"rows"``/``"cols"`` clusters one axis only; ``False`` keeps the input order.
    title
        Figure title.
    colorscale
        plotly colour scale.
    max_programs
        Show at most this many programs: those whose (scaled) values vary most across the groups,
        i.e. the most group-specific ones; a note above the plot says how many of how many are
        shown. ``None`` shows all.

    Returns
    -------
    plotly.graph_objects.Figure
        One ``go.Heatmap``: rows groups, columns programs; hover shows the mean score too. Every
        row and column is labelled: the figure is sized to give each label at least
        ``LABEL_PX`` (16) pixels, with a tick font of at least ``MIN_FONT`` (10) px.
    """
    means = _group_means(scores, programs, groupby)
    if standard_scale not in ("var", "obs", None):
        raise ConfigError(f"standard_scale must be 'var', 'obs' or None; got {standard_scale!r}.")
    if cluster not in (True, False, "rows", "cols"):
        raise ConfigError(f"cluster must be True, False, 'rows' or 'cols'; got {cluster!r}.")
    shown = _standard_scale(means, standard_scale)
    shown, note = _top_programs(shown, max_programs)
    means = means[shown.columns]
    if cluster in (True, "rows"):
        order = _leaf_order(shown.to_numpy())
        shown, means = shown.iloc[order], means.iloc[order]
    if cluster in (True, "cols"):
        order = _leaf_order(shown.to_numpy().T)
        shown, means = shown.iloc[:, order], means.iloc[:, order]
    label = {"var": "scaled per program", "obs": "scaled per group", None: "mean score"}[standard_scale]
    fig = go.Figure(
        go.Heatmap(
            z=shown.to_numpy(),
            x=list(shown.columns),
            y=list(shown.index),
            customdata=means.to_numpy(),
            colorscale=colorscale,
            zmin=0.0 if standard_scale else None,
            zmax=1.0 if standard_scale else None,
            colorbar={"title": {"text": label}, "thickness": 14},
            hovertemplate="group: %{y}<br>program: %{x}<br>mean score: %{customdata:.4g}"
            + ("<br>scaled: %{z:.3f}" if standard_scale else "")
            + "<extra></extra>",
            hoverongaps=False,
        )
    )
    n_groups, n_programs = shown.shape
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title or ""},
        xaxis=_axis("program", n_programs, angle=-90) | _tick_font(n_programs),
        yaxis=_axis(str(groupby) if isinstance(groupby, str) else "group", n_groups, reverse=True)
        | _tick_font(n_groups),
        **_labelled_size(n_groups, n_programs),
    )
    if note:
        add_note(fig, note)
        fig.layout.annotations[-1].y = 1.0
        fig.layout.annotations[-1].yanchor = "bottom"
    return fig


def _top_programs(shown: pd.DataFrame, max_programs: int | None) -> tuple[pd.DataFrame, str | None]:
    """The ``max_programs`` columns varying most across groups (in their order) and a note saying so."""
    if max_programs is None or shown.shape[1] <= max_programs:
        return shown, None
    if max_programs < 1:
        raise ConfigError(f"max_programs must be a positive integer or None; got {max_programs}.")
    spread = np.nan_to_num(np.nanvar(shown.to_numpy(), axis=0), nan=-1.0)
    keep = _top(spread, max_programs)
    note = (
        f"top {len(keep)} of {shown.shape[1]} programs (those varying most across groups; "
        "max_programs=None shows all)"
    )
    return shown.iloc[:, keep], note


def _tick_font(n: int) -> dict[str, Any]:
    """A smaller (never below ``MIN_FONT``) tick font for an axis with many labels."""
    return {"tickfont": {"size": MIN_FONT}} if n > 30 else {}


def _labelled_size(n_rows: int, n_cols: int) -> dict[str, Any]:
    """Figure height (and width, for many columns) giving every label ``LABEL_PX`` pixels."""
    size = {"height": max(380, 240 + LABEL_PX * n_rows)}
    if n_cols > 30:
        size["width"] = 260 + LABEL_PX * n_cols
    return size


def _group_means(scores: Any, programs: Sequence[str] | None, groupby: Any) -> pd.DataFrame:
    if is_anndata(scores):
        if programs is None or groupby is None:
            raise DataError(
                "With an AnnData, pass programs=<obs columns of program scores> and groupby=<obs column of "
                "cell types>, e.g. program_heatmap(adata, ['program_0', 'program_1'], 'cell_type')."
            )
        obs = scores.obs
        if isinstance(programs, str):
            programs = [programs]
        missing = [p for p in [*programs, groupby] if isinstance(p, str) and p not in obs.columns]
        if missing:
            raise DataError(
                f"{missing} are not obs columns; available: {[str(c) for c in obs.columns][:40]}."
            )
        frame = obs[list(programs)]
        labels = obs[groupby] if isinstance(groupby, str) else groupby
    elif isinstance(scores, pd.DataFrame):
        frame = scores
        if programs is not None:
            missing = [p for p in programs if p not in frame.columns]
            if missing:
                raise DataError(
                    f"programs {missing} are not columns of scores; available: {list(frame.columns)[:40]}."
                )
            frame = frame[list(programs)]
        labels = groupby
        if isinstance(groupby, str):
            if groupby not in frame.columns and groupby not in scores.columns:
                raise DataError(
                    f"groupby={groupby!r} is not a column of scores; pass one label per row instead."
                )
            labels = scores[groupby]
            frame = frame.drop(columns=[groupby], errors="ignore")
    else:
        raise DataError(
            f"scores must be a DataFrame (groups × programs, or cells × programs with groupby) or an AnnData; "
            f"got {type(scores).__name__}."
        )
    try:
        frame = frame.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"program scores must be numeric ({exc}).") from exc
    if labels is not None:
        labels = pd.Series(np.asarray(labels), index=frame.index)
        if len(labels) != len(frame):
            raise DataError(f"groupby has {len(labels)} labels for {len(frame)} cells; pass one per cell.")
        frame = frame.groupby(labels.astype(str).to_numpy(), sort=True, observed=True).mean()
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DataError(f"no program scores to show (shape {frame.shape}).")
    frame.index = frame.index.astype(str)
    frame.columns = frame.columns.astype(str)
    return frame


def _standard_scale(frame: pd.DataFrame, how: str | None) -> pd.DataFrame:
    if how is None:
        return frame
    x = frame.to_numpy()
    axis = 0 if how == "var" else 1
    lo = np.nanmin(x, axis=axis, keepdims=True)
    span = np.nanmax(x, axis=axis, keepdims=True) - lo
    scaled = np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)
    scaled[np.isnan(x)] = np.nan
    return pd.DataFrame(scaled, index=frame.index, columns=frame.columns)


def _leaf_order(x: np.ndarray) -> np.ndarray:
    if len(x) < 3:
        return np.arange(len(x))
    from scipy.cluster.hierarchy import leaves_list, linkage

    z = linkage(np.nan_to_num(x, nan=0.0), method="average", metric="euclidean")
    return leaves_list(z)


# -- confusion ---------------------------------------------------------------------------------


def confusion_matrix(
    confusion: pd.DataFrame | np.ndarray,
    *,
    labels: Sequence[str] | None = None,
    pred_labels: Sequence[str] | None = None,
    normalize: Literal["true", "pred", "all"] | None = "true",
    annotate: bool | None = None,
    title: str | None = None,
    colorscale: str = "Blues",
) -> go.Figure:
    """Annotated heatmap of a confusion matrix: true classes as rows, predicted as columns.

    Parameters
    ----------
    confusion
        ``(n_true, n_pred)`` counts: a DataFrame (index true classes, columns predicted classes,
        e.g. ``pd.crosstab(y_true, y_pred)``) or an array with ``labels``.
    labels
        Class names of the rows for array input (and of the columns, unless ``pred_labels``).
    pred_labels
        Class names of the columns when they differ from the rows.
    normalize
        ``"true"``: each row divided by its total (recall per class; rows sum to 1); ``"pred"``:
        each column (precision); ``"all"``: by the grand total; ``None``: counts. Empty rows or
        columns stay 0.
    annotate
        Write the values in the cells: the count and, when ``normalize`` is set, the fraction
        under it (so a class with one held-out cell reads "1" over "1.00", not just "1.00");
        default only up to 25 classes.
    title
        Figure title.
    colorscale
        plotly colour scale.

    Returns
    -------
    plotly.graph_objects.Figure
        One ``go.Heatmap`` whose ``z`` is the (normalised) matrix; hover shows the counts. The
        row labels name each true class with its number of cells, e.g. "B cell (n=12)".
    """
    cm = confusion_data(confusion, labels=labels, pred_labels=pred_labels, normalize=normalize)
    c, z, integral = cm.counts.to_numpy(), cm.values, cm.integral
    if annotate is None:
        annotate = max(c.shape) <= ANNOTATE_MAX
    count_fmt = "%{customdata:,.0f}" if integral else "%{customdata:.4g}"
    hover = "true: %{y}<br>predicted: %{x}<br>count: " + count_fmt
    if normalize is not None:
        hover += "<br>fraction: %{z:.3f}"
    heat = go.Heatmap(
        z=z,
        x=list(cm.counts.columns),
        y=list(cm.counts.index),
        customdata=c,
        colorscale=colorscale,
        zmin=0.0,
        zmax=1.0 if normalize is not None else None,
        colorbar={"title": {"text": cm.value_name}, "thickness": 14},
        hovertemplate=hover + "<extra></extra>",
    )
    if annotate:
        heat.text = cm.cell_texts(separator="<br>")
        heat.texttemplate = "%{text}"
    fig = go.Figure(heat)
    yaxis = _axis("true", c.shape[0], reverse=True)
    if "dtick" in yaxis:  # every class labelled: name it with its number of cells
        yaxis.update(tickmode="array", tickvals=list(cm.counts.index), ticktext=cm.row_labels())
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title or ""},
        xaxis=_axis("predicted", c.shape[1], angle=-45),
        yaxis=yaxis,
    )
    return fig


@dataclass(frozen=True)
class Confusion:
    """A checked confusion matrix: ``counts`` (true × predicted), ``values`` the normalised matrix."""

    counts: pd.DataFrame
    values: np.ndarray
    integral: bool
    normalize: str | None

    @property
    def value_name(self) -> str:
        return "count" if self.normalize is None else f"fraction ({self.normalize})"

    @property
    def value_format(self) -> str:
        """``str.format`` pattern of one value of ``values`` written in a cell."""
        if self.normalize is not None:
            return "{:.2f}"
        return "{:.0f}" if self.integral else "{:.3g}"

    @property
    def count_format(self) -> str:
        """``str.format`` pattern of one count."""
        return "{:,.0f}" if self.integral else "{:.4g}"

    def cell_texts(self, *, separator: str) -> np.ndarray:
        """The text of each cell: the count and, when normalised, the fraction under it."""
        counts = self.counts.to_numpy()
        out = np.empty(counts.shape, dtype=object)
        for (i, j), count in np.ndenumerate(counts):
            text = self.count_format.format(count)
            if self.normalize is not None:
                text += separator + self.value_format.format(self.values[i, j])
            out[i, j] = text
        return out

    def row_labels(self) -> list[str]:
        """Each true class with its number of cells (the row total), e.g. ``"B cell (n=12)"``."""
        totals = self.counts.to_numpy().sum(axis=1)
        return [f"{name} (n={self.count_format.format(n)})" for name, n in zip(self.counts.index, totals)]


def confusion_data(
    confusion: Any,
    *,
    labels: Sequence[str] | None,
    pred_labels: Sequence[str] | None,
    normalize: str | None,
) -> Confusion:
    """Check the inputs of :func:`confusion_matrix` and normalise the counts."""
    if normalize not in ("true", "pred", "all", None):
        raise ConfigError(f"normalize must be 'true', 'pred', 'all' or None; got {normalize!r}.")
    cols = pred_labels if pred_labels is not None else labels
    counts = labelled_matrix(
        confusion,
        labels,
        cols,
        what="the confusion matrix",
        row_name="true classes",
        col_name="predicted classes",
    )
    c = counts.to_numpy()
    if np.isnan(c).any() or (c < 0).any():
        raise DataError(
            "the confusion matrix must hold non-negative counts (no NaN); pass raw counts, not rates."
        )
    if normalize is None:
        z = c
    else:
        if normalize == "true":
            total = c.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            total = c.sum(axis=0, keepdims=True)
        else:
            total = np.full((1, 1), c.sum())
        z = np.divide(c, total, out=np.zeros_like(c), where=total > 0)
    return Confusion(counts=counts, values=z, integral=bool(np.all(c == np.round(c))), normalize=normalize)
