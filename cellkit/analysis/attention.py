"""Attention: per-cell probabilities, gene × gene maps over a cell group, scGPT's attention GRN.

Everything runs through the core's own modules: the model's forward runs up to the chosen layer
(a pre-hook on that layer's ``self_attn`` captures the exact tensor the core feeds it — ``x`` for
post-norm layers, ``norm1(x)`` for pre-norm ones — and stops the forward there, so later layers are
never computed), then that :class:`~cellkit.core.MultiheadSelfAttention` gives either its explicit
``softmax(Q Kᵀ / √dh)`` probabilities (padding keys exactly 0) or, for the GRN statistic, its own
``Q`` and ``K`` (:meth:`~cellkit.core.MultiheadSelfAttention.project`). No forward pass is
re-implemented here.

:func:`attention_maps`
    ``(H, L, L)`` probabilities for a handful of chosen cells, with the cell's token names.
:func:`gene_attention`
    A gene × gene map (query genes in rows, key genes in columns) averaged over a cell group.
    Cells carry different gene sets in different orders, so genes are aligned by identity: entry
    ``(a, b)`` is the mean, over the cells where *both* genes occur, of the value at (query ``a``,
    key ``b``). Maps are accumulated batch by batch into one ``G × G`` sum and count (``G`` genes),
    so no more than one batch's ``L × L`` maps ever exist.
:func:`top_influenced_genes`
    The query genes that attend most to a chosen key gene (scGPT's "most influenced genes").
:func:`attention_difference`
    Condition − control of that map for two groups of an ``obs`` column, as a tidy table.

Statistics
----------
``"probability"``
    The softmax probabilities the model actually uses (per head, or averaged over heads).
``"grn"``
    scGPT's Tutorial_Attention_GRN ranking statistic (facts §6.3): at layer ``hidden_layer``, that
    layer's packed projection applied to the layer's attention input; raw scores ``q·kᵀ`` per head
    (no ``1/√dh``, no softmax); rank-normalised by row (argsort of argsort over keys, divided by
    ``M``), then by column (over queries, divided by ``M``); averaged over heads. ``M`` is the
    number of real tokens of the cell — ``<cls>`` included, padding excluded (the tutorial
    tokenises without padding, ``M = n_genes + 1``). Ties are broken by token position (stable
    sorts; the tutorial's unstable CUDA sort leaves them unspecified; ties are frequent in the
    column step). The tutorial sums per condition and divides by the number of cells, but skips
    the first cell of each condition (it only initialises the sum): here every cell is counted.
    With the tutorial's tokenisation (``include_zero=True``: every cell has every gene) the mean
    over co-occurring cells is exactly its sum / ``n_cells``.

``<cls>`` and other special tokens take part in the attention (they are part of the model's
sequence and of ``M``) but are left out of gene × gene results unless ``include_special=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .._anndata import check_adata, check_keys_free, record_written
from .._errors import ConfigError, DataError
from .._inference import FORWARD_KEYS, inference_batches, resolve_device
from .._utils import Progress, track
from ..core.precision import precision_context, resolve_precision
from ..data.collate import Collator
from ..data.selection import select_cells
from ..data.tokenize import tokenize
from ..data.tokenized import ShardedTokens, TokenizedCells
from ..data.vocab import unknown_gene_error
from ..model import CellModel

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = [
    "STATISTICS",
    "CellAttention",
    "attention_difference",
    "attention_maps",
    "gene_attention",
    "top_influenced_genes",
]

STATISTICS = ("probability", "grn")
#: default cap on cells for per-cell maps (each is ``H × L × L``)
MAX_MAP_CELLS = 64
#: default cap on the gene space of a ``G × G`` map (two float64/int64 ``G × G`` arrays per group)
MAX_GENES = 4096


# ----------------------------------------------------------------------------- validation
def _resolve_layer(model: CellModel, hidden_layer: Any) -> int:
    """``hidden_layer`` (negative counts from the last) → index into ``model.encoder.layers``."""
    n = len(model.encoder.layers)
    if isinstance(hidden_layer, str):
        raise ConfigError(
            f"hidden_layer={hidden_layer!r}: `hidden_layer` is the transformer layer (an integer, -1 = last); "
            "pass the AnnData expression layer as layer=..."
        )
    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int | np.integer):
        raise ConfigError(f"hidden_layer must be an integer, got {hidden_layer!r}.")
    if not -n <= hidden_layer < n:
        raise ConfigError(
            f"hidden_layer={hidden_layer} is out of range for this {n}-layer model: use 0 … {n - 1} "
            f"(from the input) or -1 … {-n} (from the last)."
        )
    return int(hidden_layer) % n


def _resolve_heads(model: CellModel, heads: Any) -> list[int] | None:
    """``None`` (all heads) or a list of head indices in ``0 … H-1``."""
    if heads is None:
        return None
    n = model.config.encoder.n_heads
    items = [heads] if isinstance(heads, int | np.integer) and not isinstance(heads, bool) else list(heads)
    out = []
    for h in items:
        if isinstance(h, bool) or not isinstance(h, int | np.integer):
            raise ConfigError(f"head indices must be integers, got {h!r}.")
        if not -n <= h < n:
            raise ConfigError(f"head {h} is out of range: this model has {n} heads (0 … {n - 1}).")
        out.append(int(h) % n)
    if not out:
        raise ConfigError("heads is empty; pass None for all heads.")
    return out


def _resolve_head(model: CellModel, head: Any) -> int | None:
    if head is None:
        return None
    if not isinstance(head, int | np.integer) or isinstance(head, bool):
        raise ConfigError(f"head must be an integer or None (average over heads), got {head!r}.")
    return _resolve_heads(model, [head])[0]  # type: ignore[index]


def _gene_ids(model: CellModel, genes: Iterable[str]) -> np.ndarray:
    genes = [str(g) for g in genes]
    for g in genes:
        if g not in model.vocab:
            raise model.vocab.unknown_gene_error(
                g, where=f"the model's vocabulary ({len(model.vocab):,} tokens)"
            )
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        raise ConfigError(f"genes has duplicates: {dup[:5]}.")
    return np.asarray([model.vocab[g] for g in genes], dtype=np.int64)


def _check_min_cells(min_cells: Any) -> None:
    if isinstance(min_cells, bool) or not isinstance(min_cells, int | np.integer) or min_cells < 1:
        raise ConfigError(f"min_cells must be an integer >= 1, got {min_cells!r}.")


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ConfigError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")


def _check_backend(attn_backend: str) -> None:
    if attn_backend not in ("sdpa", "explicit"):
        raise ConfigError(
            f"attn_backend={attn_backend!r}: the layers before the analysed one run on 'sdpa' or 'explicit'."
        )


def _group_codes(obs: pd.DataFrame | None, groupby: str, groups: Sequence[Any], n: int) -> np.ndarray:
    """Per cell: the index of its label in ``groups`` or -1."""
    if obs is None or groupby not in obs.columns:
        cols = [] if obs is None else list(obs.columns)
        raise DataError(f"groupby={groupby!r} is not an obs column; available: {cols}.")
    col = obs[groupby]
    present = pd.unique(col.dropna())
    available = (
        list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else sorted(present, key=str)
    )
    for g in groups:
        if g not in set(available):
            raise DataError(f"Group {g!r} does not exist in obs[{groupby!r}]; available groups: {available}.")
        if not (col == g).any():
            raise DataError(f"Group {g!r} of obs[{groupby!r}] has no cell in the selection (cells=...).")
    codes = np.full(n, -1, dtype=np.int64)
    values = col.to_numpy()
    for k, g in enumerate(groups):
        codes[values == g] = k
    return codes


# ----------------------------------------------------------------------------- inputs
@dataclass
class _Source:
    """Selected cells of an AnnData or of tokens, loaded chunk by chunk with their group codes."""

    load: Callable[[np.ndarray], tuple[TokenizedCells, np.ndarray]]
    positions: np.ndarray
    codes: np.ndarray
    chunk_size: int
    _cache: dict[int, tuple[TokenizedCells, np.ndarray]] = field(default_factory=dict)

    def chunks(self) -> Iterator[tuple[TokenizedCells, np.ndarray]]:
        starts = range(0, len(self.positions), self.chunk_size)
        for s in starts:
            if s in self._cache:
                yield self._cache[s]
                continue
            part = self.load(self.positions[s : s + self.chunk_size])
            if len(starts) == 1:  # a single chunk is tokenized once for both passes
                self._cache[s] = part
            yield part


def _select_tokens(tokens: TokenizedCells, cells: Any) -> np.ndarray:
    """Positions into ``tokens`` in the order given (repeats kept; :func:`_source` refuses them)."""
    obs = tokens.obs if tokens.obs is not None else pd.Index(np.asarray(tokens.obs_names).astype(str))
    return select_cells(obs, cells, order="input")


def _source(
    data: Any,
    model: CellModel,
    *,
    cells: Any,
    groupby: str | None,
    groups: Sequence[Any] | None,
    chunk_size: int,
    tokenize_kwargs: Mapping[str, Any],
    pool_groups: bool = False,
) -> _Source:
    """Selected cells (∩ the groups) and a loader that tokenizes them (or subsets the tokens)."""
    if chunk_size < 1:
        raise ConfigError("chunk_size must be >= 1.")
    if isinstance(data, ShardedTokens):
        if len(data) == 0:
            raise DataError("No cells selected: these token shards hold no cell.")
        data = data.to_memory()
    is_tokens = isinstance(data, TokenizedCells)
    if is_tokens:
        if data.token_type_ids is not None:
            raise ConfigError(
                "These tokens carry token types (PerturbGene: gene identity is the token type), which "
                "gene × gene attention does not support."
            )
        positions = _select_tokens(data, cells)
        obs = None if data.obs is None else data.obs.iloc[positions]
    else:
        positions = select_cells(data.obs, cells, order="input")
        obs = data.obs.iloc[positions]
    positions, codes = _group_codes_of(
        obs, positions, groupby=groupby, groups=groups, pool_groups=pool_groups
    )
    if len(np.unique(positions)) != len(positions):
        raise DataError("cells selects some cells more than once; pass each cell once.")
    if len(positions) == 0:
        raise DataError(f"The selection is empty (cells={cells!r}, groupby={groupby!r}, groups={groups!r}).")
    if is_tokens:
        load = _token_loader(data, positions, codes)
    else:
        load = _adata_loader(data, model, positions, codes, tokenize_kwargs)
    return _Source(load, positions, codes, chunk_size)


def _group_codes_of(
    obs: pd.DataFrame | None,
    positions: np.ndarray,
    *,
    groupby: str | None,
    groups: Sequence[Any] | None,
    pool_groups: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The selected positions in the groups and each one's group code (all 0 without ``groupby``)."""
    if groupby is not None:
        if groups is None:
            raise ConfigError("groupby= needs groups=... (the label(s) to aggregate over).")
        codes = _group_codes(obs, groupby, groups, len(positions))
        keep = codes >= 0
        positions, codes = positions[keep], codes[keep]
        if pool_groups:  # the listed labels form one group
            codes[:] = 0
    elif groups is not None:
        raise ConfigError("groups= needs groupby=... (the obs column holding the labels).")
    else:
        codes = np.zeros(len(positions), dtype=np.int64)
    return positions, codes


def _token_loader(
    tokens: TokenizedCells, positions: np.ndarray, codes: np.ndarray
) -> Callable[[np.ndarray], tuple[TokenizedCells, np.ndarray]]:
    """A loader that subsets tokenized cells and gives each cell's group code."""
    code_of = dict(zip(positions.tolist(), codes.tolist(), strict=True))

    def load(chunk: np.ndarray) -> tuple[TokenizedCells, np.ndarray]:
        return tokens.subset(chunk), np.asarray([code_of[int(i)] for i in chunk], dtype=np.int64)

    return load


def _adata_loader(
    adata: Any,
    model: CellModel,
    positions: np.ndarray,
    codes: np.ndarray,
    tokenize_kwargs: Mapping[str, Any],
) -> Callable[[np.ndarray], tuple[TokenizedCells, np.ndarray]]:
    """A loader that tokenizes AnnData cells and gives each cell's group code."""
    code_series = pd.Series(codes, index=np.asarray(adata.obs_names[positions]).astype(str))

    kwargs = dict(tokenize_kwargs)
    unseen = {"warning": kwargs.pop("unseen_warning", 0.1)}  # checked on the first chunk only

    def load(chunk: np.ndarray) -> tuple[TokenizedCells, np.ndarray]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no gene in the vocabulary.*")
            toks = tokenize(
                adata, model, cells=chunk, progress=False, unseen_warning=unseen["warning"], **kwargs
            )
        unseen["warning"] = None
        if isinstance(toks, ShardedTokens):
            toks = toks.to_memory()
        names = np.asarray(toks.obs_names).astype(str)
        return toks, code_series.loc[names].to_numpy(dtype=np.int64)

    return load


def _tokenize_kwargs(
    tokenize_options: Mapping[str, Any] | None,
    layer: str | None,
    use_raw: bool | None,
    gene_column: str | None,
) -> dict[str, Any]:
    opts = dict(tokenize_options or {})
    opts.update(layer=layer, use_raw=use_raw, gene_column=gene_column)
    return opts


# ----------------------------------------------------------------------------- the core call
class _Stop(Exception):
    """Raised by the capture hook to end the forward once the analysed layer's input is known."""


def _attention_input(
    model: CellModel, inputs: Mapping[str, torch.Tensor], layer: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensor the core feeds ``layers[layer].self_attn`` and the padding mask, via the model's forward."""
    attn = model.encoder.layers[layer].self_attn
    got: dict[str, Any] = {}

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["x"] = args[0]
        got["mask"] = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        raise _Stop

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs, heads=(), attn_backend=backend)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in got:  # pragma: no cover - the padded path always calls self_attn
        raise ConfigError(f"Layer {layer}'s attention was not called on the padded path.")
    return got["x"], got["mask"]


def _batches(
    model: CellModel,
    tokens: TokenizedCells,
    batch_size: int,
    dev: torch.device,
    layer: int,
    backend: str,
    progress: Progress,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per length-sorted batch: cell indices, gene ids ``(B, L)``, real-token mask ``(B, L)``, attention input.

    ``progress`` counts a batch's cells once the caller has used it (and stops a cancelled call).
    """
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1.")
    collate = Collator.for_tokens(tokens)
    lengths = tokens.lengths
    pending = 0
    for idx in inference_batches(lengths, batch_size):
        if pending:
            progress.advance(pending)
        pending = len(idx)
        idx = idx[lengths[idx] > 0]  # empty cells have nothing to attend
        if not len(idx):
            continue
        items = []
        for i in idx.tolist():
            item: dict[str, Any] = {k: np.asarray(v) for k, v in tokens.cell(i).items()}
            item["index"] = i
            items.append(item)
        batch = collate(items)
        inputs = {k: batch[k].to(dev) for k in FORWARD_KEYS if k in batch}
        x, mask = _attention_input(model, inputs, layer, backend)
        real = torch.ones(inputs["gene_ids"].shape, dtype=torch.bool, device=dev) if mask is None else ~mask
        yield idx, inputs["gene_ids"], real, x
    if pending:
        progress.advance(pending)


def _resolve_precision(precision: str, device: Any) -> str:
    """The precision that runs on ``device`` (checked before any work; see :func:`cellkit.core.precision.resolve_precision`)."""
    return resolve_precision(precision, resolve_device(device))


class _Eval:
    """``model.eval()`` on ``device`` under inference mode in ``precision``; restores the training flag
    (and, in bf16, the fp32 weights)."""

    def __init__(self, model: CellModel, device: Any, precision: str = "fp32") -> None:
        self.model, self.dev, self.precision = model, resolve_device(device), precision

    def __enter__(self) -> torch.device:
        self.was_training = self.model.training
        self.model.eval()
        self.model.to(self.dev)
        self.mode = torch.inference_mode()
        self.mode.__enter__()
        self.prec = precision_context(self.model, self.dev, self.precision)
        try:
            self.prec.__enter__()
        except BaseException:
            self.mode.__exit__(None, None, None)
            self.model.train(self.was_training)
            raise
        return self.dev

    def __exit__(self, *exc: Any) -> None:
        try:
            self.prec.__exit__(*exc)
        finally:
            self.mode.__exit__(*exc)
            self.model.train(self.was_training)


# ----------------------------------------------------------------------------- per-cell maps
@dataclass
class CellAttention:
    """Attention probabilities of one cell at one layer.

    Attributes
    ----------
    obs_name
        The cell.
    tokens
        ``(L,)`` token names in sequence order (``<cls>`` included; no padding).
    gene_ids
        ``(L,)`` token ids.
    probs
        ``(H_sel, L, L)`` float32 ``softmax(Q Kᵀ / √dh)``; rows are queries, columns keys; each row sums to 1.
    hidden_layer
        Transformer layer index (``0 … n_layers-1``).
    heads
        The model's head index of each entry of ``probs``.
    """

    obs_name: str
    tokens: np.ndarray
    gene_ids: np.ndarray
    probs: np.ndarray
    hidden_layer: int
    heads: list[int]

    def frame(self, head: int | None = None) -> pd.DataFrame:
        """``L × L`` DataFrame (query rows, key columns) of one head, or the mean over :attr:`heads`."""
        if head is None:
            m = self.probs.mean(0)
        else:
            if head not in self.heads:
                raise ConfigError(f"head {head} was not computed; heads: {self.heads}.")
            m = self.probs[self.heads.index(head)]
        names = pd.Index(self.tokens)
        return pd.DataFrame(m, index=names.rename("query"), columns=names.rename("key"))

    def __repr__(self) -> str:
        return (
            f"CellAttention({self.obs_name!r}, hidden_layer={self.hidden_layer}, heads={self.heads}, "
            f"{len(self.tokens)} tokens)"
        )


def attention_maps(
    adata: AnnData | TokenizedCells,
    model: CellModel,
    *,
    cells: Any = None,
    hidden_layer: int = -1,
    heads: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_cells: int = MAX_MAP_CELLS,
    attn_backend: str = "explicit",
    device: str = "auto",
    precision: str = "fp32",
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    progress: bool | Progress = True,
) -> list[CellAttention]:
    """Per-layer, per-head softmax probabilities for a few chosen cells.

    Parameters
    ----------
    adata
        An AnnData (tokenized here with the model's scheme) or :class:`~cellkit.data.tokenized.TokenizedCells`.
    model
        Any loaded :class:`cellkit.CellModel`.
    cells
        Which cells (mask, positions, names, or a query string, see :func:`cellkit.data.select_cells`),
        in the order given; default all — at most ``max_cells``.
    hidden_layer
        Transformer layer: ``0 … n_layers-1`` or negative from the last (default the last).
    heads
        A head index or a list of them; default all heads.
    batch_size
        Cells per forward pass.
    max_cells
        Refuse more cells than this (each map is ``H × L × L``); aggregate with :func:`gene_attention`.
    attn_backend
        Backend of the layers *before* ``hidden_layer`` (``"explicit"``: the result then equals
        ``model(..., output_attentions=True).attentions[hidden_layer]`` exactly; ``"sdpa"`` is faster).
    device
        ``"auto"``: CUDA when available.
    precision
        ``"fp32"`` (default, exact), ``"bf16"`` (GPUs, and CPUs with AMX / AVX512-BF16; elsewhere it
        stays fp32 with a warning) or ``"fp16"`` (CUDA); probabilities are returned as float32.
    tokenize_options, layer, use_raw, gene_column
        Passed to :func:`cellkit.tokenize` (``layer`` is the AnnData expression layer).
    progress
        ``True``: a progress bar over the cells; a :class:`cellkit.Progress` follows the call and
        can cancel it (:class:`cellkit.Cancelled`).

    Returns
    -------
    One :class:`CellAttention` per selected cell, in selection order; ``probs`` is ``(H_sel, L, L)``.
    """
    check_adata(adata, what="cellkit.analysis.attention_maps", allow_other=True)
    idx_layer = _resolve_layer(model, hidden_layer)
    head_list = _resolve_heads(model, heads)
    _check_backend(attn_backend)
    prec = _resolve_precision(precision, device)
    src = _source(
        adata,
        model,
        cells=cells,
        groupby=None,
        groups=None,
        chunk_size=max(1, max_cells),
        tokenize_kwargs=_tokenize_kwargs(tokenize_options, layer, use_raw, gene_column),
    )
    if len(src.positions) > max_cells:
        raise ConfigError(
            f"{len(src.positions)} cells selected; per-cell attention maps are for at most max_cells={max_cells} "
            "cells (each is H × L × L). Choose fewer cells (cells=...), or aggregate over a group with "
            "cellkit.analysis.gene_attention(...)."
        )
    tokens, _ = next(src.chunks())
    names = np.asarray(model.vocab.tokens, dtype=object)
    all_heads = list(range(model.config.encoder.n_heads)) if head_list is None else head_list
    out: list[CellAttention | None] = [None] * len(tokens)
    attn = model.encoder.layers[idx_layer].self_attn
    with (
        _Eval(model, device, prec) as dev,
        track(progress, total=len(tokens), desc="attention maps") as bar,
    ):
        for idx, gene_ids, real, x in _batches(model, tokens, batch_size, dev, idx_layer, attn_backend, bar):
            _, probs = attn(x, ~real, backend="explicit", need_weights=True)  # (B, H, L, L)
            probs = probs[:, all_heads]
            for b, i in enumerate(idx.tolist()):
                pos = real[b].nonzero().squeeze(1)
                p = probs[b][:, pos][:, :, pos].float().cpu().numpy()
                ids = gene_ids[b, pos].cpu().numpy()
                out[i] = CellAttention(
                    str(tokens.obs_names[i]), names[ids].astype(str), ids, p, idx_layer, list(all_heads)
                )
    empty = [str(tokens.obs_names[i]) for i, o in enumerate(out) if o is None]
    if empty:
        raise DataError(f"{len(empty)} selected cells have no tokens, e.g. {empty[:3]}.")
    if not isinstance(adata, TokenizedCells | ShardedTokens):  # tokenize() returns cells in obs order
        where = {str(n): i for i, n in enumerate(tokens.obs_names)}
        order = [where[str(n)] for n in adata.obs_names[src.positions] if str(n) in where]
        out = [out[i] for i in order]
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- gene × gene maps
def _rank(x: torch.Tensor, dim: int) -> torch.Tensor:
    """0-based ranks along ``dim`` (argsort of argsort; ties by position)."""
    return torch.argsort(torch.argsort(x, dim=dim, stable=True), dim=dim, stable=True)


def _grn_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """scGPT's attention-GRN statistic of one cell (facts §6.3) per head.

    Parameters
    ----------
    q, k
        ``(M, H, dh)`` queries and keys of the cell's ``M`` real tokens.

    Returns
    -------
    ``(H, M, M)``: raw ``q·kᵀ`` rank-normalised by row (over keys, ``/ M``), then by column (over
    queries, ``/ M``).
    """
    m = q.shape[0]
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float())
    r = _rank(s, -1).to(torch.float32) / m
    return _rank(r, -2).to(torch.float32) / m


@dataclass(frozen=True)
class _MapSpec:
    """What a gene × gene map is made of: one transformer layer's attention, checked once."""

    hidden_layer: int
    head: int | None
    statistic: str
    genes: Sequence[str] | None
    include_special: bool
    max_genes: int
    batch_size: int
    attn_backend: str
    device: str
    precision: str
    progress: bool | Progress

    @classmethod
    def checked(
        cls, model: CellModel, *, hidden_layer: Any, head: Any, genes: Sequence[str] | None, **kw: Any
    ) -> _MapSpec:
        """Validate the options shared by :func:`gene_attention` and :func:`attention_difference`."""
        _check_statistic(kw["statistic"])
        _check_backend(kw["attn_backend"])
        if genes is not None:
            _gene_ids(model, genes)
        kw["precision"] = _resolve_precision(kw["precision"], kw["device"])
        return cls(_resolve_layer(model, hidden_layer), _resolve_head(model, head), genes=genes, **kw)

    def params(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            "hidden_layer": self.hidden_layer,
            "head": -1 if self.head is None else self.head,
        }


def _accumulate(
    model: CellModel, src: _Source, spec: _MapSpec, *, n_groups: int
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Gene names, ``(n_groups, G, G)`` sums and counts, and cells per group."""
    vocab = model.vocab
    genes, head, statistic, hidden_layer = spec.genes, spec.head, spec.statistic, spec.hidden_layer
    special = np.zeros(len(vocab), dtype=bool)
    special[list(vocab.special_ids)] = True
    if genes is not None:
        ids = _gene_ids(model, genes)
    else:  # first pass: the genes of the selected cells (tokens only; no model)
        seen = np.zeros(len(vocab), dtype=bool)
        for toks, _ in src.chunks():
            seen[toks.gene_ids] = True
        if not spec.include_special:
            seen &= ~special
        ids = np.flatnonzero(seen)
    g = len(ids)
    if g > spec.max_genes:
        gb = 2 * n_groups * g * g * 8 / 1e9
        raise ConfigError(
            f"{g:,} genes occur in the selected cells: a {g:,} × {g:,} map needs about {gb:.1f} GB. Pass "
            f"genes=[...] (e.g. the highly variable genes) or raise max_genes (now {spec.max_genes:,})."
        )
    lut = np.full(len(vocab), -1, dtype=np.int64)
    lut[ids] = np.arange(g)
    sums = counts = None
    n_cells = np.zeros(n_groups, dtype=np.int64)
    attn = model.encoder.layers[hidden_layer].self_attn
    with (
        _Eval(model, spec.device, spec.precision) as dev,
        track(spec.progress, total=len(src.positions), desc="gene × gene attention") as bar,
    ):
        lut_t = torch.as_tensor(lut, device=dev)
        sums = torch.zeros(n_groups * g * g, dtype=torch.float64, device=dev)
        counts = torch.zeros(n_groups * g * g, dtype=torch.int64, device=dev)
        for toks, codes in src.chunks():
            for idx, gene_ids, real, x in _batches(
                model, toks, spec.batch_size, dev, hidden_layer, spec.attn_backend, bar
            ):
                if statistic == "probability":
                    _, probs = attn(x, ~real, backend="explicit", need_weights=True)  # (B, H, L, L)
                    maps = probs.mean(1) if head is None else probs[:, head]  # (B, L, L)
                else:
                    q, k, _ = attn.project(x)  # each (B, L, H, dh)
                    if head is not None:
                        q, k = q[:, :, head : head + 1], k[:, :, head : head + 1]
                gidx = lut_t[gene_ids]  # (B, L), -1 outside the gene space
                for b, i in enumerate(idx.tolist()):
                    pos = real[b].nonzero().squeeze(1)
                    if statistic == "probability":
                        a = maps[b][pos][:, pos]
                    else:
                        a = _grn_map(q[b, pos], k[b, pos]).mean(0)
                    gi = gidx[b, pos]
                    keep = gi >= 0
                    gi, a = gi[keep], a[keep][:, keep]
                    base = int(codes[i]) * g * g
                    flat = (base + gi[:, None] * g + gi[None, :]).reshape(-1)
                    sums.index_add_(0, flat, a.reshape(-1).to(torch.float64))
                    counts.index_add_(0, flat, torch.ones_like(flat))
                    n_cells[codes[i]] += 1
        all_tokens = vocab.tokens
        names = [all_tokens[i] for i in ids]
        shape = (n_groups, g, g)
        return names, sums.cpu().numpy().reshape(shape), counts.cpu().numpy().reshape(shape), n_cells


def _mean_frame(names: list[str], sums: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
    idx = pd.Index(names)
    return pd.DataFrame(mean, index=idx.rename("query"), columns=idx.rename("key"))


def gene_attention(
    adata: AnnData | TokenizedCells,
    model: CellModel,
    *,
    cells: Any = None,
    groupby: str | None = None,
    groups: Any = None,
    hidden_layer: int = -1,
    head: int | None = None,
    genes: Sequence[str] | None = None,
    statistic: str = "probability",
    include_special: bool = False,
    return_counts: bool = False,
    key_added: str | None = None,
    batch_size: int = 8,
    chunk_size: int = 2_000,
    max_genes: int = MAX_GENES,
    attn_backend: str = "sdpa",
    device: str = "auto",
    precision: str = "fp32",
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    overwrite: bool = False,
    progress: bool | Progress = True,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Gene × gene attention aggregated over a group of cells, genes aligned by identity.

    Entry ``(a, b)`` is the mean, over the selected cells where both genes occur, of the attention
    from query gene ``a`` to key gene ``b`` (NaN where they never co-occur). Cells are processed
    batch by batch into one ``G × G`` sum and count: memory is ``O(G² + one batch's B·H·L²)``.

    Parameters
    ----------
    adata
        An AnnData (tokenized here, ``chunk_size`` cells at a time) or tokens.
    model
        Any loaded :class:`cellkit.CellModel`.
    cells
        Which cells (mask, positions, names, or a query string, see :func:`cellkit.data.select_cells`);
        default all.
    groupby, groups
        An ``obs`` column and the label (or list of labels, pooled) to aggregate over.
    hidden_layer
        Transformer layer (``-1`` = last).
    head
        One head, or ``None`` for the mean over heads.
    genes
        The gene space (rows and columns, in this order); default every gene in the selected cells
        (vocabulary order), special tokens left out unless ``include_special``.
    statistic
        ``"probability"`` (softmax probabilities) or ``"grn"`` (scGPT's rank statistic, see the
        module docs; ``M`` = the cell's real tokens, ``<cls>`` included).
    include_special
        Keep ``<cls>`` etc. as rows/columns (only when ``genes`` is not given).
    return_counts
        Also return the ``G × G`` number of cells in which both genes occur.
    key_added
        Also store ``{"values", "counts", "genes", "params"}`` in ``adata.uns[key_added]`` (read
        back by :func:`top_influenced_genes`); nothing is written otherwise.
    batch_size
        Cells per forward pass (the ``B·H·L²`` probabilities of a batch exist at once).
    chunk_size
        Cells tokenized at a time (with ``genes=None`` and more than one chunk, the cells are
        tokenized twice: once to find the gene space).
    max_genes
        Refuse a larger gene space (``G × G`` memory); pass ``genes=`` instead.
    attn_backend
        Backend of the layers before ``hidden_layer``: ``"sdpa"`` or ``"explicit"``.
    device
        ``"auto"``: CUDA when available.
    precision
        ``"fp32"`` (default, exact), ``"bf16"`` (GPUs, and CPUs with AMX / AVX512-BF16; elsewhere it
        stays fp32 with a warning) or ``"fp16"`` (CUDA); sums are accumulated in float64 either way.
    tokenize_options, layer, use_raw, gene_column
        Passed to :func:`cellkit.tokenize` (``layer`` is the AnnData expression layer).
    overwrite
        Replace ``uns[key_added]`` even when cellkit did not write it.
    progress
        ``True``: a progress bar over the cells; a :class:`cellkit.Progress` follows the call and
        can cancel it (:class:`cellkit.Cancelled`; nothing is stored in ``uns``).

    Returns
    -------
    ``(G, G)`` float32 DataFrame (index ``query``, columns ``key``; ``attrs`` hold the settings and
    ``n_cells``), and with ``return_counts`` the int64 co-occurrence counts too.
    """
    spec = _MapSpec.checked(
        model,
        hidden_layer=hidden_layer,
        head=head,
        genes=genes,
        statistic=statistic,
        include_special=include_special,
        max_genes=max_genes,
        batch_size=batch_size,
        attn_backend=attn_backend,
        device=device,
        precision=precision,
        progress=progress,
    )
    check_adata(adata, what="cellkit.analysis.gene_attention", allow_other=True)
    if key_added is not None and isinstance(adata, TokenizedCells | ShardedTokens):
        raise ConfigError("key_added needs an AnnData; with tokens, keep the returned DataFrame.")
    if key_added is not None:
        check_keys_free(
            adata, [("uns", key_added)], overwrite=overwrite, what="cellkit.analysis.gene_attention"
        )
    group_list = None if groups is None else _as_list(groups)
    src = _source(
        adata,
        model,
        cells=cells,
        groupby=groupby,
        groups=group_list,
        pool_groups=True,
        chunk_size=chunk_size,
        tokenize_kwargs=_tokenize_kwargs(tokenize_options, layer, use_raw, gene_column),
    )
    names, sums, counts, n_cells = _accumulate(model, src, spec, n_groups=1)
    df = _mean_frame(names, sums[0], counts[0])
    params = {
        **spec.params(),
        "n_cells": int(n_cells[0]),
        "groupby": groupby or "",
        "groups": [str(g) for g in group_list or []],
    }
    df.attrs.update(params)
    if key_added is not None:
        adata.uns[key_added] = {
            "values": df.to_numpy(),
            "counts": counts[0],
            "genes": np.asarray(names, dtype=object),
            "params": params,
        }
        record_written(adata, [("uns", key_added)])
    if return_counts:
        cdf = pd.DataFrame(counts[0], index=df.index, columns=df.columns)
        return df, cdf
    return df


def _as_list(groups: Any) -> list[Any]:
    if isinstance(groups, str) or not isinstance(groups, Iterable):
        return [groups]
    return list(groups)


def top_influenced_genes(
    attention: pd.DataFrame | AnnData,
    gene: str,
    *,
    k: int = 20,
    key: str = "gene_attention",
    include_self: bool = False,
    min_cells: int = 1,
    counts: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The query genes that attend most to ``gene`` (its column of a gene × gene map).

    scGPT's "most influenced genes" of a transcription factor: column = the TF (key), rows ranked.

    Parameters
    ----------
    attention
        A map from :func:`gene_attention` (query rows, key columns), or an AnnData holding one in
        ``uns[key]`` (``gene_attention(..., key_added=key)``).
    gene
        The key gene.
    k
        How many genes.
    key
        ``uns`` key when ``attention`` is an AnnData.
    include_self
        Keep ``gene`` itself among the candidates.
    min_cells
        Keep only genes that co-occur with ``gene`` in at least this many cells: a mean over one
        or two cells is noise that would otherwise top the ranking. Needs the counts (an AnnData
        from ``gene_attention(..., key_added=...)`` or ``counts=``).
    counts
        The ``G × G`` co-occurrence counts of a map passed as a DataFrame
        (``gene_attention(..., return_counts=True)``).

    Returns
    -------
    Tidy DataFrame, best first: ``rank`` (1-based), ``gene``, ``score`` (and ``n_cells`` when the
    counts are known). Genes that never co-occur with ``gene`` (NaN) are left out.
    """
    _check_min_cells(min_cells)
    if isinstance(attention, pd.DataFrame):
        df = attention
    else:
        if key not in attention.uns:
            raise DataError(
                f"uns[{key!r}] does not exist; run gene_attention(adata, model, key_added={key!r}) first."
            )
        stored = attention.uns[key]
        names = pd.Index(np.asarray(stored["genes"]).astype(str))
        df = pd.DataFrame(np.asarray(stored["values"]), index=names, columns=names)
        counts = pd.DataFrame(np.asarray(stored["counts"]), index=names, columns=names)
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}.")
    if gene not in df.columns:
        raise unknown_gene_error(
            gene, [str(c) for c in df.columns], where=f"this attention map ({df.shape[1]:,} genes)"
        )
    if min_cells > 1 and counts is None:
        raise ConfigError(
            "min_cells needs the co-occurrence counts: pass counts= (gene_attention(..., return_counts=True)) "
            "or an AnnData with uns[key] from gene_attention(..., key_added=key)."
        )
    col = df[gene]
    if not include_self:
        col = col.drop(index=gene, errors="ignore")
    col = col.dropna()
    if min_cells > 1:
        col = col[counts[gene].reindex(col.index).fillna(0).to_numpy() >= min_cells]
    order = np.argsort(-col.to_numpy(), kind="stable")[:k]
    out = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "gene": col.index[order].astype(str),
            "score": col.to_numpy()[order],
        }
    )
    if counts is not None:
        out["n_cells"] = counts[gene].loc[out["gene"]].to_numpy()
    return out


def attention_difference(
    adata: AnnData | TokenizedCells,
    model: CellModel,
    *,
    groupby: str,
    condition: Any,
    control: Any,
    gene: str | None = None,
    k: int | None = None,
    min_cells: int = 1,
    cells: Any = None,
    hidden_layer: int = -1,
    head: int | None = None,
    genes: Sequence[str] | None = None,
    statistic: str = "probability",
    include_special: bool = False,
    batch_size: int = 8,
    chunk_size: int = 2_000,
    max_genes: int = MAX_GENES,
    attn_backend: str = "sdpa",
    device: str = "auto",
    precision: str = "fp32",
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    progress: bool | Progress = True,
) -> pd.DataFrame:
    """Condition − control of the gene × gene map (one pass over both groups).

    With ``statistic="grn"`` and ``gene`` = a perturbed TF this is scGPT's attention-GRN
    comparison (the query genes whose attention to the TF changes most).

    Parameters
    ----------
    adata, model
        As in :func:`gene_attention`.
    groupby
        ``obs`` column holding the labels.
    condition, control
        The two labels.
    gene
        Keep only the pairs whose key is this gene (the genes it influences).
    k
        Keep the ``k`` largest differences.
    min_cells
        Keep only pairs that co-occur in at least this many cells of *each* group (a difference
        of two one-cell means is noise).
    cells, hidden_layer, head, genes, statistic, include_special, batch_size, chunk_size, max_genes
        As in :func:`gene_attention`; the gene space is shared by both groups.
    attn_backend, device, precision
        As in :func:`gene_attention`.
    tokenize_options, layer, use_raw, gene_column
        Passed to :func:`cellkit.tokenize` (``layer`` is the AnnData expression layer).
    progress
        ``True``: a progress bar over the cells; a :class:`cellkit.Progress` follows the call and
        can cancel it (:class:`cellkit.Cancelled`).

    Returns
    -------
    Tidy DataFrame sorted by ``difference`` (largest first, NaN last): ``query_gene``, ``key_gene``,
    ``condition``, ``control``, ``difference``, ``n_cells_condition``, ``n_cells_control`` (cells in
    which both genes occur). ``attrs`` name the labels and settings.
    """
    check_adata(adata, what="cellkit.analysis.attention_difference", allow_other=True)
    spec = _MapSpec.checked(
        model,
        hidden_layer=hidden_layer,
        head=head,
        genes=genes,
        statistic=statistic,
        include_special=include_special,
        max_genes=max_genes,
        batch_size=batch_size,
        attn_backend=attn_backend,
        device=device,
        precision=precision,
        progress=progress,
    )
    _check_min_cells(min_cells)
    if gene is not None and genes is None and str(gene) not in model.vocab:
        raise model.vocab.unknown_gene_error(
            str(gene), where=f"the model's vocabulary ({len(model.vocab):,} tokens)"
        )
    if condition == control:
        raise ConfigError(f"condition and control are the same label ({condition!r}).")
    src = _source(
        adata,
        model,
        cells=cells,
        groupby=groupby,
        groups=[condition, control],
        chunk_size=chunk_size,
        tokenize_kwargs=_tokenize_kwargs(tokenize_options, layer, use_raw, gene_column),
    )
    names, sums, counts, n_cells = _accumulate(model, src, spec, n_groups=2)
    cond = _mean_frame(names, sums[0], counts[0])
    ctrl = _mean_frame(names, sums[1], counts[1])
    if gene is not None and gene not in cond.columns:
        raise unknown_gene_error(str(gene), names, where=f"the genes of the selected cells ({len(names):,})")
    g = len(names)
    q_idx, k_idx = np.divmod(np.arange(g * g), g)
    out = pd.DataFrame(
        {
            "query_gene": np.asarray(names, dtype=object)[q_idx],
            "key_gene": np.asarray(names, dtype=object)[k_idx],
            "condition": cond.to_numpy().ravel(),
            "control": ctrl.to_numpy().ravel(),
            "n_cells_condition": counts[0].ravel(),
            "n_cells_control": counts[1].ravel(),
        }
    )
    out.insert(4, "difference", out["condition"] - out["control"])
    if gene is not None:
        out = out[out["key_gene"] == gene]
    if min_cells > 1:
        out = out[(out["n_cells_condition"] >= min_cells) & (out["n_cells_control"] >= min_cells)]
    out = out.sort_values("difference", ascending=False, kind="stable", na_position="last")
    if k is not None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}.")
        out = out.head(k)
    out = out.reset_index(drop=True)
    out.attrs.update(
        {
            **spec.params(),
            "groupby": groupby,
            "condition": str(condition),
            "control": str(control),
            "n_cells_condition": int(n_cells[0]),
            "n_cells_control": int(n_cells[1]),
            "min_cells": int(min_cells),
        }
    )
    return out
