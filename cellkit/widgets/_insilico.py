"""The In-silico panel: delete or overexpress genes in a model's cells and see the embeddings move.

Controls → :func:`cellkit.analysis.in_silico_perturb` (on ``state.model`` and ``state.adata``) →
:func:`cellkit.viz.perturbation_shifts` and :func:`cellkit.viz.perturbation_cells`. The cells are
the studio's active selection, else every cell; at most ``max cells`` of them (the API's seeded
``max_cells`` subsample, which the message says). An optional goal group (an obs value or a
named selection) adds the shift *toward* that group. The caller's AnnData is not written unless
"store in adata.uns" is ticked (``key_added``).

Every action is a plain method (``run``, ``export``) that tests call directly; the buttons call them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cellkit import ConfigError, DataError, Progress

from ._base import guarded, html_table, labelled, plural
from ._jobs import JobPanel
from ._progress import JobProgress
from ._state import StudioState

__all__ = ["InSilicoPanel"]

#: at most this many gene names are offered in the "add gene" box (any name can still be typed)
MAX_GENE_OPTIONS = 20_000
#: obs columns with at most this many distinct values are offered as goal groups
MAX_GROUP_VALUES = 200
#: what :meth:`InSilicoPanel.export` can write
TABLES = ("summary", "cells")
_GOAL_KINDS = (("(no goal)", "none"), ("obs value", "obs"), ("selection", "selection"))
#: size of the two figures
_FIGURE_SIZE = {"height": 340, "width": 480}
#: the summary columns the panel's table shows (the result and the exported CSV keep all of them)
SHOWN_COLUMNS = ("perturbation", "group", "n_cells", "mean_shift", "goal_shift", "z", "p", "distinguishable")
#: random genes needed for an empirical p below 0.05 (the smallest p is 1 / (n_null + 1))
_ENOUGH_NULL = 19


def _split_genes(text: str) -> list[str]:
    """Genes typed in a box: comma / semicolon / whitespace separated, duplicates dropped."""
    parts = re.split(r"[,;\s]+", str(text))
    return list(dict.fromkeys(p for p in (s.strip() for s in parts) if p))


def _perturbable_genes(model: Any) -> list[str]:
    """The gene names to suggest for ``model`` (its vocabulary's genes; PerturbGene: its gene list)."""
    if model.config.family == "perturbgene":
        genes = (getattr(model, "resources", None) or {}).get("genes")
        return [str(g) for g in genes] if genes is not None else []
    special = set(model.vocab.specials.values())
    return [str(t) for t in model.vocab.tokens if t not in special]


def _null_sentence(summary: pd.DataFrame, n_null: int) -> str:
    """Plain words on whether the shifts stand out from the random genes' (the summary's
    ``distinguishable``: ``p < 0.05`` and ``z >= 2``)."""
    if n_null <= 0 or "distinguishable" not in summary or summary["p"].isna().all():
        return (
            " No null computed (n null = 0): the shifts are not compared with random genes, so they "
            f"cannot be told from noise; set n null to {_ENOUGH_NULL + 1} or more."
        )
    names = summary["perturbation"].astype(str)
    if "group" in summary:
        names = names + " (" + summary["group"].astype(str) + ")"
    yes = summary["distinguishable"].astype(bool).to_numpy()

    def listed(items: pd.Series) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    text = ""
    if yes.any():
        text += f" {listed(names[yes])}: shift the cells more than random genes do (p < 0.05, z ≥ 2)."
    if not yes.all():
        p = summary["p"][~yes]
        text += (
            f" {listed(names[~yes])}: not distinguishable from random genes (p {p.min():.2g}–{p.max():.2g})."
        )
    if n_null < _ENOUGH_NULL:
        text += (
            f" With n null = {n_null} the smallest possible p is {1 / (n_null + 1):.2g}: "
            f"use n null ≥ {_ENOUGH_NULL} (e.g. {_ENOUGH_NULL + 1})."
        )
    return text


def _show_figure(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Show ``fig`` in the existing ``widget`` at the panel's figure size."""
    import cellkit.viz

    cellkit.viz.draw_into(widget, fig.update_layout(_FIGURE_SIZE))


class InSilicoPanel(JobPanel):
    """In-silico gene perturbation on the studio's model (:func:`cellkit.analysis.in_silico_perturb`).

    Parameters
    ----------
    state
        The shared :class:`StudioState` (a fresh one when the panel is used alone).

    Attributes
    ----------
    genes, gene_picker, mode, together, max_cells, n_null, seed
        The genes box (comma / space separated), an "add gene" box with the model's genes as
        suggestions, delete / overexpress, "together as one combination", the cell cap, random
        null genes per perturbed gene and the seed (subsample and null genes).
    goal_kind, goal_column, goal_value, goal_selection
        Optional goal group: none, an obs column value, or a named selection.
    store_uns, uns_key
        Store the results in ``adata.uns[uns_key]`` (off by default: the AnnData is not touched).
    run_button, export_path, export_button
        "Run" (CSS class ``cellkit-perturb-run``) and "Export table (CSV)" (``cellkit-perturb-export``).
    result
        The last :class:`cellkit.analysis.InSilicoResult` (``None`` before the first run).
    summary_html, shift_fig, cells_fig
        The summary table (class ``cellkit-perturb-summary``), :func:`cellkit.viz.perturbation_shifts`
        (``FigureWidget``, class ``cellkit-perturb-shift``) and :func:`cellkit.viz.perturbation_cells`
        (class ``cellkit-perturb-cells``).

    Examples
    --------
    >>> panel = InSilicoPanel(StudioState(adata=adata, model=model))  # doctest: +SKIP
    >>> panel.run(["CD3E", "LYZ"], n_null=20).summary  # doctest: +SKIP
    """

    title = "In silico"

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-insilico-panel")
        self.result: Any = None
        self._gene_set: set[str] = set()
        small = widgets.Layout(width="100px")
        self.genes = widgets.Text(
            placeholder="genes, e.g. CD3E, LYZ, MS4A1", layout=widgets.Layout(width="420px")
        )
        self.genes.add_class("cellkit-perturb-genes")
        self.gene_picker = widgets.Combobox(
            placeholder="add a gene", ensure_option=False, layout=widgets.Layout(width="200px")
        )
        self.mode = widgets.ToggleButtons(
            options=[("Delete", "delete"), ("Overexpress", "overexpress")],
            value="delete",
            tooltips=["remove the genes' tokens", "move the genes to the top (highest expression)"],
        )
        self.together = widgets.Checkbox(value=False, description="together as one combination", indent=False)
        self.cells_html = widgets.HTML()
        self.cells_html.add_class("cellkit-perturb-cells-note")
        self.max_cells = widgets.BoundedIntText(value=200, min=1, max=10_000_000, layout=small)
        self.n_null = widgets.BoundedIntText(
            value=0,
            min=0,
            max=10_000,
            layout=small,
            tooltip="random expression-matched genes per perturbed gene (e.g. 20 for z-scores and p-values)",
        )
        self.seed = widgets.IntText(value=0, layout=small)
        self.max_cells.add_class("cellkit-perturb-max-cells")
        self.n_null.add_class("cellkit-perturb-n-null")
        self.goal_kind = widgets.Dropdown(
            options=list(_GOAL_KINDS), value="none", layout=widgets.Layout(width="130px")
        )
        self.goal_column = widgets.Dropdown(options=[], layout=widgets.Layout(width="180px"))
        self.goal_value = widgets.Dropdown(options=[], layout=widgets.Layout(width="220px"))
        self.goal_selection = widgets.Dropdown(options=[], layout=widgets.Layout(width="220px"))
        self._goal_obs_row = widgets.HBox([self.goal_column, self.goal_value])
        self._goal_sel_row = widgets.HBox([self.goal_selection])
        self.store_uns = widgets.Checkbox(
            value=False,
            description="store in adata.uns under",
            indent=False,
            layout=widgets.Layout(width="max-content"),
        )
        self.uns_key = widgets.Text(value="perturbation", layout=widgets.Layout(width="160px"))
        self.run_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Run", button_style="primary", icon="play"
        )
        self.run_button.add_class("cellkit-perturb-run")
        #: progress bar, estimate and Cancel of Run
        self.jobs = JobProgress(css_prefix="cellkit-perturb-job")
        self.summary_html = widgets.HTML()
        self.summary_html.add_class("cellkit-perturb-summary")
        self.shift_fig = go.FigureWidget(
            layout={"title": "Mean embedding shift (1 − cosine)", **_FIGURE_SIZE}
        )
        self.shift_fig.add_class("cellkit-perturb-shift")
        self.cells_fig = go.FigureWidget(layout={"title": "Per-cell shift", **_FIGURE_SIZE})
        self.cells_fig.add_class("cellkit-perturb-cells")
        self.export_path = widgets.Text(placeholder="perturbation.csv", layout=widgets.Layout(width="320px"))
        self.export_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Export table (CSV)", icon="save"
        )
        self.export_button.add_class("cellkit-perturb-export")

        self.run_button.on_click(lambda _b: self.run(background=True))
        self.export_button.on_click(lambda _b: self.export())
        self.gene_picker.observe(self._on_pick, names="value")
        self.goal_kind.observe(lambda _c: self._update_goal_rows(), names="value")
        self.goal_column.observe(lambda _c: self._refresh_goal_values(), names="value")
        self.children = [
            self.message,
            widgets.HTML("<b>In-silico perturbation</b> (the studio's model; embedding shift per cell)"),
            widgets.HBox([labelled("Genes", self.genes, "60px"), self.gene_picker]),
            widgets.HBox([self.mode, self.together]),
            self.cells_html,
            widgets.HBox(
                [
                    labelled("Max cells", self.max_cells, "70px"),
                    labelled("n null", self.n_null, "50px"),
                    labelled("Seed", self.seed, "40px"),
                ]
            ),
            widgets.HBox([labelled("Goal", self.goal_kind, "60px"), self._goal_obs_row, self._goal_sel_row]),
            widgets.HBox([self.store_uns, self.uns_key]),
            self.run_button,
            self.jobs,
            self.summary_html,
            widgets.HBox([self.shift_fig, self.cells_fig], layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([self.export_path, self.export_button]),
        ]
        self.state.observe(self._on_model, names="model")
        self.state.observe(self._on_adata, names="adata")
        self.state.observe(self._on_obs_changed, names="obs_version")
        self.state.observe(self._on_selections, names=["selections", "active_selection"])
        self._on_model()
        self._on_adata()
        self._update_goal_rows()
        self._set_phase("idle")

    # ============================================================================ state → controls
    def _update_buttons(self) -> None:
        self.run_button.disabled = self.phase != "idle"

    def _on_model(self, _change: Any = None) -> None:
        model = self.state.model
        genes = _perturbable_genes(model) if model is not None else []
        self._gene_set = set(genes)
        self.gene_picker.options = tuple(genes[:MAX_GENE_OPTIONS])

    def _on_adata(self, _change: Any = None) -> None:
        cols = self._discrete_columns() if self.state.adata is not None else []
        self.goal_column.options = cols
        if self.goal_column.value is None and cols:  # never a blank dropdown: the first column
            self.goal_column.value = cols[0]
        self._refresh_goal_values()
        self._on_selections()

    def _on_obs_changed(self, _change: Any = None) -> None:
        if self.state.adata is None:
            return
        cols = self._discrete_columns()
        if list(self.goal_column.options) != cols:
            current = self.goal_column.value
            self.goal_column.options = cols
            if current in cols:
                self.goal_column.value = current
            elif self.goal_column.value is None and cols:
                self.goal_column.value = cols[0]

    def _on_selections(self, _change: Any = None) -> None:
        names = sorted(self.state.selections)
        current = self.goal_selection.value
        self.goal_selection.options = names
        if current in names:
            self.goal_selection.value = current
        self._refresh_cells_note()

    def _refresh_cells_note(self) -> None:
        note = self.state.cells_note()
        if self.state.adata is not None and not note.startswith("<i>"):
            note += ", at most “max cells” of them (seeded random subsample)."
        self.cells_html.value = note

    def _discrete_columns(self) -> list[str]:
        obs = self.state.adata.obs
        return [
            str(col)
            for col in obs.columns
            if isinstance(obs[col].dtype, pd.CategoricalDtype) or obs[col].dtype in (object, bool)
        ]

    def _refresh_goal_values(self) -> None:
        adata, col = self.state.adata, self.goal_column.value
        if adata is None or not col or col not in adata.obs.columns:
            self.goal_value.options = []
            return
        counts = adata.obs[col].value_counts(sort=False, dropna=True)
        if len(counts) > MAX_GROUP_VALUES:
            counts = counts.sort_values(ascending=False).head(MAX_GROUP_VALUES)
        self.goal_value.options = [(f"{v} ({int(n)})", v) for v, n in counts.items() if n > 0]
        if self.goal_value.value is None and self.goal_value.options:  # never a blank dropdown
            self.goal_value.index = 0

    def _update_goal_rows(self) -> None:
        kind = self.goal_kind.value
        self._goal_obs_row.layout.display = None if kind == "obs" else "none"
        self._goal_sel_row.layout.display = None if kind == "selection" else "none"

    def _on_pick(self, change: Any) -> None:
        """A gene picked in the "add gene" box goes into the genes box."""
        name = str(change["new"]).strip()
        if not name or name not in self._gene_set:
            return
        current = _split_genes(self.genes.value)
        if name not in current:
            self.genes.value = ", ".join([*current, name])
        self.gene_picker.value = ""

    # ============================================================================ controls → API
    def _goal(self, goal: Any) -> tuple[Any, str]:
        """The ``goal=`` of the API (``None``: no goal) and how to name it, from ``goal`` or the controls."""
        if goal is None:
            kind = self.goal_kind.value
            if kind == "obs":
                goal = (self.goal_column.value, self.goal_value.value)
            elif kind == "selection":
                goal = self.goal_selection.value
                if not goal:
                    raise DataError(
                        "Goal: pick a named selection (make one in the Embedding panel) or no goal."
                    )
            else:
                return None, ""
        if isinstance(goal, str):
            if not goal:
                return None, ""
            return self.state.resolve_cells(goal), f"selection {goal!r}"
        if isinstance(goal, tuple | list) and len(goal) == 2:
            col, value = goal
            if not col:
                raise DataError("Goal: pick an obs column and a value (or choose no goal).")
            value = value.item() if isinstance(value, np.generic) else value
            query = f"`{col}` == {value!r}"  # the API's cell query: it checks the column and the value
            return query, query
        raise ConfigError(
            f"goal must be a selection name, an (obs column, value) pair or '' for none, got {goal!r}."
        )

    def _uns_key_added(self) -> str | None:
        """The ``adata.uns`` key to store results under, or ``None`` when "store" is unticked."""
        if not self.store_uns.value:
            return None
        key_added = str(self.uns_key.value).strip()
        if not key_added:
            raise ConfigError("Enter the adata.uns key to store the results under (or untick “store”).")
        return key_added

    def _options(
        self, genes: str | Sequence[str] | None, mode: str | None, combos: Any, goal: Any, n_null: int | None
    ) -> tuple[dict[str, Any], str]:
        """The keywords of :func:`cellkit.analysis.in_silico_perturb` (the arguments over the controls)
        and how to name the goal."""
        combos = bool(self.together.value) if combos is None else combos
        kw: dict[str, Any] = {
            "mode": self.mode.value if mode is None else mode,
            "combos": combos,
            "cells": self.state.selected_cells(),
            "max_cells": int(self.max_cells.value),
            "n_null": int(self.n_null.value) if n_null is None else n_null,
            "seed": int(self.seed.value),
            "key_added": self._uns_key_added(),
            "progress": False,
        }
        if isinstance(combos, bool | np.bool_):  # explicit combinations name their genes themselves
            typed = self.genes.value if genes is None else genes
            kw["genes"] = _split_genes(typed) if isinstance(typed, str) else [str(g) for g in typed]
        kw["goal"], goal_note = self._goal(goal)
        return kw, goal_note

    @guarded
    def run(
        self,
        genes: str | Sequence[str] | None = None,
        *,
        mode: str | None = None,
        combos: bool | Sequence[Sequence[str]] | None = None,
        goal: Any = None,
        n_null: int | None = None,
        background: bool = False,
    ) -> Any:
        """Perturb genes in the selected cells and show how the embeddings move.

        Parameters
        ----------
        genes
            Gene(s) to perturb (a list, or a string like ``"CD3E, LYZ"``); default the genes box.
        mode
            ``"delete"`` or ``"overexpress"``; default the toggle.
        combos
            ``True``: all genes together as one combination, ``False``: each on its own (default
            the checkbox); or an explicit list of combinations ``[("CD3E", "LYZ"), ("MS4A1",)]``
            (then ``genes`` is not used).
        goal
            ``None``: the goal controls; ``""``: no goal; a selection name; or an
            ``(obs column, value)`` pair. At most ``max cells`` goal cells are used (seeded).
        n_null
            Random expression-matched genes per perturbed gene; default the box.
        background
            Run in a background thread (the "Run" button does; :meth:`wait` joins it). While it
            runs :attr:`jobs` shows the progress over the perturbations, Run is disabled, and
            Cancel stops it (nothing is stored).

        Returns
        -------
        The :class:`cellkit.analysis.InSilicoResult` (``None`` in the background, when cancelled or on error); also
        :attr:`result`.
        """
        import cellkit.analysis as ca

        self._check_idle()
        adata, model = self.state.adata, self.state.model
        if adata is None:
            raise DataError("No data loaded: pick an AnnData in the Data panel first.")
        if model is None:
            raise DataError("No model loaded: load one in the Model panel first (or the demo model).")
        kw, goal_note = self._options(genes, mode, combos, goal, n_null)
        self.show_message(f"Perturbing ({kw['mode']})…", "info")

        def compute(progress: Progress) -> Any:
            return ca.in_silico_perturb(adata, model, **{**kw, "progress": progress})

        def done(result: Any) -> None:
            self._show(result, goal_note, kw["key_added"])

        return self.jobs.run(
            self,
            compute,
            name="In-silico perturbation",
            buttons=[self.run_button],
            on_done=done,
            background=background,
        )

    # ============================================================================ API → views
    def _cells_note(self, params: dict[str, Any]) -> str:
        what = f"selection {self.state.active_selection!r}" if self.state.active_selection else "all cells"
        n_sel, n_max = int(params["n_cells_selected"]), int(params["max_cells"])
        if n_max < 0 or n_sel <= n_max:
            return f"{n_sel:,} cells of {what}"
        return f"a random subsample (seed {params['seed']}) of {n_max:,} of the {n_sel:,} cells of {what}"

    def _show(self, result: Any, goal_note: str, key_added: str | None) -> None:
        """Put a result in the table, the two figures and the message line."""
        import cellkit.viz as cv

        self.result = result
        summary, params = result.summary, result.params
        shown = summary[[c for c in SHOWN_COLUMNS if c in summary]]
        self.summary_html.value = (
            f"<b>Summary</b> <i>(main columns; “Export table” writes all {summary.shape[1]})</i>"
            + html_table(shown, max_rows=200)
        )
        _show_figure(self.shift_fig, cv.perturbation_shifts(summary))
        _show_figure(self.cells_fig, cv.perturbation_cells(result.cells))
        labels = [str(p) for p in summary["perturbation"]]
        parts = [
            f"{str(params['mode']).capitalize()}: {plural(len(labels), 'perturbation')} on {self._cells_note(params)}"
        ]
        if goal_note:
            parts.append(f"goal: {goal_note}")
        if key_added is not None:
            parts.append(f"results stored in adata.uns[{key_added!r}]")
        text = "; ".join(parts) + "." + _null_sentence(summary, int(params.get("n_null", 0)))
        empty = [lab for lab, n in zip(labels, summary["n_cells"], strict=True) if int(n) == 0]
        if empty:
            text += (
                f" No selected cell carries {', '.join(empty[:5])} (delete counts only cells that carry all of a "
                "perturbation's genes): their shift is empty."
            )
        self.show_message(text, "warning" if empty else "ok")

    @guarded
    def export(self, path: str | os.PathLike[str] | None = None, *, table: str = "summary") -> Path | None:
        """Write a table of the last result to a CSV file (:func:`cellkit.analysis.write_csv`, atomic).

        Parameters
        ----------
        path
            The file; default the path box.
        table
            ``"summary"`` or ``"cells"`` (the per-cell frame).

        Returns
        -------
        The file written (``None`` on error).
        """
        import cellkit.analysis as ca

        if table not in TABLES:
            raise ConfigError(f"table must be one of {TABLES}, got {table!r}.")
        if self.result is None:
            raise ConfigError("Nothing to export yet — no table: click “Run” first.")
        frame = getattr(self.result, table)
        where = ca.write_csv(frame, self.export_path.value if path is None else path)
        self.export_path.value = str(where)
        self.show_message(f"Wrote {len(frame):,} rows to {where}.", "ok")
        return where
