"""Training checkpoints: safetensors + JSON, written atomically, resumable.

A checkpoint directory ``<root>/step-00000120/`` holds

``weights.safetensors``
    the model's state (shared / tied tensors stored once);
``optimizer.safetensors``
    every tensor of the optimizer state, the RNG states (one per rank) and the grad scaler;
``state.json``
    the rest: counters, history, best metric, scheduler, optimizer hyper-parameters, config.

It is written into a hidden temporary directory and renamed into place, then ``<root>/best`` (when
it is the best) and ``<root>/latest`` — small text files naming the directory — are replaced
atomically. A checkpoint of the same name is set aside, never deleted, until its successor is in
place. A crash at any point leaves an intact checkpoint that ``resume`` finds (the newest intact
one when ``latest`` is missing or broken). A live run locks its root (``<root>/.lock``). Nothing
is unpickled on load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .._errors import CheckpointError
from .._utils import atomic_write_text, fsync_dir, get_logger, read_json
from .._utils._io import fsync_tree

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CheckpointManager",
    "checkpoint_is_intact",
    "flatten_optimizer_state",
    "read_checkpoint",
    "unflatten_optimizer_state",
]

log = get_logger(__name__)
_SEP = "\x1f"  # unit separator: never in a state-dict key


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into a flat tensor dict and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state{_SEP}{pid}{_SEP}{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        parts = key.split(_SEP)
        if parts[0] != "state":
            continue
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


_POINTER_MAX_BYTES = 4096
_LOCK_FILE = ".lock"


def _valid_name(name: str) -> bool:
    """A checkpoint name is one path component inside the root: no separators, ``..``, NUL."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not os.path.isabs(name)
    )


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = read_json(path / "state.json", what="checkpoint state", error=CheckpointError)
    except CheckpointError:
        return None
    if not isinstance(state, dict) or not isinstance(state.get("trainer"), dict):
        return None
    step = state["trainer"].get("step")
    return state if isinstance(step, int) and not isinstance(step, bool) else None


def _safetensors_ok(path: Path) -> bool:
    """The file's header parses and its tensors lie within the file (no data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception:  # any failure means "not readable"
        return False
    return True


def checkpoint_is_intact(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a complete checkpoint: a readable ``state.json`` with the trainer's
    counters, and ``weights.safetensors`` and ``optimizer.safetensors`` whose headers read."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir() or _read_state(p) is None:
        return False
    return all(_safetensors_ok(p / f) for f in ("weights.safetensors", "optimizer.safetensors"))


class CheckpointManager:
    """Write, prune and find checkpoints under ``root``.

    Parameters
    ----------
    root
        Directory holding the checkpoints (created on first save).
    keep
        How many of the most recent checkpoints to keep (the best one is always kept).

    Notes
    -----
    :meth:`save` never removes what ``latest`` points to before its successor is in place: the new
    checkpoint is written into ``.tmp-<name>-<id>``; a checkpoint of the same name is first
    renamed aside to ``.old-<name>-<id>`` (complete, and found by :attr:`latest` if a crash
    follows), then the new one is renamed in, then ``best`` and ``latest`` are pointed at it, and
    only then are the set-aside copy and old checkpoints removed. ``latest`` and ``best`` hold a
    bare name inside ``root``; anything else (``..``, an absolute path, a symlink out) is
    ignored with a warning. When ``latest`` is missing or names a broken checkpoint, the newest
    intact checkpoint (by its step) is used instead.
    """

    def __init__(self, root: str | os.PathLike[str], *, keep: int = 2) -> None:
        self.root = Path(root)
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1, got {keep}.")
        self.keep = keep

    # ------------------------------------------------------------------ pointers
    def _pointer(self, name: str, *, warn: bool = False) -> Path | None:
        """The checkpoint pointer ``name`` names, if it is confined to the root and intact."""
        p = self.root / name
        if not p.is_file() or p.is_symlink():
            return None
        try:
            with open(p, "rb") as fh:
                raw = fh.read(_POINTER_MAX_BYTES + 1)
            target_name = raw.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            target_name = ""
            raw = b""
        target = self.root / target_name
        problem = None
        if len(raw) > _POINTER_MAX_BYTES or not _valid_name(target_name):
            problem = f"does not hold a checkpoint name inside {self.root}"
        elif target.is_symlink():
            problem = f"names {target_name!r}, a symlink (checkpoints are never symlinks)"
        elif not checkpoint_is_intact(target):
            problem = f"names {target_name!r}, which is missing or incomplete"
        if problem is not None:
            if warn:
                log.warning("The checkpoint pointer %s %s; ignoring it.", p, problem)
            return None
        return target

    def candidates(self) -> list[Path]:
        """Every intact checkpoint under the root (set-aside ``.old-*`` copies included), newest first."""
        if not self.root.is_dir():
            return []
        found: list[tuple[int, bool, str, Path]] = []
        for p in self.root.iterdir():
            if not (p.name.startswith("step-") or p.name.startswith(".old-")) or p.is_symlink():
                continue
            state = _read_state(p) if p.is_dir() else None
            if state is None or not checkpoint_is_intact(p):
                continue
            found.append((state["trainer"]["step"], not p.name.startswith("."), p.name, p))
        return [p for *_, p in sorted(found, reverse=True)]

    def find_latest(self, *, warn: bool = False) -> Path | None:
        """The checkpoint ``latest`` names or, when that is missing or broken, the newest intact one."""
        target = self._pointer("latest", warn=warn)
        if target is not None:
            return target
        found = self.candidates()
        if not found:
            return None
        if warn:
            log.warning(
                "No usable 'latest' pointer in %s (a run was interrupted while writing a checkpoint?); "
                "resuming from the newest intact checkpoint, %s.",
                self.root,
                found[0].name,
            )
        return found[0]

    @property
    def latest(self) -> Path | None:
        """The most recent complete checkpoint, or ``None``."""
        return self.find_latest()

    @property
    def best(self) -> Path | None:
        """The checkpoint with the best monitored metric, or ``None``."""
        return self._pointer("best")

    # ------------------------------------------------------------------ write
    def save(
        self,
        name: str,
        *,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
        best: bool = False,
    ) -> Path:
        """Write checkpoint ``name`` atomically and point ``best`` (if asked) and ``latest`` at it."""
        if not _valid_name(name) or name.startswith("."):
            raise CheckpointError(f"Invalid checkpoint name {name!r}: one plain name inside {self.root}.")
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        final = self.root / name
        try:
            save_model(model, str(tmp / "weights.safetensors"))
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1, allow_nan=True), encoding="utf-8")
            fsync_tree(tmp)
            if final.exists() or final.is_symlink():
                # set the complete old copy aside (never delete it before its successor is in place)
                os.rename(final, self.root / f".old-{name}-{uuid.uuid4().hex[:8]}")
            os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if best:  # before latest: whenever latest names this checkpoint, best is already right
            atomic_write_text(self.root / "best", name + "\n")
        atomic_write_text(self.root / "latest", name + "\n")
        fsync_dir(self.root)
        for old in self.root.glob(".old-*"):
            shutil.rmtree(old, ignore_errors=True)
        self._prune()
        return final

    def _prune(self) -> None:
        keep = {p.name for p in (self.latest, self.best) if p is not None}
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.is_symlink())
        for p in steps[: max(0, len(steps) - self.keep)]:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ lock
    def lock(self, *, what: str = "training run") -> _DirLock:
        """Lock the root for one live run (a context manager); see :class:`_DirLock`."""
        return _DirLock(self.root, what=what)


class _DirLock:
    """An exclusive lock on a checkpoint directory, held while a run writes there.

    ``<root>/.lock`` holds the holder's pid, host and start time. On POSIX it is locked with
    ``fcntl.flock``, which the kernel releases when the holder dies, so a lock left by a dead
    process is taken over (with a log line naming it); elsewhere the file is created with
    ``O_EXCL`` and a lock whose pid no longer runs is taken over.
    """

    def __init__(self, root: Path, *, what: str) -> None:
        self.root, self.what = root, what
        self.path = root / _LOCK_FILE
        self.fd: int | None = None

    def _refuse(self, holder: str) -> CheckpointError:
        return CheckpointError(
            f"The checkpoint directory {self.root} is in use by another live training run ({holder or 'unknown'}). "
            "Two runs writing the same checkpoint_dir would overwrite each other's checkpoints: wait for that run "
            "to finish or stop it, or choose another checkpoint_dir."
        )

    def __enter__(self) -> _DirLock:
        self.root.mkdir(parents=True, exist_ok=True)
        me = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_small(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            previous = _read_small(fd)
        else:  # pragma: no cover - no fcntl (Windows)
            previous = ""
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                previous = self.path.read_text(encoding="utf-8", errors="replace").strip()
                if _pid_alive(previous):
                    raise self._refuse(previous) from None
                fd = os.open(self.path, os.O_RDWR | os.O_TRUNC)
        if previous:
            log.warning(
                "Taking over the lock on %s left by a run that no longer runs (%s).", self.root, previous
            )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, me.encode("utf-8"))
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly (not a stale lock)
        if fcntl is None:  # pragma: no cover
            os.close(fd)
            with contextlib.suppress(OSError):
                self.path.unlink()
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_small(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 512).decode("utf-8", errors="replace").strip()
    except OSError:  # pragma: no cover
        return ""


def _pid_alive(holder: str) -> bool:  # pragma: no cover - the non-fcntl path
    parts = holder.split()
    try:
        pid = int(parts[1])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """Resolve ``path`` (a checkpoint, or a root with ``latest``) and read its tensors and state.

    A root whose ``latest`` pointer is missing or broken resolves to its newest intact checkpoint
    (with a warning saying so).

    Returns
    -------
    ``(directory, tensors, state)``; load the weights with :func:`load_weights`.
    """
    p = Path(path)
    if not (p / "state.json").is_file():
        latest = CheckpointManager(p).find_latest(warn=True) if p.is_dir() else None
        if latest is None:
            raise CheckpointError(
                f"No training checkpoint at {p}: expected a checkpoint directory (with state.json) or a "
                "checkpoint root holding a 'latest' pointer. Was the run started with checkpoint_dir=...?"
            )
        p = latest
    try:
        state = read_json(p / "state.json", what="checkpoint state", error=CheckpointError)
        tensors = load_file(str(p / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"The checkpoint {p} is unreadable ({type(e).__name__}: {e}).") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"The checkpoint {p}: state.json does not hold a JSON object.")
    return p, tensors, state


def load_weights(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load ``weights.safetensors`` from a checkpoint into ``model`` (strict: every key must match)."""
    path = Path(directory) / "weights.safetensors"
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"Cannot load {path} into this model: {e}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"The checkpoint {path} does not fit this model: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}. Resume with the same model (heads included)."
        )
