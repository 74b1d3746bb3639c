"""The shared state, the panel base class and the studio's composition (no browser)."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from cellkit._errors import CellkitError, ConfigError, DataError
from cellkit.widgets import Panel, StudioState, guarded


def test_state_selections(state, pbmc):
    names = state.add_selection("mono", pbmc.obs["bulk_labels"] == "CD14+ Monocyte")
    assert len(names) == int((pbmc.obs["bulk_labels"] == "CD14+ Monocyte").sum())
    assert state.active_selection == "mono"
    np.testing.assert_array_equal(state.selected_cells(), names)
    # positions and names give the same cells, in adata order
    by_pos = state.add_selection("two", [5, 1], activate=False)
    assert list(by_pos) == list(pbmc.obs_names[[1, 5]])
    assert state.active_selection == "mono"
    assert list(state.add_selection("named", list(by_pos[::-1]), activate=False)) == list(by_pos)
    state.remove_selection("mono")
    assert state.active_selection == "" and state.selected_cells() is None
    assert set(state.selections) == {"two", "named"}


@pytest.mark.parametrize(
    ("cells", "match"),
    [
        (np.zeros(3, bool), "boolean mask needs 700"),
        ([700], r"positions must be in \[0, 700\)"),
        (["nope"], "not in the data"),
        ("missing", "No selection named 'missing'"),
        (np.zeros(700, bool), "empty"),
    ],
)
def test_state_bad_selections(state, cells, match):
    before = dict(state.selections)
    with pytest.raises(DataError, match=match):
        state.add_selection("x", cells)
    assert state.selections == before


def test_state_without_data():
    with pytest.raises(DataError, match="No data loaded"):
        StudioState().add_selection("x", [0])


def test_new_data_or_model_drop_stale_tokens(state, pbmc, demo):
    state.tokens = object()
    state.set_model(demo, source="demo")
    assert state.tokens is None and state.model_source == "demo"
    state.tokens = object()
    state.add_selection("a", [0, 1])
    state.set_adata(pbmc[:10].copy(), name="small")
    assert state.tokens is None and state.selections == {} and state.adata_name == "small"


class _Toy(Panel):
    title = "Toy"

    @guarded
    def fail(self, exc):
        raise exc

    @guarded
    def ok(self):
        return 42


def test_guarded_errors_become_messages():
    p = _Toy()
    assert p.ok() == 42 and p.last_error is None
    assert p.fail(DataError("label column 'x' is missing; pick another")) is None
    assert isinstance(p.last_error, DataError)
    assert p.message_text == "label column 'x' is missing; pick another"
    assert "cellkit-error" in p.message.value and "<details>" not in p.message.value
    p.fail(ValueError("boom <b>"))
    assert p.message_text.startswith("Unexpected error — ValueError: boom <b>")
    assert "&lt;b&gt;" in p.message.value  # escaped, never injected
    assert "<details" in p.message.value and "Traceback" in p.message.value
    assert p.ok() == 42 and p.last_error is None  # still usable


def test_background_job_errors_and_busy_flag():
    p = _Toy()
    started, release = threading.Event(), threading.Event()

    def job():
        started.set()
        release.wait(5)
        raise DataError("training failed: no cells")

    p.run_in_background(job, name="toy")
    assert started.wait(5)
    assert p.running and p.state.busy == "toy"
    with pytest.raises(CellkitError, match="already running"):
        p.run_in_background(lambda: None, name="again")
    release.set()
    p.wait(5)
    assert not p.running and p.state.busy == ""
    assert p.message_text == "training failed: no cells"

    seen = []
    p.run_in_background(lambda: 7, name="ok", on_done=seen.append)
    p.wait(5)
    assert seen == [7]


def test_studio_composes_every_panel(pbmc, demo):
    import cellkit

    studio = cellkit.Studio(adata=pbmc, model=demo, adata_name="pbmc")
    assert list(studio.panels) == [
        "Model",
        "Data",
        "Fine-tune",
        "Embeddings",
        "Genes",
        "Attention",
        "In silico",
        "Response",
    ]
    assert [studio.tabs.get_title(i) for i in range(8)] == list(studio.panels)
    assert studio.insilico_panel is studio.panels["In silico"]
    assert studio.response_panel is studio.panels["Response"]
    # one shared state
    assert all(p.state is studio.state for p in studio.panels.values())
    assert studio.state.model is demo and studio.state.adata is pbmc
    assert studio.state.adata_name == "pbmc" and "pbmc" in studio.header.value
    studio.state.add_selection("lasso 1", [0, 1, 2])
    assert studio.state.active_selection == "lasso 1" and len(studio.state.selected_cells()) == 3
    assert "lasso 1" in studio.cells_html.value  # the cells bar follows the state
    assert not studio.all_cells_button.disabled
    # the notebook displays it through repr / _repr_mimebundle_: no panel may shadow widget internals
    assert repr(studio).startswith("Studio(")
    for panel in studio.panels.values():
        assert repr(panel)
    studio.select_tab("Attention")
    assert studio.tabs.selected_index == 5
    with pytest.raises(ConfigError, match="No tab 'Nope'"):
        studio.select_tab("Nope")


def test_studio_demo_shortcut_and_bad_model():
    import cellkit

    studio = cellkit.Studio(model="demo")
    assert studio.state.model_source == "demo" and studio.state.model is not None
    assert "no data" in studio.header.value
    with pytest.raises(ConfigError, match=r"must be a cellkit\.CellModel"):
        cellkit.Studio(model=3.0)
    with pytest.raises(CellkitError):
        cellkit.Studio(model="/definitely/not/a/checkpoint")


def test_panels_work_alone(pbmc, demo):
    from cellkit import widgets

    for name in (
        "ModelPanel",
        "DataPanel",
        "FinetunePanel",
        "EmbeddingPanel",
        "GenePanel",
        "AttentionPanel",
        "InSilicoPanel",
        "PerturbationResponsePanel",
    ):
        panel = getattr(widgets, name)()
        assert isinstance(panel, Panel) and isinstance(panel.state, StudioState)
        panel.state.set_model(demo, source="demo")
        panel.state.set_adata(pbmc, name="pbmc")
        assert panel.last_error is None, (name, panel.last_error)


def test_new_obs_columns_reach_every_panel(pbmc, demo):
    import cellkit

    studio = cellkit.Studio(adata=pbmc, model=demo, adata_name="pbmc")
    version = studio.state.obs_version
    # a panel writes a column (the embedding panel's "also write obs column")
    studio.embedding_panel.select_points(np.arange(20))
    studio.embedding_panel.save_selection("first20", write_obs=True, obs_key="first20")
    assert studio.embedding_panel.last_error is None
    assert studio.state.obs_version == version + 1
    assert "first20" in studio.data_panel.filter_column.options
    assert "first20" in studio.attention_panel.groupby.options
    # any code can announce new columns (e.g. predictions written from the notebook)
    pbmc.obs["my_pred"] = pd.Categorical(np.where(np.arange(700) % 2, "a", "b"))
    studio.state.obs_changed()
    assert "my_pred" in studio.data_panel.filter_column.options
    assert "my_pred" in studio.finetune_panel.label_key.options
    assert "my_pred" in [v for _, v in studio.embedding_panel.color_dropdown.options]
    assert "my_pred" in studio.gene_panel.groupby_dropdown.options
    assert "my_pred" in studio.insilico_panel.goal_column.options
    assert "my_pred" in [v for _, v in studio.response_panel.condition_key.options]


def test_live_figures_can_be_built():
    """plotly's FigureWidget (every live plot of the studio) needs anywidget, which plotly does not
    declare: a fresh install without it breaks every panel (found by a clean-clone CI run)."""
    import plotly.graph_objects as go

    fig = go.FigureWidget()
    fig.add_scatter(x=[0, 1], y=[1, 0])
    assert len(fig.data) == 1


# ------------------------------------------------------------------ issue 17: one place chooses the cells
def test_all_cells_releases_a_saved_selection_in_every_tab(pbmc, demo):
    """A saved selection, then "All cells" in the Data tab: every panel (and the fine-tune) uses all cells."""
    import cellkit

    studio = cellkit.Studio(adata=pbmc, model=demo, adata_name="pbmc")
    state, data, ft = studio.state, studio.data_panel, studio.finetune_panel
    assert studio.all_cells_button.disabled and state.n_selected() == 700
    assert data.set_cells(query="bulk_labels == 'CD14+ Monocyte'") == 129
    assert data.save_selection("mono") is not None and state.active_selection == "mono"
    assert state.n_selected() == 129 and len(ft.settings()["cells"]) == 129
    assert "mono" in studio.cells_html.value and "mono" in ft.cells_html.value
    # the Data tab's "All cells" releases it everywhere
    data.cell_mode.value = "all"
    assert state.active_selection == "" and state.selected_cells() is None
    assert ft.settings()["cells"] is None and state.n_selected() == 700
    assert "mono" not in studio.cells_html.value and "mono" not in ft.cells_html.value
    assert studio.all_cells_button.disabled and "mono" in state.selections  # kept, not active
    # the Data tab's selection dropdown activates it again; the cells bar's button releases it
    data.cell_mode.value = "selection"
    data.selection.value = "mono"
    assert state.active_selection == "mono" and len(ft.settings()["cells"]) == 129
    studio.all_cells_button.click()
    assert state.active_selection == "" and data.cell_mode.value == "all"
    assert ft.settings()["cells"] is None


def test_a_data_filter_is_the_active_selection(pbmc, demo):
    import cellkit
    from cellkit.widgets._state import DATA_FILTER

    studio = cellkit.Studio(adata=pbmc, model=demo, adata_name="pbmc")
    state, data, ft = studio.state, studio.data_panel, studio.finetune_panel
    data.set_cells(column="bulk_labels", values=["CD19+ B"])
    assert state.active_selection == DATA_FILTER and state.n_selected() == 95
    assert len(ft.settings()["cells"]) == 95 and DATA_FILTER in studio.cells_html.value
    data.filter_values.value = ("CD19+ B", "Dendritic")  # as a user clicks: follows at once
    assert state.n_selected() == 95 + int((pbmc.obs["bulk_labels"] == "Dendritic").sum())
    data.filter_values.value = ()  # unfinished: the state keeps the last valid choice
    assert state.active_selection == DATA_FILTER and "at least one value" in data.cell_count.value
    data.cell_mode.value = "all"
    assert state.active_selection == "" and DATA_FILTER not in state.selections
    # a lasso saved elsewhere takes over the chooser; "Clear selection" under the lasso releases it
    studio.embedding_panel.select_points([0, 1, 2, 3])
    studio.embedding_panel.save_selection("lasso")
    assert state.active_selection == "lasso" and data.cell_mode.value == "selection"
    studio.embedding_panel.clear_button.click()
    assert state.active_selection == "" and data.cell_mode.value == "all"
    assert "lasso" in state.selections


def test_saving_all_cells_as_a_selection(pbmc, demo):
    from cellkit.widgets import DataPanel

    state = StudioState(adata=pbmc, model=demo)
    data = DataPanel(state, namespace={})
    names = data.save_selection("everything")
    assert data.last_error is None and len(names) == 700
    assert state.active_selection == "everything" and data.cell_mode.value == "selection"
    assert data.save_selection("data filter") is None and "live filter" in data.message_text
    assert data.save_selection("  ") is None and "name" in data.message_text


# ------------------------------------------------------------------ issue 17: a failed action keeps earlier results
def test_failed_actions_keep_the_earlier_results(state, tmp_path, monkeypatch):
    """In silico, gene and response panels: a run that fails leaves the last result shown and usable."""
    import cellkit
    import cellkit.analysis as ca
    from cellkit.widgets import GenePanel, InSilicoPanel, PerturbationResponsePanel

    def boom(*_a, **_k):
        raise RuntimeError("simulated failure")

    # in silico: a result, then a run that fails in its thread
    insilico = InSilicoPanel(state)
    state.add_selection("few", np.arange(20))
    first = insilico.run("LYZ", n_null=0)
    assert first is not None, insilico.message_text
    summary = insilico.summary_html.value
    monkeypatch.setattr(ca, "in_silico_perturb", boom)
    insilico.run("CST3", n_null=0, background=True)
    insilico.wait(60)
    assert "simulated failure" in insilico.message_text and insilico.phase == "idle"
    assert insilico.result is first and insilico.summary_html.value == summary
    assert not insilico.run_button.disabled and insilico.export(tmp_path / "kept.csv") is not None
    monkeypatch.undo()

    # genes: contextual embeddings that fail keep the token embeddings and the search
    genes = GenePanel(state)
    table = genes.search("CST3", k=5)
    assert table is not None
    emb = genes.embeddings
    monkeypatch.setattr(ca, "contextual_gene_embeddings", boom)
    assert genes.compute_embeddings("contextual") is None and "simulated failure" in genes.message_text
    assert genes.embeddings is emb and genes.kind == "token" and genes.table is table
    assert genes.export(tmp_path / "genes.csv") is not None
    monkeypatch.undo()

    # response: a trained model, then a training run that fails
    from cellkit.datasets import synthetic_perturbation

    perturb = synthetic_perturbation(
        n_genes=30, n_control=60, n_cells_per_perturbation=15, n_single=4, n_double=2, seed=0
    )
    tiny = cellkit.PerturbationArchitecture(d_model=16, n_heads=2, n_layers=1, d_ff=32)
    response = PerturbationResponsePanel(StudioState(adata=perturb))
    model = response.train(epochs=1, architecture=tiny, batch_size=32)
    assert model is not None, response.message_text
    monkeypatch.setattr(cellkit, "fit_perturbation_model", boom)
    assert response.train(epochs=1, architecture=tiny, batch_size=32) is None
    assert "simulated failure" in response.message_text
    assert response.response_model is model and "kept" in response.live.status_html.value
    assert not response.save_button.disabled and not response.predict_button.disabled
