"""Gene vocabulary: token ↔ id, special tokens, explicit handling of unknown genes.

Stored as a flat JSON object ``{token: id}`` (the layout scGPT's ``vocab.json`` uses), read
sorted by id with a contiguity check. Unlike scGPT, an unknown gene never silently becomes
``<pad>``: lookups raise, drop or return ``-1`` as the caller chooses, and :meth:`GeneVocab.coverage`
reports what matched.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cellkit._errors import UnknownGeneError, VocabError
from cellkit._utils import atomic_write_text
from cellkit._utils._json import read_json

__all__ = ["SPECIAL_ROLES", "Coverage", "GeneVocab", "unknown_gene_error"]

#: Roles a special token can play; models name their own tokens for each role.
SPECIAL_ROLES = ("pad", "cls", "eos", "mask", "unk", "sep")


@dataclass(frozen=True)
class Coverage:
    """How many of a dataset's genes the vocabulary knows.

    Attributes
    ----------
    n_genes
        Genes asked about.
    n_matched
        Genes found in the vocabulary.
    matched_examples, unmatched_examples
        Up to ten examples of each.
    """

    n_genes: int
    n_matched: int
    matched_examples: tuple[str, ...] = field(default_factory=tuple)
    unmatched_examples: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_unmatched(self) -> int:
        return self.n_genes - self.n_matched

    @property
    def fraction(self) -> float:
        return self.n_matched / self.n_genes if self.n_genes else 0.0

    def __str__(self) -> str:
        text = f"{self.n_matched:,} of {self.n_genes:,} genes in the vocabulary ({self.fraction:.1%})"
        if self.unmatched_examples:
            text += f"; not found, e.g. {', '.join(self.unmatched_examples[:5])}"
        return text


class GeneVocab:
    """An immutable gene/token vocabulary.

    Parameters
    ----------
    tokens
        Tokens in id order (token ``i`` has id ``i``). Must be unique.
    specials
        Role → token for the special tokens this model uses, e.g.
        ``{"pad": "<pad>", "cls": "<cls>"}``. Every named token must be in ``tokens``.

    Examples
    --------
    >>> v = GeneVocab(["CD3E", "MS4A1", "<pad>", "<cls>"], specials={"pad": "<pad>", "cls": "<cls>"})
    >>> v["MS4A1"], v.pad_id, len(v)
    (1, 2, 4)
    """

    def __init__(self, tokens: Sequence[str], *, specials: Mapping[str, str] | None = None) -> None:
        self._itos = [str(t) for t in tokens]
        self._stoi = {t: i for i, t in enumerate(self._itos)}
        if len(self._stoi) != len(self._itos):
            seen: set[str] = set()
            dups = [t for t in self._itos if t in seen or seen.add(t)]
            raise VocabError(
                f"Duplicate tokens in vocabulary: {sorted(set(dups))[:10]}. Each gene must appear once."
            )
        self._specials: dict[str, str] = {}
        for role, token in (specials or {}).items():
            if role not in SPECIAL_ROLES:
                raise VocabError(f"Unknown special-token role {role!r}; known roles are {SPECIAL_ROLES}.")
            if token not in self._stoi:
                raise VocabError(f"Special token {token!r} (role {role!r}) is not in the vocabulary.")
            self._specials[role] = token
        self._array: np.ndarray | None = None

    # ------------------------------------------------------------------ construction / I/O
    @classmethod
    def from_dict(cls, mapping: Mapping[str, int], *, specials: Mapping[str, str] | None = None) -> GeneVocab:
        """Build from ``{token: id}``; ids must be exactly ``0 … n-1`` (any key order).

        Checked in time and memory proportional to the number of entries: an id outside
        ``0 … n-1`` is refused (naming its token) before anything of the id's size is allocated.
        """
        if not mapping:
            raise VocabError("The vocabulary is empty.")
        n = len(mapping)
        itos: list[str | None] = [None] * n
        for token, idx in mapping.items():
            if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
                raise VocabError(f"Token {token!r} has a non-integer id {idx!r}.")
            i = int(idx)
            if not 0 <= i < n:
                raise VocabError(
                    f"Vocabulary ids are not contiguous from 0: token {token!r} has id {i}, but {n:,} tokens "
                    f"must use the ids 0 … {n - 1:,}, each once."
                )
            if itos[i] is not None:
                raise VocabError(
                    f"Duplicate ids in vocabulary: {i} is used by {itos[i]!r} and {token!r}. "
                    "Every token needs its own id."
                )
            itos[i] = str(token)
        return cls([t for t in itos if t is not None], specials=specials)

    @classmethod
    def from_json(
        cls, path: str | os.PathLike[str], *, specials: Mapping[str, str] | None = None
    ) -> GeneVocab:
        """Read a ``{token: id}`` JSON file (e.g. scGPT's ``vocab.json``)."""
        path = Path(path)
        data = read_json(path, what="vocabulary file", expect=dict, error=VocabError)
        try:
            return cls.from_dict(data, specials=specials)
        except VocabError as exc:
            raise VocabError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, int]:
        """``{token: id}`` in id order."""
        return dict(self._stoi)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write ``{token: id}`` (indent 2) atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __iter__(self):
        return iter(self._itos)

    def __getitem__(self, token: str) -> int:
        try:
            return self._stoi[token]
        except KeyError:
            raise UnknownGeneError(f"{token!r} is not in the vocabulary ({len(self):,} tokens).") from None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, GeneVocab) and self._itos == other._itos and self._specials == other._specials
        )

    def __hash__(self) -> int:
        return hash((tuple(self._itos), tuple(sorted(self._specials.items()))))

    def __repr__(self) -> str:
        sp = ", ".join(f"{r}={t}" for r, t in self._specials.items())
        return f"GeneVocab({len(self):,} tokens; specials: {sp or 'none'})"

    @property
    def tokens(self) -> list[str]:
        """Tokens in id order (a copy)."""
        return list(self._itos)

    def token(self, idx: int) -> str:
        """Token with id ``idx``."""
        if not 0 <= idx < len(self._itos):
            raise UnknownGeneError(f"Token id {idx} is outside the vocabulary (0 … {len(self) - 1}).")
        return self._itos[idx]

    @property
    def specials(self) -> dict[str, str]:
        """Role → token of the special tokens."""
        return dict(self._specials)

    def special_id(self, role: str) -> int:
        """Id of the special token for ``role``; a clear error when the model has none."""
        if role not in self._specials:
            raise VocabError(f"This vocabulary has no {role!r} token (specials: {self._specials or 'none'}).")
        return self._stoi[self._specials[role]]

    @property
    def pad_id(self) -> int:
        return self.special_id("pad")

    @property
    def cls_id(self) -> int:
        return self.special_id("cls")

    @property
    def special_ids(self) -> list[int]:
        """Ids of every special token."""
        return sorted(self._stoi[t] for t in self._specials.values())

    def is_special(self, token: str) -> bool:
        return token in self._specials.values()

    def unknown_gene_error(
        self, missing: str | Iterable[str], *, where: str = "the model's vocabulary"
    ) -> UnknownGeneError:
        """The error for genes not in this vocabulary, with close matches among its genes.

        See :func:`unknown_gene_error` (special tokens are never suggested).
        """
        special = set(self._specials.values())
        return unknown_gene_error(missing, (t for t in self._itos if t not in special), where=where)

    def lookup(self, genes: Iterable[str], *, unknown: Literal["error", "missing"] = "error") -> np.ndarray:
        """Ids of ``genes`` as an int64 array.

        Parameters
        ----------
        genes
            Gene names (any iterable of str).
        unknown
            ``"error"`` raises :class:`~cellkit.UnknownGeneError` listing examples;
            ``"missing"`` returns ``-1`` for unknown genes (never a real token id).
        """
        genes = [str(g) for g in genes]
        ids = np.fromiter((self._stoi.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))
        if unknown == "error" and (ids < 0).any():
            bad = [g for g, i in zip(genes, ids) if i < 0]
            raise UnknownGeneError(
                f"{len(bad):,} of {len(genes):,} genes are not in the vocabulary, e.g. {bad[:5]}. "
                "Map gene names to the model's vocabulary (symbols vs Ensembl ids?) or pass unknown='missing'."
            )
        return ids

    def coverage(self, genes: Iterable[str]) -> Coverage:
        """Report how many of ``genes`` are in the vocabulary (specials do not count)."""
        genes = [str(g) for g in genes]
        hit = [g for g in genes if g in self._stoi and not self.is_special(g)]
        hit_set = set(hit)
        miss = [g for g in genes if g not in hit_set]
        return Coverage(len(genes), len(hit), tuple(hit[:10]), tuple(miss[:10]))

    def with_specials(self, specials: Mapping[str, str], *, append_missing: bool = False) -> GeneVocab:
        """Copy with other special roles; ``append_missing`` adds absent special tokens at the end."""
        tokens = list(self._itos)
        if append_missing:
            tokens += [t for t in dict.fromkeys(specials.values()) if t not in self._stoi]
        return GeneVocab(tokens, specials=specials)


#: how many unknown genes an error names, and how many close matches each gets
_SHOW_UNKNOWN, _SHOW_CLOSE = 3, 3


def unknown_gene_error(
    missing: str | Iterable[str], known: Iterable[str], *, where: str = "the model's vocabulary"
) -> UnknownGeneError:
    """The one "unknown gene, did you mean" error of cellkit.

    Parameters
    ----------
    missing
        The gene name(s) that were not found (the first three are named).
    known
        The names that would have been accepted; close matches are drawn from them (a match
        differing only in case first, then :func:`difflib.get_close_matches`).
    where
        What was searched, completing "not in …" (e.g. ``"the model's vocabulary"``,
        ``"the gene embeddings"``).

    Returns
    -------
    UnknownGeneError
        To raise: ``raise unknown_gene_error(missing, known, where=...)``. Its message reads
        ``2 genes not in the model's vocabulary: 'CD3X' (did you mean ['CD3E', 'CD3G']?), 'FOO'.``
    """
    names = [missing] if isinstance(missing, str) else [str(g) for g in missing]
    pool = [str(k) for k in known]
    by_lower: dict[str, list[str]] = {}
    for k in pool:
        by_lower.setdefault(k.lower(), []).append(k)
    examples = []
    for g in names[:_SHOW_UNKNOWN]:
        close = [*by_lower.get(g.lower(), []), *difflib.get_close_matches(g, pool, n=_SHOW_CLOSE)]
        close = list(dict.fromkeys(c for c in close if c != g))[:_SHOW_CLOSE]
        examples.append(f"{g!r}" + (f" (did you mean {close}?)" if close else ""))
    more = f", … ({len(names) - _SHOW_UNKNOWN:,} more)" if len(names) > _SHOW_UNKNOWN else ""
    subject = "Gene" if len(names) == 1 else f"{len(names):,} genes"
    return UnknownGeneError(
        f"{subject} not in {where}: {', '.join(examples)}{more}. Gene names must match exactly "
        "(symbols vs Ensembl ids?)."
    )
