"""AttentionPanel on the demo model and the real PBMCs (a handful of cells; run with OMP_NUM_THREADS=1)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

import cellkit.analysis as ca
from cellkit import ConfigError, DataError, UnknownGeneError
from cellkit.widgets import AttentionPanel, StudioState


@pytest.fixture
def panel(state):
    p = AttentionPanel(state)
    p.max_genes.value = 12
    return p


def _cell(state, i: int = 0) -> str:
    return str(state.adata.obs_names[i])


def _ok(panel) -> None:
    assert panel.last_error is None, panel.message_text


# ---------------------------------------------------------------------------------- controls
def test_controls_follow_state(state, panel):
    assert [v for _, v in panel.layer.options] == [0, 1]
    assert panel.layer.value == 1  # default: last layer
    assert [v for _, v in panel.head.options] == ["average", *range(8)]
    assert "bulk_labels" in panel.groupby.options
    assert _cell(state) in panel.cell.options
    assert panel.figure._dom_classes == ("cellkit-attention-heatmap",)

    state.add_selection("first ten", np.arange(10))
    assert ("first ten", "first ten") in panel.selection.options
    assert panel.selection.value == "first ten"  # follows the active selection
    assert ("first ten", "first ten") in panel.condition.options

    state.remove_selection("first ten")
    assert panel.selection.value == "__all__"
    state.set_model(None)
    assert panel.layer.options == ()


# ---------------------------------------------------------------------------------- single cell
def test_single_cell_map_matches_api(state, panel):
    name = _cell(state)
    panel.set_cell(name)
    panel.include_special.value = True
    m = panel.show()
    _ok(panel)
    (ref,) = ca.attention_maps(state.adata, state.model, cells=[name], hidden_layer=1)
    expected = ref.frame()  # mean over heads, <cls> included
    assert m.shape == expected.shape == (len(ref.tokens), len(ref.tokens))
    assert list(m.index) == list(m.columns) == list(ref.tokens)
    np.testing.assert_allclose(m.to_numpy(), expected.to_numpy(), rtol=1e-6, atol=1e-7)

    # the heatmap: gene labels and values of the max_genes most attended genes
    tr = panel.figure.data[0]
    assert len(tr.x) == len(tr.y) == 12
    np.testing.assert_allclose(np.asarray(tr.z), m.loc[list(tr.y), list(tr.x)].to_numpy(), rtol=1e-6)
    assert name in panel.figure.layout.title.text
    assert tr.zmid is None

    # special tokens left out by default; the map is the same submatrix
    panel.include_special.value = False
    m2 = panel.show()
    assert "<cls>" not in m2.index
    assert m2.shape == (m.shape[0] - 1, m.shape[1] - 1)
    np.testing.assert_allclose(m2.to_numpy(), m.loc[m2.index, m2.columns].to_numpy())
    assert set(panel.gene.options) == set(m2.columns)


def test_first_of_selection_and_head_choice(state, panel):
    state.add_selection("some", np.arange(5, 9))
    assert panel.use_first_of_selection() == _cell(state, 5)
    assert panel.cell.value == _cell(state, 5)
    avg = panel.show()
    panel.head.value = 2
    h2 = panel.show()
    _ok(panel)
    (ref,) = ca.attention_maps(state.adata, state.model, cells=[_cell(state, 5)], hidden_layer=1, heads=[2])
    np.testing.assert_allclose(h2.to_numpy(), ref.frame(2).drop(index="<cls>", columns="<cls>").to_numpy())
    assert not np.allclose(avg.to_numpy(), h2.to_numpy())
    # a layer override (valid) also changes the map
    l0 = panel.show(layer=0)
    assert l0.shape == h2.shape
    assert not np.allclose(l0.to_numpy(), h2.to_numpy())


# ---------------------------------------------------------------------------------- groups
def test_group_map_from_named_selection(state, panel):
    cells = np.asarray(state.adata.obs_names[[3, 10, 40, 77]])
    state.add_selection("picked", cells, activate=False)
    panel.set_group("picked")
    assert panel.mode.value == "selection"
    m = panel.show()
    _ok(panel)
    ref = ca.gene_attention(state.adata, state.model, cells=state.selections["picked"], hidden_layer=1)
    pd.testing.assert_frame_equal(m, ref)
    assert m.attrs["n_cells"] == 4
    # the trace was updated in place (one heatmap trace)
    assert len(panel.figure.data) == 1
    assert len(panel.figure.data[0].x) == 12


def test_genes_box_restricts_the_map(state, panel):
    state.add_selection("three", np.arange(3))
    panel.set_group("three")
    panel.genes.value = "LYZ, CD74 HLA-DRA,LYZ"
    m = panel.show()
    _ok(panel)
    ref = ca.gene_attention(
        state.adata, state.model, cells=state.selections["three"], hidden_layer=1, genes=["LYZ", "CD74", "HLA-DRA"]
    )
    pd.testing.assert_frame_equal(m, ref)
    panel.set_cell(_cell(state))
    one = panel.show()
    _ok(panel)
    assert set(one.index) <= {"LYZ", "CD74", "HLA-DRA"}
    panel.genes.value = "LYZ NOTAGENE1"
    assert panel.show() is None
    assert "not in the model's vocabulary" in panel.message_text


def test_group_subsample_is_capped_and_seeded(state, panel):
    panel.set_group(groupby="bulk_labels", group="CD56+ NK")
    assert panel.mode.value == "obs"
    panel.max_cells.value = 3
    m1 = panel.show()
    _ok(panel)
    assert m1.attrs["n_cells"] == 3
    assert "random subsample" in panel.message_text  # says the map is a subsample
    m2 = panel.show()
    pd.testing.assert_frame_equal(m1, m2)  # same subsample every time


def test_statistic_grn(state, panel):
    state.add_selection("few", np.arange(3))
    panel.set_group("few")
    panel.statistic.value = "grn"
    m = panel.show()
    _ok(panel)
    ref = ca.gene_attention(state.adata, state.model, cells=state.selections["few"], hidden_layer=1, statistic="grn")
    pd.testing.assert_frame_equal(m, ref)
    assert m.attrs["statistic"] == "grn"
    # single cell with grn: that one cell's rank statistic
    panel.set_cell(_cell(state, 1))
    one = panel.show()
    _ok(panel)
    assert one.attrs["statistic"] == "grn"
    assert one.attrs["n_cells"] == 1
    assert np.nanmax(one.to_numpy()) <= 1.0


def test_background_show(state, panel):
    panel.set_cell(_cell(state, 2))
    assert panel.show(background=True) is None
    panel.wait(60)
    _ok(panel)
    assert panel.matrix is not None
    assert panel.matrix.shape[0] > 100
    assert state.busy == ""


# ---------------------------------------------------------------------------------- top genes
def test_top_genes_table(state, panel):
    panel.set_cell(_cell(state))
    m = panel.show()
    gene = str(m.columns[5])
    top = panel.top_genes(gene, k=7)
    _ok(panel)
    pd.testing.assert_frame_equal(top, ca.top_influenced_genes(m, gene, k=7))
    assert list(top.columns[:3]) == ["rank", "gene", "score"]
    assert len(top) == 7
    assert panel.table is top
    assert "attending most to" in panel.top_html.value
    assert "cellkit-table" in panel.top_html.value
    # the other direction: the genes `gene` attends to (its row)
    row = panel.top_genes(gene, k=7, direction="attended")
    expected = m.loc[gene].drop(gene).sort_values(ascending=False, kind="stable").head(7)
    assert list(row["gene"]) == list(expected.index)
    assert "attends to most" in panel.top_html.value


# ---------------------------------------------------------------------------------- difference
def test_difference_selections_match_api_and_zmid(state, pbmc, panel):
    first = pbmc.obs.iloc[:60]
    mono = first.index[first["bulk_labels"] == "CD14+ Monocyte"][:4]
    dend = first.index[first["bulk_labels"] == "Dendritic"][:4]
    state.add_selection("mono", mono)
    state.add_selection("dend", dend)
    table = panel.difference("mono", "dend")
    _ok(panel)
    ref = ca.attention_difference(
        pbmc,
        state.model,
        groupby="bulk_labels",
        condition="CD14+ Monocyte",
        control="Dendritic",
        cells=np.concatenate([mono, dend]),
        hidden_layer=1,
    )
    cols = ["query_gene", "key_gene", "condition", "control", "difference"]
    pd.testing.assert_frame_equal(table[cols], ref[cols])
    assert table.attrs["n_cells_condition"] == 4
    assert table.attrs["n_cells_control"] == 4
    # the heatmap: condition − control with a symmetric diverging scale around 0
    tr = panel.figure.data[0]
    assert tr.zmid == 0
    assert tr.zmin == -tr.zmax
    assert tr.zmax > 0
    z = np.asarray(tr.z, dtype=float)
    assert np.nanmax(np.abs(z)) <= tr.zmax + 1e-12
    assert panel.matrix.loc[ref["query_gene"][0], ref["key_gene"][0]] == pytest.approx(ref["difference"][0])
    assert panel.diff_table is table
    assert panel.kind == "difference"
    # switching back to a plain map resets the colour range
    panel.set_cell(_cell(state))
    panel.show()
    tr = panel.figure.data[0]
    assert tr.zmid is None
    assert tr.zmin is None
    assert tr.zmax is None


def test_difference_obs_column(state, pbmc, panel):
    panel.max_cells.value = 3
    panel.diff_source.value = "obs"
    panel.diff_groupby.value = "bulk_labels"
    panel.condition.value = "CD56+ NK"
    panel.control.value = "CD34+"
    table = panel.difference()
    _ok(panel)
    assert table.attrs["groupby"] == "bulk_labels"
    assert table.attrs["n_cells_condition"] == 3
    assert table.attrs["n_cells_control"] == 3
    assert "random subsample" in panel.message_text
    assert panel.figure.data[0].zmid == 0


# ---------------------------------------------------------------------------------- export
def test_export_map_and_table(state, panel, tmp_path):
    panel.set_cell(_cell(state))
    m = panel.show()
    out = panel.export(tmp_path / "map.csv")
    _ok(panel)
    back = pd.read_csv(out, index_col=0)
    np.testing.assert_allclose(back.to_numpy(), m.to_numpy(), rtol=1e-6)
    assert list(back.index) == list(m.index)
    assert list(back.columns) == list(m.columns)

    top = panel.top_genes(str(m.columns[0]), k=5)
    panel.path.value = str(tmp_path / "top.csv")
    panel.save_button.click()
    _ok(panel)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "top.csv"), top, check_dtype=False)
    assert sorted(os.listdir(tmp_path)) == ["map.csv", "top.csv"]  # no temporary files left


# ---------------------------------------------------------------------------------- bad inputs
def test_no_model_or_data():
    alone = AttentionPanel()
    assert alone.show() is None
    assert isinstance(alone.last_error, DataError)
    assert "No data loaded" in alone.message_text
    assert alone.difference("a", "b") is None
    assert isinstance(alone.last_error, DataError)
    assert alone.top_genes("CD3E") is None
    assert "No attention map yet" in alone.message_text
    assert alone.export("x.csv") is None
    assert "Nothing to save" in alone.message_text
    st = alone.state
    from cellkit.datasets import pbmc_demo

    st.set_adata(pbmc_demo())
    alone.set_cell(str(st.adata.obs_names[0]))
    assert alone.show() is None
    assert "No model loaded" in alone.message_text


def test_bad_inputs_show_messages_and_panel_stays_usable(state, panel, tmp_path):
    panel.set_cell(_cell(state))
    good = panel.show()
    _ok(panel)

    panel.cell.value = "NOT-A-CELL"
    assert panel.show() is None
    assert isinstance(panel.last_error, DataError)
    assert "'NOT-A-CELL' is not in the data" in panel.message_text
    assert panel.set_cell("AAAGCCTGGCTAA") is None
    assert "Close matches" in panel.message_text

    assert panel.top_genes("NOTAGENE") is None
    assert isinstance(panel.last_error, UnknownGeneError)
    assert "NOTAGENE" in panel.message_text

    panel.cell.value = _cell(state)
    assert panel.show(layer=5) is None
    assert isinstance(panel.last_error, ConfigError)
    assert "out of range" in panel.message_text
    assert panel.show(head=9) is None
    assert isinstance(panel.last_error, ConfigError)

    state.selections = {**state.selections, "empty": np.array([], dtype=str)}
    panel.set_group("empty")
    assert panel.show() is None
    assert "is empty" in panel.message_text
    assert panel.set_group("nope") is None
    assert "No selection named 'nope'" in panel.message_text

    assert panel.set_group(groupby="missing_column", group="x") is None
    assert isinstance(panel.last_error, DataError)
    assert "not an obs column" in panel.message_text
    assert panel.set_group(groupby="bulk_labels", group="no such type") is None
    assert "No cell has obs['bulk_labels']" in panel.message_text

    assert panel.difference("mono", "mono") is None
    assert "same group" in panel.message_text
    state.add_selection("x", np.arange(4))
    state.add_selection("y", np.arange(2, 6))
    assert panel.difference("x", "y") is None
    assert "share 2 cells" in panel.message_text

    assert panel.export(tmp_path / "no_such_dir" / "a.csv") is None
    assert "does not exist" in panel.message_text
    assert panel.export(tmp_path) is None
    assert "is a folder" in panel.message_text

    # nothing was lost and the panel still works
    pd.testing.assert_frame_equal(panel.matrix, good)
    panel.set_cell(_cell(state))
    again = panel.show()
    _ok(panel)
    pd.testing.assert_frame_equal(again, good)
    assert isinstance(state, StudioState)
    assert state.adata.n_obs == 700
