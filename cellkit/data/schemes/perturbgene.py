"""PerturbGene's tokens: expression bins as token ids, gene identity as token type, phenotype tokens.

PerturbGene (YufanXia999/PerturbGene) gives every cell two parallel sequences::

    input_ids       [CLS]  [tissue_x] [cell_type_y] …  bin_3  bin_1  …  [EOS]
    token_type_ids    0      1 + i      1 + j        …  o + g  o + g' …    0

- ``[CLS]``, then one phenotype token per included category (``phenotype_columns``, in the order
  given); the token text is ``[value]`` with spaces replaced by underscores and must be in the
  vocabulary. Its type is ``1 + index(category)`` in the model's sorted category list.
- One **bin token** ``bin_k`` per expressed gene, ``k = np.digitize(value, bin_edges)`` with edges
  shared by all genes (``bin_edges`` or ``bin_edges_file``); genes in bin 0 are left out. Its type
  is ``o + gene_index`` with ``o = 1 + n_categories`` and ``gene_index`` the gene's position in
  the model's gene list (resource ``"genes"`` or the ``genes=`` option). Genes of the data not in
  that list are dropped (and counted in the coverage); columns sharing a gene keep the first.
- Genes come straight from the CSR row (never densified), in column order (``gene_order``), with
  the values as they are in the matrix (PerturbGene's files were normalised beforehand).
- ``[EOS]`` last. A cell longer than ``max_length`` loses its last genes; unlike upstream (which
  cuts ``[EOS]`` off with them), cellkit always keeps ``[EOS]``.

There are no per-token values (``values`` is ``None``); the resolved options carry what the
phenotypic-MLM collator needs (``gene_type_offset``, ``n_gene_types``, ``num_bins``,
``bin_0_id``, ``vocab_size``), so ``Collator.for_tokens(tokens, masking="phenotypic")`` works.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellkit._errors import DataError
from cellkit.data.genes import GeneMatch, matching_options, resolve_genes
from cellkit.data.input_spec import InputSpec
from cellkit.data.tokenized import TokenizedCells
from cellkit.data.vocab import GeneVocab

__all__ = [
    "OPTIONS",
    "SPECIAL_TOKENS",
    "match_genes",
    "perturbgene_vocab",
    "phenotype_token",
    "read_bin_edges",
    "run",
]

#: options of the ``perturbgene`` scheme (defaults)
OPTIONS: dict[str, Any] = {
    "max_length": None,  # total length incl. [CLS], phenotypes and [EOS]; None = the model's max_length, else no limit
    "phenotype_columns": (),  # obs columns (= category names), or {category: obs column}
    "phenotype_categories": None,  # the model's categories (sorted); None = resource "phenotypes", else the included ones
    "bin_edges": None,  # shared bin edges (list of floats)
    "bin_edges_file": None,  # text file of edges (whitespace/comma/newline separated)
    "genes": None,  # the model's gene list (gene index = position); None = resource "genes"
    "gene_order": "column",  # or "gene_list": genes ordered by their index in the gene list
    "case_fold": True,  # gene matching: retry upper-cased names when a name is not in the gene list as is
    "strip_versions": True,  # gene matching: retry ENSG….7 as ENSG…
}

#: PerturbGene's special tokens, by role (ids 0–3 in its vocabulary)
SPECIAL_TOKENS: dict[str, str] = {"cls": "[CLS]", "eos": "[EOS]", "mask": "[MASK]", "pad": "[PAD]"}


def phenotype_token(value: Any) -> str:
    """The token text of a phenotype value: ``[value]`` with spaces as underscores.

    Examples
    --------
    >>> phenotype_token("T cell")
    '[T_cell]'
    """
    return f"[{str(value).replace(' ', '_').strip()}]"


def perturbgene_vocab(phenotypes: Mapping[str, Sequence[str]], n_bins: int) -> GeneVocab:
    """A PerturbGene-style vocabulary: specials, phenotype tokens, ``bin_0 … bin_n``.

    Parameters
    ----------
    phenotypes
        Category → its values (raw, e.g. ``"T cell"``, or already tokens, ``"[T_cell]"``), as in
        PerturbGene's ``phenotypic_tokens_map.json``. Categories are laid out sorted by name,
        values in the order given.
    n_bins
        Number of expression bins above ``bin_0`` (``len(bin_edges)``).

    Returns
    -------
    :class:`~cellkit.data.vocab.GeneVocab` with ``[CLS] [EOS] [MASK] [PAD]`` (ids 0–3, roles
    ``cls``/``eos``/``mask``/``pad``), then the phenotype tokens, then ``bin_0 … bin_{n_bins}``
    (``bin_0`` = not expressed, only an MLM target).

    Examples
    --------
    >>> v = perturbgene_vocab({"sex": ["female", "male"], "cell_type": ["T cell"]}, n_bins=2)
    >>> v.tokens
    ['[CLS]', '[EOS]', '[MASK]', '[PAD]', '[T_cell]', '[female]', '[male]', 'bin_0', 'bin_1', 'bin_2']
    """
    if isinstance(n_bins, (bool, np.bool_)) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise DataError(f"n_bins must be an integer >= 1, got {n_bins!r}.")
    tokens = list(SPECIAL_TOKENS.values())
    for category in sorted(phenotypes):
        values = phenotypes[category]
        if isinstance(values, str):
            raise DataError(f"phenotypes[{category!r}] must be a list of values, not the string {values!r}.")
        tokens += [v if _is_token(v) else phenotype_token(v) for v in map(str, values)]
    tokens += [f"bin_{k}" for k in range(int(n_bins) + 1)]
    return GeneVocab(tokens, specials=SPECIAL_TOKENS)


def _is_token(text: str) -> bool:
    return len(text) >= 2 and text.startswith("[") and text.endswith("]")


def read_bin_edges(path: str | Path) -> list[float]:
    """Bin edges from a text file: numbers separated by whitespace, commas or newlines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"bin_edges_file {path} does not exist.") from None
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        return [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise DataError(
            f"bin_edges_file {path} holds {bad!r}, which is not a number; write one edge per line."
        ) from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ================================================================================ genes
def _gene_list(resources: Mapping[str, Any], options: Mapping[str, Any]) -> list[str]:
    genes = options.get("genes")
    if genes is None:
        genes = resources.get("genes")
    if genes is None:
        raise DataError(
            "The perturbgene scheme needs the model's gene list (a gene's index there is its token type): "
            "pass genes=[...] or use a model with a 'genes' resource."
        )
    if isinstance(genes, str) or not isinstance(genes, (Sequence, np.ndarray, pd.Index)) or not len(genes):
        raise DataError("genes= must be a non-empty list of gene names (the model's gene order).")
    return [str(g) for g in genes]


def _gene_index(genes: list[str]) -> GeneVocab:
    try:
        return GeneVocab(genes)
    except Exception as exc:  # duplicate names
        raise DataError(f"The model's gene list is not usable: {exc}") from None


def match_genes(
    names: pd.Index | Sequence[str],
    vocab: GeneVocab,
    resources: Mapping[str, Any],
    options: Mapping[str, Any],
) -> GeneMatch:
    """Resolve data genes against the model's *gene list* (not the token vocabulary).

    Parameters
    ----------
    names
        ``(n_vars,)`` gene identifiers of the matrix's columns.
    vocab
        The token vocabulary (unused: PerturbGene's tokens are bins and phenotypes).
    resources
        The model's resources (``"genes"``: the gene list).
    options
        The caller's scheme options (``genes=`` overrides the resource; ``case_fold`` and
        ``strip_versions`` turn the retries of :func:`~cellkit.data.genes.resolve_genes` on or off).

    Returns
    -------
    :class:`~cellkit.data.genes.GeneMatch` whose ``token_ids`` are gene indices (``-1``: not in
    the list) and whose coverage counts genes against the list; duplicates keep the first column.
    """
    genes = _gene_list(resources, options)
    retries = matching_options(
        {k: options.get(k, OPTIONS[k]) for k in ("case_fold", "strip_versions")}, compat=False
    )
    match = resolve_genes(names, _gene_index(genes), duplicates="first", **retries)
    if not match.coverage.n_matched:
        raise DataError(
            f"None of the {match.coverage.n_genes:,} genes of the data is in the model's gene list of "
            f"{len(genes):,} genes. Data genes look like {list(match.coverage.unmatched_examples[:5])}; the list "
            f"holds genes like {genes[:5]}. Pick the var column with the same identifiers (gene_column=...)."
        )
    return match


# ================================================================================ options
def _bin_edges(o: Mapping[str, Any], spec: InputSpec, resources: Mapping[str, Any]) -> np.ndarray:
    edges, file = o["bin_edges"], o["bin_edges_file"]
    if edges is not None and file is not None:
        raise DataError("Pass bin_edges= or bin_edges_file=, not both.")
    if file is not None:
        edges = read_bin_edges(file)
    if edges is None:
        edges = spec.bin_edges if spec.bin_edges is not None else resources.get("bin_edges")
    if edges is None:
        raise DataError(
            "The perturbgene scheme needs shared bin edges: pass bin_edges=[0.1] (expressed or not) or "
            "bin_edges_file='bin_edges.txt' (PerturbGene's bin_edges_v1.txt gives 10 bins)."
        )
    if isinstance(edges, (int, float, np.number)):
        edges = [edges]
    try:
        arr = np.asarray(edges, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise DataError(f"bin_edges must be numbers, got {edges!r}.") from None
    if not len(arr) or not np.isfinite(arr).all() or (np.diff(arr) <= 0).any():
        raise DataError(
            f"bin_edges must be a non-empty, strictly increasing list of finite numbers, got {arr.tolist()}."
        )
    return arr


def _phenotypes(o: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(category, obs column)`` pairs in token order."""
    spec = o["phenotype_columns"]
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = [spec]
    pairs = (
        [(str(k), str(v)) for k, v in spec.items()]
        if isinstance(spec, Mapping)
        else [(str(c), str(c)) for c in spec]
    )
    cats = [c for c, _ in pairs]
    if len(set(cats)) != len(cats):
        raise DataError(f"phenotype_columns names a category twice: {cats}.")
    return pairs


def _categories(
    o: Mapping[str, Any], resources: Mapping[str, Any], included: list[str], notes: list[str]
) -> list[str]:
    cats = o["phenotype_categories"]
    if cats is None and resources.get("phenotypes"):
        cats = sorted(resources["phenotypes"])
    if cats is None:
        cats = sorted(included)
        if included:
            notes.append(
                f"phenotype token types assume the model's categories are {cats} (1 + n_categories = "
                f"{1 + len(cats)} is the first gene type); pass phenotype_categories= when it has more"
            )
    cats = [str(c) for c in cats]
    unknown = [c for c in included if c not in cats]
    if unknown:
        raise DataError(f"phenotype categories {unknown} are not among the model's categories {cats}.")
    return cats


def _phenotype_tokens(
    obs: pd.DataFrame, pairs: list[tuple[str, str]], vocab: GeneVocab, where: str
) -> np.ndarray:
    """``(n_cells, n_phenotypes)`` token ids; clear errors for missing columns, values and tokens."""
    out = np.zeros((len(obs), len(pairs)), dtype=np.int64)
    for j, (cat, column) in enumerate(pairs):
        if column not in obs.columns:
            raise DataError(
                f"phenotype column {column!r} ({cat}) is not an obs column of {where}; available: {list(obs.columns)}."
            )
        values = obs[column]
        if values.isna().any():
            raise DataError(
                f"obs[{column!r}] has missing values in {int(values.isna().sum())} selected cells; PerturbGene "
                "needs a phenotype for every cell: fill them or leave the category out of phenotype_columns."
            )
        tokens = values.astype(object).map(phenotype_token).to_numpy()
        missing = sorted({t for t in tokens if t not in vocab})
        if missing:
            raise DataError(
                f"{len(missing)} phenotype token(s) of obs[{column!r}] are not in the vocabulary: {missing[:20]}. "
                "The model only knows the phenotypes it was trained with; map the values to those, or leave "
                f"{cat!r} out of phenotype_columns."
            )
        out[:, j] = [vocab[t] for t in tokens]
    return out


# ================================================================================ the scheme
def run(ctx: Any) -> Iterator[TokenizedCells]:
    """Tokenize every source of ``ctx`` (see :func:`cellkit.tokenize` and the module docstring)."""
    from cellkit.data.tokenize import check_values

    o = ctx.options
    vocab: GeneVocab = ctx.vocab
    for role in ("cls", "eos"):
        if role not in vocab.specials:
            raise DataError(
                f"The vocabulary has no {role!r} token (specials: {vocab.specials or 'none'}); PerturbGene "
                "sequences are [CLS] … [EOS]. Build the vocabulary with perturbgene_vocab()."
            )
    specials = ctx.specials()
    cls_id, eos_id = specials["cls"], specials["eos"]
    edges = _bin_edges(o, ctx.input_spec, ctx.resources)
    n_bins = len(edges)
    missing_bins = [f"bin_{k}" for k in range(1, n_bins + 1) if f"bin_{k}" not in vocab]
    if missing_bins:
        raise DataError(
            f"{len(edges)} bin edges make bins 1 … {n_bins}, but the vocabulary lacks {missing_bins[:10]}; "
            "use the edges the model was trained with."
        )
    bin_ids = vocab.lookup([f"bin_{k}" for k in range(n_bins + 1)], unknown="missing")  # bin_0: -1 if absent
    pairs = _phenotypes(o)
    categories = _categories(o, ctx.resources, [c for c, _ in pairs], ctx.notes)
    pheno_types = np.array([1 + categories.index(c) for c, _ in pairs], dtype=np.int64)
    offset = 1 + len(categories)
    genes = _gene_list(ctx.resources, o)
    ctx.notes.append(f"gene coverage counts the genes of the model's gene list ({len(genes):,} genes)")
    max_length = o["max_length"]
    if max_length is None:
        max_length = ctx.input_spec.max_length
    n_fixed = 2 + len(pairs)
    if max_length is not None and (
        isinstance(max_length, (bool, np.bool_))
        or not isinstance(max_length, (int, np.integer))
        or max_length < n_fixed
    ):
        raise DataError(
            f"max_length must be an integer >= {n_fixed} ([CLS], {len(pairs)} phenotype token(s), [EOS]) or None, "
            f"got {max_length!r}."
        )
    budget = None if max_length is None else int(max_length) - n_fixed
    gene_order = o["gene_order"]
    if gene_order not in ("column", "gene_list"):
        raise DataError(f"gene_order must be 'column' or 'gene_list', got {gene_order!r}.")
    ctx.options.update(
        {
            "max_length": None if max_length is None else int(max_length),
            "bin_edges": edges.tolist(),
            "bin_edges_file": None if o["bin_edges_file"] is None else os.fspath(o["bin_edges_file"]),
            "phenotype_columns": [c for c, _ in pairs]
            if not isinstance(o["phenotype_columns"], Mapping)
            else dict(pairs),
            "phenotype_categories": categories,
            "genes": None if o["genes"] is None else genes,
            "gene_type_offset": offset,
            "n_gene_types": len(genes),
            "num_bins": n_bins,
            "bin_0_id": None if bin_ids[0] < 0 else int(bin_ids[0]),
            "vocab_size": len(vocab),
        }
    )
    for src, match in ctx.sources:
        prefix = _phenotype_tokens(src.obs.iloc[src.rows], pairs, vocab, src.name)
        cols = match.columns
        gene_index = match.token_ids[cols]
        if gene_order == "gene_list":
            by_gene = np.argsort(gene_index, kind="stable")
            cols, gene_index = cols[by_gene], gene_index[by_gene]
        done = 0
        with ctx.pbar(len(src.rows), f"tokenizing ({src.name})") as bar:
            for idx, block in src.chunks(ctx.chunk_size):
                x = block[:, cols].tocsr()
                check_values(x.data, where=src.name)
                x.eliminate_zeros()
                x.sort_indices()
                part = _tokens_for_block(
                    x, gene_index, prefix[done : done + len(idx)], pheno_types, bin_ids, edges,
                    cls_id=cls_id, eos_id=eos_id, offset=offset, budget=budget,
                )  # fmt: skip
                ctx.stamp(part, src, idx, scheme="perturbgene", pad_value=0.0)
                done += len(idx)
                bar.update(len(idx))
                yield part


def _tokens_for_block(
    x: Any,
    gene_index: np.ndarray,
    prefix: np.ndarray,
    pheno_types: np.ndarray,
    bin_ids: np.ndarray,
    edges: np.ndarray,
    *,
    cls_id: int,
    eos_id: int,
    offset: int,
    budget: int | None,
) -> TokenizedCells:
    n_rows = x.shape[0]
    counts = np.diff(x.indptr).astype(np.int64)
    rows = np.repeat(np.arange(n_rows), counts)
    bins = np.digitize(x.data, edges)
    keep = bins > 0
    rows, cols, bins = rows[keep], x.indices[keep], bins[keep]
    per_row = np.bincount(rows, minlength=n_rows).astype(np.int64)
    within = np.arange(len(rows), dtype=np.int64) - np.concatenate([[0], np.cumsum(per_row)[:-1]])[rows]
    if budget is not None:
        keep = within < budget
        rows, cols, bins, within = rows[keep], cols[keep], bins[keep], within[keep]
        per_row = np.minimum(per_row, budget)
    n_prefix = 1 + prefix.shape[1]
    lengths = n_prefix + per_row + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts = offsets[:-1]
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    types = np.zeros(int(offsets[-1]), dtype=np.int32)
    ids[starts] = cls_id
    if prefix.shape[1]:
        at = (starts[:, None] + 1 + np.arange(prefix.shape[1])[None, :]).ravel()
        ids[at] = prefix.ravel()
        types[at] = np.tile(pheno_types, n_rows)
    at = starts[rows] + n_prefix + within
    ids[at] = bin_ids[bins]
    types[at] = offset + gene_index[cols]
    ids[offsets[1:] - 1] = eos_id
    return TokenizedCells(ids, offsets, token_type_ids=types)
