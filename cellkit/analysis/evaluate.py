"""Score embeddings against honest baselines (HVG + PCA, Harmony, scVI) with scIB's metrics, in one table.

Published evaluations of single-cell foundation models found their zero-shot embeddings often lose
to HVG + PCA, scVI or Harmony (Kedzierska et al. 2025, *Genome Biol.*; Boiarsky et al. 2023). A
user should see that in the same table as the model's scores: :func:`evaluate_embeddings` scores
the given ``obsm`` embeddings and the baselines, computed by their own libraries on the same cells,
with the metrics of :mod:`cellkit.analysis._metrics` (scIB's definitions); draw the table with
:func:`cellkit.viz.evaluation`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._anndata import check_adata, check_keys_free, finite_embedding, record_written
from .._errors import ConfigError, DataError, MissingDependencyError
from .._utils import get_logger
from .._utils._optional import require
from . import _metrics

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["BASELINES", "BATCH_METRICS", "BIO_METRICS", "evaluate_embeddings"]

log = get_logger(__name__)

#: baseline name -> its row in the table
BASELINES = {"pca": "PCA", "harmony": "Harmony", "scvi": "scVI"}
#: bio-conservation metrics (``isolated_label`` needs ``batch_key``)
BIO_METRICS = ("nmi", "ari", "asw_label", "isolated_label")
#: batch-correction metrics (need ``batch_key``)
BATCH_METRICS = ("asw_batch", "graph_connectivity")
#: the optional library of each baseline: (module, extra)
_LIBRARIES = {"harmony": ("harmonypy", "baselines"), "scvi": ("scvi", "baselines")}


def evaluate_embeddings(
    adata: AnnData,
    *,
    label_key: str,
    keys: Sequence[str] = ("X_cellkit",),
    batch_key: str | None = None,
    baselines: Sequence[str] = ("pca", "harmony", "scvi"),
    layer: str | None = None,
    use_raw: bool | None = None,
    n_top_genes: int = 2000,
    n_comps: int = 50,
    scvi_epochs: int | None = None,
    n_neighbors: int = 15,
    resolutions: Any = None,
    random_state: int = 0,
    key_added_prefix: str | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """scIB metrics of embeddings and of the HVG + PCA, Harmony and scVI baselines, in one table.

    Every row is scored on the same cells (those with a label, a batch if ``batch_key``, and an
    embedded row in every ``keys`` embedding) with the same kNN graph settings. The baselines are
    computed by their own libraries on the expression of those cells:

    - ``"pca"``: scanpy, ``normalize_total(target_sum=1e4)`` → ``log1p`` (both skipped when the
      data are not counts: they are then taken as log-normalised, and logged so) →
      ``highly_variable_genes(flavor="seurat", n_top_genes, batch_key)`` → ``scale(max_value=10)``
      → ``pca(n_comps)`` (at most ``n_cells − 1`` / ``n_genes − 1`` components);
    - ``"harmony"``: harmonypy's ``run_harmony`` on that PCA over ``batch_key``; without a
      ``batch_key`` there is nothing to correct, so it is skipped (logged at INFO);
    - ``"scvi"``: scvi-tools' ``SCVI`` (default architecture: 10 latent dimensions) trained on
      the counts of the same highly variable genes (``batch_key`` as its batch), CPU, its latent
      mean. Needs counts (non-negative integers): pass the layer that holds them.

    Metrics (scIB's definitions; see :mod:`cellkit.analysis._metrics`): bio-conservation ``nmi``,
    ``ari`` (Leiden at the NMI-optimal resolution), ``asw_label`` (rescaled cell-type silhouette),
    ``isolated_label`` (isolated-label ASW, needs batches); batch correction ``asw_batch`` (scIB's
    ``1 − |silhouette|`` per label) and ``graph_connectivity``. kBET, iLISI / cLISI, PCR and
    isolated-label F1 are not computed. Aggregates as scIB / scib-metrics (no min-max scaling
    across rows): ``bio`` = mean of the bio metrics, ``batch`` = mean of the batch metrics,
    ``total = 0.6 · bio + 0.4 · batch``. Without ``batch_key`` the batch metrics,
    ``isolated_label``, ``batch`` and ``total`` are NaN and ``bio`` averages three metrics.

    Parameters
    ----------
    adata
        Cells with the ``keys`` embeddings in ``obsm`` and ``obs[label_key]`` (plus the expression
        the baselines start from). Not modified unless ``key_added_prefix`` is given.
    label_key
        Cell types (``obs`` column).
    keys
        ``obsm`` embeddings to score (e.g. from :func:`cellkit.embed_cells`); all-NaN rows (cells
        left out of an embedding) are dropped from every row of the table.
    batch_key
        Batches (``obs`` column): enables the batch metrics and Harmony, and is scVI's batch.
    baselines
        Any of ``"pca"``, ``"harmony"``, ``"scvi"`` (``()``: score ``keys`` only). Harmony and scVI
        need ``pip install "cellkit[baselines]"``.
    layer
        AnnData layer the baselines read (default ``X``).
    use_raw
        Read ``adata.raw`` instead (``None`` or ``False``: do not).
    n_top_genes
        Highly variable genes for PCA and scVI (all genes when there are fewer).
    n_comps
        Principal components of the PCA baseline (Harmony corrects these).
    scvi_epochs
        scVI's ``max_epochs`` (default ``None``: scvi-tools' heuristic, ~400 for 20,000 cells or
        fewer).
    n_neighbors
        kNN graph of every embedding (Leiden clusters, graph connectivity).
    resolutions
        Leiden resolutions scanned for NMI / ARI (default 0.1 … 2.0 by 0.1).
    random_state
        Seed of the graphs, the clustering, the PCA, Harmony and scVI (the global random states
        are restored after scVI).
    key_added_prefix
        Store each baseline embedding in ``obsm[key_added_prefix + name]`` (``name`` in ``pca``,
        ``harmony``, ``scvi``; rows of cells left out are NaN); default ``None``: nothing is
        written.
    overwrite
        Replace those ``obsm`` entries even when cellkit did not write them.

    Returns
    -------
    pandas.DataFrame
        One row per embedding (``keys`` first, then ``"PCA"``, ``"Harmony"``, ``"scVI"``), index
        named ``"embedding"``; columns ``nmi, ari, asw_label, isolated_label, asw_batch,
        graph_connectivity, bio, batch, total``. ``table.attrs`` holds ``n_cells``,
        ``baselines`` (the baseline rows), ``seconds`` (time to compute each baseline; Harmony's
        includes the PCA it corrects, scVI's excludes the gene selection it shares with PCA),
        ``n_dims`` (per row), ``label_key`` and ``batch_key``.

    Raises
    ------
    DataError
        A missing embedding, ``obs`` column, layer or ``.raw``; fewer than 10 usable cells or one
        label; non-count data for scVI.
    ConfigError
        An unknown baseline, ``layer`` together with ``use_raw``, or a key that names a baseline row.
    MissingDependencyError
        harmonypy / scvi-tools missing for a baseline that was asked for.

    Examples
    --------
    >>> table = cellkit.evaluate_embeddings(adata, label_key="cell_type", batch_key="batch")  # doctest: +SKIP
    >>> cellkit.viz.evaluation(table).show()  # doctest: +SKIP
    """
    check_adata(adata, what="cellkit.evaluate_embeddings")
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    todo = _check_options(keys, baselines, layer, use_raw, batch_key)
    if key_added_prefix is not None:
        written = [("obsm", f"{key_added_prefix}{name}") for name in todo]
        check_keys_free(adata, written, overwrite=overwrite, what="cellkit.evaluate_embeddings")
    ok, y, b, given = _cells(adata, keys, label_key, batch_key)
    _metrics.check_scorable(y, label_key)
    found, seconds = _baselines(
        adata,
        todo,
        ok=ok,
        batches=b,
        layer=layer,
        use_raw=bool(use_raw),
        n_top_genes=n_top_genes,
        n_comps=n_comps,
        scvi_epochs=scvi_epochs,
        seed=random_state,
    )
    embeddings = {**given, **{BASELINES[name]: x for name, x in found.items()}}
    if resolutions is None:
        resolutions = _metrics.default_resolutions()
    rows = {
        name: _score(x, y, b, n_neighbors=n_neighbors, resolutions=resolutions, seed=random_state)
        for name, x in embeddings.items()
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "embedding"
    table.attrs.update(
        n_cells=int(ok.sum()),
        baselines=[BASELINES[name] for name in found],
        seconds={BASELINES[name]: s for name, s in seconds.items()},
        n_dims={name: int(x.shape[1]) for name, x in embeddings.items()},
        label_key=label_key,
        batch_key=batch_key,
    )
    if key_added_prefix is not None:
        _store(adata, found, ok, key_added_prefix)
    return table


def _check_options(
    keys: tuple[str, ...],
    baselines: Sequence[str],
    layer: str | None,
    use_raw: bool | None,
    batch_key: str | None,
) -> list[str]:
    """The baselines to run (Harmony left out without batches); their libraries checked up front."""
    baselines = (baselines,) if isinstance(baselines, str) else tuple(baselines)
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        raise ConfigError(f"Unknown baselines {unknown}; choose from {list(BASELINES)}.")
    if layer is not None and use_raw:
        raise ConfigError("Give either layer= or use_raw=True for the baselines' expression, not both.")
    taken = [k for k in keys if k in BASELINES.values()]
    if taken:
        raise ConfigError(f"keys {taken} name baseline rows of the table; rename those obsm entries.")
    if not keys and not baselines:
        raise ConfigError("Nothing to evaluate: give keys= (obsm embeddings) or baselines=.")
    todo = list(dict.fromkeys(baselines))
    if "harmony" in todo and batch_key is None:
        log.warning(
            "The Harmony baseline is skipped: Harmony corrects batches and batch_key is None "
            "(pass batch_key='<obs column of batches>', or leave 'harmony' out of baselines=)."
        )
        todo.remove("harmony")
    for name in todo:
        if name in _LIBRARIES:
            module, extra = _LIBRARIES[name]
            try:
                require(module, extra=extra, purpose=f"the {BASELINES[name]} baseline")
            except MissingDependencyError as exc:
                rest = tuple(n for n in baselines if n != name)
                raise MissingDependencyError(f"{exc} Or leave it out: baselines={rest!r}.") from exc
    return todo


def _column(adata: AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise DataError(f"{what}={key!r} is not an obs column; available: {list(adata.obs.columns)[:20]}.")
    return adata.obs[key]


def _cells(
    adata: AnnData, keys: tuple[str, ...], label_key: str, batch_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """The cells every row is scored on, their labels / batches, and the given embeddings on them."""
    labels = _column(adata, label_key, "label_key")
    ok = labels.notna().to_numpy()
    batches = None
    if batch_key is not None:
        batches = _column(adata, batch_key, "batch_key")
        ok &= batches.notna().to_numpy()
    given = {}
    for key in keys:
        if key not in adata.obsm:
            raise DataError(
                f"adata has no obsm[{key!r}]; embed the cells first (cellkit.embed_cells(adata, model, "
                f"key_added={key!r})) or pick from {list(adata.obsm)}."
            )
        x, embedded = finite_embedding(adata.obsm[key], what=f"obsm[{key!r}]")
        given[key] = x
        ok &= embedded
    y = labels.astype(str).to_numpy()[ok]
    b = None if batches is None else batches.astype(str).to_numpy()[ok]
    return ok, y, b, {key: x[ok] for key, x in given.items()}


def _score(
    x: np.ndarray, y: np.ndarray, b: np.ndarray | None, *, n_neighbors: int, resolutions: Any, seed: int
) -> dict[str, float]:
    """One row of the table: every metric of one embedding, then the aggregates."""
    graph = _metrics.knn_connectivities(x, n_neighbors=n_neighbors, seed=seed)
    nmi, ari, _ = _metrics.leiden_nmi_ari(graph, y, resolutions=resolutions, seed=seed)
    nan = float("nan")
    row = {"nmi": nmi, "ari": ari, "asw_label": _metrics.asw_label(x, y), "isolated_label": nan}
    row.update(asw_batch=nan, graph_connectivity=nan)
    if b is not None:
        row["isolated_label"] = _metrics.isolated_label(x, y, b)
        row["asw_batch"] = _metrics.asw_batch(x, y, b)
        row["graph_connectivity"] = _metrics.graph_connectivity(graph, y)
    bio = [row[m] for m in BIO_METRICS if np.isfinite(row[m])]
    batch = [row[m] for m in BATCH_METRICS if np.isfinite(row[m])]
    row["bio"] = float(np.mean(bio))
    row["batch"] = float(np.mean(batch)) if batch else nan
    row["total"] = 0.6 * row["bio"] + 0.4 * row["batch"]
    return row


# ----------------------------------------------------------------------------- the baselines
def _expression(adata: AnnData, ok: np.ndarray, layer: str | None, use_raw: bool) -> AnnData:
    """A fresh AnnData with the expression of the scored cells (the caller's is never touched)."""
    import anndata as ad
    import scipy.sparse as sp

    if use_raw:
        if adata.raw is None:
            raise DataError("use_raw=True but adata.raw is None; pass layer= or leave use_raw out.")
        x, var_names = adata.raw.X, adata.raw.var_names
    elif layer is not None:
        if layer not in adata.layers:
            raise DataError(f"layer={layer!r} is not in adata.layers; available: {list(adata.layers)}.")
        x, var_names = adata.layers[layer], adata.var_names
    else:
        x, var_names = adata.X, adata.var_names
    rows = np.flatnonzero(ok)
    x = sp.csr_matrix(x[rows], dtype=np.float32) if sp.issparse(x) else np.array(x[rows], dtype=np.float32)
    return ad.AnnData(
        x, obs=pd.DataFrame(index=adata.obs_names[rows].astype(str)), var=pd.DataFrame(index=var_names)
    )


def _is_counts(x: Any) -> bool:
    """Non-negative integers (checked on up to 1,000,000 stored values)."""
    values = x.data if hasattr(x, "data") and not isinstance(x, np.ndarray) else np.asarray(x).ravel()
    values = values[:1_000_000]
    return bool(np.all(values >= 0) and np.all(values == np.round(values)))


def _hvg_pca(
    work: AnnData, *, batch_key: str | None, n_top_genes: int, n_comps: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """scanpy's HVG + PCA recipe: ``(embedding, highly-variable mask)``."""
    import scanpy as sc

    a = work.copy()
    if _is_counts(a.X):
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    else:
        log.info(
            "The baselines' expression is not counts: taken as log-normalised (no normalize_total / log1p)."
        )
    hvg = np.ones(a.n_vars, dtype=bool)
    if n_top_genes < a.n_vars:
        sc.pp.highly_variable_genes(a, n_top_genes=n_top_genes, flavor="seurat", batch_key=batch_key)
        hvg = a.var["highly_variable"].to_numpy()
    a = a[:, hvg].copy()
    if hasattr(a.X, "toarray"):  # scaling centres the genes: the HVG matrix becomes dense (float32, said here)
        a.X = a.X.toarray().astype(np.float32, copy=False)
    sc.pp.scale(a, max_value=10)
    k = min(n_comps, a.n_obs - 1, a.n_vars - 1)
    sc.pp.pca(a, n_comps=k, random_state=seed)
    return np.asarray(a.obsm["X_pca"], dtype=np.float32), hvg


def _harmony(pca: np.ndarray, batches: np.ndarray, seed: int) -> np.ndarray:
    harmonypy = require("harmonypy", extra="baselines", purpose="the Harmony baseline")
    out = harmonypy.run_harmony(
        pca, pd.DataFrame({"batch": batches}), "batch", random_state=seed, verbose=False
    )
    z = np.asarray(out.Z_corr, dtype=np.float32)
    return z if z.shape[0] == len(pca) else z.T  # harmonypy < 2 returns (dims, cells)


def _scvi(counts: AnnData, *, batch_key: str | None, epochs: int | None, seed: int) -> np.ndarray:
    import torch

    scvi = require("scvi", extra="baselines", purpose="the scVI baseline")
    if not _is_counts(counts.X):
        raise DataError(
            "scVI models counts, but the baselines' expression is not non-negative integers; pass the layer "
            "that holds raw counts (layer='counts') or leave scVI out: baselines=('pca', 'harmony')."
        )
    # scvi-tools seeds the global random states (seed_everything): put the caller's back afterwards
    state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        with torch.random.fork_rng():
            scvi.settings.seed = seed
            scvi.model.SCVI.setup_anndata(counts, batch_key=batch_key)
            model = scvi.model.SCVI(counts)
            model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
            return np.asarray(model.get_latent_representation(), dtype=np.float32)
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])  # noqa: NPY002


def _baselines(
    adata: AnnData,
    todo: list[str],
    *,
    ok: np.ndarray,
    batches: np.ndarray | None,
    layer: str | None,
    use_raw: bool,
    n_top_genes: int,
    n_comps: int,
    scvi_epochs: int | None,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``({name: embedding of the scored cells}, {name: seconds})`` of the baselines in ``todo``."""
    if not todo:
        return {}, {}
    work = _expression(adata, ok, layer, use_raw)
    if batches is not None:
        work.obs["batch"] = pd.Categorical(batches)
    key = None if batches is None else "batch"
    out: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    pca, hvg = _hvg_pca(work, batch_key=key, n_top_genes=n_top_genes, n_comps=n_comps, seed=seed)
    seconds["pca"] = time.perf_counter() - t
    if "pca" in todo:
        out["pca"] = pca
    if "harmony" in todo:
        t = time.perf_counter()
        out["harmony"] = _harmony(pca, batches, seed)
        seconds["harmony"] = time.perf_counter() - t + seconds["pca"]
    if "scvi" in todo:
        t = time.perf_counter()
        out["scvi"] = _scvi(work[:, hvg].copy(), batch_key=key, epochs=scvi_epochs, seed=seed)
        seconds["scvi"] = time.perf_counter() - t
    if "pca" not in todo:
        seconds.pop("pca")
    return out, seconds


def _store(adata: AnnData, found: dict[str, np.ndarray], ok: np.ndarray, prefix: str) -> None:
    """``obsm[prefix + name]`` for every baseline (NaN rows for the cells left out)."""
    for name, x in found.items():
        full = np.full((adata.n_obs, x.shape[1]), np.nan, dtype=np.float32)
        full[ok] = x
        adata.obsm[f"{prefix}{name}"] = full
    record_written(adata, [("obsm", f"{prefix}{name}") for name in found])
