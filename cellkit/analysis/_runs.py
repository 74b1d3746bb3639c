"""Recording runs (``run.json``) and running them again: :func:`rerun`.

Who writes a run record, and where (the record itself: :class:`cellkit._utils._run.RunRecord`):

=====================================================  =================================================
call                                                   ``run.json``
=====================================================  =================================================
``finetune`` / ``pretrain``                            ``result.run`` and ``result.model.run`` always;
                                                       ``checkpoint_dir/run.json`` when one is given
``model.save(DIR)`` (a model carrying ``model.run``)   ``DIR/run.json`` (read back by ``load_model``)
``embed_cells`` / ``predict`` with ``output=DIR``      ``DIR/run.json``
``embed_cells`` / ``predict`` with ``output=OUT.h5ad`` ``OUT.h5ad.run.json`` beside the file
``cellkit finetune`` / ``pretrain --out OUT``          ``OUT/run.json`` and ``OUT/model/run.json``
``cellkit tokenize --output DIR``                      ``DIR/run.json`` (in the shard directory)
``cellkit embed`` / ``predict --output ...``           as ``embed_cells`` / ``predict`` above
=====================================================  =================================================

Under ``torchrun`` only rank 0 writes. The data fingerprint hashes ``obs_names`` / ``var_names``
and the selected cell positions in blocks (about 0.1 s per million cells); the model identity
hashes every weight once (what :func:`cellkit._inference.model_fingerprint` computes).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from .._errors import CellkitError, ConfigError, DataError
from .._inference import model_fingerprint
from .._utils import Progress, get_logger
from .._utils._run import (
    CLI_COMMAND,
    RunRecord,
    environment,
    hash_names,
    hash_positions,
    load_run,
    to_json_value,
    utc_now,
    write_run,
)
from ..data.sources import select_rows
from ..data.tokenized import ShardedTokens, TokenizedCells
from ..model import CellModel

__all__ = ["RunRecorder", "data_fingerprint", "is_main_process", "model_identity", "recorded", "rerun"]

log = get_logger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

#: options that name files or directories (recorded as given, and resolved in ``record.paths``)
PATH_OPTIONS = ("checkpoint_dir", "output")
#: data-fingerprint fields compared by :func:`rerun` (paths are not: data may move)
COMPARED = (
    "kind",
    "shape",
    "n_cells",
    "obs_names_sha256",
    "var_names_sha256",
    "raw_var_names_sha256",
    "n_selected",
    "selected_sha256",
    "manifest_sha256",
    "tokens_sha256",
)
#: functions :func:`rerun` runs again: recorded name -> (module, attribute)
RERUNNABLE = {
    "cellkit.finetune": ("cellkit.tasks", "finetune"),
    "cellkit.pretrain": ("cellkit.tasks", "pretrain"),
    "cellkit.analysis.atlas.embed_to_output": ("cellkit.analysis.atlas", "embed_to_output"),
    "cellkit.analysis.atlas.predict_to_output": ("cellkit.analysis.atlas", "predict_to_output"),
}


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job (its process group, or ``RANK`` once the group is gone), or a lone process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


# ============================================================================== identities
def model_identity(model: Any, *, fingerprint: str | None = None) -> dict[str, Any] | None:
    """What identifies a model: hashes of its config, vocabulary and weights, and where it came from.

    Parameters
    ----------
    model
        A :class:`cellkit.CellModel` (anything else gives ``None``).
    fingerprint
        Its :func:`~cellkit._inference.model_fingerprint` when already computed.
    """
    if not isinstance(model, CellModel):
        return None
    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    report = getattr(model, "load_report", None)
    source = getattr(report, "source", None)
    parent = getattr(model, "run", None)
    return {
        "family": model.config.family,
        "config_sha256": hashlib.sha256(cfg.encode()).hexdigest(),
        "vocab_sha256": hash_names(list(model.vocab.tokens)),
        "vocab_size": len(model.vocab),
        "n_parameters": model.num_parameters(),
        "heads": sorted(model.heads),
        "fingerprint": fingerprint or model_fingerprint(model),
        "format": getattr(report, "format", None),
        "source": source,
        "source_resolved": str(Path(source).resolve()) if source else None,
        "made_by": None if parent is None else {"function": parent.function, "finished_at": parent.finished_at},
    }


def data_fingerprint(data: Any, *, cells: Any = None) -> dict[str, Any]:
    """Shape, name hashes and the selected cells of a run's input (cheap: no expression is read).

    Parameters
    ----------
    data
        An AnnData (in memory or backed), an ``.h5ad`` path (opened backed), a token shard
        directory (or its path), tokenized cells, or a list of ``.h5ad`` paths.
    cells
        The run's cell selection (``None``: all); recorded as the count and a hash of the positions.
    """
    if isinstance(data, str | os.PathLike):
        return _path_fingerprint(Path(data), cells)
    if isinstance(data, list | tuple):
        return {"kind": "inputs", "inputs": [data_fingerprint(d) for d in data]}
    if isinstance(data, ShardedTokens):
        manifest = json.dumps(data.manifest, sort_keys=True, default=str)
        return {
            "kind": "shards",
            "path": str(data.path),
            "path_resolved": str(Path(data.path).resolve()),
            "n_cells": len(data),
            "n_shards": data.n_shards,
            "scheme": data.scheme,
            "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
        }
    if isinstance(data, TokenizedCells):
        h = hashlib.sha256()
        for arr in (data.gene_ids, data.offsets, data.values):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
        return {
            "kind": "tokens",
            "n_cells": len(data),
            "obs_names_sha256": hash_names(data.obs_names),
            "tokens_sha256": h.hexdigest(),
        }
    if hasattr(data, "obs_names") and hasattr(data, "var_names") and hasattr(data, "obs"):
        return _anndata_fingerprint(data, cells)
    return {"kind": type(data).__name__}


def _anndata_fingerprint(adata: Any, cells: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "anndata",
        "shape": [int(adata.n_obs), int(adata.n_vars)],
        "obs_names_sha256": hash_names(adata.obs_names),
        "var_names_sha256": hash_names(adata.var_names),
    }
    if getattr(adata, "raw", None) is not None:
        out["raw_var_names_sha256"] = hash_names(adata.raw.var_names)
    if getattr(adata, "isbacked", False) and adata.filename is not None:
        out["file"] = str(Path(adata.filename).resolve())
    try:
        rows = np.arange(adata.n_obs) if cells is None else select_rows(adata.obs, cells)
    except (CellkitError, ValueError, TypeError, KeyError, IndexError) as exc:
        out["selection_error"] = str(exc)[:200]  # the run itself reports the bad selection
    else:
        out["n_selected"] = len(rows)
        out["selected_sha256"] = hash_positions(rows)
    return out


def _path_fingerprint(p: Path, cells: Any = None) -> dict[str, Any]:
    where = {"path": str(p), "path_resolved": str(p.expanduser().resolve())}
    try:
        if p.is_dir():
            from ..data.tokenized import open_shards

            return {**data_fingerprint(open_shards(p)), **where}
        if p.is_file() and p.suffix == ".h5ad":
            import anndata as ad

            adata = ad.read_h5ad(p, backed="r")
            try:
                return {**_anndata_fingerprint(adata, cells), "kind": "h5ad", **where}
            finally:
                adata.file.close()
    except (CellkitError, OSError, ValueError, KeyError) as exc:
        return {"kind": "path", **where, "error": str(exc)[:200]}
    return {"kind": "path", **where}


# ============================================================================== options
def _describe(value: Any) -> tuple[Any, bool]:
    """``(JSON value, replayable)`` for one option: domain objects by their identity, callables by name."""
    if isinstance(value, CellModel):
        return {"type": "cellkit.CellModel", "fingerprint": model_fingerprint(value)}, False
    if isinstance(value, TokenizedCells | ShardedTokens) or (
        hasattr(value, "obs_names") and hasattr(value, "var_names") and hasattr(value, "obs")
    ):
        return {"type": type(value).__qualname__, "see": "data"}, False
    if isinstance(value, threading.Event):
        return {"type": "threading.Event"}, False
    if isinstance(value, Progress):
        return {"type": "cellkit.Progress"}, False
    if isinstance(value, list | tuple) and any(callable(v) for v in value):
        return [_describe(v)[0] for v in value], False
    if callable(value) and not isinstance(value, type):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        module = getattr(value, "__module__", None) or type(value).__module__
        return {"type": "callable", "name": f"{module}.{name}"}, False
    return to_json_value(value)


def describe_options(arguments: Mapping[str, Any], var_keyword: str | None = None) -> tuple[dict, list, dict]:
    """``(options, not_replayable, paths)`` of a call's bound arguments (``**kwargs`` flattened)."""
    flat = dict(arguments)
    if var_keyword and isinstance(flat.get(var_keyword), Mapping):
        flat.update(flat.pop(var_keyword))
    options: dict[str, Any] = {}
    not_replayable: list[str] = []
    paths: dict[str, str] = {}
    for name, value in flat.items():
        options[name], ok = _describe(value)
        if not ok:
            not_replayable.append(name)
        if isinstance(value, str | os.PathLike) and (name in PATH_OPTIONS or name in ("adata", "data")):
            paths[name] = str(Path(value).expanduser().resolve())
    return options, not_replayable, paths


class RunRecorder:
    """Collects a run's record: the call (at construction), then its results (:meth:`finish`).

    Parameters
    ----------
    function
        The public name of the function run (``"cellkit.finetune"``).
    arguments
        The call's bound arguments, defaults applied (``inspect.signature(fn).bind(...)``).
    data_arg, model_arg
        Which arguments are the data and the model.
    var_keyword
        The name of the ``**kwargs`` argument, flattened into the options.
    model_fp
        The input model's fingerprint, when already computed.
    """

    def __init__(
        self,
        function: str,
        arguments: Mapping[str, Any],
        *,
        data_arg: str = "adata",
        model_arg: str = "model",
        var_keyword: str | None = None,
        model_fp: str | None = None,
    ) -> None:
        self.t0 = time.perf_counter()
        self.started_at = utc_now()
        self.function = function
        self.options, self.not_replayable, self.paths = describe_options(arguments, var_keyword)
        model = arguments.get(model_arg)
        self.model = model_identity(model, fingerprint=model_fp)
        if self.model is not None and model_arg in self.options:
            self.options[model_arg] = {"type": "cellkit.CellModel", "fingerprint": self.model["fingerprint"]}
        self.data = data_fingerprint(arguments.get(data_arg), cells=arguments.get("cells"))
        self.command = CLI_COMMAND.get()

    def finish(
        self,
        *,
        status: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        outputs: Mapping[str, Any] | None = None,
        device: Any = None,
    ) -> RunRecord:
        """The record, with the run's status, metrics, outputs and the device it ran on."""
        seed = self.options.get("seed")
        return RunRecord(
            function=self.function,
            options=self.options,
            not_replayable=self.not_replayable,
            paths=self.paths,
            model=self.model,
            data=self.data,
            seeds={"seed": seed, "torch_initial_seed": int(torch.initial_seed())},
            environment=environment(device),
            metrics=to_json_value(dict(metrics or {}))[0],
            outputs=to_json_value(dict(outputs or {}))[0],
            status=status,
            started_at=self.started_at,
            finished_at=utc_now(),
            wall_time_s=round(time.perf_counter() - self.t0, 3),
            command=list(self.command) if self.command is not None else None,
        )


def write_beside(record: RunRecord, path: str | os.PathLike[str]) -> Path | None:
    """Write ``record`` for ``path`` (a directory: ``run.json`` in it; a file: ``NAME.run.json``) on rank 0."""
    if not is_main_process():
        return None
    return write_run(record, path)


# ============================================================================== training hook
def recorded(function: str) -> Callable[[_F], _F]:
    """Decorate a training task (``finetune`` / ``pretrain``) so that it records its run.

    The wrapped function's result gets ``result.run`` and ``result.model.run`` (a
    :class:`~cellkit._utils._run.RunRecord`); with a ``checkpoint_dir`` the record is also written
    there as ``run.json`` (rank 0). The input model's identity is taken before the call (training
    changes the weights in place); the trained model's identity is in ``record.outputs["model"]``.
    """

    def decorate(fn: _F) -> _F:
        sig = inspect.signature(fn)
        var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # let the function report the bad call
            bound.apply_defaults()
            recorder = RunRecorder(function, bound.arguments, var_keyword=var_kw)
            result = fn(*args, **kwargs)
            outputs: dict[str, Any] = {
                "model": model_identity(result.model),
                "epochs": len(result.history.epoch_records),
            }
            if getattr(result, "classes", None) is not None:
                outputs["classes"] = list(result.classes)
            if getattr(result, "baseline_metrics", None):
                outputs["baseline_metrics"] = dict(result.baseline_metrics)
            ckpt = bound.arguments.get("checkpoint_dir")
            if ckpt:
                outputs["checkpoint_dir"] = str(ckpt)
            record = recorder.finish(
                status=result.status,
                metrics=result.metrics,
                outputs=outputs,
                device=getattr(result.trainer, "device", None),
            )
            result.run = record
            result.model.run = record
            if ckpt:
                write_beside(record, ckpt)
            return result

        return cast(_F, wrapper)

    return decorate


# ============================================================================== rerun
def rerun(
    record: RunRecord | str | os.PathLike[str],
    *,
    adata: Any = None,
    model: CellModel | None = None,
    check: str = "error",
    **overrides: Any,
) -> Any:
    """Run a recorded run again: the same function with the recorded options.

    Parameters
    ----------
    record
        A :class:`~cellkit._utils._run.RunRecord` or where one is (see :func:`cellkit.load_run`).
    adata
        The input cells; default: read again from the recorded path when the run was given a path
        (an ``.h5ad`` or a token shard directory), a shard directory's cells or a backed AnnData
        (opened backed again). An in-memory AnnData must be passed.
    model
        The input model, as it was before the run (training changes a model in place: load it
        again). Default: loaded from the directory the recorded model came from.
    check
        ``"error"`` (default): refuse data or a model whose fingerprint differs from the record;
        ``"warn"``: warn and run anyway; ``"off"``: do not compare.
    **overrides
        Options to change or to give again (those the record could only describe, e.g.
        ``callbacks`` or a long ``cells`` selection). ``checkpoint_dir`` is ``None`` unless given
        (the rerun does not write into the recorded run's checkpoints); a recorded ``output`` must
        be given anew (``output=...``).

    Returns
    -------
    What the function returns (a :class:`cellkit.FinetuneResult` for a fine-tuning run …). On the
    same CPU, software versions and thread count, a fine-tuning run gives the same weights and
    metrics, bit for bit.

    Raises
    ------
    ConfigError
        The record's function cannot be rerun, or options it could only describe are not given.
    DataError
        ``check="error"`` and the data or model differ from the recorded ones (naming the fields).

    Examples
    --------
    >>> result = cellkit.finetune(adata, model, label_key="cell_type", checkpoint_dir="ckpt")  # doctest: +SKIP
    >>> again = cellkit.rerun("ckpt", adata=adata, model=cellkit.load_model("base_model"))  # doctest: +SKIP
    """
    if check not in ("error", "warn", "off"):
        raise ConfigError(f"check must be 'error', 'warn' or 'off', got {check!r}.")
    rec = record if isinstance(record, RunRecord) else load_run(record)
    if rec.function not in RERUNNABLE:
        raise ConfigError(
            f"A {rec.function} run cannot be rerun by cellkit.rerun; call it with record.call_options "
            f"({', '.join(sorted(RERUNNABLE))} can)."
        )
    module, attr = RERUNNABLE[rec.function]
    fn = getattr(importlib.import_module(module), attr)
    data_arg = next(iter(inspect.signature(fn).parameters))
    options = {**rec.call_options, **_rerun_defaults(rec, overrides)}
    options.update(overrides)
    missing = [n for n in rec.not_replayable if n not in options and n not in (data_arg, "model")]
    if missing:
        raise ConfigError(
            f"The record could only describe the option(s) {missing} ({', '.join(_short_desc(rec.options[m]) for m in missing)}); "
            "give them again: cellkit.rerun(record, ..., " + ", ".join(f"{m}=..." for m in missing) + ")."
        )
    data = adata if adata is not None else _recorded_data(rec, data_arg)
    mdl = model if model is not None else _recorded_model(rec)
    if check != "off":
        _compare(rec, data, mdl, cells=options.get("cells"), check=check)
        _compare_software(rec)
    return fn(data, mdl, **options)


#: environment entries that change results in the last bits when they differ
_SOFTWARE = ("cellkit", "torch", "numpy", "cuda", "torch_threads")


def _compare_software(rec: RunRecord) -> None:
    now = environment()
    diff = [
        f"{k} {rec.environment.get(k)} → {now.get(k)}"
        for k in _SOFTWARE
        if k in rec.environment and rec.environment.get(k) != now.get(k)
    ]
    if diff:
        warnings.warn(
            f"cellkit.rerun: the software differs from the recorded run ({'; '.join(diff)}); results may differ "
            "in their last bits.",
            UserWarning,
            stacklevel=3,
        )


#: options whose recorded value describes the caller's side (not the result): reset for a rerun
_SIDE_OPTIONS = {"callbacks": (), "stop_event": None, "progress": False}


def _rerun_defaults(rec: RunRecord, overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in _SIDE_OPTIONS.items() if k in rec.options and k in rec.not_replayable}
    if "checkpoint_dir" in rec.options and "checkpoint_dir" not in overrides:
        out["checkpoint_dir"] = None
        if rec.options.get("resume"):
            warnings.warn(
                "The recorded run resumed from a checkpoint; the rerun trains from the start (resume=False).",
                UserWarning,
                stacklevel=3,
            )
            out["resume"] = False
    if rec.options.get("output") is not None and "output" not in overrides:
        raise ConfigError(
            f"The recorded run wrote to {rec.options['output']!r}; give the rerun its own output=... "
            "(the recorded output would be found complete and not computed again)."
        )
    return out


def _short_desc(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name") or value.get("type") or "a value")
    if isinstance(value, list):
        return "[" + ", ".join(_short_desc(v) for v in value) + "]"
    return type(value).__name__


def _recorded_data(rec: RunRecord, data_arg: str) -> Any:
    from ..data.tokenized import open_shards

    given = rec.options.get(data_arg)
    if isinstance(given, str):
        path = Path(rec.paths.get(data_arg, given))
        return open_shards(path) if path.is_dir() else str(path)
    d = rec.data or {}
    if d.get("kind") == "shards" and d.get("path_resolved") and Path(d["path_resolved"]).is_dir():
        return open_shards(d["path_resolved"])  # a ShardedTokens object: its directory
    if d.get("kind") == "anndata" and d.get("file") and Path(d["file"]).is_file():
        import anndata as ad

        return ad.read_h5ad(d["file"], backed="r")  # a backed AnnData: its file, backed again
    raise ConfigError(
        f"The recorded run was given {(rec.data or {}).get('kind', 'data')} in memory; pass it again: "
        "cellkit.rerun(record, adata=..., model=...)."
    )


def _recorded_model(rec: RunRecord) -> CellModel:
    source = (rec.model or {}).get("source_resolved") or (rec.model or {}).get("source")
    if not source or not Path(source).is_dir():
        raise ConfigError(
            "The recorded model was not loaded from a directory (or it is gone); pass the model as it was "
            "before the run: cellkit.rerun(record, adata=..., model=...)."
        )
    from ..model import load_model

    fmt = (rec.model or {}).get("format") or "auto"
    return load_model(source, format=fmt)


def _compare(rec: RunRecord, data: Any, model: Any, *, cells: Any, check: str) -> None:
    problems = []
    if rec.data:
        now = data_fingerprint(data, cells=cells)
        old, new = _comparable(rec.data), _comparable(now)
        diff = [k for k in COMPARED if k in old and k in new and old[k] != new[k]]
        if old.get("kind") in ("anndata", "h5ad") and new.get("kind") in ("anndata", "h5ad"):
            diff = [k for k in diff if k != "kind"]
        if diff:
            problems.append(f"the data differ from the recorded data in {', '.join(diff)}")
    if rec.model and isinstance(model, CellModel):
        fp = model_fingerprint(model)
        if fp != rec.model.get("fingerprint"):
            same_arch = model_identity(model, fingerprint=fp)["config_sha256"] == rec.model.get("config_sha256")
            what = "weights" if same_arch else "architecture / heads"
            problems.append(
                f"the model differs from the recorded one ({what}; a model trained in place must be loaded again)"
            )
    if not problems:
        return
    text = "cellkit.rerun: " + "; ".join(problems) + "."
    if check == "error":
        raise DataError(text + " Pass the recorded inputs, or check='warn' to run anyway.")
    warnings.warn(text, UserWarning, stacklevel=3)


def _comparable(fp: Mapping[str, Any]) -> dict[str, Any]:
    """A fingerprint reduced to what identifies the cells (a path and a loaded AnnData compare)."""
    return {k: v for k, v in fp.items() if k in COMPARED}
