"""Gene resolution: map a dataset's genes (symbols, Ensembl ids, versioned Ensembl ids) to tokens.

Nothing is dropped silently: :class:`GeneMatch` records, for every input gene, the token it got
(or ``-1``) and why, and its :attr:`GeneMatch.coverage` is what the tokenizers report and the
studio shows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from .._errors import DataError
from .vocab import Coverage, GeneVocab

__all__ = ["RULES", "GeneMatch", "matching_options", "resolve_genes", "rules_report"]

_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$", re.IGNORECASE)

Duplicates = Literal["keep", "sum", "first"]

#: the matching rules, in the order they are tried, as the coverage report names them
RULES = ("exact", "mapping table", "version stripped", "case folded")


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
    notes
        Free-text remarks for the coverage report.
    n_mapped
        Columns matched through the ``mapping`` table (the mapped identifier was a token).
    missed
        Unmatched columns that a retry which was turned off would have matched, by rule
        (``{"case folded": 3}``): what ``case_fold=True`` / ``strip_versions=True`` would add.
    """

    names: np.ndarray
    token_ids: np.ndarray
    coverage: Coverage
    duplicates: Duplicates = "keep"
    n_version_stripped: int = 0
    n_case_folded: int = 0
    notes: list[str] = field(default_factory=list)
    n_mapped: int = 0
    missed: dict[str, int] = field(default_factory=dict)
    #: built by :func:`resolve_genes` (its rule counts are meaningful for the coverage report)
    by_rules: bool = False

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

    @property
    def rule_counts(self) -> dict[str, int]:
        """Matched columns per rule (:data:`RULES`): exact, mapping table, version stripped, case folded."""
        retried = self.n_mapped + self.n_version_stripped + self.n_case_folded
        return {
            "exact": self.coverage.n_matched - retried,
            "mapping table": self.n_mapped,
            "version stripped": self.n_version_stripped,
            "case folded": self.n_case_folded,
        }

    def rules_summary(self) -> str:
        """One line: how many genes each rule matched, and what a disabled retry would add."""
        counts = self.rule_counts
        text = "genes matched by rule: " + ", ".join(f"{counts[r]:,} {r}" for r in RULES)
        hints = {"case folded": "case_fold=True", "version stripped": "strip_versions=True"}
        extra = [f"{n:,} more with {hints.get(r, r)}" for r, n in self.missed.items() if n]
        if extra:
            text += f" ({'; '.join(extra)})"
        return text

    def summary(self) -> str:
        text = str(self.coverage)
        if self.n_version_stripped:
            text += f"; {self.n_version_stripped:,} matched after stripping Ensembl version suffixes"
        if self.n_case_folded:
            text += f"; {self.n_case_folded:,} matched after upper-casing"
        if self.n_duplicated:
            text += f"; {self.n_duplicated:,} columns share a token with another column ({self.duplicates})"
        return text


def matching_options(options: Mapping[str, Any], *, compat: bool) -> dict[str, bool]:
    """The gene-matching retries a scheme's options ask for.

    ``case_fold`` and ``strip_versions`` left at ``None`` are off in ``compat`` mode (the original
    tokenizer keeps a gene only when its name is exactly a vocabulary token) and on otherwise.

    Raises
    ------
    DataError
        When either option is given as something other than ``True``, ``False`` or ``None``.
    """
    out = {}
    for key in ("case_fold", "strip_versions"):
        value = options.get(key)
        if value is None:
            value = not compat
        if not isinstance(value, (bool, np.bool_)):
            raise DataError(
                f"{key} must be True, False or None (off in compat mode, else on), got {value!r}."
            )
        out[key] = bool(value)
    return out


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

    Rules, in order (the first that finds a token wins; :attr:`GeneMatch.rule_counts` reports how
    many columns each matched): the ``mapping`` table, then the identifier exactly as it is, then
    (``strip_versions``) without an Ensembl version suffix, then (``case_fold``) upper-cased.
    With both retries off a gene is kept only when its name is exactly a token, as scGPT does
    (``gene in vocab``); every column is looked up on its own, so a name that appears twice gives
    two columns with one token (scGPT keeps both).

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
        Retry the upper-cased identifier against the upper-cased tokens (``ZHX1-C8ORF76`` then
        matches the token ``ZHX1-C8orf76``).
    duplicates
        See :class:`GeneMatch`.

    Returns
    -------
    :class:`GeneMatch`; its ``missed`` counts what a retry that is off would have matched.
    """
    if duplicates not in ("keep", "sum", "first"):
        raise DataError(f"duplicates must be 'keep', 'sum' or 'first', got {duplicates!r}.")
    names = np.asarray(pd.Index(genes).astype(str))
    specials = set(vocab.specials.values())
    stoi = vocab.to_dict()
    lookup = {t: i for t, i in stoi.items() if t not in specials}
    changed = np.zeros(len(names), dtype=bool)
    if mapping:
        mapped = np.array([mapping.get(g, g) for g in names], dtype=object).astype(str)
        changed = mapped != names
        names = mapped
    ids = np.fromiter((lookup.get(g, -1) for g in names), dtype=np.int64, count=len(names))
    n_mapped = int((changed & (ids >= 0)).sum())  # the mapping table gave a token exactly
    counts = {"version stripped": 0, "case folded": 0}
    missed = {"version stripped": 0, "case folded": 0}
    upper = {t.upper(): i for t, i in lookup.items()}
    for j in np.flatnonzero(ids < 0):
        rule, token, would = _retry(str(names[j]), lookup, upper, strip_versions, case_fold)
        if rule is not None:
            ids[j] = token
            counts[rule] += 1
        elif would is not None:
            missed[would] += 1
    hit = ids >= 0
    matched = [str(g) for g in names[hit][:10]]
    unmatched = [str(g) for g in names[~hit][:10]]
    coverage = Coverage(len(names), int(hit.sum()), tuple(matched), tuple(unmatched))
    return GeneMatch(
        names,
        ids,
        coverage,
        duplicates,
        counts["version stripped"],
        counts["case folded"],
        n_mapped=n_mapped,
        missed={k: v for k, v in missed.items() if v},
        by_rules=True,
    )


def rules_report(matches: Sequence[GeneMatch]) -> str | None:
    """:meth:`GeneMatch.rules_summary` over several sources (``None`` when none was built by rules)."""
    ruled = [m for m in matches if m.by_rules]
    if not ruled:
        return None
    total = GeneMatch(
        np.zeros(0, dtype=str),
        np.zeros(0, dtype=np.int64),
        Coverage(sum(m.coverage.n_genes for m in ruled), sum(m.coverage.n_matched for m in ruled)),
        n_version_stripped=sum(m.n_version_stripped for m in ruled),
        n_case_folded=sum(m.n_case_folded for m in ruled),
        n_mapped=sum(m.n_mapped for m in ruled),
        missed={r: sum(m.missed.get(r, 0) for m in ruled) for r in RULES},
    )
    return total.rules_summary()


def _retry(
    name: str, lookup: Mapping[str, int], upper: Mapping[str, int], strip_versions: bool, case_fold: bool
) -> tuple[str | None, int, str | None]:
    """Retry an unmatched name: ``(rule, token, None)``, or ``(None, -1, rule a disabled retry would use)``."""
    m = _VERSIONED.match(name)
    base = m.group(1) if m else None
    if base is not None and strip_versions:
        if base in lookup:
            return "version stripped", lookup[base], None
        if case_fold and base.upper() in upper:
            return "version stripped", upper[base.upper()], None
    if case_fold and name.upper() in upper:
        return "case folded", upper[name.upper()], None
    # nothing matched: would a retry that is off have found a token?
    if base is not None and not strip_versions and (base in lookup or base.upper() in upper):
        return None, -1, "version stripped"
    if not case_fold and (name.upper() in upper or (base is not None and base.upper() in upper)):
        return None, -1, "case folded"
    return None, -1, None


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
