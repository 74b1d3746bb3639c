"""InSilicoPanel: in-silico perturbation on the demo model + real PBMCs (run with OMP_NUM_THREADS=1).

Runs use 24 cells (the active selection), so the file stays well under a minute. Every run is
compared with the API call it stands for: the panel adds controls and figures, no numbers.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

import cellkit.analysis as ca
from cellkit import ConfigError, DataError, UnknownGeneError
from cellkit.widgets import InSilicoPanel

GENES = ["CD3E", "LYZ", "MS4A1"]
N_CELLS = 24
TIMEOUT = 120


def _ok(panel: InSilicoPanel) -> None:
    assert panel.last_error is None, panel.message_text


def _finish(panel: InSilicoPanel) -> None:
    panel.wait(TIMEOUT)
    assert not panel.running, "the background job did not end in time"


@pytest.fixture
def panel(state):
    state.add_selection("few", np.arange(N_CELLS))
    return InSilicoPanel(state)


def _direct(state, panel, **kw):
    """The API call the panel should have made for its last run."""
    return ca.in_silico_perturb(
        state.adata,
        state.model,
        cells=state.selected_cells(),
        max_cells=int(panel.max_cells.value),
        key_added=None,
        progress=False,
        **kw,
    )


def _same(got, expected):
    pd.testing.assert_frame_equal(got.summary, expected.summary, rtol=1e-6)
    pd.testing.assert_frame_equal(got.cells, expected.cells, rtol=1e-6)


# ================================================================================ controls
def test_controls_follow_state(state, panel):
    assert panel.title == "In silico"
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
    assert not panel.run_button.disabled

    state.adata.obs["new_col"] = pd.Categorical(["a"] * state.adata.n_obs)
    state.obs_changed()
    assert "new_col" in panel.goal_column.options
    state.set_model(None)
    assert panel.gene_picker.options == ()
    from cellkit.datasets import synthetic_perturbation

    state.set_adata(synthetic_perturbation(n_genes=30, n_control=60, n_single=4, n_double=2, seed=0))
    assert panel.goal_selection.options == ()
    assert f"all {state.adata.n_obs} cells" in panel.cells_html.value


# ================================================================================ runs
def test_null_sentence_names_what_stands_out_and_what_does_not():
    from cellkit.widgets._insilico import _null_sentence

    summary = pd.DataFrame(
        {
            "perturbation": ["A", "B", "C"],
            "p": [0.01, 0.4, 0.8],
            "z": [5.0, 0.3, -1.0],
            "distinguishable": [True, False, False],
        }
    )
    text = _null_sentence(summary, 20)
    assert "A: shift the cells more than random genes do" in text
    assert "B, C: not distinguishable from random genes (p 0.4–0.8)" in text
    assert "smallest possible p" not in text
    assert "smallest possible p is 0.2" in _null_sentence(summary, 4)
    assert "No null computed" in _null_sentence(summary.assign(p=np.nan, distinguishable=False), 0)


def test_run_matches_api_and_draws_one_bar_and_violin_per_perturbation(state, panel):
    uns_before, obs_before = set(state.adata.uns), list(state.adata.obs.columns)
    result = panel.run(GENES, n_null=3)
    _ok(panel)
    assert isinstance(result, ca.InSilicoResult) and result is panel.result
    assert result.params["n_cells"] == N_CELLS
    expected = _direct(state, panel, genes=GENES, mode="delete", n_null=3, seed=0)
    _same(result, expected)
    summary = result.summary
    assert list(summary["perturbation"]) == GENES and state.active_selection == "few"
    assert "CD3E" in panel.summary_html.value and "mean_shift" in panel.summary_html.value
    # the table shows the columns a biologist reads; the result (and the CSV) keeps them all
    assert "<th>distinguishable</th>" in panel.summary_html.value and "<th>p</th>" in panel.summary_html.value
    for hidden in ("null_std", "median_shift", "mean_cosine", "genes"):
        assert f"<th>{hidden}</th>" not in panel.summary_html.value and hidden in summary
    # 3 random genes: p is at least 0.25, so no shift is distinguishable, and the message says so
    assert not summary["distinguishable"].any()
    assert "not distinguishable from random genes" in panel.message_text
    assert "smallest possible p is 0.25" in panel.message_text

    # the figures are cellkit.viz's, shown in the panel's FigureWidgets
    bars, null, legend = panel.shift_fig.data
    assert set(bars.marker.color) == {"#c7c7c7"}  # grey: not distinguishable
    assert legend.name.startswith("not distinguishable from random genes")
    assert bars.type == "bar" and list(bars.x) == GENES
    np.testing.assert_allclose(bars.y, summary["mean_shift"], rtol=1e-9)
    assert null.type == "scatter" and list(null.x) == GENES
    np.testing.assert_allclose(null.y, summary["null_mean"], rtol=1e-9)
    np.testing.assert_allclose(null.error_y.array, summary["null_std"], rtol=1e-9)
    assert panel.shift_fig.layout.width == 480 and panel.shift_fig.layout.height == 340

    assert [tr.type for tr in panel.cells_fig.data] == ["violin"] * 3
    assert [tr.name for tr in panel.cells_fig.data] == GENES
    cells = expected.cells
    for tr, gene in zip(panel.cells_fig.data, GENES, strict=True):
        rows = cells[(cells["perturbation"] == gene) & cells["counted"]]
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
    assert panel.phase in ("perturbing", "idle")
    _finish(panel)
    _ok(panel)
    summary = panel.result.summary
    assert list(summary["perturbation"]) == ["CD3E+LYZ"]
    assert summary["n_cells"].iloc[0] == N_CELLS  # overexpress counts every cell
    _same(panel.result, _direct(state, panel, genes=["CD3E", "LYZ"], combos=True, mode="overexpress"))
    assert list(panel.shift_fig.data[0].x) == ["CD3E+LYZ"]
    assert len(panel.shift_fig.data) == 1  # no null without n_null
    assert "No null computed" in panel.message_text
    assert panel.shift_fig.layout.annotations[0].text.startswith("no null computed")
    assert len(panel.cells_fig.data) == 1
    assert panel.phase == "idle" and not panel.run_button.disabled
    assert panel.last_error is None and panel.result.params["mode"] == "overexpress"

    explicit = panel.run(combos=[("CD3E", "LYZ"), ("MS4A1",)], mode="delete")
    _ok(panel)
    assert list(explicit.summary["perturbation"]) == ["CD3E+LYZ", "MS4A1"]


def test_goal_from_obs_value_and_from_selection(state, panel):
    panel.goal_kind.value = "obs"
    panel.goal_column.value = "bulk_labels"
    panel.goal_value.value = "CD56+ NK"
    result = panel.run(["LYZ"], mode="overexpress")
    _ok(panel)
    goal = (state.adata.obs["bulk_labels"] == "CD56+ NK").to_numpy()  # 31 cells < max cells
    _same(result, _direct(state, panel, genes=["LYZ"], mode="overexpress", goal=goal))
    assert "goal_shift" in result.summary
    assert int(goal.sum()) == 31 and "CD56+ NK" in panel.message_text  # the goal is named
    assert [tr.name for tr in panel.shift_fig.data] == ["mean shift", "shift toward goal"]
    np.testing.assert_allclose(panel.shift_fig.data[1].y, result.summary["goal_shift"], rtol=1e-9)

    state.add_selection("target", np.arange(100, 110), activate=False)
    by_sel = panel.run(["LYZ"], mode="overexpress", goal="target")
    _ok(panel)
    _same(by_sel, _direct(state, panel, genes=["LYZ"], mode="overexpress", goal=np.arange(100, 110)))
    assert "goal_shift" not in panel.run(["LYZ"], goal="").summary  # "" overrides the goal controls: no goal
    _ok(panel)


def test_max_cells_subsample_is_seeded_and_said(state, panel):
    state.remove_selection("few")
    panel.max_cells.value = 20
    panel.run(["LYZ"])
    _ok(panel)
    first = panel.result.cells["cell"].unique()
    assert len(first) == 20
    pick = np.sort(np.random.default_rng(0).choice(state.adata.n_obs, size=20, replace=False))
    np.testing.assert_array_equal(first, np.asarray(state.adata.obs_names[pick]))
    assert panel.result.params["n_cells_selected"] == state.adata.n_obs
    assert "random subsample" in panel.message_text  # says the run is a subsample
    panel.run(["LYZ"])
    np.testing.assert_array_equal(panel.result.cells["cell"].unique(), first)


def test_export_csv_and_uns_only_when_asked(state, panel, tmp_path):
    summary = panel.run(GENES[:2]).summary
    out = panel.export(tmp_path / "summary.csv")
    _ok(panel)
    pd.testing.assert_frame_equal(pd.read_csv(out), summary, check_dtype=False, rtol=1e-6)
    panel.export_path.value = str(tmp_path / "cells.csv")
    assert panel.export(table="cells") == tmp_path / "cells.csv"
    back = pd.read_csv(tmp_path / "cells.csv")
    assert len(back) == len(panel.result.cells) == 2 * N_CELLS
    panel.export_path.value = str(tmp_path / "button.csv")
    panel.export_button.click()
    _ok(panel)
    assert sorted(os.listdir(tmp_path)) == ["button.csv", "cells.csv", "summary.csv"]  # no temp files left
    assert "perturbation" not in state.adata.uns

    panel.store_uns.value = True
    panel.uns_key.value = "my_perturb"
    panel.run(["LYZ"])
    _ok(panel)
    stored = ca.InSilicoResult.from_dict(state.adata.uns["my_perturb"])
    pd.testing.assert_frame_equal(stored.summary, panel.result.summary)
    assert "adata.uns['my_perturb']" in panel.message_text


# ================================================================================ bad inputs
def test_no_model_or_data(tmp_path):
    alone = InSilicoPanel()
    assert alone.run(["CD3E"]) is None
    assert isinstance(alone.last_error, DataError) and "No data loaded" in alone.message_text
    assert alone.export(tmp_path / "x.csv") is None
    assert "Nothing to export" in alone.message_text
    from cellkit.datasets import pbmc_demo

    alone.state.set_adata(pbmc_demo())
    assert alone.run(["CD3E"]) is None and "No model loaded" in alone.message_text


def test_bad_inputs_show_the_api_messages_and_panel_stays_usable(state, panel, tmp_path):
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
    assert panel.run(["LYZ"], goal="nope") is None and "'nope'" in panel.message_text
    assert isinstance(panel.last_error, DataError)
    assert panel.run(["LYZ"], goal=("bulk_labels", "no such type")) is None
    assert isinstance(panel.last_error, DataError) and "goal" in panel.message_text
    assert "no such type" in panel.message_text
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
    assert panel.result is good
    again = panel.run(["LYZ"])
    _ok(panel)
    _same(again, good)
    assert "perturbation" not in state.adata.uns


def test_an_error_in_the_background_is_shown_and_the_buttons_come_back(state, panel):
    panel.run_button.click()  # the genes box is empty: the API refuses it, in the thread
    _finish(panel)
    assert isinstance(panel.last_error, ConfigError) and "at least one gene" in panel.message_text
    assert panel.phase == "idle" and not panel.run_button.disabled and panel.result is None
