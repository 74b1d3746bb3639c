"""Static matplotlib figures for papers: the same inputs as the plotly figures, PDF/SVG/PNG out.

Each ``static_*`` function takes exactly what its plotly counterpart takes (minus the interactive
options: hover text, live updates) and returns a :class:`matplotlib.figure.Figure`. The figures
are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no global state,
no GUI backend, safe in scripts, threads and headless servers. What is drawn (cells, colours,
category order, top genes, normalised counts, curves) comes from the same helpers the plotly
figures use, so the two always agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .._errors import ConfigError
from .._utils import atomic_path
from ._embedding import (
    DEFAULT_SCALE,
    PLAIN_COLOR,
    UNSELECTED_OPACITY,
    category_groups,
    check_continuous_palette,
    continuous_order,
    prepare_points,
)
from ._heatmaps import ANNOTATE_MAX, attention_frame, attention_scale, confusion_data
from ._palettes import NA_COLOR
from ._training import PANEL_TITLES, training_curve_data

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = [
    "save_figure",
    "static_attention_heatmap",
    "static_confusion_matrix",
    "static_embedding",
    "static_training_curves",
]

#: file formats :func:`save_figure` writes, by suffix
FORMATS = ("pdf", "svg", "png")
#: plotly dash names -> matplotlib line styles
_DASH = {None: "-", "dot": ":", "dash": "--"}
#: show at most this many tick labels on a heatmap axis (as the plotly heatmaps)
_MAX_TICKS = 120
_NOTE_COLOR = "#777777"


# -- colours -----------------------------------------------------------------------------------


def _color(color: str) -> tuple[float, float, float, float]:
    """A plotly colour (``"#rrggbb"``, ``"rgb(r, g, b)"``, ``"rgba(...)"``, a CSS name) as RGBA."""
    text = str(color).strip()
    if text.startswith(("rgb(", "rgba(")):
        parts = [float(v) for v in text[text.index("(") + 1 : text.rindex(")")].split(",")]
        rgb = [v / 255.0 for v in parts[:3]]
        return (rgb[0], rgb[1], rgb[2], parts[3] if len(parts) > 3 else 1.0)
    try:
        return to_rgba(text)
    except ValueError as exc:
        raise ConfigError(f"{color!r} is not a colour matplotlib can draw; use '#rrggbb'.") from exc


def _colormap(name: str) -> LinearSegmentedColormap:
    """A plotly colour scale name (``"Viridis"``, ``"Blues"``, ``"RdBu_r"``) as a matplotlib colormap."""
    from plotly.colors import get_colorscale
    from plotly.exceptions import PlotlyError

    try:
        scale = get_colorscale(name)
    except PlotlyError as exc:
        raise ConfigError(
            f"{name!r} is not a plotly colour scale; use one such as 'Viridis', 'Blues' or 'RdBu_r'."
        ) from exc
    return LinearSegmentedColormap.from_list(name, [(float(pos), _color(c)) for pos, c in scale])


# -- figure plumbing ---------------------------------------------------------------------------


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    fig = ax.figure
    return getattr(fig, "figure", fig) or fig, ax  # a SubFigure's .figure is its root Figure


def _note(ax: Axes, text: str, *, top: bool = False) -> None:
    ax.text(
        0,
        1.01 if top else -0.04,
        text,
        transform=ax.transAxes,
        ha="left",
        va="bottom" if top else "top",
        fontsize=7,
        color=_NOTE_COLOR,
    )


def _tick_labels(ax: Axes, rows: Sequence[str], cols: Sequence[str], *, x_rotation: float) -> None:
    if len(cols) <= _MAX_TICKS:
        ha = "right" if 0 < x_rotation < 90 else "center"
        ax.set_xticks(np.arange(len(cols)), labels=list(cols), rotation=x_rotation, ha=ha)
    if len(rows) <= _MAX_TICKS:
        ax.set_yticks(np.arange(len(rows)), labels=list(rows))
    ax.tick_params(length=0, labelsize=7 if max(len(rows), len(cols)) > 30 else 9)


# -- embedding ---------------------------------------------------------------------------------


def static_embedding(
    data: AnnData | np.ndarray | pd.DataFrame,
    *,
    basis: str = "X_cellkit_umap",
    color: str | Sequence[Any] | np.ndarray | pd.Series | None = None,
    obs: pd.DataFrame | None = None,
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
    ax: Axes | None = None,
) -> Figure:
    """Static scatter of a 2-D embedding of cells (matplotlib), for PDF/SVG/PNG figures.

    The inputs and the drawing rules are those of :func:`cellkit.viz.embedding`: the same cells
    (NaN coordinates left out, ``max_points`` subsample with ``seed``), the same colours
    (scanpy's palette, ``uns[f"{color}_colors"]`` or ``palette``; missing values light grey),
    categories in a legend, continuous values with a colour bar and high values drawn on top.
    Above 20,000 points the markers are rasterised inside the vector file (small PDFs).

    Parameters
    ----------
    data
        An AnnData with ``obsm[basis]``, or the coordinates: an ``(n_cells, >= 2)`` array or DataFrame.
    basis
        ``obsm`` key of the coordinates (AnnData input only).
    color
        An obs column, a gene, or one value per cell; ``None``: one colour.
    obs
        Per-cell annotations for array input, so ``color`` may name its columns.
    layer
        Read gene values from ``adata.layers[layer]``.
    use_raw
        Read gene values from ``adata.raw`` (``None``: when it exists and has the gene).
    gene_symbols
        A ``var`` column to match gene names against instead of ``var_names``.
    dims
        The two coordinate columns to plot.
    title
        Axes title; default: the colour key.
    point_size
        Marker diameter in pixels (as in the plotly figure); default depends on the number of cells.
    max_points
        Draw at most this many cells, a random subsample (``seed``); a note under the plot says so.
    palette
        Categorical: a list of colours, a ``{category: colour}`` dict or a plotly qualitative
        palette name. Continuous: a plotly colour scale name (default ``"Viridis"``).
    selected
        Cells to highlight (boolean mask or obs positions); the others are drawn faint.
    seed
        Seed of the subsample.
    ax
        Draw into these axes (e.g. a panel of a larger figure); default: a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the axes; :func:`cellkit.viz.save_figure` writes it.
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
    if pts.values is not None and not pts.categorical:
        check_continuous_palette(palette, pts.label)
    fig, ax = _figure_and_axes(ax, (5.5, 4.5))
    style = {"s": (0.75 * pts.size) ** 2, "linewidths": 0, "rasterized": len(pts.positions) > 20_000}

    def alpha(idx: np.ndarray) -> np.ndarray | None:
        return None if pts.mask is None else np.where(pts.mask[idx], 1.0, UNSELECTED_OPACITY)

    def scatter(idx: np.ndarray, **kwargs: Any) -> Any:
        return ax.scatter(pts.coords[idx, 0], pts.coords[idx, 1], alpha=alpha(idx), **style, **kwargs)

    if pts.values is None:
        scatter(pts.positions, color=_color(PLAIN_COLOR))
    elif pts.categorical:
        handles = []
        for name, rows, col in category_groups(pts, palette=palette, key=color):
            scatter(pts.positions[rows], color=_color(col), label=name)
            handles.append(
                Line2D([], [], marker="o", linestyle="", color=_color(col), markersize=6, label=name)
            )
        ax.legend(
            handles=handles,
            title=pts.label or None,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
            fontsize=8,
            ncols=1 if len(handles) <= 16 else 2,
        )
    else:
        v, na_rows, rows = continuous_order(pts)
        if len(na_rows):
            scatter(pts.positions[na_rows], color=_color(NA_COLOR))
        mapped = scatter(
            pts.positions[rows],
            c=v[rows],
            cmap=_colormap(palette or DEFAULT_SCALE),
            vmin=float(v[rows].min()) if len(rows) else None,
            vmax=float(v[rows].max()) if len(rows) else None,
        )
        fig.colorbar(mapped, ax=ax, label=pts.label or "", shrink=0.8)
    ax.set_xlabel(pts.axis_titles[0])
    ax.set_ylabel(pts.axis_titles[1])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(title if title is not None else (pts.label or ""))
    if pts.notes:
        _note(ax, "; ".join(pts.notes))
    return fig


# -- heatmaps ----------------------------------------------------------------------------------


def static_attention_heatmap(
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
    ax: Axes | None = None,
) -> Figure:
    """Static heatmap of gene-to-gene attention (query genes as rows, key genes as columns).

    The inputs and the selection of genes are those of :func:`cellkit.viz.attention_heatmap`.

    Parameters
    ----------
    matrix
        ``(n_query, n_key)`` DataFrame or array, or ``(n_heads, n_query, n_key)`` array.
    rows, cols
        Query/key gene labels for array input (or to relabel a DataFrame).
    head
        With a 3-D array: the head to show; ``None`` averages the heads.
    title
        Axes title.
    zmid
        Centre of a diverging colour scale (symmetric around it, as plotly's ``zmid``).
    colorscale
        plotly colour scale name; default ``"Viridis"`` (``"RdBu_r"`` with ``zmid``).
    max_genes
        Keep at most this many query and key genes (largest totals); a note says so.
    value_name
        What the values are: the colour bar's label.
    ax
        Draw into these axes; default: a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        The first query gene is the top row.
    """
    frame, note = attention_frame(
        matrix, rows=rows, cols=cols, head=head, zmid=zmid, max_genes=max_genes, value_name=value_name
    )
    z = frame.to_numpy()
    limits: dict[str, float] = {}
    if zmid is not None and np.isfinite(z).any():
        half = float(np.nanmax(np.abs(z - zmid))) or 1.0
        limits = {"vmin": zmid - half, "vmax": zmid + half}
    n_rows, n_cols = frame.shape
    fig, ax = _figure_and_axes(ax, (min(2.5 + 0.18 * n_cols, 14.0), min(2.0 + 0.18 * n_rows, 14.0)))
    image = ax.imshow(
        np.ma.masked_invalid(z), cmap=_colormap(attention_scale(colorscale, zmid)), aspect="auto", **limits
    )
    _tick_labels(ax, list(frame.index), list(frame.columns), x_rotation=90)
    ax.set_xlabel("key gene")
    ax.set_ylabel("query gene")
    fig.colorbar(image, ax=ax, label=value_name, shrink=0.8)
    ax.set_title(title or "", pad=14 if note else 6)
    if note:
        _note(ax, note, top=True)
    return fig


def static_confusion_matrix(
    confusion: pd.DataFrame | np.ndarray,
    *,
    labels: Sequence[str] | None = None,
    pred_labels: Sequence[str] | None = None,
    normalize: Literal["true", "pred", "all"] | None = "true",
    annotate: bool | None = None,
    title: str | None = None,
    colorscale: str = "Blues",
    ax: Axes | None = None,
) -> Figure:
    """Static confusion matrix: true classes as rows, predicted as columns, counts in the cells.

    The inputs are those of :func:`cellkit.viz.confusion_matrix`. Colour shows the normalised
    value; each annotated cell shows the count and, when ``normalize`` is set, the fraction below
    it (row fraction for ``"true"``); each row label names the true class and its number of cells.

    Parameters
    ----------
    confusion
        ``(n_true, n_pred)`` counts: a DataFrame (index true, columns predicted) or an array.
    labels
        Class names of the rows for array input (and of the columns, unless ``pred_labels``).
    pred_labels
        Class names of the columns when they differ from the rows.
    normalize
        ``"true"`` (per row), ``"pred"`` (per column), ``"all"`` or ``None`` (counts).
    annotate
        Write counts (and fractions) in the cells; default only up to 25 classes.
    title
        Axes title.
    colorscale
        plotly colour scale name.
    ax
        Draw into these axes; default: a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        One image whose colours are the (normalised) matrix.
    """
    cm = confusion_data(confusion, labels=labels, pred_labels=pred_labels, normalize=normalize)
    counts, z = cm.counts.to_numpy(), cm.values
    if annotate is None:
        annotate = max(counts.shape) <= ANNOTATE_MAX
    n_rows, n_cols = counts.shape
    fig, ax = _figure_and_axes(ax, (min(2.8 + 0.55 * n_cols, 14.0), min(2.2 + 0.45 * n_rows, 14.0)))
    vmax = 1.0 if normalize is not None else (float(z.max()) or 1.0)
    image = ax.imshow(z, cmap=_colormap(colorscale), vmin=0.0, vmax=vmax, aspect="auto")
    if annotate:
        texts = cm.cell_texts(separator="\n")
        for i in range(n_rows):
            for j in range(n_cols):
                text = texts[i, j]
                dark = image.cmap(image.norm(z[i, j]))
                luminance = 0.299 * dark[0] + 0.587 * dark[1] + 0.114 * dark[2]
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7 if max(n_rows, n_cols) > 10 else 9,
                    color="white" if luminance < 0.5 else "black",
                )
    _tick_labels(ax, cm.row_labels(), list(cm.counts.columns), x_rotation=45)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, label=cm.value_name, shrink=0.8)
    ax.set_title(title or "")
    return fig


# -- training ----------------------------------------------------------------------------------


def static_training_curves(
    history_steps: pd.DataFrame | Any | None,
    history_epochs: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] | None = None,
    log_loss: bool = False,
    title: str | None = None,
) -> Figure:
    """Static training curves: losses and learning rate per step (top), metrics per epoch (bottom).

    The inputs and the lines are those of :func:`cellkit.viz.training_curves`.

    Parameters
    ----------
    history_steps
        Per-step records (DataFrame), a ``cellkit.train.History``, or ``None``.
    history_epochs
        Per-epoch records; taken from ``history_steps.epochs`` when a ``History`` is passed.
    metrics
        Epoch metrics for the bottom panel (``"accuracy"`` or ``"val/macro_f1"``); default: all.
    log_loss
        Log-scale loss axis.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes (losses with a twin learning-rate axis, metrics); each line's label is its column.
    """
    curves = training_curve_data(history_steps, history_epochs, metrics=metrics)
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[0.6, 0.4])
    lr_ax = top.twinx()
    panels = {"loss": top, "lr": lr_ax, "metrics": bottom}
    for c in curves:
        panels[c.panel].plot(
            c.x,
            c.y,
            label=c.name,
            color=c.color,
            linewidth=c.width,
            linestyle=_DASH.get(c.dash, "-"),
            marker="o" if c.markers else None,
            markersize=3.5,
        )
    top.set_title(PANEL_TITLES[0], fontsize=10)
    top.set_xlabel("step")
    top.set_ylabel("loss")
    if log_loss:
        top.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    bottom.set_title(PANEL_TITLES[1], fontsize=10)
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("metric")
    lines = top.get_lines() + lr_ax.get_lines()
    top.legend(lines, [line.get_label() for line in lines], fontsize=7, frameon=False, loc="upper right")
    if bottom.get_lines():
        bottom.legend(fontsize=7, frameon=False, loc="best")
    for a in (top, bottom):
        a.spines[["top"]].set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


# -- saving ------------------------------------------------------------------------------------


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 300) -> Path:
    """Write a static figure as PDF, SVG or PNG (by the file's suffix), atomically.

    The figure is written to a temporary file beside ``path`` and moved over it, so an interrupted
    write leaves an existing file intact. PDF and SVG carry no creation date (the same figure gives
    the same file).

    Parameters
    ----------
    fig
        A :class:`matplotlib.figure.Figure`, e.g. from :func:`static_embedding`.
    path
        Target file ending in ``.pdf``, ``.svg`` or ``.png``; parent folders are created.
    dpi
        Resolution of PNG files and of rasterised parts of vector files.

    Returns
    -------
    Path
        The written path.

    Raises
    ------
    ConfigError
        Another suffix, or a plotly figure (save those with :func:`cellkit.viz.save_html`).
    """
    if not isinstance(fig, Figure):
        plotly = hasattr(fig, "to_html")
        hint = " It is a plotly figure: save it with cellkit.viz.save_html." if plotly else ""
        raise ConfigError(
            f"save_figure writes matplotlib figures (cellkit.viz.static_*); got {type(fig).__name__}.{hint}"
        )
    path = Path(path)
    fmt = path.suffix.lower().removeprefix(".")
    if fmt not in FORMATS:
        raise ConfigError(
            f"save_figure writes {', '.join('.' + f for f in FORMATS)} files; {str(path)!r} ends in "
            f"{path.suffix or 'no suffix'}. Name the file e.g. {path.stem}.pdf."
        )
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": None}[fmt]
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
    return path
