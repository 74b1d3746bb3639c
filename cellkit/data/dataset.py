"""Torch datasets and samplers over tokenized cells.

- :class:`CellDataset`: map-style, random access to the cells of a
  :class:`~cellkit.data.tokenized.TokenizedCells` or a shard directory.
- :class:`ShardStreamDataset`: iterable, reads a shard directory one shard at a time and splits it
  across DataLoader workers *and* distributed ranks so every cell comes once per epoch.
- :class:`LengthBucketSampler`: batches of cells of similar length for map-style datasets, with
  distributed splitting; less padding, faster steps.

Items are dicts of numpy arrays: ``gene_ids`` ``(n,)`` plus ``values`` / ``token_type_ids`` when
the scheme has them, the scalars ``index`` (position of the cell in the dataset, to put outputs
back in order), ``cell_key`` (int64 view of a stable hash of the cell name; the key of the
collator's masks) and, when asked for, ``labels`` / ``batch_labels`` (int codes of obs columns).
Collate them with :class:`~cellkit.data.collate.Collator`.

Randomness (shuffling, bucketing order) is a hash of ``(seed, epoch, …)``: every rank and worker
computes the same plan without talking to the others. Call ``set_epoch`` before each epoch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from cellkit._errors import DataError

from ._hashing import cell_key, uniform_hash
from .collate import Collator
from .tokenized import CellReader, ShardedTokens, ShardSubset, TokenizedCells

__all__ = ["CellDataset", "LengthBucketSampler", "ShardStreamDataset"]

Tokens = TokenizedCells | ShardedTokens | ShardSubset
#: label code of a cell whose label is missing (ignored by ``CrossEntropyLoss``)
MISSING_LABEL = -100
#: strings that mark a missing value once an obs column went through ``astype(str)`` (shards)
_MISSING_STRINGS = frozenset({"nan", "NaN", "None", "<NA>", ""})
# stream ids of the hashes below (last key), so that no two decisions share a draw
_SHARD_ORDER, _CELL_ORDER, _BATCH_ORDER, _SAMPLER_PERM, _SAMPLER_BATCHES = 101, 102, 103, 104, 105


# ====================================================================================== helpers
def _open_tokens(tokens: Tokens | str | os.PathLike[str]) -> Tokens:
    if isinstance(tokens, (TokenizedCells, ShardedTokens, ShardSubset)):
        return tokens
    if isinstance(tokens, (str, os.PathLike)):
        return ShardedTokens(tokens)
    raise DataError(
        f"Expected TokenizedCells, ShardedTokens (or a subset of one) or a shard directory path, got "
        f"{type(tokens).__name__}. "
        "Tokenize the cells first (cellkit.tokenize)."
    )


def _take_shard(tokens: ShardedTokens, k: int) -> TokenizedCells:
    """Shard ``k`` without leaving it in the reader's own cache (the caller bounds what stays open)."""
    return tokens.shard(k, cache=False)


def _natural_sort(values: Sequence[str]) -> list[str]:
    """Numeric order when every value parses as a number (``"2" < "10"``), else lexicographic."""
    values = sorted(set(values))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _obs_columns(tokens: Tokens) -> list[str]:
    if isinstance(tokens, (ShardedTokens, ShardSubset)):
        return list(tokens.manifest.get("obs_columns") or {})
    return [] if tokens.obs is None else [str(c) for c in tokens.obs.columns]


class _Encoder:
    """Maps an obs column to int codes ``0 … len(classes) - 1`` (same classes for every shard)."""

    def __init__(
        self, tokens: Tokens, key: str, classes: Sequence[Any] | None, *, what: str, allow_missing: bool
    ) -> None:
        available = _obs_columns(tokens)
        if key not in available:
            raise DataError(
                f"{what}={key!r} is not a column of these tokens; available columns: {available or 'none'}. "
                "Keep the column when tokenizing (it must be in the obs carried along)."
            )
        self.key, self.what, self.allow_missing = key, what, allow_missing
        if classes is None:
            if isinstance(tokens, (ShardedTokens, ShardSubset)):
                seen = [str(c) for c in tokens.manifest["obs_columns"][key]]
            else:
                col = tokens.obs[key]
                seen = col[~col.isna()].astype(str).unique().tolist()
            classes = _natural_sort([c for c in seen if c not in _MISSING_STRINGS])
        self.classes = [str(c) for c in classes]
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f"The classes given for {what}={key!r} contain duplicates: {self.classes}.")

    def encode(self, obs: pd.DataFrame | None) -> np.ndarray:
        """``(n,)`` int64 codes of the column in ``obs`` (``-100`` for missing labels)."""
        if obs is None or self.key not in obs:
            raise DataError(f"These cells have no {self.key!r} column.")
        col = obs[self.key]
        strs = col.astype(str).astype(object)
        missing = col.isna().to_numpy() | strs.isin(_MISSING_STRINGS).to_numpy()
        codes = pd.Categorical(strs, categories=self.classes).codes.astype(np.int64)
        unknown = (codes < 0) & ~missing
        if unknown.any():
            examples = pd.unique(strs[unknown])[:5].tolist()
            raise DataError(
                f"{self.what}={self.key!r} has values that are not among the classes, e.g. {examples}; "
                f"pass classes including them (now {self.classes[:10]}{' …' if len(self.classes) > 10 else ''})."
            )
        if missing.any():
            if not self.allow_missing:
                raise DataError(
                    f"{int(missing.sum())} cells have no {self.key!r} value; {self.what} must be set for every "
                    "cell (fill the missing values or drop those cells)."
                )
            codes[missing] = MISSING_LABEL
        return codes

    def encode_categorical(self, col: pd.Categorical) -> np.ndarray:
        """What :meth:`encode` gives for a categorical column, working on its categories only.

        A shard directory's obs column comes as category codes (one small integer per cell): the
        categories are encoded once and the cells' codes looked up, so no string is made per cell.
        Same codes and the same errors as :meth:`encode` on the column's values.
        """
        strs = pd.Series(np.asarray(col.categories).astype(str), dtype=object)
        missing_cat = strs.isin(_MISSING_STRINGS).to_numpy()
        per_cat = pd.Categorical(strs, categories=self.classes).codes.astype(np.int64)
        per_cat[missing_cat] = MISSING_LABEL
        # a cell without a category (code -1) is missing too; -1 in the result marks unknown values
        lut = np.append(per_cat, MISSING_LABEL)
        codes = lut[np.asarray(col.codes)]
        unknown = codes == -1
        if unknown.any():
            used = np.unique(np.asarray(col.codes)[unknown])
            examples = strs.iloc[used].tolist()[:5]
            raise DataError(
                f"{self.what}={self.key!r} has values that are not among the classes, e.g. {examples}; "
                f"pass classes including them (now {self.classes[:10]}{' …' if len(self.classes) > 10 else ''})."
            )
        missing = codes == MISSING_LABEL
        if not self.allow_missing and missing.any():
            raise DataError(
                f"{int(missing.sum())} cells have no {self.key!r} value; {self.what} must be set for every "
                "cell (fill the missing values or drop those cells)."
            )
        return codes


class _CellSource:
    """Shared machinery: encoders, item building, pickling without open memory maps."""

    tokens: Tokens

    def _init_source(
        self,
        tokens: Tokens | str | os.PathLike[str],
        label_key: str | None,
        batch_key: str | None,
        classes: Sequence[Any] | None,
        batch_classes: Sequence[Any] | None,
    ) -> None:
        self.tokens = _open_tokens(tokens)
        self.label_key, self.batch_key = label_key, batch_key
        self._label_enc = (
            None
            if label_key is None
            else _Encoder(self.tokens, label_key, classes, what="label_key", allow_missing=True)
        )
        self._batch_enc = (
            None
            if batch_key is None
            else _Encoder(self.tokens, batch_key, batch_classes, what="batch_key", allow_missing=False)
        )

    @property
    def classes(self) -> list[str] | None:
        """Class names of ``label_key``; ``labels`` are indices into this list."""
        return None if self._label_enc is None else list(self._label_enc.classes)

    @property
    def batch_classes(self) -> list[str] | None:
        """Batch names of ``batch_key``; ``batch_labels`` are indices into this list."""
        return None if self._batch_enc is None else list(self._batch_enc.classes)

    @property
    def n_classes(self) -> int | None:
        return None if self._label_enc is None else len(self._label_enc.classes)

    def _codes(self, cells: TokenizedCells) -> dict[str, np.ndarray]:
        out = {}
        if self._label_enc is not None:
            out["labels"] = self._label_enc.encode(cells.obs)
        if self._batch_enc is not None:
            out["batch_labels"] = self._batch_enc.encode(cells.obs)
        return out

    @staticmethod
    def _item(
        cells: TokenizedCells, j: int, index: int, codes: dict[str, np.ndarray], at: int | None = None
    ) -> dict[str, Any]:
        """Cell ``j`` of ``cells`` as an item; its codes are ``codes[...][at]`` (default ``j``)."""
        a, b = int(cells.offsets[j]), int(cells.offsets[j + 1])
        item: dict[str, Any] = {f: np.array(getattr(cells, f)[a:b]) for f in cells.fields}
        item["index"] = index
        item["cell_key"] = int(cell_key(str(cells.obs_names[j])).view(np.int64))
        row = j if at is None else at
        for name, arr in codes.items():
            item[name] = int(arr[row])
        return item

    def __getstate__(self) -> dict[str, Any]:
        # memory-mapped shards would be pickled as full copies: send the path, reopen on the other side
        state = self.__dict__.copy()
        if isinstance(self.tokens, ShardedTokens):
            state["tokens"] = str(self.tokens.path)
        state["_open"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("tokens"), str):
            state["tokens"] = ShardedTokens(state["tokens"])
        self.__dict__.update(state)


# ====================================================================================== map-style
class CellDataset(_CellSource, Dataset):
    """Map-style dataset over tokenized cells.

    Parameters
    ----------
    tokens
        A :class:`~cellkit.data.tokenized.TokenizedCells`, a
        :class:`~cellkit.data.tokenized.ShardedTokens`, a
        :class:`~cellkit.data.tokenized.ShardSubset` (some cells of a shard directory, e.g. a
        training split: ``shards.subset(train_idx)``) or the path of a shard directory. Shards are
        read lazily: a cell's tokens are read from its shard file when it is asked for (npy
        shards: positional reads, so no page stays mapped and memory does not grow with the cells
        read), and the label / batch codes come from the obs columns alone (one small integer per
        cell).
    label_key
        Obs column whose codes become ``labels`` (classification targets). Missing values get
        ``-100``, which ``CrossEntropyLoss`` ignores.
    batch_key
        Obs column whose codes become ``batch_labels`` (DSBN, batch-label decoders); every cell
        needs one.
    classes, batch_classes
        The class names in code order. Default: the column's distinct values as strings, sorted
        (numerically when they are all numbers), so in-memory tokens and their shards agree. Pass
        them to share one coding between datasets (train / test).
    max_open_shards
        Shards kept open for random access over a shard directory; each costs a few file
        descriptors. Random access over many more shards than this is slow: stream them
        with :class:`ShardStreamDataset` or load them with ``ShardedTokens.to_memory()``.

    Attributes
    ----------
    classes, batch_classes
        ``list[str]`` or ``None``.
    lengths
        ``(n_cells,)`` tokens per cell (for :class:`LengthBucketSampler`).
    label_codes, batch_codes
        ``(n_cells,)`` the ``labels`` / ``batch_labels`` of every item, read without the tokens.

    Examples
    --------
    >>> ds = CellDataset(tokens, label_key="cell_type")  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_sampler=LengthBucketSampler(ds, 32),
    ...                     collate_fn=Collator.for_tokens(tokens))  # doctest: +SKIP
    """

    def __init__(
        self,
        tokens: Tokens | str | os.PathLike[str],
        *,
        label_key: str | None = None,
        batch_key: str | None = None,
        classes: Sequence[Any] | None = None,
        batch_classes: Sequence[Any] | None = None,
        max_open_shards: int = 64,
    ) -> None:
        self._init_source(tokens, label_key, batch_key, classes, batch_classes)
        if max_open_shards < 1:
            raise DataError(f"max_open_shards must be >= 1, got {max_open_shards}.")
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, CellReader | TokenizedCells] = OrderedDict()
        self._lengths: np.ndarray | None = None
        self._mem_codes = self._codes(self.tokens) if isinstance(self.tokens, TokenizedCells) else {}
        self._shard_codes: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def _all_codes(self) -> dict[str, np.ndarray]:
        """``labels`` / ``batch_labels`` codes of every item (shards: from the obs columns alone, once)."""
        if isinstance(self.tokens, TokenizedCells):
            return self._mem_codes
        if self._shard_codes is None:
            out = {}
            for name, enc in (("labels", self._label_enc), ("batch_labels", self._batch_enc)):
                if enc is not None:
                    codes = enc.encode_categorical(self.tokens.obs_column(enc.key))
                    out[name] = codes.astype(np.int16 if len(enc.classes) < 2**15 else np.int32)
            self._shard_codes = out
        return self._shard_codes

    @property
    def label_codes(self) -> np.ndarray | None:
        """``(n_cells,)`` int64 ``labels`` of the items (``-100``: missing); ``None`` without ``label_key``."""
        codes = self._all_codes().get("labels")
        return None if codes is None else codes.astype(np.int64)

    @property
    def batch_codes(self) -> np.ndarray | None:
        """``(n_cells,)`` int64 ``batch_labels`` of the items; ``None`` without ``batch_key``."""
        codes = self._all_codes().get("batch_labels")
        return None if codes is None else codes.astype(np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """``(n_cells,)`` int64 tokens per cell."""
        if self._lengths is None:
            self._lengths = np.asarray(self.tokens.lengths, dtype=np.int64)
        return self._lengths

    def _shard(self, reader: ShardedTokens, k: int) -> CellReader | TokenizedCells:
        """Shard ``k``'s cell reader (npy: positional reads, nothing stays mapped; parquet: the shard)."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        cells = self._open[k] = reader.cell_reader(k)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return cells

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Cell ``i``: ``gene_ids`` (+ ``values``, ``token_type_ids``), ``index``, ``cell_key``, labels."""
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"cell {i} out of range for {n} cells")
        i %= n
        if isinstance(self.tokens, TokenizedCells):
            return self._item(self.tokens, i, i, self._mem_codes)
        codes = self._all_codes()
        if isinstance(self.tokens, ShardSubset):
            reader, cell = self.tokens.tokens, int(self.tokens.index[i])
        else:
            reader, cell = self.tokens, i
        k, j = reader.locate(cell)
        shard = self._shard(reader, k)
        if isinstance(shard, TokenizedCells):
            return self._item(shard, j, i, codes, at=i)
        item: dict[str, Any] = {f: np.array(arr) for f, arr in shard.cell(j).items()}
        item["index"] = i
        item["cell_key"] = int(cell_key(shard.name(j)).view(np.int64))
        for name, arr in codes.items():
            item[name] = int(arr[i])
        return item

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={key!r}"
            for name, key in (("label_key", self.label_key), ("batch_key", self.batch_key))
            if key
        )
        return f"CellDataset({len(self):,} cells{extra})"


# ====================================================================================== streaming
Slice = tuple[int, int, int]  # (shard, start, step) over the shard's (possibly shuffled) cell order


def split_slices(slices: Sequence[Slice], n: int, i: int) -> list[Slice]:
    """The part of ``slices`` that consumer ``i`` of ``n`` reads; the parts of all ``n`` partition them.

    With at least ``n`` slices, consumer ``i`` takes whole slices ``i, i + n, …``. With fewer, each
    slice ``p`` is shared by the consumers ``p, p + len(slices), …``, which split its cells by
    stride, so every consumer reads exactly one (part of a) slice.

    Parameters
    ----------
    slices
        ``(shard, start, step)``: the cells at positions ``start, start + step, …`` of a shard.
    n, i
        Number of consumers and which one.
    """
    if not 0 <= i < n:
        raise DataError(f"consumer {i} out of range for {n} consumers.")
    s = len(slices)
    if s >= n or s == 0:
        return list(slices[i::n])
    p, j = i % s, i // s
    shares = len(range(p, n, s))
    shard, start, step = slices[p]
    return [(shard, start + j * step, step * shares)]


def _resolve_dist(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return int(rank), int(world_size)


class ShardStreamDataset(_CellSource, IterableDataset):
    """Stream a shard directory, split across DataLoader workers and distributed ranks.

    Every cell is yielded exactly once per epoch over all ranks and workers together. Shards are
    dealt out whole to ranks, then to the workers of a rank; where there are fewer shards than
    consumers, a shard's cells are split by stride between the consumers that share it. Only one
    shard per worker is open at a time.

    Parameters
    ----------
    tokens
        A :class:`~cellkit.data.tokenized.ShardedTokens` or the path of a shard directory.
    shuffle
        Shuffle the shard order and the cells within each shard (and the order of the bucketed
        batches), differently each epoch, identically on every rank.
    seed
        Seed of the shuffling.
    rank, world_size
        This process's rank and the number of ranks; default from ``torch.distributed`` when it is
        initialised, else ``0`` and ``1``.
    label_key, batch_key, classes, batch_classes
        As in :class:`CellDataset`.
    batch_size
        Yield collated batches of this many cells instead of single cells; use with
        ``DataLoader(dataset, batch_size=None)``.
    bucket_buffer
        With ``batch_size``: gather this many cells, sort them by length and cut them into batches
        (less padding); ``None`` batches cells in stream order.
    collate_fn
        Turns a list of items into a batch (default ``Collator.for_tokens(tokens)``). Its
        ``set_epoch`` is called by :meth:`set_epoch`.
    drop_last
        With ``batch_size``: drop each worker's last, incomplete batch.

    Notes
    -----
    Ranks can receive different numbers of cells (whole shards differ in size). Write many more
    shards than ``world_size × num_workers`` to keep them balanced, and guard distributed training
    against uneven inputs (e.g. ``torch.distributed.algorithms.Join``). Call :meth:`set_epoch`
    before each epoch and do not use ``persistent_workers=True`` (workers keep the epoch they
    started with).
    """

    def __init__(
        self,
        tokens: ShardedTokens | str | os.PathLike[str],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        label_key: str | None = None,
        batch_key: str | None = None,
        classes: Sequence[Any] | None = None,
        batch_classes: Sequence[Any] | None = None,
        batch_size: int | None = None,
        bucket_buffer: int | None = None,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        drop_last: bool = False,
    ) -> None:
        if isinstance(tokens, TokenizedCells):
            raise DataError(
                "ShardStreamDataset streams a shard directory; write the cells with tokens.to_shards(path) "
                "or use CellDataset for in-memory tokens."
            )
        self._init_source(tokens, label_key, batch_key, classes, batch_classes)
        self.rank, self.world_size = _resolve_dist(rank, world_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0
        if batch_size is not None and batch_size < 1:
            raise DataError(f"batch_size must be >= 1 (or None for single cells), got {batch_size}.")
        if bucket_buffer is not None:
            if batch_size is None:
                raise DataError("bucket_buffer needs batch_size: buckets are cut into batches of that size.")
            if bucket_buffer < batch_size:
                raise DataError(f"bucket_buffer ({bucket_buffer}) must be >= batch_size ({batch_size}).")
        self.batch_size, self.bucket_buffer, self.drop_last = batch_size, bucket_buffer, bool(drop_last)
        if collate_fn is None and batch_size is not None:
            collate_fn = Collator.for_tokens(self.tokens)
        self.collate_fn = collate_fn
        self._open: OrderedDict[int, Any] = OrderedDict()

    @property
    def path(self) -> Path:
        return self.tokens.path  # type: ignore[union-attr]

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle (and the collator's masks) of ``epoch``; call before each epoch."""
        self.epoch = int(epoch)
        if hasattr(self.collate_fn, "set_epoch"):
            self.collate_fn.set_epoch(self.epoch)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ planning
    def _shard_sizes(self) -> np.ndarray:
        return np.diff(self.tokens.shard_offsets)  # type: ignore[union-attr]

    def plan(self, *, num_workers: int = 1, worker: int = 0, epoch: int | None = None) -> list[Slice]:
        """The ``(shard, start, step)`` slices this rank's ``worker`` reads in ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        n_shards = self.tokens.n_shards  # type: ignore[union-attr]
        order = np.arange(n_shards)
        if self.shuffle:
            order = np.argsort(uniform_hash(self.seed, epoch, order, _SHARD_ORDER), kind="stable")
        slices = [(int(k), 0, 1) for k in order]
        mine = split_slices(slices, self.world_size, self.rank)
        return split_slices(mine, num_workers, worker)

    def num_cells(self, epoch: int | None = None) -> int:
        """Cells this rank yields in ``epoch`` (all its workers together)."""
        sizes = self._shard_sizes()
        return sum(len(range(start, int(sizes[k]), step)) for k, start, step in self.plan(epoch=epoch))

    def __len__(self) -> int:
        if self.batch_size is not None:
            raise TypeError(
                "The number of batches depends on the DataLoader's num_workers (each worker ends with its own "
                "partial batch); use num_cells() for the number of cells."
            )
        return self.num_cells()

    def _cell_order(self, k: int, n: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.argsort(uniform_hash(self.seed, epoch, k, np.arange(n), _CELL_ORDER), kind="stable")

    # ------------------------------------------------------------------ iteration
    def iter_cells(self, *, num_workers: int = 1, worker: int = 0) -> Iterator[dict[str, Any]]:
        """Items of one consumer, one shard open at a time (what ``__iter__`` runs in a worker)."""
        epoch = self.epoch
        reader = ShardedTokens(self.path)  # a private reader: nothing cached beyond the current shard
        for k, start, step in self.plan(num_workers=num_workers, worker=worker, epoch=epoch):
            cells = _take_shard(reader, k)
            codes = self._codes(cells)
            base = int(reader.shard_offsets[k])
            for j in self._cell_order(k, len(cells), epoch)[start::step].tolist():
                yield self._item(cells, j, base + j, codes)
            del cells, codes

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        num_workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        cells = self.iter_cells(num_workers=num_workers, worker=worker)
        if self.batch_size is None:
            yield from cells
            return
        yield from self._batches(cells, consumer=self.rank * num_workers + worker)

    def _batches(self, cells: Iterator[dict[str, Any]], consumer: int) -> Iterator[Any]:
        bs = self.batch_size
        cap = self.bucket_buffer or bs
        buffer: list[dict[str, Any]] = []
        flush = 0
        for item in cells:
            buffer.append(item)
            if len(buffer) >= cap:
                batches, buffer = self._cut(buffer, final=False, key=(consumer, flush))
                flush += 1
                for batch in batches:
                    yield self.collate_fn(batch)  # type: ignore[misc]
        batches, _ = self._cut(buffer, final=True, key=(consumer, flush))
        for batch in batches:
            yield self.collate_fn(batch)  # type: ignore[misc]

    def _cut(
        self, buffer: list[dict[str, Any]], *, final: bool, key: tuple[int, int]
    ) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
        bs = self.batch_size or 1
        if self.bucket_buffer:
            buffer = sorted(buffer, key=lambda it: len(it["gene_ids"]))
        n_full = len(buffer) // bs
        batches = [buffer[i * bs : (i + 1) * bs] for i in range(n_full)]
        rest = buffer[n_full * bs :]
        if final and rest:
            if not self.drop_last:
                batches.append(rest)
            rest = []
        if self.shuffle and self.bucket_buffer and len(batches) > 1:
            u = uniform_hash(self.seed, self.epoch, key[0], key[1], np.arange(len(batches)), _BATCH_ORDER)
            batches = [batches[i] for i in np.argsort(u, kind="stable")]
        return batches, rest

    def __repr__(self) -> str:
        return (
            f"ShardStreamDataset({self.path}, {len(self.tokens):,} cells in {self.tokens.n_shards} shards, "  # type: ignore[union-attr]
            f"rank {self.rank}/{self.world_size}, shuffle={self.shuffle})"
        )


# ====================================================================================== sampler
class LengthBucketSampler(Sampler[list[int]]):
    """Batches of cells of similar length (less padding), for map-style datasets.

    With ``shuffle=True`` the cells are permuted, cut into mega-chunks of ``bucket_size`` cells,
    sorted by length within each chunk (longest first), cut into batches, and the batches are
    shuffled. With ``shuffle=False`` the chunks follow the input order and the batches keep their
    order (inference: put the outputs back with the batch's ``index``).

    Parameters
    ----------
    lengths
        ``(n,)`` tokens per cell, or anything with a ``lengths`` attribute (:class:`CellDataset`,
        ``TokenizedCells``).
    batch_size
        Cells per batch.
    bucket_size
        Cells per mega-chunk (rounded up to a multiple of ``batch_size``); default
        ``64 * batch_size``. Larger: less padding, less randomness.
    shuffle
        See above.
    seed
        Seed of the permutations.
    drop_last
        ``False``: every index comes exactly once per epoch over all replicas (replicas may get one
        batch more than others; one batch may be short). ``True``: only full batches, and every
        replica gets the same number of batches (a few cells are left out each epoch).
    num_replicas, rank
        Distributed splitting (default from ``torch.distributed`` when initialised): replica
        ``rank`` gets batches ``rank, rank + num_replicas, …``.
    """

    def __init__(
        self,
        lengths: np.ndarray | Sequence[int] | Any,
        batch_size: int,
        *,
        bucket_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if hasattr(lengths, "lengths"):
            lengths = lengths.lengths
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}.")
        if bucket_size is None:
            bucket_size = 64 * batch_size
        if bucket_size < 1:
            raise DataError(f"bucket_size must be >= 1, got {bucket_size}.")
        self.batch_size = int(batch_size)
        self.bucket_size = -(-int(bucket_size) // self.batch_size) * self.batch_size
        self.shuffle, self.seed, self.drop_last, self.epoch = bool(shuffle), int(seed), bool(drop_last), 0
        self.rank, self.num_replicas = _resolve_dist(rank, num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch``; call before each epoch."""
        self.epoch = int(epoch)

    def all_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The batches of every replica in ``epoch``, before splitting between replicas."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        order = np.arange(n)
        if self.shuffle:
            order = np.argsort(uniform_hash(self.seed, epoch, order, _SAMPLER_PERM), kind="stable")
        batches: list[np.ndarray] = []
        for start in range(0, n, self.bucket_size):
            chunk = order[start : start + self.bucket_size]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and len(batches) > 1:
            u = uniform_hash(self.seed, epoch, np.arange(len(batches)), _SAMPLER_BATCHES)
            batches = [batches[i] for i in np.argsort(u, kind="stable")]
        if self.drop_last:
            batches = batches[: len(batches) // self.num_replicas * self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.all_batches()[self.rank :: self.num_replicas]:
            yield batch.tolist()

    def __len__(self) -> int:
        n = len(self.lengths)
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if self.drop_last:
            total = total // self.num_replicas * self.num_replicas
        return len(range(self.rank, total, self.num_replicas))
