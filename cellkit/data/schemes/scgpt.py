"""scGPT value binning, vectorised over CSR row blocks.

scGPT bins each cell separately: the nonzero values ``x`` (in column order) get
``edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))`` (numpy's default linear method),
``left = digitize(x, edges)``, ``right = digitize(x, edges, right=True)`` and
``bin = ceil(u * (right - left) + left)`` with ``u ~ U[0, 1)`` — values equal to one or more
edges (ties) are spread at random over the bins they touch. Zeros stay 0; nonzero values get
``1 … n_bins - 1``.

:func:`bin_csr` computes exactly that for a whole block of rows at once (edges with numpy's own
interpolation arithmetic, so they are bit-identical to ``np.quantile``) and takes ``u`` from the
caller: in ``compat`` mode one numpy ``RandomState`` stream in row order (scGPT 0.2.4's
``np.random.rand`` per nonzero row), in ``deterministic`` mode a hash of (seed, cell, gene) so a
cell's bins do not depend on which other cells are tokenized with it.

Genes (:func:`match_genes`): in ``compat`` mode a gene is kept only when its name is exactly a
vocabulary token, as scGPT's ``gene in vocab``; ``case_fold=True`` / ``strip_versions=True`` /
``gene_tables=True`` / ``orthologs=True`` turn cellkit's retries (upper-cased names, Ensembl ids
without a version, the shipped symbol <-> Ensembl id tables, mouse -> human orthologs) back on, and
are the default in ``deterministic`` mode. Columns sharing a token: ``duplicates`` (``"keep"`` as
scGPT by default; ``"sum"``, ``"first"``, ``"refuse"``). One extra matched gene changes scGPT's random stream for every later cell.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..._errors import DataError
from ..genes import GeneMatch, matching_options, resolve_genes
from ..input_spec import InputSpec
from ..tokenized import TokenizedCells
from ..vocab import GeneVocab

__all__ = ["OPTIONS", "bin_csr", "match_genes", "quantile_edges", "run", "sample_positions_compat"]


def quantile_edges(sorted_values: np.ndarray, indptr: np.ndarray, n_edges: int) -> np.ndarray:
    """Per-row ``np.quantile(row, np.linspace(0, 1, n_edges))`` for rows stored back to back.

    Parameters
    ----------
    sorted_values
        ``(T,)`` values, ascending within each row.
    indptr
        ``(n_rows + 1,)`` row boundaries; every row must be non-empty.
    n_edges
        Number of quantiles.

    Returns
    -------
    ``(n_rows, n_edges)`` float64 edges, bit-identical to ``np.quantile`` (linear method) on
    each row.
    """
    n = np.diff(indptr).astype(np.int64)  # (R,)
    q = np.linspace(0, 1, n_edges)  # (Q,)
    virtual = (n - 1)[:, None] * q[None, :]  # (R, Q) float64, as numpy's (n - 1) * quantiles
    prev = np.floor(virtual)
    above = virtual >= (n - 1)[:, None]
    prev_i = np.where(above, (n - 1)[:, None], prev).astype(np.int64)
    next_i = np.where(above, (n - 1)[:, None], prev + 1).astype(np.int64)
    # numpy sets both neighbours to -1 (the maximum) above the bound, so gamma = virtual + 1 there
    gamma = np.where(above, virtual + 1.0, virtual - prev)
    base = indptr[:-1, None]
    a = sorted_values[base + prev_i]
    b = sorted_values[base + next_i]
    diff = b - a  # in the values' dtype, as numpy's _lerp
    out = np.add(a, diff * gamma)
    hi = gamma >= 0.5
    out[hi] = (b - diff * (1 - gamma))[hi]
    return out


def bin_csr(
    data: np.ndarray, indptr: np.ndarray, n_bins: int, u: np.ndarray, *, return_edges: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Bin the stored (nonzero) values of CSR rows as scGPT does.

    Parameters
    ----------
    data
        ``(T,)`` nonzero values of the rows, back to back, each row in column order.
    indptr
        ``(n_rows + 1,)`` row boundaries (empty rows allowed: they produce nothing).
    n_bins
        scGPT's ``n_bins`` (bins ``1 … n_bins - 1`` for nonzero values; ``n_bins - 1`` edges).
    u
        ``(T,)`` uniforms in ``[0, 1)`` for tie spreading, aligned with ``data``.

    Returns
    -------
    ``(T,)`` int64 bins, and with ``return_edges`` the ``(n_rows, n_bins)`` edges ``[0, edges…]``
    (scGPT's ``obsm["bin_edges"]``; zeros for empty rows).
    """
    data = np.asarray(data)
    lengths = np.diff(indptr)
    rows_nz = np.flatnonzero(lengths > 0)
    bins = np.zeros(len(data), dtype=np.int64)
    edges_out = np.zeros((len(lengths), n_bins)) if return_edges else None
    if len(rows_nz):
        sub_indptr = np.concatenate([[0], np.cumsum(lengths[rows_nz])])
        row_label = np.repeat(np.arange(len(lengths), dtype=np.uint64), lengths)
        if data.dtype == np.float32 and (data >= 0).all():
            # non-negative float32 bit patterns sort like the values: one uint64 key sort
            keys = np.sort((row_label << np.uint64(32)) | data.view(np.uint32).astype(np.uint64))
            sorted_values = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
        else:
            sorted_values = data[np.lexsort((data, row_label))]
        edges = quantile_edges(sorted_values, sub_indptr, n_bins - 1)  # (R, Q)
        if edges_out is not None:
            edges_out[rows_nz, 1:] = edges
        x = data.astype(np.float64)
        left = np.empty(len(data), dtype=np.int64)
        right = np.empty(len(data), dtype=np.int64)
        for r, (a, b) in enumerate(itertools.pairwise(sub_indptr)):
            left[a:b] = np.searchsorted(edges[r], x[a:b], side="right")  # np.digitize(x, edges)
            right[a:b] = np.searchsorted(edges[r], x[a:b], side="left")  # np.digitize(x, edges, right=True)
        bins = np.ceil(u * (right - left) + left).astype(np.int64)
    return (bins, edges_out) if return_edges else bins


def bin_block(
    x: sp.csr_matrix,
    gene_tokens: np.ndarray,
    n_bins: int,
    *,
    rng: np.random.RandomState | None,
    keys: np.ndarray | None,
    seed: int,
    raw: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`bin_csr` for a CSR block with the compiled kernel (row-parallel).

    Tie-spreading uniforms come from ``rng.rand`` in row order (``compat``) or from
    ``uniform_hash(seed, cell key, gene token)`` (``deterministic``). ``raw``: the raw counts the
    (normalised) values of ``x`` were computed from, entry for entry (``compat``: sorts each cell by
    counting its counts; the bins are the same).
    """
    from .._hashing import hash64
    from ._kernels import KERNEL_LOCK, bin_rows, bin_rows_raw

    data = np.ascontiguousarray(x.data)
    indptr = np.ascontiguousarray(x.indptr, dtype=np.int64)
    q = np.linspace(0, 1, n_bins - 1)
    out = np.empty(len(data), dtype=np.int64)
    token_keys = np.ascontiguousarray(gene_tokens[x.indices], dtype=np.uint64)
    if rng is not None:
        u = rng.rand(x.nnz)  # one draw per nonzero value, rows in order: scGPT's np.random.rand per row
        if raw is not None:
            with KERNEL_LOCK:
                bin_rows_raw(data, np.ascontiguousarray(raw), indptr, q, u, out)
            return out
        with KERNEL_LOCK:
            bin_rows(
                data,
                indptr,
                q,
                u,
                use_hash=False,
                seed_mixed=np.uint64(0),
                row_keys=np.zeros(len(indptr) - 1, np.uint64),
                token_keys=token_keys,
                out=out,
            )
    else:
        row_keys = np.ascontiguousarray(keys, dtype=np.uint64)
        with KERNEL_LOCK:
            bin_rows(
                data,
                indptr,
                q,
                np.zeros(0),
                use_hash=True,
                seed_mixed=np.uint64(hash64(seed)),
                row_keys=row_keys,
                token_keys=token_keys,
                out=out,
            )
    return out


def sample_positions_compat(
    rng: np.random.RandomState, length: int, max_len: int, *, cls_appended: bool
) -> np.ndarray:
    """scGPT 0.2.4 ``pad_batch`` sampling of a too-long row (same RNG calls, same output order).

    scGPT calls ``rng.choice(n, k, replace=False)``, which is ``rng.permutation(n)[:k]`` (the
    same draws, the same result); the permutation is called directly.
    """
    if cls_appended:
        idx = rng.permutation(length - 1)[: max_len - 1] + 1
        return np.concatenate([np.zeros(1, dtype=idx.dtype), idx])  # np.insert(idx, 0, 0)
    return rng.permutation(length)[:max_len]


# ================================================================================== the scheme
#: options of the ``scgpt`` scheme (defaults; ``None`` = take the model's convention)
OPTIONS: dict[str, Any] = {
    "mode": "deterministic",  # or "compat": scGPT 0.2.4's RNG stream, bit for bit
    "seed": 0,
    "n_bins": None,  # model's n_bins, else 51; 0/False = continuous values, no binning
    "include_zero": False,  # also emit zero-expression genes (value 0)
    "append_cls": True,
    "cls_value": None,  # compat: 0 (tokenize_and_pad_batch); else the model's convention (-2)
    "pad_value": None,  # model's pad_value, else -2
    "max_len": None,  # longer cells are sampled (CLS kept); None = no limit (not the model's max_length:
    # scGPT's tokenizer keeps every gene, its training samples max_seq_len per batch)
    "max_length": None,  # the same as max_len (every scheme takes max_length)
    "normalize_total": 1e4,  # scGPT Preprocessor: float target sum; int = median (scGPT quirk, compat)
    "log1p": False,
    "n_hvg": None,  # highly variable genes via scanpy (in-memory data)
    "hvg_flavor": "seurat_v3",
    "genes": None,  # restrict to a boolean var column / mask (e.g. "highly_variable")
    "filter_gene_by_counts": False,  # int min counts (True = 1), sc.pp.filter_genes
    "filter_cell_by_counts": False,  # int min counts, sc.pp.filter_cells
    # gene matching: scGPT keeps a gene only when its name is exactly a vocabulary token (`gene in vocab`)
    "case_fold": None,  # retry upper-cased names (ZHX1-C8ORF76 -> ZHX1-C8orf76); None = off in compat, else on
    "strip_versions": None,  # retry ENSG….7 as ENSG…; None = off in compat, else on
    "gene_tables": None,  # retry through the shipped GENCODE symbol <-> Ensembl id tables; None = off in compat
    "orthologs": None,  # mouse data: retry one-to-one human orthologs; None = off in compat, else on
    "species": "auto",  # of the data's genes: "auto" (ENSMUSG ids / mouse symbols), "human" or "mouse"
    "duplicates": None,  # columns sharing a token: None = "keep" (scGPT), or "sum", "first", "refuse"
}


def match_genes(
    names: pd.Index | Sequence[str],
    vocab: GeneVocab,
    resources: Mapping[str, Any],
    options: Mapping[str, Any],
) -> GeneMatch:
    """Map the data's genes to tokens as scGPT does, with cellkit's retries where asked.

    In ``mode="compat"`` (and with ``case_fold``, ``strip_versions``, ``gene_tables`` and
    ``orthologs`` all ``False``) a column is kept only when its name is exactly a vocabulary token,
    scGPT's ``gene in vocab``; each column is its own token occurrence, so a var name that appears
    twice gives two columns with one token, as in scGPT (``duplicates="keep"``; ``"sum"`` adds
    their values into one token, ``"first"`` keeps the first, ``"refuse"`` raises). Otherwise
    upper-cased names, Ensembl ids without a version suffix, the shipped symbol <-> Ensembl id
    tables and (mouse data) one-to-one human orthologs are retried.

    Parameters
    ----------
    names
        ``(n_vars,)`` gene identifiers of the matrix's columns.
    vocab
        The model's vocabulary.
    resources
        The model's resources (unused; part of the hook's signature).
    options
        The caller's scheme options (``mode``, ``case_fold``, ``strip_versions``, ``gene_tables``,
        ``orthologs``, ``species``, ``duplicates``).

    Returns
    -------
    :class:`~cellkit.data.genes.GeneMatch` (duplicates kept).
    """
    compat = options.get("mode", OPTIONS["mode"]) == "compat"
    return resolve_genes(
        names,
        vocab,
        duplicates=options.get("duplicates") or "keep",
        species=options.get("species") or "auto",
        **matching_options(options, compat=compat),
    )


def _normalize(block: sp.csr_matrix, target_sum: float | None, log1p: bool) -> sp.csr_matrix:
    """scanpy's ``normalize_total`` / ``log1p`` on a block of cells, as scGPT's Preprocessor calls them."""
    import anndata as ad
    import scanpy as sc

    x = block
    with warnings.catch_warnings():  # "Some cells have zero counts": all-zero cells are handled below
        warnings.simplefilter("ignore", UserWarning)
        if target_sum is not None:
            x = sc.pp.normalize_total(ad.AnnData(x), target_sum=target_sum, inplace=False)["X"]
        if log1p:
            a = ad.AnnData(x)
            sc.pp.log1p(a)
            x = a.X
    return sp.csr_matrix(x)


def _gene_mask(src: Any, genes: Any) -> np.ndarray:
    var = src.var
    if isinstance(genes, str):
        if genes not in var.columns:
            raise DataError(
                f"genes={genes!r} is not a var column of {src.name}; available: {list(var.columns)}."
            )
        mask = var[genes].to_numpy()
    else:
        mask = np.asarray(genes)
    if mask.dtype != bool or mask.shape != (len(var),):
        raise DataError(f"genes= must be a boolean var column or mask of length {len(var)}.")
    return mask


def _int_or_false(value: Any, name: str) -> int:
    if value is False or value is None:
        return 0
    if value is True:
        return 1
    if isinstance(value, (int, np.integer)) and value >= 0:
        return int(value)
    raise DataError(f"{name} must be False, True or a non-negative integer, got {value!r}.")


def run(ctx: Any) -> Iterator[TokenizedCells]:
    """Tokenize every source of ``ctx`` (see :func:`cellkit.tokenize`)."""
    o = ctx.options
    mode = o["mode"]
    if mode not in ("deterministic", "compat"):
        raise DataError(f"mode must be 'deterministic' or 'compat', got {mode!r}.")
    compat = mode == "compat"
    n_bins, pad_value, cls_value = _value_encoding(o, ctx.input_spec, compat=compat)
    from ..tokenize import max_length_option

    max_len = max_length_option(o, "max_len")
    if max_len is not None and (not isinstance(max_len, (int, np.integer)) or max_len < 2):
        raise DataError(f"max_len must be an integer >= 2 or None, got {max_len!r}.")
    append_cls = bool(o["append_cls"])
    if append_cls and "cls" not in ctx.vocab.specials:
        raise DataError("append_cls=True but the vocabulary has no <cls> token; pass append_cls=False.")
    min_gene_counts = _int_or_false(o["filter_gene_by_counts"], "filter_gene_by_counts")
    min_cell_counts = _int_or_false(o["filter_cell_by_counts"], "filter_cell_by_counts")
    target = o["normalize_total"]
    _check_whole_matrix_options(ctx, target, min_gene_counts)
    specials = ctx.specials()
    cls_id = specials.get("cls", -1)
    ctx.options.update(
        {
            "n_bins": n_bins,
            "pad_value": pad_value,
            "cls_value": cls_value,
            "max_len": None if max_len is None else int(max_len),
            "max_length": None if max_len is None else int(max_len),
        }
    )
    ctx.options.update(matching_options(o, compat=compat))  # what match_genes used, recorded
    rng = np.random.RandomState(int(o["seed"])) if compat else None
    all_parts: list[TokenizedCells] = []

    for src, match in ctx.sources:
        if match.duplicates == "sum" and match.n_duplicated:
            from ..tokenize import sum_duplicate_columns

            src, match = sum_duplicate_columns(src, match)
        cols = match.columns
        if o["genes"] is not None:
            cols = cols[_gene_mask(src, o["genes"])[cols]]
        if min_gene_counts or min_cell_counts or _median_target(target, compat):
            src, cols, target = _filter_by_counts(
                ctx,
                src,
                cols,
                min_gene_counts=min_gene_counts,
                min_cell_counts=min_cell_counts,
                target=target,
                compat=compat,
            )
        if target is not None:
            target = float(target)
        tokens = match.token_ids[cols]
        hvg_pos = None
        if o["n_hvg"]:
            hvg_pos = _hvg_positions(src, cols, int(o["n_hvg"]), o["hvg_flavor"])
            ctx.notes.append(f"n_hvg={o['n_hvg']} ({o['hvg_flavor']}): {len(hvg_pos):,} genes kept")
        gene_tokens = tokens if hvg_pos is None else tokens[hvg_pos]
        keys = None
        if not compat:
            from .._hashing import cell_key

            keys = cell_key(np.asarray(src.obs.index[src.rows]).astype(str))
        if not compat and n_bins and not o["include_zero"] and hvg_pos is None:
            # the common case: one compiled pass per block bins, samples and writes the tokens
            yield from _run_fused(
                ctx,
                src,
                cols,
                gene_tokens,
                keys,
                n_bins=int(n_bins),
                append_cls=append_cls,
                cls_id=cls_id,
                cls_value=cls_value,
                max_len=max_len,
                seed=int(o["seed"]),
                pad_value=pad_value,
            )
            continue
        parts = _run_blocks(
            ctx,
            src,
            cols,
            gene_tokens,
            hvg_pos,
            keys,
            target=target,
            n_bins=n_bins,
            append_cls=append_cls,
            cls_id=cls_id,
            cls_value=cls_value,
            rng=rng,
            max_len=max_len,
            pad_value=pad_value,
            compat=compat,
        )
        if compat:
            all_parts.extend(parts)
        else:
            yield from parts
    if compat and all_parts:
        cells = TokenizedCells.concat(all_parts)
        if max_len is not None:
            cells = _sample_compat(cells, max_len, rng, cls_appended=append_cls)
        cells.rng = rng
        yield cells


def _value_encoding(o: Mapping[str, Any], spec: InputSpec, *, compat: bool) -> tuple[Any, float, float]:
    """``n_bins``, ``pad_value`` and ``cls_value``: each the option, else the model's setting, else scGPT's default."""
    n_bins = o["n_bins"] if o["n_bins"] is not None else _stated(spec.n_bins, 51)
    if n_bins is not False and n_bins and (not isinstance(n_bins, (int, np.integer)) or n_bins < 3):
        raise DataError(f"n_bins must be an integer >= 3 (or 0 for continuous values), got {n_bins!r}.")
    pad_value = float(o["pad_value"] if o["pad_value"] is not None else _stated(spec.pad_value, -2.0))
    if o["cls_value"] is not None:
        cls_value = float(o["cls_value"])
    else:
        cls_value = 0.0 if compat else float(_stated(spec.cls_value, pad_value))
    return n_bins, pad_value, cls_value


def _stated(value: Any, default: Any) -> Any:
    """A convention the model states, else ``default``."""
    return default if value is None else value


def _check_whole_matrix_options(ctx: Any, target: Any, min_gene_counts: int) -> None:
    """``normalize_total`` is a number; gene filters that need the whole matrix get one in-memory source."""
    o = ctx.options
    if isinstance(target, bool):
        raise DataError("normalize_total takes a number (target sum) or None, not a bool.")
    if o["n_hvg"] and not ctx.in_memory:
        raise DataError(
            "n_hvg needs the cells in memory (scanpy's highly_variable_genes); for backed or partitioned data "
            "select the genes first and pass genes='highly_variable' (a boolean var column)."
        )
    if (min_gene_counts or o["n_hvg"]) and len(ctx.sources) > 1:
        raise DataError(
            "filter_gene_by_counts and n_hvg work on one matrix; tokenize partitions with genes= instead."
        )


def _median_target(target: Any, compat: bool) -> bool:
    """Whether compat mode normalises to the median total (scGPT passes an int normalize_total as None)."""
    return target is not None and compat and isinstance(target, int)


def _filter_by_counts(
    ctx: Any,
    src: Any,
    cols: np.ndarray,
    *,
    min_gene_counts: int,
    min_cell_counts: int,
    target: Any,
    compat: bool,
) -> tuple[Any, np.ndarray, Any]:
    """Apply ``filter_gene_by_counts`` / ``filter_cell_by_counts`` and compat's median target, as scGPT does.

    Returns the (possibly row-filtered) source, the kept gene columns and the normalisation target.
    """
    from ..tokenize import check_values

    gene_sums = np.zeros(len(cols))
    for _, block in src.chunks(ctx.chunk_size):
        check_values(block.data, where=src.name)
        gene_sums += np.asarray(block[:, cols].sum(0)).ravel()
    if min_gene_counts:
        keep = gene_sums >= min_gene_counts
        ctx.notes.append(
            f"filter_gene_by_counts={min_gene_counts}: kept {int(keep.sum()):,} of {len(cols):,} genes"
        )
        cols = cols[keep]
    totals = np.concatenate([np.asarray(b[:, cols].sum(1)).ravel() for _, b in src.chunks(ctx.chunk_size)])
    if min_cell_counts:
        rows = src.rows
        keep = totals >= min_cell_counts
        ctx.notes.append(
            f"filter_cell_by_counts={min_cell_counts}: kept {int(keep.sum()):,} of {len(rows):,} cells"
        )
        rows, totals = rows[keep], totals[keep]
        src = type(src)(src.matrix, src.var, src.obs, rows, src.name)
    if _median_target(target, compat):
        # scGPT passes an int normalize_total to scanpy as target_sum=None: the median total
        target = float(np.median(totals[totals > 0]))
        ctx.notes.append(
            f"normalize_total was an int: normalised to the median total ({target:g}), as scGPT does"
        )
    return src, cols, target


def _run_blocks(
    ctx: Any,
    src: Any,
    cols: np.ndarray,
    gene_tokens: np.ndarray,
    hvg_pos: np.ndarray | None,
    keys: np.ndarray | None,
    *,
    target: float | None,
    n_bins: Any,
    append_cls: bool,
    cls_id: int,
    cls_value: float,
    rng: np.random.RandomState | None,
    max_len: int | None,
    pad_value: float,
    compat: bool,
) -> Iterator[TokenizedCells]:
    """Tokens of one source block by block in Python (compat mode, zeros kept, hvg or continuous values)."""
    from ..tokenize import check_values

    o = ctx.options
    done = 0
    identity_cols = len(cols) == src.var.shape[0] and bool((cols == np.arange(len(cols))).all())
    # Binning depends only on the order of a cell's values, which normalize_total and log1p
    # (monotone within a cell) keep: deterministic mode bins the counts directly. compat mode
    # runs them, because they can round two values into a tie and scGPT's RNG then differs.
    rank_only = bool(n_bins) and not compat
    with ctx.pbar(len(src.rows), f"tokenizing ({src.name})") as bar:
        for idx, block in src.chunks(ctx.chunk_size):
            check_values(block.data, where=src.name)
            x, raw = _block_values(
                block if identity_cols else block[:, cols],
                hvg_pos,
                target=target,
                log1p=bool(o["log1p"]),
                normalize=(target is not None or o["log1p"]) and not rank_only,
                binned=bool(n_bins),
            )
            local = np.arange(done, done + len(idx))
            part = _tokens_for_block(
                x,
                gene_tokens,
                n_bins=n_bins,
                include_zero=bool(o["include_zero"]),
                append_cls=append_cls,
                cls_id=cls_id,
                cls_value=cls_value,
                rng=rng,
                keys=None if keys is None else keys[local],
                seed=int(o["seed"]),
                max_len=None if compat else max_len,
                raw=raw,
            )
            ctx.stamp(part, src, idx, scheme="scgpt", pad_value=pad_value)
            done += len(idx)
            bar.update(len(idx))
            yield part


def _block_values(
    counts: Any,
    hvg_pos: np.ndarray | None,
    *,
    target: float | None,
    log1p: bool,
    normalize: bool,
    binned: bool,
) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """A block's values as canonical CSR (normalised when asked, hvg columns kept) and the counts behind them.

    The counts are returned only when compat binning needs them: normalised values with the same
    entries as the counts; otherwise ``None``.
    """
    x = counts
    if normalize:
        x = _normalize(x, target, log1p)
    if hvg_pos is not None:
        x, counts = x[:, hvg_pos], counts[:, hvg_pos]
    x = sp.csr_matrix(x)
    x.eliminate_zeros()
    x.sort_indices()
    counts = sp.csr_matrix(counts)
    raw = (  # the counts behind each normalised value (same entries): compat bins with them
        counts.data
        if normalize
        and binned
        and counts.has_canonical_format
        and np.array_equal(counts.indptr, x.indptr)
        and np.array_equal(counts.indices, x.indices)
        else None
    )
    return x, raw


def _run_fused(
    ctx: Any,
    src: Any,
    cols: np.ndarray,
    gene_tokens: np.ndarray,
    keys: np.ndarray,
    *,
    n_bins: int,
    append_cls: bool,
    cls_id: int,
    cls_value: float,
    max_len: int | None,
    seed: int,
    pad_value: float,
) -> Iterator[TokenizedCells]:
    """Deterministic-mode tokens of one source with :func:`._kernels.scgpt_tokens`.

    The counts are binned directly (normalize_total and log1p keep the order of a cell's values).
    In-memory CSR matrices are read in place; otherwise each block is read with
    :meth:`MatrixSource.chunks`. Without an output directory the tokens of all cells are written
    into one preallocated array (no concatenation); when streaming, one array per block.
    """
    from .._hashing import hash64
    from ..tokenize import check_values
    from ._kernels import KERNEL_LOCK, csr_arrays, scgpt_count, scgpt_tokens

    col_tok = np.full(src.var.shape[0], -1, dtype=np.int64)
    col_tok[cols] = gene_tokens  # cols ascending: the kept columns stay in column order
    q = np.linspace(0, 1, n_bins - 1)
    first = 1 if append_cls else 0
    cap = int(max_len) if max_len is not None else 0
    bin_seed, sample_seed = np.uint64(hash64(seed)), np.uint64(hash64(seed + 1))
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    rows = np.ascontiguousarray(src.rows, dtype=np.int64)
    n = len(rows)
    arrays = csr_arrays(src.matrix)

    def tokens(data, indices, indptr, sel, row_keys, offsets, ids, vals):
        scgpt_tokens(data, indices, indptr, sel, col_tok, row_keys, q, bin_seed, sample_seed, first,
                     cls_id, cls_value, cap, offsets, ids, vals)  # fmt: skip

    def count(data, indices, indptr, sel):
        lengths = np.empty(len(sel), dtype=np.int64)
        with KERNEL_LOCK:
            bad = scgpt_count(data, indices, indptr, sel, col_tok, first, cap, lengths)
        if bad:  # the message names the problem
            check_values(np.concatenate([data[indptr[r] : indptr[r + 1]] for r in sel]), where=src.name)
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    with ctx.pbar(n, f"tokenizing ({src.name})") as bar:
        if arrays is not None and not ctx.streaming:
            data, indices, indptr = arrays
            offsets = count(data, indices, indptr, rows)
            ids = np.empty(int(offsets[-1]), dtype=np.int32)
            vals = np.empty(int(offsets[-1]), dtype=np.float32)
            for start in range(0, n, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, n)
                with KERNEL_LOCK:
                    tokens(data, indices, indptr, rows[start:stop], keys[start:stop], offsets[start : stop + 1],
                           ids, vals)  # fmt: skip
                bar.update(stop - start)
            if n:
                part = TokenizedCells(ids, offsets, values=vals)
                yield ctx.stamp(part, src, rows, scheme="scgpt", pad_value=pad_value)
            return
        done = 0
        for idx, block in (
            ((src.rows[a : a + ctx.chunk_size], None) for a in range(0, n, ctx.chunk_size))
            if arrays is not None
            else src.chunks(ctx.chunk_size)
        ):
            if block is None:
                data, indices, indptr = arrays
                sel = rows[done : done + len(idx)]
            else:
                data, indices, indptr = block.data, block.indices, block.indptr
                sel = np.arange(len(idx), dtype=np.int64)
            offsets = count(data, indices, indptr, sel)
            ids = np.empty(int(offsets[-1]), dtype=np.int32)
            vals = np.empty(int(offsets[-1]), dtype=np.float32)
            with KERNEL_LOCK:
                tokens(data, indices, indptr, sel, keys[done : done + len(idx)], offsets, ids, vals)
            part = TokenizedCells(ids, offsets, values=vals)
            yield ctx.stamp(part, src, idx, scheme="scgpt", pad_value=pad_value)
            done += len(idx)
            bar.update(len(idx))


def _hvg_positions(src: Any, cols: np.ndarray, n_top: int, flavor: str) -> np.ndarray:
    import anndata as ad
    import scanpy as sc

    blocks = [b[:, cols] for _, b in src.chunks(4096)]
    a = ad.AnnData(sp.vstack(blocks).tocsr())
    try:
        table = sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor=flavor, subset=False, inplace=False)
    except ImportError as exc:
        from ..._errors import MissingDependencyError

        raise MissingDependencyError(
            f"hvg_flavor={flavor!r} needs scikit-misc: `pip install scikit-misc` ({exc})."
        ) from None
    return np.flatnonzero(table["highly_variable"].to_numpy())


def _tokens_for_block(
    x: sp.csr_matrix,
    gene_tokens: np.ndarray,
    *,
    n_bins: int,
    include_zero: bool,
    append_cls: bool,
    cls_id: int,
    cls_value: float,
    rng: np.random.RandomState | None,
    keys: np.ndarray | None,
    seed: int,
    max_len: int | None,
    raw: np.ndarray | None = None,
) -> TokenizedCells:
    n_rows, n_genes = x.shape
    rows_of = np.repeat(np.arange(n_rows), np.diff(x.indptr))
    if n_bins:
        vals = bin_block(x, gene_tokens, int(n_bins), rng=rng, keys=keys, seed=seed, raw=raw).astype(
            np.float32
        )
    else:
        vals = x.data.astype(np.float32)
    if include_zero:
        dense = np.zeros((n_rows, n_genes), dtype=np.float32)
        dense[rows_of, x.indices] = vals
        ids = np.tile(gene_tokens.astype(np.int32), n_rows)
        values = dense.ravel()
        lengths = np.full(n_rows, n_genes, dtype=np.int64)
    else:
        ids = gene_tokens[x.indices].astype(np.int32)
        values = vals
        lengths = np.diff(x.indptr).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if append_cls:
        ids = np.insert(ids, offsets[:-1], cls_id).astype(np.int32)
        values = np.insert(values, offsets[:-1], cls_value).astype(np.float32)
        lengths = lengths + 1
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    cells = TokenizedCells(ids, offsets, values=values)
    if max_len is not None and (lengths > max_len).any():
        cells = _sample_deterministic(cells, max_len, keys, seed, cls_appended=append_cls)
    return cells


def _sample_deterministic(
    cells: TokenizedCells, max_len: int, keys: np.ndarray, seed: int, *, cls_appended: bool
) -> TokenizedCells:
    """Keep ``<cls>`` + the ``max_len - 1`` genes with the smallest hash (column order kept)."""
    from .._hashing import hash64
    from ._kernels import KERNEL_LOCK, sample_compact

    first = 1 if cls_appended else 0
    lengths = np.minimum(cells.lengths, max_len)
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out_ids = np.empty(int(new_offsets[-1]), dtype=np.int32)
    out_vals = np.empty(int(new_offsets[-1]), dtype=np.float32)
    with KERNEL_LOCK:
        sample_compact(
            np.ascontiguousarray(cells.offsets, dtype=np.int64),
            np.ascontiguousarray(cells.gene_ids, dtype=np.int32),
            np.ascontiguousarray(cells.values, dtype=np.float32),
            np.ascontiguousarray(keys, dtype=np.uint64),
            np.uint64(hash64(seed + 1)),
            int(max_len),
            first,
            new_offsets,
            out_ids,
            out_vals,
        )
    return TokenizedCells(out_ids, new_offsets, values=out_vals)


def _sample_compat(
    cells: TokenizedCells, max_len: int, rng: np.random.RandomState, *, cls_appended: bool
) -> TokenizedCells:
    """scGPT's ``pad_batch`` over all cells: width = min(longest, max_len); longer rows sampled in order."""
    from dataclasses import replace

    lengths_in = cells.lengths
    width = min(int(lengths_in.max()), max_len)
    lengths = np.minimum(lengths_in, width)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    gather = np.arange(offsets[-1], dtype=np.int64) + (cells.offsets[:-1] - offsets[:-1])[row_of]
    for i in np.flatnonzero(lengths_in > width):  # in row order: the RNG stream is scGPT's
        pos = sample_positions_compat(rng, int(lengths_in[i]), width, cls_appended=cls_appended)
        gather[offsets[i] : offsets[i + 1]] = cells.offsets[i] + pos
    return replace(
        cells,
        gene_ids=cells.gene_ids[gather],
        values=cells.values[gather],
        offsets=offsets,
        notes=list(cells.notes),
    )
