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

__all__ = ["add_note", "is_anndata", "labelled_matrix", "save_html"]

#: the layout template every cellkit figure uses
TEMPLATE = "simple_white"


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
