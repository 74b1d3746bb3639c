"""Embedding scatter (UMAP, PCA, ...) as a WebGL plotly figure."""

from __future__ import annotations

import difflib
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._errors import ConfigError, DataError
from ._common import TEMPLATE, add_note, draw_into, is_anndata
from ._palettes import NA_COLOR, default_palette

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["embedding", "embedding_selection"]

_AXIS_NAMES = {"umap": "UMAP", "tsne": "tSNE", "pca": "PC", "draw_graph_fa": "FA", "phate": "PHATE"}
_DEFAULT_HOVER = 3
#: colour of the points when nothing colours them
PLAIN_COLOR = "#1f77b4"
#: colour scale of continuous values unless ``palette`` names another
DEFAULT_SCALE = "Viridis"
#: opacity of the cells outside ``selected``
UNSELECTED_OPACITY = 0.12
#: most categories a categorical colour may have among the drawn cells (one trace each)
MAX_CATEGORIES = 200


def embedding(
    data: AnnData | np.ndarray | pd.DataFrame,
    *,
    basis: str = "X_cellkit_umap",
    color: str | Sequence[Any] | np.ndarray | pd.Series | None = None,
    obs: pd.DataFrame | None = None,
    hover: Sequence[str] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    dims: tuple[int, int] = (0, 1),
    title: str | None = None,
    point_size: float | None = None,
    max_points: int | None = None,
    palette: str | Sequence[str] | Mapping[str, str] | None = None,
    selected: np.ndarray | Sequence[bool] | Sequence[int] | None = None,
    seed: int = 0,
    sort_order: bool = True,
    figure: go.Figure | None = None,
) -> go.Figure:
    """Scatter plot of a 2-D embedding of cells, drawn with WebGL (``go.Scattergl``).

    Categorical colours give one trace per category (a legend entry each, scanpy's palette or
    ``uns[f"{color}_colors"]``); continuous colours (numeric obs columns, genes) give one trace
    with a colour bar, points sorted so that high values are drawn on top. Cells whose
    coordinates are NaN (e.g. cells that were not embedded) are left out; cells with a missing
    colour value are drawn in light grey (trace ``"NaN"``).

    **Mapping points back to cells.** Every trace's ``customdata`` is an ``(n_points, 2 + n_hover)``
    array: column 0 holds each point's *obs position* (row number in ``adata`` / ``coords``, also
    after subsampling and sorting), column 1 the cell name, then the ``hover`` columns' values as
    text; the ``hovertemplate`` reads them (no per-point ``text``). A lasso or box selection reports
    point indices per trace; ``fig.data[i].customdata[point_indices, 0]`` are the selected cells'
    positions, so ``adata[positions]`` is the selection. With ``max_points``,
    :func:`embedding_selection` also finds the cells inside the shape that are not drawn.

    **What was drawn** is recorded in ``fig.layout.meta``: ``basis``, ``color`` (the colour label),
    ``kind`` (``"none"``, ``"categorical"`` or ``"continuous"``), ``hover`` (the hover columns, also
    the default ones), ``n_cells``, ``n_valid`` (cells with coordinates), ``n_shown`` and ``notes``.

    Parameters
    ----------
    data
        An AnnData with ``obsm[basis]`` of shape ``(n_obs, >= 2)``, or the coordinates themselves:
        an array or DataFrame of shape ``(n_cells, >= 2)`` (a DataFrame's index names the cells).
    basis
        ``obsm`` key of the coordinates (AnnData input only), e.g. ``"X_cellkit_umap"`` written
        by ``cellkit.analysis.umap`` or scanpy's ``"X_umap"``.
    color
        What colours the points: an obs column (of ``adata`` or of ``obs``), a gene (read from
        ``layers[layer]``, ``adata.raw`` or ``adata.X``, see ``use_raw``), or an array of length
        ``n_cells``. ``None``: one grey-blue trace.
    obs
        Per-cell annotations for array input (``n_cells`` rows), so ``color``/``hover`` may name
        its columns. Ignored for AnnData input (its own ``obs`` is used).
    hover
        obs columns shown on hover, after the cell name and the colour value. Default: up to 3
        categorical (or boolean) obs columns besides ``color``. ``[]``: only the cell name and colour
        value.
    layer
        Read gene values from ``adata.layers[layer]``.
    use_raw
        Read gene values from ``adata.raw``. ``None`` (default, as scanpy): from ``adata.raw`` when it
        exists and has the gene (and the ``gene_symbols`` column, if given), else from ``adata.X``.
    gene_symbols
        A ``var`` column to match gene names against instead of ``var_names`` (e.g. symbols
        when ``var_names`` are Ensembl ids).
    dims
        The two coordinate columns to plot.
    title
        Figure title; default: the colour key.
    point_size
        Marker diameter in pixels; default depends on the number of points shown (8 for 100
        cells down to 1.5 for a million).
    max_points
        Show at most this many cells, a random subsample (``seed``); a note under the plot says
        so. ``customdata`` still holds the original obs positions.
    palette
        Categorical: a list of colours, a ``{category: colour}`` dict, or the name of a
        ``plotly.colors.qualitative`` palette (``"Dark24"``). Continuous: a plotly colour scale
        name (default ``"Viridis"``).
    selected
        Cells to highlight: a boolean mask of length ``n_cells`` or integer obs positions. Other
        cells are dimmed (plotly ``selectedpoints``).
    seed
        Seed of the subsample.
    sort_order
        Continuous colours: draw higher values on top (points sorted by value, as scanpy's
        ``sort_order``). ``False`` keeps obs order, so that a change between two continuous colours
        changes only the colours — what an on-screen ``figure`` updated in place wants.
    figure
        Draw into this figure (typically a ``go.FigureWidget`` on screen) instead of a new one, and
        return it. When it shows as many traces of the same type, only the properties that changed
        are sent (a new colour array, a new selection); otherwise its traces are replaced. Its other
        layout settings (height, drag mode, zoom) are kept.

    Returns
    -------
    plotly.graph_objects.Figure
        ``fig.show()`` in a notebook or script; :func:`cellkit.viz.save_html` to save.

    Raises
    ------
    DataError
        Missing ``basis``, unknown ``color``/``hover`` key (the message lists what exists), arrays
        whose length does not match the number of cells, or a categorical ``color`` with more than
        ``MAX_CATEGORIES`` (200) categories among the drawn cells (one trace each).
    """
    pts = prepare_points(
        data,
        basis=basis,
        color=color,
        obs=obs,
        layer=layer,
        use_raw=use_raw,
        gene_symbols=gene_symbols,
        dims=dims,
        point_size=point_size,
        max_points=max_points,
        selected=selected,
        seed=seed,
    )
    hover_cols = _hover_columns(hover, pts.obs, pts.label if isinstance(color, str) else None)
    custom = _hover_data(pts, hover_cols)
    if pts.values is None:
        kind = "none"
        tip = _hovertemplate(hover_cols)
        traces = [_trace(pts, slice(None), custom, name="cells", color=PLAIN_COLOR, hovertemplate=tip)]
    elif pts.categorical:
        kind = "categorical"
        traces = _categorical_traces(pts, custom, hover_cols, palette=palette, key=color)
    else:
        kind = "continuous"
        traces = _continuous_traces(pts, custom, hover_cols, palette=palette, sort_order=sort_order)
    fig = go.Figure(data=traces)
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title if title is not None else (pts.label or "")},
        showlegend=pts.categorical,
        legend={"itemsizing": "constant", "title": {"text": pts.label or ""}},
        xaxis={"title": {"text": pts.axis_titles[0]}, "showticklabels": False, "ticks": ""},
        yaxis={"title": {"text": pts.axis_titles[1]}, "showticklabels": False, "ticks": ""},
        margin={"b": 50},
        uirevision=basis,
        meta={
            "basis": basis if pts.adata is not None else None,
            "color": pts.label,
            "kind": kind,
            "hover": hover_cols,
            "n_cells": len(pts.coords),
            "n_valid": pts.n_valid,
            "n_shown": len(pts.positions),
            "notes": list(pts.notes),
        },
    )
    if pts.notes:
        add_note(fig, "; ".join(pts.notes))
    if figure is None:
        return fig
    return draw_into(figure, fig)


def embedding_selection(
    data: AnnData | np.ndarray | pd.DataFrame,
    selector: Any,
    *,
    basis: str = "X_cellkit_umap",
    dims: tuple[int, int] = (0, 1),
    color: str | Sequence[Any] | np.ndarray | pd.Series | None = None,
    obs: pd.DataFrame | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    hidden: Sequence[str] = (),
) -> np.ndarray:
    """Obs positions of every cell inside a lasso or box drawn on an :func:`embedding` figure.

    Cells left out of the drawing by ``max_points`` count too (the shape is tested against all
    coordinates), so a selection on a subsampled figure picks every cell in the shape. Cells
    without coordinates never do.

    Parameters
    ----------
    data
        The AnnData (or coordinates) the figure was drawn from, as in :func:`embedding`.
    selector
        The shape: the ``selector`` a ``go.FigureWidget`` trace's ``on_selection`` callback
        receives (``plotly.callbacks.BoxSelector`` / ``LassoSelector``), or a dict with the same
        fields: ``{"type": "box", "xrange": (x0, x1), "yrange": (y0, y1)}`` or
        ``{"type": "lasso", "xs": [...], "ys": [...]}`` (data coordinates).
    basis
        ``obsm`` key of the coordinates (AnnData input only).
    dims
        The two coordinate columns the figure plots.
    color
        The figure's colour key; needed only with ``hidden``.
    obs
        Per-cell annotations for array input (as in :func:`embedding`).
    layer
        As in :func:`embedding` (a gene ``color``).
    use_raw
        As in :func:`embedding` (a gene ``color``).
    gene_symbols
        As in :func:`embedding` (a gene ``color``).
    hidden
        Trace names whose cells are not selected, e.g. the categories hidden by a click on the
        legend (``[t.name for t in fig.data if t.visible == "legendonly"]``); ``"NaN"`` stands for
        cells without a colour value.

    Returns
    -------
    numpy.ndarray
        Sorted int64 obs positions.

    Raises
    ------
    ConfigError
        A selector that is neither a box nor a lasso.
    DataError
        As :func:`embedding` for ``basis`` / ``color``.
    """
    coords, obs_frame, _names, adata = _coords(data, basis=basis, obs=obs, dims=dims)
    ok = _inside(selector, coords[:, 0], coords[:, 1]) & np.isfinite(coords).all(axis=1)
    hidden = [str(h) for h in ([hidden] if isinstance(hidden, str) else hidden)]
    if hidden:
        values, label = _color_values(
            color,
            adata=adata,
            obs=obs_frame,
            n=len(coords),
            layer=layer,
            use_raw=use_raw,
            gene_symbols=gene_symbols,
        )
        ok &= ~np.isin(_trace_names(values, label), hidden)
    return np.flatnonzero(ok).astype(np.int64)


# -- what is drawn (shared with the static figures) ---------------------------------------------


@dataclass(frozen=True)
class Points:
    """The cells an embedding figure draws, in the form every renderer needs.

    ``coords`` and ``values`` are positional over all cells; ``positions`` are the obs positions
    drawn (finite coordinates, after subsampling); ``mask`` is the highlight mask over all cells.
    """

    coords: np.ndarray
    obs: pd.DataFrame
    names: np.ndarray
    adata: Any
    values: pd.Series | None
    label: str | None
    positions: np.ndarray
    notes: list[str]
    size: float
    mask: np.ndarray | None
    axis_titles: tuple[str, str]
    n_valid: int = 0

    @property
    def categorical(self) -> bool:
        return self.values is not None and _is_categorical(self.values)


def prepare_points(
    data: Any,
    *,
    basis: str,
    color: Any,
    obs: pd.DataFrame | None,
    layer: str | None,
    use_raw: bool | None,
    gene_symbols: str | None,
    dims: tuple[int, int],
    point_size: float | None,
    max_points: int | None,
    selected: Any,
    seed: int,
) -> Points:
    """Check the inputs of :func:`embedding` and pick the cells, colour values and marker size."""
    coords, obs_frame, names, adata = _coords(data, basis=basis, obs=obs, dims=dims)
    n = len(coords)
    values, label = _color_values(
        color, adata=adata, obs=obs_frame, n=n, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols
    )
    valid = np.isfinite(coords).all(axis=1)
    positions = np.flatnonzero(valid)
    notes = []
    if len(positions) < n:
        notes.append(f"{n - len(positions):,} cells without coordinates not shown")
    if max_points is not None:
        if max_points < 1:
            raise ConfigError(f"max_points must be a positive integer or None; got {max_points}.")
        if len(positions) > max_points:
            rng = np.random.default_rng(seed)
            positions = np.sort(rng.choice(positions, size=max_points, replace=False))
            notes.insert(0, f"showing a random {max_points:,} of {int(valid.sum()):,} cells (seed {seed})")
    ax = _axis_name(basis if adata is not None else "")
    return Points(
        coords=coords,
        obs=obs_frame,
        names=names,
        adata=adata,
        values=values,
        label=label,
        positions=positions,
        notes=notes,
        size=point_size if point_size is not None else _auto_size(len(positions)),
        mask=_selection(selected, n),
        axis_titles=(f"{ax}{dims[0] + 1}", f"{ax}{dims[1] + 1}"),
        n_valid=int(valid.sum()),
    )


def category_groups(pts: Points, *, palette: Any, key: Any) -> list[tuple[str, np.ndarray, str]]:
    """``(name, rows, colour)`` per non-empty category, missing values (``"NaN"``) first.

    ``rows`` index ``pts.positions``; colours come from ``palette``, ``uns[f"{key}_colors"]`` or
    scanpy's default palette.
    """
    assert pts.values is not None
    categories, codes = _codes(pts.values)
    uns_colors = None
    if pts.adata is not None and isinstance(key, str):
        uns_colors = pts.adata.uns.get(f"{key}_colors") if hasattr(pts.adata, "uns") else None
    colors = _category_colors(categories, palette, uns_colors)

    shown = codes[pts.positions]
    order = np.argsort(shown, kind="stable")
    bounds = np.searchsorted(shown[order], np.arange(-1, len(categories) + 1))
    groups = [("NaN", order[bounds[0] : bounds[1]], NA_COLOR)]
    groups += [
        (categories[k], order[bounds[k + 1] : bounds[k + 2]], colors[k]) for k in range(len(categories))
    ]
    return [g for g in groups if len(g[1])]


def continuous_order(pts: Points, *, sort: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values of the drawn cells, rows with a missing value, rows with a value)``.

    Rows index ``pts.positions``; with ``sort`` the rows with a value are sorted ascending, so that
    drawing them in this order puts high values on top (else they stay in obs order).
    """
    assert pts.values is not None
    v = pts.values.to_numpy(dtype=np.float64, na_value=np.nan)[pts.positions]
    finite = np.isfinite(v)
    if not sort:
        return v, np.flatnonzero(~finite), np.flatnonzero(finite)
    order_all = np.argsort(np.where(finite, v, -np.inf), kind="stable")
    return v, order_all[~finite[order_all]], order_all[finite[order_all]]


def _codes(values: pd.Series) -> tuple[list[str], np.ndarray]:
    """``(category names, code per cell)`` of categorical colour values; code ``-1``: missing."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        cat = values.cat
        return [str(c) for c in cat.categories], cat.codes.to_numpy()
    c = pd.Categorical(values.astype(object).where(values.notna(), None))
    return [str(x) for x in c.categories], np.asarray(c.codes)


def _trace_names(values: pd.Series | None, label: str | None) -> np.ndarray:
    """Per cell, the name of the :func:`embedding` trace that draws it."""
    if values is None:
        return np.full(1, "cells", dtype=object)  # broadcasts over every cell
    if _is_categorical(values):
        categories, codes = _codes(values)
        return np.asarray([*categories, "NaN"], dtype=object)[codes]  # code -1: the last, "NaN"
    finite = np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
    return np.where(finite, label or "color", "NaN").astype(object)


# -- inputs ------------------------------------------------------------------------------------


def _coords(
    data: Any, *, basis: str, obs: pd.DataFrame | None, dims: tuple[int, int]
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, Any]:
    """``(coords (n, 2) float64, obs frame, cell names, adata or None)``."""
    adata = None
    if is_anndata(data):
        adata = data
        if basis not in adata.obsm:
            raise DataError(
                f"obsm[{basis!r}] does not exist; available: {sorted(adata.obsm.keys())}. Compute it "
                "(cellkit.analysis.umap(adata) writes 'X_cellkit_umap') or pass basis=<one of these>."
            )
        raw = adata.obsm[basis]
        obs_frame = adata.obs
        names = np.asarray(adata.obs_names)
    else:
        raw = data
        if isinstance(data, pd.DataFrame):
            names = np.asarray(data.index.astype(str))
        else:
            names = None
        if obs is not None and not isinstance(obs, pd.DataFrame):
            raise DataError(
                f"obs must be a pandas DataFrame with one row per cell; got {type(obs).__name__}."
            )
        obs_frame = obs
    arr = raw.to_numpy() if isinstance(raw, pd.DataFrame) else np.asarray(raw)
    where = f"obsm[{basis!r}]" if adata is not None else "the coordinates"
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DataError(
            f"{where} must have shape (n_cells, >= 2), numbers in at least 2 columns; got {arr.shape}."
        )
    if len(dims) != 2 or max(dims) >= arr.shape[1] or min(dims) < 0:
        raise ConfigError(f"dims={dims} must be two column indices below {arr.shape[1]} ({where}).")
    try:
        coords = arr[:, list(dims)].astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where} must be numeric; got dtype {arr.dtype}.") from exc
    n = len(coords)
    if obs_frame is None:
        obs_frame = pd.DataFrame(index=pd.RangeIndex(n) if names is None else pd.Index(names))
    elif len(obs_frame) != n:
        raise DataError(f"obs has {len(obs_frame)} rows but there are {n} cells; pass one row per cell.")
    if names is None:
        names = np.asarray(obs_frame.index.astype(str))
    return coords, obs_frame, names, adata


def _color_values(
    color: Any,
    *,
    adata: Any,
    obs: pd.DataFrame,
    n: int,
    layer: str | None,
    use_raw: bool | None,
    gene_symbols: str | None,
) -> tuple[pd.Series | None, str | None]:
    """The colour values as a Series of length ``n`` (positional), and their label."""
    if color is None:
        return None, None
    if not isinstance(color, str):
        values = color if isinstance(color, pd.Series) else pd.Series(_as_1d(color))
        if len(values) != n:
            raise DataError(
                f"color as an array must have one value per cell ({n}); got length {len(values)}."
            )
        return values.reset_index(drop=True), str(values.name) if values.name is not None else "color"
    if color in obs.columns:
        return obs[color].reset_index(drop=True), color
    if adata is not None:
        gene = _gene_values(adata, color, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
        if gene is not None:
            return pd.Series(gene), color
    raise DataError(_unknown_color_message(color, adata, obs, gene_symbols))


def _as_1d(color: Any) -> Any:
    if isinstance(color, pd.Categorical):
        return color
    arr = np.asarray(color)
    if arr.ndim != 1:
        raise DataError(f"color as an array must be 1-D (one value per cell); got shape {arr.shape}.")
    return arr


def _gene_values(
    adata: Any, gene: str, *, layer: str | None, use_raw: bool | None, gene_symbols: str | None
) -> np.ndarray | None:
    if layer is not None:
        if layer not in adata.layers:
            raise DataError(f"layers[{layer!r}] does not exist; available: {list(adata.layers.keys())}.")
        sources = [(adata.layers[layer], adata.var_names, adata.var)]
    else:
        raw = getattr(adata, "raw", None)
        if use_raw and raw is None:
            raise DataError("use_raw=True but adata.raw is None; pass use_raw=False to read adata.X.")
        # by default (use_raw=None) a raw without the gene_symbols column is passed over, not an error
        no_symbols = raw is not None and gene_symbols is not None and gene_symbols not in raw.var.columns
        read_raw = raw is not None and (use_raw or (use_raw is None and not no_symbols))
        from_raw = [(raw.X, raw.var_names, raw.var)] if read_raw else []
        from_x = [] if use_raw else [(adata.X, adata.var_names, adata.var)]
        sources = from_raw + from_x
    for matrix, var_names, var in sources:
        j = _gene_index(gene, var_names, var, gene_symbols)
        if j is not None:
            if matrix is None:
                raise DataError(f"adata.X is None; pass layer=<name> to read {gene!r} from a layer.")
            col = matrix[:, j]
            if hasattr(col, "toarray"):
                col = col.toarray()
            return np.asarray(col, dtype=np.float64).ravel()
    return None


def _gene_index(gene: str, var_names: pd.Index, var: pd.DataFrame, gene_symbols: str | None) -> int | None:
    if gene_symbols is not None:
        if gene_symbols not in var.columns:
            raise DataError(
                f"gene_symbols={gene_symbols!r} is not a var column; available: {list(var.columns)}."
            )
        hits = np.flatnonzero(var[gene_symbols].astype(str).to_numpy() == gene)
        return int(hits[0]) if len(hits) else None
    j = var_names.get_indexer([gene])[0] if var_names.is_unique else _first(var_names, gene)
    return int(j) if j >= 0 else None


def _first(index: pd.Index, key: str) -> int:
    hits = np.flatnonzero(np.asarray(index) == key)
    return int(hits[0]) if len(hits) else -1


def _unknown_color_message(color: str, adata: Any, obs: pd.DataFrame, gene_symbols: str | None) -> str:
    cols = [str(c) for c in obs.columns]
    msg = f"color={color!r} is not an obs column"
    if adata is None:
        return (
            f"{msg}; obs columns: {cols[:30]}. Pass obs=<DataFrame> with that column, or color=<array of "
            "one value per cell>."
        )
    genes: list[str] = []
    for var_names, var in [(adata.var_names, adata.var)] + (
        [(adata.raw.var_names, adata.raw.var)] if getattr(adata, "raw", None) is not None else []
    ):
        names = var[gene_symbols].astype(str) if gene_symbols and gene_symbols in var.columns else var_names
        genes.extend(str(g) for g in names)
    genes = list(dict.fromkeys(genes))
    lower = {g.lower(): g for g in genes}
    close = [lower[color.lower()]] if color.lower() in lower else _close(color, genes, n=4)
    close += difflib.get_close_matches(color, cols, n=2)
    hint = f" Did you mean {close}?" if close else ""
    where = "adata.raw, adata.X" if getattr(adata, "raw", None) is not None else "adata.X"
    return (
        f"{msg} nor a gene in {where} (var_names{' / var[' + repr(gene_symbols) + ']' if gene_symbols else ''})."
        f"{hint} obs columns: {cols[:30]}; genes ({len(genes)}) start with {genes[:10]}."
    )


def _close(name: str, options: list[str], *, n: int) -> list[str]:
    """Names that start with ``name`` (any case, shortest first), then difflib's close matches."""
    low = name.lower()
    prefix = sorted((o for o in options if o.lower().startswith(low)), key=lambda o: (len(o), o))
    return list(dict.fromkeys([*prefix, *difflib.get_close_matches(name, options, n=n)]))[:n]


def _hover_columns(hover: Sequence[str] | None, obs: pd.DataFrame, color_key: str | None) -> list[str]:
    if hover is None:
        picked = [
            c
            for c in obs.columns
            if c != color_key and (isinstance(obs[c].dtype, pd.CategoricalDtype) or obs[c].dtype == bool)
        ]
        return [str(c) for c in picked[:_DEFAULT_HOVER]]
    if isinstance(hover, str):
        hover = [hover]
    missing = [h for h in hover if h not in obs.columns]
    if missing:
        raise DataError(
            f"hover columns {missing} are not obs columns; available: {[str(c) for c in obs.columns][:30]}."
        )
    return [h for h in hover if h != color_key]


def _selection(selected: Any, n: int) -> np.ndarray | None:
    if selected is None:
        return None
    arr = np.asarray(selected)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise DataError(f"selected as a mask must have one entry per cell ({n}); got shape {arr.shape}.")
        return arr
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError("selected must be a boolean mask or integer obs positions.")
    mask = np.zeros(n, dtype=bool)
    if arr.size:
        if arr.min() < -n or arr.max() >= n:
            raise DataError(f"selected holds positions outside 0..{n - 1}.")
        mask[arr.astype(np.int64)] = True
    return mask


# -- traces ------------------------------------------------------------------------------------


def _is_categorical(values: pd.Series) -> bool:
    dtype = values.dtype
    return (
        isinstance(dtype, pd.CategoricalDtype)
        or pd.api.types.is_bool_dtype(dtype)
        or not pd.api.types.is_numeric_dtype(dtype)
    )


def _auto_size(n: int) -> float:
    return float(np.clip(20.0 / max(n, 1) ** 0.2, 1.5, 8.0))


def _fmt(values: pd.Series) -> pd.Series:
    if pd.api.types.is_float_dtype(values.dtype):
        return values.round(4).astype(str)
    return values.astype(str)


def _hover_data(pts: Points, cols: list[str]) -> np.ndarray:
    """``(n_shown, 2 + len(cols))`` object array: obs position, cell name, hover columns as text."""
    pos = pts.positions
    out = np.empty((len(pos), 2 + len(cols)), dtype=object)
    out[:, 0] = pos.astype(np.int64)
    out[:, 1] = pts.names[pos].astype(str)
    for j, c in enumerate(cols, start=2):
        out[:, j] = _fmt(pts.obs[c].iloc[pos].reset_index(drop=True)).to_numpy(dtype=object)
    return out


def _esc(text: Any) -> str:
    """Text for a hovertemplate: HTML-escaped, with ``%{`` / ``}`` neutralised."""
    return html.escape(str(text)).replace("%{", "%&#123;").replace("}", "&#125;")


def _hovertemplate(cols: list[str], value: str | None = None) -> str:
    """Cell name (customdata column 1), the colour ``value`` line, then the hover columns."""
    parts = ["<b>%{customdata[1]}</b>"]
    if value is not None:
        parts.append(value)
    parts += [f"{_esc(c)}: %{{customdata[{j}]}}" for j, c in enumerate(cols, start=2)]
    return "<br>".join(parts) + "<extra></extra>"


def _trace(
    pts: Points, rows: Any, custom: np.ndarray, *, name: str, color: Any, hovertemplate: str
) -> go.Scattergl:
    """One Scattergl of the drawn cells ``pts.positions[rows]`` (``custom`` rows aligned to positions)."""
    idx = pts.positions[rows]
    trace = go.Scattergl(
        x=pts.coords[idx, 0],
        y=pts.coords[idx, 1],
        mode="markers",
        customdata=custom[rows],
        hovertemplate=hovertemplate,
        name=name,
        marker={"size": pts.size, "color": color, "line": {"width": 0}},
    )
    if pts.mask is not None:
        trace.selectedpoints = np.flatnonzero(pts.mask[idx])
        trace.selected = {"marker": {"opacity": 1.0}}
        trace.unselected = {"marker": {"opacity": UNSELECTED_OPACITY}}
    return trace


def _categorical_traces(
    pts: Points, custom: np.ndarray, cols: list[str], *, palette: Any, key: Any
) -> list[go.Scattergl]:
    groups = category_groups(pts, palette=palette, key=key)
    if len(groups) > MAX_CATEGORIES:
        raise DataError(
            f"{pts.label!r} has {len(groups):,} categories among the drawn cells; a categorical colour "
            f"draws one trace (legend entry) each, at most {MAX_CATEGORIES}. Colour by a column with "
            "fewer categories, or group the rare ones first."
        )
    label = _esc(pts.label)
    return [
        _trace(
            pts,
            rows,
            custom,
            name=name,
            color=col,
            hovertemplate=_hovertemplate(cols, f"{label}: {_esc(name)}"),
        )
        for name, rows, col in groups
    ]


def _category_colors(categories: list[str], palette: Any, uns_colors: Any) -> list[str]:
    n = len(categories)
    if palette is None:
        if uns_colors is not None and len(uns_colors) >= n:
            return [str(c) for c in list(uns_colors)[:n]]
        return default_palette(n)
    if isinstance(palette, str):
        from plotly.colors import qualitative

        named = getattr(qualitative, palette, None)
        if not isinstance(named, list):
            options = sorted(
                k for k, v in vars(qualitative).items() if isinstance(v, list) and not k.startswith("_")
            )
            raise ConfigError(
                f"palette={palette!r} is not a plotly qualitative palette; use one of {options}, a list of "
                "colours or a {category: colour} dict."
            )
        return [named[i % len(named)] for i in range(n)]
    if isinstance(palette, Mapping):
        fallback = default_palette(n)
        return [str(palette.get(c, fallback[i])) for i, c in enumerate(categories)]
    colors = [str(c) for c in palette]
    if not colors:
        raise ConfigError("palette is an empty list; pass at least one colour.")
    return [colors[i % len(colors)] for i in range(n)]


def check_continuous_palette(palette: Any, label: str | None) -> None:
    if palette is not None and not isinstance(palette, str):
        raise ConfigError(
            f"{label!r} is continuous: palette must be a plotly colour scale name such as 'Viridis'."
        )


def _continuous_traces(
    pts: Points, custom: np.ndarray, cols: list[str], *, palette: Any, sort_order: bool
) -> list[go.Scattergl]:
    check_continuous_palette(palette, pts.label)
    v, na_rows, rows = continuous_order(pts, sort=sort_order)
    label = _esc(pts.label or "color")
    traces = []
    if len(na_rows):
        tip = _hovertemplate(cols, f"{label}: NaN")
        traces.append(_trace(pts, na_rows, custom, name="NaN", color=NA_COLOR, hovertemplate=tip))
    marker_color = v[rows]
    tip = _hovertemplate(cols, f"{label}: %{{marker.color:.4~g}}")
    trace = _trace(pts, rows, custom, name=pts.label or "color", color=marker_color, hovertemplate=tip)
    trace.marker.colorscale = palette or DEFAULT_SCALE
    trace.marker.showscale = True
    trace.marker.colorbar = {"title": {"text": pts.label or ""}, "thickness": 14}
    if len(marker_color):
        trace.marker.cmin = float(marker_color.min())
        trace.marker.cmax = float(marker_color.max())
    traces.append(trace)
    return traces


# -- selections drawn on a figure --------------------------------------------------------------


def _inside(selector: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points ``(x, y)`` lie inside a plotly box / lasso selector (or a dict of its fields)."""

    def get(key: str) -> Any:
        return selector.get(key) if isinstance(selector, Mapping) else getattr(selector, key, None)

    kind = get("type")
    try:
        if kind == "box":
            (x0, x1), (y0, y1) = sorted(map(float, get("xrange"))), sorted(map(float, get("yrange")))
            return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        if kind == "lasso":
            return _in_polygon(x, y, np.asarray(get("xs"), dtype=float), np.asarray(get("ys"), dtype=float))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"selector of type {kind!r} has unreadable coordinates ({exc}).") from exc
    raise ConfigError(
        f"selector must be a box or a lasso (type 'box' with xrange/yrange, or 'lasso' with xs/ys); got type {kind!r}."
    )


def _in_polygon(x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points ``(x, y)`` lie inside the polygon ``(px, py)``."""
    inside = np.zeros(len(x), dtype=bool)
    n = len(px)
    if n < 3 or len(py) != n:
        return inside
    j = n - 1
    for i in range(n):
        xi, yi, xj, yj = px[i], py[i], px[j], py[j]
        crosses = (yi > y) != (yj > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (xj - xi) * (y - yi) / (yj - yi) + xi
        inside ^= crosses & (x < x_at)
        j = i
    return inside


def _axis_name(basis: str) -> str:
    key = basis.lower().removeprefix("x_").removeprefix("cellkit_")
    for suffix, name in _AXIS_NAMES.items():
        if key.endswith(suffix):
            return name
    return key or "dim"
