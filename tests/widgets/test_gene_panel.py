"""GenePanel: gene embeddings, similar genes (table, bars, network), programs + scores + heatmap, CSV export."""

from __future__ import annotations

import numpy as np
import pandas as pd

import cellkit
from cellkit import ConfigError, DataError, UnknownGeneError
from cellkit.widgets import GenePanel


def test_token_embeddings_ready_and_search(state):
    panel = GenePanel(state)
    assert panel.kind == "token" and panel.embeddings.shape == (765, 128)
    assert "765 genes" in panel.status.value
    assert "CD3E" in panel.gene_box.options

    table = panel.search("CD3E", k=10)
    assert panel.last_error is None, panel.message_text
    expected = cellkit.analysis.similar_genes(cellkit.analysis.gene_embeddings(state.model), "CD3E", k=10)
    assert list(table.columns) == ["query", "rank", "gene", "similarity"]
    assert list(table["gene"]) == list(expected["gene"]) and "CD3E" not in set(table["gene"])
    np.testing.assert_allclose(table["similarity"], expected["similarity"])
    assert list(table["rank"]) == list(range(1, 11)) and (table["query"] == "CD3E").all()
    assert table["gene"][0] in panel.table_html.value and "cellkit-table" in panel.table_html.value
    assert panel.query == "CD3E" and panel.table is table and len(table) == 10

    bar = panel.bar_figure.data[0]
    assert "cellkit-similar-genes" in panel.bar_figure._dom_classes
    assert bar.orientation == "h"
    assert list(bar.y) == list(table["gene"])[::-1]  # best on top
    np.testing.assert_allclose(bar.x, table["similarity"].to_numpy()[::-1])

    net = panel.network_figure
    assert "cellkit-gene-network" in net._dom_classes
    names = [t.name for t in net.data]
    assert "edges" in names
    nodes = {g for t in net.data if t.name != "edges" for g in np.asarray(t.customdata).ravel()}
    assert nodes <= {"CD3E", *table["gene"]} and "CD3E" in nodes
    labelled = {x for t in net.data if t.name != "edges" for x in t.text if x}
    assert labelled == nodes  # every gene of the (small) network is named, not only the query

    # the button uses the widgets' values
    panel.gene_box.value, panel.k_box.value = "LYZ", 5
    panel.search_button.click()
    assert panel.query == "LYZ" and len(panel.table) == 5 and len(panel.bar_figure.data[0].y) == 5


def test_network_threshold(state):
    panel = GenePanel(state)
    panel.search("CD3E", k=15)
    edges_at = {}
    for thr in (0.3, 0.95):
        panel.draw_network(thr)
        assert panel.last_error is None and panel.threshold_slider.value == thr
        edge = [t for t in panel.network_figure.data if t.name == "edges"]
        edges_at[thr] = sum(1 for v in edge[0].x if v is None) if edge else 0
    assert edges_at[0.3] > edges_at[0.95]
    panel.threshold_slider.value = 0.99  # the slider redraws
    assert "0.99" in panel.network_figure.layout.title.text
    panel.draw_network(2.0)
    assert isinstance(panel.last_error, ConfigError)


def test_contextual_embeddings_on_the_active_selection(state):
    state.add_selection("first120", np.arange(120))
    panel = GenePanel(state)
    panel.search("CD3E", k=5)
    panel.kind_dropdown.value = "contextual"
    assert panel.center_box.value is True  # contextual embeddings share one direction
    panel.compute_button.click()  # a pass over the cells: background thread
    panel.wait(120)
    assert panel.last_error is None, panel.message_text
    assert panel.kind == "contextual"
    assert "120 cells" in panel.status.value and "first120" in panel.status.value
    emb = panel.embeddings
    expected = cellkit.analysis.contextual_gene_embeddings(
        state.adata, state.model, cells=np.arange(120), progress=False
    )
    pd.testing.assert_frame_equal(emb, expected, check_exact=False, rtol=1e-5, atol=1e-6)
    # the search was re-run on the new embeddings, centred
    assert panel.query == "CD3E" and "centred" in panel.message_text
    assert panel.table is not None and (panel.table["query"] == "CD3E").all()
    exp = cellkit.analysis.similar_genes(expected, "CD3E", k=5, center=True)
    assert list(panel.table["gene"]) == list(exp["gene"])
    # max cells: a random subsample
    panel.max_cells_box.value = 50
    panel.compute_embeddings("contextual")
    assert "random 50 cells" in panel.status.value
    # back to token embeddings from the dropdown
    panel.kind_dropdown.value = "token"
    assert panel.kind == "token" and panel.center_box.value is False


def test_programs_scoring_and_heatmap(state):
    adata = state.adata
    obs_before = set(adata.obs.columns)
    panel = GenePanel(state)
    programs = panel.find_programs(resolution=10)
    assert panel.last_error is None, panel.message_text
    assert programs and all(len(g) >= 5 for g in programs.values())
    first = next(iter(programs))
    assert first in panel.programs_html.value and programs[first][0] in panel.programs_html.value
    assert f"{len(programs)} programs" in panel.message_text

    # the network colours nodes by program once programs exist
    panel.search("CD3E", k=10)
    assert {t.name for t in panel.network_figure.data} - {"edges"} <= {*programs, "none"}

    assert panel.groupby_dropdown.options[0] == "bulk_labels"
    panel.key_box.value = "prog"
    panel.score_button.click()
    assert panel.last_error is None, panel.message_text
    written = {f"prog_{p}" for p in programs}
    assert set(adata.obs.columns) - obs_before == written
    assert set(adata.uns["prog"]) == set(programs)
    assert "adata.uns['prog']" in panel.message_text
    hm = panel.heatmap_figure
    assert "cellkit-program-heatmap" in hm._dom_classes
    z = np.asarray(hm.data[0].z)
    assert hm.data[0].type == "heatmap"
    shown = min(len(programs), 50)  # viz.program_heatmap's max_programs: the most group-specific ones
    assert z.shape == (adata.obs["bulk_labels"].nunique(), shown)
    assert set(hm.data[0].x) <= written and len(set(hm.data[0].x)) == shown
    if shown < len(programs):
        assert any(f"top {shown} of {len(programs)} programs" in a.text for a in hm.layout.annotations)

    # too fine a resolution for min genes: a warning, no crash
    panel.find_programs(resolution=500, min_size=200)
    assert panel.programs == {} and "lower the resolution" in panel.message_text


def test_export_csv_atomic(state, tmp_path):
    panel = GenePanel(state)
    panel.export(tmp_path / "x.csv")
    assert isinstance(panel.last_error, DataError) and "search a gene first" in panel.message_text

    panel.search("LYZ", k=7)
    target = tmp_path / "sub" / "similar.csv"
    panel.path_box.value = str(target)
    panel.export_button.click()
    assert panel.last_error is None, panel.message_text
    back = pd.read_csv(target)
    pd.testing.assert_frame_equal(back, panel.table, check_dtype=False)
    assert sorted(p.name for p in target.parent.iterdir()) == ["similar.csv"]  # no temp file left
    assert str(target.resolve()) in panel.message_text
    panel.export(tmp_path)
    assert isinstance(panel.last_error, ConfigError) and "folder" in panel.message_text
    panel.export("  ")
    assert isinstance(panel.last_error, ConfigError)


def test_bad_inputs(state):
    adata = state.adata
    obs_before = adata.obs.copy()
    panel = GenePanel(state)

    panel.search("cd3e")
    assert isinstance(panel.last_error, UnknownGeneError) and "Did you mean CD3E" in panel.message_text
    panel.search("CD3")
    assert all(g in panel.message_text for g in ("CD3D", "CD3E", "CD3G"))
    panel.search("")
    assert isinstance(panel.last_error, DataError)
    panel.search("CD3E", k=0)
    assert isinstance(panel.last_error, ConfigError)
    panel.compute_embeddings("bogus")
    assert isinstance(panel.last_error, ConfigError) and "token" in panel.message_text
    panel.score_programs(groupby="bulk_labels")
    assert isinstance(panel.last_error, DataError) and "Find programs" in panel.message_text
    panel.programs = {"P0": ["CD3E", "CD3D", "LCK"]}
    panel.score_programs(groupby="bulk_label")
    assert "did you mean ['bulk_labels']" in panel.message_text
    panel.score_programs(groupby="bulk_labels", key_added=" ")
    assert isinstance(panel.last_error, ConfigError)
    panel.find_programs(resolution=-1)
    assert isinstance(panel.last_error, ConfigError)
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    # still usable
    panel.search("CD3E", k=3)
    assert panel.last_error is None and len(panel.table) == 3


def test_alone_and_state_changes(pbmc, demo):
    panel = GenePanel()
    assert panel.embeddings is None and "No model loaded" in panel.status.value
    panel.search("CD3E")
    assert isinstance(panel.last_error, DataError) and "No model loaded" in panel.message_text
    panel.find_programs()
    assert "No model loaded" in panel.message_text
    panel.state.set_model(demo)  # a model arrives: token embeddings are ready at once
    assert panel.kind == "token" and panel.embeddings is not None
    panel.compute_embeddings("contextual")
    assert isinstance(panel.last_error, DataError) and "No data loaded" in panel.message_text
    panel.search("CD3E", k=3)
    assert panel.last_error is None
    panel.state.set_adata(pbmc)
    assert "bulk_labels" in panel.groupby_dropdown.options
    pbmc.obs["cellkit_pred"] = pbmc.obs["louvain"].astype(str).astype("category")
    panel.state.busy = "predict"  # a background job ending refreshes the group-by options
    panel.state.busy = ""
    assert "cellkit_pred" in panel.groupby_dropdown.options
    panel.state.set_model(cellkit.datasets.demo_model())  # a new model drops the old results
    assert panel.table is None and panel.query == "" and panel.kind == "token"
