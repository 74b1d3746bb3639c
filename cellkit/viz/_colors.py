"""What an embedding scatter draws, as arrays a WebGL renderer takes (the studio's jupyter-scatter view).

:func:`embedding` builds plotly traces; a renderer for millions of points (jupyter-scatter) takes
one coordinate array and one colour array instead. :func:`embedding_colors` gives those, with the
same choices as :func:`embedding`: the same cells (finite coordinates, the same seeded subsample),
the same colour values (an obs column or a gene), the same category colours (``uns[f"{key}_colors"]``
or scanpy's palette) and the same notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import DataError
from ._embedding import MAX_CATEGORIES, category_groups, continuous_order, prepare_points

__all__ = ["EmbeddingColors", "embedding_colors"]


@dataclass(frozen=True)
class EmbeddingColors:
    """The drawn cells of an embedding and their colours.

    Attributes
    ----------
    positions
        ``(n_drawn,)`` int64 obs positions drawn, ascending (cells with finite coordinates, at most
        ``max_points`` of them).
    coords
        ``(n_drawn, 2)`` float32 coordinates of those cells.
    kind
        ``"none"`` (one colour), ``"categorical"`` or ``"continuous"``.
    label
        The colour's name (the obs column or gene), ``None`` without a colour.
    codes, categories, colors
        Categorical: ``(n_drawn,)`` int32 category codes, the category names (missing values first,
        as ``"NaN"``) and one hex colour per category.
    values, vmin, vmax
        Continuous: ``(n_drawn,)`` float32 values (a missing value is drawn at ``vmin``) and the range.
    size
        Marker size :func:`embedding` would use.
    n_cells, n_valid
        Cells in the data, cells with finite coordinates.
    notes
        What the figure should say (cells without coordinates, a subsample, missing values).
    """

    positions: np.ndarray
    coords: np.ndarray
    kind: str
    label: str | None
    size: float
    n_cells: int
    n_valid: int
    notes: list[str] = field(default_factory=list)
    codes: np.ndarray | None = None
    categories: list[str] = field(default_factory=list)
    colors: list[str] = field(default_factory=list)
    values: np.ndarray | None = None
    vmin: float = 0.0
    vmax: float = 1.0


def embedding_colors(
    adata: Any,
    *,
    basis: str = "X_umap",
    color: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    max_points: int | None = None,
    seed: int = 0,
) -> EmbeddingColors:
    """The cells and colours :func:`embedding` would draw, as flat arrays for a WebGL renderer.

    Parameters
    ----------
    adata
        AnnData with ``obsm[basis]``.
    basis
        The embedding (``"X_umap"``, ``"umap"``, ``"X_pca"`` …).
    color
        An obs column or a gene (``var_names`` or ``var[gene_symbols]``); ``None``: one colour.
    layer, gene_symbols
        Where a gene's expression is read, as in :func:`embedding`.
    max_points, seed
        Draw at most this many cells (a random subsample with ``seed``, as :func:`embedding`);
        ``None``: all.

    Returns
    -------
    :class:`EmbeddingColors`.

    Raises
    ------
    DataError
        A categorical colour with more than ``MAX_CATEGORIES`` categories among the drawn cells
        (and every error :func:`embedding` raises for its arguments).
    """
    pts = prepare_points(
        adata,
        basis=basis,
        color=color,
        obs=None,
        layer=layer,
        use_raw=None,
        gene_symbols=gene_symbols,
        dims=(0, 1),
        point_size=None,
        max_points=max_points,
        selected=None,
        seed=seed,
    )
    positions = np.asarray(pts.positions, dtype=np.int64)
    common = {
        "positions": positions,
        "coords": np.ascontiguousarray(pts.coords[positions], dtype=np.float32),
        "label": pts.label if color is not None else None,
        "size": float(pts.size),
        "n_cells": len(pts.coords),
        "n_valid": int(pts.n_valid),
    }
    notes = list(pts.notes)
    if pts.values is None:
        return EmbeddingColors(kind="none", notes=notes, **common)
    if pts.categorical:
        groups = category_groups(pts, palette=None, key=color)
        if len(groups) > MAX_CATEGORIES:
            raise DataError(
                f"{pts.label!r} has {len(groups):,} categories among the drawn cells; a categorical colour "
                f"shows at most {MAX_CATEGORIES}. Colour by a column with fewer categories, or group the "
                "rare ones first."
            )
        codes = np.zeros(len(positions), dtype=np.int32)
        for k, (_name, rows, _col) in enumerate(groups):
            codes[rows] = k
        return EmbeddingColors(
            kind="categorical",
            notes=notes,
            codes=codes,
            categories=[str(name) for name, _rows, _col in groups],
            colors=[str(col) for _name, _rows, col in groups],
            **common,
        )
    values, missing, _ok = continuous_order(pts, sort=False)
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    if len(missing):
        values = np.where(np.isfinite(values), values, lo)
        notes.append(f"{len(missing):,} cells without a {pts.label} value drawn at the lowest colour")
    return EmbeddingColors(
        kind="continuous", notes=notes, values=values.astype(np.float32), vmin=lo, vmax=hi, **common
    )
