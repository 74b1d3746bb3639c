"""The Attention panel: gene × gene attention of one cell or a group of cells, and group differences.

The panel calls :func:`cellkit.analysis.attention_maps` (one cell, softmax probabilities in sequence
order), :func:`cellkit.analysis.gene_attention` (a group of cells, or one cell with the ``"grn"``
statistic; genes aligned by identity), :func:`cellkit.analysis.top_influenced_genes` and
:func:`cellkit.analysis.attention_difference`, and draws the result with
:func:`cellkit.viz.attention_heatmap` in a plotly ``FigureWidget`` that is updated in place.

Rows of every map are *query* genes (the genes that attend), columns are *key* genes (the genes
attended to). Group maps are computed on at most ``max cells`` cells per group: larger groups are
subsampled at random with a fixed seed (the message says so), so a click never runs for ever on CPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cellkit import ConfigError, DataError, Progress

from ._base import Panel, guarded, html_table, labelled
from ._progress import JobProgress
from ._state import StudioState

__all__ = ["AttentionPanel"]

MODES = ("cell", "selection", "obs")
STATISTICS = ("probability", "grn")
DIRECTIONS = ("attending", "attended")
#: seed of the random subsample of large groups
SEED = 0
#: at most this many obs names are offered in the cell box (any name can still be typed)
MAX_CELL_OPTIONS = 5_000
#: obs columns with at most this many distinct values are offered as groupings
MAX_GROUP_VALUES = 200
_ALL = "__all__"


# ------------------------------------------------------------------------------------- helpers
def _subsample(names: np.ndarray, max_cells: int, what: str) -> tuple[np.ndarray, str]:
    """At most ``max_cells`` of ``names`` (seeded random, original order kept) and a note."""
    if int(max_cells) < 1:
        raise ConfigError(f"max cells must be at least 1, got {max_cells}.")
    names = np.asarray(names).astype(str)
    if len(names) <= max_cells:
        return names, f"{len(names)} cells of {what}"
    pick = np.sort(np.random.default_rng(SEED).choice(len(names), size=int(max_cells), replace=False))
    return names[pick], f"a random subsample (seed {SEED}) of {max_cells} of the {len(names)} cells of {what}"


def _special_tokens(model: Any) -> set[str]:
    vocab = model.vocab
    return {str(vocab.tokens[i]) for i in vocab.special_ids}


def _atomic_csv(frame: pd.DataFrame, path: Path, *, index: bool) -> None:
    """Write ``frame`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            frame.to_csv(fh, index=index)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclasses.dataclass
class _Result:
    """What one computation produced (built in a worker, shown by :meth:`AttentionPanel._display`)."""

    kind: str  # "map" or "difference"
    matrix: pd.DataFrame  # query × key
    table: pd.DataFrame  # what "Save table" writes
    title: str
    note: str
    value_name: str = "attention"


# --------------------------------------------------------------------------------------- panel
class AttentionPanel(Panel):
    """Attention maps of a cell or a cell group, the genes a gene influences, and group differences.

    Parameters
    ----------
    state
        The shared :class:`StudioState` (a fresh one when used alone).

    Attributes
    ----------
    matrix
        The map on show (query genes × key genes DataFrame, all genes; the heatmap shows at most
        ``max genes shown`` of them), or ``None``.
    table
        The last computed table (the map, the top-genes table or the tidy difference table): what
        :meth:`export` writes.
    top_table
        The last :meth:`top_genes` table.
    diff_table
        The last :meth:`difference` table (:func:`cellkit.analysis.attention_difference`'s tidy form).
    figure
        The heatmap (``plotly.graph_objects.FigureWidget``, CSS class ``cellkit-attention-heatmap``).
    """

    title = "Attention"

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-attention-panel")
        self.matrix: pd.DataFrame | None = None
        self.table: pd.DataFrame | None = None
        self.top_table: pd.DataFrame | None = None
        self.diff_table: pd.DataFrame | None = None
        self.kind = ""
        w100 = widgets.Layout(width="320px")

        # -- what
        self.mode = widgets.ToggleButtons(
            options=[("Single cell", "cell"), ("Selection", "selection"), ("Obs group", "obs")],
            value="cell",
            tooltips=[
                "one cell's own map",
                "a named selection of cells",
                "cells with one value of an obs column",
            ],
        )
        self.cell = widgets.Combobox(placeholder="obs name of a cell", ensure_option=False, layout=w100)
        self.first_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="First of selection", icon="hand-o-up"
        )
        self.first_button.on_click(lambda _: self.use_first_of_selection())
        self.selection = widgets.Dropdown(options=[("(all cells)", _ALL)], value=_ALL, layout=w100)
        self.groupby = widgets.Dropdown(options=[], layout=widgets.Layout(width="200px"))
        self.group = widgets.Dropdown(options=[], layout=widgets.Layout(width="260px"))
        self._cell_row = labelled("Cell", widgets.HBox([self.cell, self.first_button]))
        self._selection_row = labelled("Selection", self.selection)
        self._obs_row = labelled("Obs column / value", widgets.HBox([self.groupby, self.group]))

        # -- settings
        self.layer = widgets.Dropdown(options=[], layout=widgets.Layout(width="120px"))
        self.head = widgets.Dropdown(options=[("average", "average")], value="average")
        self.head.layout.width = "120px"
        self.statistic = widgets.Dropdown(options=list(STATISTICS), value="probability")
        self.statistic.layout.width = "140px"
        self.expression = widgets.Dropdown(options=[("(model default)", "default")], value="default")
        self.max_genes = widgets.BoundedIntText(
            value=40, min=2, max=2_000, layout=widgets.Layout(width="90px")
        )
        self.max_cells = widgets.BoundedIntText(
            value=200, min=1, max=100_000, layout=widgets.Layout(width="90px")
        )
        self.include_special = widgets.Checkbox(
            value=False,
            description="include special tokens (<cls>)",
            indent=False,
            layout=widgets.Layout(width="max-content"),
        )
        self.genes = widgets.Text(
            placeholder="optional: only these genes, e.g. CD3E, LYZ, MS4A1 (needed for very large gene sets)",
            layout=widgets.Layout(width="520px"),
        )
        self.show_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Show", button_style="primary", icon="eye"
        )
        self.show_button.on_click(lambda _: self.show(background=True))
        self.show_button.add_class("cellkit-attention-show")
        #: progress bar, estimate and Cancel of Show and Compare
        self.jobs = JobProgress(css_prefix="cellkit-attention-job")

        # -- result
        self.result_title = widgets.HTML("")
        self.result_title.add_class("cellkit-attention-title")
        self.figure = go.FigureWidget()
        self.figure.add_class("cellkit-attention-heatmap")
        self.figure.layout.height = 620

        # -- top genes
        self.gene = widgets.Combobox(
            placeholder="gene in the map", ensure_option=False, layout=widgets.Layout(width="200px")
        )
        self.direction = widgets.Dropdown(
            options=[
                ("genes attending to it (its column)", "attending"),
                ("genes it attends to (its row)", "attended"),
            ],
            value="attending",
            layout=widgets.Layout(width="260px"),
        )
        self.k = widgets.BoundedIntText(value=10, min=1, max=1_000, layout=widgets.Layout(width="70px"))
        self.top_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Top genes", icon="list-ol"
        )
        self.top_button.on_click(lambda _: self.top_genes())
        self.top_html = widgets.HTML("")
        self.top_html.add_class("cellkit-attention-top")

        # -- difference
        self.diff_source = widgets.ToggleButtons(
            options=[("Two selections", "selection"), ("Obs column", "obs")], value="selection"
        )
        self.diff_groupby = widgets.Dropdown(options=[], layout=widgets.Layout(width="200px"))
        self.condition = widgets.Dropdown(options=[], layout=widgets.Layout(width="240px"))
        self.control = widgets.Dropdown(options=[], layout=widgets.Layout(width="240px"))
        self.diff_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Compare", icon="exchange"
        )
        self.diff_button.on_click(lambda _: self.difference(background=True))
        self._diff_col_row = labelled("Obs column", self.diff_groupby)

        # -- export
        self.path = widgets.Text(placeholder="attention.csv", layout=w100)
        self.save_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Save table (CSV)", icon="save"
        )
        self.save_button.on_click(lambda _: self.export())

        self.children = [
            self.message,
            widgets.HTML("<b>What</b>"),
            self.mode,
            self._cell_row,
            self._selection_row,
            self._obs_row,
            widgets.HTML("<b>Settings</b>"),
            widgets.HBox(
                [
                    labelled("Layer", self.layer, "50px"),
                    labelled("Head", self.head, "50px"),
                    labelled("Statistic", self.statistic, "70px"),
                ]
            ),
            widgets.HBox(
                [
                    labelled("Expression", self.expression, "80px"),
                    labelled("Max genes shown", self.max_genes, "120px"),
                    labelled("Max cells", self.max_cells, "80px"),
                ]
            ),
            labelled("Genes", self.genes, "80px"),
            self.include_special,
            self.show_button,
            self.jobs,
            self.result_title,
            self.figure,
            widgets.HTML("<b>Top attended genes</b>"),
            widgets.HBox([self.gene, self.direction, labelled("k", self.k, "20px"), self.top_button]),
            self.top_html,
            widgets.HTML("<b>Group vs group difference</b> (condition − control)"),
            self.diff_source,
            self._diff_col_row,
            widgets.HBox(
                [
                    labelled("Condition", self.condition, "80px"),
                    labelled("Control", self.control, "70px"),
                    self.diff_button,
                ]
            ),
            widgets.HTML("<b>Export</b>"),
            widgets.HBox([self.path, self.save_button]),
        ]

        self.mode.observe(lambda _: self._update_mode(), names="value")
        self.groupby.observe(lambda _: self._refresh_group_values(), names="value")
        self.diff_source.observe(lambda _: self._refresh_diff_options(), names="value")
        self.diff_groupby.observe(lambda _: self._refresh_diff_options(), names="value")
        self.state.observe(self._on_model, names="model")
        self.state.observe(self._on_adata, names="adata")
        self.state.observe(self._on_selections, names=["selections", "active_selection"])
        self.state.observe(self._on_obs_changed, names="obs_version")
        self._on_model()
        self._on_adata()
        self._update_mode()

    # ------------------------------------------------------------------------- state → controls
    def _on_model(self, change: Any = None) -> None:
        model = self.state.model
        if model is None:
            self.layer.options, self.head.options = [], [("average", "average")]
            return
        enc = model.config.encoder
        n_layers, n_heads = int(enc.n_layers), int(enc.n_heads)
        self.layer.options = [(str(i), i) for i in range(n_layers)]
        self.layer.value = n_layers - 1
        self.head.options = [("average", "average")] + [(str(h), h) for h in range(n_heads)]
        self.head.value = "average"

    def _on_adata(self, change: Any = None) -> None:
        adata = self.state.adata
        if adata is None:
            self.cell.options, self.groupby.options, self.diff_groupby.options = (), [], []
            self.expression.options = [("(model default)", "default")]
            self._on_selections()
            return
        self.cell.options = tuple(np.asarray(adata.obs_names[:MAX_CELL_OPTIONS]).astype(str))
        cols = self._group_columns()
        for dropdown in (self.groupby, self.diff_groupby):
            dropdown.options = cols
            if dropdown.value is None and cols:  # never a blank dropdown: the first column
                dropdown.value = cols[0]
        expr = [("(model default)", "default"), (".X", "X")]
        if adata.raw is not None:
            expr.append((".raw", "raw"))
        expr += [(f"layers[{k!r}]", f"layer:{k}") for k in adata.layers]
        self.expression.options = expr
        self.expression.value = "default"
        self._refresh_group_values()
        self._on_selections()

    def _on_obs_changed(self, _change: Any = None) -> None:
        """New obs columns: offer them as groups, keep the current choices."""
        if self.state.adata is None:
            return
        cols = self._group_columns()
        for dropdown in (self.groupby, self.diff_groupby):
            if list(dropdown.options) != list(cols):
                current = dropdown.value
                dropdown.options = cols
                if current in cols:
                    dropdown.value = current
                elif dropdown.value is None and cols:
                    dropdown.value = cols[0]

    def _on_selections(self, change: Any = None) -> None:
        names = sorted(self.state.selections)
        self.selection.options = [("(all cells)", _ALL)] + [(n, n) for n in names]
        active = self.state.active_selection
        self.selection.value = active if active in names else _ALL
        self._refresh_diff_options()

    def _group_columns(self) -> list[str]:
        obs = self.state.adata.obs
        out = []
        for col in obs.columns:
            s = obs[col]
            discrete = isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or s.dtype == bool
            if discrete and s.nunique(dropna=True) <= MAX_GROUP_VALUES:
                out.append(str(col))
        return out

    def _values(self, col: str | None) -> list[tuple[str, Any]]:
        adata = self.state.adata
        if adata is None or not col or col not in adata.obs.columns:
            return []
        counts = adata.obs[col].value_counts(sort=False, dropna=True)
        return [(f"{v} ({int(n)})", v) for v, n in counts.items() if n > 0]

    def _refresh_group_values(self) -> None:
        self.group.options = self._values(self.groupby.value)
        if self.group.value is None and self.group.options:  # never a blank dropdown
            self.group.index = 0

    def _refresh_diff_options(self) -> None:
        if self.diff_source.value == "selection":
            opts: list[tuple[str, Any]] = [(n, n) for n in sorted(self.state.selections)]
            self._diff_col_row.layout.display = "none"
        else:
            opts = self._values(self.diff_groupby.value)
            self._diff_col_row.layout.display = None
        self.condition.options = opts
        self.control.options = opts
        if opts and self.condition.value is None:  # never a blank dropdown
            self.condition.index = 0
        if len(opts) > 1:
            self.control.value = opts[1][1]
        elif opts:
            self.control.index = 0

    def _update_mode(self) -> None:
        for mode, row in (
            ("cell", self._cell_row),
            ("selection", self._selection_row),
            ("obs", self._obs_row),
        ):
            row.layout.display = None if self.mode.value == mode else "none"

    # ---------------------------------------------------------------------------- public setters
    @guarded
    def set_cell(self, name: str) -> None:
        """Show one cell's map on the next :meth:`show` (``name``: an obs name)."""
        self._check_cell(str(name))
        self.mode.value = "cell"
        self.cell.value = str(name)

    @guarded
    def use_first_of_selection(self) -> str | None:
        """Put the first cell of the active selection (all cells when none) in the cell box."""
        self._require(model=False)
        cells = self.state.selected_cells()
        if cells is None:
            cells = np.asarray(self.state.adata.obs_names[:1]).astype(str)
        if len(cells) == 0:
            raise DataError(f"Selection {self.state.active_selection!r} is empty.")
        self.mode.value = "cell"
        self.cell.value = str(cells[0])
        self.show_message(f"Cell {cells[0]} (first of {self.state.active_selection or 'all cells'}).")
        return str(cells[0])

    @guarded
    def set_group(
        self, selection: str | None = None, *, groupby: str | None = None, group: Any = None
    ) -> None:
        """Aggregate over a group on the next :meth:`show`.

        Parameters
        ----------
        selection
            A selection name of ``state.selections`` (``None`` with ``groupby=None``: all cells).
        groupby, group
            Or an ``obs`` column and one of its values.
        """
        self._require(model=False)
        if groupby is not None:
            self._check_obs_group(groupby, group)
            self.groupby.value = groupby
            self.group.value = group
            self.mode.value = "obs"
            return
        if selection is not None and selection not in self.state.selections:
            raise DataError(
                f"No selection named {selection!r}; known: {sorted(self.state.selections) or 'none'}."
            )
        self.selection.value = _ALL if selection is None else selection
        self.mode.value = "selection"

    # ------------------------------------------------------------------------------- validation
    def _require(self, *, model: bool = True) -> None:
        if self.state.adata is None:
            raise DataError("No data loaded: pick an AnnData in the Data panel first.")
        if model and self.state.model is None:
            raise DataError("No model loaded: load one in the Model panel first.")

    def _check_cell(self, name: str) -> None:
        self._require(model=False)
        obs_names = self.state.adata.obs_names
        if not name:
            raise DataError("Type or pick a cell (an obs name) first.")
        if name not in obs_names:
            pool = [str(n) for n in obs_names[:20_000]]
            close = difflib.get_close_matches(name, pool, n=3)
            hint = f" Close matches: {close}." if close else f" e.g. {pool[:3]}."
            raise DataError(f"Cell {name!r} is not in the data ({len(obs_names):,} cells).{hint}")

    def _check_obs_group(self, groupby: str, group: Any) -> np.ndarray:
        obs = self.state.adata.obs
        if groupby not in obs.columns:
            raise DataError(f"{groupby!r} is not an obs column; available: {list(map(str, obs.columns))}.")
        mask = (obs[groupby] == group).to_numpy()
        if not mask.any():
            values = [v for _, v in self._values(groupby)][:20]
            raise DataError(f"No cell has obs[{groupby!r}] == {group!r}; values with cells: {values}.")
        return np.asarray(obs.index[mask]).astype(str)

    def _selection_cells(self, name: str) -> np.ndarray:
        if name == _ALL:
            return np.asarray(self.state.adata.obs_names).astype(str)
        cells = self.state.resolve_cells(name)
        if len(cells) == 0:
            raise DataError(f"Selection {name!r} is empty; select at least one cell.")
        return np.asarray(cells).astype(str)

    # ------------------------------------------------------------------------------- parameters
    def _settings(self, layer: Any, head: Any, statistic: str | None) -> dict[str, Any]:
        layer = self.layer.value if layer is None else layer
        if layer is None:
            raise DataError("No layer to choose: load a model first.")
        head = self.head.value if head is None else head
        head = None if head == "average" else head
        statistic = self.statistic.value if statistic is None else statistic
        if statistic not in STATISTICS:
            raise ConfigError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
        expr = self.expression.value
        data_layer, use_raw = None, None
        if expr == "X":
            use_raw = False
        elif expr == "raw":
            use_raw = True
        elif expr.startswith("layer:"):
            data_layer, use_raw = expr[len("layer:") :], False
        return {
            "layer": layer,
            "head": head,
            "statistic": statistic,
            "include_special": bool(self.include_special.value),
            "genes": self._gene_list(),
            "data_layer": data_layer,
            "use_raw": use_raw,
        }

    def _gene_list(self) -> list[str] | None:
        """The genes typed in the genes box (comma / space separated, duplicates dropped), or ``None``."""
        raw = self.genes.value.replace(",", " ").replace(";", " ").split()
        genes = list(dict.fromkeys(g.strip() for g in raw if g.strip()))
        if not genes:
            return None
        vocab = self.state.model.vocab
        unknown = [g for g in genes if g not in vocab]
        if unknown:
            raise vocab.unknown_gene_error(unknown)
        return genes

    @staticmethod
    def _describe(s: dict[str, Any], model: Any) -> str:
        layer = s["layer"] % int(model.config.encoder.n_layers) if isinstance(s["layer"], int) else s["layer"]
        head = "mean over heads" if s["head"] is None else f"head {s['head']}"
        return f"layer {layer}, {head}, {s['statistic']}"

    # ------------------------------------------------------------------------------------ runner
    def _run(self, compute: Callable[[Progress], _Result], background: bool, name: str) -> _Result | None:
        """Run ``compute(progress)`` with :attr:`jobs` following it, Show and Compare disabled."""
        if self.running:
            raise DataError(
                "The attention panel is still computing; wait for it to finish or click “Cancel”."
            )
        if background:
            self.show_message("Computing attention…", "info")
        return self.jobs.run(
            self,
            compute,
            name=name,
            buttons=[self.show_button, self.diff_button],
            on_done=self._display,
            background=background,
        )

    # ---------------------------------------------------------------------------------- actions
    @guarded
    def show(
        self,
        *,
        layer: int | None = None,
        head: int | str | None = None,
        statistic: str | None = None,
        background: bool = False,
    ) -> pd.DataFrame | None:
        """Compute and draw the map for the chosen cell or group with the current controls.

        Parameters
        ----------
        layer, head, statistic
            Override the dropdowns (``head="average"``: mean over heads).
        background
            Run in a background thread (the buttons do; :meth:`wait` joins it). While it runs
            :attr:`jobs` shows the progress, Show and Compare are disabled, and Cancel stops it.

        Returns
        -------
        The query × key map (``None`` in the background or on error).
        """
        import cellkit.analysis as ca

        self._require()
        adata, model = self.state.adata, self.state.model
        s = self._settings(layer, head, statistic)
        mode = self.mode.value
        desc = self._describe(s, model)
        value = "rank statistic" if s["statistic"] == "grn" else "attention"
        data_kw = {"layer": s["data_layer"], "use_raw": s["use_raw"]}

        if mode == "cell":
            name = str(self.cell.value).strip()
            self._check_cell(name)

            def compute(progress: Progress) -> _Result:
                if s["statistic"] == "grn":
                    m = ca.gene_attention(
                        adata,
                        model,
                        cells=[name],
                        hidden_layer=s["layer"],
                        head=s["head"],
                        statistic="grn",
                        include_special=s["include_special"],
                        genes=s["genes"],
                        progress=progress,
                        **data_kw,
                    )
                else:
                    heads = None if s["head"] is None else [s["head"]]
                    (cell,) = ca.attention_maps(
                        adata,
                        model,
                        cells=[name],
                        hidden_layer=s["layer"],
                        heads=heads,
                        progress=progress,
                        **data_kw,
                    )
                    m = cell.frame(None if s["head"] is None else cell.heads[0])
                    if not s["include_special"]:
                        special = _special_tokens(model)
                        keep = [t not in special for t in m.index]
                        m = m.loc[keep, keep]
                    if s["genes"] is not None:
                        present = [g for g in s["genes"] if g in set(m.index)]
                        if not present:
                            raise DataError(f"None of the genes {s['genes'][:5]} occur in cell {name}.")
                        m = m.loc[present, present]
                return _Result("map", m, m, f"Cell {name} — {desc}", f"{m.shape[0]} tokens", value)

        else:
            if mode == "selection":
                sel = self.selection.value
                cells = self._selection_cells(sel)
                what = "all cells" if sel == _ALL else f"selection {sel!r}"
            else:
                col, val = self.groupby.value, self.group.value
                if not col:
                    raise DataError("Pick an obs column (and a value) first.")
                cells = self._check_obs_group(col, val)
                what = f"obs[{col!r}] == {val!r}"
            cells, note = _subsample(cells, self.max_cells.value, what)

            def compute(progress: Progress) -> _Result:
                m = ca.gene_attention(
                    adata,
                    model,
                    cells=cells,
                    hidden_layer=s["layer"],
                    head=s["head"],
                    statistic=s["statistic"],
                    include_special=s["include_special"],
                    genes=s["genes"],
                    progress=progress,
                    **data_kw,
                )
                return _Result("map", m, m, f"{what} ({len(cells)} cells) — {desc}", note, value)

        res = self._run(compute, background, "attention")
        return None if res is None else res.matrix

    @guarded
    def difference(
        self,
        condition: Any = None,
        control: Any = None,
        *,
        groupby: str | None = None,
        layer: int | None = None,
        head: int | str | None = None,
        statistic: str | None = None,
        background: bool = False,
    ) -> pd.DataFrame | None:
        """Condition − control gene × gene map (:func:`cellkit.analysis.attention_difference`).

        Parameters
        ----------
        condition, control
            Two selection names of ``state.selections`` (``groupby=None``), or two values of
            ``obs[groupby]``; default the dropdowns.
        groupby
            The ``obs`` column holding the labels; default: the dropdowns' source.
        layer, head, statistic, background
            As in :meth:`show`.

        Returns
        -------
        The tidy difference table (``None`` in the background or on error); the heatmap shows the
        ``difference`` column as a query × key map with a diverging scale centred on 0.
        """
        import cellkit
        import cellkit.analysis as ca

        self._require()
        adata, model = self.state.adata, self.state.model
        if condition is None and control is None and groupby is None:
            condition, control = self.condition.value, self.control.value
            if self.diff_source.value == "obs":
                groupby = self.diff_groupby.value or None
                if groupby is None:
                    raise DataError("Pick the obs column holding the two groups first.")
        if condition is None or control is None:
            raise DataError("Pick a condition and a control group first.")
        if condition == control:
            raise DataError(
                f"Condition and control are the same group ({condition!r}); pick two different ones."
            )
        s = self._settings(layer, head, statistic)
        desc = self._describe(s, model)
        common = {
            "hidden_layer": s["layer"],
            "head": s["head"],
            "statistic": s["statistic"],
            "include_special": s["include_special"],
            "genes": s["genes"],
            "layer": s["data_layer"],
            "use_raw": s["use_raw"],
        }
        n_max = self.max_cells.value
        if groupby is not None:
            cond, note_a = _subsample(self._check_obs_group(groupby, condition), n_max, f"{condition!r}")
            ctrl, note_b = _subsample(self._check_obs_group(groupby, control), n_max, f"{control!r}")

            def run_api(progress: Progress) -> pd.DataFrame:
                return ca.attention_difference(
                    adata,
                    model,
                    groupby=groupby,
                    condition=condition,
                    control=control,
                    cells=np.concatenate([cond, ctrl]),
                    progress=progress,
                    **common,
                )

        else:
            for name in (condition, control):
                if name not in self.state.selections:
                    raise DataError(
                        f"No selection named {name!r}; known: {sorted(self.state.selections) or 'none'}."
                    )
            cond, note_a = _subsample(self._selection_cells(condition), n_max, f"{condition!r}")
            ctrl, note_b = _subsample(self._selection_cells(control), n_max, f"{control!r}")
            shared = np.intersect1d(cond, ctrl)
            if len(shared):
                raise DataError(
                    f"Selections {condition!r} and {control!r} share {len(shared)} cells; a difference needs two "
                    "disjoint groups (make a selection of the other cells, or compare two values of an obs column)."
                )

            def run_api(progress: Progress) -> pd.DataFrame:
                tokens = cellkit.tokenize(
                    adata,
                    model,
                    cells=np.concatenate([cond, ctrl]),
                    layer=s["data_layer"],
                    use_raw=s["use_raw"],
                    progress=progress,
                )
                if hasattr(tokens, "to_memory"):
                    tokens = tokens.to_memory()
                in_cond = set(cond.tolist())
                names = np.asarray(tokens.obs_names).astype(str)
                labels = [condition if n in in_cond else control for n in names]
                tokens = dataclasses.replace(tokens, obs=pd.DataFrame({"group": labels}, index=names))
                api = {k: v for k, v in common.items() if k not in ("layer", "use_raw")}
                return ca.attention_difference(
                    tokens,
                    model,
                    groupby="group",
                    condition=condition,
                    control=control,
                    progress=progress,
                    **api,
                )

        value = "Δ rank statistic" if s["statistic"] == "grn" else "Δ attention"

        def compute(progress: Progress) -> _Result:
            table = run_api(progress)
            order = {g: model.vocab[g] for g in pd.unique(table["query_gene"])}
            genes = sorted(order, key=order.__getitem__)
            m = table.pivot(index="query_gene", columns="key_gene", values="difference").reindex(
                index=genes, columns=genes
            )
            m.index.name, m.columns.name = "query", "key"
            a = table.attrs
            title = (
                f"{condition} − {control} ({a.get('n_cells_condition', len(cond))} vs "
                f"{a.get('n_cells_control', len(ctrl))} cells) — {desc}"
            )
            return _Result("difference", m, table, title, f"condition: {note_a}; control: {note_b}", value)

        res = self._run(compute, background, "attention difference")
        return None if res is None else res.table

    def _display(self, res: _Result) -> None:
        """Put a result in the heatmap, the gene box and the message line."""
        import cellkit.viz as cv

        is_diff = res.kind == "difference"
        value_name = res.value_name
        fig = cv.attention_heatmap(
            res.matrix,
            max_genes=int(self.max_genes.value),
            title=res.title,
            value_name=value_name,
            zmid=0.0 if is_diff else None,
        )
        new = fig.data[0]
        cv.draw_into(self.figure, fig.update_layout(height=620))
        self.matrix, self.table, self.kind = res.matrix, res.table, res.kind
        if self.top_table is not None or self.top_html.value:  # the top genes were of the previous map
            self.top_table = None
            self.top_html.value = "<div><i>A new map is shown: press “Top genes” for its top genes.</i></div>"
        if is_diff:
            self.diff_table = res.table
        self.gene.options = tuple(str(c) for c in res.matrix.columns[:MAX_CELL_OPTIONS])
        self.result_title.value = f"<b>{html.escape(res.title)}</b>"
        shown = f"{len(new.y)} × {len(new.x)} of {res.matrix.shape[0]} × {res.matrix.shape[1]} genes shown"
        self.show_message(f"{res.title}: {res.note}; {shown}.", "ok")

    @guarded
    def top_genes(
        self, gene: str | None = None, k: int | None = None, direction: str | None = None
    ) -> pd.DataFrame | None:
        """The genes linked most strongly to ``gene`` in the map on show (:func:`top_influenced_genes`).

        Parameters
        ----------
        gene
            A gene of the current map (default the gene box).
        k
            How many (default the k box).
        direction
            ``"attending"``: the query genes attending most to ``gene`` (its column; scGPT's "most
            influenced genes"); ``"attended"``: the key genes ``gene`` attends to most (its row).

        Returns
        -------
        ``rank``, ``gene``, ``score`` table, best first (also :attr:`top_table` and :attr:`table`).
        """
        import cellkit.analysis as ca

        if self.matrix is None:
            raise DataError("No attention map yet: press Show (or Compare) first.")
        gene = str(self.gene.value if gene is None else gene).strip()
        k = int(self.k.value if k is None else k)
        direction = self.direction.value if direction is None else direction
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
        if not gene:
            raise DataError("Type or pick a gene of the map first.")
        m = self.matrix if direction == "attending" else self.matrix.T
        top = ca.top_influenced_genes(m, gene, k=k)
        what = "change in attention" if self.kind == "difference" else "attention"
        if direction == "attending":
            caption = (
                f"Query genes attending most to {gene} (its column; score = {what} from the gene to {gene})"
            )
        else:
            caption = f"Key genes {gene} attends to most (its row; score = {what} from {gene} to the gene)"
        self.top_table = self.table = top
        self.top_html.value = f"<div><i>{html.escape(caption)}</i></div>{html_table(top, max_rows=k)}"
        self.show_message(f"Top {len(top)} genes for {gene}.", "ok")
        return top

    @guarded
    def export(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Write :attr:`table` (the last map or table computed) to a CSV file, atomically.

        A map is written with its query genes as the first column; tidy tables without index.
        """
        if self.table is None:
            raise DataError("Nothing to save yet: show a map (or a top-genes / difference table) first.")
        raw = str(self.path.value if path is None else path).strip()
        if not raw:
            raise DataError("Type a file path (e.g. attention.csv) first.")
        target = Path(raw).expanduser()
        if target.is_dir():
            raise DataError(f"{target} is a folder; give a file name such as {target / 'attention.csv'}.")
        if not target.parent.exists():
            raise DataError(f"Folder {target.parent} does not exist; create it first.")
        is_map = self.table is self.matrix
        _atomic_csv(self.table, target, index=is_map)
        self.show_message(f"Saved {self.table.shape[0]} × {self.table.shape[1]} table to {target}.", "ok")
        return target
