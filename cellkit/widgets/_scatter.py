"""The embedding explorer's scatter for large data: jupyter-scatter (``jscatter``, WebGL, anywidget).

plotly's ``Scattergl`` in a ``FigureWidget`` serves small data well (hover with the cell's name
and obs columns, legend clicks that hide categories) but sends every trace's arrays as JSON-framed
widget messages and rebuilds its traces on each colour change: 1.5–3.6 s per recolour at 100k
cells in JupyterLab + Chromium (``benchmarks/studio_scatter_lab.py``). jupyter-scatter
(regl-scatterplot) is made for millions of points: the coordinates and colour codes travel as one
binary ``float32`` array and a recolour sends only that array and a colour map.

:class:`GLScatter` is the thin view the :class:`~cellkit.widgets.EmbeddingPanel` uses above
:data:`JSCATTER_MIN_CELLS` cells: it draws what :func:`cellkit.viz.embedding_colors` gives
(the cells and colour values ``cellkit.viz.embedding`` would draw, with its colours),
highlights the panel's pending cells, and reports a lasso in the browser as obs positions. It has
no selection logic of its own: the panel resolves and stores selections as with plotly.

``jscatter`` is imported only when a plot is made (:func:`jscatter_available` checks without
importing it); without it the panel keeps plotly and its subsample.
"""

from __future__ import annotations

import html
import importlib.util
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd

from cellkit import ConfigError

__all__ = [
    "BACKENDS",
    "JSCATTER_MAX_POINTS",
    "JSCATTER_MIN_CELLS",
    "GLScatter",
    "choose_backend",
    "jscatter_available",
]

#: from this many cells on, ``backend="auto"`` draws with jupyter-scatter (when installed)
JSCATTER_MIN_CELLS = 100_000
#: jupyter-scatter draws at most this many cells (a random subsample, seed 0, above it)
JSCATTER_MAX_POINTS = 10_000_000
#: what ``EmbeddingPanel(backend=...)`` accepts
BACKENDS = ("auto", "plotly", "jscatter")
#: matplotlib name of the continuous colour map (plotly's default "Viridis" in the plotly view)
_CONTINUOUS_MAP = "viridis"


def jscatter_available() -> bool:
    """Whether jupyter-scatter (``pip install 'cellkit[scatter]'``) is installed (not imported)."""
    return importlib.util.find_spec("jscatter") is not None


def choose_backend(n_cells: int, backend: str = "auto", *, min_cells: int = JSCATTER_MIN_CELLS) -> str:
    """``"plotly"`` or ``"jscatter"``: which library draws an embedding of ``n_cells`` cells.

    Parameters
    ----------
    n_cells
        Number of cells of the data.
    backend
        ``"auto"``: jupyter-scatter from ``min_cells`` cells on when it is installed, else plotly;
        ``"plotly"`` / ``"jscatter"``: always that one.
    min_cells
        The ``"auto"`` threshold.

    Raises
    ------
    ConfigError
        An unknown ``backend``, or ``"jscatter"`` without jupyter-scatter installed.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    if backend == "plotly":
        return "plotly"
    if backend == "jscatter":
        if not jscatter_available():
            raise ConfigError(
                "backend='jscatter' needs jupyter-scatter: pip install 'cellkit[scatter]' "
                "(or use backend='auto' to fall back to plotly)."
            )
        return "jscatter"
    return "jscatter" if n_cells >= min_cells and jscatter_available() else "plotly"


class GLScatter:
    """One jupyter-scatter plot of an embedding: draw, recolour, highlight cells, report lassos.

    Parameters
    ----------
    on_select
        Called with the sorted int64 obs positions of the cells a lasso in the browser selected
        (an empty array when the browser's selection is cleared).
    height
        Plot height in pixels.

    Attributes
    ----------
    box
        The ``ipywidgets.VBox`` to show (CSS class ``cellkit-embedding-gl``): a title line and the
        ``jscatter`` widget (with its toolbar: pan/zoom, lasso, lasso type, full screen, ...).
    scatter
        The ``jscatter.Scatter`` drawn (``None`` before :meth:`draw`); ``scatter.widget`` is the
        anywidget (traits ``points``, ``color``, ``selection``, ...).
    positions
        ``(n_shown,)`` obs position of each drawn point (point ``i`` of the widget is cell
        ``positions[i]``).
    meta
        What is drawn, as ``cellkit.viz.embedding`` records in ``layout.meta``: ``basis``,
        ``color``, ``kind`` (``"none"``, ``"categorical"``, ``"continuous"``), ``hover``,
        ``n_cells``, ``n_valid``, ``n_shown``, ``notes``; plus ``categories`` (names in code order)
        for a categorical colour.
    """

    def __init__(self, *, on_select: Callable[[np.ndarray], None], height: int = 520) -> None:
        self._on_select = on_select
        self._height = int(height)
        self.title = widgets.HTML(value="")
        self.title.add_class("cellkit-embedding-gl-title")
        self.box = widgets.VBox([self.title], layout=widgets.Layout(width="100%"))
        self.box.add_class("cellkit-embedding-gl")
        self.scatter: Any = None
        self.positions = np.zeros(0, dtype=np.int64)
        self.meta: dict[str, Any] = {}
        self._sent: np.ndarray | None = None  # rows Python last set as the selection (echoes are ignored)

    @property
    def widget(self) -> Any:
        """The ``jscatter`` anywidget (``None`` before :meth:`draw`)."""
        return None if self.scatter is None else self.scatter.widget

    def reset(self) -> None:
        """Drop the plot (new data)."""
        if self.scatter is not None:
            self.scatter.widget.unobserve(self._on_widget_selection, names="selection")
            self.scatter.widget.close()
        self.scatter = None
        self.positions = np.zeros(0, dtype=np.int64)
        self.meta = {}
        self._sent = None
        self.title.value = ""
        self.box.children = [self.title]

    def draw(
        self,
        colors: Any,
        *,
        basis: str,
        title: str,
        hover: list[str],
        selected: np.ndarray,
    ) -> None:
        """Draw ``colors`` (a :class:`cellkit.viz.EmbeddingColors`) and highlight the obs positions ``selected``.

        A new basis or a new set of drawn cells makes a new plot (the view starts at the data's
        extent); otherwise only the colour encoding changes (one ``points`` array and a colour map
        are sent; zoom and pan stay).
        """
        pts = colors
        notes = list(pts.notes)
        kind, encoding, categories = pts.kind, None, None
        if kind == "categorical":
            categories = list(pts.categories)
            encoding = {
                "by": pd.Series(pd.Categorical.from_codes(pts.codes, categories=categories)),
                "map": dict(zip(categories, pts.colors, strict=True)),
                "labeling": {"variable": str(pts.label)},  # legend: the column's name, then the categories
            }
        elif kind == "continuous":
            encoding = {
                "by": pts.values,
                "map": _CONTINUOUS_MAP,
                "norm": (pts.vmin, pts.vmax),
                "labeling": (f"{pts.vmin:.3g}", f"{pts.vmax:.3g}", str(pts.label)),
            }

        positions = np.asarray(pts.positions, dtype=np.int64)
        if (
            self.scatter is None
            or basis != self.meta.get("basis")
            or not np.array_equal(positions, self.positions)
        ):
            self._new_plot(pts, positions)
        if encoding is None:
            self.scatter.color(default="#1f77b4", by=None, labeling=None)
        else:
            self.scatter.color(**encoding)
        self.meta = {
            "basis": basis,
            "color": pts.label,
            "kind": kind,
            "hover": list(hover),
            "n_cells": int(pts.n_cells),
            "n_valid": int(pts.n_valid),
            "n_shown": len(positions),
            "notes": notes,
            "categories": categories,
        }
        self.title.value = (
            f"<div style='text-align:center;font-size:15px;color:#444'>{html.escape(title)}</div>"
        )
        self.highlight(selected)

    def highlight(self, selected: np.ndarray) -> None:
        """Show the obs positions ``selected`` as jupyter-scatter's selection (empty: none)."""
        if self.scatter is None:
            return
        selected = np.asarray(selected, dtype=np.int64)
        idx = np.searchsorted(self.positions, selected)  # both sorted: the row of each drawn cell
        ok = idx < len(self.positions)
        ok[ok] = self.positions[idx[ok]] == selected[ok]
        rows = idx[ok].astype(np.uint32)
        self._sent = rows
        self.scatter.selection(rows if len(rows) else None)

    # -- internals

    def _new_plot(self, pts: Any, positions: np.ndarray) -> None:
        import jscatter

        if self.scatter is not None:
            self.scatter.widget.unobserve(self._on_widget_selection, names="selection")
            self.scatter.widget.close()
        xy = np.ascontiguousarray(pts.coords, dtype=np.float32)
        scatter = jscatter.Scatter(
            x=xy[:, 0],
            y=xy[:, 1],
            height=self._height,
            size=float(pts.size),
            axes=False,
            legend=True,
            legend_position="top-right",
            mouse_mode="lasso",  # a drag draws a lasso, as in the plotly view; the toolbar switches to pan
            lasso_initiator=False,
            reticle=False,
        )
        self.scatter = scatter
        self.positions = positions
        self._sent = None
        widget = scatter.show()
        widget.observe(self._on_widget_selection, names="selection")
        self.box.children = [self.title, widget]

    def _on_widget_selection(self, change: Any) -> None:
        new = change["new"]
        rows = np.zeros(0, dtype=np.int64) if new is None else np.asarray(new, dtype=np.int64)
        if self._sent is not None and np.array_equal(rows, self._sent.astype(np.int64)):
            return  # what Python just set, or the browser echoing it back
        self._sent = None
        rows = rows[(rows >= 0) & (rows < len(self.positions))]
        self._on_select(np.unique(self.positions[rows]))
