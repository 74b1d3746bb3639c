"""Gene resolution: map a dataset's genes (symbols, Ensembl ids, versioned Ensembl ids, outdated
symbols, mouse genes) to tokens.

Nothing is dropped silently: :class:`GeneMatch` records, for every input gene, the token it got
(or ``-1``) and the rule that matched it (:data:`RULES`), and its :attr:`GeneMatch.coverage` is
what the tokenizers report and the studio shows. :func:`cellkit.genes.coverage_report` weighs the
unmatched genes by their expression.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from .._errors import DataError
from .vocab import Coverage, GeneVocab

__all__ = [
    "DUPLICATES",
    "RULES",
    "GeneMatch",
    "collisions",
    "detect_species",
    "matching_options",
    "resolve_genes",
    "rules_report",
]

_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$", re.IGNORECASE)

Duplicates = Literal["keep", "sum", "first", "refuse"]
#: what happens when several columns resolve to one token (see :class:`GeneMatch`)
DUPLICATES = ("keep", "sum", "first", "refuse")
Species = Literal["auto", "human", "mouse"]

#: the matching rules, as the coverage report names them, in the order they are tried for human
#: data: the name as it is, the model's own mapping files (Geneformer's dictionaries, or
#: ``mapping=``), the shipped GENCODE symbol <-> Ensembl id tables (current, then outdated symbols),
#: the Ensembl id without its version, the upper-cased name, and (mouse data) the one-to-one human
#: ortholog — tried right after the model's mapping for mouse data.
RULES = (
    "exact",
    "model mapping",
    "gene table",
    "outdated symbol",
    "version stripped",
    "case folded",
    "ortholog",
)
#: the option that turns each retry on, for "N more with ..." hints
_HINTS = {
    "version stripped": "strip_versions=True",
    "case folded": "case_fold=True",
    "gene table": "gene_tables=True",
    "outdated symbol": "gene_tables=True",
    "ortholog": "orthologs=True",
}
#: options of :func:`matching_options`, each off in compat mode and on otherwise when left at None
_RETRIES = ("case_fold", "strip_versions", "gene_tables", "orthologs")


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
        ids), ``"first"`` (the first column is used) or ``"refuse"`` (an error naming the genes;
        :func:`resolve_genes` raises it).
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
        (``{"case folded": 3}``): what ``case_fold=True`` / ``strip_versions=True`` /
        ``gene_tables=True`` / ``orthologs=True`` would add.
    rules
        ``(n_vars,)`` the rule (:data:`RULES`) that matched each column, ``""`` when none did;
        ``None`` for matches built without rules.
    species
        The species the genes were read as (``"human"`` / ``"mouse"``), when detected.
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
    rules: np.ndarray | None = None
    species: str | None = None

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
        """Matched columns per rule (:data:`RULES`)."""
        if self.rules is not None:
            used = self.rules[self.token_ids >= 0]
            counts = {r: int((used == r).sum()) for r in RULES}
            counts["exact"] += int(len(used) - sum(counts.values()))  # columns a scheme matched itself
            return counts
        retried = self.n_mapped + self.n_version_stripped + self.n_case_folded
        counts = dict.fromkeys(RULES, 0)
        counts.update(
            {
                "exact": self.coverage.n_matched - retried,
                "model mapping": self.n_mapped,
                "version stripped": self.n_version_stripped,
                "case folded": self.n_case_folded,
            }
        )
        return counts

    def rules_summary(self) -> str:
        """One line: how many genes each rule matched, and what a disabled retry would add."""
        counts = self.rule_counts
        text = "genes matched by rule: " + ", ".join(f"{counts[r]:,} {r}" for r in RULES)
        extra: dict[str, int] = {}
        for r, n in self.missed.items():
            if n:
                extra[_HINTS.get(r, r)] = extra.get(_HINTS.get(r, r), 0) + n
        if extra:
            text += f" ({'; '.join(f'{n:,} more with {h}' for h, n in extra.items())})"
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


def collisions(
    match: GeneMatch, vocab: GeneVocab | None = None, *, limit: int | None = None
) -> dict[str, list[str]]:
    """Tokens that several columns resolved to: ``{token: [data gene, …]}`` (first ``limit`` tokens).

    Parameters
    ----------
    match
        A :class:`GeneMatch`.
    vocab
        To name the tokens (else their ids as text).
    limit
        Stop after this many tokens (``None``: all).
    """
    ids = match.token_ids
    used = np.flatnonzero(ids >= 0)
    uniq, counts = np.unique(ids[used], return_counts=True)
    out: dict[str, list[str]] = {}
    for t in uniq[counts > 1][:limit]:
        key = vocab.token(int(t)) if vocab is not None else str(int(t))
        out[key] = [str(match.names[j]) for j in used[ids[used] == t]]
    return out


def refuse_collisions(match: GeneMatch, vocab: GeneVocab | None = None) -> None:
    """Raise a :class:`DataError` naming the genes that share a token (``duplicates="refuse"``)."""
    if not match.n_duplicated:
        return
    found = collisions(match, vocab, limit=5)
    text = "; ".join(f"{', '.join(g)} -> {t}" for t, g in found.items())
    raise DataError(
        f"{match.n_duplicated:,} data genes resolve to a token another gene already has ({text}"
        f"{', …' if match.n_duplicated > len(found) else ''}) and duplicates='refuse'. Drop or merge those "
        "columns first, or pass duplicates='sum' (add their values, as Geneformer does), 'first' or 'keep'."
    )


def matching_options(options: Mapping[str, Any], *, compat: bool) -> dict[str, bool]:
    """The gene-matching retries a scheme's options ask for.

    ``case_fold``, ``strip_versions``, ``gene_tables`` and ``orthologs`` left at ``None`` (or
    absent) are off in ``compat`` mode (the original tokenizer keeps a gene only when its name is
    exactly a vocabulary token) and on otherwise.

    Raises
    ------
    DataError
        When an option is given as something other than ``True``, ``False`` or ``None``.
    """
    out = {}
    for key in _RETRIES:
        value = options.get(key)
        if value is None:
            value = not compat
        if not isinstance(value, (bool, np.bool_)):
            raise DataError(
                f"{key} must be True, False or None (off in compat mode, else on), got {value!r}."
            )
        out[key] = bool(value)
    return out


def detect_species(names: Sequence[str] | pd.Index | np.ndarray) -> str:
    """``"mouse"`` when most recognisable identifiers are mouse genes (``ENSMUSG…`` ids or GENCODE
    M37 mouse symbols such as ``Cd3e``), else ``"human"``.

    Parameters
    ----------
    names
        ``(n,)`` gene identifiers (data genes or vocabulary tokens).
    """
    from ._gene_tables import gene_tables

    tables = gene_tables()
    n_mouse = n_human = 0
    for g in np.asarray(pd.Index(names).astype(str)):
        if g.startswith("ENSMUSG") or (
            not g.startswith("ENSG") and g in tables.mouse_symbols and g not in tables.human_ids
        ):
            n_mouse += 1
        elif g.startswith("ENSG") or g in tables.human_ids or g in tables.outdated_id:
            n_human += 1
    return "mouse" if n_mouse > n_human else "human"


def resolve_genes(
    genes: Sequence[str] | pd.Index | np.ndarray,
    vocab: GeneVocab,
    *,
    mapping: Mapping[str, str] | None = None,
    strip_versions: bool = True,
    case_fold: bool = True,
    duplicates: Duplicates = "keep",
    gene_tables: bool = True,
    orthologs: bool = True,
    species: Species = "auto",
) -> GeneMatch:
    """Map gene identifiers to vocabulary token ids.

    Rules, in order (the first that finds a token wins; :attr:`GeneMatch.rules` records it per
    column and :attr:`GeneMatch.rule_counts` counts them): the ``mapping`` table (the model's own
    mapping files), then the identifier exactly as it is, then (``strip_versions``) without an
    Ensembl version suffix, then (``case_fold``) upper-cased, then (``gene_tables``) through the
    shipped GENCODE 48 tables — a symbol to its Ensembl id and back, an outdated symbol to its
    gene's current names, and for a vocabulary of older symbols the outdated symbols of a current
    gene (each also with the version stripped / upper-cased when those retries are on); a symbol
    naming several genes that are all tokens matches none. For **mouse** data and a human
    vocabulary (``orthologs``) the one-to-one human ortholog of the mouse symbol or ``ENSMUSG`` id
    is tried right after the mapping, before any case folding. With every retry off a gene is
    kept only when its name is exactly a token, as scGPT does (``gene in vocab``); every column is
    looked up on its own, so a name that appears twice gives two columns with one token.

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
        ``"keep"``, ``"sum"``, ``"first"`` or ``"refuse"`` (raise, naming the genes that share a
        token); see :class:`GeneMatch`.
    gene_tables
        Retry through the shipped human symbol <-> Ensembl id tables (current and outdated symbols).
    orthologs
        For mouse data and a non-mouse vocabulary, retry through one-to-one human orthologs.
    species
        ``"auto"`` (mouse when most identifiers are mouse genes: ``ENSMUSG`` ids or mouse symbols),
        ``"human"`` or ``"mouse"``.

    Returns
    -------
    :class:`GeneMatch`; its ``missed`` counts what a retry that is off would have matched.

    Raises
    ------
    DataError
        An unknown ``duplicates`` or ``species``, or collisions with ``duplicates="refuse"``.
    """
    if duplicates not in DUPLICATES:
        raise DataError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}.")
    if species not in ("auto", "human", "mouse"):
        raise DataError(f"species must be 'auto', 'human' or 'mouse', got {species!r}.")
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
    rules = np.full(len(names), "", dtype=object)
    rules[ids >= 0] = "exact"
    rules[changed & (ids >= 0)] = "model mapping"  # the mapping table gave a token exactly
    todo = np.flatnonzero(ids < 0)
    species_used = None
    if len(todo) and (gene_tables or orthologs or species != "auto"):
        species_used = detect_species(names) if species == "auto" else species
    flags = (strip_versions, case_fold, gene_tables, orthologs, species_used)
    retry = _cached_retry(vocab, lookup, flags) if len(todo) else None
    missed = dict.fromkeys(RULES, 0)
    for j in todo:
        rule, token, would = retry(str(names[j]))
        if rule is not None:
            ids[j], rules[j] = token, rule
        elif would is not None:
            missed[would] += 1
    hit = ids >= 0
    matched = [str(g) for g in names[hit][:10]]
    unmatched = [str(g) for g in names[~hit][:10]]
    coverage = Coverage(len(names), int(hit.sum()), tuple(matched), tuple(unmatched))
    match = GeneMatch(
        names,
        ids,
        coverage,
        duplicates,
        int((rules == "version stripped").sum()),
        int((rules == "case folded").sum()),
        n_mapped=int((rules == "model mapping").sum()),
        missed={k: v for k, v in missed.items() if v},
        by_rules=True,
        rules=rules,
        species=species_used,
    )
    if duplicates == "refuse":
        refuse_collisions(match, vocab)
    return match


def rules_report(matches: Sequence[GeneMatch]) -> str | None:
    """:meth:`GeneMatch.rules_summary` over several sources (``None`` when none was built by rules)."""
    ruled = [m for m in matches if m.by_rules]
    if not ruled:
        return None
    total = GeneMatch(
        np.zeros(0, dtype=str),
        np.zeros(0, dtype=np.int64),
        Coverage(sum(m.coverage.n_genes for m in ruled), sum(m.coverage.n_matched for m in ruled)),
        missed={r: sum(m.missed.get(r, 0) for m in ruled) for r in RULES},
        rules=np.concatenate([_rules_of(m) for m in ruled]),
    )
    total.token_ids = np.zeros(len(total.rules), dtype=np.int64)
    return total.rules_summary()


def _rules_of(match: GeneMatch) -> np.ndarray:
    """The rule of each matched column (from the counts when the match has no per-column rules)."""
    if match.rules is not None:
        return match.rules[match.token_ids >= 0]
    return np.repeat(np.array(RULES, dtype=object), [match.rule_counts[r] for r in RULES])


#: vocabulary -> {(strip_versions, case_fold, gene_tables, orthologs, species): Retry}; the tokenizers
#: call resolve_genes once per block of cells (embed_cells, finetune): the retries are worked out once
_RETRIES_OF: weakref.WeakKeyDictionary[GeneVocab, dict[tuple, Retry]] = weakref.WeakKeyDictionary()
_RETRIES_LOCK = threading.Lock()


def _cached_retry(vocab: GeneVocab, lookup: Mapping[str, int], flags: tuple) -> Retry:
    """The :class:`Retry` for ``vocab`` and ``flags``, remembering its answers across calls."""
    with _RETRIES_LOCK:
        per_vocab = _RETRIES_OF.setdefault(vocab, {})
        retry = per_vocab.get(flags)
        if retry is None:
            strip_versions, case_fold, gene_tables, orthologs, species = flags
            retry = Retry(lookup, strip_versions=strip_versions, case_fold=case_fold, gene_tables=gene_tables,
                          orthologs=orthologs, memo=True)  # fmt: skip
            if species is not None:
                retry.set_species(species, vocab)
            per_vocab[flags] = retry
        return retry


class Retry:
    """The retries for one unmatched name: ``retry(name) -> (rule, token, None)`` or
    ``(None, -1, rule a retry that is off would have used)``.

    Parameters
    ----------
    lookup
        ``{name: token id}`` of the names that are tokens (no special tokens).
    strip_versions, case_fold, gene_tables, orthologs
        Which retries are on (see :func:`resolve_genes`).
    memo
        Remember each name's answer (for a retry used again with the same vocabulary).
    """

    def __init__(
        self,
        lookup: Mapping[str, int],
        *,
        strip_versions: bool,
        case_fold: bool,
        gene_tables: bool,
        orthologs: bool,
        memo: bool = False,
    ) -> None:
        self.memo: dict[str, tuple[str | None, int, str | None]] | None = {} if memo else None
        self.lookup = lookup
        self.upper = {t.upper(): i for t, i in lookup.items()}
        self.on = {"strip_versions": strip_versions, "case_fold": case_fold, "gene_tables": gene_tables,
                   "orthologs": orthologs}  # fmt: skip
        self.tables: Any = None
        self.mouse = False  # mouse data against a vocabulary that is not mouse: orthologs apply

    def set_species(self, species: str, vocab: GeneVocab | Sequence[str]) -> None:
        """Load the shipped tables; orthologs apply to mouse data against a non-mouse vocabulary."""
        from ._gene_tables import gene_tables

        self.tables = gene_tables()
        if species == "mouse":
            tokens = list(vocab.tokens) if isinstance(vocab, GeneVocab) else list(vocab)
            self.mouse = detect_species(tokens) != "mouse"

    def __call__(self, name: str) -> tuple[str | None, int, str | None]:
        if self.memo is None:
            return self._resolve(name)
        found = self.memo.get(name)
        if found is None:
            found = self.memo[name] = self._resolve(name)
        return found

    def _resolve(self, name: str) -> tuple[str | None, int, str | None]:
        on = self.on
        would = None
        if self.mouse:
            token = self._ortholog(name)
            if token >= 0:
                if on["orthologs"]:
                    return "ortholog", token, None
                would = "ortholog"
        rule, token, why = _retry(name, self.lookup, self.upper, on["strip_versions"], on["case_fold"])
        if rule is not None:
            return rule, token, None
        would = would or why
        if self.tables is not None:
            for variant, allowed in self._variants(name):
                rule, token = self._via_tables(variant)
                if rule is None:
                    continue
                if on["gene_tables"] and allowed:
                    return rule, token, None
                if would is None:  # the retry that is off and would have matched
                    blocked = "version stripped" if not on["strip_versions"] else "case folded"
                    would = rule if not on["gene_tables"] else blocked
        return None, -1, would

    def _variants(self, name: str) -> list[tuple[str, bool]]:
        """The spellings the tables are tried with, and whether the retries that are on allow each."""
        m = _VERSIONED.match(name)
        base = m.group(1) if m else None
        out = [(name, True)]
        if base is not None:
            out.append((base, self.on["strip_versions"]))
        out.append((name.upper(), self.on["case_fold"]))
        if base is not None:
            out.append((base.upper(), self.on["strip_versions"] and self.on["case_fold"]))
        return [(v, a) for i, (v, a) in enumerate(out) if v not in [w for w, _ in out[:i]]]

    def _via_tables(self, name: str) -> tuple[str | None, int]:
        """``(rule, token)`` of a human gene name through the shipped tables (``(None, -1)``: none)."""
        gene_ids, outdated = self.tables.human_gene(name)
        found: dict[int, bool] = {}
        for gid in gene_ids:
            names = self.tables.human_names(gid)
            for n in names:
                if n != name and n in self.lookup:
                    found.setdefault(self.lookup[n], outdated or n in self.tables.outdated_id)
                    break
            if len(found) > 1:
                break
        if len(found) != 1:  # nothing, or an ambiguous symbol naming several tokens
            return None, -1
        token, old = next(iter(found.items()))
        return ("outdated symbol" if old else "gene table"), token

    def _ortholog(self, name: str) -> int:
        """Token of the one-to-one human ortholog of a mouse gene (``-1``: none is a token)."""
        human = self.tables.mouse_gene(name)
        if human is None:
            return -1
        for n in self.tables.human_names(human):
            if n in self.lookup:
                return self.lookup[n]
        return -1


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
        "or map symbols to Ensembl ids first (outside mode='compat', or with gene_tables=True / orthologs=True, "
        "cellkit translates symbols, Ensembl ids, outdated symbols and mouse genes itself)."
    )
