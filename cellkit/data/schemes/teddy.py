"""TEDDY's tokenization options: rank encoding (TEDDY-G) or per-cell bins (TEDDY-X), with ``<cls>``.

TEDDY (Merck, arXiv 2503.03485) publishes its tokenizer only on Hugging Face; the option *names*
below follow its ``TokenizationArgs``, the *semantics* are cellkit's own and are stated here
exactly, so a result never depends on undocumented behaviour.

Per cell (one row of the matrix, read as a CSR block, never densified):

1. **Genes.** Columns whose identifier is in the vocabulary (``gene_id_column`` or the entry's
   ``gene_column``; Ensembl version suffixes and case are forgiven). Columns sharing a token are
   *summed* (as Geneformer collapses duplicate Ensembl ids), so every gene token occurs at most
   once. When the model has a ``gene_median`` resource, genes without a positive median are left
   out (as Geneformer/TEDDY tokenize only genes with a median); coverage counts them as unmatched.
2. **Normalisation.** ``x / total × 10,000 / median(gene)`` with the median resource, else
   ``x / total × 10,000``; ``total`` is the cell's sum over *all* columns of the matrix (counts are
   expected). Computed in float64.
3. **Ranking.** Expressed genes (stored value > 0) by normalised value, descending; ties keep
   column order (the first column of a summed gene counts), so the order is fully determined.
4. **Budget.** ``max_seq_len`` is the total length: ``<cls>`` (``add_cls``) and the annotation
   tokens (``bio_annotations``) take their places first, the rest is the gene budget ``B``.
5. **Selection.** ``random_genes=False``: the top ``B`` genes. ``random_genes=True``: when more
   than ``B`` genes are expressed, ``B`` of them chosen at random, kept in rank order. The draw
   for a gene is ``uniform_hash(gene_seed, cell_key(cell name), token id)``, so a cell gets the
   same genes alone, in any batch and in any order.
6. **Zero genes.** ``include_zero_genes=True`` and fewer than ``B`` expressed genes: the sequence
   is filled up to ``B`` with *unexpressed* genes of the matrix (step 1's genes that are zero in
   the cell), in a seeded per-cell random order (a second hash stream), after all expressed genes.
7. **Values.** ``bins=None, continuous_rank=False`` (TEDDY-G rank encoding): no values; the
   position is the rank. ``bins=n`` (TEDDY-X style): the value of an expressed gene is its per-cell
   quantile bin ``1 … n``: with ``edges = np.quantile(v, np.linspace(0, 1, n + 1)[1:-1])`` over *all* the cell's
   expressed normalised values ``v`` (before selection), ``bin = 1 + #{edges <= value}``; equal
   values share a bin, the highest value is in bin ``n``, a single gene is in bin ``n``.
   ``continuous_rank=True``: the value is the rank scaled linearly to ``[-1, 1]`` over the kept
   expressed genes (top = 1, last kept = -1, a single gene = 1). Zero-filled genes, ``<cls>`` and
   annotation tokens have value 0.
8. **Annotations.** ``bio_annotations=True`` puts one token per category right after ``<cls>``,
   in the order disease, tissue, cell type, sex, taken from the mapping JSON files
   ``{category value → token id}`` (``add_disease_annotation=False`` leaves disease out, e.g. to
   predict it). A category is included when its mapping is given (an option, or a
   ``<category>_mapping`` resource of the model). Values are looked up as text (``str(value)``);
   a value missing from the mapping, or a missing value, is an error. The raw labels are carried
   in ``obs``.

``max_shard_samples`` is accepted for parity with TEDDY's arguments; shard size is set by
``tokenize(..., output=dir, max_shard_samples=n)`` (the entry's own parameter).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellkit._errors import DataError
from cellkit._utils import read_json
from cellkit.data._hashing import cell_key, uniform_hash
from cellkit.data.genes import GeneMatch, matching_options, resolve_genes
from cellkit.data.input_spec import InputSpec
from cellkit.data.tokenized import TokenizedCells
from cellkit.data.vocab import Coverage, GeneVocab

__all__ = ["ANNOTATIONS", "GENE_COLUMN_OPTION", "OPTIONS", "match_genes", "quantile_bins", "run"]

#: options of the ``teddy`` scheme (defaults)
OPTIONS: dict[str, Any] = {
    "max_seq_len": None,  # total length incl. <cls>/annotations; None = the model's, else 2048
    "max_length": None,  # the same as max_seq_len (every scheme takes max_length)
    "add_cls": True,
    "cls_token_id": None,  # None = the vocabulary's <cls>
    "random_genes": False,  # True: seeded random subset of the expressed genes, in rank order
    "include_zero_genes": False,  # True: fill short cells with unexpressed genes (value 0)
    "bins": None,  # None = rank encoding (TEDDY-G); int n = per-cell quantile bins 1..n (TEDDY-X)
    "continuous_rank": False,  # True: value = rank scaled to [-1, 1]
    "gene_seed": 0,
    "gene_id_column": None,  # var column with gene ids (None = the entry's gene_column / var_names)
    "label_column": None,  # obs column carried into obs as the label
    "bio_annotations": False,
    "disease_mapping": None,  # JSON {value: token id} (path or dict)
    "tissue_mapping": None,
    "cell_mapping": None,
    "sex_mapping": None,
    "disease_column": "disease",
    "tissue_column": "tissue",
    "cell_column": "cell_type",
    "sex_column": "sex",
    "add_disease_annotation": True,
    "max_shard_samples": None,  # documentation only: tokenize(..., output=, max_shard_samples=)
    "case_fold": True,  # gene matching: retry upper-cased names when a name is not exactly a token
    "strip_versions": True,  # gene matching: retry ENSG….7 as ENSG…
}

#: the scheme option naming the ``var`` column of gene identifiers (read by the entry when it
#: resolves genes, so coverage is counted on that column)
GENE_COLUMN_OPTION = "gene_id_column"

#: annotation categories, in token order after ``<cls>``
ANNOTATIONS = ("disease", "tissue", "cell", "sex")

TARGET_SUM = 10_000.0
DEFAULT_MAX_SEQ_LEN = 2048
_SELECT, _FILL = 0, 1  # hash streams: random gene selection, zero-gene order


# ================================================================================ genes
def match_genes(
    names: pd.Index | Sequence[str],
    vocab: GeneVocab,
    resources: Mapping[str, Any],
    options: Mapping[str, Any],
) -> GeneMatch:
    """Resolve gene identifiers for TEDDY: duplicates summed, genes without a median left out.

    Parameters
    ----------
    names
        ``(n_vars,)`` gene identifiers of the matrix's columns.
    vocab
        The model's vocabulary.
    resources
        The model's resources; ``gene_median`` (``{token: median}``) restricts the genes.
    options
        The scheme options given by the caller (``case_fold``, ``strip_versions``: the retries of
        :func:`~cellkit.data.genes.resolve_genes`, both on by default).

    Returns
    -------
    :class:`~cellkit.data.genes.GeneMatch` with ``duplicates="sum"``.

    Raises
    ------
    DataError
        When genes are in the vocabulary but none has a gene median.
    """
    retries = matching_options(
        {k: options.get(k, OPTIONS[k]) for k in ("case_fold", "strip_versions")}, compat=False
    )
    match = resolve_genes(names, vocab, duplicates="sum", **retries)
    medians = resources.get("gene_median")
    if not medians:
        return match
    ids = match.token_ids.copy()
    has_median = _slot_medians(ids, vocab, medians) > 0
    n_vocab = int((ids >= 0).sum())
    ids[~has_median] = -1
    if n_vocab and not (ids >= 0).any():
        raise DataError(
            f"{n_vocab:,} genes are in the vocabulary but none has an entry in the model's gene_median "
            "resource, so none can be median-normalised. The medians must be keyed by the vocabulary's "
            "gene tokens; reload the model with its matching gene median dictionary."
        )
    hit = ids >= 0
    names_arr = match.names
    coverage = Coverage(
        len(names_arr),
        int(hit.sum()),
        tuple(str(g) for g in names_arr[hit][:10]),
        tuple(str(g) for g in names_arr[~hit][:10]),
    )
    notes = list(match.notes)
    if n_vocab > hit.sum():
        notes.append(
            f"{n_vocab - int(hit.sum()):,} vocabulary genes have no gene median and are not tokenized"
        )
    return GeneMatch(
        names_arr,
        ids,
        coverage,
        "sum",
        match.n_version_stripped,
        match.n_case_folded,
        notes,
        n_mapped=match.n_mapped,
        missed=match.missed,
        rules=match.rules,
        species=match.species,
    )


def _slot_medians(token_ids: np.ndarray, vocab: GeneVocab, medians: Mapping[str, Any]) -> np.ndarray:
    """Median per entry of ``token_ids`` (0 where unknown, non-finite or not positive)."""
    out = np.zeros(len(token_ids), dtype=np.float64)
    for j, t in enumerate(token_ids):
        if t < 0:
            continue
        value = medians.get(vocab.token(int(t)))
        try:
            value = float(value) if value is not None else 0.0
        except (TypeError, ValueError):
            value = 0.0
        out[j] = value if np.isfinite(value) and value > 0 else 0.0
    return out


# ================================================================================ binning
def quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-cell quantile bins ``1 … n_bins`` of one cell's expressed values (the definition).

    Parameters
    ----------
    values
        ``(m,)`` positive normalised values of the cell's expressed genes (any order).
    n_bins
        Number of bins.

    Returns
    -------
    ``(m,)`` int64 bins: ``1 + #{edges <= value}`` with the inner quantiles
    ``edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])``. Equal values share a
    bin and the largest value is always in bin ``n_bins``.
    """
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return (1 + np.searchsorted(edges, values, side="right")).astype(np.int64)


def _block_bins(data: np.ndarray, indptr: np.ndarray, n_bins: int) -> np.ndarray:
    """:func:`quantile_bins` of every CSR row at once (bit-identical edges, one sort)."""
    from cellkit.data.schemes.scgpt import quantile_edges

    counts = np.diff(indptr).astype(np.int64)
    n_edges = n_bins - 1
    if n_edges == 0 or not len(data):
        return np.ones(len(data), dtype=np.int64)
    nonempty = np.flatnonzero(counts)
    sub_indptr = np.concatenate([[0], np.cumsum(counts[nonempty])])
    from ._kernels import KERNEL_LOCK, count_edges_le

    ascending = data[_row_order(data, indptr, descending=False)]
    edges = np.zeros((len(counts), n_edges))
    edges[nonempty] = quantile_edges(ascending, sub_indptr, n_bins + 1)[:, 1:-1]  # (R, n_bins - 1)
    le = np.empty(len(data), dtype=np.int64)
    with KERNEL_LOCK:
        count_edges_le(np.ascontiguousarray(data), np.ascontiguousarray(indptr, dtype=np.int64), edges, le)
    return 1 + le


def _row_order(values: np.ndarray, indptr: np.ndarray, *, descending: bool) -> np.ndarray:
    """``np.lexsort((±values, rows))`` of CSR rows (stable: equal values keep their order)."""
    from ._kernels import KERNEL_LOCK, row_argsort

    out = np.empty(len(values), dtype=np.int64)
    with KERNEL_LOCK:
        row_argsort(
            np.ascontiguousarray(values), np.ascontiguousarray(indptr, dtype=np.int64), descending, out
        )
    return out


# ================================================================================ options
def _flag(o: Mapping[str, Any], name: str) -> bool:
    value = o[name]
    if not isinstance(value, (bool, np.bool_)):
        raise DataError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _int_option(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _load_mapping(spec: Any, category: str, n_vocab: int) -> tuple[dict[str, int], str]:
    """A category mapping ``{value: token id}`` from a JSON path or a dict, and its description."""
    if isinstance(spec, Mapping):
        data, where = dict(spec), f"the {category}_mapping dict"
    else:
        path = Path(spec)
        where = str(path)
        if not path.exists():
            raise DataError(
                f"{category}_mapping file {path} does not exist; pass the JSON {{value: token id}}."
            )
        data = read_json(path, what=f"{category}_mapping file", expect=dict, error=DataError)
    bad = [
        k
        for k, v in data.items()
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= v < n_vocab
    ]
    if bad:
        raise DataError(
            f"{where}: the token ids of {bad[:5]} are not integers in 0 … {n_vocab - 1} (the vocabulary's ids); "
            "every category value must map to a token id of the model."
        )
    return {str(k): int(v) for k, v in data.items()}, where


def _annotation_specs(
    o: Mapping[str, Any], resources: Mapping[str, Any], n_vocab: int
) -> list[tuple[str, str, dict[str, int], str]]:
    """``(category, obs column, mapping, where)`` of the annotation tokens, in token order."""
    if not _flag(o, "bio_annotations"):
        return []
    add_disease = _flag(o, "add_disease_annotation")
    specs = []
    for cat in ANNOTATIONS:
        if cat == "disease" and not add_disease:
            continue
        spec = o[f"{cat}_mapping"]
        if spec is None:
            spec = resources.get(f"{cat}_mapping")
        if spec is None:
            continue
        mapping, where = _load_mapping(spec, cat, n_vocab)
        specs.append((cat, str(o[f"{cat}_column"]), mapping, where))
    if not specs:
        raise DataError(
            "bio_annotations=True but no annotation mapping is given; pass disease_mapping=, tissue_mapping=, "
            "cell_mapping= and/or sex_mapping= (JSON files {category value: token id}), or bio_annotations=False."
        )
    return specs


def _annotation_tokens(
    obs: pd.DataFrame, specs: list[tuple[str, str, dict[str, int], str]], where: str
) -> np.ndarray:
    """``(n_cells, n_annotations)`` token ids; clear errors for missing columns and categories."""
    out = np.zeros((len(obs), len(specs)), dtype=np.int64)
    for j, (cat, column, mapping, file) in enumerate(specs):
        if column not in obs.columns:
            raise DataError(
                f"The {cat} annotation reads obs column {column!r}, which {where} does not have; available: "
                f"{list(obs.columns)}. Pass {cat}_column=... ."
            )
        values = obs[column]
        missing_value = values.isna().to_numpy()
        text = values.astype(object).map(str).to_numpy()
        known = np.array([t in mapping for t in text], dtype=bool) & ~missing_value
        if not known.all():
            missing = sorted(set(text[~known & ~missing_value]))
            if missing_value.any():
                missing.append("<missing value (NaN)>")
            raise DataError(
                f"{file} has no token for {len(missing)} {cat} categor{'y' if len(missing) == 1 else 'ies'} of "
                f"obs[{column!r}] in the selected cells: {missing[:20]}. Add them to the mapping "
                "(value → token id), fill missing values, or select other cells."
            )
        out[:, j] = [mapping[t] for t in text]
    return out


# ================================================================================ the scheme
def run(ctx: Any) -> Iterator[TokenizedCells]:
    """Tokenize every source of ``ctx`` (see :func:`cellkit.tokenize` and the module docstring)."""
    from cellkit.data.tokenize import check_values, max_length_option

    o = ctx.options
    vocab: GeneVocab = ctx.vocab
    max_seq_len = _max_seq_len(max_length_option(o, "max_seq_len"), ctx.input_spec)
    add_cls = _flag(o, "add_cls")
    random_genes = _flag(o, "random_genes")
    include_zero = _flag(o, "include_zero_genes")
    continuous = _flag(o, "continuous_rank")
    n_bins = None if o["bins"] is None else _int_option(o["bins"], "bins", 1)
    if n_bins is not None and continuous:
        raise DataError("bins= and continuous_rank=True are two value encodings; choose one.")
    seed = _int_option(o["gene_seed"], "gene_seed", -(2**63))
    cls_id = _cls_token_id(o["cls_token_id"], vocab) if add_cls else o["cls_token_id"]
    specs = _annotation_specs(o, ctx.resources, len(vocab))
    n_prefix = int(add_cls) + len(specs)
    budget = max_seq_len - n_prefix
    if budget < 1:
        raise DataError(
            f"max_seq_len={max_seq_len} leaves no room for genes after {n_prefix} leading token(s) "
            "(<cls> and annotations); raise max_seq_len."
        )
    label_column = o["label_column"]
    gene_column = o["gene_id_column"]
    medians_table = ctx.resources.get("gene_median") or None
    values_wanted = n_bins is not None or continuous
    pad_value = 0.0 if ctx.input_spec.pad_value is None else float(ctx.input_spec.pad_value)
    specials = ctx.specials()
    if add_cls:
        specials["cls"] = cls_id
    ctx.options.update(
        {
            "max_seq_len": max_seq_len,
            "max_length": max_seq_len,
            "cls_token_id": cls_id if add_cls else None,
            "normalization": "total+median" if medians_table else "total",
            "n_annotation_tokens": len(specs),
            "annotations": [cat for cat, *_ in specs],
        }
    )
    for cat in ANNOTATIONS:  # keep options JSON-able for shard manifests
        if isinstance(o[f"{cat}_mapping"], os.PathLike):
            ctx.options[f"{cat}_mapping"] = os.fspath(o[f"{cat}_mapping"])

    for src, match in ctx.sources:
        selected = src.obs.iloc[src.rows]
        if label_column is not None and label_column not in selected.columns:
            raise DataError(
                f"label_column {label_column!r} is not an obs column of {src.name}; available: "
                f"{list(selected.columns)}."
            )
        prefix = _annotation_tokens(selected, specs, src.name)
        carried = [*ctx.obs_columns, *([label_column] if label_column else []), *(c for _, c, _, _ in specs)]
        carried = list(dict.fromkeys(carried))
        if add_cls:
            prefix = np.concatenate([np.full((len(selected), 1), cls_id, dtype=np.int64), prefix], axis=1)
        if gene_column is not None:
            match = _match_gene_column(src, gene_column, ctx)
        slot_tokens, select = _gene_slots(match, src.var.shape[0])
        medians = _slot_medians(slot_tokens, vocab, medians_table) if medians_table else None
        keys = cell_key(np.asarray(src.obs.index[src.rows]).astype(str))
        done = 0
        with ctx.pbar(len(src.rows), f"tokenizing ({src.name})") as bar:
            for idx, block in src.chunks(ctx.chunk_size):
                check_values(block.data, where=src.name)
                local = np.arange(done, done + len(idx))
                y = _normalise(block, select, medians, src.name)
                part = _tokens_for_block(
                    y,
                    slot_tokens,
                    keys[local],
                    prefix[local],
                    budget=budget,
                    n_bins=n_bins,
                    continuous=continuous,
                    values_wanted=values_wanted,
                    random_genes=random_genes,
                    include_zero=include_zero,
                    seed=seed,
                )
                ctx.stamp(
                    part,
                    src,
                    idx,
                    scheme="teddy",
                    pad_value=pad_value,
                    columns=list(carried),
                    specials=specials,
                )
                done += len(idx)
                bar.update(len(idx))
                yield part


def _max_seq_len(value: Any, spec: InputSpec) -> int:
    """The ``max_seq_len`` option, else the model's own maximum length (``max_length``), else the default."""
    if value is None:
        value = spec.max_length or DEFAULT_MAX_SEQ_LEN
    return _int_option(value, "max_seq_len", 1)


def _cls_token_id(value: Any, vocab: GeneVocab) -> int:
    """The ``<cls>`` token id for ``add_cls=True``: ``cls_token_id``, else the vocabulary's ``<cls>``."""
    if value is None:
        if "cls" not in vocab.specials:
            raise DataError(
                f"add_cls=True but the vocabulary has no <cls> token (specials: {vocab.specials or 'none'}); "
                "pass cls_token_id=... or add_cls=False."
            )
        value = vocab.cls_id
    cls_id = _int_option(value, "cls_token_id", 0)
    if cls_id >= len(vocab):
        raise DataError(f"cls_token_id={cls_id} is outside the vocabulary (0 … {len(vocab) - 1}).")
    return cls_id


def _match_gene_column(src: Any, gene_column: str, ctx: Any) -> GeneMatch:
    """Match the genes of ``src`` named in ``var[gene_id_column]`` (instead of the var index)."""
    if gene_column not in src.var.columns:
        raise DataError(
            f"gene_id_column {gene_column!r} is not a var column of {src.name}; available: "
            f"{list(src.var.columns)}."
        )
    match = match_genes(pd.Index(src.var[gene_column].astype(str)), ctx.vocab, ctx.resources, ctx.options)
    if not match.coverage.n_matched:
        raise DataError(
            f"None of the genes in var[{gene_column!r}] of {src.name} is in the vocabulary "
            f"(e.g. {list(match.coverage.unmatched_examples[:5])}); choose the column with the model's "
            "gene identifiers."
        )
    ctx.notes.append(f"genes from var[{gene_column!r}]: {match.coverage}")
    return match


def _gene_slots(match: GeneMatch, n_vars: int) -> tuple[np.ndarray, sp.csr_matrix]:
    """One slot per distinct matched token, in first-column order (so ties keep column order).

    Returns the slots' token ids and the ``(n_vars, n_slots)`` 0/1 matrix that sums columns into slots.
    """
    cols = match.columns
    slot_tokens, slot_of_col = np.unique(match.token_ids[cols], return_inverse=True)
    first_col = np.full(len(slot_tokens), np.iinfo(np.int64).max)
    np.minimum.at(first_col, slot_of_col, cols)
    slot_order = np.argsort(first_col, kind="stable")
    rank_of_slot = np.empty_like(slot_order)
    rank_of_slot[slot_order] = np.arange(len(slot_order))
    select = sp.csr_matrix(
        (np.ones(len(cols)), (cols, rank_of_slot[slot_of_col])), shape=(n_vars, len(slot_tokens))
    )
    return slot_tokens[slot_order], select


def _normalise(
    block: sp.csr_matrix, select: sp.csr_matrix, medians: np.ndarray | None, name: str
) -> sp.csr_matrix:
    """``(n, n_genes)`` float64 CSR of normalised expression (duplicates summed, sorted, no zeros)."""
    x = sp.csr_matrix(block, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    if not np.isfinite(totals).all():
        raise DataError(
            f"{name} has cells whose total expression overflows float64; the values cannot be normalised. "
            "Pass raw counts."
        )
    y = sp.csr_matrix(x @ select)
    y.sum_duplicates()
    y.eliminate_zeros()
    y.sort_indices()
    rows = np.repeat(np.arange(y.shape[0]), np.diff(y.indptr))
    y.data = y.data / totals[rows] * TARGET_SUM
    if medians is not None:
        y.data = y.data / medians[y.indices]
    return y


def _cumcount(groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Position of each element within its group (``groups`` sorted, ``counts`` per group)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return np.arange(len(groups), dtype=np.int64) - starts[groups]


def _zero_fill(
    y: sp.csr_matrix,
    slot_tokens: np.ndarray,
    keys: np.ndarray,
    kept: np.ndarray,
    expressed: np.ndarray,
    *,
    budget: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(row, token) of the unexpressed genes that fill short cells, in each cell's hash order."""
    n_slots = len(slot_tokens)
    rows = np.flatnonzero((kept < budget) & (expressed < n_slots))
    out_rows, out_ids = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    tokens = slot_tokens.astype(np.uint64)
    group = max(1, (1 << 22) // max(n_slots, 1))  # bounded (rows × genes) hash tables
    for start in range(0, len(rows), group):
        rs = rows[start : start + group]
        need = np.minimum(budget - kept[rs], n_slots - expressed[rs])
        h = uniform_hash(seed, keys[rs].astype(np.uint64)[:, None], tokens[None, :], _FILL)  # (G, S)
        sub = y[rs]
        h[np.repeat(np.arange(len(rs)), np.diff(sub.indptr)), sub.indices] = np.inf  # expressed: no fill
        k = int(need.max())
        cand = (
            np.argpartition(h, k - 1, axis=1)[:, :k]
            if k < n_slots
            else np.tile(np.arange(n_slots), (len(rs), 1))
        )
        cand = np.take_along_axis(cand, np.lexsort((cand, np.take_along_axis(h, cand, axis=1))), axis=1)
        take = np.arange(k)[None, :] < need[:, None]
        out_rows.append(np.repeat(rs, need).astype(np.int64))
        out_ids.append(slot_tokens[cand[take]].astype(np.int64))
    return np.concatenate(out_rows), np.concatenate(out_ids)


def _tokens_for_block(
    y: sp.csr_matrix,
    slot_tokens: np.ndarray,
    keys: np.ndarray,
    prefix: np.ndarray,
    *,
    budget: int,
    n_bins: int | None,
    continuous: bool,
    values_wanted: bool,
    random_genes: bool,
    include_zero: bool,
    seed: int,
) -> TokenizedCells:
    n_rows = y.shape[0]
    counts = np.diff(y.indptr).astype(np.int64)
    rows = np.repeat(np.arange(n_rows), counts)
    # rank: row, value descending; lexsort is stable and each row is in slot (= column) order, so
    # ties keep column order
    order = _row_order(y.data, y.indptr, descending=True)
    r_slot = y.indices[order].astype(np.int64)
    r_val = np.zeros(len(order), dtype=np.float64)
    if n_bins is not None:
        r_val = _block_bins(y.data, y.indptr, n_bins)[order].astype(np.float64)
    pos = _cumcount(rows, counts)  # rows are sorted, and lexsort keeps them grouped
    if random_genes:
        h = uniform_hash(seed, keys[rows].astype(np.uint64), slot_tokens[r_slot].astype(np.uint64), _SELECT)
        by_hash = _row_order(h, y.indptr, descending=False)  # rows keep their counts
        hash_rank = np.empty(len(h), dtype=np.int64)
        hash_rank[by_hash] = _cumcount(rows, counts)
        keep = hash_rank < budget
    else:
        keep = pos < budget
    k_rows, k_slot, k_val = rows[keep], r_slot[keep], r_val[keep]
    k_counts = np.bincount(k_rows, minlength=n_rows).astype(np.int64)
    if continuous:
        j = _cumcount(k_rows, k_counts).astype(np.float64)
        n = k_counts[k_rows].astype(np.float64)
        k_val = np.where(n > 1, 1.0 - 2.0 * j / np.maximum(n - 1, 1), 1.0)
    g_rows, g_ids, g_vals = [k_rows], [slot_tokens[k_slot].astype(np.int64)], [k_val]
    if include_zero:
        fill = _zero_fill(y, slot_tokens, keys, k_counts, counts, budget=budget, seed=seed)
        g_rows.append(fill[0])
        g_ids.append(fill[1])
        g_vals.append(np.zeros(len(fill[0]), dtype=np.float64))
    gr = np.concatenate(g_rows)
    by_row = np.argsort(gr, kind="stable")  # expressed genes stay before fill genes
    gr, gi, gv = gr[by_row], np.concatenate(g_ids)[by_row], np.concatenate(g_vals)[by_row]
    g_counts = np.bincount(gr, minlength=n_rows).astype(np.int64)
    n_prefix = prefix.shape[1]
    lengths = n_prefix + g_counts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    values = np.zeros(int(offsets[-1]), dtype=np.float32)
    if n_prefix:
        ids[(offsets[:-1, None] + np.arange(n_prefix)[None, :]).ravel()] = prefix.ravel()
    at = offsets[gr] + n_prefix + _cumcount(gr, g_counts)
    ids[at] = gi
    values[at] = gv
    return TokenizedCells(ids, offsets, values=values if values_wanted else None)
