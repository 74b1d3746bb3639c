"""Where a run stands (:class:`TrainerState`) and what it recorded (:class:`History`, :class:`TrainResult`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from .._errors import CheckpointError
from .metrics import MetricSet

__all__ = ["History", "TrainResult", "TrainerState"]

#: the keys of ``TrainerState.train_losses`` (besides ``loss/<objective>``)
_LOSS_KEYS = ("cells", "loss")


def _is_loss_key(key: str) -> bool:
    return key in _LOSS_KEYS or key.startswith("loss/")


@dataclass
class TrainerState:
    """The counters of a run in progress: what a checkpoint saves and a resumed run starts from.

    :meth:`to_dict` is the ``trainer`` entry of a checkpoint's ``state.json`` (the same JSON
    object cellkit has always written: the epoch's running sums sit under ``acc``).

    Attributes
    ----------
    epoch
        The epoch in progress (0-based; the number of epochs finished).
    batch
        Batches of the epoch in progress already trained on (a resumed run skips them).
    step
        Optimizer steps done.
    best, best_step
        Best value of the monitored metric so far and the step it was reached at.
    bad_evals
        Validations since the last improvement (the early-stopping patience counter).
    train_losses
        Sums over the epoch so far, weighted by cells: ``cells``, ``loss`` and
        ``loss/<objective>`` (the epoch record's ``train/loss...`` divide them by ``cells``).
    train_metrics
        The epoch's training metrics (their counts so far), see :mod:`cellkit.train.metrics`.
    last_metrics
        The metrics of the latest validation or epoch record (:attr:`TrainResult.metrics`).
    done
        The run finished (completed or early-stopped): there is nothing left to resume.
    micro_batch
        ``micro_batch="auto"``: cells per forward pass that worked so far (``None``: whole
        batches); a resumed run goes on with it.
    rng_cpu, rng_cuda
        torch's random states at the last step boundary (an in-memory resume restores them; in a
        checkpoint they are tensors beside ``state.json``, not part of :meth:`to_dict`).
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    train_losses: dict[str, float] = field(default_factory=dict)
    train_metrics: MetricSet = field(default_factory=lambda: MetricSet([], prefix="train/"))
    last_metrics: dict[str, float] = field(default_factory=dict)
    done: bool = False
    micro_batch: int | None = None
    rng_cpu: Tensor | None = field(default=None, repr=False, compare=False)
    rng_cuda: Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def fresh(cls, objectives: Sequence[str], metrics: MetricSet) -> TrainerState:
        """The state before the first step of a run with these objective names."""
        state = cls(train_metrics=metrics)
        state.new_epoch(objectives)
        return state

    def new_epoch(self, objectives: Sequence[str]) -> None:
        """Zero the epoch's running sums (after the epoch record is written)."""
        self.train_losses = {"cells": 0.0, "loss": 0.0, **{f"loss/{name}": 0.0 for name in objectives}}
        self.train_metrics.reset()

    def add_step(self, losses: Mapping[str, float], metrics: MetricSet) -> None:
        """Add one optimizer step's sums (cell-weighted losses, ``cells``) and metric counts."""
        for key, value in losses.items():
            self.train_losses[key] = self.train_losses.get(key, 0.0) + value
        self.train_metrics.merge(metrics)

    def epoch_record(self, objectives: Sequence[str]) -> dict[str, float]:
        """The epoch's training metrics: ``train/loss``, ``train/loss/<objective>``, ``train/<metric>``."""
        sums, rec = self.train_losses, {}
        if sums.get("cells"):
            rec["train/loss"] = sums["loss"] / sums["cells"]
            for name in objectives:
                rec[f"train/loss/{name}"] = sums[f"loss/{name}"] / sums["cells"]
        rec.update(self.train_metrics.compute())
        return rec

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the ``trainer`` entry of a checkpoint's ``state.json``."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "acc": {**self.train_losses, **self.train_metrics.state_dict()},
            "last_metrics": dict(self.last_metrics),
            "done": self.done,
            **({} if self.micro_batch is None else {"micro_batch": self.micro_batch}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], metrics: MetricSet) -> TrainerState:
        """Read :meth:`to_dict`'s object (or one an earlier cellkit wrote) back.

        Parameters
        ----------
        data
            The ``trainer`` entry of ``state.json``.
        metrics
            Fresh training metrics of the run (:attr:`train_metrics`); they take the counts under
            ``acc``.

        Raises
        ------
        CheckpointError
            A counter is missing or not a whole number.
        """
        for key in ("epoch", "batch", "step"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(
                    f"The checkpoint's trainer state has {key}={value!r}, not a count; the checkpoint is "
                    "damaged: resume from another one (or start again with resume=False)."
                )
        acc = dict(data.get("acc") or {})
        metrics.load_state_dict({k: v for k, v in acc.items() if not _is_loss_key(k)})
        best_step = data.get("best_step")
        return cls(
            epoch=data["epoch"],
            batch=data["batch"],
            step=data["step"],
            best=None if data.get("best") is None else float(data["best"]),
            best_step=None if best_step is None else int(best_step),
            bad_evals=int(data.get("bad_evals", 0)),
            train_losses={k: float(v) for k, v in acc.items() if _is_loss_key(k)},
            train_metrics=metrics,
            last_metrics=dict(data.get("last_metrics") or {}),
            done=bool(data.get("done", False)),
            micro_batch=None if data.get("micro_batch") is None else int(data["micro_batch"]),
        )


class History:
    """Per-step and per-epoch records of a run.

    Attributes
    ----------
    steps
        ``DataFrame``: ``step``, ``epoch``, ``loss``, ``loss/<objective>``, ``lr``, ``cells``
        (and ``accuracy``, ``macro_f1`` of the step's batch with a classification objective).
    epochs
        ``DataFrame``: ``epoch``, ``step``, ``lr``, ``train/...`` and ``val/...`` metrics.
    """

    def __init__(self, steps: list[dict[str, Any]] | None = None, epochs: list[dict[str, Any]] | None = None):
        self.step_records: list[dict[str, Any]] = list(steps or [])
        self.epoch_records: list[dict[str, Any]] = list(epochs or [])

    @property
    def steps(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.step_records)

    @property
    def epochs(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.epoch_records)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {"steps": self.step_records, "epochs": self.epoch_records}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, History) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"History({len(self.step_records)} steps, {len(self.epoch_records)} epochs)"


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes
    ----------
    status
        ``"completed"``, ``"stopped"`` (stop flag), ``"interrupted"`` (Ctrl-C) or
        ``"early_stopped"``.
    history
        :class:`History`.
    metrics
        The last validation's metrics (``val/...``), or the last epoch's training metrics.
    best_metric, best_step
        Best value of ``monitor`` and the step it was reached at.
    checkpoint
        The last checkpoint written (resume from it), or ``None``.
    best_checkpoint
        The checkpoint of the best validation, or ``None``.
    """

    status: str
    history: History
    metrics: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    checkpoint: Path | None = None
    best_checkpoint: Path | None = None
