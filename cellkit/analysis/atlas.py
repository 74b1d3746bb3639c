"""Atlas-scale embedding and prediction into files: chunked, resumable, parallel under ``torchrun``.

:func:`embed_to_output` (what ``cellkit.embed_cells(..., output=PATH)`` and ``cellkit embed`` run)
and :func:`predict_to_output` (``cellkit predict``) read an AnnData (in memory or backed) or a
token shard directory chunk by chunk, never all at once, and write their results to ``output``:

``OUT.h5ad``
    A copy of the input ``.h5ad`` (a new file holding only ``obs_names`` when the input is a shard
    directory) with the results added: ``obsm[key_added]`` for embeddings; for predictions
    ``obs[key]``, ``obs[key + "_confidence"]``, ``obsm[key + "_probabilities"]`` and
    ``uns[key] = {"classes": ...}`` (as :func:`cellkit.predict` writes them). Rows of unselected
    cells are NaN. The file is written beside ``OUT.h5ad`` and renamed over it at the end; the
    results are copied in chunk by chunk (the input's ``X`` is copied as a file, never loaded).
    Chunk results live in ``OUT.h5ad.parts/`` while the job runs (removed when it is done).
``DIR`` (any other path)
    A directory for atlases too big to rewrite: ``manifest.json`` (what was run, with which model
    and settings), ``obs_names.npy`` (the selected cells, input order) and one memory-mappable
    ``.npy`` per result (``np.load(DIR / "X_cellkit.npy", mmap_mode="r")``), rows aligned with
    ``obs_names.npy``.

Each finished job writes its run record (:class:`cellkit.RunRecord`: options, model and data
identity, environment, timing): ``DIR/run.json``, or ``OUT.h5ad.run.json`` beside an ``.h5ad``
output (read with :func:`cellkit.load_run` or ``cellkit info``). A job found already complete
leaves an existing record as it is.

Under ``torchrun`` every rank computes its share of chunks (see :func:`cellkit._inference.run_chunks`)
and rank 0 assembles them in input order; the result is the same bits as one process gives. A job
killed or pre-empted mid-way and run again with the same arguments skips the chunks already written.

``batch_size="auto"`` (``--batch-size auto``): 64 cells per forward pass, halved after each
out-of-memory error. Each chunk file records the size its results were computed with; once every
rank is done, the ranks agree on the smallest size any of them reached and compute again the
chunks written at a larger one (also chunks of a resumed run), so the outputs are exactly those
of a fixed ``batch_size`` at that size. The run's fingerprint says ``"auto"`` (a resumed "auto"
run keeps its chunks and goes on at their size); the size that worked is in ``manifest.json``
(``batch_size_worked``), in the run record (``metrics["batch_size_worked"]``) and, for
predictions in an ``.h5ad``, in ``uns[key_added]["batch_size"]`` as :func:`cellkit.predict` writes it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .._anndata import check_adata, check_finite_rows, check_keys_free, record_written
from .._errors import ConfigError, DataError
from .._inference import (
    AUTO_BATCH_SIZE,
    AutoBatchSize,
    ChunkPlan,
    ChunkRun,
    ResultStore,
    check_precision,
    class_probabilities,
    model_fingerprint,
    read_cells,
    resolve_device,
    run_chunks,
    to_batch_size,
)
from .._utils import Progress, atomic_path, ensure_writable_dir, get_logger
from .._utils._run import run_file_for
from ..data.sources import select_rows
from ..data.tokenize import tokenize
from ..data.tokenized import ShardedTokens, TokenizedCells
from ..model import CellModel
from ._runs import RunRecorder, write_beside

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["AUTO_BATCH_SIZE", "check_output", "embed_to_output", "output_kind", "predict_to_output"]

log = get_logger(__name__)

#: the suffix of the work directory beside an ``.h5ad`` output (chunk results while the job runs)
PARTS_SUFFIX = ".parts"


def output_kind(output: str | os.PathLike[str]) -> str:
    """``"h5ad"`` for a path ending in ``.h5ad``, else ``"dir"`` (an array store directory)."""
    return "h5ad" if Path(output).suffix == ".h5ad" else "dir"


def _work_dir(output: Path) -> Path:
    return output if output_kind(output) == "dir" else output.with_name(output.name + PARTS_SUFFIX)


def check_output(
    output: str | os.PathLike[str], *, overwrite: bool = False, source: str | os.PathLike[str] | None = None
) -> Path:
    """Refuse, before any work, an ``output`` that cannot be written or would destroy something.

    Parameters
    ----------
    output
        ``OUT.h5ad`` or a directory (see the module notes).
    overwrite
        An existing ``OUT.h5ad`` other than the input may be replaced.
    source
        The input ``.h5ad`` file, if any (writing the results into it, in place, is allowed).

    Raises
    ------
    ConfigError
        Naming the path and what to do instead.
    """
    out = Path(output).expanduser()
    work = _work_dir(out)
    if output_kind(out) == "h5ad":
        if out.is_dir():
            raise ConfigError(f"--output {out} is a directory; give a file name ending in .h5ad or a new directory.")
        ensure_writable_dir(out.parent, what="--output's directory")
        same = source is not None and out.exists() and os.path.samefile(out, source)
        resuming = (work / "manifest.json").is_file()
        if out.exists() and not same and not overwrite and not resuming:
            raise ConfigError(
                f"--output {out} exists; it would be replaced by a copy of the input with the results. Choose "
                "another file, or pass --overwrite (overwrite=True)."
            )
        if work.exists() and not work.is_dir():
            raise ConfigError(f"{work} exists and is not a directory; the job keeps its chunk results there. Move it away.")
        return out
    ensure_writable_dir(out, what="--output")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ConfigError(
            f"--output {out} is a non-empty directory that is not a cellkit result store; give a new or empty "
            "directory (or a file name ending in .h5ad)."
        )
    return out


# ------------------------------------------------------------------------------------------ sources
class _Source:
    """The cells of a job: an AnnData (tokenized chunk by chunk) or tokens (read chunk by chunk)."""

    def __init__(
        self,
        data: Any,
        model: CellModel,
        *,
        cells: Any,
        tokenize_options: Mapping[str, Any] | None,
        layer: str | None,
        use_raw: bool | None,
        gene_column: str | None,
    ) -> None:
        from anndata import AnnData

        self.data, self.model = data, model
        self.opts = dict(tokenize_options or {})
        #: the unseen-expression check runs on the job's first chunk only (one warning, not one per chunk)
        self.unseen_warning = self.opts.pop("unseen_warning", 0.1)
        self.layer, self.use_raw, self.gene_column = layer, use_raw, gene_column
        self.is_adata = isinstance(data, AnnData)
        if self.is_adata:
            check_adata(data, what="cellkit.embed_cells")
            self.positions: np.ndarray | None = select_rows(data.obs, cells)
            self.n = len(self.positions)
            self.n_obs = data.n_obs
        elif isinstance(data, TokenizedCells | ShardedTokens):
            if cells is not None:
                raise ConfigError("cells= selects cells of an AnnData; pre-tokenized cells are used whole.")
            if tokenize_options or layer or use_raw is not None or gene_column:
                raise ConfigError(
                    "tokenize_options / layer / use_raw / gene_column apply to an AnnData; these cells are "
                    "already tokenized."
                )
            _check_tokens(model, data)
            self.positions = None
            self.n = self.n_obs = len(data)
            if self.n == 0:
                raise DataError("No cells: these tokens hold no cell.")
        else:
            raise DataError(
                f"Expected an AnnData or tokenized cells (cellkit.tokenize), got {type(data).__name__}."
            )

    @property
    def file(self) -> Path | None:
        """The ``.h5ad`` the AnnData is backed by, if any."""
        if self.is_adata and getattr(self.data, "isbacked", False) and self.data.filename is not None:
            return Path(self.data.filename)
        return None

    def identity(self) -> dict[str, Any]:
        """What identifies the input for a resumed run (cells and their names; not file times)."""
        h = hashlib.sha256()
        if self.is_adata:
            h.update("\n".join(map(str, self.data.obs_names)).encode())
            h.update(np.ascontiguousarray(self.positions, dtype=np.int64).tobytes())
            return {
                "kind": "anndata",
                "file": str(self.file.resolve()) if self.file else None,
                "n_obs": int(self.data.n_obs),
                "n_vars": int(self.data.n_vars),
                "cells": h.hexdigest(),
            }
        if isinstance(self.data, ShardedTokens):
            h.update(repr(sorted(self.data.manifest.items())).encode())
            return {"kind": "shards", "path": str(Path(self.data.path).resolve()), "manifest": h.hexdigest()}
        h.update(np.ascontiguousarray(self.data.gene_ids).tobytes())
        h.update(np.ascontiguousarray(self.data.offsets).tobytes())
        if self.data.values is not None:
            h.update(np.ascontiguousarray(self.data.values).tobytes())
        return {"kind": "tokens", "n_cells": self.n, "tokens": h.hexdigest()}

    def names(self, a: int, b: int) -> np.ndarray:
        """``obs_names`` of cells ``a:b`` of the job (input order)."""
        if self.is_adata:
            return np.asarray(self.data.obs_names[self.positions[a:b]]).astype(str)
        if isinstance(self.data, TokenizedCells):
            return np.asarray(self.data.obs_names[a:b]).astype(str)
        offsets, parts = self.data.shard_offsets, []  # a shard directory: names only, no tokens
        k = int(np.searchsorted(offsets, a, side="right") - 1)
        while k < self.data.n_shards and offsets[k] < b:
            s0 = int(offsets[k])
            parts.append(np.asarray(self.data.shard(k, cache=False).obs_names[max(a, s0) - s0 : b - s0]).astype(str))
            k += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=str)

    def tokens(self, a: int, b: int) -> TokenizedCells:
        """Cells ``a:b`` of the job, tokenized (an AnnData's chunk is tokenized now)."""
        if not self.is_adata:
            return read_cells(self.data, a, b)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no gene in the vocabulary.*")
            return tokenize(
                self.data,
                self.model,
                cells=self.positions[a:b],
                layer=self.layer,
                use_raw=self.use_raw,
                gene_column=self.gene_column,
                progress=False,
                unseen_warning=self.unseen_warning if a == 0 else None,
                **self.opts,
            )


def _check_tokens(model: CellModel, tokens: TokenizedCells | ShardedTokens) -> None:
    mine = {role: model.vocab[tok] for role, tok in model.vocab.specials.items()}
    clash = {r: (t, mine.get(r)) for r, t in dict(tokens.specials).items() if mine.get(r) != t}
    if clash:
        raise DataError(
            f"These tokens were not made with this model's vocabulary (special token ids differ: {clash}); "
            "tokenize the data with this model: cellkit.tokenize(adata, model, output=DIR)."
        )


def _rows_of(names: np.ndarray, tokens: TokenizedCells) -> np.ndarray:
    """Row of each tokenized cell within the chunk (the tokenizer may drop cells)."""
    rows = pd.Index(names).get_indexer(np.asarray(tokens.obs_names).astype(str))
    if (rows < 0).any():  # pragma: no cover - tokenize keeps obs names
        raise DataError("Tokenized cells could not be matched back to the input's obs names.")
    return rows


# ------------------------------------------------------------------------------------------ writing
def _write_names(source: _Source, plan: ChunkPlan, dest: Path) -> None:
    """``obs_names.npy`` (fixed-width unicode), filled chunk by chunk through a memory map."""
    width = max(max((len(n) for n in source.names(*plan.bounds(k))), default=1) for k in range(plan.n_chunks))
    with atomic_path(dest) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=f"<U{max(width, 1)}", shape=(plan.n_cells,))
        for k in range(plan.n_chunks):
            a, b = plan.bounds(k)
            arr[a:b] = source.names(a, b)
        arr.flush()
        del arr


def _write_h5ad(
    dest: Path,
    source: _Source,
    *,
    obsm: Mapping[str, Callable[[], Any]],
    obs: Mapping[str, Any] | None = None,
    uns: Mapping[str, Any] | None = None,
) -> None:
    """Write ``dest``: the input with ``obsm`` / ``obs`` / ``uns`` entries added, atomically.

    ``obsm[key]()`` yields ``(start, stop, array)`` chunk results (rows of the job's cells in
    input order); they are copied into an ``(n_obs, ...)`` dataset whose other rows are NaN.
    """
    import anndata as ad
    import h5py
    from anndata.io import read_elem, write_elem

    with atomic_path(dest) as tmp:
        if source.file is not None:
            shutil.copyfile(source.file, tmp)
        elif source.is_adata:
            source.data.write_h5ad(tmp)
        else:
            names = np.concatenate(
                [source.names(a, min(source.n, a + 65_536)) for a in range(0, source.n, 65_536)]
            )
            ad.AnnData(obs=pd.DataFrame(index=pd.Index(names))).write_h5ad(tmp)
        with h5py.File(tmp, "r+") as f:
            for part in ("obsm", "uns"):  # a valid .h5ad may lack them (e.g. anndata's concat_on_disk)
                if part not in f:
                    write_elem(f, part, {})
            group = f["obsm"]
            for key, chunks in obsm.items():
                if key in group:
                    del group[key]
                ds = None
                for a, b, x in chunks():
                    if ds is None:
                        ds = group.create_dataset(
                            key, shape=(source.n_obs, *x.shape[1:]), dtype=x.dtype, fillvalue=np.nan
                        )
                        ds.attrs["encoding-type"] = "array"
                        ds.attrs["encoding-version"] = "0.2.0"
                    rows = np.arange(a, b) if source.positions is None else source.positions[a:b]
                    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
                        ds[int(rows[0]) : int(rows[-1]) + 1] = x
                    elif len(rows):
                        ds[rows] = x
            if obs:
                frame = read_elem(f["obs"])
                for col, values in obs.items():
                    frame[col] = values
                del f["obs"]
                write_elem(f, "obs", frame)
            reg_now = read_elem(f["uns/cellkit"]) if "cellkit" in f["uns"] else None
            holder = SimpleNamespace(uns={} if reg_now is None else {"cellkit": reg_now})
            written = [("obsm", k) for k in obsm] + [("obs", k) for k in (obs or {})]
            written += [("uns", k) for k in (uns or {})]
            record_written(holder, written)
            for key, value in {**(uns or {}), "cellkit": holder.uns["cellkit"]}.items():
                if key in f["uns"]:
                    del f["uns"][key]
                write_elem(f["uns"], key, value)


def _tidy(out: Path) -> None:
    """Remove the chunk results once the outputs are assembled (rank 0)."""
    work = _work_dir(out)
    if output_kind(out) == "h5ad":
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(work / "parts", ignore_errors=True)


def _batch_size(batch_size: int | str | AutoBatchSize) -> tuple[int | AutoBatchSize, AutoBatchSize | None]:
    """``(batch_size checked, the AutoBatchSize of "auto" or None)``."""
    bs = to_batch_size(batch_size)
    return bs, bs if isinstance(bs, AutoBatchSize) else None


def _batch_size_parameter(bs: int | AutoBatchSize) -> int | str:
    """What a run's fingerprint records: the size, or ``"auto"`` (never the size "auto" reached, so
    that a resumed "auto" run keeps its chunks; their sizes are in the chunk files)."""
    if not isinstance(bs, AutoBatchSize):
        return bs
    return "auto" if bs.start == AUTO_BATCH_SIZE else f"auto from {bs.start}"


def _worked(auto: AutoBatchSize | None) -> dict[str, Any]:
    """``{"batch_size": {"auto": first size, "worked": size of every chunk}}`` for "auto", else ``{}``."""
    return {} if auto is None else {"batch_size": {"auto": auto.start, "worked": auto.size}}


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


# ------------------------------------------------------------------------------------------ embed
def embed_to_output(
    data: AnnData | TokenizedCells | ShardedTokens,
    model: CellModel,
    *,
    output: str | os.PathLike[str],
    key_added: str = "X_cellkit",
    cells: Any = None,
    pooling: str | None = None,
    hidden_layer: int | None = None,
    normalize: bool | None = None,
    batch_size: int | str | AutoBatchSize = 64,
    chunk_size: int = 20_000,
    device: str = "auto",
    precision: str = "fp32",
    amp: str | None = None,
    on_empty: str = "raise",
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    overwrite: bool = False,
    progress: bool | Progress = True,
) -> ChunkRun:
    """Embed cells into ``output`` (``OUT.h5ad`` or an array store directory; see the module notes).

    The parameters are those of :func:`cellkit.embed_cells`; ``data`` may also be tokenized cells
    (a shard directory from ``cellkit.tokenize(..., output=DIR)``). Cells are embedded in chunks of
    ``chunk_size`` consecutive (selected) cells, each sorted by length and cut into batches of
    ``batch_size``: the same chunks and batches whatever the number of processes, so one process
    and a ``torchrun`` job give the same bits, and the same bits as ``embed_cells`` without
    ``output`` (same ``chunk_size``).

    Returns
    -------
    :class:`cellkit._inference.ChunkRun`: chunks computed now and skipped (already on disk).
    """
    arguments = dict(locals())  # first statement: the call's arguments, for the run record
    from .embeddings import _embed_tokens, resolve_hidden_layer

    if on_empty not in ("raise", "nan"):
        raise ConfigError(f"on_empty must be 'raise' or 'nan', got {on_empty!r}.")
    bs, auto = _batch_size(batch_size)
    if chunk_size < 1:
        raise ConfigError("chunk_size must be >= 1.")
    resolve_hidden_layer(model, hidden_layer)
    check_precision(precision, amp)
    source = _Source(
        data,
        model,
        cells=cells,
        tokenize_options=tokenize_options,
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
    )
    out = Path(output).expanduser()
    if output_kind(out) == "h5ad" and source.is_adata:
        check_keys_free(data, [("obsm", key_added)], overwrite=overwrite, what="cellkit.embed_cells")
    check_output(out, overwrite=overwrite, source=source.file)
    d = model.config.encoder.d_model
    fingerprint = model_fingerprint(model)
    recorder = RunRecorder("cellkit.analysis.atlas.embed_to_output", arguments, data_arg="data", model_fp=fingerprint)
    params = {
        "task": "embed",
        "input": source.identity(),
        "model": fingerprint,
        "key_added": key_added,
        "pooling": pooling,
        "hidden_layer": hidden_layer,
        "normalize": normalize,
        "batch_size": _batch_size_parameter(bs),
        "device": resolve_device(device).type,
        "precision": precision,
        "amp": amp,
        "on_empty": on_empty,
        "tokenize_options": dict(tokenize_options or {}),
        "layer": layer,
        "use_raw": use_raw,
        "gene_column": gene_column,
    }

    def compute(a: int, b: int, bar: Progress) -> dict[str, np.ndarray]:
        names = source.names(a, b)
        tokens = source.tokens(a, b)
        emb, _ = _embed_tokens(
            model,
            tokens,
            pooling=pooling,
            hidden_layer=hidden_layer,
            normalize=normalize,
            batch_size=bs,
            device=device,
            precision=precision,
            amp=amp,
            on_empty=on_empty,
            progress=bar,
        )
        full = np.full((b - a, d), np.nan, dtype=np.float32)
        full[_rows_of(names, tokens)] = emb
        bar.advance(max(0, (b - a) - len(tokens)))  # cells the tokenizer dropped
        return {"emb": full}

    def finish(store: ResultStore, plan: ChunkPlan) -> None:
        n_nan = sum(int(np.isnan(x).all(axis=1).sum()) for _, _, x in store.iter_field(plan, "emb"))
        if n_nan:
            warnings.warn(
                f"{n_nan} cells have no gene in the model's vocabulary; their {key_added!r} rows are NaN.",
                UserWarning,
                stacklevel=3,
            )
        if output_kind(out) == "h5ad":
            _write_h5ad(out, source, obsm={key_added: lambda: store.iter_field(plan, "emb")})
        else:
            _write_names(source, plan, out / "obs_names.npy")
            store.assemble_npy(plan, "emb", out / f"{key_added}.npy")

    run = run_chunks(
        ResultStore(_work_dir(out)),
        n_cells=source.n,
        chunk_size=chunk_size,
        parameters=params,
        compute=compute,
        finish=finish,
        overwrite=overwrite,
        progress=progress,
        desc="embed",
        extra={"task": "embed", "arrays": {key_added: f"{key_added}.npy"}, "rows": "obs_names.npy"},
        auto=auto,
    )
    if _is_main() and not run.already_complete:
        _tidy(out)
    _write_record(recorder, run, out, source, device, key_added=key_added)
    return run


# ------------------------------------------------------------------------------------------ predict
def predict_to_output(
    data: AnnData | TokenizedCells | ShardedTokens,
    model: CellModel,
    *,
    output: str | os.PathLike[str],
    key_added: str = "cellkit_prediction",
    cells: Any = None,
    batch_size: int | str | AutoBatchSize = 64,
    chunk_size: int = 20_000,
    device: str = "auto",
    precision: str = "fp32",
    tokenize_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    overwrite: bool = False,
    progress: bool | Progress = True,
) -> ChunkRun:
    """Predict cell types with a fine-tuned model's classifier into ``output``.

    Writes what :func:`cellkit.predict` writes into an AnnData — ``obs[key_added]`` (the label),
    ``obs[key_added + "_confidence"]``, ``obsm[key_added + "_probabilities"]`` ``(n_obs, n_classes)``
    and ``uns[key_added] = {"classes": [...]}`` — into ``OUT.h5ad``; or, into a directory,
    ``{key_added}.npy`` (labels, unicode), ``{key_added}_confidence.npy`` and
    ``{key_added}_probabilities.npy`` beside ``obs_names.npy``, the classes in ``manifest.json``.
    Chunked, resumable and torchrun-parallel like :func:`embed_to_output`.
    """
    arguments = dict(locals())  # first statement: the call's arguments, for the run record
    head = model.config.heads.get("classifier")
    if head is None:
        raise ConfigError(
            "This model has no classifier head; fine-tune it first (cellkit finetune / cellkit.finetune) and "
            "predict with the fine-tuned model."
        )
    bs, auto = _batch_size(batch_size)
    if chunk_size < 1:
        raise ConfigError("chunk_size must be >= 1.")
    check_precision(precision)
    classes = [str(c) for c in (head.get("labels") or range(head["n_classes"]))]
    source = _Source(
        data,
        model,
        cells=cells,
        tokenize_options=tokenize_options,
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
    )
    out = Path(output).expanduser()
    keys = [
        ("obs", key_added),
        ("obs", f"{key_added}_confidence"),
        ("obsm", f"{key_added}_probabilities"),
        ("uns", key_added),
    ]
    if output_kind(out) == "h5ad" and source.is_adata:
        check_keys_free(data, keys, overwrite=overwrite, what="cellkit predict")
    check_output(out, overwrite=overwrite, source=source.file)
    fingerprint = model_fingerprint(model)
    recorder = RunRecorder(
        "cellkit.analysis.atlas.predict_to_output", arguments, data_arg="data", model_fp=fingerprint
    )
    params = {
        "task": "predict",
        "input": source.identity(),
        "model": fingerprint,
        "key_added": key_added,
        "batch_size": _batch_size_parameter(bs),
        "device": resolve_device(device).type,
        "precision": precision,
        "tokenize_options": dict(tokenize_options or {}),
        "layer": layer,
        "use_raw": use_raw,
        "gene_column": gene_column,
    }

    def compute(a: int, b: int, bar: Progress) -> dict[str, np.ndarray]:
        names = source.names(a, b)
        tokens = source.tokens(a, b)
        full = np.full((b - a, len(classes)), np.nan, dtype=np.float32)
        if len(tokens):
            p = class_probabilities(
                model, tokens, batch_size=bs, progress=bar, device=device, precision=precision
            )
            check_finite_rows(p, what="class probabilities", names=tokens.obs_names)
            full[_rows_of(names, tokens)] = p
        bar.advance(max(0, (b - a) - len(tokens)))
        return {"p": full}

    def finish(store: ResultStore, plan: ChunkPlan) -> None:
        probs_key = f"{key_added}_probabilities"
        labels = np.full(source.n, "", dtype=object)
        conf = np.full(source.n, np.nan, dtype=np.float32)
        for a, _, p in store.iter_field(plan, "p"):
            ok = ~np.isnan(p).any(axis=1)
            idx = np.flatnonzero(ok)
            labels[a + idx] = np.asarray(classes, dtype=object)[p[ok].argmax(1)]
            conf[a + idx] = p[ok].max(1)
        if output_kind(out) == "h5ad":
            full_labels = np.full(source.n_obs, None, dtype=object)
            full_conf = np.full(source.n_obs, np.nan, dtype=np.float32)
            rows = np.arange(source.n) if source.positions is None else source.positions
            full_labels[rows] = np.where(labels == "", None, labels)
            full_conf[rows] = conf
            _write_h5ad(
                out,
                source,
                obsm={probs_key: lambda: store.iter_field(plan, "p")},
                obs={
                    key_added: pd.Categorical(full_labels, categories=classes),
                    f"{key_added}_confidence": full_conf,
                },
                uns={key_added: {"classes": list(classes), **_worked(auto)}},
            )
        else:
            _write_names(source, plan, out / "obs_names.npy")
            store.assemble_npy(plan, "p", out / f"{probs_key}.npy")
            for name, arr in ((key_added, labels.astype(str)), (f"{key_added}_confidence", conf)):
                with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)

    run = run_chunks(
        ResultStore(_work_dir(out)),
        n_cells=source.n,
        chunk_size=chunk_size,
        parameters=params,
        compute=compute,
        finish=finish,
        overwrite=overwrite,
        progress=progress,
        desc="predict",
        extra={
            "task": "predict",
            "classes": classes,
            "arrays": {
                key_added: f"{key_added}.npy",
                f"{key_added}_confidence": f"{key_added}_confidence.npy",
                f"{key_added}_probabilities": f"{key_added}_probabilities.npy",
            },
            "rows": "obs_names.npy",
        },
        auto=auto,
    )
    if _is_main() and not run.already_complete:
        _tidy(out)
    _write_record(recorder, run, out, source, device, key_added=key_added, classes=classes)
    return run


def _write_record(
    recorder: RunRecorder, run: ChunkRun, out: Path, source: _Source, device: str, **outputs: Any
) -> None:
    """Write the job's run record beside ``out`` (rank 0); a job found complete keeps the one it has."""
    if not _is_main() or (run.already_complete and run_file_for(out).exists()):
        return
    record = recorder.finish(
        status="completed",
        metrics={
            "n_cells": source.n,
            "n_chunks": run.n_chunks,
            "computed": run.computed,
            "skipped": run.skipped,
            "world_size": run.world_size,
            "already_complete": run.already_complete,
            **({} if run.batch_size is None else {"batch_size_worked": run.batch_size, "redone": run.redone}),
        },
        outputs={"output": str(out), "output_resolved": str(out.resolve()), "kind": output_kind(out), **outputs},
        device=resolve_device(device),
    )
    write_beside(record, out)
