"""The Response panel: train (or load) a perturbation-response model and predict perturbations.

Controls → :mod:`cellkit.perturbation` (on a GEARS-shaped AnnData in ``state.adata``:
``obs[condition]`` = ``"ctrl"``, ``"A+ctrl"``, ``"A+B"``; independent of the studio's model) →
:func:`cellkit.viz.perturbation_response`. Training runs in a background thread with a live loss
curve (**Stop** ends it at the next step); a saved model can be loaded instead. Predictions are
typed as condition labels; :meth:`cellkit.PerturbationModel.changes` gives the predicted change
of every gene (predicted mean − mean of the model's control cells) and, where the data hold cells
of that condition, the observed one; :func:`cellkit.evaluate_perturbation` gives the Pearson delta,
shown beside those of its baselines (the mean of the training perturbations, and for a combination
the sum of its genes' observed single effects).

Every action is a plain method (``train``, ``stop``, ``load``, ``save``, ``predict``, ``export``)
that tests call directly; the buttons call them.
"""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from cellkit import CellkitError, ConfigError, DataError

from ._base import guarded, html_table, labelled, plural
from ._jobs import JobPanel
from ._live import DONE_STATUSES, LiveTraining, TrainsLive
from ._state import StudioState

__all__ = ["PerturbationResponsePanel"]

_NONE = ""


def _split_conditions(text: str) -> list[str]:
    """Condition labels typed in a box: ``"A+B, C+ctrl"`` (spaces around ``+`` allowed)."""
    text = re.sub(r"\s*\+\s*", "+", str(text))
    return list(dict.fromkeys(p for p in re.split(r"[,;\s]+", text) if p))


#: baseline columns of :func:`cellkit.evaluate_perturbation` shown beside the model's Pearson delta
_BASELINES = (("baseline_pearson_delta", "mean baseline"), ("additive_pearson_delta", "additive baseline"))


def _scores_text(row: pd.Series) -> str:
    """``"A+B: Pearson delta 0.812 (mean baseline 0.503, additive baseline 0.700)"``; a baseline
    :func:`cellkit.evaluate_perturbation` left NaN (no training perturbation, no observed singles) is left out."""
    base = [f"{word} {row[col]:.3f}" for col, word in _BASELINES if col in row and pd.notna(row[col])]
    return f"{row.name}: Pearson delta {row['pearson_delta']:.3f}" + (f" ({', '.join(base)})" if base else "")


class PerturbationResponsePanel(TrainsLive, JobPanel):
    """Train, load, save and query a perturbation-response model (:func:`cellkit.fit_perturbation_model`).

    Parameters
    ----------
    state
        The shared :class:`StudioState` (a fresh one when the panel is used alone).

    Attributes
    ----------
    condition_key, control, epochs, lr, batch_size, max_genes, response_seed
        Training controls (``max_genes`` 0: every gene).
    train_button, stop_button, model_path, load_button, save_button
        "Train response model" (``cellkit-perturb-train``), "Stop" (``cellkit-perturb-stop``),
        the path box, "Load response model" (``cellkit-perturb-load``) and "Save response model"
        (``cellkit-perturb-save``).
    loss_fig
        Live loss per step (class ``cellkit-perturb-loss``; trace 0 ``loss``, trace 1 ``val/loss``
        at each epoch end).
    perturbations, top_k, predict_button, response_fig, response_html
        The perturbations box, genes shown, "Predict" (``cellkit-perturb-predict``),
        :func:`cellkit.viz.perturbation_response` (class ``cellkit-perturb-response``) and the tables.
    prediction_path, prediction_export_button
        "Export prediction (CSV)" (``cellkit-perturb-export-prediction``).
    response_model
        The current :class:`cellkit.PerturbationModel` (trained, stopped or loaded), or ``None``.
    prediction
        The last :meth:`cellkit.PerturbationModel.predict` frame (genes × perturbations).
    response_table
        :meth:`cellkit.PerturbationModel.changes` of the last prediction.
    evaluation
        :func:`cellkit.evaluate_perturbation` of the perturbations with observed cells (or ``None``).
    extra_callbacks
        More training callbacks (after the panel's own).
    update_interval
        Seconds between two live-plot pushes.

    Examples
    --------
    >>> panel = PerturbationResponsePanel(StudioState(adata=screen))  # doctest: +SKIP
    >>> panel.train(epochs=5)  # doctest: +SKIP
    >>> panel.predict("G0001+G0002")  # doctest: +SKIP
    """

    title = "Response"

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.add_class("cellkit-response-panel")
        self.response_model: Any = None
        self.prediction: pd.DataFrame | None = None
        self.response_table: pd.DataFrame | None = None
        self.evaluation: pd.DataFrame | None = None
        self.extra_callbacks: list[Any] = []
        small = widgets.Layout(width="100px")
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
            layout=widgets.Layout(width="max-content"),
            description="Train response model",
            button_style="primary",
            icon="play",
        )
        self.train_button.add_class("cellkit-perturb-train")
        self.model_path = widgets.Text(
            placeholder="directory of a saved response model", layout=widgets.Layout(width="320px")
        )
        self.load_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Load response model", icon="folder-open"
        )
        self.load_button.add_class("cellkit-perturb-load")
        self.save_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Save response model",
            icon="save",
            disabled=True,
        )
        self.save_button.add_class("cellkit-perturb-save")
        self.perturbations = widgets.Text(
            placeholder="e.g. G0001+G0002, G0003+ctrl", layout=widgets.Layout(width="420px")
        )
        self.perturbations.add_class("cellkit-perturb-conditions")
        self.top_k = widgets.BoundedIntText(value=20, min=1, max=10_000, layout=small)
        self.predict_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Predict", icon="magic", disabled=True
        )
        self.predict_button.add_class("cellkit-perturb-predict")
        self.response_fig = go.FigureWidget(
            layout={"title": "Predicted expression change", "height": 360, "width": 760}
        )
        self.response_fig.add_class("cellkit-perturb-response")
        # empty axes say nothing: the chart shows once there is a prediction
        self.response_box = widgets.Box([self.response_fig], layout=widgets.Layout(display="none"))
        self.response_html = widgets.HTML(
            "<i>Train or load a response model, then Predict: the predicted change per gene shows here.</i>"
        )
        self.response_html.add_class("cellkit-perturb-response-table")
        self.prediction_path = widgets.Text(
            placeholder="prediction.csv", layout=widgets.Layout(width="320px")
        )
        self.prediction_export_button = widgets.Button(
            layout=widgets.Layout(width="max-content"), description="Export prediction (CSV)", icon="save"
        )
        self.prediction_export_button.add_class("cellkit-perturb-export-prediction")
        # -- the live view: loss curve, progress, status, Stop (shared with the fine-tune panel)
        self.live = LiveTraining(
            losses=("loss",),
            val_losses=("val/loss",),
            title="Response-model training loss",
            y_title="MSE",
            css_prefix="cellkit-perturb",
            buttons=(self.train_button,),
            on_stop=self.stop,
            width=480,
            height=300,
        )
        self.live.status_html.value = "no response model"
        self.stop_button = self.live.stop_button
        self.progress = self.live.progress
        self.status_html = self.live.status_html
        self.loss_fig = self.live.loss_fig

        self.train_button.on_click(lambda _b: self.train(background=True))
        self.load_button.on_click(lambda _b: self.load())
        self.save_button.on_click(lambda _b: self.save())
        self.predict_button.on_click(lambda _b: self.predict(background=True))
        self.prediction_export_button.on_click(lambda _b: self.export())
        self.children = [
            self.message,
            widgets.HTML(
                "<b>Response prediction</b> (GEARS-style data: obs condition ‘ctrl’, ‘A+ctrl’, ‘A+B’)"
            ),
            widgets.HBox(
                [labelled("Condition column", self.condition_key), labelled("Control", self.control, "60px")]
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
            self.live,
            widgets.HBox([self.model_path, self.load_button, self.save_button]),
            widgets.HBox([labelled("Perturbations", self.perturbations, "95px")]),
            widgets.HBox([labelled("Top genes", self.top_k, "75px"), self.predict_button]),
            self.response_box,
            self.response_html,
            widgets.HBox([self.prediction_path, self.prediction_export_button]),
        ]
        self.state.observe(self._on_adata, names="adata")
        self.state.observe(self._on_obs_changed, names="obs_version")
        self._on_adata()
        self._set_phase("idle")

    # ============================================================================ state → controls
    def _update_buttons(self) -> None:
        busy, have = self.phase != "idle", self.response_model is not None
        self.train_button.disabled = busy
        self.load_button.disabled = busy
        self.stop_button.disabled = self.phase != "training"
        self.save_button.disabled = busy or not have
        self.predict_button.disabled = busy or not have

    def _columns(self) -> list[str]:
        obs = self.state.adata.obs
        return [
            str(c)
            for c in obs.columns
            if isinstance(obs[c].dtype, pd.CategoricalDtype) or obs[c].dtype == object
        ]

    def _on_adata(self, _change: Any = None) -> None:
        adata = self.state.adata
        cols = self._columns() if adata is not None else []
        old = self.condition_key.value
        self.condition_key.options = [("(choose a column)", _NONE), *[(c, c) for c in cols]]
        if old in cols:
            self.condition_key.value = old
        elif "condition" in cols:
            self.condition_key.value = "condition"
        else:  # a column holding the control label
            ctrl = str(self.control.value)
            hit = [c for c in cols if (adata.obs[c].astype(str) == ctrl).any()] if adata is not None else []
            self.condition_key.value = hit[0] if hit else _NONE

    def _on_obs_changed(self, _change: Any = None) -> None:
        if self.state.adata is None:
            return
        cols = self._columns()
        options = [("(choose a column)", _NONE), *[(c, c) for c in cols]]
        if list(self.condition_key.options) != options:
            current = self.condition_key.value
            self.condition_key.options = options
            self.condition_key.value = current if current in cols else _NONE

    # ============================================================================ training
    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
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
        for name in ("callbacks", "stop_event", "progress"):
            if name in kw:
                raise ConfigError(f"{name}= is set by the panel; leave it out.")
        return kw

    @guarded
    def train(self, background: bool = False, **overrides: Any) -> Any:
        """Train a perturbation-response model on ``state.adata`` (:func:`cellkit.fit_perturbation_model`).

        Parameters
        ----------
        background
            Train in a background thread (the button does; :meth:`wait` joins it, :meth:`stop`
            ends it at the next step).
        **overrides
            Any :func:`cellkit.fit_perturbation_model` keyword over the controls' values, e.g.
            ``epochs=1, val_size=0.1, architecture=cellkit.PerturbationArchitecture(d_model=16, n_heads=2)``.

        Returns
        -------
        The :class:`cellkit.PerturbationModel` (``None`` in the background or on error); also
        :attr:`response_model`.
        """
        import cellkit
        from cellkit.perturbation import check_conditions

        self._check_idle()
        adata = self.state.adata
        if adata is None:
            raise DataError(
                "No data loaded: pick a perturb-seq AnnData (GEARS layout) in the Data panel first."
            )
        kw = self._settings(overrides)
        if not kw["condition_key"]:
            raise DataError(
                "Choose the condition column (the obs column with GEARS labels such as ‘ctrl’, ‘A+ctrl’, ‘A+B’); "
                "this data has no ‘condition’ column."
            )
        counts = check_conditions(adata, condition_key=kw["condition_key"], control=kw["control"])
        n_ctrl = int(counts[kw["control"]])
        self.live.reset(epochs=kw["epochs"])
        self.show_message(
            f"Training a response model on {n_ctrl:,} control and {int(counts.sum()) - n_ctrl:,} perturbed cells "
            f"({kw['epochs']} epochs)…",
            "info",
        )
        t0 = time.time()
        callbacks = [self.live.on_event, *self.extra_callbacks]

        def compute() -> Any:
            return cellkit.fit_perturbation_model(
                adata, **kw, callbacks=callbacks, stop_event=self.live.stop_event, progress=False
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
        kept = self.response_model
        self.live.fail(
            f"the previous response model ({len(kept.genes)} genes) is kept: Save / Predict use it"
            if kept is not None
            else "no response model yet"
        )
        self._set_phase("idle")

    def _finish_training(self, result: Any, took: float) -> None:
        self.response_model = result
        self.prediction = self.response_table = self.evaluation = None
        n_steps = len(result.history.step_records)
        seen = ", ".join(result.seen_genes[:8]) + (" …" if len(result.seen_genes) > 8 else "")
        self._set_phase("idle")
        status = self.live.finish(result, note="the partly trained model is kept")
        if status in DONE_STATUSES:
            self.status_html.value = html.escape(
                f"{status} · {plural(n_steps, 'step')} · {len(result.genes)} genes · "
                f"{len(result.seen_genes)} perturbable genes"
            )
            self.show_message(
                f"Trained the response model: {plural(n_steps, 'step')} in {took:.1f} s; it can predict perturbations "
                f"of the {len(result.seen_genes)} genes seen in training ({seen}) and new combinations of them. "
                "Type perturbations and click “Predict”.",
                "ok",
            )
        else:
            self.show_message(
                f"Training {result.status} after {plural(n_steps, 'step')}; the partly trained model is kept "
                "(Predict and Save work; click “Train response model” to train again).",
                "warning",
            )

    @guarded
    def stop(self) -> None:
        """Stop the response-model training at the end of the current step."""
        if not self.running or self.phase not in ("training", "stopping"):
            raise ConfigError("Nothing to stop: no response model is training.")
        self.live.request_stop()
        self.phase = "stopping"
        self.show_message("Stopping at the end of this step…", "info")

    # ============================================================================ load / save
    def _path(self, path: str | os.PathLike[str] | None, what: str) -> Path:
        text = str(self.model_path.value if path is None else path).strip()
        if not text:
            raise ConfigError(f"Enter the directory {what}.")
        return Path(text).expanduser()

    @guarded
    def load(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Load a response model saved with :meth:`save` (:func:`cellkit.load_perturbation_model`).

        Parameters
        ----------
        path
            The directory; default the path box.

        Returns
        -------
        The :class:`cellkit.PerturbationModel` (``None`` on error).
        """
        from cellkit.perturbation import load_perturbation_model

        self._check_idle()
        where = self._path(path, "of a saved response model")
        if not where.exists():
            raise DataError(f"{where} does not exist; enter the directory written by “Save response model”.")
        result = load_perturbation_model(where)
        self.response_model = result
        self.prediction = self.response_table = self.evaluation = None
        self.model_path.value = str(where)
        self.live.show_history(
            result.history, f"loaded · {len(result.genes)} genes · {len(result.seen_genes)} perturbable genes"
        )
        self._set_phase("idle")
        self.show_message(
            f"Loaded the response model from {where}: {len(result.genes)} genes, {len(result.seen_genes)} "
            f"perturbable genes ({', '.join(result.seen_genes[:8])}{' …' if len(result.seen_genes) > 8 else ''}).",
            "ok",
        )
        return result

    @guarded
    def save(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Save the response model to a directory (:meth:`cellkit.PerturbationModel.save`).

        A directory that exists, is not empty and does not hold a saved response model is refused
        (by the API).

        Parameters
        ----------
        path
            The directory; default the path box.

        Returns
        -------
        The directory written (``None`` on error).
        """
        if self.response_model is None:
            raise ConfigError("No response model to save: train or load one first.")
        self._check_idle()
        written = Path(self.response_model.save(self._path(path, "to save the response model to")))
        self.model_path.value = str(written)
        self.show_message(
            f"Saved the response model to {written}. Load it later with “Load response model” or "
            f"cellkit.load_perturbation_model({str(written)!r}).",
            "ok",
        )
        return written

    # ============================================================================ prediction
    @guarded
    def predict(self, perturbations: str | Sequence[str] | None = None, *, background: bool = False) -> Any:
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
        self._check_idle()
        result = self.response_model
        if result is None:
            raise ConfigError("No response model: click “Train response model” or load a saved one first.")
        typed = self.perturbations.value if perturbations is None else perturbations
        labels = (
            _split_conditions(typed)
            if isinstance(typed, str)
            else list(dict.fromkeys(str(p).strip() for p in typed if str(p).strip()))
        )
        if not labels:
            raise ConfigError("Type at least one perturbation, e.g. ‘G0001+ctrl’ or ‘G0001+G0002’.")
        result.check_perturbations(labels)
        top_k = int(self.top_k.value)
        self.show_message(f"Predicting {plural(len(labels), 'perturbation')}…", "info")

        def compute() -> dict[str, Any]:
            return self._with_observed(result, result.predict(labels))

        if background:
            self._in_background(
                compute,
                name="predict-response",
                phase="predicting",
                on_done=lambda out: self._show(out, top_k),
            )
            return None
        self._show(compute(), top_k)
        return self.prediction

    def _with_observed(self, result: Any, pred: pd.DataFrame) -> dict[str, Any]:
        """The changes against control (observed ones where the data have the cells) and their scores."""
        import cellkit

        adata, key = self.state.adata, result.condition_key
        if adata is not None and key not in adata.obs.columns and self.condition_key.value:
            key = self.condition_key.value
        if adata is None or key not in adata.obs.columns:
            return {"prediction": pred, "table": result.changes(pred), "evaluation": None, "note": ""}
        try:
            table = result.changes(pred, adata, condition_key=key)
            observed = [
                p
                for p in pred.columns
                if table.loc[table["perturbation"] == p, "observed_change"].notna().any()
            ]
            evaluation = (
                cellkit.evaluate_perturbation(
                    adata, pred[observed], condition_key=key, control=result.control
                )
                if observed
                else None
            )
            return {"prediction": pred, "table": table, "evaluation": evaluation, "note": ""}
        except CellkitError as exc:
            note = f"Observed changes not computed: {exc}"
            return {"prediction": pred, "table": result.changes(pred), "evaluation": None, "note": note}

    def _show(self, out: dict[str, Any], top_k: int) -> None:
        """Put a prediction in the chart, the tables and the message line."""
        import cellkit.viz as cv

        pred, table, evaluation = out["prediction"], out["table"], out["evaluation"]
        self.prediction, self.response_table, self.evaluation = pred, table, evaluation
        fig = cv.perturbation_response(table, top_k=top_k)
        cv.draw_into(self.response_fig, fig.update_layout(height=360, width=760))
        self.response_box.layout.display = None
        labels = [str(c) for c in pred.columns]
        top = table.groupby("perturbation", sort=False).head(top_k)
        body = "<b>Top predicted changes</b>" + html_table(top, max_rows=max(50, top_k * len(labels)))
        if evaluation is not None:
            body = "<b>Against the observed cells</b>" + html_table(evaluation) + body
        self.response_html.value = body
        parts = [
            f"Predicted {plural(len(labels), 'perturbation')} (mean over "
            f"{plural(len(self.response_model.control_cells), 'control cell')})"
        ]
        scored = [] if evaluation is None else [p for p in evaluation.index if p != "mean"]
        if scored:
            scores = ", ".join(_scores_text(evaluation.loc[p]) for p in scored)
            parts.append(f"observed cells in the data for {scores}")
        missing = [p for p in labels if p not in scored]
        if missing and self.state.adata is not None:
            parts.append(f"no observed cells for {', '.join(missing[:5])}")
        text = "; ".join(parts) + "."
        if out["note"]:
            text += " " + out["note"]
        self.show_message(text, "warning" if out["note"] else "ok")

    @guarded
    def export(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Write :attr:`response_table` to a CSV file (:func:`cellkit.analysis.write_csv`, atomic).

        Parameters
        ----------
        path
            The file; default the path box.

        Returns
        -------
        The file written (``None`` on error).
        """
        import cellkit.analysis as ca

        if self.response_table is None:
            raise ConfigError("Nothing to export yet — no prediction: click “Predict” first.")
        where = ca.write_csv(self.response_table, self.prediction_path.value if path is None else path)
        self.prediction_path.value = str(where)
        self.show_message(f"Wrote {len(self.response_table):,} rows to {where}.", "ok")
        return where
