"""Gene resolution: map a dataset's genes (symbols, Ensembl ids, versioned Ensembl ids) to tokens.

Nothing is dropped silently: :class:`GeneMatch` records, for every input gene, the token it got
(or ``-1``) and why, and its :attr:`GeneMatch.coverage` is what the tokenizers report and the
studio shows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from .._errors import DataError
from .vocab import Coverage, GeneVocab

__all__ = ["GeneMatch", "resolve_genes"]

_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$", re.IGNORECASE)

Duplicates = Literal["keep", "sum", "first"]


@dataclass
class GeneMatch:
    """How the columns of a dataset map onto a vocabulary.

    Attributes
    ----------
    names
        ``(n_vars,)`` the gene identifiers looked up (after optional mapping).
    token_ids
        ``(n_vars,)`` int64 token id per column, ``-1`` when the gene is not in the vocabulary.
    coverage
        Matched / unmatched counts with examples.
    duplicates
        How columns sharing one token are treated: ``"keep"`` (each column is its own token
        occurrence, as scGPT), ``"sum"`` (their values are added, as Geneformer collapses Ensembl
        ids) or ``"first"``.
    n_version_stripped
        Columns matched only after removing an Ensembl version suffix (``ENSG….7``).
    n_case_folded
        Columns matched only after upper-casing.
    """

    names: np.ndarray
    token_ids: np.ndarray
    coverage: Coverage
    duplicates: Duplicates = "keep"
    n_version_stripped: int = 0
    n_case_folded: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> np.ndarray:
        """Indices of the columns that are used (matched, and not dropped as duplicates)."""
        used = self.token_ids >= 0
        if self.duplicates == "first":
            _, first = np.unique(self.token_ids[used], return_index=True)
            keep = np.zeros(len(self.token_ids), dtype=bool)
            keep[np.flatnonzero(used)[first]] = True
            return np.flatnonzero(keep)
        return np.flatnonzero(used)

    @property
    def n_duplicated(self) -> int:
        """Columns whose token another column already has."""
        ids = self.token_ids[self.token_ids >= 0]
        return int(len(ids) - len(np.unique(ids)))

    def summary(self) -> str:
        text = str(self.coverage)
        if self.n_version_stripped:
            text += f"; {self.n_version_stripped:,} matched after stripping Ensembl version suffixes"
        if self.n_case_folded:
            text += f"; {self.n_case_folded:,} matched after upper-casing"
        if self.n_duplicated:
            text += f"; {self.n_duplicated:,} columns share a token with another column ({self.duplicates})"
        return text


def resolve_genes(
    genes: Sequence[str] | pd.Index | np.ndarray,
    vocab: GeneVocab,
    *,
    mapping: Mapping[str, str] | None = None,
    strip_versions: bool = True,
    case_fold: bool = True,
    duplicates: Duplicates = "keep",
) -> GeneMatch:
    """Map gene identifiers to vocabulary token ids.

    Parameters
    ----------
    genes
        ``(n_vars,)`` identifiers (``var_names`` or a ``var`` column).
    vocab
        The model's vocabulary. Special tokens never match a gene.
    mapping
        Optional identifier → vocabulary-token table applied first (e.g. Geneformer's Ensembl
        mapping dictionary, or symbol → Ensembl id); identifiers absent from it are looked up
        as they are.
    strip_versions
        Retry ``ENSG00000123456.7`` as ``ENSG00000123456``.
    case_fold
        Retry the upper-cased identifier.
    duplicates
        See :class:`GeneMatch`.

    Returns
    -------
    :class:`GeneMatch`
    """
    if duplicates not in ("keep", "sum", "first"):
        raise DataError(f"duplicates must be 'keep', 'sum' or 'first', got {duplicates!r}.")
    names = np.asarray(pd.Index(genes).astype(str))
    if mapping:
        names = np.array([mapping.get(g, g) for g in names], dtype=object).astype(str)
    specials = set(vocab.specials.values())
    stoi = vocab.to_dict()
    lookup = {t: i for t, i in stoi.items() if t not in specials}
    ids = np.fromiter((lookup.get(g, -1) for g in names), dtype=np.int64, count=len(names))
    n_version = n_case = 0
    if strip_versions or case_fold:
        upper = {t.upper(): i for t, i in lookup.items()} if case_fold else {}
        for j in np.flatnonzero(ids < 0):
            g = names[j]
            if strip_versions:
                m = _VERSIONED.match(g)
                if m and m.group(1) in lookup:
                    ids[j] = lookup[m.group(1)]
                    n_version += 1
                    continue
                if m and case_fold and m.group(1).upper() in upper:
                    ids[j] = upper[m.group(1).upper()]
                    n_version += 1
                    continue
            if case_fold and g.upper() in upper:
                ids[j] = upper[g.upper()]
                n_case += 1
    hit = ids >= 0
    matched = [str(g) for g in names[hit][:10]]
    unmatched = [str(g) for g in names[~hit][:10]]
    coverage = Coverage(len(names), int(hit.sum()), tuple(matched), tuple(unmatched))
    return GeneMatch(names, ids, coverage, duplicates, n_version, n_case)


def require_overlap(match: GeneMatch, vocab: GeneVocab, *, what: str = "the data") -> None:
    """Raise a clear :class:`DataError` when no gene of ``what`` is in the vocabulary."""
    if match.coverage.n_matched:
        return
    vocab_examples = [t for t in vocab.tokens[:50] if not vocab.is_special(t)][:5]
    raise DataError(
        f"None of the {match.coverage.n_genes:,} genes of {what} is in the model's vocabulary. "
        f"Data genes look like {list(match.coverage.unmatched_examples[:5])}; vocabulary genes look like "
        f"{vocab_examples}. Pick the var column holding the identifier type the model uses (gene_column=...), "
        "or map symbols to Ensembl ids first."
    )
