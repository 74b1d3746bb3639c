"""FinetunePanel: live fine-tuning on the demo model and real PBMCs, driven from Python.

Runs are kept short (160 cells of 4 cell types as the active selection, 32 genes per cell, 2
epochs of 3 steps) so the file stays well under a minute at one thread.
"""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from cellkit import ConfigError, DataError
from cellkit.widgets import StudioState
from cellkit.widgets._finetune import FinetunePanel, objective_support

LABEL = "bulk_labels"
TIMEOUT = 120


def _four_types(adata, per_class: int = 40) -> np.ndarray:
    top = adata.obs[LABEL].value_counts().index[:4]
    return np.concatenate([np.flatnonzero(adata.obs[LABEL] == c)[:per_class] for c in top])


def _fast(panel: FinetunePanel, *, epochs: int = 2) -> FinetunePanel:
    panel.epochs.value = epochs
    panel.max_genes.value = 32
    panel.val_size.value = 0.2
    panel.test_size.value = 0.2
    panel.batch_size.value = 32
    return panel


def _panel(state: StudioState, **kw) -> FinetunePanel:
    state.add_selection("four types", _four_types(state.adata))
    return _fast(FinetunePanel(state), **kw)


def _finish(panel: FinetunePanel) -> None:
    panel.wait(TIMEOUT)
    assert not panel.running, "the run did not end in time"


def _shown(panel) -> str:
    """What the panel says: its banner and every error line beside a control."""
    lines = [panel.message_text, *(panel.error_text(p) for p in panel._error_lines)]
    return " ".join(lines)


def _xs(fig) -> tuple:
    return tuple(fig.data[0].x or ())


# ------------------------------------------------------------------ one completed run, shared
@pytest.fixture(scope="module")
def done(_pbmc_session):
    """A panel after a completed 2-epoch run, with the live loss lengths seen at each step."""
    from cellkit.datasets import demo_model

    state = StudioState(adata=_pbmc_session.copy(), model=demo_model(), adata_name="pbmc")
    panel = _panel(state)
    panel.update_interval = 0.0  # push every step: the growth below is deterministic
    seen: list[tuple[int, int]] = []

    def watch(event):
        if event.kind == "step_end":  # runs after the panel's own callback, on the training thread
            seen.append((event.step, len(_xs(panel.loss_fig))))

    panel.extra_callbacks = [watch]
    assert panel.start() is not None, panel.message_text
    _finish(panel)
    return SimpleNamespace(panel=panel, state=state, seen=seen, model=state.model)


def test_completed_run_shows_curves_confusion_and_sets_state(done):
    panel, state = done.panel, done.state
    result = panel.result
    assert panel.last_error is None, panel.message_text
    assert result is not None and result.status == "completed"
    assert state.finetune_result is result
    assert state.model is done.model, "the trained model must not replace the studio's model on its own"
    assert "Completed" in panel.message_text and "accuracy" in panel.message_text
    assert "macro-F1" in panel.message_text
    # one loss point per optimizer step, one validation point per epoch
    n_steps = len(result.history.step_records)
    assert n_steps == 6
    assert _xs(panel.loss_fig) == tuple(range(1, n_steps + 1))
    assert len(panel.loss_fig.data[0].y) == n_steps
    assert [t.name for t in panel.loss_fig.data] == ["loss"]
    val = {t.name: t for t in panel.val_fig.data}
    assert set(val) == {"val/loss", "val/accuracy", "val/macro_f1"}
    assert tuple(val["val/loss"].x) == (1, 2)
    assert all(0 <= v <= 1 for v in val["val/accuracy"].y)
    assert "cellkit-loss-plot" in panel.loss_fig._dom_classes
    assert "cellkit-val-plot" in panel.val_fig._dom_classes
    # results
    assert panel.confusion_fig is not None and "cellkit-confusion" in panel.confusion_fig._dom_classes
    assert panel.confusion_box.children == (panel.confusion_fig,)
    assert panel.confusion_fig.data[0].type == "heatmap"
    assert all(c in panel.report_html.value for c in ("f1", "support", "Dendritic"))
    # the logistic regression baseline beside the model, in the summary and the message
    m, b = result.metrics, result.baseline_metrics
    assert set(b) == {"accuracy", "macro_f1", "weighted_f1"}
    for k in b:
        assert f"class='cellkit-model-score' data-metric='{k}'>{m[k]:.3f}<" in panel.summary_html.value
        assert f"class='cellkit-baseline-score' data-metric='{k}'>{b[k]:.3f}<" in panel.summary_html.value
    assert "logistic regression" in panel.summary_html.value and "logistic regression" in panel.message_text
    assert f"accuracy {b['accuracy']:.3f}" in panel.message_text
    assert panel.progress.value == panel.progress.max == n_steps
    # buttons after a completed run
    assert not panel.start_button.disabled
    assert panel.stop_button.disabled and panel.resume_button.disabled
    assert not (panel.use_button.disabled or panel.save_button.disabled or panel.predict_button.disabled)
    assert state.busy == ""


def test_live_plot_grows_while_training(done):
    # read inside the run at every step: the figure already held that step's point
    assert [s for s, _ in done.seen] == [1, 2, 3, 4, 5, 6]
    assert [n for _, n in done.seen] == [1, 2, 3, 4, 5, 6]


def test_save_refuses_to_overwrite_unless_asked(done, tmp_path):
    import cellkit

    panel = done.panel
    target = tmp_path / "ft-model"
    assert panel.save(target) == target
    assert (target / "config.json").exists() and str(target) in panel.message_text
    loaded = cellkit.load_model(target)
    assert loaded.config.heads["classifier"]["labels"] == panel.result.classes
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    # an existing non-empty directory is refused...
    assert panel.save(target) is None
    assert isinstance(panel.last_error, DataError) and "overwrite" in panel.message_text
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    # ...unless the overwrite box is ticked (button path)
    panel.save_path.value = str(target)
    panel.overwrite.value = True
    panel.save_button.click()
    assert panel.last_error is None and "Saved" in panel.message_text
    panel.overwrite.value = False
    # a file, or no path
    (tmp_path / "afile").write_text("x")
    assert panel.save(tmp_path / "afile") is None and "is a file" in panel.message_text
    assert panel.save("  ") is None and isinstance(panel.last_error, ConfigError)


def test_write_predictions_only_after_the_click(done):
    panel, adata = done.panel, done.state.adata
    key = "ft_pred"
    assert key not in adata.obs.columns
    panel.key_added.value = key
    assert key not in adata.obs.columns
    panel.predict_button.click()
    panel.wait(TIMEOUT)
    assert panel.last_error is None, panel.message_text
    assert key in adata.obs.columns and f"{key}_confidence" in adata.obs.columns
    assert f"{key}_probabilities" in adata.obsm and adata.uns[key]["classes"] == panel.result.classes
    assert adata.obs[key].notna().all()  # every cell, not only the training selection
    assert set(adata.obs[key].astype(str)) <= set(panel.result.classes)
    assert f"obs['{key}']" in panel.message_text and f"obsm['{key}_probabilities']" in panel.message_text
    # the label column is protected, an empty key refused
    assert panel.write_predictions(key_added=LABEL) is None and "label column" in panel.message_text
    assert panel.write_predictions(key_added=" ") is None and isinstance(panel.last_error, ConfigError)

    # the job row followed it to the end
    assert panel.jobs.outcome == "done" and "done in" in panel.jobs.status.value


def test_write_predictions_shows_a_job_row_and_cancel_writes_nothing(done):
    panel, adata = done.panel, done.state.adata
    key = "ft_cancelled"
    panel.key_added.value = key
    panel.predict_button.click()
    assert panel.jobs.running and panel.predict_button.disabled and panel.start_button.disabled
    panel.jobs.cancel()  # at the next batch, before anything is written
    panel.wait(TIMEOUT)
    assert panel.jobs.outcome == "cancelled" and "cancelled after" in panel.jobs.status.value
    assert key not in adata.obs.columns and f"{key}_probabilities" not in adata.obsm
    assert "Cancelled" in panel.message_text and panel.last_error is None
    assert not panel.predict_button.disabled and not panel.start_button.disabled  # back as they were


def test_stop_while_tokenizing_ends_the_run_before_training(state):
    """The run tokenizes the AnnData first (its own max genes): the bar follows it, Stop cancels it."""
    panel = _panel(state)
    seen: list[str] = []
    panel.extra_callbacks = [lambda event: seen.append(event.kind)]
    assert panel.start() is not None, panel.message_text
    panel.stop()
    _finish(panel)
    assert seen == [] and panel.result is None and panel.phase == "idle"  # no training event at all
    assert "Stopped before training started" in panel.message_text and panel.last_error is None
    assert "stopped before training" in panel.status_html.value
    assert not panel.start_button.disabled and panel.resume_button.disabled  # nothing to resume


def test_the_bar_follows_the_tokenizing_of_a_run(state):
    panel = _panel(state, epochs=1)
    lines: list[str] = []
    panel.update_interval = 0.0
    panel.extra_callbacks = [lambda event: lines.append(panel.status_html.value)]
    panel.status_html.observe(lambda change: lines.append(change["new"]), names="value")
    assert panel.start() is not None, panel.message_text
    _finish(panel)
    assert panel.phase == "done", panel.message_text
    assert any("before training: 160 of 160 cells" in line for line in lines), lines[:5]


def test_use_trained_model_updates_state(done):
    panel, state = done.panel, done.state
    panel.use_button.click()
    assert panel.last_error is None
    assert state.model is panel.result.model and state.model_source == "fine-tuned"
    assert state.model is not done.model


# ------------------------------------------------------------------ stop / resume
def test_stop_mid_run_then_resume(state):
    panel = _panel(state)
    panel.update_interval = 1e9  # only epoch ends and the finish push: the plot is throttled
    seen: dict[str, object] = {}

    def stop_at_two(event):
        if event.kind == "step_end" and event.step == 2 and "phase" not in seen:
            seen["points"] = len(_xs(panel.loss_fig))
            panel.stop()
            seen["phase"] = panel.phase
            seen["stop_disabled"] = panel.stop_button.disabled

    panel.extra_callbacks = [stop_at_two]
    panel.start()
    _finish(panel)
    assert seen["points"] == 0, "a throttled plot is not pushed at every step"
    assert seen["phase"] == "stopping" and seen["stop_disabled"] is True
    assert panel.result.status == "stopped" and panel.phase == "stopped"
    assert "Stopped" in panel.message_text and "Resume" in panel.message_text
    assert _xs(panel.loss_fig) == (1, 2), "the finish pushes what was recorded"
    assert state.finetune_result is None, "a stopped run is not published to the studio"
    assert not panel.resume_button.disabled and not panel.start_button.disabled
    assert panel.stop_button.disabled and panel.use_button.disabled
    assert panel.save("unused-dir") is None  # no completed model yet
    assert "No fine-tuned model" in panel.message_text

    panel.extra_callbacks = []
    panel.resume()
    _finish(panel)
    assert panel.last_error is None, panel.message_text
    assert panel.result.status == "completed" and state.finetune_result is panel.result
    assert _xs(panel.loss_fig) == (1, 2, 3, 4, 5, 6), "resumed steps continue, without duplicates"
    assert tuple(panel.val_fig.data[0].x) == (1, 2)
    assert panel.resume_button.disabled
    # nothing to resume or stop now
    assert panel.resume() is None and "Nothing to resume" in panel.message_text
    assert panel.stop() is None and "Nothing to stop" in panel.message_text


# ------------------------------------------------------------------ bad inputs
def _untouched(panel: FinetunePanel, state: StudioState, model) -> None:
    assert state.model is model and state.finetune_result is None and state.busy == ""
    assert not panel.running and not panel.start_button.disabled
    assert panel.stop_button.disabled and panel.resume_button.disabled


def test_no_model_no_data(pbmc, demo):
    panel = FinetunePanel(StudioState(adata=pbmc))
    assert panel.start() is None and isinstance(panel.last_error, ConfigError)
    assert "No model" in panel.message_text
    _untouched(panel, panel.state, None)
    panel = FinetunePanel(StudioState(model=demo))
    assert panel.label_key.options == () and "No data" in panel.cells_html.value
    assert panel.start() is None and "No data" in panel.message_text
    _untouched(panel, panel.state, demo)
    panel = FinetunePanel()  # alone: no state at all
    assert panel.start() is None and panel.last_error is not None


def test_bad_settings_answer_at_once(state):
    model = state.model
    panel = _panel(state)
    for value in (0.0, -1e-3):
        panel.lr.value = value
        assert panel.start() is None and isinstance(panel.last_error, ConfigError)
        assert "learning rate" in _shown(panel)
        _untouched(panel, state, model)
    panel.lr.value = 1e-4
    panel.objective_boxes["cls"].value = False
    assert panel.start() is None and "objective" in _shown(panel)
    panel.objective_boxes["cls"].value = True
    panel.objective_boxes["dab"].value = True
    assert panel.start() is None and isinstance(panel.last_error, ConfigError)
    assert "'dab'" in _shown(panel) and panel.last_error.param == "batch_key"  # beside its control
    assert "Batch column" in panel.error_text("batch_key")
    panel.objective_boxes["dab"].value = False
    panel.freeze_layers.value = 9
    assert panel.start() is None and "between 0 and 2" in _shown(panel)
    panel.freeze_layers.value = 0
    panel.epochs.value = 0
    assert panel.start() is None and "epochs" in _shown(panel)
    panel.epochs.value = 2
    panel.batch_key.value = LABEL
    assert panel.start() is None and isinstance(panel.last_error, ConfigError)
    assert panel.last_error.param == "batch_key" and "Batch column" in panel.error_text("batch_key")
    panel.batch_key.value = ""
    panel.val_size.value, panel.test_size.value = 0.6, 0.5
    assert panel.start() is None and "“Validation fraction” + “Test fraction”" in _shown(panel)
    _untouched(panel, state, model)
    assert panel.phase == "idle" and panel.progress.value == 0


def test_the_panel_shows_the_apis_own_error(state):
    """No check of its own: the panel's message is the one cellkit.tasks.check_finetune_options raises."""
    import cellkit.tasks

    panel = _panel(state)
    panel.lr.value = -1.0
    panel.start()
    with pytest.raises(ConfigError) as api:
        cellkit.tasks.check_finetune_options(state.adata, state.model, **panel.settings())
    assert panel.message_text == str(api.value)


@pytest.mark.parametrize("case", ["missing", "nan", "one class"])
def test_bad_labels_show_a_message(state, case):
    model = state.model
    adata = state.adata
    panel = _panel(state)
    if case == "missing":
        del adata.obs[LABEL]  # gone after the dropdown was filled
        expected = "is not an obs column"
    elif case == "nan":
        lab = adata.obs[LABEL].astype(object)
        lab.iloc[_four_types(adata)[:3]] = np.nan
        adata.obs["lab"] = lab.astype("category")
        panel.refresh()
        assert "lab" not in panel.label_key.options and "have no value" in panel.label_note.value
        panel.label_key.options = [*panel.label_key.options, "lab"]  # forced past the offer
        panel.label_key.value = "lab"
        expected = "have no 'lab' value"
    else:
        state.add_selection("dendritic", np.flatnonzero(adata.obs[LABEL] == "Dendritic")[:30])
        expected = "single class"
    thread = panel.start()
    _finish(panel)
    assert isinstance(panel.last_error, DataError), panel.last_error
    assert expected in _shown(panel)
    assert panel.result is None
    if case == "one class":  # found by finetune after tokenizing, in the thread
        assert thread is not None and panel.phase == "failed" and panel.progress.bar_style == "danger"
    else:  # obs columns are checked before the thread starts
        assert thread is None and panel.phase == "idle"
    _untouched(panel, state, model)


def test_error_mid_run_leaves_state_untouched_and_panel_usable(state, monkeypatch):
    model = state.model
    panel = _panel(state, epochs=1)
    cls = type(model)
    real = cls.forward
    calls = {"n": 0}
    lock = threading.Lock()

    def failing(self, *args, **kwargs):
        with lock:
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("simulated failure in the forward pass")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", failing)
    panel.start()
    _finish(panel)
    assert isinstance(panel.last_error, RuntimeError)
    assert "simulated failure" in panel.message_text
    assert panel.phase == "failed" and "step 2" in panel.status_html.value  # says where it failed
    assert _xs(panel.loss_fig) == (1, 2), "what was plotted before the failure stays"
    _untouched(panel, state, model)
    assert panel.use_button.disabled and panel.save_button.disabled

    monkeypatch.undo()
    panel.start()
    _finish(panel)
    assert panel.last_error is None and panel.result.status == "completed"
    assert _xs(panel.loss_fig) == (1, 2, 3), "a new run starts a fresh plot"


# ------------------------------------------------------------------ controls follow the state
def test_controls_follow_data_selection_and_model(state, pbmc):
    panel = FinetunePanel(state)
    assert panel.label_key.value == LABEL
    assert "percent_mito" not in panel.label_key.options  # float columns are not labels
    assert panel.batch_key.value == "" and panel.settings()["cells"] is None  # all cells
    assert panel.objective_boxes["cls"].value and not panel.objective_boxes["gep"].value
    assert panel.objective_weights["ecs"].value == 10.0
    # the demo model has expression + mvc heads but no zero probabilities and no MLM head
    assert not panel.objective_boxes["gep"].disabled and not panel.objective_boxes["mvc"].disabled
    assert panel.objective_boxes["mlm"].disabled and panel.objective_boxes["zero_nll"].disabled
    state.add_selection("lasso", np.arange(50))
    assert len(panel.settings()["cells"]) == 50 and "lasso" in panel.cells_html.value
    small = pbmc[:300].copy()  # every class has 3+ cells (splittable)
    small.obs["cell_type"] = small.obs[LABEL].astype(str)
    del small.obs[LABEL]
    state.set_adata(small, name="small")
    assert LABEL not in panel.label_key.options and panel.label_key.value == "cell_type"
    kw = panel.settings()
    assert kw["cells"] is None and kw["label_key"] == "cell_type" and kw["objectives"] == {"cls": 1.0}
    assert "tokenize_options" not in kw and "early_stopping_patience" not in kw
    panel.max_genes.value, panel.patience.value, panel.class_weight.value = 64, 2, "balanced"
    kw = panel.settings()
    assert kw["tokenize_options"] == {"max_length": 64} and kw["early_stopping_patience"] == 2
    assert kw["class_weight"] == "balanced"


def test_demo_model_starts_from_its_recipe_other_models_from_generic_defaults(state):
    from cellkit.datasets import DEMO_FINETUNE
    from cellkit.widgets._finetune import DEMO_PANEL_EPOCHS

    panel = FinetunePanel(state)  # the state holds the shipped demo model
    kw = panel.settings()
    assert kw["epochs"] == DEMO_PANEL_EPOCHS
    for key in ("lr", "batch_size", "class_weight", "freeze_embeddings", "monitor"):
        assert kw[key] == DEMO_FINETUNE[key], key
    other = copy.deepcopy(state.model)
    other.config.metadata = {"trained_by": "someone else"}
    state.set_model(other, source="/models/other")
    kw = panel.settings()  # a model change re-applies nothing: the demo values stay as they were set
    assert kw["lr"] == DEMO_FINETUNE["lr"]
    fresh = FinetunePanel(StudioState(adata=state.adata, model=other))
    kw = fresh.settings()
    assert (kw["epochs"], kw["lr"], kw["batch_size"], kw["class_weight"]) == (5, 1e-4, 32, None)
    assert not kw["freeze_embeddings"] and kw["monitor"] == "val/loss"


def test_objective_support_follows_heads():
    def fake(heads):
        return SimpleNamespace(config=SimpleNamespace(heads=heads))

    full = objective_support(fake({"expression": {"explicit_zero_prob": True}, "mvc": {}, "mlm": {}}))
    assert full["zero_nll"] is None and full["mlm"] is None and "zero" in full["mvc_zero_nll"]
    bare = objective_support(fake({}))
    assert bare["cls"] is None and bare["dab"] is None and "expression" in bare["gep"]


def test_reuses_the_studios_tokens_when_they_fit(state):
    import cellkit

    panel = _panel(state)
    names = state.selected_cells()
    state.tokens = cellkit.tokenize(
        state.adata, state.model, cells=names, obs_columns=[LABEL], progress=False
    )
    panel.max_genes.value = 0
    data, kw, _ = panel._data_for(state.adata, panel.settings())
    assert data is state.tokens and kw["cells"] is None
    panel.max_genes.value = 32  # other tokenize options: tokenize afresh
    data, kw, _ = panel._data_for(state.adata, panel.settings())
    assert data is state.adata and len(kw["cells"]) == len(names)
    panel.max_genes.value = 0
    state.remove_selection("four types")  # other cells
    data, _, _ = panel._data_for(state.adata, panel.settings())
    assert data is state.adata


def test_max_genes_is_every_scheme_max_length(state):
    from cellkit.data.schemes import get_scheme
    from cellkit.data.tokenize import SCHEMES
    from cellkit.widgets import FinetunePanel

    panel = FinetunePanel(state)
    panel.max_genes.value = 16
    for family in SCHEMES:
        state.model.config.family = family
        assert panel.settings()["tokenize_options"] == {"max_length": 16}
    for scheme in SCHEMES:
        assert "max_length" in get_scheme(scheme).OPTIONS


# ------------------------------------------------------------------ issue 17: failures keep the last result
def _usable(panel: FinetunePanel) -> bool:
    return not any(b.disabled for b in (panel.use_button, panel.save_button, panel.predict_button))


def test_a_failed_or_stopped_start_keeps_the_last_completed_result(state, tmp_path):
    panel = _panel(state, epochs=1)
    panel.start()
    _finish(panel)
    first = panel.completed_result
    assert first is not None and first.status == "completed" and _usable(panel)
    assert panel.run_cells == 160 == len(first.split)
    # 1. a setting refused before the thread starts
    panel.lr.value = 0.0
    assert panel.start() is None and "learning rate" in panel.message_text
    assert panel.completed_result is first and _usable(panel)
    panel.lr.value = 1e-4
    # 2. a failure inside the training thread (found after tokenizing: a single class)
    state.add_selection("dendritic", np.flatnonzero(state.adata.obs[LABEL] == "Dendritic")[:30])
    panel.max_genes.value = 16  # other settings than the completed run's
    assert panel.start() is not None
    _finish(panel)
    assert isinstance(panel.last_error, DataError) and panel.phase == "failed"
    assert panel.run_cells == 30 and panel.result is None
    assert panel.completed_result is first and state.finetune_result is first and _usable(panel)
    assert "still usable" in panel.status_html.value
    assert "still usable" in panel.summary_html.value and panel.confusion_fig is not None
    # the kept model is used with its own settings (max_length 32, not the failed run's 16)
    assert panel.save(tmp_path / "kept") is not None
    assert panel.write_predictions("kept_pred") is not None
    _finish(panel)
    assert panel.last_error is None and "kept_pred" in state.adata.obs
    assert panel.use_trained_model() is first.model and state.model is first.model
    # 3. a stopped run keeps it too
    state.remove_selection("dendritic")
    state.add_selection("four types", _four_types(state.adata))
    panel.max_genes.value = 32

    def stop_at_once(event):
        if event.kind == "step_end" and panel.phase == "running":
            panel.stop()

    panel.extra_callbacks = [stop_at_once]
    panel.start()
    _finish(panel)
    assert panel.phase == "stopped" and panel.result.status == "stopped"
    assert panel.completed_result is first and _usable(panel) and "still usable" in panel.message_text


def test_the_run_says_which_cells_it_uses(state):
    panel = _panel(state)
    state.use_all_cells()
    assert "all 700 cells" in panel.cells_html.value
    panel.lr.value = 0.0  # refused at once: nothing starts, the count of the last run stays 0
    assert panel.start() is None and panel.run_cells == 0 and panel.runs_started == 0
    panel.lr.value = 1e-4

    def stop_at_once(event):
        if event.kind == "step_end" and panel.phase == "running":
            panel.stop()

    panel.extra_callbacks = [stop_at_once]
    panel.start()
    assert panel.run_cells == 700 and "data-cells='700'" in panel.run_html.value
    assert "all cells" in panel.run_html.value
    # runs are numbered, so the line of a new run is told from the last one's (same cells, same words)
    assert panel.runs_started == 1 and "Run 1</span>:" in panel.run_html.value
    _finish(panel)


# --- issue 17: errors beside the control, sensible label columns
def test_numeric_label_column_is_not_offered_and_the_note_says_why(state):
    panel = FinetunePanel(state)
    assert "n_genes" not in panel.label_key.options
    assert "bulk_labels" in panel.label_key.options
    assert "n_genes" in panel.label_note.value and "distinct values" in panel.label_note.value


def test_too_small_classes_show_beside_the_label_column_in_plain_words(state):
    panel = FinetunePanel(state)
    panel.label_key.options = [*panel.label_key.options, "n_genes"]  # forced past the offer
    panel.label_key.value = "n_genes"
    assert panel.start() is None
    assert isinstance(panel.last_error, DataError) and panel.last_error.param == "label_key"
    text = panel.error_text("label_key")
    assert "cells" in text and "np.int64" not in text and "{" not in text
    for api_name in ("val_size", "test_size", "split_key", "cells="):
        assert api_name not in text
    assert "Label column" in panel.message_text  # the banner points to the control
    # a new action clears the old messages
    panel.label_key.value = "bulk_labels"
    panel.lr.value = 0
    panel.start()
    assert panel.error_text("label_key") == ""
    assert panel.last_error is not None and "n_genes" not in panel.message_text


def test_the_cells_line_says_whether_the_run_uses_the_data_tabs_tokens(state):
    """The header counts the Data tab's tokens; the fine-tune line says if the run uses them or tokenizes anew."""
    import cellkit

    panel = FinetunePanel(state)
    panel.label_key.value = LABEL
    assert "Data tab's tokens" not in panel.cells_html.value  # none yet
    state.tokens = cellkit.tokenize(state.adata, state.model, obs_columns=[LABEL], progress=False)
    assert "The run uses the Data tab's tokens" in panel.cells_html.value
    panel.max_genes.value = 32  # its own tokenizing options
    assert "tokenizes them itself" in panel.cells_html.value
    panel.max_genes.value = 0
    state.add_selection("first 100", np.arange(100))  # other cells than the tokens hold
    assert "tokenizes them itself" in panel.cells_html.value and "100" in panel.cells_html.value
    state.use_all_cells()
    assert "The run uses the Data tab's tokens" in panel.cells_html.value
