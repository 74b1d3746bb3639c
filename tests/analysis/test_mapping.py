"""Reference mapping and embedding metrics on well-separated synthetic embeddings."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from cellkit import ConfigError, DataError
from cellkit.analysis import embedding_metrics, transfer_labels


def blobs(
    n_per: int = 40, n_types: int = 4, d: int = 8, noise: float = 0.15, seed: int = 0, shift=0.0
) -> ad.AnnData:
    r = np.random.default_rng(seed)
    centers = np.eye(n_types, d) * 3
    y = np.repeat(np.arange(n_types), n_per)
    x = centers[y] + r.normal(0, noise, (len(y), d)) + shift
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"t{i}" for i in y]), "batch": r.choice(["a", "b"], len(y))},
        index=[f"c{seed}_{i}" for i in range(len(y))],
    )
    a = ad.AnnData(np.zeros((len(y), 1), dtype=np.float32), obs=obs)
    a.obsm["X_cellkit"] = x.astype(np.float32)
    return a


def test_transfer_labels_recovers_types_with_confidence():
    ref, query = blobs(seed=0), blobs(seed=1)
    truth = query.obs["cell_type"].copy()
    before = set(query.obs.columns)
    transfer_labels(query, ref, label_key="cell_type")
    assert set(query.obs.columns) - before == {"cell_type_transferred", "cell_type_transferred_confidence"}
    assert (query.obs["cell_type_transferred"].astype(str) == truth.astype(str)).mean() == 1.0
    conf = query.obs["cell_type_transferred_confidence"]
    assert conf.between(0, 1).all()
    assert conf.min() > 0.9
    out = transfer_labels(query, ref, label_key="cell_type", key_added="pred", weighting="uniform", copy=True)
    assert "pred" in out.obs
    assert "pred" not in query.obs


def test_transfer_labels_ambiguous_cells_get_low_confidence():
    ref = blobs(seed=0, n_types=2)
    query = blobs(seed=1, n_types=2)
    query.obsm["X_cellkit"][:5] = ref.obsm["X_cellkit"].mean(0)  # halfway between the two types
    transfer_labels(query, ref, label_key="cell_type", n_neighbors=30, weighting="uniform")
    conf = query.obs["cell_type_transferred_confidence"].to_numpy()
    assert conf[:5].mean() < conf[5:].mean()


def test_transfer_labels_bad_inputs():
    ref, query = blobs(), blobs(seed=1)
    with pytest.raises(DataError, match="label_key='celltype' is not an obs column"):
        transfer_labels(query, ref, label_key="celltype")
    with pytest.raises(DataError, match="embed_cells"):
        transfer_labels(query, ref, label_key="cell_type", use_rep="X_other")
    query.obsm["X_cellkit"] = query.obsm["X_cellkit"][:, :4]
    with pytest.raises(DataError, match="same model"):
        transfer_labels(query, ref, label_key="cell_type")
    with pytest.raises(ConfigError, match="weighting"):
        transfer_labels(blobs(seed=1), ref, label_key="cell_type", weighting="nope")


def test_metrics_separated_vs_random():
    good = embedding_metrics(blobs(), label_key="cell_type", batch_key="batch")
    assert good["nmi"] > 0.95
    assert good["ari"] > 0.95
    assert good["asw_label"] > 0.8
    assert good["avg_bio"] == pytest.approx(np.mean([good["nmi"], good["ari"], good["asw_label"]]))
    assert good["asw_batch"] > 0.8  # batches are random within types: well mixed
    bad = blobs()
    bad.obsm["X_cellkit"] = (
        np.random.default_rng(0).normal(size=bad.obsm["X_cellkit"].shape).astype(np.float32)
    )
    worse = embedding_metrics(bad, label_key="cell_type")
    assert worse["avg_bio"] < good["avg_bio"] - 0.3


def test_metrics_leiden_clusters_are_scanpys():
    a = blobs()
    m = embedding_metrics(a, label_key="cell_type", resolutions=[0.5])
    assert m["resolution"] == 0.5
    import scanpy as sc

    sc.pp.neighbors(a, use_rep="X_cellkit", n_neighbors=15, random_state=0)
    sc.tl.leiden(a, resolution=0.5, random_state=0, flavor="igraph", n_iterations=2, directed=False)
    assert m["ari"] == pytest.approx(adjusted_rand_score(a.obs["cell_type"], a.obs["leiden"]))


def test_metrics_bad_inputs():
    a = blobs()
    with pytest.raises(DataError, match="two classes"):
        embedding_metrics(a[a.obs["cell_type"] == "t0"].copy(), label_key="cell_type")
    with pytest.raises(DataError, match="batch_key='donor'"):
        embedding_metrics(a, label_key="cell_type", batch_key="donor")
