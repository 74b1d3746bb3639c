"""cellkit.viz: every figure function builds the expected plotly traces from plain inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import scipy.sparse as sp

import cellkit.viz as cv
from cellkit._errors import ConfigError, DataError
from cellkit.viz._palettes import NA_COLOR, default_palette


def _adata(n: int = 60, *, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], n), categories=["B", "NK", "T"]),
            "batch": pd.Categorical(rng.choice(["b1", "b2"], n)),
            "n_counts": rng.poisson(1000, n).astype(np.float64),
            "donor": rng.choice(["d1", "d2", "d3"], n),  # object dtype → categorical colouring
        },
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame({"symbol": [f"SYM{i}" for i in range(8)]}, index=[f"ENSG{i:04d}" for i in range(8)])
    x = rng.poisson(1.0, (n, 8)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)
    adata.obsm["X_cellkit_umap"] = rng.normal(size=(n, 2)).astype(np.float32)
    return adata


def _positions(fig: go.Figure) -> np.ndarray:
    return np.concatenate([np.asarray(t.customdata)[:, 0] for t in fig.data]).astype(np.int64)


def _serialisable(fig: go.Figure) -> dict:
    return json.loads(fig.to_json())


# -- embedding ----------------------------------------------------------------------------------


def test_embedding_categorical_one_webgl_trace_per_category_with_positions():
    adata = _adata()
    fig = cv.embedding(adata, color="cell_type")
    assert all(isinstance(t, go.Scattergl) for t in fig.data)
    assert [t.name for t in fig.data] == ["B", "NK", "T"]
    assert fig.layout.showlegend
    pos = _positions(fig)
    assert sorted(pos.tolist()) == list(range(adata.n_obs))  # every cell exactly once
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    for t in fig.data:
        idx = np.asarray(t.customdata)[:, 0].astype(int)
        assert (labels[idx] == t.name).all()
        np.testing.assert_allclose(t.x, adata.obsm["X_cellkit_umap"][idx, 0], rtol=1e-6)
    assert [t.marker.color for t in fig.data] == default_palette(3)
    assert "cell_type" in fig.layout.legend.title.text
    _serialisable(fig)


def test_embedding_palette_from_uns_and_explicit():
    adata = _adata()
    adata.uns["cell_type_colors"] = np.array(["#111111", "#222222", "#333333"])
    fig = cv.embedding(adata, color="cell_type")
    assert [t.marker.color for t in fig.data] == ["#111111", "#222222", "#333333"]
    fig = cv.embedding(adata, color="cell_type", palette={"T": "red"})
    assert fig.data[2].marker.color == "red"
    fig = cv.embedding(adata, color="cell_type", palette="Dark24")
    assert fig.data[0].marker.color.startswith("#")
    with pytest.raises(ConfigError, match="qualitative"):
        cv.embedding(adata, color="cell_type", palette="NoSuchPalette")


def test_embedding_object_column_is_categorical_and_nan_category_grey():
    adata = _adata()
    adata.obs.loc[adata.obs_names[:5], "donor"] = np.nan
    fig = cv.embedding(adata, color="donor")
    assert [t.name for t in fig.data] == ["NaN", "d1", "d2", "d3"]
    assert fig.data[0].marker.color == NA_COLOR
    assert sorted(np.asarray(fig.data[0].customdata)[:, 0].tolist()) == [0, 1, 2, 3, 4]


def test_embedding_continuous_has_colorbar_and_sorted_values():
    adata = _adata()
    fig = cv.embedding(adata, color="n_counts")
    assert len(fig.data) == 1
    t = fig.data[0]
    assert t.marker.showscale
    assert t.marker.colorbar.title.text == "n_counts"
    colors = np.asarray(t.marker.color)
    assert (np.diff(colors) >= 0).all()  # high values drawn last (on top)
    idx = np.asarray(t.customdata)[:, 0].astype(int)
    np.testing.assert_allclose(colors, adata.obs["n_counts"].to_numpy()[idx])
    assert not fig.layout.showlegend
    _serialisable(fig)


def test_embedding_gene_from_raw_then_x_and_layers():
    adata = _adata()
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.zeros(adata.shape, dtype=np.float32))  # X differs from raw
    adata.layers["counts"] = sp.csr_matrix(np.full(adata.shape, 7.0, dtype=np.float32))
    raw_col = np.asarray(adata.raw.X[:, 2].toarray()).ravel()
    fig = cv.embedding(adata, color="ENSG0002")  # use_raw=None → raw, as scanpy
    idx = np.asarray(fig.data[0].customdata)[:, 0].astype(int)
    np.testing.assert_allclose(fig.data[0].marker.color, raw_col[idx])
    fig = cv.embedding(adata, color="ENSG0002", use_raw=False)
    assert np.all(np.asarray(fig.data[0].marker.color) == 0)
    fig = cv.embedding(adata, color="ENSG0002", layer="counts")
    assert np.all(np.asarray(fig.data[0].marker.color) == 7)
    fig = cv.embedding(adata, color="SYM2", gene_symbols="symbol")
    np.testing.assert_allclose(np.sort(fig.data[0].marker.color), np.sort(raw_col))
    with pytest.raises(DataError, match="layers"):
        cv.embedding(adata, color="ENSG0002", layer="nope")


def test_embedding_gene_symbols_pass_over_a_raw_without_that_column():
    adata = _adata()
    raw = adata.copy()
    raw.X = raw.X * 10
    raw.var = raw.var.drop(columns="symbol")
    adata.raw = raw
    fig = cv.embedding(adata, color="SYM2", gene_symbols="symbol", sort_order=False)  # from X, not raw
    x = np.asarray(adata.X[:, 2].toarray()).ravel()
    np.testing.assert_allclose(fig.data[0].marker.color, x)
    with pytest.raises(DataError, match="not a var column"):
        cv.embedding(adata, color="SYM2", gene_symbols="symbol", use_raw=True)


def test_embedding_nan_coordinates_are_dropped_with_a_note():
    adata = _adata()
    adata.obsm["X_cellkit_umap"][[3, 10, 11]] = np.nan
    fig = cv.embedding(adata, color="cell_type")
    pos = _positions(fig)
    assert len(pos) == adata.n_obs - 3
    assert not {3, 10, 11} & set(pos.tolist())
    assert any("3 cells without coordinates" in a.text for a in fig.layout.annotations)
    for t in fig.data:
        assert np.isfinite(np.asarray(t.x)).all()


def test_embedding_subsample_keeps_customdata_consistent():
    adata = _adata(500)
    fig = cv.embedding(adata, color="cell_type", max_points=100, seed=3)
    pos = _positions(fig)
    assert len(pos) == 100
    assert len(set(pos.tolist())) == 100
    coords = adata.obsm["X_cellkit_umap"]
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    for t in fig.data:
        idx = np.asarray(t.customdata)[:, 0].astype(int)
        np.testing.assert_allclose(t.x, coords[idx, 0], rtol=1e-6)
        np.testing.assert_allclose(t.y, coords[idx, 1], rtol=1e-6)
        assert (labels[idx] == t.name).all()
        assert list(np.asarray(t.customdata)[:, 1]) == list(adata.obs_names[idx])
    assert any("100 of 500" in a.text for a in fig.layout.annotations)
    again = cv.embedding(adata, color="cell_type", max_points=100, seed=3)
    assert np.array_equal(_positions(again), pos)


def test_embedding_hover_reads_customdata_and_default_hover_columns():
    adata = _adata()
    fig = cv.embedding(adata, color="n_counts", hover=["donor"])
    t = fig.data[0]
    assert t.text is None  # no per-point strings: the hovertemplate reads customdata
    cd = np.asarray(t.customdata)
    idx = cd[:, 0].astype(int)
    assert cd.shape == (adata.n_obs, 3)
    assert list(cd[:, 1]) == list(adata.obs_names[idx])
    assert list(cd[:, 2]) == list(adata.obs["donor"].iloc[idx])
    assert "%{customdata[1]}" in t.hovertemplate and "donor: %{customdata[2]}" in t.hovertemplate
    assert "n_counts: %{marker.color" in t.hovertemplate
    assert fig.layout.meta["hover"] == ["donor"]
    default = cv.embedding(adata, color="n_counts")
    assert default.layout.meta["hover"] == ["cell_type", "batch"]  # categorical columns
    assert np.asarray(default.data[0].customdata).shape == (adata.n_obs, 4)
    cat = cv.embedding(adata, color="cell_type")
    assert cat.layout.meta["hover"] == ["batch"]  # not the colour key itself
    assert all(f"cell_type: {t.name}" in t.hovertemplate for t in cat.data)
    with pytest.raises(DataError, match="hover columns"):
        cv.embedding(adata, hover=["nope"])


def test_embedding_meta_records_what_is_drawn():
    adata = _adata(50)
    adata.obsm["X_cellkit_umap"][:4] = np.nan
    fig = cv.embedding(adata, color="cell_type", max_points=20)
    meta = fig.layout.meta
    assert meta["basis"] == "X_cellkit_umap" and meta["color"] == "cell_type"
    assert meta["kind"] == "categorical"
    assert (meta["n_cells"], meta["n_valid"], meta["n_shown"]) == (50, 46, 20)
    assert len(meta["notes"]) == 2
    assert cv.embedding(adata, color="n_counts").layout.meta["kind"] == "continuous"
    assert cv.embedding(adata).layout.meta["kind"] == "none"
    assert cv.embedding(np.zeros((3, 2))).layout.meta["basis"] is None


def test_embedding_sort_order_false_keeps_obs_order():
    adata = _adata()
    fig = cv.embedding(adata, color="n_counts", sort_order=False)
    idx = np.asarray(fig.data[0].customdata)[:, 0].astype(int)
    np.testing.assert_array_equal(idx, np.arange(adata.n_obs))
    np.testing.assert_allclose(fig.data[0].marker.color, adata.obs["n_counts"].to_numpy())
    sorted_fig = cv.embedding(adata, color="n_counts")
    assert np.all(np.diff(np.asarray(sorted_fig.data[0].marker.color)) >= 0)


def test_embedding_too_many_categories_is_refused():
    adata = _adata(300)
    adata.obs["barcode"] = pd.Categorical(adata.obs_names)
    with pytest.raises(DataError, match="300 categories"):
        cv.embedding(adata, color="barcode")
    # only the categories of the drawn cells count
    assert len(cv.embedding(adata, color="barcode", max_points=150).data) == 150


def test_embedding_figure_is_updated_in_place_sending_only_changes():
    adata = _adata()
    adata.obs["n2"] = adata.obs["n_counts"] * 2
    target = go.FigureWidget(layout={"height": 321, "dragmode": "lasso"})
    out = cv.embedding(adata, color="n_counts", sort_order=False, figure=target)
    assert out is target and len(target.data) == 1
    assert target.layout.meta["color"] == "n_counts"
    trace = target.data[0]
    sent = []
    orig = target._send_update_msg
    target._send_update_msg = lambda *a, **k: (sent.append(k or a), orig(*a, **k))[1]
    cv.embedding(adata, color="n2", sort_order=False, figure=target)
    assert target.data[0] is trace  # the same trace object, updated
    assert len(sent) == 1  # one message for the whole change
    restyle = sent[0]["restyle_data"]
    arrays = [k for k, v in restyle.items() if isinstance(v[0], np.ndarray | list | tuple) and len(v[0]) > 1]
    assert arrays == ["marker.color"]
    np.testing.assert_allclose(trace.marker.color, adata.obs["n2"].to_numpy())
    assert target.layout.meta["color"] == "n2" and trace.marker.colorbar.title.text == "n2"
    # layout the function does not set is kept
    assert target.layout.height == 321 and target.layout.dragmode == "lasso"
    # a selection only adds selectedpoints; removing it removes them
    cv.embedding(adata, color="n2", sort_order=False, figure=target, selected=np.arange(5))
    assert target.data[0] is trace and list(trace.selectedpoints) == list(range(5))
    cv.embedding(adata, color="n2", sort_order=False, figure=target)
    assert trace.selectedpoints is None
    # another trace structure replaces the traces; the note comes and goes with the subsample
    cv.embedding(adata, color="cell_type", figure=target, max_points=30)
    assert [t.name for t in target.data] == [
        t.name for t in cv.embedding(adata, color="cell_type", max_points=30).data
    ]
    assert len(target.layout.annotations) == 1
    cv.embedding(adata, color="cell_type", figure=target)
    assert len(target.layout.annotations) == 0 and target.layout.meta["n_shown"] == adata.n_obs
    # bad input leaves the figure as it was
    with pytest.raises(DataError):
        cv.embedding(adata, color="nope", figure=target)
    assert target.layout.meta["color"] == "cell_type"


def test_embedding_figure_keeps_a_legend_hidden_category_hidden():
    adata = _adata()
    target = go.FigureWidget()
    cv.embedding(adata, color="cell_type", figure=target)
    target.data[0].visible = "legendonly"  # what a click on the legend does
    cv.embedding(adata, color="cell_type", figure=target, selected=np.arange(3))
    assert target.data[0].visible == "legendonly"


def test_embedding_selection_box_lasso_subsample_and_hidden():
    adata = _adata(400)
    xy = adata.obsm["X_cellkit_umap"].astype(np.float64)
    box = {"type": "box", "xrange": (0.5, -0.5), "yrange": (-0.5, 0.5)}  # either order
    inside = (np.abs(xy[:, 0]) <= 0.5) & (np.abs(xy[:, 1]) <= 0.5)
    np.testing.assert_array_equal(cv.embedding_selection(adata, box), np.flatnonzero(inside))
    lasso = {"type": "lasso", "xs": [-0.5, 0.5, 0.5, -0.5], "ys": [-0.5, -0.5, 0.5, 0.5]}
    np.testing.assert_array_equal(cv.embedding_selection(adata, lasso), np.flatnonzero(inside))
    # plotly's selector objects work as they come to on_selection callbacks
    from plotly.callbacks import BoxSelector

    sel = BoxSelector(xrange=[-0.5, 0.5], yrange=[-0.5, 0.5])
    np.testing.assert_array_equal(cv.embedding_selection(adata, sel), np.flatnonzero(inside))
    # cells of a hidden category (trace name) are left out; NaN coordinates never count
    adata.obsm["X_cellkit_umap"][np.flatnonzero(inside)[:2]] = np.nan
    got = cv.embedding_selection(adata, box, color="cell_type", hidden=["NK"])
    ok = inside & np.isfinite(adata.obsm["X_cellkit_umap"]).all(axis=1)
    np.testing.assert_array_equal(got, np.flatnonzero(ok & (adata.obs["cell_type"] != "NK").to_numpy()))
    # it finds cells a subsampled figure does not draw
    fig = cv.embedding(adata, color="cell_type", max_points=50)
    assert len(got) > sum(np.isin(np.asarray(t.customdata)[:, 0].astype(int), got).sum() for t in fig.data)
    with pytest.raises(ConfigError, match="box or a lasso"):
        cv.embedding_selection(adata, {"type": "circle"})


def test_embedding_selected_highlights_through_selectedpoints():
    adata = _adata()
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[:10] = True
    fig = cv.embedding(adata, color="cell_type", selected=mask)
    chosen = []
    for t in fig.data:
        idx = np.asarray(t.customdata)[:, 0].astype(int)
        chosen += idx[np.asarray(t.selectedpoints, dtype=int)].tolist()
        assert t.unselected.marker.opacity < 1
    assert sorted(chosen) == list(range(10))
    fig2 = cv.embedding(adata, color="cell_type", selected=np.arange(10))
    assert [list(t.selectedpoints) for t in fig2.data] == [list(t.selectedpoints) for t in fig.data]
    with pytest.raises(DataError, match="one entry per cell"):
        cv.embedding(adata, selected=np.ones(3, dtype=bool))


def test_embedding_plain_arrays_with_obs_and_color_array():
    rng = np.random.default_rng(1)
    coords = rng.normal(size=(40, 3))
    obs = pd.DataFrame({"label": rng.choice(["x", "y"], 40)}, index=[f"c{i}" for i in range(40)])
    fig = cv.embedding(coords, obs=obs, color="label", dims=(1, 2))
    assert {t.name for t in fig.data} == {"x", "y"}
    idx = np.asarray(fig.data[0].customdata)[:, 0].astype(int)
    np.testing.assert_allclose(fig.data[0].x, coords[idx, 1])
    fig = cv.embedding(coords, color=np.arange(40.0))
    assert fig.data[0].marker.showscale
    fig = cv.embedding(coords)
    assert len(fig.data) == 1
    assert not fig.layout.showlegend
    with pytest.raises(DataError, match="one value per cell"):
        cv.embedding(coords, color=np.arange(5))
    with pytest.raises(DataError, match=r"shape \(n_cells, >= 2\)"):
        cv.embedding(np.zeros((10, 1)))
    with pytest.raises(DataError, match="obs has 3 rows"):
        cv.embedding(coords, obs=obs.iloc[:3])


def test_embedding_unknown_color_lists_options():
    adata = _adata()
    with pytest.raises(DataError) as err:
        cv.embedding(adata, color="cell_typ")
    msg = str(err.value)
    assert "cell_type" in msg
    assert "obs columns" in msg
    assert "ENSG0000" in msg
    with pytest.raises(DataError, match=r"Did you mean \['ENSG0001'\]"):
        cv.embedding(adata, color="ensg0001")
    with pytest.raises(DataError, match="X_cellkit_umap"):
        cv.embedding(adata, basis="X_umap")


def test_embedding_200k_points_is_vectorised():
    rng = np.random.default_rng(0)
    n = 200_000
    obs = pd.DataFrame({"ct": pd.Categorical(rng.choice(list("ABCDEFGHIJ"), n))})
    coords = rng.normal(size=(n, 2)).astype(np.float32)
    fig = cv.embedding(coords, obs=obs, color="ct", selected=rng.random(n) < 0.1)
    assert len(fig.data) == 10
    assert sum(len(t.x) for t in fig.data) == n


# -- gene network -------------------------------------------------------------------------------


def _similarity(n: int = 12, *, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    genes = [f"G{i}" for i in range(n)]
    return pd.DataFrame(emb @ emb.T, index=genes, columns=genes)


def test_gene_network_edges_and_degree_colouring():
    sim = _similarity()
    fig = cv.gene_network(sim, threshold=0.5, highlight=["G0"])
    edges, nodes = fig.data
    assert edges.mode == "lines"
    assert edges.name == "edges"
    upper = sim.to_numpy()[np.triu_indices(len(sim), 1)]
    assert len(edges.x) == 3 * int((upper >= 0.5).sum())
    assert nodes.marker.showscale  # coloured by degree
    names = np.asarray(nodes.customdata)[:, 0].tolist()
    assert "G0" in names
    assert nodes.text[names.index("G0")] == "G0"  # highlighted genes are labelled
    assert list(nodes.text) == names  # 12 genes: every one named
    hl = names.index("G0")
    assert nodes.textfont.size[hl] > max(np.delete(np.asarray(nodes.textfont.size), hl))
    _serialisable(fig)


def test_gene_network_names_the_best_connected_genes_when_many():
    sim = _similarity(60, seed=2)
    fig = cv.gene_network(sim, threshold=0.3, highlight="G59", max_labels=10)
    nodes = next(t for t in fig.data if t.name != "edges")
    names = np.asarray(nodes.customdata)[:, 0].tolist()
    named = [n for n, t in zip(names, nodes.text, strict=True) if t]
    assert "G59" in named and 10 <= len(named) <= 11
    degree = {n: int(((sim.loc[n].drop(n)) >= 0.3).sum()) for n in names}
    unnamed = [n for n in names if n not in named]
    assert min(degree[n] for n in named if n != "G59") >= max(degree[n] for n in unnamed)
    assert all(n in h for n, h in zip(names, nodes.hovertext, strict=True))  # hover names every gene
    assert any("names shown for" in a.text and "hover" in a.text for a in fig.layout.annotations)
    everyone = cv.gene_network(sim, threshold=0.3, max_labels=None)
    assert all(everyone.data[-1].text)
    with pytest.raises(ConfigError, match="max_labels"):
        cv.gene_network(sim, max_labels=-1)


def test_gene_network_programs_edge_list_and_limits():
    sim = _similarity(30)
    programs = {f"G{i}": f"program_{i % 3}" for i in range(20)}
    fig = cv.gene_network(sim, threshold=0.3, programs=programs, max_nodes=10, layout_seed=1)
    node_traces = [t for t in fig.data if t.name != "edges"]
    assert {t.name for t in node_traces} <= {"program_0", "program_1", "program_2", "none"}
    assert sum(len(t.x) for t in node_traces) <= 10
    assert any("of 30 genes" in a.text for a in fig.layout.annotations)
    again = cv.gene_network(sim, threshold=0.3, programs=programs, max_nodes=10, layout_seed=1)
    np.testing.assert_allclose(again.data[-1].x, fig.data[-1].x)  # seeded layout

    edges = pd.DataFrame({"source": ["A", "B", "C"], "target": ["B", "C", "D"], "weight": [0.9, 0.8, 0.1]})
    fig = cv.gene_network(edges, threshold=0.5)
    assert sorted(np.asarray(fig.data[-1].customdata)[:, 0].tolist()) == ["A", "B", "C"]

    empty = cv.gene_network(sim, threshold=1.5)
    assert any("lower the threshold" in a.text for a in empty.layout.annotations)
    _serialisable(empty)
    with pytest.raises(DataError, match="not in the similarity matrix"):
        cv.gene_network(sim, highlight=["NOPE"])
    with pytest.raises(DataError, match="square"):
        cv.gene_network(sim.iloc[:, :5])


# -- heatmaps -----------------------------------------------------------------------------------


def test_attention_heatmap_labels_and_top_genes():
    rng = np.random.default_rng(0)
    att = rng.random((100, 80))
    att[7] += 10  # a heavy query gene must survive the cut
    rows = [f"q{i}" for i in range(100)]
    cols = [f"k{i}" for i in range(80)]
    fig = cv.attention_heatmap(att, rows=rows, cols=cols, max_genes=20, title="layer 3")
    (heat,) = fig.data
    assert isinstance(heat, go.Heatmap)
    assert len(heat.y) == 20
    assert len(heat.x) == 20
    assert "q7" in heat.y
    assert list(heat.y) == sorted(heat.y, key=lambda s: int(s[1:]))  # original order kept
    assert fig.layout.yaxis.autorange == "reversed"
    assert any("top 20 of 100 query genes" in a.text for a in fig.layout.annotations)
    small = cv.attention_heatmap(pd.DataFrame(att[:5, :4], index=rows[:5], columns=cols[:4]), zmid=0)
    assert small.data[0].zmid == 0
    assert small.data[0].colorscale[0][1] != fig.data[0].colorscale[0][1]
    heads = cv.attention_heatmap(np.stack([att[:5, :4], 3 * att[:5, :4]]), max_genes=None)
    np.testing.assert_allclose(heads.data[0].z, 2 * att[:5, :4])
    with pytest.raises(DataError, match="query genes labels"):
        cv.attention_heatmap(att, rows=rows[:5])
    with pytest.raises(DataError, match="2-D"):
        cv.attention_heatmap(np.zeros(5))
    _serialisable(fig)


def test_program_heatmap_scaling_clustering_and_anndata():
    scores = pd.DataFrame(
        [[1.0, 10.0, 0.0], [2.0, 20.0, 0.0], [3.0, 0.0, 0.0]],
        index=["B", "T", "NK"],
        columns=["p0", "p1", "p2"],
    )
    fig = cv.program_heatmap(scores, cluster=False)
    z = np.asarray(fig.data[0].z)
    np.testing.assert_allclose(z[:, 0], [0, 0.5, 1])
    np.testing.assert_allclose(z[:, 1], [0.5, 1, 0])
    np.testing.assert_allclose(z[:, 2], [0, 0, 0])  # constant program → 0, not NaN
    np.testing.assert_allclose(np.asarray(fig.data[0].customdata), scores.to_numpy())
    by_obs = cv.program_heatmap(scores, standard_scale="obs", cluster=False)
    np.testing.assert_allclose(np.nanmax(np.asarray(by_obs.data[0].z), axis=1), 1)
    clustered = cv.program_heatmap(scores)
    assert sorted(clustered.data[0].y) == ["B", "NK", "T"]
    assert sorted(clustered.data[0].x) == ["p0", "p1", "p2"]

    adata = _adata(90)
    adata.obs["prog_a"] = np.arange(90.0)
    adata.obs["prog_b"] = 1.0
    fig = cv.program_heatmap(adata, ["prog_a", "prog_b"], "cell_type", standard_scale=None, cluster=False)
    expected = adata.obs.groupby("cell_type", observed=True)["prog_a"].mean()
    got = dict(zip(fig.data[0].y, np.asarray(fig.data[0].z)[:, 0]))
    for k, v in expected.items():
        assert got[str(k)] == pytest.approx(v)
    with pytest.raises(DataError, match="groupby"):
        cv.program_heatmap(adata)
    with pytest.raises(DataError, match="not obs columns"):
        cv.program_heatmap(adata, ["nope"], "cell_type")
    with pytest.raises(ConfigError, match="standard_scale"):
        cv.program_heatmap(scores, standard_scale="rows")
    _serialisable(fig)


def test_program_heatmap_with_many_programs_labels_every_shown_one():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(
        rng.random((12, 84)),
        index=[f"type {i}" for i in range(12)],
        columns=[f"program_{i}" for i in range(84)],
    )
    scores["program_83"] = 0.5  # the same in every group: never among the top programs
    fig = cv.program_heatmap(scores)
    heat = fig.data[0]
    assert len(heat.x) == 50 and "program_83" not in heat.x
    spread = cv._heatmaps._standard_scale(scores, "var").var(axis=0, ddof=0)
    assert set(heat.x) == set(spread.sort_values(ascending=False).index[:50])
    (note,) = [a.text for a in fig.layout.annotations]
    assert note.startswith("top 50 of 84 programs") and "max_programs=None" in note
    assert fig.layout.xaxis.dtick == 1 and fig.layout.yaxis.dtick == 1  # every label drawn
    assert fig.layout.xaxis.tickfont.size >= cv._heatmaps.MIN_FONT
    assert fig.layout.width >= cv._heatmaps.LABEL_PX * 50 and fig.layout.height >= cv._heatmaps.LABEL_PX * 12
    everything = cv.program_heatmap(scores, max_programs=None)
    assert len(everything.data[0].x) == 84 and not everything.layout.annotations
    assert everything.layout.width >= cv._heatmaps.LABEL_PX * 84
    few = cv.program_heatmap(scores.iloc[:, :8])
    assert len(few.data[0].x) == 8 and not few.layout.annotations and few.layout.width is None
    with pytest.raises(ConfigError, match="max_programs"):
        cv.program_heatmap(scores, max_programs=0)
    _serialisable(fig)


def test_confusion_matrix_normalisation_and_counts():
    counts = pd.DataFrame([[8, 2, 0], [1, 9, 0], [0, 0, 0]], index=["B", "T", "NK"], columns=["B", "T", "NK"])
    fig = cv.confusion_matrix(counts)
    (heat,) = fig.data
    z = np.asarray(heat.z)
    np.testing.assert_allclose(z.sum(axis=1), [1, 1, 0])  # empty class stays 0
    np.testing.assert_allclose(np.asarray(heat.customdata), counts.to_numpy())
    assert list(heat.y) == ["B", "T", "NK"]
    assert list(heat.x) == ["B", "T", "NK"]
    assert heat.texttemplate == "%{text}"
    assert heat.text[0][0] == "8<br>0.80"  # the count, then the row fraction
    assert heat.text[2][2] == "0<br>0.00"
    assert list(fig.layout.yaxis.tickvals) == ["B", "T", "NK"]
    assert list(fig.layout.yaxis.ticktext) == ["B (n=10)", "T (n=10)", "NK (n=0)"]
    assert "count" in heat.hovertemplate
    raw = cv.confusion_matrix(counts.to_numpy(), labels=["B", "T", "NK"], normalize=None)
    np.testing.assert_allclose(np.asarray(raw.data[0].z), counts.to_numpy())
    assert raw.data[0].text[0][0] == "8"  # counts only: no fraction under them
    pred = cv.confusion_matrix(counts, normalize="pred")
    np.testing.assert_allclose(np.asarray(pred.data[0].z).sum(axis=0), [1, 1, 0])
    with pytest.raises(DataError, match="non-negative"):
        cv.confusion_matrix(-counts)
    with pytest.raises(ConfigError, match="normalize"):
        cv.confusion_matrix(counts, normalize="rows")
    with pytest.raises(DataError, match="labels"):
        cv.confusion_matrix(counts.to_numpy(), labels=["a", "b"])
    _serialisable(fig)


def test_confusion_matrix_single_cell_class_reads_as_one_cell():
    counts = pd.DataFrame([[1, 0], [3, 9]], index=["rare", "T"], columns=["rare", "T"])
    heat = cv.confusion_matrix(counts).data[0]
    assert heat.text[0][0] == "1<br>1.00"
    assert cv.confusion_matrix(counts).layout.yaxis.ticktext[0] == "rare (n=1)"
    static = cv.static_confusion_matrix(counts)
    assert static.axes[0].texts[0].get_text() == "1\n1.00"


# -- training curves ----------------------------------------------------------------------------


def test_training_curves_from_history_frames():
    steps = pd.DataFrame(
        {
            "step": [1, 2, 3, 4],
            "epoch": [0, 0, 1, 1],
            "lr": [1e-4, 2e-4, 2e-4, 1e-4],
            "cells": [32] * 4,
            "loss": [2.0, 1.5, 1.2, 1.0],
            "loss/mlm": [1.5, 1.0, 0.8, 0.7],
            "loss/cls": [0.5, 0.5, 0.4, 0.3],
        }
    )
    epochs = pd.DataFrame(
        {
            "epoch": [0, 1],
            "step": [2, 4],
            "lr": [2e-4, 1e-4],
            "train/loss": [1.7, 1.1],
            "train/accuracy": [0.5, 0.7],
            "val/loss": [1.8, 1.3],
            "val/accuracy": [0.4, 0.6],
            "val/macro_f1": [0.3, np.nan],
        }
    )
    fig = cv.training_curves(steps, epochs)
    names = [t.name for t in fig.data]
    for expected in [
        "loss",
        "loss/mlm",
        "loss/cls",
        "val/loss",
        "lr",
        "train/accuracy",
        "val/accuracy",
        "val/macro_f1",
    ]:
        assert expected in names
    by_name = {t.name: t for t in fig.data}
    assert by_name["lr"].yaxis == "y2"  # secondary axis
    assert by_name["val/accuracy"].xaxis == "x2"
    assert list(by_name["val/loss"].x) == [2, 4]
    assert list(by_name["val/macro_f1"].y) == [0.3]  # NaN dropped
    assert fig.layout.yaxis2.title.text == "learning rate"
    only = cv.training_curves(steps, epochs, metrics=["val/accuracy"])
    assert [t.name for t in only.data if t.xaxis == "x2"] == ["val/accuracy"]
    with pytest.raises(DataError, match="not in the epoch history"):
        cv.training_curves(steps, epochs, metrics=["auroc"])
    _serialisable(fig)


def test_training_curves_single_objective_and_history_object():
    class History:  # duck-typed like cellkit.train.History
        steps = pd.DataFrame({"step": [1, 2], "lr": [1.0, 1.0], "loss": [1.0, 0.5], "loss/mlm": [1.0, 0.5]})
        epochs = pd.DataFrame()

    names = [t.name for t in cv.training_curves(History()).data]
    assert names == ["loss", "lr"]  # a single objective is not drawn twice


def test_training_curves_empty_is_valid_and_extensible():
    fig = cv.training_curves(pd.DataFrame(), None, metrics=["accuracy"])
    names = [t.name for t in fig.data]
    assert names == ["loss", "lr", "train/accuracy", "val/accuracy"]
    assert all(len(t.x) == 0 for t in fig.data)
    assert fig.layout.xaxis.title.text == "step"
    assert fig.layout.xaxis2.title.text == "epoch"
    assert fig.layout.yaxis.title.text == "loss"
    _serialisable(fig)
    widget_like = go.Figure(fig)
    widget_like.data[0].x = [1]
    widget_like.data[0].y = [0.5]
    _serialisable(widget_like)
    assert len(cv.training_curves(None).data) == 2


# -- export and imports -------------------------------------------------------------------------


def test_save_html_is_atomic_and_complete(tmp_path):
    fig = cv.confusion_matrix(np.eye(2), labels=["a", "b"])
    out = cv.save_html(fig, tmp_path / "sub" / "cm.html", include_plotlyjs="cdn")
    text = out.read_text(encoding="utf-8")
    assert text.rstrip().endswith("</html>")
    assert "plotly" in text
    assert [p.name for p in out.parent.iterdir()] == ["cm.html"]  # no temporary file left behind


def test_import_viz_does_not_import_torch_or_widgets():
    code = (
        "import sys, cellkit.viz\n"
        "bad = {m.split('.')[0] for m in sys.modules} & {'torch', 'ipywidgets', 'anywidget', 'anndata', 'networkx'}\n"
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_embedding_colors_are_what_embedding_draws():
    """The WebGL arrays: the same cells and category colours as the plotly traces, gene values as read."""
    adata = _adata(60)
    adata.obsm["X_umap"] = adata.obsm["X_cellkit_umap"].copy()
    adata.obsm["X_umap"][5] = np.nan  # a cell without coordinates is not drawn
    fig = cv.embedding(adata, basis="X_umap", color="cell_type")
    cols = cv.embedding_colors(adata, basis="X_umap", color="cell_type")
    assert cols.kind == "categorical" and cols.n_cells == 60 and cols.n_valid == 59
    np.testing.assert_array_equal(cols.positions, np.sort(_positions(fig)))
    assert cols.coords.dtype == np.float32 and cols.coords.shape == (59, 2)
    np.testing.assert_array_equal(cols.coords, adata.obsm["X_umap"][cols.positions].astype(np.float32))
    assert dict(zip(cols.categories, cols.colors, strict=True)) == {t.name: t.marker.color for t in fig.data}
    for trace in fig.data:  # each category holds the cells of its trace
        drawn = cols.positions[cols.codes == cols.categories.index(trace.name)]
        assert set(drawn) == set(np.asarray(trace.customdata)[:, 0].astype(np.int64)), trace.name
    assert any("without coordinates" in n for n in cols.notes)
    gene = str(adata.var_names[0])
    cont = cv.embedding_colors(adata, basis="X_umap", color=gene)
    expected = adata[cont.positions, gene].X.toarray().ravel()
    np.testing.assert_allclose(cont.values, expected, rtol=1e-6)
    assert cont.kind == "continuous" and cont.vmin == expected.min() and cont.codes is None
    assert cv.embedding_colors(adata, basis="X_umap").kind == "none"
    assert len(cv.embedding_colors(adata, basis="X_umap", max_points=10).positions) == 10
