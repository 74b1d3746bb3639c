"""Training checkpoints: safetensors + JSON, written atomically, resumable.

A checkpoint directory ``<root>/step-00000120/`` holds

``weights.safetensors``
    the model's state (shared / tied tensors stored once);
``optimizer.safetensors``
    every tensor of the optimizer state, the RNG states (one per rank) and the grad scaler;
``state.json``
    the rest: counters, history, best metric, scheduler, optimizer hyper-parameters, config.

It is written into a hidden temporary directory and renamed into place, then ``<root>/latest``
(and ``<root>/best``) — small text files naming the directory — are replaced atomically. A crash
at any point leaves the previous checkpoint and pointers intact. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .._errors import CheckpointError
from .._utils import atomic_write_text, get_logger

__all__ = [
    "CheckpointManager",
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Write, prune and find checkpoints under ``root``.

    Parameters
    ----------
    root
        Directory holding the checkpoints (created on first save).
    keep
        How many of the most recent checkpoints to keep (the best one is always kept).
    """

    def __init__(self, root: str | os.PathLike[str], *, keep: int = 2) -> None:
        self.root = Path(root)
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1, got {keep}.")
        self.keep = keep

    # ------------------------------------------------------------------ pointers
    def _pointer(self, name: str) -> Path | None:
        p = self.root / name
        if not p.is_file():
            return None
        target = self.root / p.read_text(encoding="utf-8").strip()
        return target if (target / "state.json").is_file() else None

    @property
    def latest(self) -> Path | None:
        """The most recent complete checkpoint, or ``None``."""
        return self._pointer("latest")

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
        """Write checkpoint ``name`` atomically and point ``latest`` (and ``best``) at it."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_model(model, str(tmp / "weights.safetensors"))
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1, allow_nan=True), encoding="utf-8")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            final = self.root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / "latest", name + "\n")
        if best:
            atomic_write_text(self.root / "best", name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        keep = {p.name for p in (self.latest, self.best) if p is not None}
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for p in steps[: max(0, len(steps) - self.keep)]:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """Resolve ``path`` (a checkpoint, or a root with ``latest``) and read its tensors and state.

    Returns
    -------
    ``(directory, tensors, state)``; load the weights with :func:`load_weights`.
    """
    p = Path(path)
    if not (p / "state.json").is_file():
        latest = CheckpointManager(p).latest if p.is_dir() else None
        if latest is None:
            raise CheckpointError(
                f"No training checkpoint at {p}: expected a checkpoint directory (with state.json) or a "
                "checkpoint root holding a 'latest' pointer. Was the run started with checkpoint_dir=...?"
            )
        p = latest
    try:
        state = json.loads((p / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(p / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"The checkpoint {p} is unreadable ({type(e).__name__}: {e}).") from e
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
