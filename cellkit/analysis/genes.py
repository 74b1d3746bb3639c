"""Gene embeddings and gene programs (scGPT's ``GeneEmbedding`` workflow, without temp files).

- :func:`gene_embeddings`: the context-free gene-token embeddings (what scGPT's GRN tutorial feeds
  to ``GeneEmbedding``: the embedding table + its LayerNorm, no values, no context).
- :func:`contextual_gene_embeddings`: a gene's output state averaged over the cells that express
  it (Geneformer's ``emb_mode="gene"``), accumulated batch by batch (memory ``O(vocab × d)``).
- :func:`similar_genes`, :func:`gene_similarity`, :func:`gene_network`: cosine similarity, top-k,
  the graph of pairs above a threshold (networkx).
- :func:`gene_programs`: Leiden clusters of the genes' kNN graph (scanpy), scGPT's "metagenes";
  :func:`score_programs`: per-cell program scores (``sc.tl.score_genes``, min-max scaled) into ``obs``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .._anndata import check_adata, check_keys_free, record_written
from .._errors import ConfigError, DataError
from .._inference import run_inference
from .._utils import Progress, get_logger
from ..data.tokenize import tokenize
from ..data.vocab import unknown_gene_error
from ..model import CellModel

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx
    from anndata import AnnData

__all__ = [
    "contextual_gene_embeddings",
    "gene_embeddings",
    "gene_network",
    "gene_programs",
    "gene_similarity",
    "score_programs",
    "similar_genes",
]

log = get_logger(__name__)


def _gene_list(model: CellModel, genes: Any) -> list[str]:
    """Gene tokens of the vocabulary (specials left out), optionally restricted to ``genes``."""
    special = set(model.vocab.specials.values())
    vocab_genes = [t for t in model.vocab.tokens if t not in special]
    if genes is None:
        return vocab_genes
    if hasattr(genes, "var_names"):
        names = [str(g) for g in genes.var_names]
        kept = [g for g in names if g in model.vocab and g not in special]
        if not kept:
            raise DataError(
                "None of the AnnData's var_names is in the model's vocabulary; check gene identifiers."
            )
        return kept
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in model.vocab or g in special]
    if missing:
        raise unknown_gene_error(missing, vocab_genes, where="the model's vocabulary")
    return genes


def gene_embeddings(model: CellModel, genes: Any = None) -> pd.DataFrame:
    """Context-free gene-token embeddings.

    Parameters
    ----------
    model
        Any loaded :class:`cellkit.CellModel`.
    genes
        Gene names, an AnnData (its ``var_names`` found in the vocabulary), or ``None`` (every
        gene of the vocabulary; special tokens are left out).

    Returns
    -------
    ``DataFrame`` of shape ``(n_genes, d_model)``, indexed by gene.
    """
    names = _gene_list(model, genes)
    ids = torch.as_tensor([model.vocab[g] for g in names], dtype=torch.long)
    with torch.inference_mode():
        emb = model.token_embeddings(ids.to(next(model.parameters()).device)).float().cpu().numpy()
    return pd.DataFrame(emb, index=pd.Index(names, name="gene"))


def contextual_gene_embeddings(
    adata: AnnData,
    model: CellModel,
    *,
    cells: Any = None,
    genes: Sequence[str] | None = None,
    hidden_layer: int | None = None,
    min_cells: int = 1,
    batch_size: int = 64,
    device: str = "auto",
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    progress: bool | Progress = True,
) -> pd.DataFrame:
    """Each gene's output state averaged over the cells in which it is a token.

    Parameters
    ----------
    adata
        Cells (a selection with ``cells``).
    model
        The model.
    cells
        Which cells (mask, positions, names or a query string, see :func:`cellkit.data.select_cells`).
    genes
        Keep only these genes in the result (default every gene seen in ``min_cells`` cells).
    hidden_layer
        Layer whose states are averaged (see :func:`cellkit.analysis.resolve_hidden_layer`).
    min_cells
        Leave out genes seen in fewer cells.
    batch_size, device, tokenize_options, layer, use_raw, gene_column, progress
        As in :func:`cellkit.embed_cells` (a cancelled :class:`cellkit.Progress` raises
        :class:`cellkit.Cancelled`).

    Returns
    -------
    ``DataFrame`` ``(n_genes, d_model)`` indexed by gene, with the number of cells per gene in
    ``.attrs["n_cells"]`` (a Series).
    """
    from .embeddings import resolve_hidden_layer

    check_adata(adata, what="cellkit.analysis.contextual_gene_embeddings")
    idx = resolve_hidden_layer(model, hidden_layer)
    keep = None if genes is None else _gene_list(model, genes)
    tokens = tokenize(
        adata,
        model,
        cells=cells,
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
        progress=progress,  # the tokenizing step, then the forward passes
        **dict(tokenize_options or {}),
    )
    if len(tokens) == 0:
        raise DataError(f"The selection is empty (cells={cells!r}).")
    v, d = len(model.vocab), model.config.encoder.d_model
    sums = torch.zeros(v, d, dtype=torch.float64)
    counts = torch.zeros(v, dtype=torch.float64)

    def fn(out: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = out.last_hidden_state if idx is None else out.hidden_states[idx]
        ids = batch["gene_ids"].to(h.device)
        ok = ~out.padding_mask if out.padding_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        sums.index_add_(0, ids[ok].cpu(), h[ok].double().cpu())
        counts.index_add_(0, ids[ok].cpu(), torch.ones(int(ok.sum()), dtype=torch.float64))
        return {}

    run_inference(
        model,
        tokens,
        fn,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="gene embeddings",
        output_hidden_states=idx is not None,
    )
    special = set(model.vocab.specials.values())
    names = keep if keep is not None else [t for t in model.vocab.tokens if t not in special]
    ids = np.asarray([model.vocab[g] for g in names])
    n = counts.numpy()[ids]
    ok = n >= max(1, min_cells)
    if keep is not None and not ok.all():
        log.info(
            "%d requested genes are seen in fewer than %d cells and left out", int((~ok).sum()), min_cells
        )
    mean = (sums.numpy()[ids[ok]] / n[ok, None]).astype(np.float32)
    frame = pd.DataFrame(mean, index=pd.Index(np.asarray(names)[ok], name="gene"))
    frame.attrs["n_cells"] = pd.Series(n[ok].astype(int), index=frame.index)
    return frame


def _check_embeddings(embeddings: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(embeddings, pd.DataFrame) or embeddings.ndim != 2 or len(embeddings) < 2:
        raise DataError("Pass gene embeddings as a DataFrame (genes × dims) from gene_embeddings(...).")
    if not embeddings.index.is_unique:
        raise DataError("The gene embeddings have duplicated gene names.")
    return embeddings


def _centered(e: pd.DataFrame, center: bool) -> pd.DataFrame:
    return e - e.mean(axis=0) if center else e


def gene_similarity(
    embeddings: pd.DataFrame, genes: Sequence[str] | None = None, *, center: bool = False
) -> pd.DataFrame:
    """Cosine similarity of gene embeddings: ``(n_genes, n_genes)`` DataFrame.

    ``center=True`` subtracts the mean gene vector first: contextual embeddings share one dominant
    direction (every pair looks similar, cosine ≈ 0.9) and centring reveals their structure.
    """
    e = _centered(_check_embeddings(embeddings), center)
    if genes is not None:
        missing = [g for g in genes if g not in e.index]
        if missing:
            raise unknown_gene_error(missing, list(e.index), where="the gene embeddings")
        e = e.loc[list(genes)]
    x = e.to_numpy(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return pd.DataFrame(x @ x.T, index=e.index, columns=e.index)


def similar_genes(
    embeddings: pd.DataFrame,
    gene: str,
    *,
    k: int = 20,
    subset: Sequence[str] | None = None,
    include_self: bool = False,
    center: bool = False,
) -> pd.DataFrame:
    """The ``k`` genes most cosine-similar to ``gene`` (scGPT's ``compute_similarities``).

    Parameters
    ----------
    embeddings
        ``(n_genes, d)`` from :func:`gene_embeddings` or :func:`contextual_gene_embeddings`.
    gene
        The query gene.
    k
        How many to return.
    subset
        Compare only against these genes.
    include_self
        Keep ``gene`` itself (similarity 1) in the list, as scGPT does.
    center
        Subtract the mean gene vector first (see :func:`gene_similarity`).

    Returns
    -------
    ``DataFrame`` with columns ``gene``, ``similarity`` (descending).
    """
    e = _centered(_check_embeddings(embeddings), center)
    if gene not in e.index:
        raise unknown_gene_error(gene, list(e.index), where="the gene embeddings")
    others = e if subset is None else e.loc[[g for g in subset if g in e.index]]
    x = others.to_numpy(np.float64)
    q = e.loc[gene].to_numpy(np.float64)
    sim = x @ q / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(q), 1e-12)
    frame = pd.DataFrame({"gene": others.index.to_numpy(), "similarity": sim})
    if not include_self:
        frame = frame[frame["gene"] != gene]
    return frame.sort_values("similarity", ascending=False, kind="stable").head(k).reset_index(drop=True)


def gene_network(
    embeddings: pd.DataFrame,
    *,
    threshold: float = 0.5,
    genes: Sequence[str] | None = None,
    center: bool = False,
) -> nx.Graph:
    """Undirected networkx graph: an edge (weight = cosine) between genes with similarity ≥ ``threshold``.

    ``center=True`` centres the embeddings first (see :func:`gene_similarity`).
    """
    import networkx as nx

    if not -1 <= threshold <= 1:
        raise ConfigError(f"threshold is a cosine similarity in [-1, 1], got {threshold}.")
    sim = gene_similarity(embeddings, genes, center=center)
    names = sim.index.to_numpy()
    s = sim.to_numpy()
    iu, ju = np.triu_indices(len(names), k=1)
    sel = s[iu, ju] >= threshold
    graph = nx.Graph()
    graph.add_nodes_from(names)
    graph.add_weighted_edges_from(zip(names[iu[sel]], names[ju[sel]], s[iu[sel], ju[sel]], strict=True))
    return graph


def gene_programs(
    embeddings: pd.DataFrame,
    *,
    resolution: float = 40.0,
    n_neighbors: int = 15,
    min_size: int = 5,
    random_state: int = 0,
) -> dict[str, list[str]]:
    """Gene programs ("metagenes"): Leiden clusters of the genes' kNN graph.

    As scGPT's ``GeneEmbedding.get_adata`` + ``get_metagenes``: scanpy's neighbours (Euclidean,
    ``n_neighbors``) on the raw vectors, Leiden at ``resolution`` (the tutorial uses 40 for 1,200
    genes), programs with at least ``min_size`` genes kept. Higher resolutions give more, smaller
    clusters: with fewer genes lower it (on the 765-gene demo model, 5–10 gives programs of ≥ 5
    genes where 40 gives almost none).

    Returns
    -------
    ``{program name: [genes]}``, largest programs first (names ``"P0"``, ``"P1"``, ...).
    """
    import anndata as ad
    import scanpy as sc

    e = _check_embeddings(embeddings)
    if len(e) <= n_neighbors:
        raise DataError(f"Gene programs need more than n_neighbors={n_neighbors} genes; got {len(e)}.")
    g = ad.AnnData(np.zeros((len(e), 1), dtype=np.float32), obs=pd.DataFrame(index=e.index.astype(str)))
    g.obsm["X_gene"] = e.to_numpy(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.pp.neighbors(g, use_rep="X_gene", n_neighbors=n_neighbors, random_state=random_state)
        sc.tl.leiden(
            g,
            resolution=resolution,
            random_state=random_state,
            flavor="igraph",
            n_iterations=2,
            directed=False,
        )
    groups = g.obs.groupby("leiden", observed=True).groups
    members = sorted(
        (sorted(map(str, names)) for names in groups.values() if len(names) >= min_size),
        key=lambda m: (-len(m), m[0]),
    )
    return {f"P{i}": m for i, m in enumerate(members)}


def score_programs(
    adata: AnnData,
    programs: Mapping[str, Sequence[str]],
    *,
    key_added: str = "program",
    use_raw: bool | None = None,
    layer: str | None = None,
    random_state: int = 0,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Per-cell program scores (``sc.tl.score_genes``, min-max scaled to [0, 1]) into ``obs``.

    Writes ``obs[f"{key_added}_{name}"]`` per program and ``uns[key_added] = {name: genes used}``.
    Genes absent from ``adata`` are left out of a program; a program with none left scores 0 (with a
    warning), as scGPT's ``score_metagenes`` does on failure.

    Parameters
    ----------
    adata
        Cells with (log-)normalised expression.
    programs
        ``{name: genes}`` (e.g. from :func:`gene_programs`).
    key_added
        Prefix of the ``obs`` columns and the ``uns`` key.
    use_raw, layer
        Expression to score (scanpy's convention: ``.raw`` when present and ``use_raw`` is None).
    random_state
        Seed of scanpy's control-gene sampling.
    copy
        Return a modified copy.
    overwrite
        Replace existing ``obs`` columns / the ``uns`` entry even when cellkit did not write them.
    """
    import anndata as ad
    import scanpy as sc

    check_adata(adata, what="cellkit.analysis.score_programs")
    if not programs:
        raise DataError("No programs to score; compute them with gene_programs(...).")
    written = [("obs", f"{key_added}_{name}") for name in programs] + [("uns", key_added)]
    check_keys_free(adata, written, overwrite=overwrite, what="cellkit.analysis.score_programs")
    raw = adata.raw is not None if use_raw is None else use_raw
    if raw and adata.raw is None:
        raise DataError("use_raw=True but adata.raw is empty.")
    var_names = adata.raw.var_names if raw else adata.var_names
    x = adata.raw.X if raw else (adata.layers[layer] if layer is not None else adata.X)
    work = ad.AnnData(x, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=var_names))
    scores: dict[str, np.ndarray] = {}
    used: dict[str, list[str]] = {}
    for name, genes in programs.items():
        present = [g for g in genes if g in work.var_names]
        used[name] = present
        if not present:
            warnings.warn(
                f"Program {name!r}: none of its genes is in the data; its score is 0.",
                UserWarning,
                stacklevel=2,
            )
            scores[name] = np.zeros(adata.n_obs, dtype=np.float32)
            continue
        sc.tl.score_genes(work, present, score_name="_s", random_state=random_state, use_raw=False)
        s = work.obs["_s"].to_numpy(np.float64)
        span = s.max() - s.min()
        scores[name] = ((s - s.min()) / span if span > 0 else np.zeros_like(s)).astype(np.float32)
    target = adata.copy() if copy else adata
    for name, s in scores.items():
        target.obs[f"{key_added}_{name}"] = s
    target.uns[key_added] = {name: list(g) for name, g in used.items()}
    record_written(target, written)
    return target if copy else None
