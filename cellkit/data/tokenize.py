"""``cellkit.tokenize``: AnnData (in memory, backed, partitions, scBank, TileDB-SOMA) → model inputs.

One entry point for every model family. The scheme comes from the model (``scgpt``,
``geneformer``, ``perturbgene``; ``teddy`` on request) and each scheme documents its options.
The expression matrix is read in CSR row blocks and never densified; the caller's AnnData is
never modified. With ``output=`` the tokens stream into memory-mappable shards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._anndata import check_adata
from .._errors import DataError
from .._utils import Progress, get_logger, track
from .genes import GeneMatch, require_overlap, resolve_genes, rules_report
from .input_spec import InputSpec
from .sources import MatrixSource, anndata_source, h5ad_sources, scbank_sources
from .tokenized import ShardedTokens, ShardWriter, TokenizedCells
from .vocab import Coverage, GeneVocab

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from .soma import SomaSource

__all__ = ["SCHEMES", "TokenizeContext", "gene_totals", "scheme_options", "sum_duplicate_columns", "tokenize"]

log = get_logger(__name__)

SCHEMES = ("scgpt", "geneformer", "teddy", "perturbgene")


@dataclass
class TokenizeContext:
    """Everything a scheme needs (built by :func:`tokenize`; schemes never see AnnData).

    ``options`` are the scheme's options (the caller's over the defaults); ``input_spec`` is the
    model's :class:`~cellkit.InputSpec` (an empty one for a bare vocabulary), whose stated fields
    a scheme uses where the caller left an option at ``None``.
    """

    sources: list[tuple[MatrixSource, GeneMatch]]
    vocab: GeneVocab
    options: dict[str, Any]
    input_spec: InputSpec
    resources: dict[str, Any]
    obs_columns: list[str]
    chunk_size: int
    progress: Progress
    in_memory: bool
    notes: list[str] = field(default_factory=list)
    #: tokens go to shards as they are produced (``output=``): schemes keep memory per block
    streaming: bool = False

    @property
    def n_cells(self) -> int:
        return sum(s.n_cells for s, _ in self.sources)

    def specials(self) -> dict[str, int]:
        return {role: self.vocab[token] for role, token in self.vocab.specials.items()}

    def obs_frame(self, src: MatrixSource, rows: np.ndarray) -> pd.DataFrame | None:
        if not self.obs_columns:
            return None
        frame = src.obs.iloc[rows][self.obs_columns].copy()
        frame.index = np.arange(len(frame))
        return frame

    def stamp(
        self,
        part: TokenizedCells,
        src: MatrixSource,
        rows: np.ndarray,
        *,
        scheme: str,
        pad_value: float,
        columns: list[str] | None = None,
        specials: dict[str, int] | None = None,
    ) -> TokenizedCells:
        """Attach cell names, carried obs columns and the scheme's metadata to a block's tokens."""
        part.obs_names = np.asarray(src.obs.index[rows]).astype(str)
        if columns is None:
            part.obs = self.obs_frame(src, rows)
        elif columns:
            frame = src.obs.iloc[rows][columns].copy()
            frame.index = np.arange(len(frame))
            part.obs = frame
        part.scheme, part.options, part.pad_value = scheme, dict(self.options), pad_value
        part.specials = self.specials() if specials is None else specials
        return part

    def pbar(self, total: int, desc: str) -> Any:
        """A block's counter: ``bar.update(n)`` advances the call's :class:`~cellkit.Progress`."""
        return contextlib.nullcontext(_Counter(self.progress))


class _Counter:
    """What a scheme updates per block (the tqdm ``update`` it used to call)."""

    def __init__(self, progress: Progress) -> None:
        self.update = progress.advance


def _model_parts(model: Any) -> tuple[GeneVocab, str | None, InputSpec, dict[str, Any]]:
    """(vocab, family, input conventions, resources) of a CellModel or a bare GeneVocab."""
    if isinstance(model, GeneVocab):
        return model, None, InputSpec(), {}
    vocab = getattr(model, "vocab", None)
    config = getattr(model, "config", None)
    if not isinstance(vocab, GeneVocab) or config is None:
        raise DataError(f"Expected a cellkit model or a GeneVocab, got {type(model).__name__}.")
    spec = config.input if isinstance(config.input, InputSpec) else InputSpec.from_dict(config.input)
    return vocab, config.family, spec, dict(getattr(model, "resources", {}) or {})


def _open_sources(
    data: Any,
    *,
    cells: Any,
    layer: str | None,
    use_raw: bool,
    obs_columns: Sequence[str] = (),
    scheme_columns: tuple[list[str], list[str]] = ([], []),
) -> tuple[list[MatrixSource], bool]:
    """Sources for the supported inputs, and whether all their cells are in memory.

    ``scheme_columns`` are the ``obs`` columns the scheme reads (required, optional): a SOMA query
    reads only those and ``obs_columns``.
    """
    from anndata import AnnData

    from .soma import SomaSource, is_soma_input

    if is_soma_input(data):
        if cells is not None:
            raise DataError(
                "cells= selects rows of an AnnData; for a SOMA experiment select cells with "
                'cellkit.data.SomaSource(experiment, obs_filter="...") (or obs_joinids=).'
            )
        return _soma_sources(
            [data], layer=layer, obs_columns=obs_columns, scheme_columns=scheme_columns
        ), False
    if (
        isinstance(data, Sequence)
        and not isinstance(data, str)
        and len(data)
        and all(isinstance(d, SomaSource) for d in data)
    ):  # partitions of a query (SomaSource.partitions), one after another
        if cells is not None:
            raise DataError(
                "cells= selects rows of an AnnData; SomaSource partitions select their own cells."
            )
        return _soma_sources(
            list(data), layer=layer, obs_columns=obs_columns, scheme_columns=scheme_columns
        ), False
    if isinstance(data, AnnData):
        return [anndata_source(data, layer=layer, use_raw=use_raw, cells=cells)], not data.isbacked
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir() and (path / "gene_vocab.json").exists():
            if cells is not None or layer is not None:
                raise DataError("cells= and layer= are not supported for scBank directories.")
            _, tables = scbank_sources(path)
            return list(tables), True
        if path.suffix == ".h5ad":
            data = [path]
        else:
            raise DataError(f"{path} is neither an .h5ad file nor an scBank directory.")
    if isinstance(data, Sequence) and not isinstance(data, str):
        if cells is not None:
            raise DataError(
                "cells= selects rows of one AnnData; for partitions, select when writing the files."
            )
        return h5ad_sources(list(data), layer=layer), False
    raise DataError(
        f"Cannot tokenize a {type(data).__name__}; pass an AnnData, an .h5ad path, a list of them, an scBank "
        "directory or a SOMA experiment (cellkit.data.SomaSource, a tiledbsoma.Experiment or its URI)."
    )


def _soma_sources(
    data: list[Any],
    *,
    layer: str | None,
    obs_columns: Sequence[str],
    scheme_columns: tuple[list[str], list[str]],
) -> list[MatrixSource]:
    """Open SOMA inputs (sources, experiments, URIs) as matrix sources; all or none stay open."""
    from .soma import soma_source_of

    required, optional = scheme_columns
    columns = list(dict.fromkeys([*obs_columns, *required]))
    opened: list[MatrixSource] = []
    try:
        for item in data:
            src = soma_source_of(item, layer=layer)
            opened.append(src.matrix_source(obs_columns=columns, optional_columns=optional))
    except BaseException:
        for src in opened:
            src.close()
        raise
    return opened


def _scheme_obs_columns(scheme: str, options: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The ``obs`` columns a scheme reads with these options: (required, used when present)."""
    from .schemes import get_scheme

    o = {**get_scheme(scheme).OPTIONS, **options}
    required: list[str] = []
    optional: list[str] = []
    if scheme == "geneformer":
        optional += [str(o[k]) for k in ("n_counts_column", "filter_pass_column") if o.get(k)]
    elif scheme == "teddy":
        if o.get("label_column"):
            required.append(str(o["label_column"]))
        if o.get("bio_annotations"):
            optional += [str(o[f"{cat}_column"]) for cat in ("disease", "tissue", "cell", "sex")]
    elif scheme == "perturbgene":
        spec = o.get("phenotype_columns") or ()
        spec = [spec] if isinstance(spec, str) else spec
        required += [str(v) for v in (spec.values() if isinstance(spec, Mapping) else spec)]
    return required, optional


def _gene_names(src: MatrixSource, gene_column: str | None) -> pd.Index:
    if gene_column is None:
        return src.var.index
    if gene_column not in src.var.columns:
        raise DataError(
            f"gene_column {gene_column!r} is not a column of var in {src.name}; available: {list(src.var.columns)} "
            "(or leave gene_column=None to use var_names)."
        )
    return pd.Index(src.var[gene_column].astype(str))


def tokenize(
    adata: AnnData | SomaSource | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    model: Any,
    *,
    scheme: Literal["scgpt", "geneformer", "teddy", "perturbgene"] | None = None,
    cells: Any = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    obs_columns: Sequence[str] = (),
    output: str | os.PathLike[str] | None = None,
    max_shard_samples: int = 100_000,
    shard_format: Literal["npy", "parquet"] = "npy",
    overwrite: bool = False,
    resources: Mapping[str, Any] | None = None,
    chunk_size: int = 1024,
    progress: bool | Progress = True,
    unseen_warning: float | None = 0.1,
    **options: Any,
) -> TokenizedCells | ShardedTokens:
    """Tokenize cells into the inputs a model family expects.

    Parameters
    ----------
    adata
        An AnnData (in memory or ``backed="r"``), the path of an ``.h5ad`` file (opened backed),
        a list of ``.h5ad`` partitions, an scGPT scBank directory, or a TileDB-SOMA experiment
        (CELLxGENE Census): a :class:`cellkit.data.SomaSource` (measurement, ``X`` layer, ``obs`` /
        ``var`` value filters), a list of them (e.g. ``source.partitions(200_000)``), an open
        ``tiledbsoma.Experiment`` or its URI. A SOMA experiment is
        read in blocks of ``chunk_size`` cells by tiledbsoma, cells in ascending ``soma_joinid``
        order; only ``obs_columns`` (and the columns the scheme reads) of ``obs`` are read.
    model
        A loaded :class:`cellkit.CellModel` (its family picks the scheme and its input conventions,
        ``config.input`` — a :class:`cellkit.InputSpec`: ``max_length``, ``n_bins``,
        ``pad_value``, ``<cls>`` value, preprocessing — become the defaults of the scheme options
        left at ``None``) or a :class:`cellkit.GeneVocab` (then pass ``scheme=``).
    scheme
        ``"scgpt"`` (value binning), ``"geneformer"`` (rank encoding), ``"teddy"`` or
        ``"perturbgene"``. Default: the model's family.
    cells
        Which cells: ``None`` (all), a boolean mask, positions, obs names, or a query string
        (:func:`cellkit.data.select_cells`: column comparisons, ``in``, ``isin``, ``and`` / ``or`` /
        ``not``; never evaluated as code). Cells come out in the order of the AnnData (obs order), whatever the order of ``cells``.
    layer, use_raw
        Expression matrix to read (default ``.X``; ``use_raw=None`` follows the model's input
        convention, ``config.input.use_raw``, else ``False``). Counts are expected for
        ``geneformer``. For a SOMA experiment ``layer`` is the ``X`` layer (default ``"raw"``)
        and ``use_raw`` does not apply.
    gene_column
        ``var`` column with the gene identifiers (default ``var_names``; ``geneformer`` uses
        ``var["ensembl_id"]``, else Census's ``var["feature_id"]``, when present).
    obs_columns
        ``obs`` columns carried into the result (labels, batches).
    output
        Directory for shards (then a :class:`~cellkit.data.ShardedTokens` is returned and memory
        stays bounded); default: in memory.
    max_shard_samples, shard_format, overwrite
        Shard size, ``"npy"`` (memory-mappable) or ``"parquet"`` (Hugging Face ``datasets``), and
        whether an existing shard directory may be replaced.
    resources
        Named tables the scheme needs (e.g. Geneformer's gene medians); default the model's
        ``resources``.
    chunk_size
        Cells per processing block.
    progress
        ``True``: a ``tqdm`` progress bar; a :class:`cellkit.Progress` follows the call and can
        cancel it (:class:`cellkit.Cancelled` at the next block).
    unseen_warning
        Warn (``UserWarning``) when more than this share of the expression (the values read,
        summed over the cells; estimated on the first 2,000 cells of data not in memory) falls on
        genes the model will not see; ``None``: no check. :func:`cellkit.genes.coverage_report`
        gives the full report.
    **options
        Scheme options; see :mod:`cellkit.data.schemes`. Unknown options are an error. Gene
        matching (:func:`cellkit.data.genes.resolve_genes`): a gene is first looked up exactly;
        ``case_fold`` retries its upper-cased name, ``strip_versions`` an Ensembl id without its
        version suffix, ``gene_tables`` the shipped GENCODE symbol <-> Ensembl id tables (current
        and outdated symbols) and ``orthologs`` the one-to-one human ortholog of a mouse gene
        (``species="auto"`` detects mouse data). All are off in ``mode="compat"`` (scGPT and
        Geneformer keep only the names they know) and on otherwise; the result's notes say how
        many genes each rule matched. ``duplicates`` says what happens when several columns
        resolve to one token: ``"keep"`` (scGPT's default: each column its own occurrence),
        ``"sum"`` (Geneformer's and TEDDY's default: values added), ``"first"`` or ``"refuse"``.

    Returns
    -------
    :class:`~cellkit.data.TokenizedCells` (in memory) or :class:`~cellkit.data.ShardedTokens`.

    Examples
    --------
    >>> tokens = cellkit.tokenize(adata, model, cells="bulk_labels == 'CD14+ Monocyte'", obs_columns=["bulk_labels"])
    >>> print(tokens.summary())
    """
    check_adata(adata, what="cellkit.tokenize", allow_other=True)
    vocab, family, spec, model_resources = _model_parts(model)
    resources = dict(model_resources if resources is None else resources)
    scheme = scheme or family
    impl = _checked_scheme(scheme, options, chunk_size=chunk_size)
    # the model's preprocessing conventions are defaults the caller can override
    options.update(
        {k: v for k, v in spec.preprocessing_options().items() if k in impl.OPTIONS and k not in options}
    )
    from .soma import is_soma_input

    if is_soma_input(adata):
        if use_raw:
            raise DataError(
                "use_raw=True reads an AnnData's .raw; a SOMA experiment has X layers: pass layer=... "
                "(or SomaSource(..., layer=...)) instead."
            )
        use_raw = False  # the model's use_raw convention names an AnnData's .raw; SOMA has layers
    elif use_raw is None:
        use_raw = bool(spec.use_raw)

    obs_columns = list(obs_columns)
    sources, in_memory = _open_sources(
        adata,
        cells=cells,
        layer=layer,
        use_raw=use_raw,
        obs_columns=obs_columns,
        scheme_columns=_scheme_obs_columns(scheme, options),
    )
    with contextlib.ExitStack() as stack:
        for src in sources:
            stack.callback(src.close)
        ctx_sources: list[tuple[MatrixSource, GeneMatch]] = []
        for src in sources:
            match = _match_source(
                src, impl, scheme, vocab, resources, options, gene_column=gene_column, obs_columns=obs_columns
            )
            ctx_sources.append((src, match))
        if unseen_warning is not None:
            _warn_unseen(ctx_sources, float(unseen_warning), in_memory=in_memory, chunk_size=chunk_size)
        ctx = TokenizeContext(
            ctx_sources,
            vocab,
            {**impl.OPTIONS, **options},
            spec,
            resources,
            obs_columns,
            chunk_size,
            stack.enter_context(track(progress, total=sum(s.n_cells for s in sources), desc="tokenizing")),
            in_memory,
            streaming=output is not None,
        )
        chunks: Iterator[TokenizedCells] = impl.run(ctx)
        coverage = _merge_coverage([m for _, m in ctx_sources])
        gene_notes = _gene_notes([m for _, m in ctx_sources])

        if output is None:
            return _collect_in_memory(chunks, coverage, gene_notes, ctx)
        writer = ShardWriter(
            output, max_shard_samples=max_shard_samples, format=shard_format, overwrite=overwrite
        )
        stack.callback(writer.abort)  # a failure leaves ``output`` as it was (no-op after close)
        return _write_shards(writer, chunks, coverage, gene_notes, ctx)


def scheme_options(scheme: str) -> dict[str, Any]:
    """The tokenize options of a scheme and their defaults (``None``: the model's, or decided per data).

    Parameters
    ----------
    scheme
        ``"scgpt"``, ``"geneformer"``, ``"teddy"`` or ``"perturbgene"``.

    Returns
    -------
    ``{option: default}`` — every name :func:`cellkit.tokenize` accepts in ``tokenize_options`` for
    this scheme.

    Raises
    ------
    cellkit.DataError
        An unknown scheme (the message lists the known ones).
    """
    from .schemes import get_scheme

    return dict(get_scheme(scheme).OPTIONS)


def _checked_scheme(scheme: str | None, options: Mapping[str, Any], *, chunk_size: int) -> Any:
    """The tokenization scheme's implementation, after checking its name, options and ``chunk_size``."""
    from .schemes import get_scheme

    if scheme is None:
        raise DataError(f"Pass scheme=... ({', '.join(SCHEMES)}) when tokenizing with a bare vocabulary.")
    if scheme == "cellkit":
        raise DataError(
            "This model has no tokenizer family of its own; pass scheme='scgpt' or another scheme."
        )
    impl = get_scheme(scheme)
    unknown = sorted(set(options) - set(impl.OPTIONS))
    if unknown:
        raise DataError(
            f"Unknown option(s) {unknown} for the {scheme!r} scheme; allowed: {sorted(impl.OPTIONS)}."
        )
    if chunk_size < 1:
        raise DataError(f"chunk_size must be >= 1, got {chunk_size}.")
    return impl


def _source_gene_column(
    src: MatrixSource, impl: Any, scheme: str, options: Mapping[str, Any], gene_column: str | None
) -> str | None:
    """The ``var`` column naming the genes of one source: ``gene_column``, the scheme's option, or a default."""
    column = gene_column
    scheme_column = options.get(getattr(impl, "GENE_COLUMN_OPTION", ""))
    if scheme_column is not None:
        if column is not None and column != scheme_column:
            raise DataError(
                f"gene_column={column!r} and {impl.GENE_COLUMN_OPTION}={scheme_column!r} disagree; pass one."
            )
        column = scheme_column
    if column is None and scheme == "geneformer":  # Ensembl ids: AnnData convention, then Census's
        column = next((c for c in ("ensembl_id", "feature_id") if c in src.var.columns), None)
    return column


def _match_source(
    src: MatrixSource,
    impl: Any,
    scheme: str,
    vocab: Any,
    resources: Mapping[str, Any],
    options: Mapping[str, Any],
    *,
    gene_column: str | None,
    obs_columns: Sequence[str],
) -> GeneMatch:
    """Check one source's obs columns and match its genes to the vocabulary."""
    missing = [c for c in obs_columns if c not in src.obs.columns]
    if missing:
        raise DataError(
            f"obs column(s) {missing} not found in {src.name}; available: {list(src.obs.columns)}."
        )
    names = _gene_names(src, _source_gene_column(src, impl, scheme, options, gene_column))
    match = (
        impl.match_genes(names, vocab, resources, options)
        if hasattr(impl, "match_genes")
        else resolve_genes(names, vocab)
    )
    require_overlap(match, vocab, what=src.name)
    return match


#: cells read to estimate the unseen expression share of data not in memory
_UNSEEN_SAMPLE = 2_000


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside cellkit, for a warning raised by the caller of this."""
    import sys

    level, frame = 1, sys._getframe(1)
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("cellkit."):
        level += 1
        frame = frame.f_back
    return level


def _warn_unseen(
    sources: Sequence[tuple[MatrixSource, GeneMatch]], threshold: float, *, in_memory: bool, chunk_size: int
) -> None:
    """Warn when more than ``threshold`` of the expression falls on genes the model will not see."""
    import warnings

    unseen = total = 0.0
    missing: dict[str, float] = {}
    budget = None if in_memory else _UNSEEN_SAMPLE  # cells still to read (None: all)
    sampled = False
    for src, match in sources:
        if budget is not None and budget <= 0:
            sampled = True
            break
        sums, n = gene_totals(src, chunk_size=chunk_size, max_cells=budget)
        if budget is not None:
            sampled = sampled or n < src.n_cells
            budget -= n
        lost = np.ones(len(sums), dtype=bool)
        lost[match.columns] = False
        total += float(sums.sum())
        unseen += float(sums[lost].sum())
        for j in np.flatnonzero(lost)[np.argsort(-sums[lost], kind="stable")[:3]]:
            missing[str(match.names[j])] = missing.get(str(match.names[j]), 0.0) + float(sums[j])
    if not np.isfinite(total) or total <= 0 or unseen / total <= threshold:  # bad values: check_values says
        return
    top = sorted(missing.items(), key=lambda kv: -kv[1])[:3]
    where = f" (estimated on the first {_UNSEEN_SAMPLE:,} cells)" if sampled else ""
    warnings.warn(
        f"{unseen / total:.1%} of the expression{where} is on genes the model will not see (above "
        f"unseen_warning={threshold:g}); most expressed: "
        + ", ".join(f"{g} ({v / total:.1%})" for g, v in top)
        + ". See cellkit.genes.coverage_report(adata, model) for the genes and the rule each matched by; "
        "pass gene_column=..., species=... or map the identifiers, or unseen_warning=None to silence this.",
        UserWarning,
        stacklevel=_caller_level(),  # the user's call (embed_cells, finetune, ... call tokenize)
    )


def gene_totals(
    src: MatrixSource, *, chunk_size: int = 4096, max_cells: int | None = None
) -> tuple[np.ndarray, int]:
    """Per-column sums of a source's selected rows, read in row blocks (bounded memory).

    Parameters
    ----------
    src
        The matrix source.
    chunk_size
        Rows per block.
    max_cells
        Stop after this many rows (``None``: all).

    Returns
    -------
    ``(n_vars,)`` float64 sums and the number of rows read.
    """
    import dataclasses

    import scipy.sparse as sp

    n_vars = src.var.shape[0]
    rows = src.rows if max_cells is None else src.rows[:max_cells]
    m = src.matrix
    if (sp.issparse(m) or isinstance(m, np.ndarray)) and len(rows) == m.shape[0]:  # in memory, every row
        return np.asarray(m.sum(axis=0, dtype=np.float64)).ravel(), len(rows)
    sums = np.zeros(n_vars, dtype=np.float64)
    sub = src if max_cells is None else dataclasses.replace(src, rows=rows)
    for _, block in sub.chunks(chunk_size):
        sums += np.bincount(block.indices, weights=block.data, minlength=n_vars)
    return sums, len(rows)


class _SummedColumns:
    """The matrix of a :class:`_SummedSource`: another source's columns added up by ``plan``."""

    def __init__(self, source: MatrixSource, plan: Any) -> None:
        self.source, self.plan = source, plan

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.source.obs), self.plan.shape[1])

    def __call__(self, block: Any) -> Any:
        return (block @ self.plan.astype(block.dtype)).tocsr()


class _SummedSource(MatrixSource):
    """A source whose columns sharing a token are added (its ``matrix`` is a :class:`_SummedColumns`)."""

    def chunks(self, chunk_size: int) -> Iterator[tuple[np.ndarray, Any]]:
        import dataclasses

        base = dataclasses.replace(self.matrix.source, rows=self.rows)
        for idx, block in base.chunks(chunk_size):
            yield idx, self.matrix(block)

    def _read(self, idx: np.ndarray) -> Any:
        return self.matrix(self.matrix.source._read(idx))


def sum_duplicate_columns(src: MatrixSource, match: GeneMatch) -> tuple[MatrixSource, GeneMatch]:
    """A source whose columns sharing a token are added into one (``duplicates="sum"``).

    The summed column takes the place (and name) of its first column; the others go. Rows are
    still read in blocks.
    """
    import dataclasses

    import scipy.sparse as sp

    used = np.flatnonzero(match.token_ids >= 0)
    tokens, first, inverse = np.unique(match.token_ids[used], return_index=True, return_inverse=True)
    order = np.argsort(first)  # output columns in the order of their first column
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    plan = sp.csr_matrix(
        (np.ones(len(used), dtype=np.float32), (used, rank[np.ravel(inverse)])),
        shape=(len(match.token_ids), len(tokens)),
    )
    keep = used[first[order]]
    summed = dataclasses.replace(
        match,
        names=match.names[keep],
        token_ids=tokens[order],
        rules=None if match.rules is None else match.rules[keep],
    )
    source = _SummedSource(_SummedColumns(src, plan), src.var.iloc[keep], src.obs, src.rows, src.name)
    return source, summed


def _gene_notes(matches: Sequence[GeneMatch]) -> list[str]:
    """Notes on gene matching: which rule matched how many genes, then each source's unusual matches."""
    gene_notes = [m.summary() for m in matches if m.n_version_stripped or m.n_case_folded or m.n_duplicated]
    rules = rules_report(list(matches))  # which rule matched how many genes
    if rules:
        gene_notes.insert(0, rules)
    return gene_notes


def _collect_in_memory(
    chunks: Iterator[TokenizedCells], coverage: Any, gene_notes: list[str], ctx: TokenizeContext
) -> TokenizedCells:
    """Concatenate the tokenized chunks in memory, with the coverage and notes."""
    parts = list(chunks)
    if not parts:
        raise DataError(
            "No cells selected: the input has no cell to tokenize (check the data and cells=...)."
        )
    result = TokenizedCells.concat(parts) if len(parts) != 1 else parts[0]
    result.coverage = coverage
    result.notes = list(dict.fromkeys([*gene_notes, *ctx.notes, *result.notes]))
    log.info(result.summary())
    return result


def _write_shards(
    writer: ShardWriter,
    chunks: Iterator[TokenizedCells],
    coverage: Any,
    gene_notes: list[str],
    ctx: TokenizeContext,
) -> ShardedTokens:
    """Stream the tokenized chunks into shards; the first chunk carries the coverage and notes."""
    first = True
    for part in chunks:
        if first:
            part.coverage = coverage
            part.notes = list(dict.fromkeys([*gene_notes, *ctx.notes, *part.notes]))
            first = False
        writer.add(part)
    if writer._template is not None:  # notes gathered while streaming (e.g. dropped cells)
        writer._template.notes = list(dict.fromkeys([*writer._template.notes, *ctx.notes]))
    return writer.close()


def _merge_coverage(matches: list[GeneMatch]) -> Coverage:
    if len(matches) == 1:
        return matches[0].coverage
    n = sum(m.coverage.n_genes for m in matches)
    hit = sum(m.coverage.n_matched for m in matches)
    matched = tuple(g for m in matches for g in m.coverage.matched_examples)[:10]
    unmatched = tuple(g for m in matches for g in m.coverage.unmatched_examples)[:10]
    return Coverage(n, hit, matched, unmatched)


def check_values(data: np.ndarray, *, where: str, counts: bool = False) -> None:
    """Clear errors for NaN, negative and (when counts are required) non-integer values."""
    if not len(data):
        return
    if not np.isfinite(data).all():
        raise DataError(f"{where} contains NaN or infinite values; clean or impute them before tokenizing.")
    if data.min() < 0:
        raise DataError(
            f"{where} contains negative values (min {data.min():g}); tokenizers need non-negative expression. "
            "Scaled data (e.g. after sc.pp.scale) cannot be tokenized: pass the counts (layer=... or use_raw=True)."
        )
    if counts and not np.array_equal(data, np.round(data)):
        bad = data[data != np.round(data)][:3]
        raise DataError(
            f"{where} holds non-integer values (e.g. {bad.tolist()}) but this scheme needs raw counts; pass the "
            "counts layer (layer='counts', or use_raw=True if .raw holds counts)."
        )


def max_length_option(options: Mapping[str, Any], name: str) -> Any:
    """The maximum tokens per cell a caller asked for: the scheme's own option ``name`` or ``max_length``.

    Every scheme takes ``max_length`` as well as its upstream name for the same thing (``scgpt``:
    ``max_len``, ``geneformer``: ``model_input_size``, ``teddy``: ``max_seq_len``); given both,
    they must agree. ``None``: neither was given.
    """
    own, uniform = options.get(name), options.get("max_length")
    if own is not None and uniform is not None and own != uniform:
        raise DataError(
            f"{name}={own!r} and max_length={uniform!r} are the same option and disagree; pass one."
        )
    return own if own is not None else uniform
