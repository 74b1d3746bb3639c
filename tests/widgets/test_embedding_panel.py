"""EmbeddingPanel: bases, compute (embed_cells + UMAP), colouring, hover, lasso/box selection, bad inputs."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd

from cellkit import DataError
from cellkit.widgets import EmbeddingPanel, StudioState


def _spy(fig):
    """Record the messages a FigureWidget sends to the browser."""
    sent = []
    for name in ("_send_update_msg", "_send_restyle_msg", "_send_addTraces_msg", "_send_deleteTraces_msg"):
        orig = getattr(fig, name)

        def wrapper(*args, _orig=orig, _name=name, **kwargs):
            sent.append((_name, inspect.signature(_orig).bind(*args, **kwargs).arguments))
            return _orig(*args, **kwargs)

        setattr(fig, name, wrapper)
    return sent


def _positions(fig, panel=None):
    """obs positions drawn, per trace (column 0 of each trace's customdata, as viz.embedding writes it)."""
    return [np.asarray(t.customdata)[:, 0].astype(np.int64) for t in fig.data]


def _box_event(fig, xr, yr):
    """What plotly.js sends for a box selection: the points inside, per trace, plus the selector."""
    trace_idx, point_idx, xs, ys = [], [], [], []
    for t, trace in enumerate(fig.data):
        x, y = np.asarray(trace.x), np.asarray(trace.y)
        hit = np.flatnonzero((x >= xr[0]) & (x <= xr[1]) & (y >= yr[0]) & (y <= yr[1]))
        trace_idx += [t] * len(hit)
        point_idx += hit.tolist()
        xs += x[hit].tolist()
        ys += y[hit].tolist()
    return {
        "event_type": "plotly_selected",
        "points": {"trace_indexes": trace_idx, "point_indexes": point_idx, "xs": xs, "ys": ys},
        "selector": {"type": "box", "selector_state": {"xrange": list(xr), "yrange": list(yr)}},
    }


def test_bases_listed_and_reused_without_recomputation(state):
    adata = state.adata
    keys_before = set(adata.obsm)
    panel = EmbeddingPanel(state)
    values = [v for _, v in panel.basis_dropdown.options]
    assert values[:2] == ["X_umap", "X_pca"]  # 2-D bases first
    # a default view: the existing UMAP, coloured by the first cell-type-like column
    assert panel.basis == "X_umap" and state.embedding_key == "X_umap"
    assert panel.color_key == "bulk_labels"
    fig = panel.figure
    assert "cellkit-embedding-plot" in fig._dom_classes
    assert fig.layout.dragmode == "lasso"
    assert all(t.type == "scattergl" for t in fig.data)
    assert len(fig.data) == adata.obs["bulk_labels"].cat.categories.size
    for trace, pos in zip(fig.data, _positions(fig, panel), strict=True):
        np.testing.assert_allclose(trace.x, adata.obsm["X_umap"][pos, 0], rtol=1e-6)
        assert set(adata.obs["bulk_labels"].iloc[pos].astype(str)) == {trace.name}
    assert sum(len(t.x) for t in fig.data) == adata.n_obs

    panel.set_basis("X_pca")
    assert panel.last_error is None
    assert panel.figure is fig and state.embedding_key == "X_pca"
    assert set(adata.obsm) == keys_before  # nothing computed, nothing written
    pos = _positions(fig)[0]
    np.testing.assert_allclose(fig.data[0].y, adata.obsm["X_pca"][pos, 1], rtol=1e-6)
    assert "PC1" in fig.layout.xaxis.title.text
    # the dropdown drives the same method
    panel.basis_dropdown.value = "X_umap"
    assert panel.basis == "X_umap"
    # another panel announcing an embedding switches the view
    state.embedding_key = "X_pca"
    assert panel.basis == "X_pca"


def test_compute_writes_exactly_the_announced_keys(state, monkeypatch):
    import cellkit

    calls = []

    def fake_umap(adata, *, use_rep, key_added, **_):  # umap-learn's JIT would dominate the test
        calls.append((use_rep, key_added))
        x = np.asarray(adata.obsm[use_rep], dtype=np.float32)
        adata.obsm[key_added] = x[:, :2].copy()  # NaN rows (unembedded cells) stay NaN

    monkeypatch.setattr(cellkit.analysis, "umap", fake_umap)
    adata = state.adata
    state.add_selection("first150", np.arange(150))
    before = set(adata.obsm)
    obs_before = adata.obs.copy()
    panel = EmbeddingPanel(state)
    panel.key_box.value = "X_test"
    panel.only_selection.value = True
    panel.compute_button.click()  # runs in the background
    panel.wait(120)
    assert panel.last_error is None, panel.message_text
    assert set(adata.obsm) - before == {"X_test", "X_test_umap"}
    assert calls == [("X_test", "X_test_umap")]
    assert "obsm['X_test']" in panel.message_text and "obsm['X_test_umap']" in panel.message_text
    assert "150 cells" in panel.message_text
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    emb = adata.obsm["X_test"]
    assert emb.shape == (adata.n_obs, state.model.config.encoder.d_model)
    assert np.isfinite(emb[:150]).all() and np.isnan(emb[150:]).all()
    # the new UMAP is shown (unembedded cells have no coordinates and are left out)
    assert panel.basis == "X_test_umap" and state.embedding_key == "X_test_umap"
    assert "X_test_umap" in [v for _, v in panel.basis_dropdown.options]
    assert sum(len(t.x) for t in panel.figure.data) == 150
    assert int(np.isnan(adata.obsm["X_test_umap"][:, 0]).sum()) == 550 and "550" in panel.note.value

    # synchronous call, all cells (checkbox off): same keys, overwritten and said so
    panel.only_selection.value = False
    assert panel.compute("X_test") == "X_test_umap"
    assert set(adata.obsm) - before == {"X_test", "X_test_umap"}
    assert "overwrote" in panel.message_text
    assert np.isfinite(adata.obsm["X_test"]).all()


def test_color_by_categorical_numeric_gene_and_predictions(state):
    adata = state.adata
    panel = EmbeddingPanel(state)
    fig = panel.figure

    panel.color_by("louvain")
    cats = list(adata.obs["louvain"].cat.categories)
    assert len(fig.data) == len(cats) and [t.name for t in fig.data] == cats
    # scanpy's stored colours are used when they cover every category
    assert [t.marker.color for t in fig.data] == list(adata.uns["louvain_colors"])
    assert fig.layout.showlegend is True

    panel.color_by("n_counts")
    assert len(fig.data) == 1 and fig.data[0].type == "scattergl"
    pos = _positions(fig)[0]
    np.testing.assert_allclose(fig.data[0].marker.color, adata.obs["n_counts"].to_numpy()[pos])
    assert fig.data[0].marker.showscale is True
    assert fig.data[0].marker.colorbar.title.text == "n_counts"

    # continuous -> continuous: the same trace, only colours (and labels) are sent
    trace = fig.data[0]
    sent = _spy(fig)
    panel.color_by("CD3E")
    assert panel.last_error is None
    assert fig.data[0] is trace and panel.figure is fig
    assert [s[0] for s in sent] == ["_send_update_msg"]
    restyle = sent[0][1]["restyle_data"]
    arrays = [k for k, v in restyle.items() if isinstance(v[0], np.ndarray | list) and len(v[0]) > 1]
    assert arrays == ["marker.color"]
    cd3e = adata.raw[:, "CD3E"].X
    cd3e = np.asarray(cd3e.toarray() if hasattr(cd3e, "toarray") else cd3e).ravel()
    np.testing.assert_allclose(fig.data[0].marker.color, cd3e[pos], rtol=1e-5)
    assert panel.gene_box.value == "CD3E" and panel.color_dropdown.value == ""

    # the gene box drives the same method
    panel.gene_box.value = "LYZ"
    assert panel.color_key == "LYZ" and fig.data[0].marker.colorbar.title.text == "LYZ"

    # predicted labels (as cellkit.predict writes them) are offered and drawn per class
    adata.obs["cellkit_pred"] = pd.Categorical(adata.obs["bulk_labels"].astype(str))
    adata.uns["cellkit_pred"] = {"classes": list(adata.obs["cellkit_pred"].cat.categories)}
    state.busy = "predict"  # a background job (here: predict) ending refreshes the options
    state.busy = ""
    labels = dict((v, k) for k, v in panel.color_dropdown.options)
    assert labels["cellkit_pred"] == "cellkit_pred (predicted labels)"
    panel.color_dropdown.value = "cellkit_pred"
    assert panel.color_key == "cellkit_pred"
    assert len(fig.data) == adata.obs["cellkit_pred"].nunique()

    panel.color_by(None)
    assert len(fig.data) == 1 and fig.layout.showlegend is False


def test_gene_colour_reads_layer_and_gene_symbols(state):
    adata = state.adata
    adata.layers["doubled"] = np.asarray(adata.X) * 2
    adata.var["symbol"] = [f"s_{g}" for g in adata.var_names]
    panel = EmbeddingPanel(state)
    fig = panel.figure
    assert "doubled" in [v for _, v in panel.layer_dropdown.options]
    assert "symbol" in [v for _, v in panel.symbols_dropdown.options]
    gene = str(adata.var_names[3])
    expected = np.asarray(adata.X)[:, 3] * 2

    panel.color_by(gene, layer="doubled")
    assert panel.last_error is None, panel.message_text
    assert panel.layer_dropdown.value == "doubled"
    np.testing.assert_allclose(fig.data[0].marker.color, expected[_positions(fig)[0]], rtol=1e-5)

    # the dropdown picks the var column; the gene box then offers those names
    panel.symbols_dropdown.value = "symbol"
    assert f"s_{gene}" in panel.gene_box.options and gene not in panel.gene_box.options
    panel.gene_box.value = f"s_{gene}"
    assert panel.last_error is None, panel.message_text
    assert fig.layout.meta["color"] == f"s_{gene}"
    np.testing.assert_allclose(fig.data[0].marker.color, expected[_positions(fig)[0]], rtol=1e-5)

    panel.color_by(gene, layer="nope")  # checked by viz.embedding; the view stays
    assert isinstance(panel.last_error, DataError) and fig.layout.meta["color"] == f"s_{gene}"


def test_hover_uses_customdata_not_text(state):
    adata = state.adata
    panel = EmbeddingPanel(state)
    fig = panel.figure
    # the default hover columns (viz.embedding's) are shown in the hover box
    assert list(panel.hover_select.value) == fig.layout.meta["hover"] != []
    panel.set_hover(["phase", "n_genes"])
    assert panel.hover_select.value == ("phase", "n_genes") and fig.layout.meta["hover"] == [
        "phase",
        "n_genes",
    ]
    for trace, pos in zip(fig.data, _positions(fig), strict=True):
        assert trace.text is None
        cd = np.asarray(trace.customdata)
        assert cd.shape == (len(pos), 4)
        assert list(cd[:, 1]) == list(adata.obs_names[pos])
        assert list(cd[:, 2]) == list(adata.obs["phase"].iloc[pos].astype(str))
        assert "%{customdata[1]}" in trace.hovertemplate and "phase: %{customdata[2]}" in trace.hovertemplate
    panel.color_by("n_counts")
    assert "n_counts: %{marker.color" in fig.data[0].hovertemplate
    panel.set_hover(["nope"])
    assert isinstance(panel.last_error, DataError)
    assert fig.layout.meta["hover"] == ["phase", "n_genes"]  # the view is unchanged


def test_box_selection_through_plotly_callback_reaches_state(state):
    adata = state.adata
    obs_cols = list(adata.obs.columns)
    panel = EmbeddingPanel(state)
    fig = panel.figure
    xy = adata.obsm["X_umap"]
    xr = (float(np.quantile(xy[:, 0], 0.2)), float(np.quantile(xy[:, 0], 0.7)))
    yr = (float(np.quantile(xy[:, 1], 0.1)), float(np.quantile(xy[:, 1], 0.8)))
    expected = np.flatnonzero(
        (xy[:, 0] >= xr[0]) & (xy[:, 0] <= xr[1]) & (xy[:, 1] >= yr[0]) & (xy[:, 1] <= yr[1])
    )
    assert 20 < len(expected) < adata.n_obs

    fig._js2py_pointsCallback = _box_event(fig, xr, yr)  # what the browser sends
    np.testing.assert_array_equal(panel.pending, expected)
    assert f"{len(expected):,}" in panel.selection_label.value
    assert sum(len(t.selectedpoints or ()) for t in fig.data) == len(expected)

    panel.selection_name.value = "box1"
    panel.save_button.click()
    assert panel.last_error is None, panel.message_text
    assert list(state.selections) == ["box1"] and state.active_selection == "box1"
    np.testing.assert_array_equal(state.selections["box1"], np.asarray(adata.obs_names[expected]))
    np.testing.assert_array_equal(state.selected_cells(), np.asarray(adata.obs_names[expected]))
    assert list(adata.obs.columns) == obs_cols  # no obs column unless asked
    assert panel.selection_name.value == "box2"

    # write the obs column too (explicit)
    names = panel.save_selection("box1b", write_obs=True, obs_key="in_box")
    assert len(names) == len(expected)
    assert adata.obs["in_box"].dtype == bool and adata.obs["in_box"].sum() == len(expected)
    assert "obs['in_box']" in panel.message_text

    # a selection survives a recolour; a double-click deselects
    panel.color_by("n_counts")
    assert len(fig.data[0].selectedpoints) == len(expected)
    fig._js2py_pointsCallback = {
        "event_type": "plotly_deselect",
        "points": {"trace_indexes": [], "point_indexes": [], "xs": [], "ys": []},
    }
    assert len(panel.pending) == 0 and "No cells selected" in panel.selection_label.value


def test_subsampled_view_selects_every_cell_in_the_shape(state):
    adata = state.adata
    panel = EmbeddingPanel(state)
    panel.max_points_box.value = 100
    fig = panel.figure
    assert sum(len(t.x) for t in fig.data) == 100
    assert "random 100 of 700" in panel.note.value
    assert any("random 100" in a.text for a in fig.layout.annotations)
    xy = adata.obsm["X_umap"]
    x0, x1 = float(xy[:, 0].min()) - 1, float(np.median(xy[:, 0]))
    y0, y1 = float(xy[:, 1].min()) - 1, float(xy[:, 1].max()) + 1
    event = _box_event(fig, (x0, x1), (y0, y1))
    event["selector"] = {
        "type": "lasso",
        "selector_state": {"xs": [x0, x1, x1, x0], "ys": [y0, y0, y1, y1]},
    }
    fig._js2py_pointsCallback = event
    expected = np.flatnonzero(xy[:, 0] < x1)
    np.testing.assert_array_equal(panel.pending, expected)  # shown or not
    # a category hidden in the legend is not selected
    fig.data[0].visible = "legendonly"
    hidden = adata.obs["bulk_labels"].astype(str).to_numpy() == fig.data[0].name
    event["selector"] = {"type": "box", "selector_state": {"xrange": [x0, x1], "yrange": [y0, y1]}}
    fig._js2py_pointsCallback = event
    np.testing.assert_array_equal(panel.pending, np.flatnonzero((xy[:, 0] <= x1) & ~hidden))


def test_select_points_programmatic(state):
    adata = state.adata
    panel = EmbeddingPanel(state)
    got = panel.select_points(np.arange(20))
    np.testing.assert_array_equal(got, np.arange(20))
    assert sum(len(t.selectedpoints) for t in panel.figure.data) == 20
    panel.select_points(np.asarray(adata.obs_names[:5]))
    np.testing.assert_array_equal(panel.pending, np.arange(5))
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[[3, 9]] = True
    panel.select_points(mask)
    np.testing.assert_array_equal(panel.pending, [3, 9])
    panel.clear_selection()
    assert len(panel.pending) == 0


def test_bad_inputs_show_messages_and_leave_data_alone(state):
    adata = state.adata
    obsm_before, obs_before = set(adata.obsm), adata.obs.copy()
    panel = EmbeddingPanel(state)
    fig = panel.figure
    n_traces = len(fig.data)

    panel.set_basis("X_nope")
    assert isinstance(panel.last_error, DataError)
    assert "X_nope" in panel.message_text and "X_umap" in panel.message_text
    assert panel.basis == "X_umap" and len(fig.data) == n_traces

    adata.obsm["X_new"] = adata.obsm["X_pca"][:, 2:4].copy()  # written by another tool
    panel.refresh()
    assert "X_new" in [v for _, v in panel.basis_dropdown.options]
    del adata.obsm["X_new"]
    panel.refresh()

    adata.obsm["X_bad"] = np.zeros((adata.n_obs, 1))
    panel.set_basis("X_bad")
    assert isinstance(panel.last_error, DataError) and "X_bad" in panel.message_text
    assert panel.basis == "X_umap" and len(fig.data) == n_traces
    del adata.obsm["X_bad"]

    panel.color_by("CD3")
    assert isinstance(panel.last_error, DataError)
    assert "Did you mean" in panel.message_text and "CD3E" in panel.message_text
    panel.color_by("bulk_label")
    assert "bulk_labels" in panel.message_text
    assert panel.color_key == "bulk_labels" and len(fig.data) == n_traces

    panel.save_selection("empty")
    assert isinstance(panel.last_error, DataError) and "No cells selected" in panel.message_text
    panel.select_points([1, 2, 3])
    panel.save_selection("   ")
    assert isinstance(panel.last_error, DataError) and "name" in panel.message_text
    panel.save_selection("x", write_obs=True, obs_key="bulk_labels")
    assert "already exists" in panel.message_text and state.selections == {}
    panel.select_points([10**6])
    assert isinstance(panel.last_error, DataError)

    panel.compute("  ")  # embed_cells refuses an empty key_added
    assert isinstance(panel.last_error, DataError) and "key_added" in panel.message_text

    assert set(adata.obsm) == obsm_before
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    # still usable
    panel.color_by("phase")
    assert panel.last_error is None and len(fig.data) == adata.obs["phase"].nunique()
    panel.save_selection("ok")
    assert list(state.selections) == ["ok"]


def test_alone_without_model_or_data(pbmc, demo):
    panel = EmbeddingPanel()
    assert len(panel.figure.data) == 0 and panel.basis_dropdown.options == ()
    for call in (lambda: panel.compute(), lambda: panel.set_basis("X_umap"), lambda: panel.color_by("x")):
        call()
        assert isinstance(panel.last_error, DataError)
        assert "No data loaded" in panel.message_text or "No model loaded" in panel.message_text
    panel.state.set_adata(pbmc)  # data arrives later: the panel fills in
    assert panel.basis == "X_umap" and len(panel.figure.data) > 0
    panel.compute()
    assert "No model loaded" in panel.message_text
    # new data drops the old view and the pending selection
    panel.select_points([1, 2])
    other = pbmc[:100].copy()
    del other.obsm["X_umap"]
    panel.state.set_adata(other, name="other")
    assert panel.basis == "X_pca" and len(panel.pending) == 0
    assert sum(len(t.x) for t in panel.figure.data) == 100
    panel.state.set_adata(None)
    assert len(panel.figure.data) == 0 and panel.basis == ""
    panel.state.set_model(demo)
    panel.compute()
    assert "No data loaded" in panel.message_text


def test_state_shared_between_panels(state):
    a, b = EmbeddingPanel(state), EmbeddingPanel(state)
    a.set_basis("X_pca")
    assert b.basis == "X_pca"
    assert isinstance(state, StudioState)
