"""cellkit.evaluate_embeddings and cellkit.viz.evaluation on synthetic counts with planted types and batches."""

from __future__ import annotations

import importlib.util
import logging
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellkit
import cellkit.viz as cv
from cellkit import ConfigError, DataError, MissingDependencyError
from cellkit.analysis import _metrics, evaluate_embeddings

METRICS = ["nmi", "ari", "asw_label", "isolated_label", "asw_batch", "graph_connectivity"]
COLUMNS = [*METRICS, "bio", "batch", "total"]
HAS_HARMONY = importlib.util.find_spec("harmonypy") is not None
HAS_SCVI = importlib.util.find_spec("scvi") is not None
#: Leiden resolutions scanned in these tests (the default scans 20; three keep the tests fast)
FEW = (0.2, 0.5, 1.0)


def evaluate(adata: ad.AnnData, **options) -> pd.DataFrame:
    return evaluate_embeddings(adata, **{"resolutions": FEW, **options})


def planted(
    n_types: int = 4, n_batches: int = 2, n_per: int = 40, n_genes: int = 120, seed: int = 0
) -> ad.AnnData:
    """Poisson counts: each type its own gene profile, each batch a multiplicative gene effect.

    ``obsm["X_good"]`` is the planted type layout (types apart, batches mixed);
    ``obsm["X_shuffled"]`` the same rows in a random order (no relation to the cells).
    """
    r = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_types), n_per * n_batches)
    b = np.tile(np.repeat(np.arange(n_batches), n_per), n_types)
    base = r.gamma(2.0, 1.0, n_genes)
    types = np.exp(r.normal(0, 1.0, (n_types, n_genes)))
    batches = np.exp(r.normal(0, 0.7, (n_batches, n_genes)))
    lam = base * types[y] * batches[b] * r.uniform(0.5, 1.5, len(y))[:, None]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"t{i}" for i in y]),
            "batch": pd.Categorical([f"b{i}" for i in b]),
        },
        index=[f"c{i}" for i in range(len(y))],
    )
    a = ad.AnnData(
        r.poisson(lam).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])
    )
    good = np.eye(n_types, 8)[y] * 3 + r.normal(0, 0.6, (len(y), 8))
    a.obsm["X_good"] = good.astype(np.float32)
    a.obsm["X_shuffled"] = a.obsm["X_good"][r.permutation(len(y))]
    return a


def snapshot(a: ad.AnnData) -> dict:
    return {
        "X": a.X.copy(),
        "obs": a.obs.copy(),
        "var": a.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in a.obsm.items()},
        "layers": set(a.layers),
        "uns": set(a.uns),
        "obsp": set(a.obsp),
    }


def assert_unchanged(a: ad.AnnData, before: dict) -> None:
    np.testing.assert_array_equal(a.X, before["X"])
    pd.testing.assert_frame_equal(a.obs, before["obs"])
    pd.testing.assert_frame_equal(a.var, before["var"])
    assert set(a.obsm) == set(before["obsm"])
    for k, v in before["obsm"].items():
        np.testing.assert_array_equal(a.obsm[k], v)
    assert (set(a.layers), set(a.uns), set(a.obsp)) == (before["layers"], before["uns"], before["obsp"])


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return planted()


# ----------------------------------------------------------------------------- the metrics
def test_a_planted_embedding_beats_a_shuffled_one(adata):
    table = evaluate(
        adata, label_key="cell_type", keys=["X_good", "X_shuffled"], batch_key="batch", baselines=()
    )
    assert list(table.index) == ["X_good", "X_shuffled"] and table.index.name == "embedding"
    assert list(table.columns) == COLUMNS
    good, bad = table.loc["X_good"], table.loc["X_shuffled"]
    for m in ("nmi", "ari", "asw_label", "isolated_label", "bio", "total"):
        assert good[m] > bad[m] + 0.1, m
    assert good["nmi"] > 0.9 and good["ari"] > 0.9 and bad["nmi"] < 0.1
    # per label, the batches of the planted layout are mixed: batch ASW near 1, one connected graph per type
    assert good["asw_batch"] > 0.9 and good["graph_connectivity"] == 1.0
    # scIB's aggregates
    np.testing.assert_allclose(
        table["bio"], table[["nmi", "ari", "asw_label", "isolated_label"]].mean(axis=1)
    )
    np.testing.assert_allclose(table["batch"], table[["asw_batch", "graph_connectivity"]].mean(axis=1))
    np.testing.assert_allclose(table["total"], 0.6 * table["bio"] + 0.4 * table["batch"])
    assert table.attrs["n_cells"] == adata.n_obs and table.attrs["baselines"] == []
    assert table.attrs["n_dims"] == {"X_good": 8, "X_shuffled": 8}


def test_one_definition_shared_with_embedding_metrics(adata):
    table = evaluate(adata, label_key="cell_type", keys="X_good", batch_key="batch", baselines=())
    m = cellkit.embedding_metrics(
        adata, label_key="cell_type", use_rep="X_good", batch_key="batch", resolutions=FEW
    )
    for key in ("nmi", "ari", "asw_label", "asw_batch"):
        assert table.loc["X_good", key] == pytest.approx(m[key], abs=1e-12), key


def test_without_batches_only_bio_is_scored_and_harmony_is_skipped(adata, caplog):
    with caplog.at_level(logging.INFO, logger="cellkit"):
        table = evaluate(adata, label_key="cell_type", keys=["X_good"], baselines=("pca", "harmony"))
    assert "Harmony baseline is skipped" in caplog.text
    assert list(table.index) == ["X_good", "PCA"]
    assert table[["isolated_label", "asw_batch", "graph_connectivity", "batch", "total"]].isna().all().all()
    np.testing.assert_allclose(table["bio"], table[["nmi", "ari", "asw_label"]].mean(axis=1))


def test_cells_left_out_of_an_embedding_are_left_out_of_every_row(adata):
    a = adata.copy()
    a.obsm["X_good"][:10] = np.nan  # embed_cells(cells=...) leaves unselected cells NaN
    a.obs.loc[a.obs_names[10:15], "cell_type"] = np.nan
    table = evaluate(a, label_key="cell_type", keys=["X_good", "X_shuffled"], baselines=("pca",))
    assert table.attrs["n_cells"] == a.n_obs - 15
    assert table.notna()[["nmi", "ari", "asw_label", "bio"]].all().all()


# ----------------------------------------------------------------------------- the baselines
def test_pca_baseline_and_the_callers_anndata_is_not_touched(adata):
    before = snapshot(adata)
    table = evaluate(
        adata, label_key="cell_type", keys=["X_good"], batch_key="batch", baselines=("pca",), n_comps=20
    )
    assert_unchanged(adata, before)
    assert list(table.index) == ["X_good", "PCA"] and table.attrs["baselines"] == ["PCA"]
    assert table.attrs["n_dims"]["PCA"] == 20 and table.attrs["seconds"]["PCA"] > 0
    # the planted types are strong in the counts: HVG + PCA finds them
    assert table.loc["PCA", "nmi"] > 0.7
    # a layer and .raw are read the same way
    a = adata.copy()
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X)  # X now log-normalised-like: the layer is what the baseline reads
    from_layer = evaluate(
        a, label_key="cell_type", keys=[], batch_key="batch", baselines=("pca",), layer="counts", n_comps=20
    )
    pd.testing.assert_series_equal(from_layer.loc["PCA"], table.loc["PCA"])
    a.raw = adata.copy()
    from_raw = evaluate(
        a, label_key="cell_type", keys=[], batch_key="batch", baselines=("pca",), use_raw=True, n_comps=20
    )
    pd.testing.assert_frame_equal(from_raw, from_layer)


def test_key_added_prefix_stores_the_baselines_only_when_asked(adata):
    a = adata.copy()
    before = set(a.obsm)
    evaluate(
        a, label_key="cell_type", keys=["X_good"], baselines=("pca",), n_comps=10, key_added_prefix="base_"
    )
    assert set(a.obsm) - before == {"base_pca"}
    assert a.obsm["base_pca"].shape == (a.n_obs, 10)
    # cellkit wrote it: a second run may replace it; an entry cellkit did not write is protected
    evaluate(
        a, label_key="cell_type", keys=["X_good"], baselines=("pca",), n_comps=10, key_added_prefix="base_"
    )
    a.obsm["mine_pca"] = np.zeros((a.n_obs, 2))
    with pytest.raises(DataError, match="mine_pca"):
        evaluate(a, label_key="cell_type", keys=["X_good"], baselines=("pca",), key_added_prefix="mine_")
    evaluate(
        a,
        label_key="cell_type",
        keys=[],
        baselines=("pca",),
        n_comps=5,
        key_added_prefix="mine_",
        overwrite=True,
    )
    assert a.obsm["mine_pca"].shape == (a.n_obs, 5)


@pytest.mark.skipif(not HAS_HARMONY, reason="harmonypy is not installed (cellkit[baselines])")
def test_harmony_baseline_mixes_the_batches_pca_keeps(adata):
    table = evaluate(adata, label_key="cell_type", keys=[], batch_key="batch", baselines=("pca", "harmony"))
    assert list(table.index) == ["PCA", "Harmony"]
    assert table.loc["Harmony", "asw_batch"] > table.loc["PCA", "asw_batch"]
    assert table.loc["Harmony", "batch"] > table.loc["PCA", "batch"]
    assert table.attrs["n_dims"]["Harmony"] == table.attrs["n_dims"]["PCA"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SCVI, reason="scvi-tools is not installed (cellkit[baselines])")
def test_scvi_baseline_trains_on_counts(adata):
    import torch

    state = torch.get_rng_state()  # scvi-tools seeds torch globally (seed_everything): it must come back
    table = evaluate(
        adata, label_key="cell_type", keys=[], batch_key="batch", baselines=("scvi",), scvi_epochs=3
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert list(table.index) == ["scVI"] and table.attrs["n_dims"]["scVI"] == 10
    assert table.loc["scVI"].notna().all()
    a = adata.copy()
    a.X = np.log1p(a.X)
    with pytest.raises(DataError, match="counts"):
        evaluate(a, label_key="cell_type", keys=[], baselines=("scvi",), scvi_epochs=1)


def test_a_missing_library_names_the_extra(adata, monkeypatch):
    monkeypatch.setitem(sys.modules, "harmonypy", None)  # import harmonypy raises ImportError
    with pytest.raises(MissingDependencyError, match=r"cellkit\[baselines\].*baselines=\('pca', 'scvi'\)"):
        evaluate(adata, label_key="cell_type", batch_key="batch")


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keys": ["X_missing"]}, DataError, r"no obsm\['X_missing'\].*embed_cells"),
        ({"label_key": "celltype"}, DataError, "label_key='celltype' is not an obs column"),
        ({"batch_key": "sample"}, DataError, "batch_key='sample' is not an obs column"),
        ({"baselines": ("umap",)}, ConfigError, r"Unknown baselines \['umap'\]"),
        ({"baselines": ("pca",), "layer": "counts", "use_raw": True}, ConfigError, "not both"),
        ({"baselines": ("pca",), "layer": "counts"}, DataError, "layer='counts' is not in adata.layers"),
        ({"baselines": ("pca",), "use_raw": True}, DataError, r"adata.raw is None"),
        ({"keys": [], "baselines": ()}, ConfigError, "Nothing to evaluate"),
        ({"keys": ["PCA"]}, ConfigError, "name baseline rows"),
    ],
)
def test_bad_inputs(adata, kwargs, error, match):
    options = {"label_key": "cell_type", "keys": ["X_good"], "baselines": (), **kwargs}
    with pytest.raises(error, match=match):
        evaluate(adata, **options)


def test_one_label_is_refused(adata):
    a = adata.copy()
    a.obs["one"] = "x"
    with pytest.raises(DataError, match="at least two classes"):
        evaluate(a, label_key="one", keys=["X_good"], baselines=())


# ----------------------------------------------------------------------------- the figure
def test_figure_is_one_heatmap_of_the_table(adata):
    table = evaluate(
        adata, label_key="cell_type", keys=["X_good", "X_shuffled"], batch_key="batch", baselines=("pca",)
    )
    fig = cv.evaluation(table)
    (heat,) = fig.data
    assert heat.type == "heatmap" and heat.name == "scores"
    assert list(heat.y) == ["<i>PCA</i>", "X_shuffled", "X_good"]  # first row on top; baselines in italics
    assert len(heat.x) == len(COLUMNS)
    np.testing.assert_allclose(np.asarray(heat.z)[::-1], table[COLUMNS].to_numpy())
    assert heat.text[-1][0] == f"{table.iloc[0]['nmi']:.3f}"
    assert [s.x0 for s in fig.layout.shapes] == [len(METRICS) - 0.5]  # metrics | aggregates
    # bio only: the all-NaN batch columns are not drawn
    bio = evaluate(adata, label_key="cell_type", keys=["X_good"], baselines=())
    assert list(cv.evaluation(bio).data[0].x) == ["NMI", "ARI", "cell-type ASW", "Bio"]
    with pytest.raises(DataError, match="evaluate_embeddings"):
        cv.evaluation(pd.DataFrame({"a": [1.0]}))


# ----------------------------------------------------------------------------- scib-metrics agreement
def _blobs(noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    y = np.repeat(np.arange(5), 60)
    b = r.choice(3, len(y), p=[0.5, 0.3, 0.2])
    b[y == 4] = 0  # an isolated label: seen in one batch only
    x = np.eye(5, 10)[y] * 2.0 + r.normal(0, noise, (len(y), 10)) + np.eye(3, 10, 5)[b] * 0.7
    return x.astype(np.float32), np.array([f"t{i}" for i in y]), np.array([f"b{i}" for i in b])


@pytest.mark.skipif(importlib.util.find_spec("scib_metrics") is None, reason="scib-metrics is not installed")
def test_metrics_agree_with_scib_metrics():
    """cellkit's definitions against scib-metrics (the scverse reimplementation of scIB).

    Silhouette-based scores are the same formulas: they agree to float32 round-off (1e-5; scib-metrics
    computes in float32 with jax). Graph connectivity is compared on the same graph (scIB's: the
    symmetric kNN connectivities; scib-metrics' Benchmarker uses the directed kNN distance graph
    instead, a deviation from scIB). NMI / ARI: the same kNN graph (umap connectivities, exact
    neighbours) and the same resolutions and igraph Leiden, but scanpy and scib-metrics feed igraph
    different random generators, so the partitions can differ slightly: agreement within 0.03.
    """
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    x, y, b = _blobs(noise=0.9, seed=0)
    assert _metrics.asw_label(x, y) == pytest.approx(float(scib_metrics.silhouette_label(x, y)), abs=1e-5)
    assert _metrics.asw_batch(x, y, b) == pytest.approx(
        float(scib_metrics.silhouette_batch(x, y, b)), abs=1e-5
    )
    assert _metrics.isolated_label(x, y, b) == pytest.approx(
        float(scib_metrics.isolated_labels(x, y, b)), abs=1e-5
    )
    graph = _metrics.knn_connectivities(x, n_neighbors=15, seed=0)

    class SameGraph:
        knn_graph_distances = graph

    gc = _metrics.graph_connectivity(graph, y)
    assert 0.9 < gc < 1.0  # not a trivial 1
    assert gc == pytest.approx(float(scib_metrics.graph_connectivity(SameGraph(), y)), abs=1e-12)

    x, y, _ = _blobs(noise=0.7, seed=2)
    dist, idx = NearestNeighbors(n_neighbors=15).fit(x).kneighbors(x)
    neighbors = NeighborsResults(indices=idx, distances=dist)
    graph = _metrics.knn_connectivities(x, n_neighbors=15, seed=0)
    assert abs(graph - neighbors.knn_graph_connectivities).max() < 1e-4  # the same graph
    resolutions = np.array([0.2 * k for k in range(1, 11)])  # scib-metrics' scan
    nmi, ari, _ = _metrics.leiden_nmi_ari(graph, y, resolutions=resolutions, seed=42)
    theirs = scib_metrics.nmi_ari_cluster_labels_leiden(neighbors, y, seed=42)
    assert 0.6 < nmi < 0.95  # a case where clustering is neither trivial nor hopeless
    assert nmi == pytest.approx(float(theirs["nmi"]), abs=0.03)
    assert ari == pytest.approx(float(theirs["ari"]), abs=0.03)
