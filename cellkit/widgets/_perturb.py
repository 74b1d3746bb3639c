"""The Perturb panel: in-silico gene perturbation of a model's cells, and perturbation-response prediction.

Two independent tools in one tab.

**In-silico perturbation** (:func:`cellkit.analysis.in_silico_perturb`, on ``state.model`` and
``state.adata``): delete or overexpress genes in the tokens of the selected cells (the studio's
active selection, else every cell; at most ``max cells`` of them, a seeded random subsample beyond
that, which the message says) and measure how far each cell's embedding moves. The panel shows the
summary table, a bar chart of the mean cosine shift per perturbation (with the null mean ± std of
random expression-matched genes when ``n null`` > 0) and a violin of the per-cell shifts. An
optional goal group (an obs value or a named selection) adds the shift *toward* that group. The
caller's AnnData is not written unless "store in adata.uns" is ticked (``key_added``).

**Response prediction** (:mod:`cellkit.perturbation`, on a GEARS-shaped AnnData in
``state.adata``: ``obs[condition]`` = ``"ctrl"``, ``"A+ctrl"``, ``"A+B"``; independent of the
studio's model): train a perturbation-response model in a background thread with a live loss
curve (**Stop** ends it at the next step), or load a saved one; then predict the mean expression
after perturbations typed as condition labels. The chart shows the top-k predicted changes
(predicted mean − mean of the model's control cells); where the data hold cells of that condition
the observed change (their mean − the data's control mean) is drawn too and
:func:`cellkit.evaluate_perturbation` gives the Pearson delta.

Every action is a plain method (``run``, ``export``, ``train_response``, ``stop``,
``load_response``, ``save_response``, ``predict``) that tests call directly; the buttons call them.
"""

from __future__ import annotations

import html
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cellkit import CellkitError, ConfigError, DataError
from cellkit.data import unknown_gene_error

from ._base import Panel, guarded, html_table, labelled, line_figure
from ._state import StudioState

__all__ = ["PerturbationPanel"]

MODES = ("delete", "overexpress")
#: at most this many gene names are offered in the "add gene" box (any name can still be typed)
MAX_GENE_OPTIONS = 20_000
#: obs columns with at most this many distinct values are offered as goal groups
MAX_GROUP_VALUES = 200
#: per-cell points are drawn in the violins up to this many cells per perturbation
MAX_POINTS = 300
#: default seconds between two live loss-plot pushes (epoch ends and the finish always push)
UPDATE_INTERVAL = 0.3
#: what :meth:`PerturbationPanel.export` can write
TABLES = ("summary", "cells", "prediction")
_NONE = ""
_GOAL_KINDS = (("(no goal)", "none"), ("obs value", "obs"), ("selection", "selection"))


# ------------------------------------------------------------------------------------- helpers
def _split_genes(text: str) -> list[str]:
    """Genes typed in a box: comma / semicolon / whitespace separated, duplicates dropped."""
    parts = re.split(r"[,;\s]+", str(text))
    return list(dict.fromkeys(p for p in (s.strip() for s in parts) if p))


def _split_conditions(text: str) -> list[str]:
    """Condition labels typed in a box: ``"A+B, C+ctrl"`` (spaces around ``+`` allowed)."""
    text = re.sub(r"\s*\+\s*", "+", str(text))
    return list(dict.fromkeys(p for p in re.split(r"[,;\s]+", text) if p))


def _perturbable_genes(model: Any) -> list[str]:
    """The gene names ``in_silico_perturb`` accepts for ``model`` (empty: unknown, let the API say)."""
    if model.config.family == "perturbgene":
        genes = (getattr(model, "resources", None) or {}).get("genes")
        return [str(g) for g in genes] if genes is not None else []
    special = set(model.vocab.specials.values())
    return [str(t) for t in model.vocab.tokens if t not in special]


def _subsample(names: np.ndarray, max_cells: int, seed: int, what: str) -> tuple[np.ndarray, str]:
    """At most ``max_cells`` of ``names`` (seeded random, original order kept) and a note."""
    if int(max_cells) < 1:
        raise ConfigError(f"max cells must be at least 1, got {max_cells}.")
    names = np.asarray(names).astype(str)
    if len(names) <= max_cells:
        return names, f"{len(names):,} cells of {what}"
    pick = np.sort(np.random.default_rng(seed).choice(len(names), size=int(max_cells), replace=False))
    return (
        names[pick],
        f"a random subsample (seed {seed}) of {int(max_cells):,} of the {len(names):,} cells of {what}",
    )


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


def _plain(v: Any) -> float | None:
    """A float for plotly (``None`` for missing / NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _rows_mean(x: Any, rows: np.ndarray) -> np.ndarray:
    sub = x[rows]
    return np.asarray(sub.mean(axis=0), dtype=np.float64).reshape(-1)


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


# --------------------------------------------------------------------------------------- panel
class PerturbationPanel(Panel):
    """In-silico gene perturbation on the studio's model, and perturbation-response prediction.

    Parameters
    ----------
    state
        The shared :class:`StudioState` (a fresh one when the panel is used alone).

    Attributes
    ----------
    genes, gene_picker, mode, together, max_cells, n_null, seed
        In-silico controls: the genes box (comma / space separated), an "add gene" box with the
        model's genes as suggestions, delete / overexpress, "together as one combination", the
        cell cap, random null genes per perturbed gene and the seed (subsample and null genes).
    goal_kind, goal_column, goal_value, goal_selection
        Optional goal group: none, an obs column value, or a named selection.
    store_uns, uns_key
        Store the results in ``adata.uns[uns_key]`` (off by default: the AnnData is not touched).
    run_button, export_path, export_button
        "Run" (CSS class ``cellkit-perturb-run``) and "Export table (CSV)" (``cellkit-perturb-export``).
    summary, cells_table
        The last summary frame of :func:`cellkit.analysis.in_silico_perturb` and its per-cell frame.
    run_cells
        Obs names of the cells the last run perturbed.
    summary_html, shift_fig, cells_fig
        The table (class ``cellkit-perturb-summary``), the mean-shift bar chart (``FigureWidget``,
        class ``cellkit-perturb-shift``: trace 0 one bar per perturbation, then the null mean ±
        std markers and the goal-shift bars when present) and the per-cell violins (class
        ``cellkit-perturb-cells``: one violin per perturbation).
    condition_key, control, epochs, lr, batch_size, max_genes, response_seed
        Response-model training controls (``max_genes`` 0: every gene).
    train_button, stop_button, model_path, load_button, save_button
        "Train response model" (``cellkit-perturb-train``), "Stop" (``cellkit-perturb-stop``),
        the path box, "Load response model" (``cellkit-perturb-load``) and "Save response model"
        (``cellkit-perturb-save``).
    loss_fig
        Live loss per step (class ``cellkit-perturb-loss``; trace 0 ``loss``, trace 1 ``val/loss``
        at each epoch end).
    perturbations, top_k, predict_button, response_fig, response_html
        The perturbations box, genes shown, "Predict" (``cellkit-perturb-predict``), the bar chart
        of predicted changes (class ``cellkit-perturb-response``: one bar trace per perturbation,
        then one "observed" marker trace per perturbation with observed cells) and the tables.
    prediction_path, prediction_export_button
        "Export prediction (CSV)" (``cellkit-perturb-export-prediction``).
    response_model
        The current :class:`cellkit.PerturbationModel` (trained, stopped or loaded), or ``None``.
    prediction
        The last :meth:`cellkit.PerturbationModel.predict` frame (genes × perturbations).
    response_table
        Long table of the last prediction: ``perturbation``, ``gene``, ``control_mean``,
        ``predicted_mean``, ``predicted_change`` and ``observed_change`` (NaN without cells).
    evaluation
        :func:`cellkit.evaluate_perturbation` of the perturbations with observed cells (or ``None``).
    extra_callbacks
        More training callbacks (after the panel's own).
    update_interval
        Seconds between two live-plot pushes.

    Examples
    --------
    >>> panel = PerturbationPanel(StudioState(adata=adata, model=model))  # doctest: +SKIP
    >>> panel.run(["CD3E", "LYZ"], n_null=20)  # doctest: +SKIP
    """

    title = "Perturb"

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-perturb-panel")
        self.summary: pd.DataFrame | None = None
        self.cells_table: pd.DataFrame | None = None
        self.run_cells: np.ndarray | None = None
        self.response_model: Any = None
        self.prediction: pd.DataFrame | None = None
        self.response_table: pd.DataFrame | None = None
        self.evaluation: pd.DataFrame | None = None
        self.extra_callbacks: list[Any] = []
        self.update_interval: float = UPDATE_INTERVAL
        self.phase = "idle"  # "idle", "perturbing", "training", "stopping", "predicting"
        self._gene_set: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._steps: list[int] = []
        self._loss: list[float | None] = []
        self._val_x: list[int] = []
        self._val: list[float | None] = []
        self._last_step = 0
        self._last_push = 0.0
        self._total: int | None = None
        self._train_epochs: Any = "?"
        small = widgets.Layout(width="100px")
        wide = widgets.Layout(width="420px")

        # ============================================================ in-silico perturbation
        self.genes = widgets.Text(placeholder="genes, e.g. CD3E, LYZ, MS4A1", layout=wide)
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
        self.store_uns = widgets.Checkbox(value=False, description="store in adata.uns under", indent=False)
        self.uns_key = widgets.Text(value="perturbation", layout=widgets.Layout(width="160px"))
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.run_button.add_class("cellkit-perturb-run")
        self.summary_html = widgets.HTML()
        self.summary_html.add_class("cellkit-perturb-summary")
        self.shift_fig = go.FigureWidget(
            layout=go.Layout(
                title="Mean embedding shift (1 − cosine)",
                xaxis_title="perturbation",
                yaxis_title="mean shift",
                barmode="group",
                height=340,
                width=480,
                margin=dict(l=60, r=10, t=40, b=80),
                legend=dict(orientation="h", y=-0.35),
            )
        )
        self.shift_fig.add_class("cellkit-perturb-shift")
        self.cells_fig = go.FigureWidget(
            layout=go.Layout(
                title="Per-cell shift",
                yaxis_title="shift (1 − cosine)",
                height=340,
                width=480,
                margin=dict(l=60, r=10, t=40, b=80),
                showlegend=False,
            )
        )
        self.cells_fig.add_class("cellkit-perturb-cells")
        self.export_path = widgets.Text(placeholder="perturbation.csv", layout=widgets.Layout(width="320px"))
        self.export_button = widgets.Button(description="Export table (CSV)", icon="save")
        self.export_button.add_class("cellkit-perturb-export")

        # ============================================================ response prediction
        self.condition_key = widgets.Dropdown(options=[("(choose a column)", _NONE)], value=_NONE)
        self.condition_key.layout.width = "200px"
        self.control = widgets.Text(value="ctrl", layout=widgets.Layout(width="120px"))
        self.epochs = widgets.BoundedIntText(value=10, min=1, max=10_000, layout=small)
        self.lr = widgets.FloatText(value=3e-3, step=1e-4, layout=small)
        self.batch_size = widgets.BoundedIntText(value=16, min=1, max=100_000, layout=small)
        self.max_genes = widgets.BoundedIntText(
            value=1536, min=0, max=1_000_000, layout=small, tooltip="genes per cell and step (0: every gene)"
        )
        self.response_seed = widgets.IntText(value=0, layout=small)
        self.train_button = widgets.Button(
            description="Train response model", button_style="primary", icon="play"
        )
        self.train_button.add_class("cellkit-perturb-train")
        self.stop_button = widgets.Button(
            description="Stop", button_style="warning", icon="stop", disabled=True
        )
        self.stop_button.add_class("cellkit-perturb-stop")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="300px"))
        self.progress.add_class("cellkit-perturb-progress")
        self.status_html = widgets.HTML("no response model")
        self.status_html.add_class("cellkit-perturb-status")
        self.loss_fig = line_figure(
            "Response-model training loss",
            traces=("loss", "val/loss"),
            y_title="MSE",
            css_class="cellkit-perturb-loss",
            width=480,
            height=300,
        )
        self.model_path = widgets.Text(
            placeholder="directory of a saved response model", layout=widgets.Layout(width="320px")
        )
        self.load_button = widgets.Button(description="Load response model", icon="folder-open")
        self.load_button.add_class("cellkit-perturb-load")
        self.save_button = widgets.Button(description="Save response model", icon="save", disabled=True)
        self.save_button.add_class("cellkit-perturb-save")
        self.perturbations = widgets.Text(placeholder="e.g. G0001+G0002, G0003+ctrl", layout=wide)
        self.perturbations.add_class("cellkit-perturb-conditions")
        self.top_k = widgets.BoundedIntText(value=20, min=1, max=10_000, layout=small)
        self.predict_button = widgets.Button(description="Predict", icon="magic", disabled=True)
        self.predict_button.add_class("cellkit-perturb-predict")
        self.response_fig = go.FigureWidget(
            layout=go.Layout(
                title="Predicted expression change",
                xaxis_title="gene",
                yaxis_title="mean − control mean",
                barmode="group",
                height=360,
                width=760,
                margin=dict(l=60, r=10, t=40, b=90),
                legend=dict(orientation="h", y=-0.35),
            )
        )
        self.response_fig.add_class("cellkit-perturb-response")
        self.response_html = widgets.HTML()
        self.response_html.add_class("cellkit-perturb-response-table")
        self.prediction_path = widgets.Text(
            placeholder="prediction.csv", layout=widgets.Layout(width="320px")
        )
        self.prediction_export_button = widgets.Button(description="Export prediction (CSV)", icon="save")
        self.prediction_export_button.add_class("cellkit-perturb-export-prediction")

        # ------------------------------------------------------------ wiring
        self.run_button.on_click(lambda _b: self.run(background=True))
        self.export_button.on_click(lambda _b: self.export())
        self.train_button.on_click(lambda _b: self.train_response(background=True))
        self.stop_button.on_click(lambda _b: self.stop())
        self.load_button.on_click(lambda _b: self.load_response())
        self.save_button.on_click(lambda _b: self.save_response())
        self.predict_button.on_click(lambda _b: self.predict(background=True))
        self.prediction_export_button.on_click(lambda _b: self.export(table="prediction"))
        self.gene_picker.observe(self._on_pick, names="value")
        self.goal_kind.observe(lambda _c: self._update_goal_rows(), names="value")
        self.goal_column.observe(lambda _c: self._refresh_goal_values(), names="value")

        in_silico = widgets.VBox(
            [
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
                widgets.HBox(
                    [labelled("Goal", self.goal_kind, "60px"), self._goal_obs_row, self._goal_sel_row]
                ),
                widgets.HBox([self.store_uns, self.uns_key]),
                self.run_button,
                self.summary_html,
                widgets.HBox([self.shift_fig, self.cells_fig], layout=widgets.Layout(flex_flow="row wrap")),
                widgets.HBox([self.export_path, self.export_button]),
            ]
        )
        response = widgets.VBox(
            [
                widgets.HTML(
                    "<b>Response prediction</b> (GEARS-style data: obs condition ‘ctrl’, ‘A+ctrl’, ‘A+B’)"
                ),
                widgets.HBox(
                    [
                        labelled("Condition column", self.condition_key),
                        labelled("Control", self.control, "60px"),
                    ]
                ),
                widgets.HBox(
                    [
                        labelled("Epochs", self.epochs, "55px"),
                        labelled("lr", self.lr, "25px"),
                        labelled("Batch", self.batch_size, "45px"),
                        labelled("Max genes", self.max_genes, "75px"),
                        labelled("Seed", self.response_seed, "40px"),
                    ]
                ),
                widgets.HBox([self.train_button, self.stop_button, self.progress]),
                self.status_html,
                self.loss_fig,
                widgets.HBox([self.model_path, self.load_button, self.save_button]),
                widgets.HBox([labelled("Perturbations", self.perturbations, "95px")]),
                widgets.HBox([labelled("Top genes", self.top_k, "75px"), self.predict_button]),
                self.response_fig,
                self.response_html,
                widgets.HBox([self.prediction_path, self.prediction_export_button]),
            ]
        )
        self.children = [self.message, in_silico, widgets.HTML("<hr>"), response]

        self.state.observe(self._on_model, names="model")
        self.state.observe(self._on_adata, names="adata")
        self.state.observe(self._on_obs_changed, names="obs_version")
        self.state.observe(self._on_selections, names=["selections", "active_selection"])
        self._on_model()
        self._on_adata()
        self._update_goal_rows()
        self._set_phase("idle")

    # ============================================================================ state → controls
    def _on_model(self, _change: Any = None) -> None:
        model = self.state.model
        genes = _perturbable_genes(model) if model is not None else []
        self._gene_set = set(genes)
        self.gene_picker.options = tuple(genes[:MAX_GENE_OPTIONS])

    def _on_adata(self, _change: Any = None) -> None:
        adata = self.state.adata
        cols = self._discrete_columns() if adata is not None else []
        self.goal_column.options = cols
        old = self.condition_key.value
        self.condition_key.options = [("(choose a column)", _NONE), *[(c, c) for c in cols]]
        if old in cols:
            self.condition_key.value = old
        elif "condition" in cols:
            self.condition_key.value = "condition"
        else:
            ctrl = str(self.control.value)
            hit = [c for c in cols if (adata.obs[c].astype(str) == ctrl).any()] if adata is not None else []
            self.condition_key.value = hit[0] if hit else _NONE
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
        options = [("(choose a column)", _NONE), *[(c, c) for c in cols]]
        if list(self.condition_key.options) != options:
            current = self.condition_key.value
            self.condition_key.options = options
            self.condition_key.value = current if current in cols else _NONE

    def _on_selections(self, _change: Any = None) -> None:
        names = sorted(self.state.selections)
        current = self.goal_selection.value
        self.goal_selection.options = names
        if current in names:
            self.goal_selection.value = current
        self._refresh_cells_note()

    def _refresh_cells_note(self) -> None:
        adata = self.state.adata
        if adata is None:
            self.cells_html.value = "<i>No data loaded: pick an AnnData in the Data panel.</i>"
            return
        try:
            names = self.state.selected_cells()
        except CellkitError as exc:  # a stale selection name
            self.cells_html.value = f"<i>Cells: {html.escape(str(exc))}</i>"
            return
        if names is None:
            text = f"Cells: all {adata.n_obs:,} cells (no active selection)"
        else:
            text = (
                f"Cells: selection <b>{html.escape(self.state.active_selection)}</b> — {len(names):,} cells"
            )
        self.cells_html.value = text + ", at most “max cells” of them (seeded random subsample)."

    def _discrete_columns(self) -> list[str]:
        obs = self.state.adata.obs
        out = []
        for col in obs.columns:
            s = obs[col]
            discrete = isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or s.dtype == bool
            if discrete:
                out.append(str(col))
        return out

    def _refresh_goal_values(self) -> None:
        adata, col = self.state.adata, self.goal_column.value
        if adata is None or not col or col not in adata.obs.columns:
            self.goal_value.options = []
            return
        counts = adata.obs[col].value_counts(sort=False, dropna=True)
        if len(counts) > MAX_GROUP_VALUES:
            counts = counts.sort_values(ascending=False).head(MAX_GROUP_VALUES)
        self.goal_value.options = [(f"{v} ({int(n)})", v) for v, n in counts.items() if n > 0]

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

    def _set_phase(self, phase: str) -> None:
        """Enable / disable the buttons for ``phase``."""
        self.phase = phase
        busy = phase != "idle"
        self.run_button.disabled = busy
        self.train_button.disabled = busy
        self.load_button.disabled = busy
        self.stop_button.disabled = phase != "training"
        have = self.response_model is not None
        self.save_button.disabled = busy or not have
        self.predict_button.disabled = busy or not have

    def _check_idle(self) -> None:
        if self.running:
            doing = {"training": "training", "stopping": "stopping"}.get(self.phase, "computing")
            raise ConfigError(
                f"The Perturb panel is busy ({doing}); wait for it to finish"
                + (" or click “Stop”." if doing == "training" else ".")
            )

    def _in_background(
        self,
        fn: Callable[[], Any],
        *,
        name: str,
        phase: str,
        on_done: Callable[[Any], None],
        on_error: Callable[[], None] | None = None,
    ) -> None:
        """Run ``fn`` in the panel's background thread; the buttons follow ``phase`` until it ends."""

        def work() -> Any:
            try:
                return fn()
            except BaseException:
                (on_error or (lambda: self._set_phase("idle")))()
                raise

        def done(result: Any) -> None:
            try:
                on_done(result)
            finally:
                self._set_phase("idle")

        self._set_phase(phase)
        try:
            self.run_in_background(work, name=name, on_done=done)
        except BaseException:
            self._set_phase("idle")
            raise

    # ============================================================================ in-silico
    def _goal(self, goal: Any) -> tuple[Any, str]:
        """The ``goal=`` argument for the API (``None``: no goal) and how to say it."""
        adata = self.state.adata
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
        if isinstance(goal, str) and not goal:
            return None, ""
        if isinstance(goal, str):
            if goal not in self.state.selections:
                raise DataError(
                    f"Goal: no selection named {goal!r}; known: {sorted(self.state.selections) or 'none'}."
                )
            cells = self.state.resolve_cells(goal)
            what = f"selection {goal!r}"
        elif isinstance(goal, tuple | list) and len(goal) == 2:
            col, value = goal
            if not col:
                raise DataError("Goal: pick an obs column and a value (or choose no goal).")
            if col not in adata.obs.columns:
                raise DataError(
                    f"Goal: {col!r} is not an obs column; available: {list(map(str, adata.obs.columns))[:20]}."
                )
            mask = (adata.obs[col] == value).to_numpy()
            if not mask.any():
                raise DataError(f"Goal: no cell has obs[{col!r}] == {value!r}.")
            cells = np.asarray(adata.obs_names[mask]).astype(str)
            what = f"obs[{col!r}] == {value!r}"
        else:
            raise ConfigError(
                f"goal must be a selection name, an (obs column, value) pair or '' for none, got {goal!r}."
            )
        if len(cells) == 0:
            raise DataError(f"Goal {what} is empty; select at least one cell.")
        cells, note = _subsample(cells, self.max_cells.value, int(self.seed.value), what)
        return cells, note

    def _requested_perturbations(
        self, genes: str | Sequence[str] | None, combos: Any
    ) -> tuple[bool, list[tuple[str, ...]], list[str]]:
        """Whether ``combos`` lists explicit combinations, those combinations, and the genes (checked)."""
        explicit = not isinstance(combos, bool | np.bool_)
        perts: list[tuple[str, ...]] = []
        if explicit:
            perts = [(c,) if isinstance(c, str) else tuple(str(g) for g in c) for c in combos]
            gene_list = list(dict.fromkeys(g for p in perts for g in p))
            if not gene_list:
                raise ConfigError("combos is empty; name at least one combination of genes.")
        else:
            gene_list = self._typed_genes(genes)
        if self._gene_set:
            missing = [g for g in gene_list if g not in self._gene_set]
            if missing:
                raise unknown_gene_error(missing, sorted(self._gene_set), where="the model's vocabulary")
        return explicit, perts, gene_list

    def _typed_genes(self, genes: str | Sequence[str] | None) -> list[str]:
        """The genes to perturb one by one (or together): the argument, else the genes box."""
        if genes is None:
            gene_list = _split_genes(self.genes.value)
        elif isinstance(genes, str):
            gene_list = _split_genes(genes)
        else:
            gene_list = list(dict.fromkeys(str(g).strip() for g in genes if str(g).strip()))
        if not gene_list:
            raise ConfigError("Type at least one gene to perturb in the genes box (e.g. CD3E, LYZ).")
        return gene_list

    def _uns_key_added(self) -> str | None:
        """The ``adata.uns`` key to store results under, or ``None`` when "store" is unticked."""
        if not self.store_uns.value:
            return None
        key_added = str(self.uns_key.value).strip()
        if not key_added:
            raise ConfigError("Enter the adata.uns key to store the results under (or untick “store”).")
        return key_added

    def _perturbed_cells(self, adata: Any, seed: int) -> tuple[np.ndarray, str]:
        """The cells to perturb (the active selection, else all), subsampled to ``max cells``, and a note."""
        selected = self.state.selected_cells()
        if selected is None:
            selected = np.asarray(adata.obs_names).astype(str)
            what = "all cells"
        else:
            what = f"selection {self.state.active_selection!r}"
        if len(selected) == 0:
            raise DataError(f"The {what} is empty; select at least one cell.")
        return _subsample(selected, self.max_cells.value, seed, what)

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
    ) -> pd.DataFrame | None:
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
            Run in a background thread (the "Run" button does; :meth:`wait` joins it).

        Returns
        -------
        The summary frame (``None`` in the background or on error); also :attr:`summary` and
        :attr:`cells_table`.
        """
        import cellkit.analysis as ca

        self._check_idle()
        adata, model = self.state.adata, self.state.model
        if adata is None:
            raise DataError("No data loaded: pick an AnnData in the Data panel first.")
        if model is None:
            raise DataError("No model loaded: load one in the Model panel first (or the demo model).")
        mode = self.mode.value if mode is None else mode
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
        combos = bool(self.together.value) if combos is None else combos
        explicit, perts, gene_list = self._requested_perturbations(genes, combos)
        n_null = int(self.n_null.value if n_null is None else n_null)
        if n_null < 0:
            raise ConfigError(f"n null must be 0 or more, got {n_null}.")
        seed = int(self.seed.value)
        key_added = self._uns_key_added()
        cells, note = self._perturbed_cells(adata, seed)
        goal_cells, goal_note = self._goal(goal)
        kw: dict[str, Any] = {
            "mode": mode,
            "cells": cells,
            "goal": goal_cells,
            "n_null": n_null,
            "seed": seed,
            "key_added": key_added,
            "return_cells": True,
            "progress": False,
        }
        if explicit:
            kw["combos"] = perts
        else:
            kw["genes"] = gene_list
            kw["combos"] = bool(combos)
        n_perts = len(perts) if explicit else (1 if combos else len(gene_list))
        self.show_message(
            f"Perturbing ({mode}) {_n(n_perts, 'perturbation')} in {note}"
            + (f" with {n_null} null genes each" if n_null else "")
            + "…",
            "info",
        )

        def compute() -> tuple[pd.DataFrame, pd.DataFrame]:
            return ca.in_silico_perturb(adata, model, **kw)

        def done(res: tuple[pd.DataFrame, pd.DataFrame]) -> None:
            self._show_perturbation(res, cells, note, goal_note, key_added)

        if background:
            self._in_background(compute, name="perturb", phase="perturbing", on_done=done)
            return None
        res = compute()
        done(res)
        return self.summary

    def _show_perturbation(
        self,
        res: tuple[pd.DataFrame, pd.DataFrame],
        cells: np.ndarray,
        note: str,
        goal_note: str,
        key_added: str | None,
    ) -> None:
        summary, per_cell = res
        self.summary, self.cells_table, self.run_cells = summary, per_cell, np.asarray(cells)
        self.summary_html.value = "<b>Summary</b>" + html_table(summary, max_rows=200)
        labels = [str(p) for p in summary["perturbation"]]
        has_null = "null_mean" in summary and summary["null_mean"].notna().any()
        has_goal = "goal_shift" in summary
        traces: list[Any] = [
            go.Bar(
                x=labels,
                y=[_plain(v) for v in summary["mean_shift"]],
                name="mean shift",
                customdata=np.asarray(summary["n_cells"]),
                hovertemplate="%{x}<br>mean shift %{y:.3g}<br>%{customdata} cells<extra></extra>",
            )
        ]
        if has_null:
            traces.append(
                go.Scatter(
                    x=labels,
                    y=[_plain(v) for v in summary["null_mean"]],
                    error_y=dict(
                        type="data", array=[_plain(v) or 0.0 for v in summary["null_std"]], visible=True
                    ),
                    mode="markers",
                    marker=dict(symbol="diamond", size=10, color="black"),
                    name="null mean ± std (random genes)",
                )
            )
        if has_goal:
            traces.append(
                go.Bar(x=labels, y=[_plain(v) for v in summary["goal_shift"]], name="shift toward goal")
            )
        self.shift_fig.data = ()
        self.shift_fig.add_traces(traces)
        counted = per_cell[per_cell["counted"].astype(bool)]
        violins = []
        for label in labels:
            y = counted.loc[counted["perturbation"] == label, "shift"].to_numpy(dtype=float)
            violins.append(
                go.Violin(
                    y=tuple(y.tolist()),
                    name=label,
                    box_visible=True,
                    meanline_visible=True,
                    points="all" if len(y) <= MAX_POINTS else False,
                    text=tuple(counted.loc[counted["perturbation"] == label, "cell"].astype(str)),
                    hoverinfo="y+text",
                )
            )
        self.cells_fig.data = ()
        self.cells_fig.add_traces(violins)
        mode = str(summary["mode"].iloc[0]) if len(summary) else ""
        empty = [lab for lab, n in zip(labels, summary["n_cells"], strict=True) if int(n) == 0]
        parts = [f"{mode.capitalize()}: {_n(len(labels), 'perturbation')} on {note}"]
        if goal_note:
            parts.append(f"goal: {goal_note}")
        if key_added is not None:
            parts.append(f"results stored in adata.uns[{key_added!r}]")
        text = "; ".join(parts) + "."
        kind = "ok"
        if empty:
            text += (
                f" No selected cell carries {', '.join(empty[:5])} (delete counts only cells that carry all of a "
                "perturbation's genes): their shift is empty."
            )
            kind = "warning"
        self.show_message(text, kind)

    @guarded
    def export(self, path: str | os.PathLike[str] | None = None, *, table: str = "summary") -> Path | None:
        """Write a result table to a CSV file (atomically: a temporary file, then ``os.replace``).

        Parameters
        ----------
        path
            The file; default the path box of that table ("Export table" / "Export prediction").
        table
            ``"summary"`` (in-silico summary), ``"cells"`` (its per-cell frame) or ``"prediction"``
            (:attr:`response_table`: the long table of the last prediction).

        Returns
        -------
        The file written (``None`` on error).
        """
        if table not in TABLES:
            raise ConfigError(f"table must be one of {TABLES}, got {table!r}.")
        frame = {"summary": self.summary, "cells": self.cells_table, "prediction": self.response_table}[table]
        if frame is None:
            what = "prediction: click “Predict”" if table == "prediction" else "table: click “Run”"
            raise ConfigError(f"Nothing to export yet — no {what} first.")
        box = self.prediction_path if table == "prediction" else self.export_path
        text = str(box.value if path is None else path).strip()
        if not text:
            raise ConfigError("Enter the CSV file path to write (e.g. perturbation.csv).")
        where = Path(text).expanduser()
        if where.is_dir():
            raise DataError(f"{where} is a folder; give a file name such as {where / 'perturbation.csv'}.")
        if not where.parent.is_dir():
            raise DataError(f"The folder {where.parent} does not exist; create it or choose another path.")
        _atomic_csv(frame, where, index=False)
        box.value = str(where)
        self.show_message(f"Wrote {len(frame):,} rows to {where}.", "ok")
        return where

    # ============================================================================ response model
    def _response_settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        max_genes = int(self.max_genes.value)
        kw: dict[str, Any] = {
            "condition_key": self.condition_key.value,
            "control": str(self.control.value).strip(),
            "epochs": int(self.epochs.value),
            "lr": float(self.lr.value),
            "batch_size": int(self.batch_size.value),
            "max_genes": max_genes if max_genes > 0 else None,
            "seed": int(self.response_seed.value),
        }
        kw.update(overrides)
        return kw

    def _check_conditions(self, adata: Any, key: str, control: str) -> tuple[int, int]:
        """Foreground checks of the condition column; returns (#control cells, #perturbed cells)."""
        from cellkit.perturbation import parse_condition

        if not key:
            raise DataError(
                "Choose the condition column (the obs column with GEARS labels such as ‘ctrl’, ‘A+ctrl’, "
                "‘A+B’); this data has no ‘condition’ column."
            )
        if key not in adata.obs.columns:
            raise DataError(
                f"{key!r} is not an obs column; available: {list(map(str, adata.obs.columns))[:20]}. Choose the "
                "column with the perturbation conditions."
            )
        if not control:
            raise ConfigError("Enter the control label (e.g. ‘ctrl’).")
        col = adata.obs[key]
        if col.isna().any():
            raise DataError(
                f"{int(col.isna().sum())} cells have no {key!r} value; drop them or fill the labels."
            )
        labels = col.astype(str)
        bad = []
        for lab in labels.unique():
            try:
                parse_condition(lab, control=control)
            except DataError:
                bad.append(lab)
        if bad:
            raise DataError(
                f"{len(bad)} {key!r} label(s) do not parse as conditions: {bad[:5]}; labels must be "
                f"‘{control}’, ‘GENE+{control}’ or ‘GENE1+GENE2’."
            )
        n_ctrl = int((labels == control).sum())
        if n_ctrl == 0:
            found = list(dict.fromkeys(labels.tolist()))[:8]
            raise DataError(
                f"No control cells: no {key!r} value equals {control!r} (found e.g. {found}). Enter the label of "
                "the unperturbed cells in “Control”."
            )
        if n_ctrl == len(labels):
            raise DataError(f"Every cell is a control ({control!r}); there is no perturbation to learn from.")
        return n_ctrl, len(labels) - n_ctrl

    @guarded
    def train_response(self, background: bool = False, **overrides: Any) -> Any:
        """Train a perturbation-response model on ``state.adata`` (:func:`cellkit.fit_perturbation_model`).

        Parameters
        ----------
        background
            Train in a background thread (the button does; :meth:`wait` joins it, :meth:`stop`
            ends it at the next step).
        **overrides
            Any :func:`cellkit.fit_perturbation_model` keyword over the controls' values, e.g.
            ``epochs=1, d_model=16, n_heads=2, n_layers=1, d_ff=32, val_size=0.1``.

        Returns
        -------
        The :class:`cellkit.PerturbationModel` (``None`` in the background or on error); also
        :attr:`response_model`.
        """
        import cellkit

        self._check_idle()
        adata = self.state.adata
        if adata is None:
            raise DataError(
                "No data loaded: pick a perturb-seq AnnData (GEARS layout) in the Data panel first."
            )
        kw = self._response_settings(overrides)
        for name in ("callbacks", "stop_event", "progress"):
            if name in kw:
                raise ConfigError(f"{name}= is set by the panel; leave it out.")
        if isinstance(kw["epochs"], bool) or not isinstance(kw["epochs"], int) or kw["epochs"] < 1:
            raise ConfigError(f"Epochs must be a positive integer, got {kw['epochs']!r}.")
        if not (isinstance(kw["lr"], int | float) and kw["lr"] > 0):
            raise ConfigError(f"The learning rate must be positive, got {kw['lr']!r}.")
        n_ctrl, n_pert = self._check_conditions(adata, kw["condition_key"], kw["control"])
        self._stop.clear()
        with self._lock:
            self._steps, self._loss, self._val_x, self._val = [], [], [], []
            self._total, self._last_step = None, 0
        self._train_epochs = kw["epochs"]
        with self.loss_fig.batch_update():
            for tr in self.loss_fig.data:
                tr.x, tr.y = (), ()
        self.progress.value, self.progress.max, self.progress.bar_style = 0, 1, "info"
        self.status_html.value = "preparing…"
        self.show_message(
            f"Training a response model on {n_ctrl:,} control and {n_pert:,} perturbed cells "
            f"({kw['epochs']} epochs)…",
            "info",
        )
        t0 = time.time()
        callbacks = [self._on_event, *self.extra_callbacks]

        def compute() -> Any:
            return cellkit.fit_perturbation_model(
                adata, **kw, callbacks=callbacks, stop_event=self._stop, progress=False
            )

        def done(result: Any) -> None:
            self._finish_training(result, time.time() - t0)

        if background:
            self._in_background(
                compute,
                name="perturbation-response",
                phase="training",
                on_done=done,
                on_error=self._training_failed,
            )
            return None
        self._set_phase("training")
        try:
            result = compute()
        except BaseException:
            self._training_failed()
            raise
        done(result)
        return result

    def _training_failed(self) -> None:
        self.progress.bar_style = "danger"
        self.status_html.value = "training failed; the previous response model (if any) is kept"
        self._set_phase("idle")

    def _on_event(self, event: Any) -> None:
        """Training-thread callback: record the losses, push to the plot when due."""
        kind = event.kind
        with self._lock:
            if kind == "train_start":
                self._total = event.total_steps
            elif kind == "step_end":
                self._steps.append(int(event.step))
                self._loss.append(_plain(event.metrics.get("loss")))
                self._last_step = int(event.step)
            elif kind == "epoch_end" and "val/loss" in event.metrics:
                self._val_x.append(int(event.step))
                self._val.append(_plain(event.metrics.get("val/loss")))
        due = time.monotonic() - self._last_push >= self.update_interval
        if due or kind in ("train_start", "epoch_end", "finish"):
            self._push(event)

    def _push(self, event: Any) -> None:
        with self._lock:
            steps, loss = tuple(self._steps), tuple(self._loss)
            val_x, val = tuple(self._val_x), tuple(self._val)
            total = self._total
        with self.loss_fig.batch_update():
            self.loss_fig.data[0].x, self.loss_fig.data[0].y = steps, loss
            self.loss_fig.data[1].x, self.loss_fig.data[1].y = val_x, val
        step = int(event.step)
        top = max(int(total or 0), step, 1)
        self.progress.max = top
        self.progress.value = min(step, top)
        last = next((v for v in reversed(loss) if v is not None), None)
        parts = [
            f"epoch {min(int(event.epoch) + 1, self._train_epochs) if isinstance(self._train_epochs, int) else '?'}"
            f"/{self._train_epochs}",
            f"step {step}/{total if total is not None else '?'}",
        ]
        if last is not None:
            parts.append(f"loss {last:.4f}")
        if val:
            parts.append(f"val/loss {val[-1]:.4f}" if val[-1] is not None else "val/loss ?")
        self.status_html.value = " · ".join(html.escape(p) for p in parts)
        self._last_push = time.monotonic()

    def _finish_training(self, result: Any, took: float) -> None:
        self.response_model = result
        self.prediction = self.response_table = self.evaluation = None
        n_steps = len(result.history.step_records)
        seen = ", ".join(result.seen_genes[:8]) + (" …" if len(result.seen_genes) > 8 else "")
        self._set_phase("idle")
        if result.status in ("completed", "early_stopped"):
            self.progress.bar_style = "success"
            self.status_html.value = html.escape(
                f"{result.status} · {_n(n_steps, 'step')} · {len(result.genes)} genes · "
                f"{len(result.seen_genes)} perturbable genes"
            )
            self.show_message(
                f"Trained the response model: {_n(n_steps, 'step')} in {took:.1f} s; it can predict perturbations "
                f"of the {len(result.seen_genes)} genes seen in training ({seen}) and new combinations of them. "
                "Type perturbations and click “Predict”.",
                "ok",
            )
        else:
            self.progress.bar_style = "warning"
            self.status_html.value = html.escape(f"{result.status} after {_n(n_steps, 'step')}")
            self.show_message(
                f"Training {result.status} after {_n(n_steps, 'step')}; the partly trained model is kept "
                "(Predict and Save work; click “Train response model” to train again).",
                "warning",
            )

    @guarded
    def stop(self) -> None:
        """Stop the response-model training at the end of the current step."""
        if not self.running or self.phase not in ("training", "stopping"):
            raise ConfigError("Nothing to stop: no response model is training.")
        self._stop.set()
        self.phase = "stopping"
        self.stop_button.disabled = True
        self.show_message("Stopping at the end of this step…", "info")

    @guarded
    def load_response(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Load a response model saved with :meth:`save_response` (:func:`cellkit.load_perturbation_model`).

        Returns
        -------
        The :class:`cellkit.PerturbationModel` (``None`` on error).
        """
        from cellkit.perturbation import load_perturbation_model

        self._check_idle()
        text = str(self.model_path.value if path is None else path).strip()
        if not text:
            raise ConfigError("Enter the directory of a saved response model.")
        where = Path(text).expanduser()
        if not where.exists():
            raise DataError(f"{where} does not exist; enter the directory written by “Save response model”.")
        result = load_perturbation_model(where)
        self.response_model = result
        self.prediction = self.response_table = self.evaluation = None
        self.model_path.value = str(where)
        steps = [r.get("step") for r in result.history.step_records]
        loss = [_plain(r.get("loss")) for r in result.history.step_records]
        with self.loss_fig.batch_update():
            self.loss_fig.data[0].x, self.loss_fig.data[0].y = tuple(steps), tuple(loss)
            self.loss_fig.data[1].x, self.loss_fig.data[1].y = (), ()
        self.status_html.value = html.escape(
            f"loaded · {len(result.genes)} genes · {len(result.seen_genes)} perturbable genes"
        )
        self._set_phase("idle")
        self.show_message(
            f"Loaded the response model from {where}: {len(result.genes)} genes, {len(result.seen_genes)} "
            f"perturbable genes ({', '.join(result.seen_genes[:8])}{' …' if len(result.seen_genes) > 8 else ''}).",
            "ok",
        )
        return result

    @guarded
    def save_response(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Save the response model to a directory (:meth:`cellkit.PerturbationModel.save`).

        A directory that exists, is not empty and does not hold a saved response model is refused.

        Returns
        -------
        The directory written (``None`` on error).
        """
        from cellkit.perturbation import META_FILE

        if self.response_model is None:
            raise ConfigError("No response model to save: train or load one first.")
        self._check_idle()
        text = str(self.model_path.value if path is None else path).strip()
        if not text:
            raise ConfigError("Enter the directory to save the response model to.")
        where = Path(text).expanduser()
        if where.exists():
            if not where.is_dir():
                raise DataError(f"{where} is a file; choose a directory path for the response model.")
            if any(where.iterdir()) and not (where / META_FILE).is_file():
                raise DataError(
                    f"{where} is not empty and holds no saved response model; choose a new or empty directory."
                )
        written = Path(self.response_model.save(where))
        self.model_path.value = str(written)
        self.show_message(
            f"Saved the response model to {written}. Load it later with “Load response model” or "
            f"cellkit.load_perturbation_model({str(written)!r}).",
            "ok",
        )
        return written

    # ------------------------------------------------------------------------------- prediction
    @guarded
    def predict(
        self, perturbations: str | Sequence[str] | None = None, *, background: bool = False
    ) -> pd.DataFrame | None:
        """Predict the mean expression after each perturbation with the response model.

        Parameters
        ----------
        perturbations
            Condition labels (``"A+B"``, ``"A+ctrl"``), a list or one string
            (``"G0001+G0002, G0003+ctrl"``); default the perturbations box.
        background
            Run in a background thread (the button does).

        Returns
        -------
        :attr:`prediction`, genes × perturbations (``None`` in the background or on error).
        """
        from cellkit.perturbation import parse_condition

        self._check_idle()
        result = self.response_model
        if result is None:
            raise ConfigError("No response model: click “Train response model” or load a saved one first.")
        if perturbations is None:
            labels = _split_conditions(self.perturbations.value)
        elif isinstance(perturbations, str):
            labels = _split_conditions(perturbations)
        else:
            labels = list(dict.fromkeys(str(p).strip() for p in perturbations if str(p).strip()))
        if not labels:
            raise ConfigError("Type at least one perturbation, e.g. ‘G0001+ctrl’ or ‘G0001+G0002’.")
        parsed = {lab: parse_condition(lab, control=result.control) for lab in labels}
        known, seen = set(result.genes), set(result.seen_genes)
        missing = list(dict.fromkeys(g for gs in parsed.values() for g in gs if g not in known))
        if missing:
            raise unknown_gene_error(missing, result.genes, where=f"the response model's {len(result.genes)} genes")
        unseen = list(dict.fromkeys(g for gs in parsed.values() for g in gs if g not in seen))
        if unseen:
            raise DataError(
                f"Gene(s) {unseen[:10]} were never perturbed in training, so the model has learned no effect for "
                f"them. Perturbations of the {len(seen)} seen genes ({', '.join(result.seen_genes[:10])}"
                f"{' …' if len(seen) > 10 else ''}) and new combinations of them are supported."
            )
        top_k = int(self.top_k.value)
        self.show_message(f"Predicting {_n(len(labels), 'perturbation')}…", "info")

        def compute() -> dict[str, Any]:
            pred = result.predict(labels)
            return {"prediction": pred, **self._compare_with_observed(result, pred, parsed)}

        def done(out: dict[str, Any]) -> None:
            self._show_prediction(out, top_k)

        if background:
            self._in_background(compute, name="predict-response", phase="predicting", on_done=done)
            return None
        done(compute())
        return self.prediction

    def _compare_with_observed(
        self, result: Any, pred: pd.DataFrame, parsed: dict[str, tuple[str, ...]]
    ) -> dict[str, Any]:
        """Changes vs control, and the observed changes / Pearson delta where the data have the cells."""
        import cellkit
        from cellkit.perturbation import parse_condition

        control_mean = pd.Series(
            np.asarray(result.control_cells, dtype=np.float64).mean(axis=0), index=pd.Index(result.genes)
        )
        observed: dict[str, pd.Series] = {}
        evaluation, note = None, ""
        adata = self.state.adata
        key = result.condition_key
        if adata is not None and key not in adata.obs.columns and self.condition_key.value:
            key = self.condition_key.value
        if adata is not None and key in adata.obs.columns:
            try:
                labels = adata.obs[key].astype(str).to_numpy()
                by_genes: dict[frozenset[str], str] = {}
                for lab in dict.fromkeys(labels.tolist()):
                    try:
                        gs = parse_condition(lab, control=result.control)
                    except DataError:
                        continue
                    if gs:
                        by_genes.setdefault(frozenset(gs), lab)
                ctrl_rows = np.flatnonzero(labels == result.control)
                matched = {
                    p: by_genes[frozenset(gs)] for p, gs in parsed.items() if gs and frozenset(gs) in by_genes
                }
                genes = [g for g in result.genes if g in adata.var_names]
                if matched and len(ctrl_rows) and genes:
                    x = adata.X[:, adata.var_names.get_indexer(genes)]
                    ctrl = _rows_mean(x, ctrl_rows)
                    for p, lab in matched.items():
                        delta = _rows_mean(x, np.flatnonzero(labels == lab)) - ctrl
                        observed[p] = pd.Series(delta, index=pd.Index(genes))
                    evaluation = cellkit.evaluate_perturbation(
                        adata, pred[list(matched)], condition_key=key, control=result.control
                    )
            except CellkitError as exc:
                observed, evaluation = {}, None
                note = f"Observed changes not computed: {exc}"
        return {"control_mean": control_mean, "observed": observed, "evaluation": evaluation, "note": note}

    def _show_prediction(self, out: dict[str, Any], top_k: int) -> None:
        pred: pd.DataFrame = out["prediction"]
        control_mean: pd.Series = out["control_mean"]
        observed: dict[str, pd.Series] = out["observed"]
        evaluation = out["evaluation"]
        labels = [str(c) for c in pred.columns]
        genes = [str(g) for g in pred.index]
        frames = []
        for p in labels:
            f = pd.DataFrame(
                {
                    "perturbation": p,
                    "gene": genes,
                    "control_mean": control_mean.reindex(genes).to_numpy(dtype=np.float64),
                    "predicted_mean": pred[p].to_numpy(dtype=np.float64),
                }
            )
            f["predicted_change"] = f["predicted_mean"] - f["control_mean"]
            obs = observed.get(p)
            f["observed_change"] = (
                obs.reindex(genes).to_numpy(dtype=np.float64) if obs is not None else np.nan
            )
            order = np.argsort(-np.abs(f["predicted_change"].to_numpy()), kind="stable")
            frames.append(f.iloc[order])
        table = pd.concat(frames, ignore_index=True)
        self.prediction, self.response_table, self.evaluation = pred, table, evaluation

        # genes shown: the top-k by the largest |predicted change| over the perturbations
        change = table.pivot(index="gene", columns="perturbation", values="predicted_change")
        strength = change.abs().max(axis=1).sort_values(ascending=False, kind="stable")
        shown = [str(g) for g in strength.index[: max(1, top_k)]]
        traces: list[Any] = []
        for p in labels:
            traces.append(go.Bar(x=shown, y=[_plain(v) for v in change.loc[shown, p]], name=p))
        for p in labels:
            obs = observed.get(p)
            if obs is not None:
                traces.append(
                    go.Scatter(
                        x=shown,
                        y=[_plain(v) for v in obs.reindex(shown)],
                        mode="markers",
                        marker=dict(symbol="diamond", size=9, line=dict(width=1, color="black")),
                        name=f"{p} observed",
                    )
                )
        self.response_fig.data = ()
        self.response_fig.add_traces(traces)
        self.response_fig.layout.title = f"Predicted expression change (top {len(shown)} genes)"

        top = table.groupby("perturbation", sort=False).head(top_k)
        body = "<b>Top predicted changes</b>" + html_table(top, max_rows=max(50, top_k * len(labels)))
        if evaluation is not None:
            body = "<b>Against the observed cells</b>" + html_table(evaluation) + body
        self.response_html.value = body
        parts = [
            f"Predicted {_n(len(labels), 'perturbation')} (mean over "
            f"{_n(len(self.response_model.control_cells), 'control cell')})"
        ]
        if evaluation is not None:
            scores = ", ".join(
                f"{p}: Pearson delta {evaluation.loc[p, 'pearson_delta']:.3f}"
                for p in evaluation.index
                if p != "mean"
            )
            parts.append(f"observed cells in the data for {scores}")
        missing = [p for p in labels if p not in observed]
        if missing and self.state.adata is not None:
            parts.append(f"no observed cells for {', '.join(missing[:5])}")
        text = "; ".join(parts) + "."
        if out["note"]:
            text += " " + out["note"]
        self.show_message(text, "warning" if out["note"] else "ok")
