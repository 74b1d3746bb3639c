"""The scIB metrics of an embedding, one definition each (Luecken et al. 2022, *Nat. Methods* 19:41).

Arrays in, numbers out; :func:`cellkit.embedding_metrics` and :func:`cellkit.evaluate_embeddings`
both score with these. Neighbour graphs come from scanpy, clusters from scanpy's Leiden (igraph),
silhouettes and cluster agreement from scikit-learn; all are Euclidean, as in scIB.

Bio-conservation (higher is better, in ``[0, 1]``):

- ``nmi`` / ``ari``: Leiden clusters of the embedding's kNN graph against the labels, at the
  resolution that maximises NMI (scIB's ``cluster_optimal_resolution``); NMI with the arithmetic
  mean normalisation;
- ``asw_label``: silhouette of the labels over all cells, rescaled ``(asw + 1) / 2``;
- ``isolated_label``: scIB's isolated-label ASW: the labels present in the fewest batches are the
  "isolated" ones; per isolated label, the mean rescaled silhouette (of all labels) of its cells;
  averaged over those labels (needs batches).

Batch correction (higher is better, in ``[0, 1]``; need batches):

- ``asw_batch``: per label, ``1 − |silhouette of the batches|`` averaged over the label's cells
  (labels seen in one batch only, or with one cell per batch, are skipped), then over labels
  (scIB's ``silhouette_batch``);
- ``graph_connectivity``: per label, the share of its cells in the largest connected component
  of the kNN graph restricted to them, averaged over labels (scIB's ``graph_connectivity``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import DataError

__all__ = [
    "asw_batch",
    "asw_label",
    "check_scorable",
    "default_resolutions",
    "graph_connectivity",
    "isolated_label",
    "knn_connectivities",
    "leiden_nmi_ari",
]


def check_scorable(labels: np.ndarray, label_key: str) -> None:
    """Refuse labels the metrics cannot score: one class, or fewer than 10 cells."""
    if len(np.unique(labels)) < 2:
        raise DataError(f"label_key={label_key!r} needs at least two classes among the embedded cells.")
    if len(labels) < 10:
        raise DataError(f"Too few cells ({len(labels)}) with an embedding and a label for the metrics.")


def default_resolutions() -> np.ndarray:
    """Leiden resolutions scanned for NMI / ARI: 0.1 … 2.0 by 0.1."""
    return np.round(np.arange(0.1, 2.01, 0.1), 2)


def knn_connectivities(x: np.ndarray, *, n_neighbors: int, seed: int) -> Any:
    """scanpy's kNN graph of ``x`` ``(n_cells, n_dims)``: the ``(n_cells, n_cells)`` sparse connectivities."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(np.zeros((len(x), 1), dtype=np.float32))
    tmp.obsm["X"] = np.asarray(x)
    sc.pp.neighbors(tmp, use_rep="X", n_neighbors=n_neighbors, random_state=seed)
    return tmp.obsp["connectivities"]


def leiden_nmi_ari(
    connectivities: Any, labels: np.ndarray, *, resolutions: Any, seed: int
) -> tuple[float, float, float]:
    """``(nmi, ari, resolution)`` at the Leiden resolution maximising NMI (scIB's cluster_optimal_resolution)."""
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    tmp = ad.AnnData(np.zeros((connectivities.shape[0], 1), dtype=np.float32))
    best = (-1.0, 0.0, 0.0)
    for res in resolutions:
        sc.tl.leiden(
            tmp,
            adjacency=connectivities,
            resolution=float(res),
            random_state=seed,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            key_added="c",
        )
        clusters = tmp.obs["c"].to_numpy()
        nmi = normalized_mutual_info_score(labels, clusters, average_method="arithmetic")
        if nmi > best[0]:
            best = (float(nmi), float(adjusted_rand_score(labels, clusters)), float(res))
    return best


def asw_label(x: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette of the labels, rescaled to ``[0, 1]``: ``(mean silhouette + 1) / 2``."""
    from sklearn.metrics import silhouette_score

    return float((silhouette_score(x, labels, metric="euclidean") + 1) / 2)


def asw_batch(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """scIB's batch ASW: per label, the mean of ``1 − |silhouette of the batches|``; the mean over labels.

    NaN when no label has cells of two batches.
    """
    from sklearn.metrics import silhouette_samples

    per_label = []
    for lab in np.unique(labels):
        sel = labels == lab
        n_batches = len(np.unique(batches[sel]))
        if n_batches < 2 or n_batches == sel.sum():
            continue
        s = silhouette_samples(x[sel], batches[sel], metric="euclidean")
        per_label.append(np.mean(1 - np.abs(s)))
    return float(np.mean(per_label)) if per_label else float("nan")


def isolated_label(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """scIB's isolated-label ASW (see the module docstring)."""
    from sklearn.metrics import silhouette_samples

    kinds = np.unique(labels)
    n_batches = np.array([len(np.unique(batches[labels == lab])) for lab in kinds])
    isolated = kinds[n_batches == n_batches.min()]
    s = (silhouette_samples(x, labels, metric="euclidean") + 1) / 2
    return float(np.mean([s[labels == lab].mean() for lab in isolated]))


def graph_connectivity(connectivities: Any, labels: np.ndarray) -> float:
    """Mean over labels of the largest connected component's share of the label's kNN subgraph."""
    from scipy.sparse.csgraph import connected_components

    graph = connectivities.tocsr()
    shares = []
    for lab in np.unique(labels):
        sel = np.flatnonzero(labels == lab)
        _, comp = connected_components(graph[sel][:, sel], directed=False)
        shares.append(np.bincount(comp).max() / len(sel))
    return float(np.mean(shares))
