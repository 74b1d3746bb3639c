"""Helpers shared by the figure functions: input checks, notes, HTML export."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._errors import DataError
from .._utils import atomic_write_text

__all__ = ["add_note", "draw_into", "is_anndata", "labelled_matrix", "save_html"]

#: the layout template every cellkit figure uses
TEMPLATE = "simple_white"
#: trace properties the browser (or plotly) owns: never removed by :func:`draw_into`
_KEEP = frozenset({"uid"})
#: layout properties compared as one value (free-form, not compound: an update would replace them)
_WHOLE = frozenset({"meta", "annotations", "shapes"})
#: layout lists replaced as a whole when they differ (also emptied when the new figure has none)
_REPLACED = ("annotations", "shapes")
_MISSING = object()


def is_anndata(obj: Any) -> bool:
    """Duck-typed AnnData check (never imports anndata)."""
    return all(hasattr(obj, a) for a in ("obs", "obsm", "var_names", "obs_names", "X"))


def labelled_matrix(
    matrix: Any,
    rows: Sequence[Any] | None,
    cols: Sequence[Any] | None,
    *,
    what: str,
    row_name: str = "rows",
    col_name: str = "columns",
) -> pd.DataFrame:
    """A 2-D DataFrame from a DataFrame or an array plus optional row/column labels.

    Labels become strings; a label list whose length does not match raises :class:`DataError`.
    """
    if isinstance(matrix, pd.DataFrame):
        frame = matrix.copy()
        if rows is not None:
            frame.index = _labels(rows, frame.shape[0], what, row_name)
        if cols is not None:
            frame.columns = _labels(cols, frame.shape[1], what, col_name)
    else:
        if hasattr(matrix, "toarray"):  # scipy sparse
            matrix = matrix.toarray()
        arr = np.asarray(matrix)
        if arr.ndim != 2:
            raise DataError(
                f"{what} must be 2-D ({row_name} × {col_name}); got an array of shape {arr.shape}. "
                "Pass a DataFrame or a 2-D array with row/column labels."
            )
        frame = pd.DataFrame(
            arr,
            index=_labels(rows, arr.shape[0], what, row_name) if rows is not None else None,
            columns=_labels(cols, arr.shape[1], what, col_name) if cols is not None else None,
        )
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DataError(f"{what} is empty (shape {frame.shape}); it needs at least one row and one column.")
    try:
        values = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} must hold numbers; convert its columns to float first ({exc}).") from exc
    out = pd.DataFrame(values, index=frame.index.astype(str), columns=frame.columns.astype(str))
    return out


def _labels(labels: Sequence[Any], n: int, what: str, name: str) -> pd.Index:
    labels = pd.Index([str(x) for x in labels])
    if len(labels) != n:
        raise DataError(
            f"{what} has {n} {name} but {len(labels)} {name} labels were given; pass one per {name[:-1]}."
        )
    return labels


def add_note(fig: go.Figure, text: str) -> None:
    """Add a small grey note under the plot area (e.g. "showing 50,000 of 200,000 cells")."""
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=0,
        y=-0.02,
        xanchor="left",
        yanchor="top",
        showarrow=False,
        font={"size": 11, "color": "#777777"},
        name="cellkit-note",
    )


def draw_into(target: go.Figure, fig: go.Figure) -> go.Figure:
    """Make ``target`` (e.g. a ``go.FigureWidget`` on screen) show ``fig``, sending only what changed.

    With as many traces of the same types, each trace gets only its changed properties (arrays
    compared by value, so unchanged coordinates are not sent again); properties ``fig`` no longer
    sets are removed, except a legend-hidden trace stays hidden while its name is the same.
    Otherwise ``target``'s traces are replaced. Layout: the properties ``fig`` sets are updated where
    they differ (``annotations`` and ``shapes`` replaced as a whole); others (height, drag mode, zoom)
    are kept. Everything goes in one ``batch_update`` (one message to the browser).

    Parameters
    ----------
    target
        The figure to update (a ``go.FigureWidget`` shown in a notebook, or any ``go.Figure``).
    fig
        The figure to show, e.g. from :func:`cellkit.viz.embedding`.

    Returns
    -------
    plotly.graph_objects.Figure
        ``target``.

    Examples
    --------
    >>> live = go.FigureWidget(cellkit.viz.embedding(adata, color="cell_type"))  # doctest: +SKIP
    >>> cellkit.viz.draw_into(live, cellkit.viz.embedding(adata, color="CD3E"))  # doctest: +SKIP
    """
    same = len(target.data) == len(fig.data) and all(
        a.type == b.type for a, b in zip(target.data, fig.data, strict=True)
    )
    with target.batch_update():
        if same:
            for old, new in zip(target.data, fig.data, strict=True):
                keep = _KEEP | ({"visible"} if old.name == new.name else set())
                changes = _changes(_props(old), _props(new), drop=True, keep=keep)
                if changes:
                    old.update(changes)
        else:
            target.data = ()
            target.add_traces(fig.data)
        old_layout, new_layout = _props(target.layout), _props(fig.layout)
        replaced = [k for k in _REPLACED if not _same(old_layout.get(k, []), new_layout.get(k, []))]
        changes = _changes(old_layout, new_layout, drop=False, keep=_WHOLE)
        if changes:
            target.layout.update(changes)
        for key in replaced:  # notes and lines (e.g. a limit) belong to the figure drawn, not kept
            target.layout[key] = fig.layout[key]
    return target


def _props(obj: Any) -> dict[str, Any]:
    """A plotly object's properties for reading: its own dict (``to_plotly_json`` deep-copies every
    array, seconds for 200,000 points), or that copy where the attribute is missing."""
    props = getattr(obj, "_props", None)
    return props if isinstance(props, dict) else obj.to_plotly_json()


def _changes(
    old: dict[str, Any], new: dict[str, Any], *, drop: bool, keep: frozenset[str] | set[str]
) -> dict:
    """The nested properties of ``new`` that differ from ``old`` (``None`` for dropped ones with ``drop``)."""
    out: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(before, dict) and key not in _WHOLE:
            sub = _changes(before, value, drop=drop, keep=frozenset())
            if sub:
                out[key] = sub
        elif key != "annotations" and (before is _MISSING or not _same(before, value)):
            out[key] = value
    if drop:
        out.update({key: None for key in old.keys() - new.keys() - keep})
    return out


def _same(a: Any, b: Any) -> bool:
    """Equality of two property values, arrays compared element-wise (NaN equal to NaN)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
            return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f" or b.dtype.kind == "f"))
        return bool(np.all(a == b))
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. lists holding arrays
        return False


def save_html(
    fig: go.Figure,
    path: str | os.PathLike[str],
    *,
    include_plotlyjs: bool | str = True,
    full_html: bool = True,
) -> Path:
    """Write a figure as a standalone HTML file, atomically (temporary file, then ``os.replace``).

    Parameters
    ----------
    fig
        Any plotly figure (e.g. from :func:`embedding`).
    path
        Target file; parent folders are created. An interrupted write leaves an existing file intact.
    include_plotlyjs
        ``True`` embeds plotly.js (about 4.5 MB, works offline); ``"cdn"`` links it instead (small
        file, needs internet to view). See :meth:`plotly.graph_objects.Figure.write_html`.
    full_html
        ``False`` writes only a ``<div>`` to embed in another page.

    Returns
    -------
    Path
        The written path.
    """
    path = Path(path)
    html = fig.to_html(include_plotlyjs=include_plotlyjs, full_html=full_html)
    atomic_write_text(path, html)
    return path
