"""Classification metrics: one macro-F1 (computed by scikit-learn) shared by the trainer and the
task API (held-out test metrics), and the metric objects the trainer's records come from.

The trainer computes no metric itself: each objective names its :class:`Metric` objects
(:meth:`cellkit.train.Objective.metrics`; :class:`~cellkit.train.Classification` gives
:class:`Accuracy` and :class:`MacroF1`), and the trainer feeds them every batch, sums them over
ranks and writes what they compute into the step (``accuracy``), epoch (``train/accuracy``) and
validation (``val/accuracy``) records.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .distributed import all_gather_objects, dist_info
from .objectives import IGNORE_INDEX

__all__ = ["Accuracy", "MacroF1", "Metric", "MetricSet", "macro_f1", "macro_f1_from_confusion"]


def macro_f1(
    y_true: Any,
    y_pred: Any,
    *,
    labels: Any = None,
    sample_weight: Any = None,
) -> float:
    """Macro-averaged F1 (``sklearn.metrics.f1_score(average="macro", zero_division=0)``).

    Parameters
    ----------
    y_true, y_pred
        Class ids (or names) of the cells, true and predicted.
    labels
        Classes to average over. ``None`` (scikit-learn's default): every class that occurs as a
        label or a prediction; ``np.unique(y_true)``: the classes present in the truth only (a
        class that is only ever predicted, wrongly, then lowers the others' precision but adds no
        zero to the mean).
    sample_weight
        Weight of each cell (e.g. the counts of a confusion matrix).

    Returns
    -------
    float
        In ``[0, 1]``; ``0.0`` when there are no cells.
    """
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return 0.0
    return float(
        f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0, sample_weight=sample_weight)
    )


def macro_f1_from_confusion(cm: Any) -> float:
    """:func:`macro_f1` of the cells a confusion matrix counts (rows true, columns predicted).

    Averaged over the classes that occur as a label or a prediction, as :func:`macro_f1` with
    ``labels=None``; classes with an all-zero row and column do not count. ``0.0`` for an empty
    matrix.
    """
    cm = np.asarray(cm, dtype=np.float64)
    true, pred = np.nonzero(cm)
    return macro_f1(true, pred, sample_weight=cm[true, pred])


# ---------------------------------------------------------------------------------- metric objects
def _labelled_predictions(out: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
    """Predicted and true class ids of the batch's labelled cells (``None``: no classifier output)."""
    logits = getattr(out, "class_logits", None)
    if "labels" not in batch or logits is None:
        return None
    labels = batch["labels"]
    ok = labels != IGNORE_INDEX
    pred = logits.detach().argmax(-1)
    return pred[ok], labels[ok]


class Metric(abc.ABC):
    """A number accumulated over batches: the trainer's metric hooks.

    The trainer calls :meth:`update` with each batch's model output, sums the counts of all ranks
    (:meth:`MetricSet.sync`) once all of a record's batches are in, then calls :meth:`compute`.
    The epoch's training metric takes each step's counts with :meth:`merge` and is saved in
    checkpoints as :meth:`state_dict` (JSON-able). Counts are exact (whole numbers in
    float64), so the values do not depend on how the cells are split into batches or ranks.

    Attributes
    ----------
    name
        The record key (``"accuracy"``; ``"val/accuracy"``, ``"train/accuracy"`` with a prefix).
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every count."""

    @abc.abstractmethod
    def update(self, out: Any, batch: Mapping[str, Any]) -> None:
        """Count one batch of this rank (``out``: the model output; no-op without the fields needed)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The counts, JSON-able."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Add the counts of ``state`` (a :meth:`state_dict`, possibly with other metrics' keys)."""

    @abc.abstractmethod
    def compute(self) -> float | None:
        """The value, or ``None`` when there is nothing to report."""

    @abc.abstractmethod
    def count(self) -> float:
        """How many cells were counted."""

    def merge(self, other: Metric) -> None:
        """Add the counts of ``other`` (a metric of the same kind)."""
        self.load_state_dict(other.state_dict())


class Accuracy(Metric):
    """Share of labelled cells whose most likely class (``out.class_logits``) is their label
    (``batch["labels"]``; cells labelled ``-100`` do not count). Left out when no cell was labelled."""

    name = "accuracy"

    def reset(self) -> None:
        self.correct, self.labelled = 0.0, 0.0
        self._pending: Tensor | None = None  # on the device until read: no sync per batch

    def update(self, out: Any, batch: Mapping[str, Any]) -> None:
        pair = _labelled_predictions(out, batch)
        if pair is None:
            return
        pred, lab = pair
        counts = torch.stack([(pred == lab).sum(), lab.new_tensor(lab.numel())]).double()
        self._pending = counts if self._pending is None else self._pending + counts

    def _flush(self) -> None:
        if self._pending is not None:
            correct, labelled = self._pending.cpu().tolist()
            self.correct += correct
            self.labelled += labelled
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"correct": self.correct, "labelled": self.labelled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._flush()
        self.correct += float(state.get("correct", 0.0))
        self.labelled += float(state.get("labelled", 0.0))

    def compute(self) -> float | None:
        self._flush()
        return self.correct / self.labelled if self.labelled else None

    def count(self) -> float:
        self._flush()
        return self.labelled


class MacroF1(Metric):
    """:func:`macro_f1` of the labelled cells, from a confusion matrix of class ids (``0.0`` when
    classifier outputs were seen but no cell was labelled)."""

    name = "macro_f1"

    def reset(self) -> None:
        self.confusion: np.ndarray | None = None
        self._pending: Tensor | None = None

    def update(self, out: Any, batch: Mapping[str, Any]) -> None:
        pair = _labelled_predictions(out, batch)
        if pair is None:
            return
        pred, lab = pair
        k = out.class_logits.shape[-1]
        cm = torch.bincount(lab * k + pred, minlength=k * k).reshape(k, k).double()
        self._pending = cm if self._pending is None else self._pending + cm

    def _add(self, cm: np.ndarray) -> None:
        self.confusion = cm if self.confusion is None else self.confusion + cm

    def _flush(self) -> None:
        if self._pending is not None:
            self._add(self._pending.cpu().numpy())
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {} if self.confusion is None else {"confusion": self.confusion.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._flush()
        if state.get("confusion") is not None:
            self._add(np.asarray(state["confusion"], dtype=np.float64))

    def compute(self) -> float | None:
        self._flush()
        return None if self.confusion is None else macro_f1_from_confusion(self.confusion)

    def count(self) -> float:
        self._flush()
        return 0.0 if self.confusion is None else float(self.confusion.sum())


class MetricSet:
    """The metrics of one record (a step, an epoch, a validation): hooks called together.

    Parameters
    ----------
    metrics
        The :class:`Metric` objects (distinct names).
    prefix
        Prepended to each name in :meth:`compute` (``"train/"``, ``"val/"``).
    skip_empty
        Leave out the metrics that counted no cell (validation). Without it a metric that saw
        classifier outputs but no labelled cell still reports (a step's ``macro_f1`` is then 0).
    """

    def __init__(self, metrics: Sequence[Metric], *, prefix: str = "", skip_empty: bool = False) -> None:
        self.metrics, self.prefix, self.skip_empty = list(metrics), prefix, skip_empty

    def reset(self) -> None:
        for m in self.metrics:
            m.reset()

    def update(self, out: Any, batch: Mapping[str, Any]) -> None:
        for m in self.metrics:
            m.update(out, batch)

    def sync(self) -> None:
        """Sum every metric's counts over ranks in one collective (every rank calls it)."""
        if not self.metrics or not dist_info().enabled:
            return
        parts = all_gather_objects([m.state_dict() for m in self.metrics])
        for i, m in enumerate(self.metrics):
            m.reset()
            for part in parts:
                m.load_state_dict(part[i])

    def merge(self, other: MetricSet) -> None:
        for m, o in zip(self.metrics, other.metrics, strict=True):
            m.merge(o)

    def compute(self) -> dict[str, float]:
        """``{prefix + name: value}`` of the metrics that have one."""
        values = {
            f"{self.prefix}{m.name}": m.compute()
            for m in self.metrics
            if not (self.skip_empty and m.count() == 0)
        }
        return {k: v for k, v in values.items() if v is not None}

    def state_dict(self) -> dict[str, Any]:
        """Every metric's counts in one flat dict (the checkpoint's ``acc`` entries)."""
        return {k: v for m in self.metrics for k, v in m.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        for m in self.metrics:
            m.load_state_dict(state)
