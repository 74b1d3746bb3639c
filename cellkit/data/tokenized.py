"""Tokenized cells: a ragged in-memory container and an on-disk, memory-mappable shard format.

Both hold, per cell, a variable-length sequence of token ids with optional per-token values and
token types. Cells are stored back to back (``gene_ids[offsets[i]:offsets[i + 1]]``), never padded;
padding happens per batch in the collator.

Shard directory layout (``format="npy"``, the default; every array memory-mappable)::

    manifest.json                 format, scheme, options, specials, vocabulary size, coverage,
                                  obs columns (+ categories), and the list of shards
    shard-00000/gene_ids.npy      (T,) int32
    shard-00000/values.npy        (T,) float32            (schemes with values)
    shard-00000/token_type_ids.npy (T,) int32             (schemes with token types)
    shard-00000/offsets.npy       (n + 1,) int64
    shard-00000/cell_index.npy    (n,) int64   row of each cell in the source, in input order
    shard-00000/obs_names.npy     (n,) unicode
    shard-00000/obs-<column>.npy  (n,) int32 category codes (categories in the manifest)

``format="parquet"`` writes ``shard-00000.parquet`` files instead, with list columns
``input_ids`` / ``values`` / ``token_type_ids``, ``length`` and the obs columns, which Hugging
Face ``datasets`` opens directly (``datasets.load_dataset("parquet", data_files=f"{path}/*.parquet")``).
The directory is written as a whole: shards go into a hidden sibling (``.NAME.tmp-<id>``),
``manifest.json`` is written there last, then the sibling is swapped in for ``NAME``
(:func:`cellkit._utils.atomic_directory`), so ``NAME`` holds the old shards or the new ones, never
a mix; a directory without a manifest is never taken as complete. Reading checks the manifest
against the directory: every shard path is a plain name inside it (no ``..``, absolute paths or
symlinks out), and each shard's cell and token counts against its arrays.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from cellkit._errors import DataError
from cellkit._utils import AtomicDirectory, ensure_writable_dir, read_json, recover_directory

from .vocab import Coverage

__all__ = ["CellReader", "ShardSubset", "ShardWriter", "ShardedTokens", "TokenizedCells", "open_shards"]

MANIFEST = "manifest.json"
FORMAT = "cellkit-tokens"
FIELDS = ("gene_ids", "values", "token_type_ids")


@dataclass
class TokenizedCells:
    """Cells as ragged token sequences (what :func:`cellkit.tokenize` returns).

    Attributes
    ----------
    gene_ids
        ``(T,)`` int32 token ids of all cells, back to back.
    offsets
        ``(n_cells + 1,)`` int64; cell ``i`` is ``[offsets[i], offsets[i + 1])``.
    values
        ``(T,)`` float32 per-token values (binned expression, ranks, ...) or ``None``.
    token_type_ids
        ``(T,)`` int32 token types (PerturbGene's gene identity) or ``None``.
    obs_names
        ``(n_cells,)`` cell names, in input order.
    obs
        Per-cell metadata carried along (labels, batches), indexed like ``obs_names``.
    scheme
        ``"scgpt"``, ``"geneformer"``, ``"teddy"`` or ``"perturbgene"``.
    options
        The resolved scheme options (JSON-able), for provenance and the studio. Every scheme
        records the effective maximum tokens per cell as ``options["max_length"]`` (see
        :attr:`max_length`), whatever its own option for it is called.
    specials
        Role → token id of the special tokens (``pad``, ``cls``, ``eos``, ``mask`` …).
    pad_value
        Value used at padded positions.
    coverage
        Gene-vocabulary coverage of the input.
    notes
        Decisions worth telling the user (computed ``n_counts``, dropped cells, …).
    """

    gene_ids: np.ndarray
    offsets: np.ndarray
    values: np.ndarray | None = None
    token_type_ids: np.ndarray | None = None
    obs_names: np.ndarray | None = None
    obs: pd.DataFrame | None = None
    scheme: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    specials: dict[str, int] = field(default_factory=dict)
    pad_value: float = 0.0
    coverage: Coverage | None = None
    notes: list[str] = field(default_factory=list)
    #: compat mode only: the numpy RandomState after tokenization, so masking continues the stream
    rng: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        n = len(self.offsets) - 1
        if n < 0 or self.offsets[0] != 0 or self.offsets[-1] != len(self.gene_ids):
            raise DataError("offsets must start at 0 and end at the number of tokens.")
        for name in ("values", "token_type_ids"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != len(self.gene_ids):
                raise DataError(f"{name} has {len(arr)} entries but there are {len(self.gene_ids)} tokens.")
        if self.obs_names is None:
            self.obs_names = np.arange(n).astype(str)
        if len(self.obs_names) != n:
            raise DataError(f"{len(self.obs_names)} obs_names for {n} cells.")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def max_length(self) -> int | None:
        """The maximum tokens per cell the tokenization allowed, special tokens included.

        The scheme's option (``scgpt``'s ``max_len``, ``geneformer``'s ``model_input_size``,
        ``teddy``'s ``max_seq_len``, ``perturbgene``'s ``max_length``) or the model's
        ``InputSpec.max_length`` it defaulted to, recorded as ``options["max_length"]``;
        ``None``: no limit (or tokens written before cellkit recorded it).
        """
        return _max_length(self.options)

    @property
    def n_tokens(self) -> int:
        return len(self.gene_ids)

    @property
    def lengths(self) -> np.ndarray:
        """``(n_cells,)`` tokens per cell."""
        return np.diff(self.offsets)

    @property
    def fields(self) -> tuple[str, ...]:
        """Per-token arrays present (``gene_ids`` always)."""
        return tuple(f for f in FIELDS if getattr(self, f) is not None)

    def cell(self, i: int) -> dict[str, np.ndarray]:
        """Token arrays of cell ``i`` (views, not copies)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"cell {i} out of range for {len(self)} cells")
        i %= len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        return {f: getattr(self, f)[a:b] for f in self.fields}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.cell(i)

    def subset(self, index: Sequence[int] | np.ndarray) -> TokenizedCells:
        """A new container with the cells at ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        lengths = self.lengths[index]
        starts = self.offsets[index]
        gather = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(
            lengths.sum()
        )
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        arrays = {f: getattr(self, f)[gather] for f in self.fields}
        obs = None if self.obs is None else self.obs.iloc[index]
        return replace(
            self,
            gene_ids=arrays["gene_ids"],
            values=arrays.get("values"),
            token_type_ids=arrays.get("token_type_ids"),
            offsets=offsets,
            obs_names=self.obs_names[index],
            obs=obs,
            notes=list(self.notes),
            rng=None,
        )

    def pad(
        self, index: Sequence[int] | None = None, *, max_len: int | None = None, pad_to: int | None = None
    ) -> dict[str, np.ndarray]:
        """Right-pad cells into ``(B, L)`` arrays (what the model's forward takes).

        Parameters
        ----------
        index
            Cells to include (default: all).
        max_len
            Width cap; cells longer than this are truncated from the end (sampling, when wanted,
            happened at tokenization).
        pad_to
            Exact width (default: the longest included cell, capped by ``max_len``).

        Returns
        -------
        ``gene_ids`` (int64), ``values`` (float32), ``token_type_ids`` (int64) when present,
        and ``padding_mask`` (bool, True at padding).
        """
        idx = np.arange(len(self)) if index is None else np.asarray(index, dtype=np.int64)
        lengths = self.lengths[idx]
        width = int(lengths.max()) if len(idx) else 0
        if max_len is not None:
            width = min(width, max_len)
        if pad_to is not None:
            width = pad_to
        if "pad" not in self.specials:
            raise DataError("These tokens have no pad token id; padding is impossible.")
        out = {"gene_ids": np.full((len(idx), width), self.specials["pad"], dtype=np.int64)}
        if self.values is not None:
            out["values"] = np.full((len(idx), width), self.pad_value, dtype=np.float32)
        if self.token_type_ids is not None:
            out["token_type_ids"] = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            cell = self.cell(int(i))
            n = min(len(cell["gene_ids"]), width)
            for f, arr in cell.items():
                out[f][row, :n] = arr[:n]
        out["padding_mask"] = np.arange(width)[None, :] >= np.minimum(lengths, width)[:, None]
        return out

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        text = (
            f"{len(self):,} cells tokenized with the {self.scheme!r} scheme: {self.n_tokens:,} tokens, "
            f"{_length_text(self.lengths)}"
        )
        if self.coverage is not None:
            text += f"\ngenes: {self.coverage}"
        for note in self.notes:
            text += f"\nnote: {note}"
        return text

    def __repr__(self) -> str:
        return f"TokenizedCells({len(self):,} cells, {self.n_tokens:,} tokens, scheme={self.scheme!r}, fields={self.fields})"

    # ------------------------------------------------------------------ persistence
    def to_shards(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_samples: int = 100_000,
        format: Literal["npy", "parquet"] = "npy",
    ) -> ShardedTokens:
        """Write the cells as shards of at most ``max_shard_samples`` cells; see the module docstring."""
        writer = ShardWriter(path, max_shard_samples=max_shard_samples, format=format, overwrite=True)
        try:
            writer.add(self)
            return writer.close()
        except BaseException:
            writer.abort()
            raise

    @staticmethod
    def concat(parts: Sequence[TokenizedCells]) -> TokenizedCells:
        """Concatenate containers of the same scheme (cells in order)."""
        if not parts:
            raise DataError("Nothing to concatenate.")
        first = parts[0]
        offsets = [np.zeros(1, dtype=np.int64)]
        total = 0
        for p in parts:
            offsets.append(p.offsets[1:] + total)
            total += p.n_tokens
        arrays = {f: np.concatenate([getattr(p, f) for p in parts]) for f in first.fields}
        obs = None if first.obs is None else pd.concat([p.obs for p in parts])
        return replace(
            first,
            gene_ids=arrays["gene_ids"],
            values=arrays.get("values"),
            token_type_ids=arrays.get("token_type_ids"),
            offsets=np.concatenate(offsets),
            obs_names=np.concatenate([p.obs_names for p in parts]),
            obs=obs,
            notes=list(dict.fromkeys(n for p in parts for n in p.notes)),
            rng=parts[-1].rng,
        )


# ====================================================================================== shards
class ShardWriter:
    """Write tokenized cells to a shard directory chunk by chunk (bounded memory).

    Parameters
    ----------
    path
        Output directory (created; must be empty unless ``overwrite``).
    max_shard_samples
        Cells per shard.
    format
        ``"npy"`` (memory-mappable arrays) or ``"parquet"`` (Hugging Face ``datasets`` compatible).
    overwrite
        Replace an existing shard directory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_samples: int = 100_000,
        format: Literal["npy", "parquet"] = "npy",
        overwrite: bool = False,
    ) -> None:
        if max_shard_samples < 1:
            raise DataError(f"max_shard_samples must be >= 1, got {max_shard_samples}.")
        if format not in ("npy", "parquet"):
            raise DataError(f"Unknown shard format {format!r}; use 'npy' or 'parquet'.")
        self.path = Path(path)
        ensure_writable_dir(self.path, what="output", replaced_whole=True)  # before the first block
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise DataError(f"{self.path} is not empty; pass overwrite=True or choose a new directory.")
            if not (self.path / MANIFEST).exists() and not any(
                p.name.startswith("shard-") for p in self.path.iterdir()
            ):
                raise DataError(
                    f"{self.path} holds files that are not cellkit shards; refusing to overwrite it."
                )
        # everything goes into a hidden sibling that replaces ``path`` as a whole at close()
        self._out = AtomicDirectory(self.path, may_replace=lambda _p: True, what="shard directory")
        self._root = self._out.tmp
        self.max_shard_samples = max_shard_samples
        self.format = format
        self._pending: list[TokenizedCells] = []
        self._pending_n = 0
        self._lengths: list[np.ndarray] = []
        self._names: list[np.ndarray] = []
        self._obs: list[pd.DataFrame] = []
        self._shards: list[dict[str, Any]] = []
        self._template: TokenizedCells | None = None
        self._categories: dict[str, list[str]] = {}
        self._n_cells = 0
        self._closed = False

    def add(self, cells: TokenizedCells) -> None:
        """Add cells; full shards are finished as soon as they fill.

        With ``format="npy"`` token arrays go straight to disk as they arrive, so memory stays at
        one block of cells whatever the shard size; parquet shards are assembled in memory.
        """
        if self._closed:
            raise DataError("This ShardWriter is closed.")
        if len(cells) == 0:
            return
        if self._template is None:
            self._template = replace(
                cells,
                rng=None,
                gene_ids=cells.gene_ids[:0],
                offsets=np.zeros(1, np.int64),
                values=None if cells.values is None else cells.values[:0],
                token_type_ids=None if cells.token_type_ids is None else cells.token_type_ids[:0],
                obs_names=np.zeros(0, dtype=str),
                obs=None,
            )
        start = 0
        while start < len(cells):
            take = min(self.max_shard_samples - self._pending_n, len(cells) - start)
            part = (
                cells if (start == 0 and take == len(cells)) else cells.subset(np.arange(start, start + take))
            )
            if self.format == "npy":
                self._append_npy(part)
            else:
                self._pending.append(part)
            self._pending_n += take
            start += take
            if self._pending_n == self.max_shard_samples:
                self._flush()

    def _shard_dir(self) -> Path:
        d = self._root / f"shard-{len(self._shards):05d}"
        d.mkdir(exist_ok=True)
        return d

    def _append_npy(self, part: TokenizedCells) -> None:
        d = self._shard_dir()
        dtypes = {"gene_ids": np.int32, "values": np.float32, "token_type_ids": np.int32}
        for f in part.fields:
            with open(d / f"{f}.raw", "ab") as fh:
                np.ascontiguousarray(getattr(part, f), dtype=dtypes[f]).tofile(fh)
        self._lengths.append(part.lengths)
        self._names.append(np.asarray(part.obs_names).astype(str))
        if part.obs is not None:
            self._obs.append(part.obs)

    def _obs_codes(self, obs: pd.DataFrame | None) -> dict[str, np.ndarray]:
        codes = {}
        if obs is None:
            return codes
        for col in obs.columns:
            cats = self._categories.setdefault(col, [])
            values = obs[col].astype(str).to_numpy()
            known = {c: i for i, c in enumerate(cats)}
            for v in pd.unique(values):
                if v not in known:
                    known[v] = len(cats)
                    cats.append(v)
            codes[col] = np.array([known[v] for v in values], dtype=np.int32)
        return codes

    def _flush(self) -> None:
        if not self._pending_n:
            return
        name = f"shard-{len(self._shards):05d}"
        n = self._pending_n
        cell_index = np.arange(self._n_cells, self._n_cells + n, dtype=np.int64)
        if self.format == "npy":
            d = self._shard_dir()
            lengths = np.concatenate(self._lengths)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            for raw in sorted(d.glob("*.raw")):
                data = np.memmap(raw, dtype=np.float32 if raw.stem == "values" else np.int32, mode="r")
                out = np.lib.format.open_memmap(
                    d / f"{raw.stem}.npy", mode="w+", dtype=data.dtype, shape=data.shape
                )
                step = 1 << 24
                for i in range(0, len(data), step):
                    out[i : i + step] = data[i : i + step]
                out.flush()
                del out
                del data
                raw.unlink()
            small = {"offsets": offsets, "cell_index": cell_index, "obs_names": np.concatenate(self._names)}
            obs = pd.concat(self._obs, ignore_index=True) if self._obs else None
            for col, codes in self._obs_codes(obs).items():
                small[f"obs-{col}"] = codes
            for key, arr in small.items():
                np.save(d / f"{key}.npy", arr)
            n_tokens = int(offsets[-1])
        else:
            block = TokenizedCells.concat(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._obs_codes(block.obs)
            self._write_parquet(block, name, cell_index)
            n_tokens = int(block.n_tokens)
        self._shards.append({"name": name, "n_cells": n, "n_tokens": n_tokens})
        self._n_cells += n
        self._pending, self._pending_n = [], 0
        self._lengths, self._names, self._obs = [], [], []

    def _write_parquet(self, block: TokenizedCells, name: str, cell_index: np.ndarray) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow is in the test extra
            from cellkit._errors import MissingDependencyError

            raise MissingDependencyError('format="parquet" needs pyarrow: `pip install pyarrow`.') from exc
        offsets = pa.array(block.offsets.astype(np.int32) if block.n_tokens < 2**31 else block.offsets)
        table = {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(block.gene_ids.astype(np.int32))),
            "length": pa.array(block.lengths.astype(np.int32)),
            "cell_index": pa.array(cell_index),
            "obs_name": pa.array(np.asarray(block.obs_names).astype(str)),
        }
        if block.values is not None:
            table["values"] = pa.ListArray.from_arrays(offsets, pa.array(block.values.astype(np.float32)))
        if block.token_type_ids is not None:
            table["token_type_ids"] = pa.ListArray.from_arrays(
                offsets, pa.array(block.token_type_ids.astype(np.int32))
            )
        if block.obs is not None:
            for col in block.obs.columns:
                if col != "_cell_index":
                    table[col] = pa.array(block.obs[col].astype(str).to_numpy())
        pq.write_table(pa.table(table), self._root / f"{name}.parquet")

    def close(self) -> ShardedTokens:
        """Write the last shard and the manifest; return the reader."""
        if not self._closed:
            self._flush()
            t = (
                self._template
                if self._template is not None
                else TokenizedCells(np.zeros(0, np.int32), np.zeros(1, np.int64))
            )
            manifest = {
                "format": FORMAT,
                "version": 1,
                "storage": self.format,
                "scheme": t.scheme,
                "options": t.options,
                "specials": t.specials,
                "pad_value": t.pad_value,
                "fields": list(t.fields),
                "n_cells": self._n_cells,
                "n_tokens": int(sum(s["n_tokens"] for s in self._shards)),
                "obs_columns": self._categories,
                "coverage": None if t.coverage is None else vars(t.coverage) | {},
                "notes": t.notes,
                "shards": self._shards,
            }
            # the manifest last, then the whole directory is swapped in
            (self._root / MANIFEST).write_text(
                json.dumps(manifest, indent=1, default=_jsonable), encoding="utf-8"
            )
            self._out.commit()
            self._closed = True
        return ShardedTokens(self.path)

    def abort(self) -> None:
        """Discard what was written; ``path`` stays as it was."""
        self._out.abort()
        self._closed = True


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


class ShardedTokens:
    """Read a shard directory lazily (arrays are memory-mapped; nothing is loaded up front).

    Offers the same per-cell access as :class:`TokenizedCells` (``len``, ``cell(i)``,
    ``lengths``) plus per-shard access for streaming datasets.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = recover_directory(path)  # a swap interrupted between its renames left the old copy
        file = self.path / MANIFEST
        if not file.is_file():
            raise DataError(
                f"{self.path} has no {MANIFEST}: it is not a cellkit shard directory (the output= directory of "
                "cellkit.tokenize), or writing it did not finish."
            )
        manifest = read_json(
            file, what="token shard manifest", max_bytes=_MANIFEST_MAX_BYTES, error=DataError
        )
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"{self.path / MANIFEST} is not a cellkit token manifest.")
        self.manifest = _check_manifest(manifest, file)
        self.storage = self.manifest.get("storage", "npy")
        self._root = self.path.resolve()
        for info in self.manifest["shards"]:
            target = self.path / (info["name"] + (".parquet" if self.storage == "parquet" else ""))
            self._confined(target, f"shards[].name {info['name']!r}")
        counts = [s["n_cells"] for s in self.manifest["shards"]]
        self.shard_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cache: dict[int, TokenizedCells] = {}

    def _confined(self, target: Path, field: str) -> Path:
        """``target`` if it lies inside the shard directory (no symlink or ``..`` leading out)."""
        try:
            inside = target.resolve().is_relative_to(self._root) and not target.is_symlink()
        except (OSError, RuntimeError):
            inside = False
        if not inside:
            raise DataError(
                f"{self.path / MANIFEST}: {field} leads outside the shard directory ({target}); a manifest may "
                "only name files inside its own directory."
            )
        return target

    def _bad(self, name: str, what: str) -> DataError:
        return DataError(
            f"{self.path / MANIFEST}: shard {name!r} does not match its arrays ({what}); the shard directory is "
            "damaged or was edited. Write it again with cellkit.tokenize(..., output=...)."
        )

    def _check_shard(self, info: dict[str, Any], cells: TokenizedCells) -> None:
        """The manifest's counts against the arrays actually on disk (cheap: lengths and ends)."""
        name, n = info["name"], len(cells)
        if n != info["n_cells"]:
            raise self._bad(name, f"n_cells is {info['n_cells']} but the arrays hold {n} cells")
        if cells.n_tokens != info["n_tokens"]:
            raise self._bad(
                name, f"n_tokens is {info['n_tokens']} but the arrays hold {cells.n_tokens} tokens"
            )
        if n and np.any(np.diff(cells.offsets) < 0):
            raise self._bad(name, "offsets decrease")
        idx = getattr(cells, "cell_index", None)
        if idx is not None and len(idx) != n:
            raise self._bad(name, f"cell_index has {len(idx)} entries for {n} cells")
        if cells.obs is not None and len(cells.obs) != n:
            raise self._bad(name, f"the obs columns have {len(cells.obs)} rows for {n} cells")

    # ------------------------------------------------------------------ per shard
    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def __len__(self) -> int:
        return int(self.manifest["n_cells"])

    @property
    def scheme(self) -> str:
        return self.manifest["scheme"]

    @property
    def specials(self) -> dict[str, int]:
        return dict(self.manifest["specials"])

    @property
    def pad_value(self) -> float:
        return float(self.manifest["pad_value"])

    @property
    def max_length(self) -> int | None:
        """The maximum tokens per cell the tokenization allowed (see :attr:`TokenizedCells.max_length`)."""
        return _max_length(self.manifest["options"])

    def shard(self, k: int, *, cache: bool = True) -> TokenizedCells:
        """Shard ``k`` as a :class:`TokenizedCells` backed by memory-mapped arrays.

        ``cache=False`` leaves it out of the reader's small cache of recently used shards (for
        callers that bound what stays open themselves, e.g. streaming datasets).
        """
        if k in self._cache:
            return self._cache[k] if cache else self._cache.pop(k)
        info = self.manifest["shards"][k]
        try:
            cells = self._read_shard(info)
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise self._bad(info["name"], f"{type(exc).__name__}: {exc}") from None
        self._check_shard(info, cells)
        if cache:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = cells
        return cells

    def cell_reader(self, k: int) -> CellReader | TokenizedCells:
        """A reader of single cells of shard ``k`` for random access that stays out of core.

        npy shards: a :class:`CellReader` (positional reads; no page of the shard stays mapped
        into the process, so the resident memory does not grow with the cells read). Parquet
        shards are read whole: the shard itself (a :class:`TokenizedCells`).
        """
        cells = self.shard(k, cache=False)  # checks the shard against its manifest entry
        if self.storage == "parquet":
            return cells
        return CellReader(self.path / self.manifest["shards"][k]["name"], cells)

    def _read_shard(self, info: dict[str, Any]) -> TokenizedCells:
        if self.storage == "parquet":
            cells = self._read_parquet(info["name"])
        else:
            d = self._confined(self.path / info["name"], f"shards[].name {info['name']!r}")

            def load(name: str, mmap: bool = True) -> np.ndarray | None:
                f = d / f"{name}.npy"
                if not f.exists() and not f.is_symlink():
                    return None
                self._confined(f, f"the file {name}.npy of shard {info['name']!r}")
                return np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)

            obs = None
            if self.manifest["obs_columns"]:
                columns = {}
                for col, cats in self.manifest["obs_columns"].items():
                    codes = load(f"obs-{col}", mmap=False)
                    if codes is None:
                        raise self._bad(info["name"], f"obs-{col}.npy is missing")
                    if len(codes) and (codes.min() < -1 or codes.max() >= len(cats)):
                        raise self._bad(
                            info["name"], f"obs-{col}.npy holds codes outside its {len(cats)} categories"
                        )
                    columns[col] = pd.Categorical.from_codes(codes, categories=cats)
                obs = pd.DataFrame(columns)
            if load("gene_ids") is None or load("offsets") is None:
                raise self._bad(info["name"], "gene_ids.npy or offsets.npy is missing")
            # every array memory-mapped: opening a shard reads only its obs codes, and a cell read
            # touches only its own pages (random access over many shards stays out of core)
            cells = TokenizedCells(
                gene_ids=load("gene_ids"),
                offsets=load("offsets"),
                values=load("values"),
                token_type_ids=load("token_type_ids"),
                obs_names=load("obs_names"),
                obs=obs,
                scheme=self.manifest["scheme"],
                options=self.manifest["options"],
                specials=self.specials,
                pad_value=self.pad_value,
            )
            cells.cell_index = load("cell_index")  # type: ignore[attr-defined]
        return cells

    def _read_parquet(self, name: str) -> TokenizedCells:
        import pyarrow.parquet as pq

        table = pq.read_table(self._confined(self.path / f"{name}.parquet", f"shards[].name {name!r}"))
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy().astype(np.int64)
        vals = (
            table.column("values").combine_chunks().values.to_numpy()
            if "values" in table.column_names
            else None
        )
        types = (
            table.column("token_type_ids").combine_chunks().values.to_numpy()
            if "token_type_ids" in table.column_names
            else None
        )
        obs_cols = list(self.manifest["obs_columns"])
        obs = table.select(obs_cols).to_pandas() if obs_cols else None
        cells = TokenizedCells(
            gene_ids=ids.values.to_numpy(),
            offsets=offsets,
            values=vals,
            token_type_ids=types,
            obs_names=table.column("obs_name").to_numpy().astype(str),
            obs=obs,
            scheme=self.manifest["scheme"],
            options=self.manifest["options"],
            specials=self.specials,
            pad_value=self.pad_value,
        )
        cells.cell_index = table.column("cell_index").to_numpy()  # type: ignore[attr-defined]
        return cells

    # ------------------------------------------------------------------ per cell
    @property
    def lengths(self) -> np.ndarray:
        """``(n_cells,)`` int64 tokens per cell (reads only the offsets)."""
        return (
            np.concatenate([self.shard(k, cache=False).lengths for k in range(self.n_shards)])
            if self.n_shards
            else np.zeros(0, np.int64)
        )

    @property
    def fields(self) -> tuple[str, ...]:
        """Per-token arrays present (``gene_ids`` always)."""
        listed = self.manifest.get("fields")
        if listed:
            return tuple(f for f in FIELDS if f in listed)
        return self.shard(0, cache=False).fields if self.n_shards else ("gene_ids",)

    @property
    def obs_columns(self) -> list[str]:
        """Names of the obs columns carried in the shards."""
        return list(self.manifest.get("obs_columns") or {})

    def obs_column(self, key: str, index: np.ndarray | None = None) -> pd.Categorical:
        """One obs column of every cell (or of the cells at ``index``), read without the token arrays.

        Parameters
        ----------
        key
            A column of :attr:`obs_columns`.
        index
            Global cell positions to take (default: all cells, in order).

        Returns
        -------
        ``pandas.Categorical`` over the manifest's categories (strings; the writer stored values as
        text, so a missing value reads as ``"nan"``). Memory: one small integer code per cell.
        """
        cats = (self.manifest.get("obs_columns") or {}).get(key)
        if cats is None:
            raise DataError(
                f"{key!r} is not an obs column of {self.path}; columns: {self.obs_columns or 'none'}. Keep the "
                "column when tokenizing (cellkit.tokenize(..., obs_columns=[...]))."
            )
        dtype = np.int8 if len(cats) < 2**7 else np.int16 if len(cats) < 2**15 else np.int32
        codes = np.empty(len(self), dtype=dtype)
        for k, info in enumerate(self.manifest["shards"]):
            a, b = int(self.shard_offsets[k]), int(self.shard_offsets[k + 1])
            codes[a:b] = self._shard_obs_codes(info, key, cats)
        if index is not None:
            codes = codes[np.asarray(index)]
        return pd.Categorical.from_codes(codes, categories=cats)

    def _shard_obs_codes(self, info: dict[str, Any], key: str, cats: list[str]) -> np.ndarray:
        """Category codes of column ``key`` in one shard (the codes file alone / one parquet column)."""
        if self.storage == "parquet":
            import pyarrow.parquet as pq

            file = self._confined(self.path / f"{info['name']}.parquet", f"shards[].name {info['name']!r}")
            values = pq.read_table(file, columns=[key]).column(key).to_numpy(zero_copy_only=False)
            codes = pd.Categorical(np.asarray(values).astype(str), categories=cats).codes
        else:
            file = self._confined(self.path / info["name"] / f"obs-{key}.npy", f"obs-{key}.npy of {info['name']!r}")
            if not file.exists():
                raise self._bad(info["name"], f"obs-{key}.npy is missing")
            codes = np.load(file, allow_pickle=False)
        if len(codes) != info["n_cells"]:
            raise self._bad(info["name"], f"obs-{key} has {len(codes)} rows for {info['n_cells']} cells")
        if len(codes) and (codes.min() < -1 or codes.max() >= len(cats)):
            raise self._bad(info["name"], f"obs-{key} holds codes outside its {len(cats)} categories")
        return codes

    @property
    def obs_names(self) -> np.ndarray:
        """``(n_cells,)`` cell names of every shard, in order (reads all names: one string per cell)."""
        parts = [np.asarray(self.shard(k, cache=False).obs_names).astype(str) for k in range(self.n_shards)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=str)

    def subset(self, index: Sequence[int] | np.ndarray) -> ShardSubset:
        """The cells at ``index`` (in that order) as a lazy :class:`ShardSubset`; nothing is loaded."""
        return ShardSubset(self, index)

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row within shard) of global cell ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"cell {i} out of range for {len(self)} cells")
        k = int(np.searchsorted(self.shard_offsets, i, side="right") - 1)
        return k, int(i - self.shard_offsets[k])

    def cell(self, i: int) -> dict[str, np.ndarray]:
        k, j = self.locate(i)
        return self.shard(k).cell(j)

    def to_memory(self) -> TokenizedCells:
        """Load every shard into one in-memory :class:`TokenizedCells`."""
        parts = [self.shard(k) for k in range(self.n_shards)]
        cells = TokenizedCells.concat([replace(p, gene_ids=np.asarray(p.gene_ids)) for p in parts])
        cells.notes = self.notes
        return cells

    @property
    def n_tokens(self) -> int:
        return int(sum(s["n_tokens"] for s in self.manifest["shards"]))

    @property
    def notes(self) -> list[str]:
        return list(self.manifest.get("notes", []))

    def summary(self) -> str:
        """What :meth:`TokenizedCells.summary` says, for the whole directory (reads only the offsets)."""
        text = (
            f"{len(self):,} cells tokenized with the {self.scheme!r} scheme in {self.n_shards} shard(s) at "
            f"{self.path}: {self.n_tokens:,} tokens, {_length_text(self.lengths)}"
        )
        if self.manifest.get("obs_columns"):
            text += f"\nobs columns: {', '.join(self.manifest['obs_columns'])}"
        for note in self.notes:
            text += f"\nnote: {note}"
        return text

    def __repr__(self) -> str:
        return f"ShardedTokens({self.path}, {len(self):,} cells in {self.n_shards} shards, scheme={self.scheme!r})"


class CellReader:
    """Single cells of one npy shard, read with positional reads (``os.pread``) instead of memory maps.

    Pages of a memory-mapped file that a process has touched count in its resident memory until
    the map is closed; a training run that reads cells at random from a big shard directory would
    thereby map (nearly) all of it. A positional read copies just the cell's bytes, which are freed
    with the batch. Built by :meth:`ShardedTokens.cell_reader` from a checked shard.

    Parameters
    ----------
    directory
        The shard's directory.
    cells
        The shard as memory-mapped :class:`TokenizedCells` (for the arrays' layout and its fields).
    """

    def __init__(self, directory: Path, cells: TokenizedCells) -> None:
        self.fields = cells.fields
        self.n_cells = len(cells)
        self._files: dict[str, tuple[Any, int, np.dtype]] = {}
        try:
            for name in (*self.fields, "offsets", "obs_names"):
                arr = cells.offsets if name == "offsets" else getattr(cells, name)
                mapped = arr if isinstance(arr, np.memmap) else getattr(arr, "base", None)
                if not isinstance(mapped, np.memmap):
                    raise DataError(f"{directory}: {name} is not a memory-mapped npy array.")
                fh = open(directory / f"{name}.npy", "rb")  # noqa: SIM115 - closed in close()
                self._files[name] = (fh, int(mapped.offset), np.dtype(arr.dtype))
        except BaseException:
            self.close()
            raise
        self._where = directory

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        fh, base, dtype = self._files[name]
        size = (stop - start) * dtype.itemsize
        buf = os.pread(fh.fileno(), size, base + start * dtype.itemsize) if size else b""
        if len(buf) != size:
            raise DataError(
                f"{self._where}: {name}.npy ends before cell data that its offsets point to; the shard is damaged. "
                "Write it again with cellkit.tokenize(..., output=...)."
            )
        return np.frombuffer(buf, dtype=dtype)

    def cell(self, j: int) -> dict[str, np.ndarray]:
        """Token arrays of cell ``j`` of the shard (fresh read-only arrays)."""
        if not 0 <= j < self.n_cells:
            raise IndexError(f"cell {j} out of range for {self.n_cells} cells")
        a, b = (int(x) for x in self._read("offsets", j, j + 2))
        if b < a:
            raise DataError(f"{self._where}: offsets decrease at cell {j}; the shard is damaged.")
        return {f: self._read(f, a, b) for f in self.fields}

    def name(self, j: int) -> str:
        """The name of cell ``j``."""
        return str(self._read("obs_names", j, j + 1)[0])

    def close(self) -> None:
        for fh, _, _ in self._files.values():
            fh.close()
        self._files = {}

    def __del__(self) -> None:
        self.close()


class ShardSubset:
    """Some cells of a shard directory, in a given order, read lazily (:meth:`ShardedTokens.subset`).

    What a split of a shard directory is: an index set over its cells, never a copy of their
    tokens. It offers the per-cell access of :class:`TokenizedCells` (``len``, ``lengths``,
    ``cell(i)``, ``obs_names``, ``scheme`` / ``specials`` / ``pad_value`` / ``options``), so
    :class:`~cellkit.data.CellDataset`, the collators and inference take it like in-memory tokens;
    each cell is read from the memory-mapped shards when asked for. Memory: the index (4 or 8
    bytes per cell) and the open shards' memory maps (npy shards; parquet shards are read whole).

    Parameters
    ----------
    tokens
        The shard directory's reader.
    index
        ``(n,)`` global cell positions (or a boolean mask over all cells).
    max_open_shards
        Shards kept open for random access (:meth:`cell`).
    """

    def __init__(
        self, tokens: ShardedTokens, index: Sequence[int] | np.ndarray, *, max_open_shards: int = 64
    ) -> None:
        from collections import OrderedDict

        idx = np.asarray(index)
        if idx.dtype == bool:
            if len(idx) != len(tokens):
                raise DataError(f"A boolean mask of {len(idx)} entries for {len(tokens)} cells.")
            idx = np.flatnonzero(idx)
        if idx.size and idx.dtype.kind not in "iu":
            raise DataError(f"Cell positions must be integers, got an array of dtype {idx.dtype}.")
        idx = idx.reshape(-1)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(tokens)):
            raise IndexError(f"cell positions out of range for {len(tokens)} cells")
        # positions fit in int32 below 2**31 cells: half the memory of a split of a big directory
        self.index = idx.astype(np.int32 if len(tokens) < 2**31 else np.int64, copy=False)
        self.tokens = tokens
        self.max_open_shards = int(max_open_shards)
        self._open: OrderedDict[int, CellReader | TokenizedCells] = OrderedDict()
        self._lengths: np.ndarray | None = None

    # ------------------------------------------------------------------ what the tokens are
    def __len__(self) -> int:
        return len(self.index)

    @property
    def path(self) -> Path:
        return self.tokens.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.tokens.manifest

    @property
    def scheme(self) -> str:
        return self.tokens.scheme

    @property
    def options(self) -> dict[str, Any]:
        return self.tokens.manifest["options"]

    @property
    def specials(self) -> dict[str, int]:
        return self.tokens.specials

    @property
    def pad_value(self) -> float:
        return self.tokens.pad_value

    @property
    def max_length(self) -> int | None:
        return self.tokens.max_length

    @property
    def notes(self) -> list[str]:
        return self.tokens.notes

    @property
    def fields(self) -> tuple[str, ...]:
        return self.tokens.fields

    @property
    def obs_columns(self) -> list[str]:
        return self.tokens.obs_columns

    # ------------------------------------------------------------------ per cell
    @property
    def lengths(self) -> np.ndarray:
        """``(n,)`` int64 tokens per cell (read from the shards' offsets, one shard at a time)."""
        if self._lengths is None:
            out = np.zeros(len(self), dtype=np.int64)
            bounds = self.tokens.shard_offsets
            shard_of = np.searchsorted(bounds, self.index, side="right") - 1
            for k in np.unique(shard_of).tolist():
                rows = np.flatnonzero(shard_of == k)
                out[rows] = self.tokens.shard(k, cache=False).lengths[self.index[rows] - bounds[k]]
            self._lengths = out
        return self._lengths

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def _shard(self, k: int) -> CellReader | TokenizedCells:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        reader = self._open[k] = self.tokens.cell_reader(k)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return reader

    def cell(self, i: int) -> dict[str, np.ndarray]:
        """Token arrays of cell ``i`` of the subset (read from its shard; read-only)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"cell {i} out of range for {len(self)} cells")
        k, j = self.tokens.locate(int(self.index[i]))
        return self._shard(k).cell(j)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.cell(i)

    @property
    def obs_names(self) -> np.ndarray:
        """``(n,)`` names of the cells (reads the names of every shard involved)."""
        bounds = self.tokens.shard_offsets
        out = None
        shard_of = np.searchsorted(bounds, self.index, side="right") - 1
        for k in np.unique(shard_of).tolist():
            rows = np.flatnonzero(shard_of == k)
            names = np.asarray(self.tokens.shard(k, cache=False).obs_names[self.index[rows] - bounds[k]]).astype(str)
            if out is None or names.dtype.itemsize > out.dtype.itemsize:
                out = np.zeros(len(self), dtype=names.dtype) if out is None else out.astype(names.dtype)
            out[rows] = names
        return out if out is not None else np.zeros(0, dtype=str)

    def obs_column(self, key: str) -> pd.Categorical:
        """One obs column of these cells, read without the token arrays (see :meth:`ShardedTokens.obs_column`)."""
        return self.tokens.obs_column(key, self.index)

    @property
    def obs(self) -> pd.DataFrame | None:
        """The carried obs columns of these cells (categorical; no token arrays are read)."""
        cols = self.obs_columns
        if not cols:
            return None
        return pd.DataFrame({c: self.obs_column(c) for c in cols})

    def subset(self, index: Sequence[int] | np.ndarray) -> ShardSubset:
        """The cells at ``index`` of this subset, still lazy."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return ShardSubset(self.tokens, self.index[idx], max_open_shards=self.max_open_shards)

    def to_memory(self) -> TokenizedCells:
        """Load these cells (only these) into an in-memory :class:`TokenizedCells`, in subset order."""
        bounds = self.tokens.shard_offsets
        shard_of = np.searchsorted(bounds, self.index, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        parts = []
        for k in np.unique(shard_of).tolist():
            rows = order[shard_of[order] == k]
            parts.append(self.tokens.shard(k, cache=False).subset(self.index[rows] - bounds[k]))
        if not parts:
            empty = self.tokens.shard(0, cache=False).subset(np.zeros(0, np.int64)) if self.tokens.n_shards else None
            if empty is None:
                return TokenizedCells(np.zeros(0, np.int32), np.zeros(1, np.int64))
            empty.notes = self.notes
            return empty
        cells = TokenizedCells.concat(parts).subset(np.argsort(order, kind="stable"))
        cells.notes = self.notes
        return cells

    def __getstate__(self) -> dict[str, Any]:
        # memory maps would be pickled as copies: send the path and the index, reopen on the other side
        return {"path": str(self.tokens.path), "index": self.index, "max_open_shards": self.max_open_shards}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(ShardedTokens(state["path"]), state["index"], max_open_shards=state["max_open_shards"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ShardSubset({len(self):,} of the {len(self.tokens):,} cells of {self.tokens.path})"


def _max_length(options: dict[str, Any]) -> int | None:
    value = options.get("max_length")
    return None if value is None else int(value)


def _length_text(lengths: np.ndarray) -> str:
    """``"length MIN–MAX (median M)"`` of per-cell token counts (zeros when there are no cells)."""
    if not len(lengths):
        return "length 0–0 (median 0)"
    return f"length {int(lengths.min())}–{int(lengths.max())} (median {float(np.median(lengths)):.0f})"


_MANIFEST_MAX_BYTES = 256 << 20
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_FieldError = Callable[[str, str], DataError]


def _check_manifest(m: dict[str, Any], file: Path) -> dict[str, Any]:
    """Types and names of a manifest's fields; a DataError naming the file and field otherwise."""

    def bad(field: str, want: str) -> DataError:
        got = m.get(field) if "." not in field and "[" not in field else None
        shown = f" (got {got!r})" if got is not None and len(repr(got)) < 80 else ""
        return DataError(
            f"{file}: field {field!r} must be {want}{shown}; the manifest is damaged or was not written by "
            "cellkit. Write the shards again with cellkit.tokenize(..., output=...)."
        )

    _check_manifest_fields(m, bad)
    _check_obs_columns(m["obs_columns"], bad)
    _check_shard_entries(m["shards"], bad)
    total = sum(info["n_cells"] for info in m["shards"])
    if m.get("n_cells") != total:
        raise bad("n_cells", f"the sum of the shards' n_cells ({total})")
    return m


def _check_manifest_fields(m: dict[str, Any], bad: _FieldError) -> None:
    """The manifest's top-level fields: version, storage, the required objects and the optional ones."""
    if not _count(m.get("version", 1)) or m.get("version", 1) > 1:
        raise bad("version", "1 (a newer cellkit wrote this directory? upgrade cellkit)")
    if m.get("storage", "npy") not in ("npy", "parquet"):
        raise bad("storage", "'npy' or 'parquet'")
    for key, kind, want in (
        ("scheme", str, "a string"),
        ("options", dict, "an object"),
        ("specials", dict, "an object of role -> token id"),
        ("obs_columns", dict, "an object of column -> categories"),
        ("shards", list, "a list of shards"),
    ):
        if not isinstance(m.get(key), kind):
            raise bad(key, want)
    if not all(isinstance(r, str) and _count(i) for r, i in m["specials"].items()):
        raise bad("specials", "an object of role -> non-negative token id")
    if not isinstance(m.get("pad_value", 0.0), int | float) or isinstance(m.get("pad_value"), bool):
        raise bad("pad_value", "a number")
    if not isinstance(m.get("fields", []), list) or not set(m.get("fields", [])) <= set(FIELDS):
        raise bad("fields", f"a list drawn from {list(FIELDS)}")
    if not isinstance(m.get("notes", []), list):
        raise bad("notes", "a list of strings")


def _check_obs_columns(obs_columns: dict[str, Any], bad: _FieldError) -> None:
    """Each obs column name is safe in a file name and maps to a list of category strings."""
    for col, cats in obs_columns.items():
        if any(c in col for c in "/\\\x00"):  # it becomes part of a file name: obs-<column>.npy
            raise bad(f"obs_columns[{col!r}]", "a column name without '/', '\\' or NUL")
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise bad(f"obs_columns[{col!r}]", "a list of category strings")


def _check_shard_entries(shards: list[Any], bad: _FieldError) -> None:
    """Each shard entry is an object with a unique plain name and non-negative cell and token counts."""
    names = set()
    for i, info in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(info, dict):
            raise bad(where, "an object with name, n_cells and n_tokens")
        name = info.get("name")
        if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name in names:
            raise bad(
                f"{where}.name", "a unique plain name inside the directory (no '/', '..' or absolute path)"
            )
        names.add(name)
        for key in ("n_cells", "n_tokens"):
            if not _count(info.get(key)):
                raise bad(f"{where}.{key}", "a non-negative integer")


def open_shards(path: str | os.PathLike[str]) -> ShardedTokens:
    """Open a shard directory written by :meth:`TokenizedCells.to_shards` or :func:`cellkit.tokenize`."""
    return ShardedTokens(path)
