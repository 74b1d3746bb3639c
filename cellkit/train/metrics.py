"""Classification metrics shared by the trainer (step, epoch and validation records) and the task
API (held-out test metrics): one macro-F1, computed by scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["macro_f1", "macro_f1_from_confusion"]


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
