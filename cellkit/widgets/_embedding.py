"""Embedding explorer: compute cell embeddings, show them as a WebGL scatter, colour, lasso-select.

A thin view over the public API: the compute button calls ``cellkit.embed_cells`` and
``cellkit.analysis.umap``; the scatter is ``cellkit.viz.embedding(adata, ..., figure=self.figure)``
drawn into one ``plotly`` ``FigureWidget`` that lives as long as the panel. The controls only
choose its arguments (basis, colour, gene layer / symbols, hover columns, max points, the
highlighted cells). ``viz.embedding`` updates the widget in place and sends only what changed: a
colour change between two continuous keys sends only the new colour array.

**A million cells.** From :data:`~cellkit.widgets._scatter.JSCATTER_MIN_CELLS` (100k) cells on,
when jupyter-scatter is installed (``pip install 'cellkit[scatter]'``), the same cells and colours
are drawn with ``jscatter`` instead (:class:`~cellkit.widgets._scatter.GLScatter`, made for
millions of points; every cell drawn, no subsample): pan/zoom, the same colour controls, a lasso
(drag, or the toolbar's lasso types) that becomes the pending selection. ``backend=`` forces one.
Without jupyter-scatter, plotly draws a random subsample (``max_points``) and says so.

A lasso/box selection in the browser reaches Python through the traces' ``on_selection``
callbacks (each point's obs position is ``customdata[:, 0]``; on a subsampled view
``cellkit.viz.embedding_selection`` finds every cell inside the shape);
:meth:`EmbeddingPanel.save_selection` stores it in the shared state, where the tokenize, fine-tune
and attention panels pick it up.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

import cellkit
from cellkit import DataError

from ._base import Panel, guarded, labelled
from ._progress import JobProgress
from ._scatter import JSCATTER_MAX_POINTS, JSCATTER_MIN_CELLS, GLScatter, choose_backend, jscatter_available
from ._state import StudioState

__all__ = ["EmbeddingPanel"]

#: default number of points drawn (a random subsample above it)
DEFAULT_MAX_POINTS = 200_000
#: bases tried first when data arrives
_PREFERRED_BASES = ("X_cellkit_umap", "X_umap", "X_tsne", "X_pca")
#: "use viz.embedding's default hover columns"
_DEFAULT = None


class EmbeddingPanel(Panel):
    """Cell embeddings: compute (``embed_cells`` + UMAP), scatter, colour, lasso-select cells.

    The scatter is :func:`cellkit.viz.embedding` drawn into :attr:`figure`; every control maps to
    one of its arguments.

    Parameters
    ----------
    state
        The shared :class:`~cellkit.widgets.StudioState` (a fresh one when used alone).
    max_points
        plotly view: draw at most this many cells (a random subsample, seed 0, above it). Lasso
        and box selections still pick every cell inside the drawn shape, shown or not. The
        jupyter-scatter view draws every cell (up to ``JSCATTER_MAX_POINTS``, 10 million).
    backend
        ``"auto"`` (default): jupyter-scatter for data of ``jscatter_min_cells`` cells or more
        when it is installed, else plotly; ``"plotly"`` or ``"jscatter"``: always that one.
    jscatter_min_cells
        The ``"auto"`` threshold (100k: plotly's recolour takes seconds there, jupyter-scatter's
        well under one; below it plotly's hover details serve better).

    Attributes
    ----------
    figure
        The ``plotly.graph_objects.FigureWidget`` (CSS class ``cellkit-embedding-plot``); its
        ``layout.meta`` says what is drawn (see :func:`cellkit.viz.embedding`). Empty and hidden
        while jupyter-scatter draws.
    gl
        The jupyter-scatter view (:class:`~cellkit.widgets._scatter.GLScatter`; ``gl.scatter`` is
        the ``jscatter.Scatter``, ``gl.meta`` says what is drawn); ``None`` until first used.
    backend
        ``"plotly"`` or ``"jscatter"``: what draws the current data.
    pending
        Obs positions of the current (unsaved) lasso/box selection.

    Examples
    --------
    >>> panel = EmbeddingPanel(StudioState(adata=adata, model=model))  # doctest: +SKIP
    >>> panel.set_basis("X_umap"); panel.color_by("bulk_labels")  # doctest: +SKIP
    >>> panel.select_points(np.arange(50)); panel.save_selection("first50")  # doctest: +SKIP
    """

    title = "Embeddings"

    def __init__(
        self,
        state: StudioState | None = None,
        *,
        max_points: int = DEFAULT_MAX_POINTS,
        backend: str = "auto",
        jscatter_min_cells: int = JSCATTER_MIN_CELLS,
        **kwargs: Any,
    ) -> None:
        choose_backend(0, backend)  # checks the value (and that jupyter-scatter is there if asked for)
        super().__init__(state, **kwargs)
        self.add_class("cellkit-embedding-panel")
        self._backend_choice = backend
        self._jscatter_min_cells = int(jscatter_min_cells)
        self.backend = "plotly"
        self.gl: GLScatter | None = None
        self.pending = np.zeros(0, dtype=np.int64)
        self.basis: str = ""
        self.color_key: str = ""
        self._hover: list[str] | None = _DEFAULT  # None: viz.embedding's default columns
        self._layer: str | None = None  # where gene values are read (viz.embedding's layer)
        self._gene_symbols: str | None = None  # var column of gene names (viz.embedding's gene_symbols)
        self._syncing = False
        self._trace_sel: dict[int, np.ndarray] = {}
        self._last_selector: Any = None

        # -- compute
        self.key_box = widgets.Text(value="X_cellkit", layout=widgets.Layout(width="160px"))
        self.key_box.add_class("cellkit-embedding-key")
        self.only_selection = widgets.Checkbox(
            value=False,
            description="only the active selection",
            indent=False,
            layout=widgets.Layout(width="200px"),
        )
        self.compute_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Compute embeddings",
            button_style="primary",
            icon="play",
            tooltip="cellkit.embed_cells(adata, model, key_added=<key>) then UMAP into obsm[<key>_umap]",
        )
        self.compute_button.on_click(lambda _b: self.compute(self.key_box.value, background=True))
        self.compute_button.add_class("cellkit-embedding-compute")
        #: progress bar, estimate and Cancel of "Compute embeddings"
        self.jobs = JobProgress(css_prefix="cellkit-embedding-job")

        # -- view
        self.basis_dropdown = widgets.Dropdown(options=[], layout=widgets.Layout(width="260px"))
        self.basis_dropdown.observe(self._on_basis_widget, names="value")
        self.color_dropdown = widgets.Dropdown(options=[("(none)", "")], layout=widgets.Layout(width="260px"))
        self.color_dropdown.observe(self._on_color_widget, names="value")
        self.color_dropdown.add_class("cellkit-color-by")
        self.gene_box = widgets.Combobox(
            options=[],
            placeholder="gene (type, then Enter)",
            ensure_option=False,
            continuous_update=False,
            layout=widgets.Layout(width="200px"),
        )
        self.gene_box.observe(self._on_gene_widget, names="value")
        self.gene_box.add_class("cellkit-color-gene")
        self.layer_dropdown = widgets.Dropdown(
            options=[("raw, else X", "")],
            tooltip="where gene values are read: viz.embedding(layer=...)",
            layout=widgets.Layout(width="150px"),
        )
        self.layer_dropdown.observe(self._on_gene_source_widget, names="value")
        self.symbols_dropdown = widgets.Dropdown(
            options=[("var_names", "")],
            tooltip="the var column gene names are matched against: viz.embedding(gene_symbols=...)",
            layout=widgets.Layout(width="150px"),
        )
        self.symbols_dropdown.observe(self._on_gene_source_widget, names="value")
        self.hover_select = widgets.SelectMultiple(options=[], rows=3, layout=widgets.Layout(width="260px"))
        self.hover_select.observe(self._on_hover_widget, names="value")
        self.max_points_box = widgets.BoundedIntText(
            value=int(max_points), min=1, max=10**9, step=10_000, layout=widgets.Layout(width="120px")
        )
        self.max_points_box.observe(self._on_max_points, names="value")
        self.refresh_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Refresh",
            icon="refresh",
            tooltip="re-read obsm / obs keys of the data",
        )
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.note = widgets.HTML(value="")
        self.note.add_class("cellkit-embedding-note")

        # what viz.embedding does not set: the panel's size, the lasso as drag mode
        self.figure = go.FigureWidget(
            layout={
                "dragmode": "lasso",
                "height": 520,
                "margin": {"l": 40, "r": 20, "t": 40, "b": 50},
                "hovermode": "closest",
                "title": {"text": "no embedding shown"},
            }
        )
        self.figure.add_class("cellkit-embedding-plot")
        #: holds the figure or the jupyter-scatter view, whichever draws the data
        self.plot_box = widgets.VBox([self.figure], layout=widgets.Layout(width="100%"))

        # -- selection
        self.selection_label = widgets.HTML(value="")
        self.selection_label.add_class("cellkit-selection-count")
        self.selection_name = widgets.Text(value="lasso_1", layout=widgets.Layout(width="160px"))
        self.selection_name.add_class("cellkit-selection-name")
        self.save_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Save selection",
            icon="save",
            tooltip="store the selected cells in the studio",
        )
        self.save_button.on_click(lambda _b: self.save_selection(self.selection_name.value))
        self.clear_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Clear selection", icon="times"
        )
        self.clear_button.on_click(lambda _b: self.clear_selection())
        self.write_obs = widgets.Checkbox(
            value=False,
            description="also write obs column",
            indent=False,
            layout=widgets.Layout(width="max-content"),
        )
        self.obs_key_box = widgets.Text(
            value="", placeholder="obs key (default: the name)", layout=widgets.Layout(width="200px")
        )

        self.children = [
            self.message,
            widgets.HBox(
                [labelled("Embedding key", self.key_box, "110px"), self.only_selection, self.compute_button]
            ),
            self.jobs,
            widgets.HBox(
                [
                    labelled("Basis", self.basis_dropdown, "60px"),
                    labelled("Colour by", self.color_dropdown, "70px"),
                    labelled("or gene", self.gene_box, "60px"),
                ]
            ),
            widgets.HBox(
                [
                    labelled("Gene values", self.layer_dropdown, "80px"),
                    labelled("Gene names", self.symbols_dropdown, "80px"),
                ]
            ),
            widgets.HBox(
                [
                    labelled("Hover", self.hover_select, "60px"),
                    labelled("Max points", self.max_points_box, "80px"),
                    self.refresh_button,
                ]
            ),
            self.plot_box,
            self.note,
            widgets.HBox([self.selection_label]),
            widgets.HBox(
                [
                    labelled("Selection name", self.selection_name, "110px"),
                    self.save_button,
                    self.clear_button,
                    self.write_obs,
                    self.obs_key_box,
                ]
            ),
        ]
        self.state.observe(self._on_adata, names="adata")
        self.state.observe(self._on_embedding_key, names="embedding_key")
        self.state.observe(self._on_finetune, names="finetune_result")
        self.state.observe(self._on_busy, names="busy")
        self.state.observe(self._on_obs_changed, names="obs_version")
        self._update_selection_label()
        self._reset_for_data()

    # ------------------------------------------------------------------ public actions

    @guarded
    def refresh(self) -> None:
        """Re-read the data's ``obsm``, ``obs``, ``layers`` and ``var`` keys (e.g. after another tool wrote new ones)."""
        self._refresh_options()
        self.show_message(
            f"{len(self.basis_dropdown.options)} bases, {len(self._obs_columns())} obs columns."
        )

    @guarded
    def compute(
        self, key_added: str = "X_cellkit", *, cells: Any = "selection", background: bool = False
    ) -> str | None:
        """Embed the cells with the current model and lay them out with UMAP.

        Writes ``adata.obsm[key_added]`` (``cellkit.embed_cells``) and
        ``adata.obsm[key_added + "_umap"]`` (``cellkit.analysis.umap``), then shows the UMAP.

        Parameters
        ----------
        key_added
            ``obsm`` key of the embedding; the UMAP goes to ``key_added + "_umap"``.
        cells
            ``"selection"`` (default): the active selection when the "only the active selection"
            box is ticked, else all cells; ``None``: all cells; or anything ``embed_cells`` accepts.
        background
            Run in a background thread (the button does; :meth:`wait` joins it). While it runs
            :attr:`jobs` shows the progress and the compute button is disabled; its Cancel stops
            the embedding (nothing is written).

        Returns
        -------
        The UMAP key (``None`` on error, when cancelled or when running in the background).
        """
        model, adata = self._need_model(), self._need_data()
        key = str(key_added if key_added is not None else "").strip()  # embed_cells checks it
        if isinstance(cells, str) and cells == "selection":
            cells = self.state.selected_cells() if self.only_selection.value else None
            where = f"selection “{self.state.active_selection}”" if cells is not None else "all cells"
        else:
            where = "all cells" if cells is None else "the given cells"
        umap_key = f"{key}_umap"
        existed = [k for k in (key, umap_key) if k in adata.obsm]

        def work(progress: cellkit.Progress) -> str:
            self.show_message(f"Embedding {where} with the model, then UMAP …", "info")
            cellkit.embed_cells(adata, model, key_added=key, cells=cells, progress=progress)
            self.jobs.step("Laying the cells out with UMAP (no estimate)")
            cellkit.analysis.umap(adata, use_rep=key, key_added=umap_key)
            return umap_key

        def done(result: str) -> None:
            emb = adata.obsm[key]
            n_ok = int(np.isfinite(np.asarray(emb)).all(axis=1).sum())
            self._refresh_options()
            self._draw(basis=result)
            self.state.embedding_key = result
            over = f" (overwrote {', '.join(existed)})" if existed else ""
            self.show_message(
                f"Embedded {n_ok:,} cells ({where}). Wrote adata.obsm[{key!r}] "
                f"({emb.shape[0]:,} × {emb.shape[1]}) and adata.obsm[{umap_key!r}] "
                f"({emb.shape[0]:,} × 2){over}; showing {umap_key!r}.",
                "ok",
            )

        return self.jobs.run(
            self,
            work,
            name="Compute embeddings",
            buttons=[self.compute_button],
            on_done=done,
            background=background,
        )

    @guarded
    def set_basis(self, key: str) -> None:
        """Show ``adata.obsm[key]`` (its first two columns) without recomputing anything."""
        self._need_data()
        self._draw(basis=str(key))
        self.state.embedding_key = self.basis
        self.show_message(f"Showing {self.basis!r} ({self._describe_shown()}).", "info")

    @guarded
    def color_by(
        self, name: str | None, *, layer: str | None = None, gene_symbols: str | None = None
    ) -> None:
        """Colour the cells by an obs column (categorical or numeric, e.g. predicted labels) or a gene.

        ``None`` or ``""``: one colour. As :func:`cellkit.viz.embedding`: obs columns win over genes
        of the same name; gene values come from ``adata.layers[layer]`` when given, else from
        ``adata.raw`` when it has the gene, else from ``adata.X``; ``gene_symbols`` names a var
        column to match gene names against. ``layer`` / ``gene_symbols`` default to the panel's
        "Gene values" / "Gene names" dropdowns and set them.
        """
        self._need_data()
        name = "" if name is None else str(name).strip()
        source = {
            "layer": (self.layer_dropdown.value or None) if layer is None else layer,
            "gene_symbols": (self.symbols_dropdown.value or None) if gene_symbols is None else gene_symbols,
        }
        self._draw(color=name, **source)
        self._sync_color_widgets(name, **source)
        if self.basis:
            kind = self._meta().get("kind", "none")
            what = {"none": "one colour", "categorical": "categories", "continuous": "a colour scale"}[kind]
            self.show_message(f"Coloured by {name or 'nothing'} ({what}).", "info")

    @guarded
    def set_hover(self, columns: Sequence[str]) -> None:
        """obs columns shown on hover (after the cell name and the colour value)."""
        self._need_data()
        self._draw(hover=[str(c) for c in columns])

    @guarded
    def select_points(self, positions: Any) -> np.ndarray:
        """Make ``positions`` the pending selection: obs positions, a boolean mask, obs names or a query.

        The programmatic equivalent of a lasso (anything :func:`cellkit.select_cells` takes): the
        figure highlights those cells and :meth:`save_selection` stores them. Returns the sorted
        obs positions.
        """
        adata = self._need_data()
        pos = cellkit.select_cells(adata.obs, positions, order="sorted", selections=self.state.selections)
        self._set_pending(pos, highlight=True)
        return self.pending

    @guarded
    def clear_selection(self) -> None:
        """Forget the pending selection and release the active one: actions use all cells again.

        Saved selections stay (they can be chosen again in the Data tab).
        """
        self._set_pending(np.zeros(0, dtype=np.int64), highlight=True)
        self.state.use_all_cells()

    @guarded
    def save_selection(
        self, name: str | None = None, *, write_obs: bool | None = None, obs_key: str | None = None
    ) -> np.ndarray:
        """Store the pending selection as ``state.selections[name]`` and make it the active one.

        Parameters
        ----------
        name
            Selection name (default: the name box).
        write_obs
            Also write ``adata.obs[obs_key]`` = in-selection (bool). Default: the checkbox.
        obs_key
            The obs column (default: the key box, else ``name``). An existing column is replaced
            only if it is boolean (an earlier selection); other columns are left alone.

        Returns
        -------
        The selected obs names.
        """
        adata = self._need_data()
        name = (self.selection_name.value if name is None else str(name)).strip()
        if not name:
            raise DataError("Give the selection a name (the box next to “Save selection”).")
        if len(self.pending) == 0:
            raise DataError(
                "No cells selected: draw a lasso or box on the plot (or call select_points) before saving."
            )
        write = self.write_obs.value if write_obs is None else bool(write_obs)
        key = ""
        if write:
            key = (obs_key if obs_key is not None else self.obs_key_box.value).strip() or name
            if key in adata.obs.columns and not pd.api.types.is_bool_dtype(adata.obs[key].dtype):
                raise DataError(
                    f"obs[{key!r}] already exists and is not a selection (dtype {adata.obs[key].dtype}); "
                    "pick another obs key."
                )
        names = self.state.add_selection(name, self.pending)
        text = (
            f"Saved selection “{name}” ({len(names):,} cells); it is now the active selection "
            "(tokenize, fine-tune and attention use it)."
        )
        if write:
            mask = np.zeros(adata.n_obs, dtype=bool)
            mask[self.pending] = True
            adata.obs[key] = mask
            text += f" Wrote adata.obs[{key!r}] (True for the {len(names):,} selected cells)."
            self._refresh_options()
            self.state.obs_changed()
        self.selection_name.value = _next_name(name, self.state.selections)
        self.show_message(text, "ok")
        return names

    # ------------------------------------------------------------------ state observers

    def _on_adata(self, _change: Any) -> None:
        try:
            self._reset_for_data()
        except Exception as exc:  # pragma: no cover - shown, never raised into traitlets
            self.show_error(exc)

    def _on_embedding_key(self, change: Any) -> None:
        key = change["new"]
        if key and key != self.basis and self.state.adata is not None and key in self.state.adata.obsm:
            try:
                self._refresh_options()
                self._draw(basis=key)
            except Exception as exc:
                self.show_error(exc)

    def _on_finetune(self, _change: Any) -> None:
        if self.state.adata is not None:
            self._refresh_options()

    def _on_obs_changed(self, _change: Any) -> None:
        if self.state.adata is not None:
            try:
                self._refresh_options()
            except Exception as exc:  # pragma: no cover - never raise into traitlets
                self.show_error(exc)

    def _on_busy(self, change: Any) -> None:
        # a background job (predict, embed, ...) just ended: it may have written obs / obsm keys
        if change["old"] and not change["new"] and self.state.adata is not None:
            try:
                self._refresh_options()
            except Exception as exc:  # pragma: no cover - never raise into traitlets
                self.show_error(exc)

    # ------------------------------------------------------------------ widget observers

    def _on_basis_widget(self, change: Any) -> None:
        if not self._syncing and change["new"]:
            self.set_basis(change["new"])

    def _on_color_widget(self, change: Any) -> None:
        if not self._syncing:
            self.color_by(change["new"])

    def _on_gene_widget(self, change: Any) -> None:
        if not self._syncing and str(change["new"]).strip():
            self.color_by(change["new"])

    def _on_hover_widget(self, change: Any) -> None:
        if not self._syncing:
            self.set_hover(list(change["new"]))

    def _on_max_points(self, _change: Any) -> None:
        if not self._syncing and self.basis:
            self.set_basis(self.basis)

    def _on_gene_source_widget(self, _change: Any) -> None:
        if self._syncing or self.state.adata is None:
            return
        self._syncing = True
        try:
            self._refresh_gene_options(self.state.adata)  # the gene box lists the chosen column's names
        finally:
            self._syncing = False
        if self.color_key:
            self.color_by(self.color_key)

    # ------------------------------------------------------------------ internals: data

    def _need_data(self) -> Any:
        if self.state.adata is None:
            raise DataError("No data loaded: pick an AnnData in the Data panel first.")
        return self.state.adata

    def _need_model(self) -> Any:
        if self.state.model is None:
            raise DataError("No model loaded: load one in the Model panel first.")
        return self.state.model

    def _obs_columns(self) -> list[str]:
        adata = self.state.adata
        return [] if adata is None else [str(c) for c in adata.obs.columns]

    def _reset_for_data(self) -> None:
        """New (or no) data: refresh options, drop the figure and the pending selection, show a default view."""
        self.basis, self.color_key, self._hover = "", "", _DEFAULT
        self._layer = self._gene_symbols = None
        self._trace_sel = {}
        self.pending = np.zeros(0, dtype=np.int64)
        self._pick_backend()
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.layout.annotations = ()
            self.figure.layout.meta = None
            self.figure.layout.title.text = "no embedding shown"
        self.note.value = ""
        self._update_selection_label()
        self._syncing = True
        try:
            self.layer_dropdown.value = ""
            self.symbols_dropdown.value = ""
        finally:
            self._syncing = False
        self._refresh_options()
        adata = self.state.adata
        if adata is None:
            return
        color = _default_color(adata.obs)
        bases = [v for _, v in self.basis_dropdown.options]
        first = next((b for b in (self.state.embedding_key, *_PREFERRED_BASES) if b in bases), None)
        first = first or (bases[0] if bases else None)
        if first is None:
            self.show_message(
                "No 2-D embedding in adata.obsm yet: press “Compute embeddings” to embed the cells "
                "and lay them out with UMAP.",
                "info",
            )
            return
        self._draw(basis=first, color=color)
        self.state.embedding_key = first
        self._sync_color_widgets(color)
        self.show_message(
            f"Showing {first!r} ({self._describe_shown()})"
            + (f", coloured by {color!r}" if color else "")
            + ". Pick another basis or colour, or press “Compute embeddings”.",
            "info",
        )

    def _refresh_options(self) -> None:
        adata = self.state.adata
        self._syncing = True
        try:
            if adata is None:
                self.basis_dropdown.options = []
                self.color_dropdown.options = [("(none)", "")]
                self.gene_box.options = []
                self.hover_select.options = []
                self.layer_dropdown.options = [("raw, else X", "")]
                self.symbols_dropdown.options = [("var_names", "")]
                return
            bases = _basis_options(adata)
            if tuple(bases) != tuple(self.basis_dropdown.options):
                self.basis_dropdown.options = bases
            self.basis_dropdown.value = self.basis if self.basis in [v for _, v in bases] else None
            preds = _prediction_columns(adata)
            cols = self._obs_columns()
            opts = [("(none)", "")]
            opts += [(f"{c} (predicted labels)", c) for c in preds]
            opts += [(c, c) for c in cols if c not in preds]
            if tuple(opts) != tuple(self.color_dropdown.options):
                self.color_dropdown.options = opts
            self.color_dropdown.value = self.color_key if self.color_key in cols else ""
            self._refresh_gene_options(adata)
            if tuple(cols) != tuple(self.hover_select.options):
                self.hover_select.options = cols
            shown = self._meta().get("hover", [])
            self.hover_select.value = tuple(c for c in shown if c in cols)
        finally:
            self._syncing = False

    def _refresh_gene_options(self, adata: Any) -> None:
        """Layers, var columns of names and the gene names (of the chosen column) to colour by."""
        layers = [("raw, else X", "")] + [(str(k), str(k)) for k in adata.layers]
        if tuple(layers) != tuple(self.layer_dropdown.options):
            keep = self.layer_dropdown.value
            self.layer_dropdown.options = layers
            self.layer_dropdown.value = keep if keep in [v for _, v in layers] else ""
        symbols = [("var_names", "")] + [(str(c), str(c)) for c in _name_columns(adata.var)]
        if tuple(symbols) != tuple(self.symbols_dropdown.options):
            keep = self.symbols_dropdown.value
            self.symbols_dropdown.options = symbols
            self.symbols_dropdown.value = keep if keep in [v for _, v in symbols] else ""
        genes = _gene_names(adata, self.symbols_dropdown.value or None)
        if tuple(genes) != tuple(self.gene_box.options):  # can be tens of thousands: send once
            self.gene_box.options = genes

    def _sync_color_widgets(
        self, name: str, *, layer: str | None = None, gene_symbols: str | None = None
    ) -> None:
        self._syncing = True
        try:
            in_obs = name in [v for _, v in self.color_dropdown.options]
            self.color_dropdown.value = name if in_obs else ""
            self.gene_box.value = "" if in_obs else name
            self.layer_dropdown.value = layer or ""
            if (gene_symbols or "") != self.symbols_dropdown.value:
                self.symbols_dropdown.value = gene_symbols or ""
                self._refresh_gene_options(self.state.adata)
        finally:
            self._syncing = False

    # ------------------------------------------------------------------ internals: figure

    def _draw(self, **changes: Any) -> None:
        """Draw the current view with ``changes`` (basis, color, hover, layer, gene_symbols) applied.

        ``cellkit.viz.embedding`` checks every argument before it touches the figure, so on error
        the view (and the panel's record of it) stays as it was.
        """
        view = {**self._view(), **changes}
        if not view["basis"]:
            return
        if self.backend == "jscatter":
            self._draw_gl(view)
            return
        cellkit.viz.embedding(
            self.state.adata,
            basis=view["basis"],
            color=view["color"] or None,
            hover=view["hover"],
            layer=view["layer"],
            gene_symbols=view["gene_symbols"],
            max_points=int(self.max_points_box.value),
            selected=self.pending if len(self.pending) else None,
            sort_order=False,  # keeps obs order, so a new colour sends only colours
            title=f"{view['basis']} — {view['color']}" if view["color"] else view["basis"],
            figure=self.figure,
        )
        self.basis, self.color_key, self._hover = view["basis"], view["color"], view["hover"]
        self._layer, self._gene_symbols = view["layer"], view["gene_symbols"]
        self._after_draw()

    def _draw_gl(self, view: dict[str, Any]) -> None:
        """:meth:`_draw` with jupyter-scatter: the cells and colours ``viz.embedding`` would draw."""
        assert self.gl is not None
        colors = cellkit.viz.embedding_colors(  # checks every argument before anything is drawn
            self.state.adata,
            basis=view["basis"],
            color=view["color"] or None,
            layer=view["layer"],
            gene_symbols=view["gene_symbols"],
            max_points=JSCATTER_MAX_POINTS,
        )
        self.gl.draw(
            colors,
            basis=view["basis"],
            title=f"{view['basis']} — {view['color']}" if view["color"] else view["basis"],
            hover=[],  # no hover in the WebGL view (the note says so)
            selected=self.pending,
        )
        self.basis, self.color_key, self._hover = view["basis"], view["color"], view["hover"]
        self._layer, self._gene_symbols = view["layer"], view["gene_symbols"]
        self._after_draw()

    def _pick_backend(self) -> None:
        """Choose plotly or jupyter-scatter for the current data and show that one's view."""
        adata = self.state.adata
        n = 0 if adata is None else int(adata.n_obs)
        self.backend = choose_backend(n, self._backend_choice, min_cells=self._jscatter_min_cells)
        if self.gl is not None:
            self.gl.reset()
        if self.backend == "jscatter":
            if self.gl is None:
                self.gl = GLScatter(on_select=self._on_gl_selection, height=520)
            self.plot_box.children = [self.gl.box]
        else:
            self.plot_box.children = [self.figure]
        self.max_points_box.disabled = self.backend == "jscatter"  # it draws every cell
        self.hover_select.disabled = self.backend == "jscatter"  # hover details: the plotly view only

    def _meta(self) -> dict[str, Any]:
        """What is drawn (``viz.embedding``'s ``layout.meta``, or the jupyter-scatter view's)."""
        if self.backend == "jscatter" and self.gl is not None:
            return self.gl.meta
        return self.figure.layout.meta or {}

    def _view(self) -> dict[str, Any]:
        return {
            "basis": self.basis,
            "color": self.color_key,
            "hover": self._hover,
            "layer": self._layer,
            "gene_symbols": self._gene_symbols,
        }

    def _after_draw(self) -> None:
        """Hook the selection callbacks to the (maybe new) traces; show the notes and hover columns."""
        if self.backend == "plotly":
            for trace in self.figure.data:
                trace.on_selection(self._on_selection)
                trace.on_deselect(self._on_deselect)
        self._trace_sel = {}
        meta = self._meta()
        notes = list(meta.get("notes", []))
        if self._subsampled():
            notes[0] += (
                "; lasso and box selections still pick every cell inside the shape"
                if self.backend == "plotly"
                else "; the lasso picks drawn cells only"
            )
            if (
                self.backend == "plotly"
                and self._backend_choice == "auto"
                and int(meta.get("n_cells", 0)) >= self._jscatter_min_cells
                and not jscatter_available()
            ):
                notes.append("pip install 'cellkit[scatter]' (jupyter-scatter) to draw every cell")
        if self.backend == "jscatter":
            notes.append(
                "drawn with jupyter-scatter (every cell): drag to lasso, the toolbar switches to pan/zoom; "
                f"hover details and legend clicks are the plotly view's (below {self._jscatter_min_cells:,} cells)"
            )
        self.note.value = (
            f"<span style='color:#777;font-size:12px'>{html.escape('; '.join(notes))}</span>" if notes else ""
        )
        self._syncing = True
        try:
            if self.basis not in [v for _, v in self.basis_dropdown.options]:
                self._refresh_options()
            bases = [v for _, v in self.basis_dropdown.options]
            self.basis_dropdown.value = self.basis if self.basis in bases else None
            self.hover_select.value = tuple(
                c for c in meta.get("hover", []) if c in self.hover_select.options
            )
        finally:
            self._syncing = False

    def _subsampled(self) -> bool:
        meta = self._meta()
        return int(meta.get("n_shown", 0)) < int(meta.get("n_valid", 0))

    def _describe_shown(self) -> str:
        meta = self._meta()
        n_valid, n_shown = int(meta.get("n_valid", 0)), int(meta.get("n_shown", 0))
        if n_shown < n_valid:
            return f"{n_shown:,} of {n_valid:,} cells drawn"
        return f"{n_valid:,} cells"

    # ------------------------------------------------------------------ internals: selection

    def _on_selection(self, trace: Any, points: Any, selector: Any) -> None:
        """Per-trace lasso/box callback (plotly calls it once per trace for each selection)."""
        try:
            if self._subsampled() and selector is not None:
                if selector is not self._last_selector:
                    self._last_selector = selector
                    self._set_pending(self._geometric_selection(selector), highlight=False)
                return
            inds = np.asarray(points.point_inds, dtype=np.int64)
            custom = np.asarray(trace.customdata) if trace.customdata is not None else np.zeros((0, 1))
            inds = inds[(inds >= 0) & (inds < len(custom))]
            self._trace_sel[int(points.trace_index)] = custom[inds, 0].astype(np.int64)  # obs positions
            parts = [v for v in self._trace_sel.values() if len(v)]
            union = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            self._set_pending(union, highlight=False)
        except Exception as exc:  # pragma: no cover - a callback must never raise into plotly
            self.show_error(exc)

    def _on_gl_selection(self, positions: np.ndarray) -> None:
        """A lasso in the jupyter-scatter view (obs positions; empty: the browser cleared it)."""
        try:
            self._set_pending(positions, highlight=False)
        except Exception as exc:  # pragma: no cover - a callback must never raise into traitlets
            self.show_error(exc)

    def _on_deselect(self, _trace: Any, _points: Any) -> None:
        self._trace_sel = {}
        self._set_pending(np.zeros(0, dtype=np.int64), highlight=False)

    def _geometric_selection(self, selector: Any) -> np.ndarray:
        """Every cell (drawn or not) inside a box/lasso shape, except in categories hidden in the legend."""
        view = self._view()
        return cellkit.viz.embedding_selection(
            self.state.adata,
            selector,
            basis=self.basis,
            color=self.color_key or None,
            layer=view["layer"],
            gene_symbols=view["gene_symbols"],
            hidden=[str(t.name) for t in self.figure.data if t.visible in (False, "legendonly")],
        )

    def _set_pending(self, positions: np.ndarray, *, highlight: bool) -> None:
        self.pending = np.asarray(positions, dtype=np.int64)
        if highlight and self.backend == "jscatter":
            if self.gl is not None:
                self.gl.highlight(self.pending)
        elif highlight:
            self._trace_sel = {}
            self._draw()  # viz.embedding(selected=...) marks them; only selectedpoints change
            if not len(self.pending):
                self._drop_outline()
        self._update_selection_label()

    def _drop_outline(self) -> None:
        """Remove the lasso / box outline the browser drew.

        The outline lives in the browser's copy of the layout only (the kernel's ``selections``
        is already empty), so clearing it there is no change and never sent: send a placeholder
        shape far outside the data (it selects nothing), then the empty list.
        """
        far = 1e30
        self.figure.layout.selections = ({"type": "rect", "x0": far, "x1": far, "y0": far, "y1": far},)
        self.figure.layout.selections = ()

    def _update_selection_label(self) -> None:
        n = len(self.pending)
        if n == 0:
            text = "No cells selected — draw a lasso (or a box, from the toolbar) on the plot."
        else:
            text = f"<b>{n:,} cells selected</b>"
        self.selection_label.value = f"<span class='cellkit-selection-text'>{text}</span>"


# ---------------------------------------------------------------------- helpers


def _basis_options(adata: Any) -> list[tuple[str, str]]:
    """``(label, key)`` of every numeric obsm entry with >= 2 columns, 2-D ones first."""
    two, more = [], []
    for key in list(adata.obsm):
        arr = adata.obsm[key]
        shape = getattr(arr, "shape", ())
        dtype = getattr(arr, "dtype", None)
        if isinstance(arr, pd.DataFrame):
            if not all(pd.api.types.is_numeric_dtype(t) for t in arr.dtypes):
                continue
        elif dtype is None or np.dtype(dtype).kind not in "fiu":
            continue
        if len(shape) != 2 or shape[1] < 2:
            continue
        if shape[1] == 2:
            two.append((f"{key} (2-D)", str(key)))
        else:
            more.append((f"{key} ({shape[1]} dims: 1 and 2)", str(key)))
    return sorted(two, key=lambda t: t[1]) + sorted(more, key=lambda t: t[1])


def _name_columns(var: pd.DataFrame) -> list[str]:
    """var columns that can hold gene names (strings or categories), for ``gene_symbols``."""
    return [
        str(c)
        for c in var.columns
        if isinstance(var[c].dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(var[c].dtype)
    ]


def _gene_names(adata: Any, gene_symbols: str | None) -> list[str]:
    """The names a gene may be typed as: ``var_names`` (or ``var[gene_symbols]``), also of ``adata.raw``."""
    tables = [adata] + ([adata.raw] if getattr(adata, "raw", None) is not None else [])
    names: list[str] = []
    for t in tables:
        if gene_symbols is None:
            names += [str(g) for g in t.var_names]
        elif gene_symbols in t.var.columns:
            names += [str(g) for g in t.var[gene_symbols]]
    return list(dict.fromkeys(names))


def _prediction_columns(adata: Any) -> list[str]:
    """obs columns that hold predicted labels (``cellkit.predict`` writes ``uns[key]["classes"]``)."""
    out = []
    for c in adata.obs.columns:
        c = str(c)
        info = adata.uns.get(c) if hasattr(adata, "uns") else None
        is_pred = isinstance(info, dict) and "classes" in info
        named = "pred" in c.lower() and isinstance(adata.obs[c].dtype, pd.CategoricalDtype)
        if is_pred or named:
            out.append(c)
    return out


def _default_color(obs: pd.DataFrame) -> str:
    """The first categorical obs column with 2..50 categories (e.g. cell types), else none."""
    for c in obs.columns:
        if isinstance(obs[c].dtype, pd.CategoricalDtype) and 2 <= len(obs[c].cat.categories) <= 50:
            return str(c)
    return ""


def _next_name(name: str, taken: Any) -> str:
    """``lasso_1`` → ``lasso_2``, ``box1`` → ``box2`` (first free name), for the next selection."""
    import re

    match = re.fullmatch(r"(.*?)(\d+)", name)
    stem, k = (match.group(1), int(match.group(2)) + 1) if match else (f"{name}_", 2)
    while f"{stem}{k}" in taken:
        k += 1
    return f"{stem}{k}"
