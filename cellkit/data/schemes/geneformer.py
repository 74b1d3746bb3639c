"""Geneformer rank-value encoding, bit-identical to its ``TranscriptomeTokenizer`` (commit ff551ee).

Per cell: ``value = count / n_counts × 10,000 / gene_median`` over the vocabulary's genes, the
nonzero genes sorted by descending value with NumPy's default (quick)sort as Geneformer does, then
truncated to ``model_input_size`` (V1, 2048) or to ``model_input_size − 2`` between ``<cls>`` and
``<eos>`` (V2, 4096). The arithmetic follows Geneformer's scipy path exactly: ``X × (1/n_counts)``
in the matrix dtype, ``× 10,000``, then ``× (1/median)`` in float64.

Gene handling as Geneformer's ``sum_ensembl_ids``: ids are upper-cased and mapped through the
Ensembl mapping dictionary; when the mapping makes several columns one gene, their counts are
summed and the summed genes move to the end of the column order (which decides the order of tied
values). ``mode="deterministic"`` (default) additionally matches versioned ids (``ENSG….7``),
then the columns still unmatched through the model's ``gene_name_id`` dictionary (symbols), the
shipped GENCODE tables (symbols, outdated symbols; ``gene_tables``) and one-to-one human orthologs
of mouse genes (``orthologs``); ``mode="compat"`` reproduces Geneformer's silent drops too.
``duplicates="refuse"`` raises, naming the genes, instead of summing them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..._errors import DataError
from ..genes import GeneMatch, Retry, detect_species, matching_options, refuse_collisions
from ..input_spec import InputSpec
from ..tokenized import TokenizedCells
from ..vocab import Coverage, GeneVocab
from ._kernels import csr_arrays

__all__ = ["OPTIONS", "match_genes", "run"]

OPTIONS: dict[str, Any] = {
    "mode": "deterministic",  # or "compat": also drop versioned ids, exactly as Geneformer
    "model_input_size": None,  # model's max_length, else 4096 (V2) / 2048 (V1)
    "max_length": None,  # the same as model_input_size (every scheme takes max_length)
    "special_token": None,  # model's / vocabulary's (<cls> and <eos> present) convention
    "target_sum": 10_000,
    "collapse_gene_ids": True,
    "n_counts_column": "n_counts",  # computed from the matrix when absent (and said so)
    "filter_pass_column": "filter_pass",  # cells with a value other than 1 are skipped, if present
    "keep_uncropped_length": False,
    # gene matching beyond Geneformer's own (deterministic mode only; compat reproduces its drops):
    "gene_tables": None,  # symbols / outdated symbols -> Ensembl ids via the shipped GENCODE tables; None = on
    "orthologs": None,  # mouse data: one-to-one human orthologs; None = on (off in compat)
    "species": "auto",  # of the data's genes: "auto", "human" or "mouse"
    "duplicates": None,  # ids resolving to one token: None = "sum" (Geneformer), or "refuse" (an error naming them)
}


def _mapping(vocab: GeneVocab, resources: Mapping[str, Any]) -> dict[str, str]:
    """Geneformer's gene mapping dict restricted to ids that are tokens (identity without one)."""
    tokens = set(vocab.tokens)
    mapping = resources.get("ensembl_mapping")
    if not mapping:
        return {t: t for t in vocab.tokens}
    return {k: v for k, v in mapping.items() if v in tokens}


def match_genes(
    names: pd.Index, vocab: GeneVocab, resources: Mapping[str, Any], options: Mapping[str, Any]
) -> GeneMatch:
    """Map ids like ``sum_ensembl_ids`` does; ``token_ids`` are per input column (-1 = dropped)."""
    mapping = _mapping(vocab, resources)
    medians = resources.get("gene_median")
    ids = np.asarray(names.astype(str))
    upper = np.char.upper(ids.astype(str))
    mapped = np.array([mapping.get(g) for g in upper], dtype=object)
    rules = np.where(pd.isna(mapped), "", np.where(upper == ids, "exact", "model mapping")).astype(object)
    n_version = 0
    compat = options.get("mode", "deterministic") == "compat"
    if not compat:
        for j in np.flatnonzero(pd.isna(mapped)):
            base = upper[j].split(".")[0]
            if base != upper[j] and base.startswith("ENS") and base in mapping:
                mapped[j] = mapping[base]
                rules[j] = "version stripped"
                n_version += 1
            elif ids[j] in mapping:  # vocabularies keyed by non-upper-case ids (e.g. mouse symbols)
                mapped[j], rules[j] = mapping[ids[j]], "exact"
    stoi = vocab.to_dict()
    special = set(vocab.specials.values())
    tok = np.array(
        [stoi[m] if isinstance(m, str) and m in stoi and m not in special else -1 for m in mapped],
        dtype=np.int64,
    )
    species = None
    if not compat:
        species = _more_genes(ids, tok, mapped, rules, mapping, vocab, resources, options)
    if medians is not None:
        no_median = [j for j in np.flatnonzero(tok >= 0) if mapped[j] not in medians]
        tok[no_median] = -1
    hit = tok >= 0
    cov = Coverage(len(ids), int(hit.sum()), tuple(ids[hit][:10].tolist()), tuple(ids[~hit][:10].tolist()))
    rules[tok < 0] = ""
    duplicates = options.get("duplicates") or "sum"
    if duplicates not in ("sum", "refuse"):
        raise DataError(f"duplicates must be 'sum' (Geneformer) or 'refuse' for geneformer, got {duplicates!r}.")
    match = GeneMatch(ids, tok, cov, duplicates, n_version_stripped=n_version, rules=rules, species=species)
    match.mapped = mapped  # type: ignore[attr-defined]
    if duplicates == "refuse":
        refuse_collisions(match, vocab)
    return match


def _more_genes(
    ids: np.ndarray,
    tok: np.ndarray,
    mapped: np.ndarray,
    rules: np.ndarray,
    mapping: Mapping[str, str],
    vocab: GeneVocab,
    resources: Mapping[str, Any],
    options: Mapping[str, Any],
) -> str | None:
    """Deterministic mode: match the columns Geneformer drops, in place (``tok``, ``mapped``, ``rules``).

    First the model's own ``gene_name_id`` dictionary (symbol → Ensembl id, then the Ensembl
    mapping), then the shipped tables and one-to-one orthologs
    (:class:`~cellkit.data.genes.Retry`, against the identifiers the mapping knows). Returns the
    species the genes were read as (``None`` when nothing was left to match).
    """
    todo = np.flatnonzero((tok < 0) & pd.isna(mapped))
    if not len(todo):
        return None
    name_id = resources.get("gene_name_id") or {}
    stoi, special = vocab.to_dict(), set(vocab.specials.values())
    lookup = {k: stoi[v] for k, v in mapping.items() if v in stoi and v not in special}
    retries = matching_options(options, compat=False)
    retry = Retry(lookup, **retries)
    species = options.get("species") or "auto"
    species = detect_species(ids) if species == "auto" else species
    retry.set_species(species, vocab)
    for j in todo:
        gid = name_id.get(ids[j], name_id.get(str(ids[j]).upper()))
        if isinstance(gid, str) and gid.upper() in lookup:
            tok[j], rules[j] = lookup[gid.upper()], "model mapping"
        else:
            rule, token, _ = retry(str(ids[j]))
            if rule is None:
                continue
            tok[j], rules[j] = token, rule
        mapped[j] = vocab.token(int(tok[j]))
    return species


def _column_plan(match: GeneMatch, collapse: bool, compat: bool) -> tuple[sp.csr_matrix, np.ndarray]:
    """A (n_vars × n_out) 0/1 matrix summing/selecting input columns, and the output token ids.

    Reproduces Geneformer's column order: without collisions the mapped columns keep their
    order; when the mapping merges ids (or a gene id repeats), merged genes are summed and
    appended at the end in order of first appearance.
    """
    mapped = match.mapped  # type: ignore[attr-defined]
    tok = match.token_ids
    present = [m for m in mapped if isinstance(m, str)]
    raw_in_map = [n for n, m in zip(match.names, mapped) if isinstance(m, str)]
    if not collapse:
        used = tok[tok >= 0]
        if len(used) != len(np.unique(used)):
            raise DataError(
                "Gene ids map to the same token but collapse_gene_ids=False; set it to True to sum them."
            )
        cols = np.flatnonzero(tok >= 0)
        out = tok[cols]
    else:
        # Geneformer decides "collapse" by comparing distinct input ids with distinct mapped ids
        collides = len(set(raw_in_map)) != len(set(present)) if compat else len(present) != len(set(present))
        if not collides:
            cols = np.flatnonzero(tok >= 0)
            out = tok[cols]
        else:
            names = np.array([m if isinstance(m, str) else "nan" for m in mapped], dtype=object)
            counts = Counter(names)
            dup = [g for g, c in counts.items() if c > 1]
            dup_set = set(dup)
            single = [j for j in range(len(names)) if names[j] not in dup_set and tok[j] >= 0]
            rows, cols_out, out = [], [], []
            for j in single:
                rows.append(j)
                cols_out.append(len(out))
                out.append(tok[j])
            for g in dup:
                members = [j for j in range(len(names)) if names[j] == g and tok[j] >= 0]
                if not members:
                    continue
                for j in members:
                    rows.append(j)
                    cols_out.append(len(out))
                out.append(tok[members[0]])
            plan = sp.csr_matrix(
                (
                    np.ones(len(rows), dtype=np.float32),
                    (np.array(rows, dtype=np.int64), np.array(cols_out, dtype=np.int64)),
                ),
                shape=(len(names), len(out)),
            )
            return plan, np.asarray(out, dtype=np.int64)
    plan = sp.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), (cols, np.arange(len(cols)))), shape=(len(tok), len(cols))
    )
    return plan, np.asarray(out, dtype=np.int64)


class _Ranker:
    """Rank blocks of CSR rows into Geneformer's token sequences with the compiled kernels.

    Each cell's genes are ordered by a kernel when its values are all distinct (the order is then
    unique); cells with equal values go through ``np.argsort`` of the same values, exactly as
    Geneformer sorts them, so the order of ties is numpy's.
    """

    def __init__(self, col_map, recip_median, out_tokens, target_sum, compat, budget, special, specials):
        self.col_map = col_map
        self.recip_median = np.ascontiguousarray(recip_median, dtype=np.float64)
        self.out_tokens = np.ascontiguousarray(out_tokens, dtype=np.int64)
        self.target_sum = target_sum
        self.compat = compat
        self.budget = int(budget)
        self.special = bool(special)
        self.specials = specials

    def __call__(self, data, indices, indptr, sel, recip_counts, *, check, where):
        from ..tokenize import check_values
        from ._kernels import KERNEL_LOCK, geneformer_count, geneformer_rank

        rc = np.ascontiguousarray(recip_counts)
        # numpy's dtype for (values × 1/n_counts) × target_sum, and target_sum in it
        dt = (np.ones(1, np.result_type(data.dtype, rc.dtype)) * self.target_sum).dtype
        ts = dt.type(self.target_sum)
        drop_zeros = not self.compat
        full = np.empty(len(sel), dtype=np.int64)
        with KERNEL_LOCK:
            bad = geneformer_count(
                data, indices, indptr, sel, self.col_map, rc, ts, self.recip_median, drop_zeros, full
            )
        if bad and check:  # raises with the message that names the problem
            check_values(
                np.concatenate([data[indptr[r] : indptr[r + 1]] for r in sel]), where=where, counts=True
            )
        kept = np.minimum(full, self.budget)
        extra = 2 if self.special else 0
        # compat keeps gene-less cells as Geneformer does (V1: empty; V2: <cls> <eos>)
        keep_rows = np.ones(len(sel), dtype=bool) if self.compat else full > 0
        lengths = np.where(keep_rows, kept + extra, 0)
        offsets = np.zeros(len(sel) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=np.int32)
        if self.special:
            flat[offsets[:-1][keep_rows]] = self.specials["cls"]
            flat[offsets[1:][keep_rows] - 1] = self.specials["eos"]
        shift = 1 if self.special else 0
        fallback = np.zeros(len(sel), dtype=bool)
        with KERNEL_LOCK:
            geneformer_rank(
                data, indices, indptr, sel, self.col_map, rc, ts, self.recip_median, self.out_tokens,
                drop_zeros, self.budget, shift, offsets, flat, fallback,
            )  # fmt: skip
        for i in np.flatnonzero(fallback):
            a, b = indptr[sel[i]], indptr[sel[i] + 1]
            cols = self.col_map[indices[a:b]]
            used = cols >= 0
            cols = cols[used]
            # Geneformer: X / n_counts * target_sum / median, as scipy evaluates it
            values = np.multiply(
                np.multiply(data[a:b][used], rc[i : i + 1]) * self.target_sum, self.recip_median[cols]
            )
            if drop_zeros:
                nonzero = values != 0
                values, cols = values[nonzero], cols[nonzero]
            o = offsets[i] + shift
            # numpy's own argsort on the same values as Geneformer: identical order of ties
            flat[o : o + kept[i]] = self.out_tokens[cols][np.argsort(-values)[: kept[i]]]
        return flat, np.concatenate([[0], offsets[1:][keep_rows]]).astype(np.int64), keep_rows, full


def run(ctx: Any) -> Iterator[TokenizedCells]:
    """Tokenize every source of ``ctx`` (see :func:`cellkit.tokenize`)."""
    from ..tokenize import check_values

    o = ctx.options
    if o["mode"] not in ("deterministic", "compat"):
        raise DataError(f"mode must be 'deterministic' or 'compat', got {o['mode']!r}.")
    compat = o["mode"] == "compat"
    vocab: GeneVocab = ctx.vocab
    special = _special_token(o, vocab, ctx.input_spec)
    size, budget = _input_size(o, ctx.input_spec, special)
    medians = _gene_medians(ctx.resources)
    specials = ctx.specials()
    target_sum = o["target_sum"]
    ctx.options.update(
        {"model_input_size": int(size), "special_token": bool(special), "max_length": int(size)}
    )
    for src, match in ctx.sources:
        plan, out_tokens = _column_plan(match, bool(o["collapse_gene_ids"]), compat)
        selection = _ordered_selection(plan)
        median = np.array([medians[vocab.token(int(t))] for t in out_tokens], dtype=np.float64)
        recip_median = np.divide(1, median)
        src = _filter_passed_cells(src, o["filter_pass_column"], ctx.notes)
        n_col = o["n_counts_column"]
        stored = n_col in src.obs.columns
        if not stored:
            ctx.notes.append(
                f"obs[{n_col!r}] absent: total counts computed from the matrix (all genes) per cell"
            )
        empty: list[str] = []
        col_map = _column_map(plan, selection)
        rank = _Ranker(col_map, recip_median, out_tokens, target_sum, compat, budget, special, specials)
        arrays = csr_arrays(src.matrix) if stored and selection is not None else None
        if arrays is not None:  # in-memory CSR read in place: no block copies
            data, indices, indptr = arrays
        blocks = _row_blocks(src, arrays is not None, ctx)
        with ctx.pbar(len(src.rows), f"tokenizing ({src.name})") as bar:
            for idx, block in blocks:
                if block is not None:
                    check_values(block.data, where=src.name, counts=True)
                n_counts = _cell_counts(src, idx, block, n_col, stored, indptr if block is None else None)
                if block is None:
                    sel = idx
                else:
                    data, indices, indptr = _planned_csr(block, len(idx), plan, selection)
                    sel = np.arange(len(idx), dtype=np.int64)
                with np.errstate(divide="ignore"):  # empty cells (n_counts 0) have no entries to scale
                    recip_counts = np.divide(1, n_counts).ravel()
                flat, offsets, keep_rows, full = rank(
                    data, indices, indptr, sel, recip_counts, check=block is None, where=src.name
                )
                names = np.asarray(src.obs.index[idx]).astype(str)
                empty += names[~keep_rows].tolist()
                part = _tokenized_part(ctx, src, idx, names, flat, offsets, keep_rows, full, specials)
                bar.update(len(idx))
                yield part
        if empty:
            ctx.notes.append(
                f"{len(empty):,} cells had no expressed gene in the vocabulary and were left out, e.g. {empty[:3]}"
            )


def _special_token(o: Mapping[str, Any], vocab: GeneVocab, spec: InputSpec) -> bool:
    """Whether cells get ``<cls>`` … ``<eos>``: the option, else the model's setting, else the vocabulary's."""
    has_special = "cls" in vocab.specials and "eos" in vocab.specials
    if o["special_token"] is not None:
        special = o["special_token"]
    else:
        special = has_special if spec.special_token is None else spec.special_token
    if special and not has_special:
        raise DataError(
            "special_token=True needs <cls> and <eos> in the vocabulary (Geneformer V2 dictionaries have them)."
        )
    return special


def _input_size(o: Mapping[str, Any], spec: InputSpec, special: bool) -> tuple[Any, int]:
    """The model input size (option, else the model's ``max_length``, else 4096 / 2048) and the genes it leaves room for."""
    from ..tokenize import max_length_option

    size = max_length_option(o, "model_input_size") or spec.max_length or (4096 if special else 2048)
    budget = int(size) - (2 if special else 0)
    if budget < 1:
        raise DataError(f"model_input_size={size} leaves no room for genes.")
    return size, budget


def _gene_medians(resources: Mapping[str, Any]) -> Mapping[str, Any]:
    """The gene median dictionary the scheme normalises by (a DataError when the model has none)."""
    medians = resources.get("gene_median")
    if medians is None:
        raise DataError(
            "The geneformer scheme needs the gene median dictionary: load the model with its "
            "gene_median_dictionary*.pkl (cellkit.load_model(path, gene_median_dictionary=...))."
        )
    return medians


def _ordered_selection(plan: sp.csr_matrix) -> np.ndarray | None:
    """The plan's rows when it is an ordered column selection (no merged genes), else ``None``.

    Such a plan is applied by slicing instead of a matrix product.
    """
    plan_rows, plan_cols = plan.nonzero()
    ordered = plan.nnz == plan.shape[1] and np.array_equal(plan_cols, np.arange(plan.shape[1]))
    return plan_rows if ordered and (np.diff(plan_rows) > 0).all() else None


def _column_map(plan: sp.csr_matrix, selection: np.ndarray | None) -> np.ndarray:
    """Output column of each input column the ranker reads (-1: not a vocabulary gene)."""
    if selection is None:
        return np.arange(plan.shape[1], dtype=np.int64)  # columns of block @ plan
    col_map = np.full(plan.shape[0], -1, dtype=np.int64)
    col_map[selection] = np.arange(len(selection))  # ascending: column order is kept
    return col_map


def _filter_passed_cells(src: Any, column: str | None, notes: list[str]) -> Any:
    """``src`` restricted to cells with ``obs[column] == 1`` (Geneformer's filter_pass rule), if it has the column."""
    if not (column and column in src.obs.columns):
        return src
    rows = src.rows
    keep = src.obs[column].to_numpy()[rows] == 1
    if not keep.all():
        notes.append(f"{int((~keep).sum()):,} cells with {column} != 1 were skipped (Geneformer's rule)")
    return type(src)(src.matrix, src.var, src.obs, rows[keep], src.name)


def _row_blocks(src: Any, in_place: bool, ctx: Any) -> Iterator[tuple[np.ndarray, sp.csr_matrix | None]]:
    """``(rows, block)`` pairs; ``block`` is ``None`` when the in-memory CSR is read in place by row."""
    if not in_place:
        return src.chunks(ctx.chunk_size)
    all_rows = np.ascontiguousarray(src.rows, dtype=np.int64)
    step = len(all_rows) if not ctx.streaming else ctx.chunk_size  # one output when in memory
    return ((all_rows[a : a + step], None) for a in range(0, len(all_rows), max(step, 1)))


def _cell_counts(
    src: Any,
    idx: np.ndarray,
    block: sp.csr_matrix | None,
    n_col: str,
    stored: bool,
    indptr: np.ndarray | None,
) -> np.ndarray:
    """Total counts ``(n, 1)`` of cells ``idx``: ``obs[n_col]`` when stored, else the block's row sums.

    ``indptr`` is the in-place CSR's (when ``block`` is ``None``). Cells with stored entries but a
    non-positive total cannot be normalised: a DataError names them.
    """
    if block is None:
        stored_per_row = indptr[idx + 1] - indptr[idx]
        n_counts = src.obs[n_col].to_numpy()[idx][:, None]
    else:
        stored_per_row = np.diff(block.indptr)
        n_counts = src.obs[n_col].to_numpy()[idx][:, None] if stored else np.asarray(block.sum(1))
    nonpositive = (np.asarray(n_counts).ravel() <= 0) & (stored_per_row > 0)
    if nonpositive.any():
        bad = np.asarray(src.obs.index[idx])[nonpositive][:3].tolist()
        raise DataError(
            f"Cells with counts but obs[{n_col!r}] <= 0 cannot be normalised, e.g. {bad}; fix the "
            f"{n_col!r} column or drop it to let cellkit compute totals."
        )
    return n_counts


def _planned_csr(
    block: sp.csr_matrix, n_rows: int, plan: sp.csr_matrix, selection: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays of a block with merged genes summed by the plan (the block itself when there are none)."""
    if selection is None:  # merged genes: sum columns with the plan
        x = (block @ plan).tocsr() if plan.shape[1] else sp.csr_matrix((n_rows, 0), dtype=block.dtype)
        x = x.astype(block.dtype, copy=False)
        x.sort_indices()
    else:
        x = block
    return x.data, x.indices, x.indptr


def _tokenized_part(
    ctx: Any,
    src: Any,
    idx: np.ndarray,
    names: np.ndarray,
    flat: np.ndarray,
    offsets: np.ndarray,
    keep_rows: np.ndarray,
    full: np.ndarray,
    specials: dict[str, int],
) -> TokenizedCells:
    """The kept cells of one block as TokenizedCells (with ``length_uncropped`` when asked)."""
    sel_rows = np.flatnonzero(keep_rows)
    obs = ctx.obs_frame(src, idx[sel_rows])
    part = TokenizedCells(
        flat,
        offsets,
        obs_names=names[sel_rows],
        obs=obs,
        scheme="geneformer",
        options=dict(ctx.options),
        specials=specials,
        pad_value=0.0,
    )
    if ctx.options["keep_uncropped_length"]:
        obs = part.obs if part.obs is not None else pd.DataFrame(index=np.arange(len(sel_rows)))
        obs["length_uncropped"] = full[sel_rows]
        part.obs = obs
    return part
