"""Run records: what a cellkit run was given, on what, where, and what it gave (``run.json``).

Every :func:`cellkit.finetune`, :func:`cellkit.pretrain`, ``embed_cells(..., output=)`` /
``predict(..., output=)`` and ``cellkit`` command that writes outputs records a
:class:`RunRecord` and writes it as ``run.json`` beside its outputs (see
:mod:`cellkit.analysis._runs` for who writes where). This module holds the record itself: the
JSON schema, conversion of option values to JSON, fast fingerprints of long name lists, the
environment, and the bounded, atomic reading and writing. It imports nothing from the rest of
cellkit but the errors and the other helpers here (a model directory reads its ``run.json`` too).

The file is standard JSON (no NaN: non-finite numbers are written as ``null``), at most
:data:`MAX_RUN_BYTES`, with ``"schema": "cellkit-run"`` and an integer ``schema_version``; a file
written by a newer cellkit (a larger version) is refused with a message saying so.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DataError
from .._version import __version__
from ._io import atomic_write_text
from ._json import read_json

__all__ = [
    "CLI_COMMAND",
    "MAX_RUN_BYTES",
    "RUN_FILE",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "RunRecord",
    "environment",
    "hash_names",
    "hash_positions",
    "load_run",
    "run_file_for",
    "to_json_value",
    "utc_now",
    "write_run",
]

SCHEMA_NAME = "cellkit-run"
SCHEMA_VERSION = 1
#: the file name of a run record inside a directory (a model, a checkpoint root, a result store)
RUN_FILE = "run.json"
#: the suffix of the run record beside a single-file output (``OUT.h5ad`` -> ``OUT.h5ad.run.json``)
RUN_SUFFIX = ".run.json"
#: largest run record read (options are small; only descriptions of big values are stored)
MAX_RUN_BYTES = 16 * 1024 * 1024
#: the longest list / array stored as itself in ``options``; longer ones are described (hashed)
MAX_LIST_ITEMS = 1024
#: set by the command line (``cellkit.cli.main``) to its argument list while a command runs
CLI_COMMAND: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("cellkit_cli_command", default=None)
_BLOCK = 65_536


# ============================================================================== JSON values
def to_json_value(value: Any) -> tuple[Any, bool]:
    """``(JSON value, replayable)`` for an option value.

    Plain values (``None``, booleans, numbers, strings, paths, numpy scalars, lists / tuples / sets
    and mappings of them, arrays of at most :data:`MAX_LIST_ITEMS` items) come back as JSON and
    ``replayable=True``: passing the JSON value back as the option gives the same call (a tuple
    comes back as a list, a path as its string). Anything else (long arrays, data frames, objects)
    comes back as a description (``{"type": ..., ...}``) and ``replayable=False``. Non-finite
    floats become ``None``.
    """
    if value is None or isinstance(value, bool | str):
        return value, True
    if isinstance(value, int):
        return int(value), True
    if isinstance(value, float):
        return (value if math.isfinite(value) else None), True
    if isinstance(value, np.generic):
        return to_json_value(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value), True
    if isinstance(value, Mapping):
        out, ok = {}, True
        for k, v in value.items():
            out[str(k)], one = to_json_value(v)
            ok = ok and one and isinstance(k, str)
        return out, ok
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else list(value)
        if len(items) > MAX_LIST_ITEMS:
            return _describe_sequence(items), False
        pairs = [to_json_value(v) for v in items]
        return [p[0] for p in pairs], all(p[1] for p in pairs)
    arr = _as_array(value)
    if arr is not None:
        if arr.ndim == 1 and arr.size <= MAX_LIST_ITEMS and arr.dtype.kind in "biufUSO":
            return to_json_value(arr.tolist())
        return _describe_array(arr), False
    return {"type": _type_name(value), "repr": repr(value)[:200]}, False


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("pandas") and hasattr(value, "to_numpy") and getattr(value, "ndim", 2) == 1:
        return np.asarray(value.to_numpy())
    return None


def _describe_array(arr: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "numpy.ndarray", "dtype": str(arr.dtype), "shape": list(arr.shape)}
    if arr.dtype.kind in "biu" and arr.ndim == 1:
        out["sha256"] = hash_positions(arr)
    elif arr.dtype.kind in "USO" and arr.ndim == 1:
        out["sha256"] = hash_names(arr)
    elif arr.dtype.kind in "fc":
        out["sha256"] = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    return out


def _describe_sequence(items: list[Any]) -> dict[str, Any]:
    try:
        arr = np.asarray(items)
    except (ValueError, TypeError):  # pragma: no cover - ragged
        return {"type": "list", "length": len(items)}
    return {**_describe_array(arr), "type": "list"}


def _type_name(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"


def _clean(value: Any) -> Any:
    """A JSON value of anything (descriptions where needed): for metrics and free-form fields."""
    return to_json_value(value)[0]


# ============================================================================== fingerprints
def hash_names(names: Any) -> str:
    """SHA-256 of a list of names (each as UTF-8, terminated by NUL), read in blocks.

    The same names in the same order give the same digest whatever their container (a pandas
    Index, a numpy array, a list) and whatever the block size; one million names take about
    0.1 s (measured on a 2-core Xeon).
    """
    values = names.to_numpy() if hasattr(names, "to_numpy") else np.asarray(names)
    values = values.ravel()
    h = hashlib.sha256()
    for a in range(0, len(values), _BLOCK):
        block = values[a : a + _BLOCK].tolist()
        try:
            text = "\x00".join(block)
        except TypeError:  # not all str (numbers, bytes): their str()
            text = "\x00".join(map(str, block))
        h.update((text + "\x00").encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def hash_positions(positions: Any) -> str:
    """SHA-256 of integer positions as little-endian int64 (the selected cells of a run)."""
    arr = np.ascontiguousarray(np.asarray(positions, dtype=np.int64).ravel()).astype("<i8", copy=False)
    return hashlib.sha256(arr.tobytes()).hexdigest()


# ============================================================================== environment
def utc_now() -> str:
    """The current time, ISO 8601 in UTC with seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    """The commit of the cellkit checkout this package is imported from, if it is one (read from
    ``.git`` files, no subprocess); ``None`` for an installed package."""
    root = Path(__file__).resolve().parents[2]
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            text = git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            git = (root / text.removeprefix("gitdir:").strip()).resolve()
        if not git.is_dir():
            return None
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.removeprefix("ref:").strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text(encoding="utf-8").strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text(encoding="utf-8").strip() or None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8").splitlines():
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _version_of(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    """The CPU model (Linux: ``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = None) -> dict[str, Any]:
    """Versions and hardware a run used.

    No host name, user name or environment variables are recorded (a run record is meant to be
    shared); paths given as options are recorded as given and resolved.

    Parameters
    ----------
    device
        The torch device the run computed on (``None``: not known).
    """
    import torch

    dev = torch.device(device) if device is not None else None
    name = None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    elif dev is not None and dev.type == "cpu":
        name = _cpu_name()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cellkit": __version__,
        "cellkit_git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "anndata": _version_of("anndata"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "device": None if dev is None else str(dev),
        "device_name": name,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


# ============================================================================== the record
@dataclass
class RunRecord:
    """One run of a cellkit function: options, model, data, seeds, environment, metrics, timing.

    Attributes
    ----------
    function
        The function run, e.g. ``"cellkit.finetune"``.
    options
        Every argument of the call (defaults included) as JSON; values that are not plain data are
        described (the AnnData by its fingerprint, the model by its identity, callbacks by their
        qualified names) and listed in ``not_replayable``.
    not_replayable
        Names of ``options`` whose stored value is a description, not the value itself.
    paths
        ``{option: resolved absolute path}`` for options that name files or directories (the
        options keep the paths as given).
    model
        Identity of the input model: ``config_sha256``, ``vocab_sha256``, ``fingerprint`` (SHA-256
        of config, vocabulary and every weight), ``family``, ``n_parameters``, ``source`` (the
        directory it was loaded from, if any).
    data
        Fingerprint of the input cells: ``kind`` (``"anndata"``, ``"h5ad"``, ``"shards"``,
        ``"tokens"``), ``shape``, ``obs_names_sha256``, ``var_names_sha256``, ``n_selected`` and
        ``selected_sha256`` (the selected cell positions), or the shard manifest's digest.
    seeds
        ``seed`` (the option) and ``torch_initial_seed`` (torch's seed when the run ended).
    environment
        Versions (cellkit and its git commit, Python, torch, numpy, anndata, CUDA, cuDNN), the
        device and its name, torch threads (see :func:`environment`).
    metrics
        What the run measured (held-out metrics, status, chunk counts …).
    outputs
        What the run wrote or returned (output paths; the trained model's identity).
    status
        ``"completed"``, ``"early_stopped"``, ``"stopped"``, ``"interrupted"`` or ``None``.
    started_at, finished_at, wall_time_s
        UTC times (ISO 8601) and the wall time in seconds.
    command
        The ``cellkit`` command line, when the run came from it.
    schema_version
        Version of the ``run.json`` layout (:data:`SCHEMA_VERSION`).
    """

    function: str
    options: dict[str, Any] = field(default_factory=dict)
    not_replayable: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    seeds: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    wall_time_s: float | None = None
    command: list[str] | None = None
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ options
    @property
    def call_options(self) -> dict[str, Any]:
        """The keyword options to pass back to :attr:`function` to run it again.

        The data and the model (the first two arguments) and options that were not plain data
        (``not_replayable``: callbacks, a stop event, a progress object, long cell selections …)
        are left out; pass those yourself (or use :func:`cellkit.rerun`).

        Examples
        --------
        >>> record = cellkit.load_run("run_dir")  # doctest: +SKIP
        >>> cellkit.finetune(adata, model, **record.call_options)  # doctest: +SKIP
        """
        skip = set(self.not_replayable) | {"adata", "data", "model"}
        return {k: v for k, v in self.options.items() if k not in skip}

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-able ``dict`` (what ``run.json`` holds)."""
        doc = {"schema": SCHEMA_NAME, **dataclasses.asdict(self)}
        return _clean(doc)

    def to_json(self) -> str:
        """The record as standard JSON text (indented, keys in a fixed order)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = "run record") -> RunRecord:
        """Build a record from :meth:`to_dict` output (checked: schema, version, field types).

        Raises
        ------
        DataError
            Not a cellkit run record, written by a newer cellkit, or a field of the wrong type.
        """
        if not isinstance(doc, Mapping) or doc.get("schema") != SCHEMA_NAME:
            got = doc.get("schema") if isinstance(doc, Mapping) else type(doc).__name__
            raise DataError(f"The {source} is not a cellkit run record (field 'schema' is {got!r:.80}).")
        version = doc.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DataError(f"The {source}: field 'schema_version' must be an integer >= 1, got {version!r:.80}.")
        if version > SCHEMA_VERSION:
            raise DataError(
                f"The {source} was written with run-record schema version {version}, newer than this cellkit "
                f"({__version__}) reads ({SCHEMA_VERSION}); upgrade cellkit to read it."
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in doc.items() if k in known}
        if not isinstance(kwargs.get("function"), str):
            raise DataError(f"The {source}: field 'function' must be a string.")
        for name, kind in _FIELD_TYPES.items():
            value = kwargs.get(name)
            if value is not None and not isinstance(value, kind):
                raise DataError(
                    f"The {source}: field {name!r} must be {_KIND_TEXT[kind]}, got {type(value).__name__}."
                )
        return cls(**kwargs)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the record (see :func:`write_run`); returns the file written."""
        return write_run(self, path)

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        """A few readable lines: what ran, on what, with which options, and what it gave."""
        lines = [f"run       {self.function} ({self.status or 'no status'})"]
        if self.started_at:
            took = f", {self.wall_time_s:.1f} s" if self.wall_time_s is not None else ""
            lines.append(f"when      {self.started_at} → {self.finished_at or '?'}{took}")
        if self.command:
            lines.append("command   cellkit " + " ".join(self.command))
        env = self.environment
        if env:
            commit = f" (git {str(env['cellkit_git_commit'])[:12]})" if env.get("cellkit_git_commit") else ""
            lines.append(
                f"software  cellkit {env.get('cellkit')}{commit}, torch {env.get('torch')}, numpy {env.get('numpy')}, "
                f"anndata {env.get('anndata')}, python {env.get('python')}, CUDA {env.get('cuda')}"
            )
            lines.append(f"device    {env.get('device')} ({env.get('device_name')}), {env.get('torch_threads')} threads")
        if self.model:
            m = self.model
            src = f", from {m['source']}" if m.get("source") else ""
            lines.append(
                f"model     {m.get('family')} · {m.get('n_parameters', 0):,} parameters · config {str(m.get('config_sha256'))[:12]} · "
                f"vocab {str(m.get('vocab_sha256'))[:12]} ({m.get('vocab_size')}) · weights {str(m.get('fingerprint'))[:12]}{src}"
            )
        if self.data:
            lines.append(f"data      {_data_text(self.data)}")
        if self.seeds:
            lines.append("seeds     " + ", ".join(f"{k} {v}" for k, v in self.seeds.items()))
        shown = {k: v for k, v in self.options.items() if k not in ("adata", "data", "model")}
        if shown:
            lines.append("options   " + ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
        if self.metrics:
            lines.append("metrics   " + ", ".join(f"{k} {_short(v)}" for k, v in self.metrics.items()))
        if self.outputs:
            lines.append("outputs   " + ", ".join(f"{k}: {_short(v)}" for k, v in self.outputs.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"RunRecord({self.function}, status={self.status!r}, started {self.started_at}, "
            f"{len(self.options)} options, {len(self.metrics)} metrics)"
        )


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "options": dict,
    "not_replayable": list,
    "paths": dict,
    "model": dict,
    "data": dict,
    "seeds": dict,
    "environment": dict,
    "metrics": dict,
    "outputs": dict,
    "status": str,
    "started_at": str,
    "finished_at": str,
    "wall_time_s": (int, float),
    "command": list,
}
_KIND_TEXT = {dict: "an object", list: "an array", str: "a string", (int, float): "a number"}


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict) and "fingerprint" in value:
        text = f"<{value.get('family', 'model')}, weights {str(value['fingerprint'])[:12]}>"
    elif isinstance(value, dict) and "type" in value and len(value) <= 6:
        text = f"<{value['type']}>"
    else:
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _data_text(d: Mapping[str, Any]) -> str:
    if isinstance(d.get("inputs"), list):
        return "; ".join(_data_text(x) for x in d["inputs"] if isinstance(x, Mapping))
    kind = d.get("kind")
    parts = [str(kind)]
    if d.get("shape"):
        parts.append("×".join(f"{int(x):,}" for x in d["shape"]))
    if d.get("n_cells") is not None:
        parts.append(f"{int(d['n_cells']):,} cells")
    if d.get("n_selected") is not None:
        parts.append(f"{int(d['n_selected']):,} selected ({str(d.get('selected_sha256'))[:12]})")
    if d.get("obs_names_sha256"):
        parts.append(f"obs_names {str(d['obs_names_sha256'])[:12]}")
    if d.get("var_names_sha256"):
        parts.append(f"var_names {str(d['var_names_sha256'])[:12]}")
    if d.get("manifest_sha256"):
        parts.append(f"manifest {str(d['manifest_sha256'])[:12]}")
    if d.get("path"):
        parts.append(f"from {d['path']}")
    return " · ".join(parts)


# ============================================================================== files
def run_file_for(path: str | os.PathLike[str]) -> Path:
    """Where the run record of ``path`` lives.

    A directory (a model, a checkpoint root, a ``--out`` run directory, an array store) holds
    ``run.json``; a file output (``OUT.h5ad``) has ``OUT.h5ad.run.json`` beside it; a path ending
    in ``.json`` is the record itself.
    """
    p = Path(path)
    if p.suffix == ".json" and not p.is_dir():
        return p
    if p.is_dir() or not p.suffix:
        return p / RUN_FILE
    return p.with_name(p.name + RUN_SUFFIX)


def write_run(record: RunRecord, path: str | os.PathLike[str]) -> Path:
    """Write ``record`` as JSON, atomically (a temporary sibling, fsync, rename).

    Parameters
    ----------
    record
        The run record.
    path
        A directory (``DIR/run.json`` is written; the directory is created if missing), a file
        ending in ``.json``, or a file output (its record goes beside it, ``OUT.h5ad.run.json``).

    Returns
    -------
    The file written.
    """
    p = Path(path)
    if not p.exists() and not p.suffix:
        p.mkdir(parents=True, exist_ok=True)
    dest = run_file_for(p)
    atomic_write_text(dest, record.to_json() + "\n")
    return dest


def load_run(path: str | os.PathLike[str]) -> RunRecord:
    """Read a run record: a ``run.json``, a directory holding one, or an output with one beside it.

    Parameters
    ----------
    path
        ``run.json`` (or any ``.json`` record), a directory with ``run.json`` (a ``cellkit finetune
        --out`` directory, a checkpoint directory, a saved model, an embedding store), or an
        ``OUT.h5ad`` written by ``embed_cells`` / ``predict`` (its ``OUT.h5ad.run.json``).

    Returns
    -------
    :class:`RunRecord`

    Raises
    ------
    DataError
        No record there, a file that is not valid JSON, larger than :data:`MAX_RUN_BYTES`, not a
        cellkit run record, or written by a newer cellkit (schema version); the message names the
        file.

    Examples
    --------
    >>> record = cellkit.load_run("tuned/")  # doctest: +SKIP
    >>> print(record)  # doctest: +SKIP
    """
    file = run_file_for(path)
    if not file.exists():
        where = f"{path} holds no {RUN_FILE}" if Path(path).is_dir() else f"There is no run record at {file}"
        raise DataError(
            f"{where}; cellkit writes one beside the outputs of finetune / pretrain (checkpoint_dir), "
            "embed_cells / predict with output=, and every cellkit command."
        )
    doc = read_json(file, what="run record", max_bytes=MAX_RUN_BYTES, expect=dict, error=DataError)
    return RunRecord.from_dict(doc, source=f"run record {file}")
