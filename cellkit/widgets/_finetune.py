"""The Fine-tune panel: train a cell-type classifier with live curves, then use, save or apply it.

The panel calls :func:`cellkit.finetune` in a background thread (on a copy of the studio's model,
with resumable checkpoints in a temporary directory per run); the shared live view
(:class:`~cellkit.widgets._live.LiveTraining`) listens to its training :class:`~cellkit.train.Event`\\ s:
losses per step and validation metrics per epoch stream into two plotly ``FigureWidget``\\ s, a
progress bar and a status line. **Stop** ends the run at the next step with a checkpoint;
**Resume** goes on from it with the same settings. Settings are checked by
:func:`cellkit.tasks.check_finetune_options` before the thread starts, so a bad one answers at
once with the API's own message.

At the end the panel shows the held-out accuracy / macro-F1 beside those of the run's logistic
regression baseline (``FinetuneResult.baseline_metrics``: same split, the model's input tokens), the confusion matrix
(:func:`cellkit.viz.confusion_matrix`) and the per-class scores, and sets
``state.finetune_result``. The trained model is never pushed into the studio on its own: the
user clicks "Use trained model", "Save model" or "Write predictions" (:func:`cellkit.predict`).
These act on the last *completed* run (``completed_result``): a later start that fails, or a run
stopped midway, never takes it away.

Cells: the studio's active selection, else every cell — chosen in the Data tab (or released with
the studio's "All cells" button); the panel shows which, and each run says how many it uses. The AnnData is passed as is and
:func:`cellkit.finetune` tokenizes it with the model's own conventions (``config.input``:
``use_raw``, ``normalize_total``, ``log1p`` — so the demo model needs no extra options); the
studio's ``state.tokens`` are reused instead when they hold exactly those cells and carry the label
(and batch) column. "Max genes / cell" sets the ``max_length`` tokenize option (CPU runs on long
cells are slow).

Throttling and thread safety of the live view: see :class:`~cellkit.widgets._live.LiveTraining`.
"""

from __future__ import annotations

import html
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cellkit import Cancelled, ConfigError, DataError

from ._base import Panel, guarded, html_table, labelled, plural
from ._live import DONE_STATUSES, LiveTraining, TrainsLive, seconds_text
from ._progress import JobProgress
from ._state import StudioState

__all__ = ["FinetunePanel", "objective_support"]

#: objectives offered, in display order (``cellkit.train.OBJECTIVES`` names)
OBJECTIVE_ORDER: tuple[str, ...] = (
    "cls",
    "gep",
    "mvc",
    "ecs",
    "dab",
    "zero_nll",
    "mvc_zero_nll",
    "cce",
    "mlm",
)
#: validation metrics plotted per epoch
VAL_METRICS: tuple[str, ...] = ("val/loss", "val/accuracy", "val/macro_f1")
#: epochs the panel proposes for the shipped demo model (its full recipe, ``DEMO_FINETUNE``, runs 40)
DEMO_PANEL_EPOCHS = 10
#: monitors offered for best-epoch selection / early stopping
MONITORS: tuple[str, ...] = ("val/loss", "val/macro_f1", "val/accuracy")
#: obs column name fragments that suggest cell-type labels (first match is preselected)
_LABEL_HINTS = ("cell_type", "celltype", "cell type", "label", "annotation", "type")
_NONE = ""


# ------------------------------------------------------------------------------------- helpers
def objective_support(model: Any) -> dict[str, str | None]:
    """Which objectives ``model`` can train, in display order: ``{name: None}`` when usable, else why not.

    The answer of :func:`cellkit.tasks.objective_support` (every objective is offered while there
    is no model).
    """
    if model is None:
        return dict.fromkeys(OBJECTIVE_ORDER)
    import cellkit.tasks

    support = cellkit.tasks.objective_support(model)
    return {name: support.get(name) for name in OBJECTIVE_ORDER}


def _default_weight(name: str) -> float:
    from cellkit.train import OBJECTIVES

    try:
        return float(OBJECTIVES[name]().weight)
    except Exception:  # pragma: no cover - an objective that needs arguments
        return 1.0


def _objective_label(name: str) -> str:
    """``"Masked expression (gep)"``: the objective's plain title, its API name in brackets."""
    from cellkit.train import OBJECTIVES

    title = OBJECTIVES[name].title
    return f"{title} ({name})" if title else name


def _describe(name: str) -> str:
    """Tooltip of an objective: its plain description, then the API name and the technical line."""
    from cellkit.train import OBJECTIVES

    cls = OBJECTIVES[name]
    doc = (cls.__doc__ or name).strip().splitlines()[0].replace("``", "")
    plain = cls.description
    return f"{plain[:1].upper()}{plain[1:]}. API name: {name!r} — {doc}" if plain else doc


def _label_columns(obs: pd.DataFrame) -> list[str]:
    """obs columns that can hold labels (anything but floats; all columns if that leaves none)."""
    cols = [str(c) for c in obs.columns if not pd.api.types.is_float_dtype(obs[c])]
    return cols or [str(c) for c in obs.columns]


def _guess_label(columns: list[str]) -> str | None:
    for hint in _LABEL_HINTS:
        for c in columns:
            if hint in c.lower():
                return c
    return columns[0] if columns else None


def _loss_columns(objectives: dict[str, float]) -> tuple[str, ...]:
    """The loss lines of a run: the total, plus one per objective when several are weighted."""
    if len(objectives) > 1 or any(w != 1.0 for w in objectives.values()):
        return ("loss", *(f"loss/{name}" for name in objectives))
    return ("loss",)


def _remove_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


class FinetunePanel(TrainsLive, Panel):
    """Fine-tune the studio's model for cell-type annotation, watching the loss live.

    Parameters
    ----------
    state
        The shared studio state (a fresh one when the panel is used alone).

    Attributes
    ----------
    label_key, batch_key
        obs column dropdowns (labels; optional batches for the ``dab`` objective).
    objective_boxes, objective_weights
        ``{name: Checkbox}`` and ``{name: FloatText}`` per objective (``cls`` ticked by default).
    epochs, lr, batch_size, val_size, test_size, seed, freeze_embeddings, freeze_layers, class_weight
        Training controls (see :func:`cellkit.finetune`).
    max_genes, patience, monitor
        Advanced: genes per cell kept by the tokenizer (``0``: all; the ``max_length`` tokenize option),
        early-stopping patience in epochs (``0``: off) and the monitored validation metric.
    live
        The live training view (:class:`~cellkit.widgets._live.LiveTraining`): curves, progress,
        status line and Stop; the names below are its parts.
    start_button, stop_button, resume_button
        "Start", "Stop", "Resume".
    progress, status_html
        Step progress bar and the status line (epoch, step, loss, elapsed, ETA).
    loss_fig, val_fig
        Live ``FigureWidget``\\ s (CSS classes ``cellkit-loss-plot`` and ``cellkit-val-plot``): one
        line per loss term against the step (and ``val/loss`` at each validation); ``val/loss``,
        ``val/accuracy``, ``val/macro_f1`` per epoch.
    confusion_fig
        The held-out confusion matrix (CSS class ``cellkit-confusion``) after a completed run.
    use_button, save_path, overwrite, save_button, key_added, predict_button
        What to do with the trained model.
    result
        The last run's :class:`cellkit.FinetuneResult` (any status; ``None`` while a run goes
        on or after it failed).
    completed_result
        The last completed (or early-stopped) run's result: what "Use trained model", "Save model"
        and "Write predictions" use, and ``state.finetune_result``. A later run that fails, or
        is stopped, never discards it.
    run_cells
        How many cells the last started run uses (``0`` before any); ``run_html`` says which.
    runs_started
        How many runs this panel has started (``run_html`` numbers them: "Run 2: …").
    phase
        ``"idle"``, ``"running"``, ``"stopping"``, ``"stopped"`` (resumable), ``"done"`` or ``"failed"``.
    extra_callbacks
        More callbacks handed to :func:`cellkit.finetune` (after the panel's own).
    update_interval
        Seconds between two live-plot pushes (epoch ends and the finish always push).

    Examples
    --------
    >>> panel = FinetunePanel(StudioState(adata=adata, model=model))  # doctest: +SKIP
    >>> panel.epochs.value = 3; panel.start(); panel.wait()  # doctest: +SKIP
    >>> panel.result.metrics["macro_f1"]  # doctest: +SKIP
    """

    title = "Fine-tune"

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-finetune-panel")
        self.extra_callbacks: list[Any] = []
        self.result: Any = None
        self.completed_result: Any = None
        self.run_cells = 0
        self.runs_started = 0
        self.phase = "idle"
        self._run: dict[str, Any] | None = None
        self._completed_run: dict[str, Any] | None = None  # the settings of completed_result
        self._t_launch = 0.0

        # -- data and cells
        self.label_key = widgets.Dropdown(options=[], layout=widgets.Layout(width="240px"))
        self.batch_key = widgets.Dropdown(
            options=[("(none)", _NONE)], value=_NONE, layout=widgets.Layout(width="240px")
        )
        self.label_key.add_class("cellkit-finetune-label")
        self.label_note = widgets.HTML()  # the obs columns not offered as labels, and why
        self.label_note.add_class("cellkit-label-note")
        self._label_error = self.error_line(
            "label_key",
            "Label column",
            fix="Choose another label column, or other cells in the Data tab.",
        )
        self._batch_error = self.error_line("batch_key", "Batch column")
        for part, label in (("val_size", "Validation fraction"), ("test_size", "Test fraction")):
            self.describe_option(
                part, label, fix=f"Raise the {label.lower()}, or choose a label column with fewer classes."
            )
        self.option_words.update(
            {
                "class_weight": "Class weight",
                "freeze_layers": "Freeze first N layers",
                "cells": "the cells chosen in the Data tab",
                "tokenize_options": "Max genes / cell",
            }
        )
        self.cells_html = widgets.HTML()
        self.cells_html.add_class("cellkit-finetune-cells")
        self.run_html = widgets.HTML()
        self.run_html.add_class("cellkit-finetune-run")

        # -- objectives
        self.objective_boxes: dict[str, widgets.Checkbox] = {}
        self.objective_weights: dict[str, widgets.FloatText] = {}
        cells = []
        for name in OBJECTIVE_ORDER:
            box = widgets.Checkbox(
                value=name == "cls",
                description=_objective_label(name),
                indent=False,
                tooltip=_describe(name),
                layout=widgets.Layout(width="360px"),
            )
            weight = widgets.FloatText(
                value=_default_weight(name), step=0.1, layout=widgets.Layout(width="70px")
            )
            self.objective_boxes[name] = box
            self.objective_weights[name] = weight
            cells.append(widgets.HBox([box, weight]))
        objectives = widgets.GridBox(
            cells, layout=widgets.Layout(grid_template_columns="repeat(2, 440px)", grid_gap="2px 12px")
        )

        # -- training settings
        small = widgets.Layout(width="100px")
        self.epochs = widgets.IntText(value=5, layout=small)
        self.lr = widgets.FloatText(value=1e-4, step=1e-5, layout=small)
        self.batch_size = widgets.IntText(value=32, layout=small)
        self.val_size = widgets.FloatText(value=0.1, step=0.05, layout=small)
        self.test_size = widgets.FloatText(value=0.1, step=0.05, layout=small)
        self.seed = widgets.IntText(value=0, layout=small)
        self.freeze_embeddings = widgets.Checkbox(value=False, description="freeze embeddings", indent=False)
        self.freeze_layers = widgets.IntText(value=0, layout=small)
        self.class_weight = widgets.Dropdown(options=["none", "balanced"], value="none", layout=small)
        self.max_genes = widgets.IntText(
            value=0, layout=small, tooltip="tokenize option max_length (0: every expressed gene)"
        )
        self.patience = widgets.IntText(value=0, layout=small)
        self.monitor = widgets.Dropdown(
            options=list(MONITORS), value="val/loss", layout=widgets.Layout(width="140px")
        )
        advanced = widgets.VBox(
            [
                labelled("Max genes / cell", self.max_genes, "150px"),
                labelled("Early-stop patience", self.patience, "150px"),
                labelled("Monitor", self.monitor, "150px"),
            ]
        )
        self.advanced = widgets.Accordion(children=[advanced])
        self.advanced.set_title(0, "Advanced (0 = off)")
        self.advanced.selected_index = None

        # -- run controls
        self.start_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Start",
            button_style="primary",
            icon="play",
        )
        self.resume_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Resume", icon="forward", disabled=True
        )
        self.start_button.add_class("cellkit-finetune-start")
        self.resume_button.add_class("cellkit-finetune-resume")

        # -- the live view: curves, progress, status, Stop
        self.live = LiveTraining(
            losses=("loss",),
            val_losses=(),
            epoch_metrics=VAL_METRICS,
            css_prefix="cellkit-finetune",
            loss_class="cellkit-loss-plot",
            epoch_class="cellkit-val-plot",
            buttons=(self.start_button,),
            buttons_after=(self.resume_button,),
            on_stop=self.stop,
        )
        self.stop_button = self.live.stop_button
        self.progress = self.live.progress
        self.status_html = self.live.status_html
        self.loss_fig = self.live.loss_fig
        self.val_fig = self.live.epoch_fig

        # -- results and the trained model
        self.summary_html = widgets.HTML()
        self.summary_html.add_class("cellkit-finetune-summary")
        self.confusion_fig: go.FigureWidget | None = None
        self.confusion_box = widgets.Box()
        self.report_html = widgets.HTML()
        self.report_html.add_class("cellkit-finetune-report")
        self.use_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Use trained model",
            icon="check",
            disabled=True,
            tooltip="make the fine-tuned model the studio's model",
        )
        self.save_path = widgets.Text(
            placeholder="directory to save the fine-tuned model", layout=widgets.Layout(width="320px")
        )
        self.overwrite = widgets.Checkbox(value=False, description="overwrite", indent=False)
        self.save_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Save model", icon="save", disabled=True
        )
        self.key_added = widgets.Text(
            value="cellkit_pred",
            layout=widgets.Layout(width="200px"),
            tooltip="the obs column the predicted labels go to (key_added= of cellkit.predict)",
        )
        self.predict_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Write predictions",
            icon="pencil",
            disabled=True,
            tooltip="cellkit.predict(adata, model, key_added=...) on every cell",
        )

        # the job row of "Write predictions" (bar, estimate, Cancel)
        self.jobs = JobProgress(css_prefix="cellkit-finetune-job")

        self.start_button.on_click(lambda _b: self.start())
        self.resume_button.on_click(lambda _b: self.resume())
        self.use_button.on_click(lambda _b: self.use_trained_model())
        self.save_button.on_click(lambda _b: self.save())
        self.predict_button.on_click(lambda _b: self.write_predictions())

        settings = widgets.HBox(
            [
                widgets.VBox(
                    [
                        labelled("Epochs", self.epochs),
                        labelled("Learning rate", self.lr),
                        labelled("Batch size", self.batch_size),
                        labelled("Seed", self.seed),
                    ]
                ),
                widgets.VBox(
                    [
                        labelled("Validation fraction", self.val_size),
                        labelled("Test fraction", self.test_size),
                        labelled("Class weight", self.class_weight),
                    ]
                ),
                widgets.VBox(
                    [
                        self.freeze_embeddings,
                        labelled("Freeze first N layers", self.freeze_layers, "150px"),
                        self.advanced,
                    ]
                ),
            ]
        )
        self.children = [
            self.message,
            widgets.HBox(
                [labelled("Label column", self.label_key), labelled("Batch column", self.batch_key)]
            ),
            self._label_error,
            self._batch_error,
            self.label_note,
            self.cells_html,
            widgets.HTML("<b>Objectives</b> (weight)"),
            objectives,
            settings,
            self.run_html,
            self.live,
            self.summary_html,
            widgets.HBox([self.confusion_box, self.report_html]),
            widgets.HBox([self.use_button]),
            widgets.HBox([labelled("Save to", self.save_path), self.overwrite, self.save_button]),
            widgets.HBox([labelled("Predictions column", self.key_added, "150px"), self.predict_button]),
            self.jobs,
        ]
        self.state.observe(self._on_data, names="adata")
        self.state.observe(self._on_model, names="model")
        self.state.observe(self._on_cells, names=["active_selection", "selections", "tokens"])
        for control in (self.label_key, self.batch_key, self.max_genes):  # they decide if the tokens serve
            control.observe(self._refresh_cells, names="value")
        self.state.observe(self._on_data, names="obs_version")
        for part in (self.val_size, self.test_size):  # the split decides the smallest usable class
            part.observe(lambda _c: self._refresh_labels(), names="value")
        self.refresh()
        self._apply_demo_recipe()

    # ------------------------------------------------------------------ state → controls
    def _on_data(self, _change: Any = None) -> None:
        self.refresh()

    def _on_model(self, _change: Any = None) -> None:
        self._refresh_objectives()
        self._apply_demo_recipe()

    def _apply_demo_recipe(self) -> None:
        """With the shipped demo model, start the controls from its recipe (``DEMO_FINETUNE``).

        Learning rate, batch size, class weights, frozen embeddings and the monitored metric come
        from :data:`cellkit.datasets.DEMO_FINETUNE`; epochs are :data:`DEMO_PANEL_EPOCHS` (the full
        recipe runs 40, minutes on a CPU). Other models keep the generic defaults.
        """
        if not self.state.has_demo_model():
            return
        from cellkit.datasets import DEMO_FINETUNE as recipe

        self.epochs.value = DEMO_PANEL_EPOCHS
        self.lr.value = float(recipe["lr"])
        self.batch_size.value = int(recipe["batch_size"])
        self.class_weight.value = recipe["class_weight"] or "none"
        self.freeze_embeddings.value = bool(recipe["freeze_embeddings"])
        if recipe["monitor"] in MONITORS:
            self.monitor.value = recipe["monitor"]

    def _on_cells(self, _change: Any = None) -> None:
        self._refresh_cells()

    def _refresh_labels(self) -> None:
        """Offer the obs columns :func:`cellkit.tasks.label_columns` accepts; say why the others are not."""
        import cellkit.tasks

        adata = self.state.adata
        if adata is None:
            verdicts: dict[str, str | None] = {}
        else:
            parts = 1 + (self.val_size.value > 0) + (self.test_size.value > 0)
            # judged on all cells: a new cell choice never switches the label column silently
            verdicts = cellkit.tasks.label_columns(adata, min_class_size=parts)
        cols = [c for c, why in verdicts.items() if why is None]
        old = self.label_key.value
        self.label_key.options = cols
        self.label_key.value = old if old in cols else _guess_label(cols)
        by_reason: dict[str, list[str]] = {}
        for c, why in verdicts.items():
            if why is not None:
                by_reason.setdefault(why, []).append(c)
        self.label_note.value = (
            "<div style='color:#555;font-size:12px'>Not offered as labels: "
            + "; ".join(
                f"<b>{html.escape(', '.join(names))}</b> ({html.escape(why)})"
                for why, names in by_reason.items()
            )
            + ".</div>"
            if by_reason
            else ""
        )

    def refresh(self) -> None:
        """Re-read the state: obs columns for the dropdowns, the cells used, the model's objectives."""
        adata = self.state.adata
        cols = _label_columns(adata.obs) if adata is not None else []
        self._refresh_labels()
        old_b = self.batch_key.value
        self.batch_key.options = [("(none)", _NONE), *[(c, c) for c in cols]]
        self.batch_key.value = old_b if old_b in cols else _NONE
        self._refresh_cells()
        self._refresh_objectives()
        self._set_phase(self.phase)

    def _refresh_cells(self, _change: Any = None) -> None:
        note = self.state.cells_note()
        adata = self.state.adata
        if adata is not None:
            note += " (the Data tab chooses them)."
            if self.state.tokens is not None:  # the header counts the Data tab's tokens: say if they serve
                try:
                    _, _, source = self._data_for(adata, self.settings())
                except Exception:  # a stale selection: the cells note says so
                    source = ""
                if source == "the AnnData":
                    note += (
                        " The run tokenizes them itself: the Data tab's tokens hold other cells, lack the"
                        " label column, or Max genes / cell is set."
                    )
                elif source:
                    note += " The run uses the Data tab's tokens."
        self.cells_html.value = note

    def _refresh_objectives(self) -> None:
        model = self.state.model
        support = objective_support(model)
        for name, box in self.objective_boxes.items():
            reason = support[name]
            box.disabled = reason is not None
            if reason is not None:
                box.value = False
            box.tooltip = _describe(name) + (f" — unavailable: {reason}" if reason else "")
        if model is not None:
            n = int(model.config.encoder.n_layers)
            self.freeze_layers.tooltip = f"0 … {n} (this model has {n} layers)"

    def _set_phase(self, phase: str) -> None:
        """Enable / disable the buttons for ``phase``."""
        self.phase = phase
        busy = phase in ("running", "stopping")
        self.start_button.disabled = busy
        self.resume_button.disabled = phase != "stopped"
        done = (not busy) and self._completed() is not None
        for b in (self.use_button, self.save_button, self.predict_button):
            b.disabled = not done

    def _completed(self) -> Any:
        return self.completed_result

    # ------------------------------------------------------------------ settings
    def _cells(self) -> np.ndarray | None:
        return self.state.selected_cells()

    def settings(self) -> dict[str, Any]:
        """The :func:`cellkit.finetune` keyword arguments the controls give (``cells``: the active selection).

        Returns
        -------
        ``label_key``, ``batch_key``, ``cells`` (obs names or ``None`` for all), ``objectives``
        (``{name: weight}``), ``epochs``, ``lr``, ``batch_size``, ``val_size``, ``test_size``,
        ``seed``, ``class_weight``, ``freeze_embeddings``, ``freeze_layers``, ``monitor``, and
        ``tokenize_options`` / ``early_stopping_patience`` when set.
        """
        objectives = {
            name: float(self.objective_weights[name].value)
            for name, box in self.objective_boxes.items()
            if box.value and not box.disabled
        }
        out: dict[str, Any] = {
            "label_key": self.label_key.value,
            "batch_key": self.batch_key.value or None,
            "cells": self._cells() if self.state.adata is not None else None,
            "objectives": objectives,
            "epochs": int(self.epochs.value),
            "lr": float(self.lr.value),
            "batch_size": int(self.batch_size.value),
            "val_size": float(self.val_size.value),
            "test_size": float(self.test_size.value),
            "seed": int(self.seed.value),
            "class_weight": None if self.class_weight.value == "none" else self.class_weight.value,
            "freeze_embeddings": bool(self.freeze_embeddings.value),
            "freeze_layers": int(self.freeze_layers.value),
            "monitor": self.monitor.value,
        }
        if int(self.max_genes.value) != 0:
            out["tokenize_options"] = {"max_length": int(self.max_genes.value)}  # every scheme's option
        if int(self.patience.value) != 0:
            out["early_stopping_patience"] = int(self.patience.value)
        return out

    def _data_for(self, adata: Any, kw: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
        """The studio's tokens when they fit this run (same cells, labels carried), else the AnnData."""
        import cellkit

        tokens = self.state.tokens
        if (
            isinstance(tokens, cellkit.TokenizedCells)
            and "tokenize_options" not in kw
            and tokens.obs is not None
            and tokens.obs_names is not None
        ):
            need = [c for c in (kw["label_key"], kw["batch_key"]) if c]
            names = np.asarray(tokens.obs_names).astype(str)
            target = kw["cells"] if kw["cells"] is not None else np.asarray(adata.obs_names).astype(str)
            if (
                all(c in tokens.obs.columns for c in need)
                and len(names) == len(target)
                and set(names) == set(np.asarray(target).astype(str))
                and all(c in adata.obs.columns for c in need)
                and all(
                    np.array_equal(
                        tokens.obs[c].astype(str).to_numpy(),
                        adata.obs[c].reindex(names).astype(str).to_numpy(),
                    )
                    for c in need
                )
            ):
                return tokens, {**kw, "cells": None}, "the studio's tokens"
        return adata, kw, "the AnnData"

    # ------------------------------------------------------------------ actions
    @guarded
    def start(self) -> threading.Thread | None:
        """Start a new fine-tune of the studio's model with the controls' settings (background thread).

        Returns
        -------
        The training thread (``panel.wait()`` joins it), or ``None`` on a bad setting (see the message).
        """
        import cellkit.tasks

        if self.running:
            raise ConfigError("A job of this panel is still running; stop it or wait for it first.")
        model, adata = self.state.model, self.state.adata
        if model is None:
            raise ConfigError("No model: load one in the Model panel first (or the demo model).")
        if adata is None:
            raise DataError("No data: pick an AnnData in the Data panel first.")
        kw = self.settings()
        cellkit.tasks.check_finetune_options(adata, model, **kw)  # a bad setting answers now
        data, kw, source = self._data_for(adata, kw)
        if data is not adata:
            n_cells = len(data)
        elif kw["cells"] is not None:
            n_cells = len(kw["cells"])
        else:
            n_cells = int(adata.n_obs)
        self._drop_checkpoints()
        ckpt = tempfile.mkdtemp(prefix="cellkit-finetune-")
        weakref.finalize(self, _remove_dir, ckpt)
        self._run = {"data": data, "model": model, "kwargs": kw, "checkpoint_dir": ckpt}
        self.result = None  # the last completed run (completed_result) stays usable
        name = self.state.active_selection
        where = f"selection “{name}”" if name else "all cells"
        self.run_cells = n_cells
        self.runs_started += 1
        self.run_html.value = (
            f"<span class='cellkit-run-number' data-run='{self.runs_started}'>Run {self.runs_started}</span>: "
            f"<span class='cellkit-run-cells' data-cells='{n_cells}'><b>{n_cells:,}</b> cells</span> "
            f"({html.escape(where)}, from {html.escape(source)})"
        )
        if self.completed_result is not None:
            self._show_summary(self.completed_result, "Last completed run (kept until this one completes)")
        return self._launch(resume=False, what=f"Fine-tuning on {n_cells:,} cells ({where}, from {source})")

    @guarded
    def stop(self) -> None:
        """Ask the run to stop at the end of the current step (a resumable checkpoint is written)."""
        if not self.running or self.phase not in ("running", "stopping"):
            raise ConfigError("Nothing to stop: no fine-tune is running.")
        self.live.request_stop()
        self._set_phase("stopping")
        self.show_message("Stopping at the end of this step…", "info")

    @guarded
    def resume(self) -> threading.Thread | None:
        """Go on with a stopped run from its checkpoint, with the same data, model and settings."""
        if self.running:
            raise ConfigError("A job of this panel is still running; wait for it first.")
        if self._run is None or self.phase != "stopped":
            raise ConfigError(
                "Nothing to resume: Resume continues a run ended with “Stop”. Click “Start” instead."
            )
        return self._launch(resume=True, what="Resuming the stopped run")

    @guarded
    def use_trained_model(self) -> Any:
        """Make the fine-tuned model the studio's model (``state.set_model(..., source="fine-tuned")``)."""
        result = self._need_result()
        self.state.set_model(result.model, source="fine-tuned")
        self.show_message(
            f"The fine-tuned model ({len(result.classes)} classes) is now the studio's model; "
            "the other panels use it from now on.",
            "ok",
        )
        return result.model

    @guarded
    def save(self, path: str | Path | None = None, *, overwrite: bool | None = None) -> Path | None:
        """Save the fine-tuned model to the directory ``path`` (default: the path box).

        An existing non-empty directory is refused unless ``overwrite`` (default: the checkbox) is
        true; then the model's files in it are replaced.

        Returns
        -------
        The directory written (``None`` on error).
        """
        result = self._need_result()
        text = str(self.save_path.value if path is None else path).strip()
        if not text:
            raise ConfigError("Enter the directory to save the fine-tuned model to.")
        where = Path(text).expanduser()
        allow = bool(self.overwrite.value if overwrite is None else overwrite)
        if where.exists():
            if not where.is_dir():
                raise DataError(f"{where} is a file; choose a directory path for the model.")
            if any(where.iterdir()) and not allow:
                raise DataError(
                    f"{where} already exists and is not empty; tick “overwrite” to replace the model "
                    "files in it, or choose another directory."
                )
        written = Path(result.model.save(where))
        self.save_path.value = str(written)
        self.show_message(
            f"Saved the fine-tuned model to {written}. Load it later with cellkit.load_model({str(written)!r}).",
            "ok",
        )
        return written

    @guarded
    def write_predictions(self, key_added: str | None = None) -> threading.Thread | None:
        """Predict every cell of ``state.adata`` with the fine-tuned model (background thread).

        Writes ``obs[key_added]``, ``obs[key_added + "_confidence"]``,
        ``obsm[key_added + "_probabilities"]`` and ``uns[key_added]`` (see :func:`cellkit.predict`).
        While it runs :attr:`jobs` shows the progress (tokenizing, then predicting) and Cancel
        stops it before anything is written.

        Returns
        -------
        The background thread (``panel.wait()`` joins it), or ``None`` on a bad setting (see the message).
        """
        import cellkit

        result = self._need_result()
        adata = self.state.adata
        if adata is None:
            raise DataError("No data: pick an AnnData in the Data panel first.")
        if self.running:
            raise ConfigError("A job of this panel is still running; wait for it first.")
        key = str(self.key_added.value if key_added is None else key_added).strip()
        if not key:
            raise ConfigError(
                "Enter a name for the predictions column (e.g. 'cellkit_pred').", param="key_added"
            )
        run = self._completed_run or {}  # the settings the usable model was trained with
        label_key = run.get("kwargs", {}).get("label_key")
        if key == label_key:
            raise ConfigError(
                f"The predictions column {key!r} is the label column; choose another name.", param="key_added"
            )
        self.key_added.value = key
        replaced = [k for k in (key, f"{key}_confidence") if k in adata.obs.columns]
        opts = run.get("kwargs", {}).get("tokenize_options")
        model = result.model
        self.show_message(f"Predicting {adata.n_obs:,} cells…", "info")

        def compute(progress: Any) -> int:
            cellkit.predict(adata, model, key_added=key, tokenize_options=opts, progress=progress)
            return int(adata.n_obs)

        def done(n: int) -> None:
            keys = (
                f"obs[{key!r}] (label), obs['{key}_confidence'], obsm['{key}_probabilities'] and uns[{key!r}]"
            )
            extra = f" (replaced the existing {', '.join(repr(k) for k in replaced)})" if replaced else ""
            self.show_message(f"Wrote {keys} for {n:,} cells{extra}.", "ok")
            self.refresh()
            self.state.obs_changed()

        self.jobs.run(
            self,
            compute,
            name="Writing predictions",
            buttons=[self.predict_button, self.start_button, self.resume_button],
            on_done=done,
            background=True,
        )
        return self._job

    def _need_result(self) -> Any:
        result = self._completed()
        if result is None:
            raise ConfigError("No fine-tuned model yet: click “Start” and let the run complete.")
        return result

    # ------------------------------------------------------------------ the run
    def _launch(self, *, resume: bool, what: str) -> threading.Thread:
        import cellkit

        run = self._run
        assert run is not None
        kw = run["kwargs"]
        self._t_launch = time.time()
        self.live.reset(epochs=kw["epochs"], losses=_loss_columns(kw["objectives"]), keep=resume)
        self._set_phase("running")
        self.show_message(f"{what}…", "info")
        callbacks = [self.live.on_event, *self.extra_callbacks]

        def work() -> Any:
            try:
                return cellkit.finetune(
                    run["data"],
                    run["model"],
                    **run["kwargs"],
                    copy_model=True,
                    checkpoint_dir=run["checkpoint_dir"],
                    resume=resume,
                    stop_event=self.live.stop_event,
                    callbacks=callbacks,
                    progress=self.live.preparing(),  # the bar follows the tokenizing; Stop cancels it
                )
            except Cancelled as exc:  # Stop while the cells were tokenized: nothing trained
                self._cancelled(exc)
                return None
            except BaseException:
                self._failed()
                raise

        def done(result: Any) -> None:
            if result is not None:
                self._finish(result)

        try:
            return self.run_in_background(work, name="finetune", on_done=done)
        except BaseException:
            self._failed()
            raise

    def _failed(self) -> None:
        note = "the studio's model and state are unchanged"
        if self.completed_result is not None:
            note += "; the last completed fine-tune is still usable (Use / Save / Write predictions)"
            self._show_summary(self.completed_result, "Last completed run (still usable)")
        self.live.fail(note)
        _remove_dir((self._run or {}).get("checkpoint_dir"))
        self._set_phase("failed")

    def _cancelled(self, exc: Exception) -> None:
        """Stop was clicked before the training started (while the cells were tokenized)."""
        kept = (
            " The last completed fine-tune is still usable (Use / Save / Write predictions)."
            if self.completed_result is not None
            else ""
        )
        self.live.cancelled(str(exc))
        _remove_dir((self._run or {}).get("checkpoint_dir"))
        self._set_phase("idle")
        self.show_message(f"Stopped before training started: {exc} Click “Start” to begin again.{kept}", "warning")

    def _finish(self, result: Any) -> None:
        """Runs on the training thread after :func:`cellkit.finetune` returned."""
        self.result = result
        m = result.metrics
        n_epochs = len(result.history.epoch_records)
        n_steps = len(result.history.step_records)
        took = seconds_text(time.time() - self._t_launch)
        status = self.live.finish(result, note="checkpoint kept")
        if status in DONE_STATUSES:
            self.completed_result, self._completed_run = result, self._run
            self._set_phase("done")
            _remove_dir((self._run or {}).get("checkpoint_dir"))
            self._show_result(result)
            self.state.finetune_result = result
            word = "Completed" if result.status == "completed" else "Early stopped"
            if "accuracy" in m:
                held = int(result.report["support"].sum()) if len(result.report) else 0
                which = "" if (self._run or {}).get("kwargs", {}).get("test_size") else " (validation cells)"
                scores = (
                    f"held-out accuracy {m['accuracy']:.3f}, macro-F1 {m.get('macro_f1', float('nan')):.3f} "
                    f"on {held:,} cells{which}"
                )
                b = getattr(result, "baseline_metrics", None) or {}
                if b:
                    scores += (
                        f" (logistic regression on the same cells: accuracy {b['accuracy']:.3f}, "
                        f"macro-F1 {b.get('macro_f1', float('nan')):.3f})"
                    )
            else:
                scores = "no held-out cells (test and validation fractions are 0)"
            self.show_message(
                f"{word}: {plural(n_epochs, 'epoch')}, {plural(n_steps, 'step')} in {took}; {scores}. "
                "Click “Use trained model” to make it the studio's model, or save it / write predictions.",
                "ok",
            )
        else:
            self._set_phase("stopped")
            where = self.live.where()
            kept = (
                " The last completed fine-tune is still usable (Use / Save / Write predictions)."
                if self.completed_result is not None
                else ""
            )
            self.show_message(
                f"Stopped{where} ({plural(n_steps, 'step')} done). Click “Resume” to go on from the checkpoint, "
                f"or “Start” for a new run.{kept}",
                "warning",
            )

    def _show_summary(self, result: Any, heading: str = "Result") -> None:
        """The held-out metrics of the model and, in a second column, of its logistic regression baseline."""
        m = result.metrics
        b = getattr(result, "baseline_metrics", None) or {}
        keys = [k for k in ("accuracy", "macro_f1", "weighted_f1", "val/loss", "val/macro_f1") if k in m]

        def cell(source: dict[str, float], k: str, who: str) -> str:
            text = f"{source[k]:.3f}" if k in source else "–"
            return f"<td class='cellkit-{who}-score' data-metric='{html.escape(k)}'>{text}</td>"

        th = "<th style='text-align:left;padding-right:10px'>"
        head = f"<tr><th></th>{th}model</th>{th}logistic regression</th></tr>" if b else ""
        body = "".join(
            f"<tr>{th}{html.escape(k)}</th>{cell(m, k, 'model')}{cell(b, k, 'baseline') if b else ''}</tr>"
            for k in keys
        )
        note = ""
        if b:
            info = getattr(result, "baseline_settings", None) or {}
            used, avail = info.get("n_train_cells"), info.get("n_train_cells_available")
            count = ""
            if used is not None:
                count = f" ({used:,} of {avail:,}, a seeded subsample)" if avail and used < avail else f" ({used:,})"
            note = (
                "<div class='cellkit-baseline-note' style='color:#555;font-size:12px'>Logistic regression: "
                f"trained on the run's training cells{count} from the model's input tokens, scored on the same "
                "held-out cells.</div>"
            )
        self.summary_html.value = (
            f"<b>{html.escape(heading)}</b>: {html.escape(result.status)} · {len(result.classes)} classes · "
            f"{len(getattr(result, 'split', ())):,} cells<table class='cellkit-table'>{head}{body}</table>{note}"
        )

    def _show_result(self, result: Any) -> None:
        import cellkit.viz

        self._show_summary(result)
        self.confusion_box.children = ()
        self.confusion_fig = None
        self.report_html.value = ""
        if len(result.confusion):
            fig = go.FigureWidget(cellkit.viz.confusion_matrix(result.confusion, title="Held-out confusion"))
            fig.update_layout(margin=dict(b=120))
            fig.add_class("cellkit-confusion")
            self.confusion_fig = fig
            self.confusion_box.children = (fig,)
        if len(result.report):
            self.report_html.value = "<b>Per-class scores (held-out cells)</b>" + html_table(result.report)

    def _drop_checkpoints(self) -> None:
        _remove_dir((self._run or {}).get("checkpoint_dir"))
