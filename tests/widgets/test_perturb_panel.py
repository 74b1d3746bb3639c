"""PerturbationPanel: in-silico perturbation on the demo model + real PBMCs, and response prediction
on a tiny synthetic perturb-seq dataset (run with OMP_NUM_THREADS=1).

In-silico runs use 24 cells (the active selection); response models have 30 genes, one layer of
width 16 and train for 1-2 epochs, so the file stays well under a minute.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import cellkit
import cellkit.analysis as ca
from cellkit import CheckpointError, ConfigError, DataError, UnknownGeneError
from cellkit.widgets import StudioState
from cellkit.widgets._perturb import PerturbationPanel

GENES = ["CD3E", "LYZ", "MS4A1"]
N_CELLS = 24
TIMEOUT = 120
#: a tiny response model: fast on one CPU thread
ARCH = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "batch_size": 32}


def _ok(panel: PerturbationPanel) -> None:
    assert panel.last_error is None, panel.message_text


def _finish(panel: PerturbationPanel) -> None:
    panel.wait(TIMEOUT)
    assert not panel.running, "the background job did not end in time"


@pytest.fixture
def panel(state):
    state.add_selection("few", np.arange(N_CELLS))
    return PerturbationPanel(state)


def _direct(state, panel, **kw):
    """The API call the panel should have made for its last run."""
    return ca.in_silico_perturb(
        state.adata,
        state.model,
        cells=panel.run_cells,
        key_added=None,
        return_cells=True,
        progress=False,
        **kw,
    )


def _synthetic():
    from cellkit.datasets import synthetic_perturbation

    return synthetic_perturbation(
        n_genes=30, n_control=60, n_cells_per_perturbation=15, n_single=4, n_double=2, seed=0
    )


@pytest.fixture(scope="module")
def trained():
    """A panel with a response model trained for 2 epochs, live loss pushed at every step."""
    state = StudioState(adata=_synthetic(), adata_name="perturb-seq")
    panel = PerturbationPanel(state)
    panel.update_interval = 0.0
    seen: list[int] = []
    panel.extra_callbacks = [
        lambda ev: seen.append(len(panel.loss_fig.data[0].x or ())) if ev.kind == "step_end" else None
    ]
    result = panel.train_response(epochs=2, **ARCH)
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
def test_controls_follow_state(state, panel):
    assert panel.title == "Perturb"
    assert "CD3E" in panel.gene_picker.options
    assert not any(t.startswith("<") for t in panel.gene_picker.options)  # no special tokens
    panel.gene_picker.value = "LYZ"  # picking a suggestion adds it to the genes box
    panel.gene_picker.value = "CD3E"
    panel.gene_picker.value = "LYZ"
    assert panel.genes.value == "LYZ, CD3E"
    assert panel.gene_picker.value == ""
    assert "bulk_labels" in panel.goal_column.options
    assert panel.goal_selection.options == ("few",)
    assert "few" in panel.cells_html.value and f"{N_CELLS}" in panel.cells_html.value
    assert panel.shift_fig._dom_classes == ("cellkit-perturb-shift",)
    assert panel.cells_fig._dom_classes == ("cellkit-perturb-cells",)
    assert panel.loss_fig._dom_classes == ("cellkit-perturb-loss",)
    assert panel.response_fig._dom_classes == ("cellkit-perturb-response",)
    assert panel.condition_key.value == ""  # PBMCs have no condition column
    assert panel.predict_button.disabled and panel.save_button.disabled and panel.stop_button.disabled

    state.adata.obs["new_col"] = pd.Categorical(["a"] * state.adata.n_obs)
    state.obs_changed()
    assert "new_col" in panel.goal_column.options
    state.set_model(None)
    assert panel.gene_picker.options == ()
    state.set_adata(_synthetic())
    assert panel.condition_key.value == "condition"
    assert panel.goal_selection.options == ()
    assert "all 150 cells" in panel.cells_html.value


# ================================================================================ in silico
def test_run_matches_api_and_draws_one_bar_and_violin_per_perturbation(state, panel):
    uns_before, obs_before = set(state.adata.uns), list(state.adata.obs.columns)
    summary = panel.run(GENES, n_null=3)
    _ok(panel)
    assert len(panel.run_cells) == N_CELLS
    exp_summary, exp_cells = _direct(state, panel, genes=GENES, mode="delete", n_null=3, seed=0)
    pd.testing.assert_frame_equal(summary, exp_summary, rtol=1e-6)
    pd.testing.assert_frame_equal(panel.cells_table, exp_cells, rtol=1e-6)
    assert summary is panel.summary
    assert list(summary["perturbation"]) == GENES and state.active_selection == "few"
    assert "CD3E" in panel.summary_html.value and "mean_shift" in panel.summary_html.value

    bars, null = panel.shift_fig.data
    assert bars.type == "bar" and list(bars.x) == GENES
    np.testing.assert_allclose(bars.y, summary["mean_shift"], rtol=1e-9)
    assert null.type == "scatter" and list(null.x) == GENES
    np.testing.assert_allclose(null.y, summary["null_mean"], rtol=1e-9)
    np.testing.assert_allclose(null.error_y.array, summary["null_std"], rtol=1e-9)

    assert [tr.type for tr in panel.cells_fig.data] == ["violin"] * 3
    assert [tr.name for tr in panel.cells_fig.data] == GENES
    for tr, gene in zip(panel.cells_fig.data, GENES, strict=True):
        rows = exp_cells[(exp_cells["perturbation"] == gene) & exp_cells["counted"]]
        np.testing.assert_allclose(tr.y, rows["shift"], rtol=1e-9)
        assert len(tr.y) == summary.set_index("perturbation").loc[gene, "n_cells"]

    # the caller's AnnData was not written
    assert set(state.adata.uns) == uns_before
    assert list(state.adata.obs.columns) == obs_before


def test_combination_and_overexpress_from_the_controls(state, panel):
    panel.genes.value = "CD3E LYZ"
    panel.together.value = True
    panel.mode.value = "overexpress"
    panel.run_button.click()  # background thread
    _finish(panel)
    _ok(panel)
    summary = panel.summary
    assert list(summary["perturbation"]) == ["CD3E+LYZ"]
    assert summary["n_cells"].iloc[0] == N_CELLS  # overexpress counts every cell
    exp, _ = _direct(state, panel, genes=["CD3E", "LYZ"], combos=True, mode="overexpress")
    pd.testing.assert_frame_equal(summary, exp, rtol=1e-6)
    assert list(panel.shift_fig.data[0].x) == ["CD3E+LYZ"]
    assert len(panel.shift_fig.data) == 1  # no null without n_null
    assert len(panel.cells_fig.data) == 1
    assert panel.phase == "idle" and not panel.run_button.disabled
    assert panel.last_error is None and "Overexpress" in panel.message_text

    explicit = panel.run(combos=[("CD3E", "LYZ"), ("MS4A1",)], mode="delete")
    _ok(panel)
    assert list(explicit["perturbation"]) == ["CD3E+LYZ", "MS4A1"]


def test_goal_from_obs_value_and_from_selection(state, panel):
    panel.goal_kind.value = "obs"
    panel.goal_column.value = "bulk_labels"
    panel.goal_value.value = "CD56+ NK"
    summary = panel.run(["LYZ"], mode="overexpress")
    _ok(panel)
    goal = (state.adata.obs["bulk_labels"] == "CD56+ NK").to_numpy()  # 31 cells < max cells
    exp, _ = _direct(state, panel, genes=["LYZ"], mode="overexpress", goal=goal)
    pd.testing.assert_frame_equal(summary, exp, rtol=1e-6)
    assert "goal_shift" in summary
    assert int(goal.sum()) == 31 and "CD56+ NK" in panel.message_text  # the goal is named
    assert [tr.name for tr in panel.shift_fig.data] == ["mean shift", "shift toward goal"]
    np.testing.assert_allclose(panel.shift_fig.data[1].y, summary["goal_shift"], rtol=1e-9)

    state.add_selection("target", np.arange(100, 110), activate=False)
    by_sel = panel.run(["LYZ"], mode="overexpress", goal="target")
    _ok(panel)
    exp2, _ = _direct(state, panel, genes=["LYZ"], mode="overexpress", goal=np.arange(100, 110))
    pd.testing.assert_frame_equal(by_sel, exp2, rtol=1e-6)
    assert "goal_shift" not in panel.run(["LYZ"], goal="")  # "" overrides the goal controls: no goal
    _ok(panel)


def test_max_cells_subsample_is_seeded_and_said(state, panel):
    state.remove_selection("few")
    panel.max_cells.value = 20
    panel.run(["LYZ"])
    _ok(panel)
    first = panel.run_cells.copy()
    assert len(first) == 20
    pick = np.sort(np.random.default_rng(0).choice(state.adata.n_obs, size=20, replace=False))
    np.testing.assert_array_equal(first, np.asarray(state.adata.obs_names[pick]))
    assert "random subsample" in panel.message_text  # says the run is a subsample
    panel.run(["LYZ"])
    np.testing.assert_array_equal(panel.run_cells, first)


def test_export_csv_and_uns_only_when_asked(state, panel, tmp_path):
    summary = panel.run(GENES[:2])
    out = panel.export(tmp_path / "summary.csv")
    _ok(panel)
    pd.testing.assert_frame_equal(pd.read_csv(out), summary, check_dtype=False, rtol=1e-6)
    panel.export_path.value = str(tmp_path / "cells.csv")
    assert panel.export(table="cells") == tmp_path / "cells.csv"
    back = pd.read_csv(tmp_path / "cells.csv")
    assert len(back) == len(panel.cells_table) == 2 * N_CELLS
    panel.export_path.value = str(tmp_path / "button.csv")
    panel.export_button.click()
    _ok(panel)
    assert sorted(os.listdir(tmp_path)) == ["button.csv", "cells.csv", "summary.csv"]  # no temp files left
    assert "perturbation" not in state.adata.uns

    panel.store_uns.value = True
    panel.uns_key.value = "my_perturb"
    panel.run(["LYZ"])
    _ok(panel)
    stored = state.adata.uns["my_perturb"]
    pd.testing.assert_frame_equal(stored["summary"], panel.summary)
    assert "adata.uns['my_perturb']" in panel.message_text


# ================================================================================ bad in-silico inputs
def test_no_model_or_data(tmp_path):
    alone = PerturbationPanel()
    assert alone.run(["CD3E"]) is None
    assert isinstance(alone.last_error, DataError) and "No data loaded" in alone.message_text
    assert alone.export(tmp_path / "x.csv") is None
    assert "Nothing to export" in alone.message_text
    assert alone.train_response() is None and "No data loaded" in alone.message_text
    assert alone.predict("A+ctrl") is None
    assert isinstance(alone.last_error, ConfigError) and "No response model" in alone.message_text
    assert alone.save_response(tmp_path / "m") is None and "No response model to save" in alone.message_text
    assert alone.stop() is None and "Nothing to stop" in alone.message_text
    from cellkit.datasets import pbmc_demo

    alone.state.set_adata(pbmc_demo())
    assert alone.run(["CD3E"]) is None and "No model loaded" in alone.message_text


def test_bad_in_silico_inputs_show_messages_and_panel_stays_usable(state, panel, tmp_path):
    good = panel.run(["LYZ"])
    _ok(panel)

    assert panel.run(["CD3X"]) is None
    assert isinstance(panel.last_error, UnknownGeneError)
    assert (
        "'CD3X'" in panel.message_text
        and "did you mean" in panel.message_text
        and "CD3G" in panel.message_text
    )
    panel.genes.value = "  ,  "
    assert panel.run() is None
    assert isinstance(panel.last_error, ConfigError) and "at least one gene" in panel.message_text
    assert panel.run(["LYZ"], mode="knockout") is None and "mode must be one of" in panel.message_text
    assert panel.run(["LYZ"], goal="nope") is None and "no selection named 'nope'" in panel.message_text
    assert panel.run(["LYZ"], goal=("bulk_labels", "no such type")) is None
    assert "no cell has obs['bulk_labels']" in panel.message_text
    assert panel.run(["LYZ"], goal=("missing", "x")) is None and "not an obs column" in panel.message_text
    assert panel.run(["LYZ"], n_null=500) is None  # more null genes than the expression group holds
    assert isinstance(panel.last_error, ConfigError) and "n_null=500" in panel.message_text
    panel.store_uns.value, panel.uns_key.value = True, " "
    assert panel.run(["LYZ"]) is None and "adata.uns key" in panel.message_text
    panel.store_uns.value = False
    state.selections = {**state.selections, "empty": np.array([], dtype=str)}
    state.active_selection = "empty"
    assert panel.run(["LYZ"]) is None and "is empty" in panel.message_text
    state.active_selection = "few"

    assert panel.export(tmp_path / "no_such_dir" / "a.csv") is None
    assert "does not exist" in panel.message_text
    assert panel.export(tmp_path) is None and "is a folder" in panel.message_text
    assert panel.export("") is None and "Enter the CSV file path" in panel.message_text
    assert panel.export(tmp_path / "a.csv", table="nope") is None
    assert os.listdir(tmp_path) == []

    # nothing was lost and the panel still works
    pd.testing.assert_frame_equal(panel.summary, good)
    again = panel.run(["LYZ"])
    _ok(panel)
    pd.testing.assert_frame_equal(again, good)
    assert "perturbation" not in state.adata.uns


# ================================================================================ response model
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

    table = panel.response_table
    ctrl = result.control_cells.mean(axis=0)
    one = table[table["perturbation"] == single].set_index("gene").loc[result.genes]
    np.testing.assert_allclose(one["predicted_change"], pred[single].to_numpy(np.float64) - ctrl, atol=1e-5)
    assert one["observed_change"].notna().all()
    assert table.loc[table["perturbation"] == double, "observed_change"].isna().all()
    adata = trained.state.adata
    x = adata.X
    lab = adata.obs["condition"].astype(str).to_numpy()
    observed = x[lab == single].mean(0) - x[lab == "ctrl"].mean(0)
    np.testing.assert_allclose(one["observed_change"], observed, atol=1e-5)

    assert [tr.name for tr in panel.response_fig.data] == [single, double, f"{single} observed"]
    assert [tr.type for tr in panel.response_fig.data] == ["bar", "bar", "scatter"]
    assert len(panel.response_fig.data[0].x) == 8
    ev = cellkit.evaluate_perturbation(adata, pred[[single]])
    pd.testing.assert_frame_equal(panel.evaluation, ev)
    assert single in panel.evaluation.index and double not in panel.evaluation.index  # no observed cells
    assert double in panel.message_text  # ... and the message names it
    assert "pearson_delta" in panel.response_html.value

    out = panel.export(tmp_path / "pred.csv", table="prediction")
    back = pd.read_csv(out)
    assert len(back) == 2 * len(result.genes)
    np.testing.assert_allclose(back["predicted_change"], table["predicted_change"], rtol=1e-5)


def test_predict_bad_inputs(trained):
    panel, result = trained.panel, trained.result
    good = panel.predict([_seen_single(result)])
    _ok(panel)
    unseen = next(g for g in result.genes if g not in result.seen_genes)
    assert panel.predict(f"{unseen}+ctrl") is None
    assert isinstance(panel.last_error, DataError) and "never perturbed in training" in panel.message_text
    assert panel.predict("NOTAGENE+ctrl") is None
    assert isinstance(panel.last_error, UnknownGeneError) and "'NOTAGENE'" in panel.message_text
    assert panel.predict("G0008+") is None and "has an empty part" in panel.message_text
    assert panel.predict("ctrl+ctrl") is None and "names no gene" in panel.message_text
    assert panel.predict(" , ") is None and "at least one perturbation" in panel.message_text
    again = panel.predict([_seen_single(result)])
    _ok(panel)
    pd.testing.assert_frame_equal(again, good)


def test_save_load_round_trip(trained, tmp_path):
    panel, result = trained.panel, trained.result
    where = panel.save_response(tmp_path / "response")
    _ok(panel)
    assert (where / "perturbation.json").is_file()
    panel.model_path.value = str(where)
    panel.save_button.click()  # saving over a saved model is fine
    _ok(panel)

    other = PerturbationPanel()  # alone, no data: predictions only
    loaded = other.load_response(where)
    _ok(other)
    assert loaded.status == "loaded" and loaded.seen_genes == result.seen_genes
    assert list(other.loss_fig.data[0].x) == [r["step"] for r in result.history.step_records]
    labels = [_seen_single(result), _unseen_double(result)]
    pd.testing.assert_frame_equal(other.predict(labels), result.predict(labels), atol=1e-5)
    assert other.evaluation is None and other.response_table["observed_change"].isna().all()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    assert panel.save_response(tmp_path / "busy") is None and "not empty" in panel.message_text
    assert other.load_response(tmp_path / "nothing") is None and "does not exist" in other.message_text
    assert other.load_response(tmp_path / "busy") is None
    assert isinstance(other.last_error, CheckpointError)
    assert other.load_response("") is None and "Enter the directory" in other.message_text
    assert other.response_model is loaded  # a failed load keeps the model


def test_train_bad_inputs(pbmc):
    panel = PerturbationPanel(StudioState(adata=pbmc))
    assert panel.train_response(epochs=1) is None
    assert isinstance(panel.last_error, DataError) and "Choose the condition column" in panel.message_text
    assert (
        panel.train_response(condition_key="condition") is None and "not an obs column" in panel.message_text
    )
    assert panel.train_response(condition_key="bulk_labels") is None  # "CD34+" has an empty part
    assert "do not parse" in panel.message_text and "'CD34+'" in panel.message_text
    assert panel.train_response(condition_key="louvain") is None  # cluster numbers parse: no control
    assert "No control cells" in panel.message_text

    data = _synthetic()
    panel.state.set_adata(data)
    panel.control.value = "control"
    assert panel.train_response(**ARCH) is None and "No control cells" in panel.message_text
    assert "'control'" in panel.message_text
    panel.control.value = "ctrl"
    assert (
        panel.train_response(epochs=0) is None and "Epochs must be a positive integer" in panel.message_text
    )
    assert panel.train_response(callbacks=[]) is None and "set by the panel" in panel.message_text
    bad = data.copy()
    bad.obs["condition"] = bad.obs["condition"].astype(str)
    bad.obs.iloc[-1, bad.obs.columns.get_loc("condition")] = "G0001+"
    panel.state.set_adata(bad)
    assert panel.train_response(**ARCH) is None and "do not parse" in panel.message_text
    only_ctrl = data[data.obs["condition"] == "ctrl"].copy()
    panel.state.set_adata(only_ctrl)
    assert panel.train_response(**ARCH) is None and "Every cell is a control" in panel.message_text
    assert panel.response_model is None and panel.phase == "idle"


def test_stop_mid_training_keeps_the_partial_model_and_refuses_other_jobs():
    panel = PerturbationPanel(StudioState(adata=_synthetic()))
    while_busy: list[str] = []

    def on_event(ev):
        if ev.kind == "step_end" and ev.step == 1:
            panel.run(["G0001"])  # refused: the panel is busy
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
