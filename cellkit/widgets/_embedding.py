"""Embedding explorer: compute cell embeddings, show them as a WebGL scatter, colour, lasso-select.

The scatter is one ``plotly`` ``FigureWidget`` that lives as long as the panel: a new basis or
colour updates it in place (``batch_update``); a colour change between two continuous keys (gene
→ gene, numeric → gene) sends only the new colour array. Categorical colours are one trace per
category (legend entries can hide a category); continuous colours are one trace with a colour bar.

Hover shows the cell name and a few obs columns through ``customdata`` + ``hovertemplate``
(no per-point text strings). A lasso/box selection in the browser reaches Python through the
traces' ``on_selection`` callbacks; :meth:`EmbeddingPanel.save_selection` stores it in the shared
state, where the tokenize, fine-tune and attention panels pick it up.
"""

from __future__ import annotations

import difflib
import html
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

import cellkit
from cellkit import ConfigError, DataError

from ._base import Panel, guarded, labelled
from ._state import StudioState

__all__ = ["EmbeddingPanel"]

#: a categorical colour with more categories than this is refused (one trace per category)
MAX_CATEGORIES = 200
#: default number of points drawn (a random subsample above it)
DEFAULT_MAX_POINTS = 200_000
#: obs columns shown on hover by default (categorical ones, besides the colour key)
DEFAULT_HOVER = 2
#: bases tried first when data arrives
_PREFERRED_BASES = ("X_cellkit_umap", "X_umap", "X_tsne", "X_pca")
_NA_COLOR = "#d3d3d3"
_UNIFORM_COLOR = "#1f77b4"


class EmbeddingPanel(Panel):
    """Cell embeddings: compute (``embed_cells`` + UMAP), scatter, colour, lasso-select cells.

    Parameters
    ----------
    state
        The shared :class:`~cellkit.widgets.StudioState` (a fresh one when used alone).
    max_points
        Draw at most this many cells (a random subsample, seed 0, above it). Lasso and box
        selections still pick every cell inside the drawn shape, shown or not.

    Attributes
    ----------
    figure
        The ``plotly.graph_objects.FigureWidget`` (CSS class ``cellkit-embedding-plot``).
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
        self, state: StudioState | None = None, *, max_points: int = DEFAULT_MAX_POINTS, **kwargs: Any
    ) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-embedding-panel")
        self.pending = np.zeros(0, dtype=np.int64)
        self.basis: str = ""
        self.color_key: str = ""
        self._syncing = False
        self._coords: np.ndarray | None = None  # (n_obs, 2) float32 of the basis, NaN where missing
        self._valid = np.zeros(0, dtype=bool)  # cells with coordinates
        self._shown = np.zeros(0, dtype=np.int64)  # obs positions drawn (sorted)
        self._mode = "none"  # "none" | "categorical" | "continuous"
        self._trace_pos: list[np.ndarray] = []  # obs positions of each trace's points
        self._cell_trace = np.zeros(0, dtype=np.int64)  # per cell: its trace (-1: not drawn/valid)
        self._trace_sel: dict[int, np.ndarray] = {}
        self._last_selector: Any = None
        self._hover_cols: list[str] = []

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
            description="Compute embeddings",
            button_style="primary",
            icon="play",
            tooltip="cellkit.embed_cells(adata, model, key_added=<key>) then UMAP into obsm[<key>_umap]",
            layout=widgets.Layout(width="180px"),
        )
        self.compute_button.on_click(lambda _b: self.compute(self.key_box.value, background=True))

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
        self.hover_select = widgets.SelectMultiple(options=[], rows=3, layout=widgets.Layout(width="260px"))
        self.hover_select.observe(self._on_hover_widget, names="value")
        self.max_points_box = widgets.BoundedIntText(
            value=int(max_points), min=1, max=10**9, step=10_000, layout=widgets.Layout(width="120px")
        )
        self.max_points_box.observe(self._on_max_points, names="value")
        self.refresh_button = widgets.Button(
            description="Refresh", icon="refresh", tooltip="re-read obsm / obs keys of the data"
        )
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.note = widgets.HTML(value="")
        self.note.add_class("cellkit-embedding-note")

        self.figure = go.FigureWidget(
            layout={
                "template": "plotly_white",
                "dragmode": "lasso",
                "height": 520,
                "margin": {"l": 40, "r": 20, "t": 40, "b": 40},
                "legend": {"itemsizing": "constant"},
                "xaxis": {"showticklabels": False, "ticks": "", "zeroline": False},
                "yaxis": {"showticklabels": False, "ticks": "", "zeroline": False},
                "hovermode": "closest",
                "title": {"text": "no embedding shown"},
            }
        )
        self.figure.add_class("cellkit-embedding-plot")

        # -- selection
        self.selection_label = widgets.HTML(value="")
        self.selection_label.add_class("cellkit-selection-count")
        self.selection_name = widgets.Text(value="lasso_1", layout=widgets.Layout(width="160px"))
        self.selection_name.add_class("cellkit-selection-name")
        self.save_button = widgets.Button(
            description="Save selection", icon="save", tooltip="store the selected cells in the studio"
        )
        self.save_button.on_click(lambda _b: self.save_selection(self.selection_name.value))
        self.clear_button = widgets.Button(description="Clear selection", icon="times")
        self.clear_button.on_click(lambda _b: self.clear_selection())
        self.write_obs = widgets.Checkbox(
            value=False,
            description="also write obs column",
            indent=False,
            layout=widgets.Layout(width="170px"),
        )
        self.obs_key_box = widgets.Text(
            value="", placeholder="obs key (default: the name)", layout=widgets.Layout(width="200px")
        )

        self.children = [
            self.message,
            widgets.HBox(
                [labelled("Embedding key", self.key_box, "110px"), self.only_selection, self.compute_button]
            ),
            widgets.HBox(
                [
                    labelled("Basis", self.basis_dropdown, "60px"),
                    labelled("Colour by", self.color_dropdown, "70px"),
                    labelled("or gene", self.gene_box, "60px"),
                ]
            ),
            widgets.HBox(
                [
                    labelled("Hover", self.hover_select, "60px"),
                    labelled("Max points", self.max_points_box, "80px"),
                    self.refresh_button,
                ]
            ),
            self.figure,
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
        """Re-read the data's ``obsm`` and ``obs`` keys (e.g. after another tool wrote new ones)."""
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
            Run in a background thread (the button does; :meth:`wait` joins it).

        Returns
        -------
        The UMAP key (``None`` on error or when running in the background).
        """
        model, adata = self._need_model(), self._need_data()
        key = self._check_key(key_added)
        if isinstance(cells, str) and cells == "selection":
            cells = self.state.selected_cells() if self.only_selection.value else None
            where = f"selection “{self.state.active_selection}”" if cells is not None else "all cells"
        else:
            where = "all cells" if cells is None else "the given cells"
        umap_key = f"{key}_umap"
        existed = [k for k in (key, umap_key) if k in adata.obsm]

        def work() -> str:
            self.show_message(f"Embedding {where} with the model, then UMAP …", "info")
            cellkit.embed_cells(adata, model, key_added=key, cells=cells, progress=False)
            cellkit.analysis.umap(adata, use_rep=key, key_added=umap_key)
            return umap_key

        def done(result: str) -> None:
            emb = adata.obsm[key]
            n_ok = int(np.isfinite(np.asarray(emb)).all(axis=1).sum())
            self._refresh_options()
            self._set_basis(result)
            self.state.embedding_key = result
            over = f" (overwrote {', '.join(existed)})" if existed else ""
            self.show_message(
                f"Embedded {n_ok:,} cells ({where}). Wrote adata.obsm[{key!r}] "
                f"({emb.shape[0]:,} × {emb.shape[1]}) and adata.obsm[{umap_key!r}] "
                f"({emb.shape[0]:,} × 2){over}; showing {umap_key!r}.",
                "ok",
            )

        if background:
            self.run_in_background(work, name="embed cells", on_done=done)
            return None
        result = work()
        done(result)
        return result

    @guarded
    def set_basis(self, key: str) -> None:
        """Show ``adata.obsm[key]`` (its first two columns) without recomputing anything."""
        self._need_data()
        self._set_basis(key)
        self.state.embedding_key = key
        self.show_message(f"Showing {key!r} ({self._describe_shown()}).", "info")

    @guarded
    def color_by(self, name: str | None) -> None:
        """Colour the cells by an obs column (categorical or numeric, e.g. predicted labels) or a gene.

        ``None`` or ``""``: one colour. obs columns win over genes of the same name; gene values are
        read from ``adata.raw`` when it has the gene, else from ``adata.X``.
        """
        self._need_data()
        name = "" if name is None else str(name).strip()
        values, kind = self._color_values(name)
        self._recolor(name, values, kind)
        self._sync_color_widgets(name)
        if self.basis:
            what = {"none": "one colour", "categorical": "categories", "continuous": "a colour scale"}[kind]
            self.show_message(f"Coloured by {name or 'nothing'} ({what}).", "info")

    @guarded
    def set_hover(self, columns: Sequence[str]) -> None:
        """obs columns shown on hover (after the cell name and the colour value)."""
        adata = self._need_data()
        cols = [str(c) for c in columns]
        missing = [c for c in cols if c not in adata.obs.columns]
        if missing:
            raise DataError(
                f"hover columns {missing} are not obs columns; available: {self._obs_columns()[:30]}."
            )
        self._hover_cols = cols
        self._syncing = True
        try:
            self.hover_select.value = tuple(c for c in cols if c in self.hover_select.options)
        finally:
            self._syncing = False
        if self._trace_pos:
            with self.figure.batch_update():
                cont = self._mode == "continuous"
                for i, trace in enumerate(self.figure.data):
                    trace.customdata = self._customdata(self._trace_pos[i])
                    label = trace.name if self._mode == "categorical" else None
                    trace.hovertemplate = self._hovertemplate(label, continuous=cont)

    @guarded
    def select_points(self, positions: Any) -> np.ndarray:
        """Make ``positions`` (obs positions, a boolean mask or obs names) the pending selection.

        The programmatic equivalent of a lasso: the figure highlights those cells and
        :meth:`save_selection` stores them. Returns the sorted obs positions.
        """
        adata = self._need_data()
        arr = np.asarray(positions)
        if arr.dtype.kind in "iub" or arr.size == 0:
            if arr.size == 0:
                pos = np.zeros(0, dtype=np.int64)
            elif arr.dtype == bool:
                if arr.shape != (adata.n_obs,):
                    raise DataError(f"A boolean mask needs {adata.n_obs} entries, got {arr.shape}.")
                pos = np.flatnonzero(arr)
            else:
                pos = np.unique(arr.astype(np.int64))
                if len(pos) and (pos[0] < 0 or pos[-1] >= adata.n_obs):
                    raise DataError(f"Cell positions must be in [0, {adata.n_obs}).")
        else:
            names = self.state.resolve_cells(arr)
            pos = np.sort(adata.obs_names.get_indexer(names))
        self._set_pending(pos, highlight=True)
        return self.pending

    @guarded
    def clear_selection(self) -> None:
        """Forget the pending selection (saved selections stay)."""
        self._set_pending(np.zeros(0, dtype=np.int64), highlight=True)

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
                self._set_basis(key)
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

    # ------------------------------------------------------------------ internals: data

    def _need_data(self) -> Any:
        if self.state.adata is None:
            raise DataError("No data loaded: pick an AnnData in the Data panel first.")
        return self.state.adata

    def _need_model(self) -> Any:
        if self.state.model is None:
            raise DataError("No model loaded: load one in the Model panel first.")
        return self.state.model

    @staticmethod
    def _check_key(key: Any) -> str:
        key = str(key if key is not None else "").strip()
        if not key:
            raise ConfigError("The embedding key is empty; type an obsm key such as 'X_cellkit'.")
        if "/" in key:
            raise ConfigError(f"obsm keys cannot contain '/': {key!r}.")
        return key

    def _obs_columns(self) -> list[str]:
        adata = self.state.adata
        return [] if adata is None else [str(c) for c in adata.obs.columns]

    def _reset_for_data(self) -> None:
        """New (or no) data: refresh options, drop the figure and the pending selection, show a default view."""
        self.basis, self.color_key = "", ""
        self._coords = None
        self._trace_pos, self._trace_sel = [], {}
        self.pending = np.zeros(0, dtype=np.int64)
        self._hover_cols = []
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.layout.annotations = ()
            self.figure.layout.title.text = "no embedding shown"
        self.note.value = ""
        self._update_selection_label()
        self._refresh_options()
        adata = self.state.adata
        if adata is None:
            return
        color = _default_color(adata.obs)
        self._hover_cols = _default_hover(adata.obs, color)
        bases = [v for _, v in self.basis_dropdown.options]
        first = next((b for b in (self.state.embedding_key, *_PREFERRED_BASES) if b in bases), None)
        first = first or (bases[0] if bases else None)
        self._syncing = True
        try:
            self.hover_select.value = tuple(self._hover_cols)
        finally:
            self._syncing = False
        if first is None:
            self.show_message(
                "No 2-D embedding in adata.obsm yet: press “Compute embeddings” to embed the cells "
                "and lay them out with UMAP.",
                "info",
            )
            return
        self._set_basis(first, color=color)
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
            genes = _gene_names(adata)
            if tuple(genes) != tuple(self.gene_box.options):  # can be tens of thousands: send once
                self.gene_box.options = genes
            if tuple(cols) != tuple(self.hover_select.options):
                self.hover_select.options = cols
            self.hover_select.value = tuple(c for c in self._hover_cols if c in cols)
        finally:
            self._syncing = False

    def _sync_color_widgets(self, name: str) -> None:
        self._syncing = True
        try:
            in_obs = name in [v for _, v in self.color_dropdown.options]
            self.color_dropdown.value = name if in_obs else ""
            self.gene_box.value = "" if in_obs else name
        finally:
            self._syncing = False

    def _color_values(self, name: str) -> tuple[np.ndarray | pd.Series | None, str]:
        """``(values over all cells, kind)`` for a colour key; kind is none/categorical/continuous."""
        adata = self.state.adata
        if not name:
            return None, "none"
        if name in adata.obs.columns:
            values = adata.obs[name]
            if _is_categorical(values):
                n_cat = (
                    len(values.cat.categories)
                    if isinstance(values.dtype, pd.CategoricalDtype)
                    else values.nunique(dropna=True)
                )
                if n_cat > MAX_CATEGORIES:
                    raise DataError(
                        f"obs[{name!r}] has {n_cat:,} categories; colour by a column with at most "
                        f"{MAX_CATEGORIES} (one legend entry each)."
                    )
                return values, "categorical"
            return values.to_numpy(dtype=np.float32, na_value=np.nan), "continuous"
        gene = _gene_values(adata, name)
        if gene is not None:
            return gene.astype(np.float32), "continuous"
        cols = self._obs_columns()
        close = _suggest(name, cols, n=2) + _suggest(name, _gene_names(adata), n=8)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DataError(
            f"Cannot colour by {name!r}: it is neither an obs column nor a gene of the data.{hint} "
            f"obs columns: {cols[:20]}."
        )

    # ------------------------------------------------------------------ internals: figure

    def _set_basis(self, key: str, *, color: str | None = None) -> None:
        adata = self.state.adata
        if key not in adata.obsm:
            bases = [v for _, v in _basis_options(adata)]
            close = difflib.get_close_matches(str(key), list(map(str, adata.obsm.keys())), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise DataError(
                f"adata.obsm has no {key!r}.{hint} Bases that can be shown: {bases or 'none'} "
                "(or press “Compute embeddings”)."
            )
        arr = np.asarray(adata.obsm[key])
        if arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "fiu":
            raise DataError(
                f"adata.obsm[{key!r}] has shape {arr.shape} and dtype {arr.dtype}; a basis needs numbers "
                "with at least 2 columns."
            )
        if color is None:  # keep the current colour if the new data still has it
            color = self.color_key
            try:
                values, kind = self._color_values(color)
            except DataError:
                color = ""
                values, kind = None, "none"
        else:
            values, kind = self._color_values(color)  # fail before touching the figure
        coords = arr[:, :2].astype(np.float32)
        valid = np.isfinite(coords).all(axis=1)
        positions = np.flatnonzero(valid)
        notes = []
        if len(positions) < len(coords):
            notes.append(f"{len(coords) - len(positions):,} cells without coordinates are not shown")
        limit = int(self.max_points_box.value)
        if len(positions) > limit:
            rng = np.random.default_rng(0)
            positions = np.sort(rng.choice(positions, size=limit, replace=False))
            notes.insert(
                0,
                f"showing a random {limit:,} of {int(valid.sum()):,} cells (seed 0); lasso and box "
                "selections still pick every cell inside the shape",
            )
        self.basis, self._coords, self._valid, self._shown = key, coords, valid, positions
        if key not in [v for _, v in self.basis_dropdown.options]:
            self._refresh_options()
        self._syncing = True
        try:
            self.basis_dropdown.value = key if key in [v for _, v in self.basis_dropdown.options] else None
        finally:
            self._syncing = False
        self.note.value = (
            f"<span style='color:#777;font-size:12px'>{html.escape('; '.join(notes))}</span>" if notes else ""
        )
        self._recolor(color, values, kind, rebuild=True, notes=notes)

    def _recolor(
        self,
        name: str,
        values: Any,
        kind: str,
        *,
        rebuild: bool = False,
        notes: list[str] | None = None,
    ) -> None:
        """Colour the shown cells; only colours are sent when continuous stays continuous."""
        self.color_key = name
        if self._coords is None:
            return
        fig = self.figure
        if not rebuild and kind == "continuous" and self._mode == "continuous" and len(fig.data) == 1:
            trace = fig.data[0]
            with fig.batch_update():
                trace.marker.color = values[self._trace_pos[0]]
                trace.marker.cmin, trace.marker.cmax = _color_range(values[self._trace_pos[0]])
                trace.marker.colorbar.title.text = name
                trace.name = name
                trace.hovertemplate = self._hovertemplate(name, continuous=True)
                fig.layout.title.text = f"{self.basis} — {name}"
            return
        traces, groups = self._build_traces(name, values, kind)
        ax = _axis_name(self.basis)
        with fig.batch_update():
            fig.data = ()
            fig.add_traces(traces)
            fig.layout.showlegend = kind == "categorical"
            fig.layout.legend.title.text = name if kind == "categorical" else ""
            fig.layout.title.text = f"{self.basis} — {name}" if name else self.basis
            fig.layout.xaxis.title.text = f"{ax}1"
            fig.layout.yaxis.title.text = f"{ax}2"
            fig.layout.uirevision = self.basis
            if notes is not None:
                fig.layout.annotations = (
                    [
                        {
                            "text": "; ".join(notes),
                            "xref": "paper",
                            "yref": "paper",
                            "x": 0,
                            "y": -0.02,
                            "xanchor": "left",
                            "yanchor": "top",
                            "showarrow": False,
                            "font": {"size": 11, "color": "#777777"},
                            "name": "cellkit-note",
                        }
                    ]
                    if notes
                    else []
                )
        self._mode = kind
        self._trace_pos = groups
        cell_trace = np.full(len(self._coords), -1, dtype=np.int64)
        for i, pos in enumerate(groups):
            cell_trace[pos] = i
        self._cell_trace = self._all_cell_traces(values, kind, cell_trace)
        self._trace_sel = {}
        for trace in fig.data:
            trace.on_selection(self._on_selection)
            trace.on_deselect(self._on_deselect)
        self._highlight()

    def _all_cell_traces(self, values: Any, kind: str, shown_trace: np.ndarray) -> np.ndarray:
        """Trace of every valid cell, also those left out of the drawing (for geometric selection)."""
        if len(self._shown) == int(self._valid.sum()):
            return shown_trace
        out = np.full(len(self._valid), -1, dtype=np.int64)
        if kind != "categorical":
            out[self._valid] = 0
            return out
        trace_of = {str(t.name): i for i, t in enumerate(self.figure.data)}
        cat = _as_categorical(values)
        # code k -> trace of category k; the last entry (code -1, missing) -> the "NaN" trace
        lookup = np.array(
            [trace_of.get(str(c), -1) for c in cat.categories] + [trace_of.get("NaN", -1)], dtype=np.int64
        )
        idx = lookup[np.asarray(cat.codes)]
        out[self._valid] = idx[self._valid]
        return out

    def _build_traces(self, name: str, values: Any, kind: str) -> tuple[list[go.Scattergl], list[np.ndarray]]:
        shown = self._shown
        size = _auto_size(len(shown))
        if kind == "none":
            groups, labels, colors = [shown], ["cells"], [_UNIFORM_COLOR]
        elif kind == "continuous":
            groups = [shown]
        else:
            cat = _as_categorical(values)
            codes = np.asarray(cat.codes)[shown]
            categories = [str(c) for c in cat.categories]
            palette = _category_colors(self.state.adata, name, categories)
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(-1, len(categories) + 1))
            groups, labels, colors = [], [], []
            for k in range(len(categories)):
                rows = order[bounds[k + 1] : bounds[k + 2]]
                if len(rows):
                    groups.append(shown[np.sort(rows)])
                    labels.append(categories[k])
                    colors.append(palette[k])
            na = order[bounds[0] : bounds[1]]
            if len(na):
                groups.insert(0, shown[np.sort(na)])
                labels.insert(0, "NaN")
                colors.insert(0, _NA_COLOR)
        traces = []
        coords = self._coords
        if kind == "continuous":
            pos = groups[0]
            col = values[pos]
            cmin, cmax = _color_range(col)
            traces.append(
                go.Scattergl(
                    x=coords[pos, 0],
                    y=coords[pos, 1],
                    mode="markers",
                    name=name,
                    customdata=self._customdata(pos),
                    hovertemplate=self._hovertemplate(name, continuous=True),
                    marker={
                        "size": size,
                        "color": col,
                        "colorscale": "Viridis",
                        "cmin": cmin,
                        "cmax": cmax,
                        "showscale": True,
                        "colorbar": {"title": {"text": name}, "thickness": 14},
                        "line": {"width": 0},
                    },
                    showlegend=False,
                )
            )
        else:
            for pos, label, color in zip(groups, labels, colors, strict=True):
                traces.append(
                    go.Scattergl(
                        x=coords[pos, 0],
                        y=coords[pos, 1],
                        mode="markers",
                        name=label,
                        customdata=self._customdata(pos),
                        hovertemplate=self._hovertemplate(label if kind == "categorical" else None),
                        marker={"size": size, "color": color, "line": {"width": 0}},
                        showlegend=kind == "categorical",
                    )
                )
        return traces, groups

    def _customdata(self, pos: np.ndarray) -> np.ndarray:
        """``(n, 1 + n_hover)`` object array: cell name, then the hover columns' values."""
        adata = self.state.adata
        cols = [np.asarray(adata.obs_names[pos]).astype(str)]
        for c in self._hover_cols:
            v = adata.obs[c].iloc[pos]
            cols.append((v.round(4) if pd.api.types.is_float_dtype(v.dtype) else v).astype(str).to_numpy())
        return np.stack(cols, axis=1).astype(object)

    def _hovertemplate(self, label: str | None, *, continuous: bool = False) -> str:
        parts = ["<b>%{customdata[0]}</b>"]
        key = _esc(self.color_key)
        if continuous:
            parts.append(f"{key}: %{{marker.color:.4~g}}")
        elif label is not None and key:
            parts.append(f"{key}: {_esc(label)}")
        for i, c in enumerate(self._hover_cols, start=1):
            if c == self.color_key:
                continue
            parts.append(f"{_esc(c)}: %{{customdata[{i}]}}")
        return "<br>".join(parts) + "<extra></extra>"

    def _describe_shown(self) -> str:
        n_valid = int(self._valid.sum())
        if len(self._shown) < n_valid:
            return f"{len(self._shown):,} of {n_valid:,} cells drawn"
        return f"{n_valid:,} cells"

    # ------------------------------------------------------------------ internals: selection

    def _on_selection(self, trace: Any, points: Any, selector: Any) -> None:
        """Per-trace lasso/box callback (plotly calls it once per trace for each selection)."""
        try:
            i = int(points.trace_index)
            if i >= len(self._trace_pos):
                return
            subsampled = len(self._shown) < int(self._valid.sum())
            if subsampled and selector is not None:
                if selector is not self._last_selector:
                    self._last_selector = selector
                    self._set_pending(self._geometric_selection(selector), highlight=False)
                return
            inds = np.asarray(points.point_inds, dtype=np.int64)
            pos = self._trace_pos[i]
            inds = inds[(inds >= 0) & (inds < len(pos))]
            self._trace_sel[i] = pos[inds]
            parts = [v for v in self._trace_sel.values() if len(v)]
            union = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            self._set_pending(union, highlight=False)
        except Exception as exc:  # pragma: no cover - a callback must never raise into plotly
            self.show_error(exc)

    def _on_deselect(self, _trace: Any, _points: Any) -> None:
        self._trace_sel = {}
        self._set_pending(np.zeros(0, dtype=np.int64), highlight=False)

    def _geometric_selection(self, selector: Any) -> np.ndarray:
        """Every valid (drawn or not) cell inside a box/lasso shape, in visible traces."""
        x, y = self._coords[:, 0], self._coords[:, 1]
        ok = self._valid.copy()
        if selector.type == "box":
            (x0, x1), (y0, y1) = sorted(selector.xrange), sorted(selector.yrange)
            inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        else:
            inside = _in_polygon(x, y, np.asarray(selector.xs, float), np.asarray(selector.ys, float))
        hidden = [i for i, t in enumerate(self.figure.data) if t.visible in (False, "legendonly")]
        if hidden:  # categories the user hid in the legend are not selected
            ok &= ~np.isin(self._cell_trace, hidden)
        return np.flatnonzero(inside & ok)

    def _set_pending(self, positions: np.ndarray, *, highlight: bool) -> None:
        self.pending = np.asarray(positions, dtype=np.int64)
        if highlight:
            self._trace_sel = {}
            self._highlight()
        self._update_selection_label()

    def _highlight(self) -> None:
        """Mark the pending cells in the figure (plotly ``selectedpoints``)."""
        if not self._trace_pos:
            return
        with self.figure.batch_update():
            for trace, pos in zip(self.figure.data, self._trace_pos, strict=False):
                if len(self.pending):
                    trace.selectedpoints = np.flatnonzero(np.isin(pos, self.pending)).tolist()
                else:
                    trace.selectedpoints = None
            if not len(self.pending):
                self.figure.layout.selections = ()  # also drop the lasso / box outline in the browser

    def _update_selection_label(self) -> None:
        n = len(self.pending)
        if n == 0:
            text = "No cells selected — draw a lasso (or a box, from the toolbar) on the plot."
        else:
            text = f"<b>{n:,} cells selected</b>"
        self.selection_label.value = f"<span class='cellkit-selection-text'>{text}</span>"


# ---------------------------------------------------------------------- helpers


def _esc(text: Any) -> str:
    """Text for a hovertemplate: HTML-escaped, ``%{`` / ``}`` neutralised."""
    return html.escape(str(text)).replace("%{", "%&#123;").replace("}", "&#125;")


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


def _gene_names(adata: Any) -> list[str]:
    names = [str(g) for g in adata.var_names]
    raw = getattr(adata, "raw", None)
    if raw is not None:
        names += [str(g) for g in raw.var_names]
    return list(dict.fromkeys(names))


def _gene_values(adata: Any, gene: str) -> np.ndarray | None:
    """A gene's values: ``adata.raw`` when it has the gene, else ``adata.X`` (scanpy's convention)."""
    raw = getattr(adata, "raw", None)
    sources = ([(raw.X, raw.var_names)] if raw is not None else []) + [(adata.X, adata.var_names)]
    for matrix, var_names in sources:
        hits = np.flatnonzero(np.asarray(var_names) == gene)
        if len(hits) and matrix is not None:
            col = matrix[:, int(hits[0])]
            if hasattr(col, "toarray"):
                col = col.toarray()
            return np.asarray(col, dtype=np.float64).ravel()
    return None


def _prediction_columns(adata: Any) -> list[str]:
    """obs columns that hold predicted labels (``cellkit.predict`` writes ``uns[key]["classes"]``)."""
    out = []
    for c in adata.obs.columns:
        c = str(c)
        info = adata.uns.get(c) if hasattr(adata, "uns") else None
        is_pred = isinstance(info, dict) and "classes" in info
        if (is_pred or "pred" in c.lower()) and _is_categorical(adata.obs[c]):
            out.append(c)
    return out


def _is_categorical(values: pd.Series) -> bool:
    dtype = values.dtype
    return (
        isinstance(dtype, pd.CategoricalDtype)
        or pd.api.types.is_bool_dtype(dtype)
        or not pd.api.types.is_numeric_dtype(dtype)
    )


def _as_categorical(values: pd.Series) -> pd.Categorical:
    if isinstance(values.dtype, pd.CategoricalDtype):
        return values.array
    return pd.Categorical(values.astype(object).where(values.notna(), None))


def _category_colors(adata: Any, key: str, categories: list[str]) -> list[str]:
    """``uns[f"{key}_colors"]`` when it covers every category (scanpy), else cellkit's default palette."""
    uns = adata.uns.get(f"{key}_colors") if hasattr(adata, "uns") else None
    if uns is not None and len(uns) >= len(categories):
        return [str(c) for c in list(uns)[: len(categories)]]
    return list(cellkit.viz.default_palette(len(categories)))


def _default_hover(obs: pd.DataFrame, color: str) -> list[str]:
    cols = [
        str(c)
        for c in obs.columns
        if str(c) != color and (isinstance(obs[c].dtype, pd.CategoricalDtype) or obs[c].dtype == bool)
    ]
    return cols[:DEFAULT_HOVER]


def _default_color(obs: pd.DataFrame) -> str:
    """The first categorical obs column with 2..50 categories (e.g. cell types), else none."""
    for c in obs.columns:
        if isinstance(obs[c].dtype, pd.CategoricalDtype) and 2 <= len(obs[c].cat.categories) <= 50:
            return str(c)
    return ""


def _color_range(values: np.ndarray) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None, None
    return float(finite.min()), float(finite.max())


def _auto_size(n: int) -> float:
    """Marker diameter: 8 px for 100 cells down to 1.5 px for a million (as cellkit.viz.embedding)."""
    return float(np.clip(20.0 / max(n, 1) ** 0.2, 1.5, 8.0))


def _axis_name(basis: str) -> str:
    low = basis.lower()
    for key, label in (("umap", "UMAP"), ("tsne", "tSNE"), ("pca", "PC"), ("phate", "PHATE")):
        if key in low:
            return label
    return basis


def _in_polygon(x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points ``(x, y)`` lie inside the polygon ``(px, py)``."""
    inside = np.zeros(len(x), dtype=bool)
    n = len(px)
    if n < 3:
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


def _next_name(name: str, taken: Any) -> str:
    """``lasso_1`` → ``lasso_2``, ``box1`` → ``box2`` (first free name), for the next selection."""
    import re

    match = re.fullmatch(r"(.*?)(\d+)", name)
    stem, k = (match.group(1), int(match.group(2)) + 1) if match else (f"{name}_", 2)
    while f"{stem}{k}" in taken:
        k += 1
    return f"{stem}{k}"


def _suggest(name: str, options: Sequence[str], n: int = 5) -> list[str]:
    """Close names: a case-insensitive match, names starting with ``name``, then difflib's."""
    low = name.lower()
    exact = [o for o in options if o.lower() == low]
    prefix = [o for o in options if low and o.lower().startswith(low) and o not in exact]
    prefix.sort(key=lambda o: (len(o), o))
    close = difflib.get_close_matches(name, list(options), n=n)
    return list(dict.fromkeys([*exact, *prefix, *close]))[:n]
