"""Batched, length-bucketed inference over tokenized cells (results in the input order), and the
chunked, resumable, rank-parallel runner that atlas-scale embedding and prediction use.

Two layers:

* :func:`run_inference` — one process, results in memory: cells are cut into *windows* of
  consecutive cells (all cells for in-memory tokens; ``window`` cells at a time for a shard
  directory, read lazily, so memory stays bounded), each window is sorted by length and cut into
  batches (:func:`inference_batches`).
* :func:`run_chunks` — the work of a ``torchrun`` job (or of one process): the cells are cut into
  fixed *chunks* of consecutive cells (the batch plan of a chunk depends only on the chunk, never
  on the number of processes, so every process count gives the same bits); rank ``r`` of ``W``
  takes chunks ``r, r + W, …``; each chunk's result is written atomically as
  ``parts/chunk-NNNNNN.npz`` in a :class:`ResultStore`; once every rank is done (a barrier), rank 0
  assembles the chunks in input order. The store's ``manifest.json`` records a fingerprint of the
  inputs, the model and the settings: a rerun with the same arguments skips the chunks already on
  disk (a killed or pre-empted job resumes), a rerun with other arguments is refused (or starts
  over with ``overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._errors import ConfigError, DataError
from ._utils import Progress, atomic_path, atomic_write_text, get_logger, read_json, track
from .core.precision import PRECISIONS
from .data.collate import Collator
from .data.tokenized import ShardedTokens, TokenizedCells
from .train._oom import OOM_ABOVE_CELLS_ENV as OOM_ABOVE_CELLS_ENV  # the test hook (re-export)
from .train._oom import free_memory, is_out_of_memory
from .train._oom import injected_oom as _injected_oom
from .train.distributed import all_gather_objects, barrier, init_distributed
from .train.trainer import FORWARD_KEYS

__all__ = [
    "AUTO_BATCH_SIZE",
    "DEFAULT_WINDOW",
    "FORWARD_KEYS",
    "AutoBatchSize",
    "ChunkPlan",
    "ChunkRun",
    "ResultStore",
    "check_precision",
    "class_probabilities",
    "inference_batches",
    "is_out_of_memory",
    "model_fingerprint",
    "read_cells",
    "resolve_device",
    "run_chunks",
    "run_inference",
    "to_batch_size",
]

log = get_logger(__name__)

#: cells read at a time from a shard directory by :func:`run_inference` (bounded memory)
DEFAULT_WINDOW = 16_384

#: cells per batch that ``batch_size="auto"`` tries first (the fixed default): without an
#: out-of-memory error, "auto" gives the results of ``batch_size=64``
AUTO_BATCH_SIZE = 64
@dataclass
class AutoBatchSize:
    """``batch_size="auto"``: start at ``start`` cells per batch, halve after out-of-memory, and
    remember the size that worked.

    Each try is a whole pass with one fixed batch size, its heaviest batches (most tokens, longest
    cells) first so that an out-of-memory error comes at once; after one, the caches are freed and
    the pass starts over at half the size, down to one cell (then a :class:`ConfigError` says what
    to try). The results are therefore *exactly* those of the fixed ``batch_size`` that worked
    (:attr:`size`): the same batches, the same padding, the same kernels. (Running a failed batch
    in pieces instead would not be: on the CPU, pieces padded to the batch's width give the same
    encoder states, but small matrix products such as a classifier head over fewer rows round
    differently, by ~1e-7.) Pass one object to several calls to carry the size over; read
    :attr:`size` afterwards. ``fn`` of :func:`run_inference` may run again for cells of a failed
    try, so the callers that use "auto" collect results only (no side effects).

    Parameters
    ----------
    start
        Cells per batch of the first try (default :data:`AUTO_BATCH_SIZE`, the fixed default).

    Attributes
    ----------
    size
        Cells per batch now: ``start`` until an out-of-memory error halves it; after a call, the
        fixed batch size whose results it gave.
    reductions
        ``(from, to)`` for each halving, in order (and each lowering to a size that worked
        elsewhere: :meth:`lower_to`).
    """

    start: int = AUTO_BATCH_SIZE
    size: int = 0
    reductions: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, int | np.integer) or self.start < 1:
            raise ConfigError(f"AutoBatchSize(start=...) must be a positive integer, got {self.start!r}.")
        self.start = int(self.start)
        self.size = int(self.size) or self.start

    def too_large(self, exc: BaseException) -> ConfigError:
        """The error for out-of-memory ``exc`` with one cell per forward pass (nothing left to halve)."""
        return ConfigError(
            f"Out of memory with a single cell per forward pass ({type(exc).__name__}: {exc}). Try a shorter "
            "max_length (tokenize_options={'max_length': ...}), precision='bf16', a device with more "
            "memory, or device='cpu'.",
            param="batch_size",
            problem="A single cell does not fit in the device's memory.",
        )

    def halve(self, reason: str = "") -> None:
        """Halve :attr:`size` after an out-of-memory error (logged as a warning)."""
        new = max(1, self.size // 2)
        self.reductions.append((self.size, new))
        log.warning(
            "batch_size auto: %d → %d after out-of-memory%s; starting over with batches of %d cells",
            self.size,
            new,
            f" ({reason})" if reason else "",
            new,
        )
        self.size = new

    def lower_to(self, size: int) -> None:
        """Take a smaller size that worked elsewhere (another ``torchrun`` rank, or an earlier run's
        chunks being resumed); a larger ``size`` changes nothing."""
        if size < self.size:
            self.reductions.append((self.size, int(size)))
            self.size = int(size)

    def describe(self) -> str:
        """E.g. ``"batch_size auto: 64 → 32 after out-of-memory"`` or ``"batch_size auto: 64"``."""
        if self.size == self.start:
            return f"batch_size auto: {self.start}"
        return f"batch_size auto: {self.start} → {self.size} after out-of-memory"


def to_batch_size(batch_size: int | str | AutoBatchSize) -> int | AutoBatchSize:
    """A ``batch_size=`` argument checked: a positive ``int``, or an :class:`AutoBatchSize` for ``"auto"``."""
    if isinstance(batch_size, AutoBatchSize):
        return batch_size
    if isinstance(batch_size, str):
        if batch_size == "auto":
            return AutoBatchSize()
        if batch_size.isdigit() and int(batch_size) >= 1:
            return int(batch_size)
    elif not isinstance(batch_size, bool) and isinstance(batch_size, int | np.integer) and batch_size >= 1:
        return int(batch_size)
    raise ConfigError(
        f"batch_size must be a positive integer or 'auto' (halve after out-of-memory), got {batch_size!r}.",
        param="batch_size",
    )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_batches(
    lengths: np.ndarray, batch_size: int, max_tokens: int | None = None
) -> Iterator[np.ndarray]:
    """Cell indices sorted by length and cut into batches (``max_tokens`` caps ``B × L``)."""
    order = np.argsort(lengths, kind="stable")
    i, n = 0, len(order)
    while i < n:
        j = min(n, i + batch_size)
        if max_tokens is not None:
            while j - i > 1 and lengths[order[j - 1]] * (j - i) > max_tokens:
                j -= 1
        yield order[i:j]
        i = j


def _slice(cells: TokenizedCells, a: int, b: int) -> TokenizedCells:
    """Cells ``a:b`` of ``cells`` as an in-memory copy (token arrays read from their memory maps)."""
    lo, hi = int(cells.offsets[a]), int(cells.offsets[b])

    def take(arr: np.ndarray | None) -> np.ndarray | None:
        return None if arr is None else np.array(arr[lo:hi])

    return replace(
        cells,
        gene_ids=take(cells.gene_ids),
        values=take(cells.values),
        token_type_ids=take(cells.token_type_ids),
        offsets=np.asarray(cells.offsets[a : b + 1], dtype=np.int64) - lo,
        obs_names=np.asarray(cells.obs_names[a:b]),
        obs=None if cells.obs is None else cells.obs.iloc[a:b],
        notes=list(cells.notes),
        rng=None,
    )


def read_cells(tokens: TokenizedCells | ShardedTokens, start: int, stop: int) -> TokenizedCells:
    """Cells ``start:stop`` (input order) as an in-memory :class:`TokenizedCells`.

    From a shard directory only the shards that hold these cells are read, and only these cells'
    tokens are copied out of their memory maps, which are then closed (the reader's shard cache is
    bypassed, so mapped pages do not pile up): memory grows with ``stop - start``, not with the
    directory.
    """
    n = len(tokens)
    if not 0 <= start <= stop <= n:
        raise IndexError(f"cells {start}:{stop} out of range for {n} cells")
    if isinstance(tokens, TokenizedCells):
        return tokens if (start, stop) == (0, n) else _slice(tokens, start, stop)
    parts = []
    offsets = tokens.shard_offsets
    k = int(np.searchsorted(offsets, start, side="right") - 1)
    pos = start
    while pos < stop:
        s0, s1 = int(offsets[k]), int(offsets[k + 1])
        a, b = pos - s0, min(stop, s1) - s0
        if b > a:
            parts.append(_slice(tokens.shard(k, cache=False), a, b))
        pos, k = s0 + b, k + 1
    if not parts:
        return _slice(tokens.shard(0), 0, 0)
    cells = parts[0] if len(parts) == 1 else TokenizedCells.concat(parts)
    cells.notes = tokens.notes
    return cells


def _windows(tokens: Any, window: int | None) -> Iterator[tuple[int, Any]]:
    """``(start, cells)``: consecutive cells sorted into batches together.

    A shard directory is read ``window`` (default :data:`DEFAULT_WINDOW`) cells at a time; other
    containers (in-memory tokens, or any object with ``lengths`` and ``cell(i)``) are one window
    unless ``window`` is given for in-memory tokens.
    """
    n = len(tokens)
    if window is not None and window < 1:
        raise ConfigError(f"window must be >= 1 cells, got {window}.")
    if isinstance(tokens, ShardedTokens):
        step = window or DEFAULT_WINDOW
    elif isinstance(tokens, TokenizedCells) and window is not None:
        step = window
    else:
        yield 0, tokens
        return
    for start in range(0, n, step):
        yield start, read_cells(tokens, start, min(n, start + step))


def check_precision(precision: str | None, amp: str | None = None) -> None:
    """Refuse an unknown ``precision`` (or ``amp``, its older alias) before any work."""
    if amp is not None and precision not in (None, "fp32"):
        raise ConfigError(f"Pass precision={precision!r} or its older alias amp={amp!r}, not both.")
    if amp is not None and amp not in ("bf16", "fp16"):
        raise ConfigError(f"amp must be 'bf16', 'fp16' or None, got {amp!r}.")
    if precision not in (None, *PRECISIONS):
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}.", param="precision")


def _precision_context(model: nn.Module, dev: torch.device, precision: str | None, amp: str | None) -> Any:
    """The context a ``precision=`` (or its older alias ``amp=``) runs in on ``dev``.

    ``"fp32"``: autocast explicitly off (parity). Otherwise :func:`cellkit.core.precision.resolve_precision`
    decides what runs (bf16 on a CPU without bf16 units stays fp32, with a warning; fp16 needs CUDA) and
    :func:`~cellkit.core.precision.precision_context` runs it.
    """
    from .core.precision import precision_context, resolve_precision

    check_precision(precision, amp)
    wanted = amp if amp is not None else (precision or "fp32")
    return precision_context(model, dev, resolve_precision(wanted, dev))


class _Recount:
    """A progress that skips the first ``skip`` cells (counted by an attempt that ran out of memory)."""

    def __init__(self, bar: Progress, skip: int) -> None:
        self.bar, self.skip, self.seen = bar, skip, 0

    def advance(self, n: int) -> None:
        self.seen += n
        take = min(self.skip, n)
        self.skip -= take
        if n > take:
            self.bar.advance(n - take)
        else:
            self.bar.check()


def _heaviest_first(lengths: np.ndarray, batches: list[np.ndarray]) -> list[np.ndarray]:
    """``batches`` with the ones that need the most memory (most tokens; longest attention) first."""
    if len(batches) < 3:
        return batches[::-1]
    cost = [(len(i) * int(lengths[i].max(initial=0)), len(i) * int(lengths[i].max(initial=0)) ** 2) for i in batches]
    first = dict.fromkeys([int(np.argmax([c[1] for c in cost])), int(np.argmax([c[0] for c in cost]))])
    return [batches[k] for k in first] + [x for k, x in enumerate(batches) if k not in first]


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    tokens: TokenizedCells | ShardedTokens | Any,
    fn: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    heads: tuple[str, ...] = (),
    batch_size: int | str | AutoBatchSize = 64,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    amp: str | None = None,
    attn_backend: str = "sdpa",
    progress: bool | Progress = True,
    desc: str = "inference",
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    window: int | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` over all cells and collect ``fn(output, batch)`` arrays in input order.

    Parameters
    ----------
    fn
        Turns a model output and its batch into ``{name: (B, ...) tensor}``. With
        ``batch_size="auto"`` it may run again for the cells of a try that ran out of memory:
        keep it free of side effects there.
    heads
        Heads to run.
    batch_size
        Cells per batch, or ``"auto"`` (an :class:`AutoBatchSize`): :data:`AUTO_BATCH_SIZE`
        cells, halved after each out-of-memory error (the pass starts over; the results are
        exactly those of the fixed size that worked, which is logged). Pass an
        :class:`AutoBatchSize` to choose the first size or to read the size that worked.
    precision
        ``"fp32"`` (default: no autocast) or ``"bf16"`` (autocast where the device has bf16 units,
        see ``cellkit.core.precision``).
    amp
        Older alias: ``"bf16"`` / ``"fp16"`` autocast on the device as it is.
    progress
        ``True``: a ``tqdm`` bar; a :class:`cellkit.Progress` is advanced after each batch (and
        raises :class:`cellkit.Cancelled` once cancelled; inside an outer call, its count goes on).
    output_hidden_states, output_attentions
        Ask the model for per-layer states / attention probabilities (see :class:`CellModelOutput`).
    window
        Cells sorted by length together (consecutive cells in input order). Default: all cells of
        in-memory tokens; :data:`DEFAULT_WINDOW` cells at a time of a shard directory, which is
        read lazily window by window (never loaded whole).

    Returns
    -------
    ``{name: (n_cells, ...) array}``.
    """
    bs = to_batch_size(batch_size)
    auto = bs if isinstance(bs, AutoBatchSize) else None
    dev = resolve_device(device)
    ctx = _precision_context(model, dev, precision, amp)
    collate = Collator.for_tokens(tokens)
    was_training = model.training
    model.eval()
    model.to(dev)
    n = len(tokens)

    def one_pass(size: int, bar: Any) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for start, cells in _windows(tokens, window):
            batches = list(inference_batches(cells.lengths, size))
            if auto is not None:  # an out-of-memory error comes at the first batch, not after hours
                batches = _heaviest_first(cells.lengths, batches)
            for idx in batches:
                items = []
                for i in idx.tolist():
                    item = {k: np.asarray(v) for k, v in cells.cell(i).items()}
                    item["index"] = start + i
                    items.append(item)
                batch = collate(items)
                _injected_oom(len(idx))
                inputs = {k: batch[k].to(dev) for k in FORWARD_KEYS if k in batch}
                out_ = model(
                    **inputs,
                    heads=heads,
                    attn_backend=attn_backend,
                    output_hidden_states=output_hidden_states,
                    output_attentions=output_attentions,
                )
                res = fn(out_, batch)
                for name, t in res.items():
                    arr = t.detach().float().cpu().numpy()
                    if name not in out:
                        out[name] = np.empty((n, *arr.shape[1:]), dtype=arr.dtype)
                    out[name][start + idx] = arr
                bar.advance(len(idx))
        return out

    try:
        with track(progress, total=n, desc=desc) as bar, ctx:
            if auto is None:
                return one_pass(int(bs), bar)
            return _auto_passes(one_pass, auto, bar, dev, desc)
    finally:
        model.train(was_training)


def _auto_passes(
    one_pass: Callable[[int, Any], dict[str, np.ndarray]],
    auto: AutoBatchSize,
    bar: Progress,
    dev: torch.device,
    desc: str,
) -> dict[str, np.ndarray]:
    """``one_pass(size)`` from ``auto.size`` on, halving after each out-of-memory error.

    Each try starts over (the result is the pass of one batch size, bit for bit what that fixed
    size gives); the progress counts every cell once.
    """
    counted = 0
    while True:
        failed, reason = False, ""
        recount = _Recount(bar, counted)
        try:
            out = one_pass(auto.size, recount)
        except Exception as exc:  # only out-of-memory is handled; everything else goes on up
            if not is_out_of_memory(exc):
                raise
            if auto.size <= 1:
                raise auto.too_large(exc) from exc
            failed, reason = True, (str(exc).splitlines() or [type(exc).__name__])[0]
        if not failed:
            if auto.reductions:
                log.info("%s (%s)", auto.describe(), desc)
            return out
        counted = max(counted, recount.seen)
        free_memory(dev)  # outside the except block: the failed try's tensors are released
        auto.halve(reason)


# ====================================================================================== chunked runs
STORE_FORMAT = "cellkit-results"
STORE_MANIFEST = "manifest.json"
PARTS_DIR = "parts"
#: the entry of a chunk file that holds the batch size its results were computed with
#: (``batch_size="auto"``; not a result)
CHUNK_BATCH_SIZE = "__batch_size__"
#: test hook: a process leaves at once (``os._exit``, like a kill: no clean-up) after writing
#: this many chunks; used by the resume tests
EXIT_AFTER_CHUNKS_ENV = "CELLKIT_EXIT_AFTER_CHUNKS"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's config, vocabulary and every weight (what makes its outputs)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    vocab = getattr(model, "vocab", None)
    if vocab is not None:
        h.update("\n".join(vocab.tokens).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint(parameters: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parameters, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ChunkPlan:
    """``n_cells`` cut into chunks of ``chunk_size`` consecutive cells (the last may be shorter)."""

    n_cells: int
    chunk_size: int

    @property
    def n_chunks(self) -> int:
        return -(-self.n_cells // self.chunk_size)

    def bounds(self, k: int) -> tuple[int, int]:
        """``(start, stop)`` of chunk ``k`` in input order."""
        a = k * self.chunk_size
        return a, min(self.n_cells, a + self.chunk_size)

    def for_rank(self, rank: int, world_size: int) -> list[int]:
        """The chunks rank ``rank`` of ``world_size`` computes: ``rank, rank + world_size, …``."""
        return list(range(rank, self.n_chunks, world_size))


@dataclass(frozen=True)
class ChunkRun:
    """What a :func:`run_chunks` call did (the same on every rank)."""

    n_chunks: int
    computed: int
    skipped: int
    world_size: int
    already_complete: bool = False
    #: ``batch_size="auto"``: the batch size every chunk's results were computed with (else ``None``)
    batch_size: int | None = None
    #: ``batch_size="auto"``: chunks computed again at a smaller size (all ranks)
    redone: int = 0


class ResultStore:
    """A directory of per-chunk results: ``manifest.json`` and ``parts/chunk-NNNNNN.npz``.

    Each chunk file holds the chunk's arrays (``(chunk cells, ...)``, one per result name) and is
    written atomically (a temporary sibling, fsync, rename), so a chunk file that exists is whole.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def parts(self) -> Path:
        return self.path / PARTS_DIR

    def chunk_file(self, k: int) -> Path:
        return self.parts / f"chunk-{k:06d}.npz"

    def has_chunk(self, k: int) -> bool:
        return self.chunk_file(k).is_file()

    def write_chunk(self, k: int, arrays: Mapping[str, np.ndarray], *, batch_size: int | None = None) -> None:
        """Write chunk ``k``'s arrays (and, for ``batch_size="auto"``, the size they were computed with)."""
        entries = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        if batch_size is not None:
            entries[CHUNK_BATCH_SIZE] = np.asarray(batch_size, dtype=np.int64)
        with atomic_path(self.chunk_file(k)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **entries)

    def chunk_batch_size(self, k: int) -> int | None:
        """The batch size chunk ``k`` was computed with (``None``: not recorded)."""
        try:
            with np.load(self.chunk_file(k), allow_pickle=False) as z:
                return int(z[CHUNK_BATCH_SIZE]) if CHUNK_BATCH_SIZE in z.files else None
        except (OSError, ValueError):
            return None  # unreadable: computed again

    def read_chunk(self, k: int) -> dict[str, np.ndarray]:
        try:
            with np.load(self.chunk_file(k), allow_pickle=False) as z:
                return {name: z[name] for name in z.files if name != CHUNK_BATCH_SIZE}
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{self.chunk_file(k)} cannot be read ({exc}); delete it and run the same command again to "
                "recompute that chunk."
            ) from None

    def read_manifest(self) -> dict[str, Any] | None:
        file = self.path / STORE_MANIFEST
        if not file.is_file():
            return None
        m = read_json(file, what="result store manifest", error=DataError)
        if not isinstance(m, dict) or m.get("format") != STORE_FORMAT:
            raise ConfigError(
                f"{file} is not a cellkit result store manifest; choose another output (the run would write "
                "its results there)."
            )
        return m

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / STORE_MANIFEST, json.dumps(manifest, indent=2, default=str))

    def iter_field(self, plan: ChunkPlan, name: str) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, array)`` of result ``name`` chunk by chunk, in input order."""
        for k in range(plan.n_chunks):
            a, b = plan.bounds(k)
            yield a, b, self.read_chunk(k)[name]

    def assemble_npy(self, plan: ChunkPlan, name: str, dest: str | os.PathLike[str]) -> Path:
        """Write result ``name`` of all chunks, in input order, as one ``.npy`` at ``dest`` (atomically).

        Memory holds one chunk at a time (the file is filled through a memory map); the result
        opens with ``np.load(dest, mmap_mode="r")``.
        """
        first = self.read_chunk(0)[name]
        with atomic_path(dest) as tmp:
            arr = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=first.dtype, shape=(plan.n_cells, *first.shape[1:])
            )
            for a, b, x in self.iter_field(plan, name):
                arr[a:b] = x
            arr.flush()
            del arr
        return Path(dest)


def _parameter_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str)]


def run_chunks(
    store: ResultStore,
    *,
    n_cells: int,
    chunk_size: int,
    parameters: Mapping[str, Any],
    compute: Callable[[int, int, Progress], Mapping[str, np.ndarray]],
    finish: Callable[[ResultStore, ChunkPlan], None],
    overwrite: bool = False,
    progress: bool | Progress = True,
    desc: str = "inference",
    extra: Mapping[str, Any] | None = None,
    auto: AutoBatchSize | None = None,
) -> ChunkRun:
    """Compute chunk results on every rank, resumably, then assemble them on rank 0.

    Parameters
    ----------
    store
        Where chunk results and the manifest go (created if needed).
    n_cells, chunk_size
        The plan: chunks of ``chunk_size`` consecutive cells.
    parameters
        Everything the results depend on (inputs, model fingerprint, settings; JSON-able). Its
        fingerprint is recorded; a store made with other parameters is refused unless ``overwrite``.
    compute
        ``compute(start, stop, progress) -> {name: (stop - start, ...) array}`` for cells
        ``start:stop`` in input order; it advances ``progress`` by ``stop - start``.
    finish
        Called on rank 0 once every chunk is on disk, to assemble the outputs.
    overwrite
        Start over when the store holds another run's chunks.
    progress
        A bar (rank 0 only) over this rank's cells, or a :class:`cellkit.Progress` to follow.
    extra
        More JSON-able fields for the manifest.
    auto
        ``batch_size="auto"``: the :class:`AutoBatchSize` that ``compute`` runs with (this rank's;
        ``parameters`` should say ``"auto"``, not a size, so that a resumed run keeps its chunks).
        Each chunk file records the size its results were computed with. A resumed run starts at
        the smallest size recorded on disk; once every rank is done, the ranks agree on the
        smallest size any of them reached (every halving is for a chunk that did not fit) and
        compute again each chunk written at a larger size, until all chunks have one size: the
        results are then exactly those of a fixed run at that size (:attr:`ChunkRun.batch_size`,
        also recorded in the manifest as ``batch_size_worked``).

    Returns
    -------
    :class:`ChunkRun` with the number of chunks computed (all ranks) and skipped (found on disk).
    """
    if chunk_size < 1 or n_cells < 1:
        raise ConfigError(f"chunk_size and the number of cells must be >= 1 (got {chunk_size}, {n_cells}).")
    info = init_distributed()
    plan = ChunkPlan(n_cells, chunk_size)
    params = {**parameters, "n_cells": n_cells, "chunk_size": chunk_size}
    fp = _fingerprint(params)
    old = store.read_manifest()  # every rank reads and judges it: all raise the same error
    same = old is not None and old.get("fingerprint") == fp
    if old is not None and not same and not overwrite:
        changed = _parameter_diff(old.get("parameters", {}), params)
        raise ConfigError(
            f"{store.path} holds results of another run (different {', '.join(changed) or 'settings'}); rerun "
            "with the same arguments to resume it, choose another output, or pass overwrite (--overwrite) to "
            "start over."
        )
    if same and old.get("complete") and not overwrite:
        barrier()
        if auto is not None and old.get("batch_size_worked"):
            auto.lower_to(int(old["batch_size_worked"]))
        return ChunkRun(
            plan.n_chunks,
            0,
            plan.n_chunks,
            info.world_size,
            already_complete=True,
            batch_size=None if auto is None else auto.size,
        )
    barrier()
    if info.is_main:
        if old is not None and (overwrite or not same):
            shutil.rmtree(store.parts, ignore_errors=True)
        store.parts.mkdir(parents=True, exist_ok=True)
        if not same or overwrite:
            store.write_manifest(
                {
                    "format": STORE_FORMAT,
                    "version": 1,
                    "fingerprint": fp,
                    "parameters": params,
                    "n_cells": n_cells,
                    "chunk_size": chunk_size,
                    "n_chunks": plan.n_chunks,
                    "complete": False,
                    **(extra or {}),
                }
            )
    barrier()
    todo = [k for k in plan.for_rank(info.rank, info.world_size) if not store.has_chunk(k)]
    mine = len(plan.for_rank(info.rank, info.world_size))
    sizes = _sizes_on_disk(store, plan, info.rank, info.world_size, auto)
    exit_after = int(os.environ.get(EXIT_AFTER_CHUNKS_ENV, "0") or 0)
    cells = sum(b - a for a, b in map(plan.bounds, todo))
    bar_arg = progress if info.is_main else False
    label = desc if info.world_size == 1 else f"{desc} (rank 0 of {info.world_size})"
    with track(bar_arg, total=cells, desc=label) as bar:
        for done, k in enumerate(todo, 1):
            a, b = plan.bounds(k)
            store.write_chunk(k, compute(a, b, bar), batch_size=None if auto is None else auto.size)
            if auto is not None:
                sizes[k] = auto.size
            if exit_after and done >= exit_after:
                os._exit(75)  # the test hook: leave like a killed process, mid-run
    redone = 0 if auto is None else _one_size(store, plan, compute, auto, sizes, bar_arg, label)
    computed = sum(all_gather_objects(len(todo)))
    skipped = sum(all_gather_objects(mine - len(todo)))
    if info.is_main:
        missing = [k for k in range(plan.n_chunks) if not store.has_chunk(k)]
        if missing:
            raise DataError(
                f"{len(missing)} chunks of {store.path} are missing after every rank finished (e.g. {missing[:3]}); "
                "run the same command again to compute them."
            )
        finish(store, plan)
        manifest = store.read_manifest() or {}
        worked = {} if auto is None else {"batch_size_worked": auto.size}
        store.write_manifest({**manifest, **worked, "complete": True})
    barrier()
    worked_size = None if auto is None else auto.size
    return ChunkRun(plan.n_chunks, computed, skipped, info.world_size, batch_size=worked_size, redone=redone)


def _sizes_on_disk(
    store: ResultStore, plan: ChunkPlan, rank: int, world_size: int, auto: AutoBatchSize | None
) -> dict[int, int]:
    """``batch_size="auto"``: chunk -> the batch size of this rank's chunks already on disk; every
    rank's ``auto`` is lowered to the smallest size recorded on disk (a resumed run goes on there)."""
    if auto is None:
        return {}
    sizes = {}
    for k in plan.for_rank(rank, world_size):
        if store.has_chunk(k):  # a chunk without a recorded size counts as too large: computed again
            sizes[k] = store.chunk_batch_size(k) or auto.start + 1
    smallest = min(all_gather_objects(min(sizes.values(), default=auto.size)))
    if smallest < auto.size:
        log.info("batch_size auto: resuming at %d cells per batch (the chunks on disk were computed so)", smallest)
    auto.lower_to(smallest)
    return sizes


def _one_size(
    store: ResultStore,
    plan: ChunkPlan,
    compute: Callable[[int, int, Progress], Mapping[str, np.ndarray]],
    auto: AutoBatchSize,
    sizes: dict[int, int],
    progress: bool | Progress,
    label: str,
) -> int:
    """Compute again, on each rank, its chunks written at a larger batch size than the smallest any
    rank reached, until every chunk of every rank has that one size; the number redone (all ranks).

    Every rank takes part in each round (collective calls), also a rank with nothing to redo.
    """
    redone = 0
    while True:
        auto.lower_to(min(all_gather_objects(auto.size)))
        redo = sorted(k for k, z in sizes.items() if z != auto.size)
        counts = all_gather_objects(len(redo))
        if not any(counts):
            return redone
        redone += sum(counts)
        if not redo:
            continue  # another rank redoes its chunks; this one joins the next round
        log.warning(
            "%s: %d chunk(s) computed with larger batches are computed again with batches of %d cells, "
            "so that every chunk has the results of one batch size",
            auto.describe(),
            len(redo),
            auto.size,
        )
        total = sum(b - a for a, b in map(plan.bounds, redo))
        with track(progress, total=total, desc=f"{label} (again, batch size {auto.size})") as bar:
            for k in redo:
                a, b = plan.bounds(k)
                store.write_chunk(k, compute(a, b, bar), batch_size=auto.size)
                sizes[k] = auto.size


def class_probabilities(
    model: nn.Module,
    tokens: Any,
    *,
    batch_size: int | str | AutoBatchSize,
    progress: bool | Progress,
    device: Any = "auto",
    precision: str = "fp32",
) -> np.ndarray:
    """``(n_cells, n_classes)`` float32 softmax of the classifier head, in the order of ``tokens``."""
    res = run_inference(
        model,
        tokens,
        lambda out, batch: {"p": torch.softmax(out.class_logits.float(), dim=-1)},
        heads=("classifier",),
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=progress,
        desc="predict",
    )
    return res["p"]
