"""Reference mapping (kNN label transfer) and embedding metrics (NMI, ARI, ASW, scGPT's ``avg_bio``).

Neighbours come from scikit-learn (exact, cosine) or pynndescent (approximate, for large
references); the metrics are scIB's, one definition each in :mod:`cellkit.analysis._metrics` (shared
with :func:`cellkit.evaluate_embeddings`), as scGPT's ``eval_scib_metrics`` reports them:

- ``nmi`` / ``ari``: Leiden clusters of the embedding's kNN graph against the labels, at the
  resolution (0.1 … 2.0) that maximises NMI (scib's ``cluster_optimal_resolution``);
- ``asw_label``: silhouette of the labels, rescaled to ``(asw + 1) / 2``;
- ``asw_batch``: per label, ``1 − |silhouette of the batches|`` averaged over its cells, then
  over labels (scib's ``silhouette_batch``);
- ``avg_bio = mean(nmi, ari, asw_label)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._anndata import check_adata, check_keys_free, finite_embedding, record_written
from .._errors import ConfigError, DataError
from .._utils import get_logger
from . import _metrics

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["embedding_metrics", "transfer_labels"]

log = get_logger(__name__)
_EXACT_LIMIT = 50_000


def _rep(adata: AnnData, use_rep: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The embedding and the mask of its embedded rows (all-NaN rows: cells left out)."""
    if use_rep not in adata.obsm:
        raise DataError(
            f"The {what} has no obsm[{use_rep!r}]; embed it first: cellkit.embed_cells({what}, model, key_added={use_rep!r})."
        )
    return finite_embedding(adata.obsm[use_rep], what=f"The {what}'s obsm[{use_rep!r}]")


def _labels(adata: AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise DataError(f"{what}={key!r} is not an obs column; available: {list(adata.obs.columns)[:20]}.")
    return adata.obs[key]


def _neighbors(
    reference: np.ndarray, query: np.ndarray, k: int, metric: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, distances)`` of each query row's ``k`` nearest reference rows."""
    if len(reference) <= _EXACT_LIMIT:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(reference)
        dist, idx = nn.kneighbors(query)
        return idx, dist
    from pynndescent import NNDescent

    index = NNDescent(reference, n_neighbors=max(k, 15), metric=metric, random_state=seed)
    idx, dist = index.query(query, k=k)
    return idx, dist


def transfer_labels(
    query: AnnData,
    reference: AnnData,
    *,
    label_key: str,
    use_rep: str = "X_cellkit",
    key_added: str | None = None,
    n_neighbors: int = 15,
    metric: str = "cosine",
    weighting: str = "distance",
    random_state: int = 0,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Transfer labels from a reference to a query by k-nearest neighbours in an embedding.

    Parameters
    ----------
    query
        Cells to label, with ``obsm[use_rep]``.
    reference
        Labelled cells, with ``obsm[use_rep]`` from the same model and ``obs[label_key]``.
    label_key
        Reference labels.
    use_rep
        Embedding both AnnData carry (e.g. from :func:`cellkit.embed_cells`).
    key_added
        Query ``obs`` columns written: ``key_added`` (label) and ``key_added + "_confidence"``
        (share of the neighbours' weight that voted for it, in ``[0, 1]``); default
        ``label_key + "_transferred"``.
    n_neighbors, metric
        Neighbours to vote, distance (exact scikit-learn search up to 50,000 reference cells,
        pynndescent above).
    weighting
        ``"distance"`` (votes weighted by ``1 / (distance + 1e-6)``) or ``"uniform"``.
    random_state
        Seed of the approximate index.
    copy
        Return a modified copy of ``query``.
    overwrite
        Replace the ``obs`` columns even when cellkit did not write them (e.g. the true labels).

    Returns
    -------
    ``None`` (``query.obs`` updated) or the copy.

    Raises
    ------
    DataError
        Duplicate ``obs_names``, taken output columns, an embedding with infinite values, or no
        embedded (non-NaN) cell in the reference or the query.
    """
    check_adata(query, what="cellkit.transfer_labels (query)")
    check_adata(reference, what="cellkit.transfer_labels (reference)")
    key = key_added or f"{label_key}_transferred"
    written = [("obs", key), ("obs", f"{key}_confidence")]
    check_keys_free(query, written, overwrite=overwrite, what="cellkit.transfer_labels")
    if weighting not in ("distance", "uniform"):
        raise ConfigError(f"weighting must be 'distance' or 'uniform', got {weighting!r}.")
    if n_neighbors < 1:
        raise ConfigError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    (ref_x, ref_emb), (q_x, ok_q) = _rep(reference, use_rep, "reference"), _rep(query, use_rep, "query")
    if ref_x.shape[1] != q_x.shape[1]:
        raise DataError(
            f"The reference embedding has {ref_x.shape[1]} dimensions, the query's {q_x.shape[1]}; embed both with "
            "the same model."
        )
    labels = _labels(reference, label_key, "label_key")
    ok_ref = ref_emb & labels.notna().to_numpy()
    if ok_ref.sum() == 0:
        raise DataError(
            f"No reference cell has both an embedding (a non-NaN row of obsm[{use_rep!r}]) and a {label_key!r} label; "
            "embed the reference cells with cellkit.embed_cells and check the labels."
        )
    if ok_q.sum() == 0:
        raise DataError(
            f"No query cell has an embedding (every row of obsm[{use_rep!r}] is NaN); embed the query cells first: "
            f"cellkit.embed_cells(query, model, key_added={use_rep!r})."
        )
    k = min(n_neighbors, int(ok_ref.sum()))
    ref_labels = labels.astype(str).to_numpy()[ok_ref]
    classes, codes = np.unique(ref_labels, return_inverse=True)
    idx, dist = _neighbors(ref_x[ok_ref], q_x[ok_q], k, metric, random_state)
    w = 1.0 / (dist + 1e-6) if weighting == "distance" else np.ones_like(dist)
    votes = np.zeros((len(idx), len(classes)))
    np.add.at(votes, (np.repeat(np.arange(len(idx)), k), codes[idx].ravel()), w.ravel())
    best = votes.argmax(1)
    conf = votes[np.arange(len(idx)), best] / votes.sum(1)
    target = query.copy() if copy else query
    lab = np.full(query.n_obs, None, dtype=object)
    lab[ok_q] = classes[best]
    confidence = np.full(query.n_obs, np.nan, dtype=np.float32)
    confidence[ok_q] = conf
    target.obs[key] = pd.Categorical(lab, categories=list(classes))
    target.obs[f"{key}_confidence"] = confidence
    record_written(target, written)
    return target if copy else None


def embedding_metrics(
    adata: AnnData,
    *,
    label_key: str,
    use_rep: str = "X_cellkit",
    batch_key: str | None = None,
    n_neighbors: int = 15,
    resolutions: Any = None,
    random_state: int = 0,
) -> dict[str, float]:
    """Biological conservation (and batch mixing) of an embedding, as scGPT reports them.

    Parameters
    ----------
    adata
        Cells with ``obsm[use_rep]`` and ``obs[label_key]`` (cells whose embedding row is NaN, as
        :func:`cellkit.embed_cells` leaves unselected cells, or with no label are left out; an
        embedding with infinite values is refused).
    label_key
        Cell types.
    use_rep
        The embedding.
    batch_key
        Batches: adds ``asw_batch``.
    n_neighbors
        kNN graph for the Leiden clusters.
    resolutions
        Leiden resolutions tried (default 0.1 … 2.0 by 0.1).
    random_state
        Seed of the graph and the clustering.

    Returns
    -------
    ``{"nmi", "ari", "asw_label", "avg_bio", "resolution", "n_cells"}`` (+ ``"asw_batch"``).
    """
    check_adata(adata, what="cellkit.embedding_metrics")
    x, embedded = _rep(adata, use_rep, "AnnData")
    labels = _labels(adata, label_key, "label_key")
    ok = embedded & labels.notna().to_numpy()
    if batch_key is not None:
        batches = _labels(adata, batch_key, "batch_key")
        ok &= batches.notna().to_numpy()
    x, y = x[ok], labels.astype(str).to_numpy()[ok]
    _metrics.check_scorable(y, label_key)
    if resolutions is None:
        resolutions = _metrics.default_resolutions()
    graph = _metrics.knn_connectivities(x, n_neighbors=n_neighbors, seed=random_state)
    nmi, ari, res = _metrics.leiden_nmi_ari(graph, y, resolutions=resolutions, seed=random_state)
    asw_label = _metrics.asw_label(x, y)
    out = {
        "nmi": nmi,
        "ari": ari,
        "asw_label": asw_label,
        "avg_bio": float(np.mean([nmi, ari, asw_label])),
        "resolution": res,
        "n_cells": len(y),
    }
    if batch_key is not None:
        out["asw_batch"] = _metrics.asw_batch(x, y, batches.astype(str).to_numpy()[ok])
    return out

