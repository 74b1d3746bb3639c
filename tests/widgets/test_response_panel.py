"""PerturbationResponsePanel: response prediction on a tiny synthetic perturb-seq dataset
(run with OMP_NUM_THREADS=1).

Response models have 30 genes, one layer of width 16 and train for 1-2 epochs, so the file stays
well under a minute.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import cellkit
from cellkit import CheckpointError, ConfigError, DataError
from cellkit.widgets import InSilicoPanel, PerturbationResponsePanel, StudioState

TIMEOUT = 120
#: a tiny response model: fast on one CPU thread
TINY = {
    "architecture": cellkit.PerturbationArchitecture(d_model=16, n_heads=2, n_layers=1, d_ff=32),
    "batch_size": 32,
}


def _ok(panel) -> None:
    assert panel.last_error is None, panel.message_text


def _finish(panel) -> None:
    panel.wait(TIMEOUT)
    assert not panel.running, "the background job did not end in time"


def _synthetic():
    from cellkit.datasets import synthetic_perturbation

    return synthetic_perturbation(
        n_genes=30, n_control=60, n_cells_per_perturbation=15, n_single=4, n_double=2, seed=0
    )


@pytest.fixture(scope="module")
def trained():
    """A panel with a response model trained for 2 epochs, live loss pushed at every step."""
    state = StudioState(adata=_synthetic(), adata_name="perturb-seq")
    panel = PerturbationResponsePanel(state)
    panel.update_interval = 0.0
    seen: list[int] = []
    panel.extra_callbacks = [
        lambda ev: seen.append(len(panel.loss_fig.data[0].x or ())) if ev.kind == "step_end" else None
    ]
    result = panel.train(epochs=2, **TINY)
    assert result is not None, panel.message_text
    panel.extra_callbacks = []
    return SimpleNamespace(panel=panel, state=state, result=result, seen=seen)


def _seen_single(result) -> str:
    return next(c for c in result.train_conditions if c.endswith("+ctrl"))


def _unseen_double(result) -> str:
    trained_pairs = {frozenset(c.split("+")) for c in result.train_conditions}
    seen = result.seen_genes
    for i, a in enumerate(seen):
        for b in seen[i + 1 :]:
            if frozenset((a, b)) not in trained_pairs:
                return f"{a}+{b}"
    raise AssertionError("no unseen double of seen genes in the synthetic data")


# ================================================================================ controls
def test_controls_follow_state(pbmc):
    state = StudioState(adata=pbmc)
    panel = PerturbationResponsePanel(state)
    assert panel.title == "Response"
    assert panel.loss_fig._dom_classes == ("cellkit-perturb-loss",)
    assert panel.response_fig._dom_classes == ("cellkit-perturb-response",)
    assert panel.condition_key.value == ""  # PBMCs have no condition column
    assert panel.predict_button.disabled and panel.save_button.disabled and panel.stop_button.disabled
    assert panel.response_box.layout.display == "none" and "then Predict" in panel.response_html.value  # no empty axes
    assert panel.train(background=False) is None and "cellkit-error" in panel.message.value  # no condition column
    state.set_adata(_synthetic())
    assert panel.condition_key.value == "condition"
    assert panel.message.value == ""  # the error was about the old data


# ================================================================================ training
def test_training_shows_a_live_loss_curve(trained):
    panel, result = trained.panel, trained.result
    assert result is panel.response_model and result.status == "completed"
    steps = [r["step"] for r in result.history.step_records]
    assert list(panel.loss_fig.data[0].x) == steps
    np.testing.assert_allclose(panel.loss_fig.data[0].y, [r["loss"] for r in result.history.step_records])
    assert len(panel.loss_fig.data[1].x) == 2  # val/loss at each of the 2 epoch ends
    assert trained.seen == list(range(1, len(steps) + 1))  # the curve grew step by step
    assert panel.last_error is None and panel.phase == "idle"
    assert not panel.predict_button.disabled and not panel.save_button.disabled
    assert panel.progress.value == panel.progress.max
    assert result.condition_key == "condition" and result.control == "ctrl"
    assert result.model.config.encoder.d_model == 16  # the architecture= override reached the API


def test_predict_seen_single_and_unseen_double(trained, tmp_path):
    panel, result = trained.panel, trained.result
    single, double = _seen_single(result), _unseen_double(result)
    panel.perturbations.value = f"{single}, {double.replace('+', ' + ')}"
    panel.top_k.value = 8
    pred = panel.predict()
    _ok(panel)
    assert list(pred.columns) == [single, double]
    pd.testing.assert_frame_equal(pred, result.predict([single, double]))
    assert pred is panel.prediction

    adata = trained.state.adata
    table = panel.response_table
    pd.testing.assert_frame_equal(table, result.changes(pred, adata))
    ctrl = result.control_cells.mean(axis=0)
    one = table[table["perturbation"] == single].set_index("gene").loc[result.genes]
    np.testing.assert_allclose(one["predicted_change"], pred[single].to_numpy(np.float64) - ctrl, atol=1e-5)
    assert one["observed_change"].notna().all()
    assert table.loc[table["perturbation"] == double, "observed_change"].isna().all()
    lab = adata.obs["condition"].astype(str).to_numpy()
    observed = adata.X[lab == single].mean(0) - adata.X[lab == "ctrl"].mean(0)
    np.testing.assert_allclose(one["observed_change"], observed, atol=1e-5)

    assert [tr.name for tr in panel.response_fig.data] == [single, double, f"{single} observed"]
    assert [tr.type for tr in panel.response_fig.data] == ["bar", "bar", "scatter"]
    assert len(panel.response_fig.data[0].x) == 8
    assert panel.response_fig.layout.width == 760 and panel.response_box.layout.display is None
    ev = cellkit.evaluate_perturbation(adata, pred[[single]])
    pd.testing.assert_frame_equal(panel.evaluation, ev)
    assert single in panel.evaluation.index and double not in panel.evaluation.index  # no observed cells
    assert double in panel.message_text  # ... and the message names it
    assert "pearson_delta" in panel.response_html.value
    # the mean baseline beside the model; a single has no additive baseline
    row = panel.evaluation.loc[single]
    assert f"Pearson delta {row['pearson_delta']:.3f}" in panel.message_text
    assert f"mean baseline {row['baseline_pearson_delta']:.3f}" in panel.message_text
    assert np.isnan(row["additive_pearson_delta"]) and "additive baseline" not in panel.message_text
    assert "baseline_pearson_delta" in panel.response_html.value and "additive_pearson_delta" in panel.response_html.value

    out = panel.export(tmp_path / "pred.csv")
    back = pd.read_csv(out)
    assert len(back) == 2 * len(result.genes)
    np.testing.assert_allclose(back["predicted_change"], table["predicted_change"], rtol=1e-5)


def test_observed_double_shows_the_additive_baseline_beside_the_model(trained):
    panel, result = trained.panel, trained.result
    adata = trained.state.adata
    singles = {c.split("+")[0] for c in result.train_conditions if c.endswith("+ctrl")}
    double = next(
        c for c in result.train_conditions if "ctrl" not in c.split("+") and set(c.split("+")) <= singles
    )
    pred = panel.predict(double)
    _ok(panel)
    row = panel.evaluation.loc[double]
    expected = cellkit.evaluate_perturbation(adata, pred).loc[double]
    assert row["additive_pearson_delta"] == pytest.approx(expected["additive_pearson_delta"])
    assert np.isfinite(row["additive_pearson_delta"]) and np.isfinite(row["baseline_pearson_delta"])
    for col, word in (
        ("pearson_delta", "Pearson delta"),
        ("baseline_pearson_delta", "mean baseline"),
        ("additive_pearson_delta", "additive baseline"),
    ):
        assert f"{word} {row[col]:.3f}" in panel.message_text, (word, panel.message_text)


def test_predict_bad_inputs(trained, tmp_path):
    panel, result = trained.panel, trained.result
    good = panel.predict([_seen_single(result)])
    _ok(panel)
    unseen = next(g for g in result.genes if g not in result.seen_genes)
    assert panel.predict(f"{unseen}+ctrl") is None
    assert isinstance(panel.last_error, DataError) and "never perturbed in training" in panel.message_text
    assert panel.predict("NOTAGENE+ctrl") is None
    assert isinstance(panel.last_error, DataError) and "'NOTAGENE'" in panel.message_text
    assert panel.predict("G0008+") is None and "has an empty part" in panel.message_text
    assert panel.predict("ctrl+ctrl") is None and "names no gene" in panel.message_text
    assert panel.predict(" , ") is None and "at least one perturbation" in panel.message_text
    again = panel.predict([_seen_single(result)])
    _ok(panel)
    pd.testing.assert_frame_equal(again, good)
    assert panel.export(tmp_path / "nowhere" / "p.csv") is None and "does not exist" in panel.message_text


def test_save_load_round_trip(trained, tmp_path):
    panel, result = trained.panel, trained.result
    where = panel.save(tmp_path / "response")
    _ok(panel)
    assert (where / "perturbation.json").is_file()
    panel.model_path.value = str(where)
    panel.save_button.click()  # saving over a saved model is fine
    _ok(panel)

    other = PerturbationResponsePanel()  # alone, no data: predictions only
    loaded = other.load(where)
    _ok(other)
    assert loaded.status == "loaded" and loaded.seen_genes == result.seen_genes
    assert list(other.loss_fig.data[0].x) == [r["step"] for r in result.history.step_records]
    # the loaded run's validation losses too, and a finished (not running) view
    assert len(other.loss_fig.data[1].x) == len(panel.loss_fig.data[1].x) == 2
    assert other.live.status == "completed" and other.stop_button.disabled
    assert other.progress.bar_style == "success"
    labels = [_seen_single(result), _unseen_double(result)]
    pd.testing.assert_frame_equal(other.predict(labels), result.predict(labels), atol=1e-5)
    assert other.evaluation is None and other.response_table["observed_change"].isna().all()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    assert panel.save(tmp_path / "busy") is None and "non-empty directory" in panel.message_text
    assert other.load(tmp_path / "nothing") is None and "does not exist" in other.message_text
    assert other.load(tmp_path / "busy") is None
    assert isinstance(other.last_error, CheckpointError)
    assert other.load("") is None and "Enter the directory" in other.message_text
    assert other.response_model is loaded  # a failed load keeps the model


def test_no_data_or_model(tmp_path):
    alone = PerturbationResponsePanel()
    assert alone.train() is None and "No data loaded" in alone.message_text
    assert alone.predict("A+ctrl") is None
    assert isinstance(alone.last_error, ConfigError) and "No response model" in alone.message_text
    assert alone.save(tmp_path / "m") is None and "No response model to save" in alone.message_text
    assert alone.stop() is None and "Nothing to stop" in alone.message_text
    assert alone.export(tmp_path / "p.csv") is None and "Nothing to export" in alone.message_text


def test_train_bad_inputs_show_the_api_messages(pbmc):
    panel = PerturbationResponsePanel(StudioState(adata=pbmc))
    assert panel.train(epochs=1) is None
    assert isinstance(panel.last_error, DataError) and "Choose the condition column" in panel.message_text
    assert panel.train(condition_key="condition") is None and "not an obs column" in panel.message_text
    assert panel.train(condition_key="bulk_labels") is None  # "CD34+" has an empty part
    assert "do not parse" in panel.message_text and "'CD34+'" in panel.message_text
    assert panel.train(condition_key="louvain") is None  # cluster numbers parse: no control
    assert "No control cells" in panel.message_text

    data = _synthetic()
    panel.state.set_adata(data)
    panel.control.value = "control"
    assert panel.train(**TINY) is None and "No control cells" in panel.message_text
    assert "'control'" in panel.message_text
    panel.control.value = "ctrl"
    assert panel.train(epochs=0) is None and "epochs must be a positive integer" in panel.message_text
    assert panel.progress.bar_style == "danger" and panel.phase == "idle"
    assert panel.train(callbacks=[]) is None and "set by the panel" in panel.message_text
    bad = data.copy()
    bad.obs["condition"] = bad.obs["condition"].astype(str)
    bad.obs.iloc[-1, bad.obs.columns.get_loc("condition")] = "G0001+"
    panel.state.set_adata(bad)
    assert panel.train(**TINY) is None and "do not parse" in panel.message_text
    only_ctrl = data[data.obs["condition"] == "ctrl"].copy()
    panel.state.set_adata(only_ctrl)
    assert panel.train(**TINY) is None and "Every cell is a control" in panel.message_text
    assert panel.response_model is None and panel.phase == "idle"


def test_stop_mid_training_keeps_the_partial_model_and_refuses_other_jobs():
    panel = PerturbationResponsePanel(StudioState(adata=_synthetic()))
    while_busy: list[str] = []

    def on_event(ev):
        if ev.kind == "step_end" and ev.step == 1:
            panel.load("somewhere")  # refused: the panel is busy
            while_busy.append(panel.message_text)
            panel.stop()

    panel.extra_callbacks = [on_event]
    panel.epochs.value = 50
    panel.train_button.click()
    assert panel.phase in ("training", "stopping")
    _finish(panel)
    result = panel.response_model
    assert result is not None and result.status == "stopped", panel.message_text
    assert len(result.history.step_records) < 50
    assert "busy" in while_busy[0]
    assert "stopped after" in panel.message_text and "partly trained model is kept" in panel.message_text
    assert panel.phase == "idle" and panel.stop_button.disabled and not panel.train_button.disabled
    assert panel.predict([_seen_single(result)]) is not None


def test_the_two_panels_share_one_state_but_not_their_jobs(state):
    """The tools are independent: training a response model leaves the in-silico panel free."""
    insilico, response = InSilicoPanel(state), PerturbationResponsePanel(state)
    assert insilico.state is response.state
    state.set_adata(_synthetic())
    assert response.condition_key.value == "condition"
    response.epochs.value = 1
    response.train_button.click()
    assert not insilico.run_button.disabled
    _finish(response)
    _ok(response)
