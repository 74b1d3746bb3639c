"""Loss and metric curves of a training run (``cellkit.train.History`` frames), static and live.

:func:`training_curves` draws a whole run. :func:`loss_figure` and :func:`epoch_figure` are the
compact figures a live view streams into: it keeps the records of the training events and calls
:func:`fill_training_figure`, which sets every trace from them (the studio's ``LiveTraining``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .._errors import DataError
from ._common import TEMPLATE

__all__ = [
    "EPOCH_METRICS",
    "LIVE_SOURCES",
    "epoch_figure",
    "fill_training_figure",
    "loss_figure",
    "training_curves",
]

_LR_COLOR = "#7f7f7f"
#: titles of the two panels: losses (and lr) per step, metrics per epoch
PANEL_TITLES = ("loss per step", "metrics per epoch")
_COLORS = ("#1f77b4", "#ff7f0e", "#279e68", "#d62728", "#aa40fc", "#8c564b", "#e377c2", "#17becf")


def training_curves(
    history_steps: pd.DataFrame | Any | None,
    history_epochs: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] | None = None,
    log_loss: bool = False,
    title: str | None = None,
) -> go.Figure:
    """Training curves: losses and learning rate per step (top), metrics per epoch (bottom).

    Column conventions are those of ``cellkit.train.History``: ``steps`` has ``step``, ``lr``,
    ``loss`` and ``loss/<objective>``; ``epochs`` has ``epoch``, ``step``, ``train/...`` and
    ``val/...`` (``val/loss``, ``val/accuracy``, ``val/macro_f1``, ...).

    Top panel: ``loss`` (and each ``loss/<objective>`` when there are several), ``val/loss`` at
    the step each epoch ended, ``lr`` on a secondary y axis. Bottom panel: ``train/<metric>`` and
    ``val/<metric>`` per epoch. Every trace's ``name`` is its column name (``"loss"``, ``"lr"``,
    ``"val/accuracy"``), so a live view can find a trace and extend its ``x``/``y``.

    Parameters
    ----------
    history_steps
        Per-step records (DataFrame), a ``History`` (anything with ``.steps`` and ``.epochs``
        frames), or ``None``. Empty frames give an empty but valid figure with titled axes and
        the traces ``loss`` and ``lr`` ready to be extended.
    history_epochs
        Per-epoch records; taken from ``history_steps.epochs`` when a ``History`` is passed.
    metrics
        Epoch metrics for the bottom panel, as bare names (``"accuracy"``: both ``train/`` and
        ``val/``) or full columns (``"val/macro_f1"``). Default: every non-loss ``train/``/``val/``
        column. With empty frames the named metrics get empty traces.
    log_loss
        Log-scale loss axis.
    title
        Figure title.

    Returns
    -------
    plotly.graph_objects.Figure
        Two rows of subplots: ``xaxis``/``yaxis`` (losses), ``yaxis2`` (lr), ``xaxis2``/``yaxis3``
        (metrics).
    """
    fig = make_subplots(
        rows=2,
        cols=1,
        specs=[[{"secondary_y": True}], [{}]],
        subplot_titles=PANEL_TITLES,
        vertical_spacing=0.14,
        row_heights=[0.6, 0.4],
    )
    for curve in training_curve_data(history_steps, history_epochs, metrics=metrics):
        row = 2 if curve.panel == "metrics" else 1
        secondary = {"secondary_y": curve.panel == "lr"} if row == 1 else {}
        fig.add_trace(_scatter(curve), row=row, col=1, **secondary)
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title or ""},
        hovermode="x unified",
        legend={"orientation": "h", "y": -0.12},
        margin={"t": 60},
    )
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(title_text="loss", type="log" if log_loss else "linear", row=1, col=1, secondary_y=False)
    fig.update_yaxes(
        title_text="learning rate", row=1, col=1, secondary_y=True, showgrid=False, exponentformat="e"
    )
    fig.update_xaxes(title_text="epoch", row=2, col=1)
    fig.update_yaxes(title_text="metric", row=2, col=1)
    return fig


def _frame(obj: Any, what: str) -> pd.DataFrame:
    if obj is None:
        return pd.DataFrame()
    if isinstance(obj, pd.DataFrame):
        return obj
    if isinstance(obj, list):
        return pd.DataFrame.from_records(obj)
    raise DataError(
        f"{what} must be a DataFrame (History.steps / History.epochs) or None; got {type(obj).__name__}."
    )


def _x(frame: pd.DataFrame, col: str) -> np.ndarray:
    if col in frame.columns:
        return frame[col].to_numpy()
    return np.arange(1, len(frame) + 1)


@dataclass(frozen=True)
class Curve:
    """One line of the training figure: ``panel`` is ``"loss"``, ``"lr"`` (secondary axis) or ``"metrics"``.

    ``dash`` is ``None`` (solid), ``"dot"`` or ``"dash"``; ``group`` ties train/val of one metric.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    panel: str
    color: str
    width: float = 1.6
    dash: str | None = None
    markers: bool = False
    group: str | None = None


def _curve(x: np.ndarray, frame: pd.DataFrame, col: str, **style: Any) -> Curve:
    """The finite values of ``frame[col]`` against ``x`` (no points when the column is missing)."""
    if col in frame.columns:
        y = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(y)
        xs, ys = x[ok], y[ok]
    else:
        xs, ys = np.array([], dtype=np.float64), np.array([], dtype=np.float64)
    return Curve(name=col, x=xs, y=ys, **style)


def training_curve_data(
    history_steps: Any, history_epochs: Any, *, metrics: Sequence[str] | None
) -> list[Curve]:
    """Every line :func:`training_curves` draws, in drawing order: losses, val losses, lr, metrics."""
    if history_epochs is None and hasattr(history_steps, "steps") and hasattr(history_steps, "epochs"):
        history_steps, history_epochs = history_steps.steps, history_steps.epochs
    steps = _frame(history_steps, "history_steps")
    epochs = _frame(history_epochs, "history_epochs")

    x_step = _x(steps, "step")
    loss_cols = ["loss"]
    terms = [c for c in steps.columns if str(c).startswith("loss/")]
    if len(terms) > 1:
        loss_cols += terms
    curves = [
        _curve(x_step, steps, col, panel="loss", color=_color(k), width=2 if col == "loss" else 1.2)
        for k, col in enumerate(loss_cols)
    ]
    val_loss = [
        c for c in epochs.columns if c == "val/loss" or (len(terms) > 1 and str(c).startswith("val/loss/"))
    ]
    if val_loss and "step" in epochs.columns:
        x_val = _x(epochs, "step")
        curves += [
            _curve(x_val, epochs, col, panel="loss", color=_color(k), dash="dot", markers=True)
            for k, col in enumerate(val_loss)
        ]
    curves.append(_curve(x_step, steps, "lr", panel="lr", color=_LR_COLOR, width=1, dash="dash"))

    x_epoch = _x(epochs, "epoch")
    for k, (base, cols) in enumerate(_metric_columns(epochs, metrics).items()):
        curves += [
            _curve(
                x_epoch,
                epochs,
                col,
                panel="metrics",
                color=_color(k),
                dash="dot" if col.startswith("val/") else None,
                markers=True,
                group=base,
            )
            for col in cols
        ]
    return curves


def _color(k: int) -> str:
    return _COLORS[k % len(_COLORS)]


def _scatter(curve: Curve) -> go.Scatter:
    return go.Scatter(
        x=curve.x,
        y=curve.y,
        name=curve.name,
        mode="lines+markers" if curve.markers else "lines",
        line={"color": curve.color, "width": curve.width, "dash": curve.dash},
        marker={"size": 6},
        legendgroup=curve.group or curve.name,
        hovertemplate=f"{curve.name}: %{{y:.4g}}<extra></extra>",
    )


def _metric_columns(epochs: pd.DataFrame, metrics: Sequence[str] | None) -> dict[str, list[str]]:
    """``{metric: [train/metric, val/metric]}`` (columns that exist, or all when the frame is empty)."""
    cols = [str(c) for c in epochs.columns]
    if metrics is None:
        names = []
        for c in cols:
            split, _, base = c.partition("/")
            if split in ("train", "val") and base and not base.startswith("loss") and base not in names:
                names.append(base)
        metrics = names
    elif isinstance(metrics, str):
        metrics = [metrics]
    out: dict[str, list[str]] = {}
    missing = []
    for m in metrics:
        if m.startswith(("train/", "val/")):
            wanted = [m]
            base = m.partition("/")[2]
        else:
            wanted = [f"train/{m}", f"val/{m}"]
            base = m
        have = [w for w in wanted if w in cols]
        if not have:
            if not epochs.empty:
                missing.append(m)
                continue
            have = wanted  # nothing recorded yet: empty traces to extend later
        bucket = out.setdefault(base, [])
        bucket.extend(h for h in have if h not in bucket)
    if missing:
        raise DataError(f"metrics {missing} are not in the epoch history; available columns: {cols}.")
    return out


# ============================================================================ live figures
#: where a trace of :func:`loss_figure` / :func:`epoch_figure` takes its points (``trace.meta["source"]``):
#: ``"steps"`` (x: the step), ``"validations"`` (x: the step the validation ran at; from the epoch
#: records when no validation records are given) and ``"epochs"`` (x: the epoch, counted from 1)
LIVE_SOURCES = ("steps", "validations", "epochs")
#: validation metrics :func:`epoch_figure` draws by default
EPOCH_METRICS = ("val/loss", "val/accuracy", "val/macro_f1")


def loss_figure(
    history_steps: pd.DataFrame | Any | None = None,
    history_epochs: pd.DataFrame | Sequence[Any] | None = None,
    *,
    losses: Sequence[str] = ("loss",),
    val_losses: Sequence[str] = ("val/loss",),
    title: str = "Training loss",
    y_title: str = "loss",
    log_loss: bool = False,
    width: int = 470,
    height: int = 320,
) -> go.Figure:
    """Losses against the optimizer step: one line per training loss, validation losses dotted.

    The figure a live training view streams into (``go.FigureWidget(loss_figure(...))`` then
    :func:`fill_training_figure` as records arrive), and a compact static plot of a finished run.
    Every trace's ``name`` is its column (``"loss"``, ``"loss/gep"``, ``"val/loss"``) and its
    ``meta["source"]`` says where its points come from (see :data:`LIVE_SOURCES`).

    Parameters
    ----------
    history_steps
        Per-step records (a ``History.steps`` frame or a list of dicts with ``step`` and the loss
        columns), a ``History``, or ``None`` for an empty figure.
    history_epochs
        Per-epoch records (``History.epochs``); validation losses are drawn at their ``step``.
    losses
        Per-step loss columns, one line each.
    val_losses
        Validation loss columns, one dotted line each (at the step each validation ran).
    title, y_title
        Figure and y-axis titles.
    log_loss
        Log-scale loss axis.
    width, height
        Size in pixels.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    fig = go.Figure(
        layout=go.Layout(
            template=TEMPLATE,
            title={"text": title},
            xaxis_title="step",
            yaxis={"title": y_title, "type": "log" if log_loss else "linear"},
            width=width,
            height=height,
            margin={"l": 55, "r": 10, "t": 40, "b": 40},
            legend={"orientation": "h", "y": -0.28},
        )
    )
    for k, name in enumerate(losses):
        fig.add_trace(_live_trace(name, "steps", _color(k), width=2 if k == 0 else 1.2, size=4))
    for k, name in enumerate(val_losses):
        fig.add_trace(_live_trace(name, "validations", _color(k), dash="dot", size=6))
    return fill_training_figure(fig, history_steps, history_epochs)


def epoch_figure(
    history_epochs: pd.DataFrame | Sequence[Any] | None = None,
    *,
    metrics: Sequence[str] = EPOCH_METRICS,
    title: str = "Validation per epoch",
    width: int = 470,
    height: int = 320,
) -> go.Figure:
    """Metrics per epoch (counted from 1): losses on the left axis, scores in [0, 1] on the right.

    Parameters
    ----------
    history_epochs
        Per-epoch records (``History.epochs`` or a list of dicts with ``epoch``, 0-based as the
        trainer counts, and the metric columns), a ``History``, or ``None`` for an empty figure.
    metrics
        Columns to draw; those with ``loss`` in their name go on the left axis, the others
        (accuracy, F1, ...) on the right one.
    title
        Figure title.
    width, height
        Size in pixels.

    Returns
    -------
    plotly.graph_objects.Figure
        Each trace's ``name`` is its column and its ``meta["source"]`` is ``"epochs"``.
    """
    losses = [m for m in metrics if "loss" in m]
    fig = go.Figure(
        layout=go.Layout(
            template=TEMPLATE,
            title={"text": title},
            xaxis={"title": "epoch", "tickmode": "linear", "tick0": 1, "dtick": 1},
            yaxis={"title": losses[0] if losses else ""},
            yaxis2={
                "title": "score",
                "overlaying": "y",
                "side": "right",
                "range": [0, 1.02],
                "tickmode": "linear",
                "tick0": 0,
                "dtick": 0.2,
                "showgrid": False,
            },
            width=width,
            height=height,
            margin={"l": 50, "r": 50, "t": 40, "b": 40},
            legend={"orientation": "h", "y": -0.25},
        )
    )
    for k, name in enumerate(metrics):
        trace = _live_trace(name, "epochs", _color(k), size=6)
        trace.yaxis = "y" if name in losses else "y2"
        fig.add_trace(trace)
    return fill_training_figure(fig, None, history_epochs)


def fill_training_figure(
    fig: Any,
    history_steps: pd.DataFrame | Any | None = None,
    history_epochs: pd.DataFrame | Sequence[Any] | None = None,
    *,
    validations: pd.DataFrame | Sequence[Any] | None = None,
) -> Any:
    """Set every trace of a :func:`loss_figure` / :func:`epoch_figure` from training records.

    Works on a ``go.Figure`` and on a ``go.FigureWidget`` (one message per call: the update runs
    in ``batch_update()``), so a live view only records events and calls this. Each trace takes
    the points of its column (its ``name``) whose value is finite; traces of other figures (no
    ``meta["source"]``) are left alone.

    Parameters
    ----------
    fig
        The figure to update in place.
    history_steps
        Per-step records (DataFrame or list of dicts with ``step``), or a ``History``.
    history_epochs
        Per-epoch records (``epoch`` 0-based, ``step``); drawn at ``epoch + 1``.
    validations
        Validation records (dicts with ``step`` and ``val/...``), e.g. from ``validation``
        events; default: the validation columns of ``history_epochs`` at their ``step``.

    Returns
    -------
    The same figure.
    """
    if history_epochs is None and hasattr(history_steps, "steps") and hasattr(history_steps, "epochs"):
        history_steps, history_epochs = history_steps.steps, history_steps.epochs
    sources = {
        "steps": (history_steps, "step", 0),
        "validations": (history_epochs if validations is None else validations, "step", 0),
        "epochs": (history_epochs, "epoch", 1),
    }
    points = {}
    for trace in fig.data:
        source = (trace.meta or {}).get("source") if isinstance(trace.meta, dict) else None
        if source in sources:
            records, x_key, offset = sources[source]
            points[id(trace)] = _points(records, x_key, str(trace.name), offset)
    batch = fig.batch_update() if hasattr(fig, "batch_update") else contextlib.nullcontext()
    with batch:
        for trace in fig.data:
            if id(trace) in points:
                trace.x, trace.y = points[id(trace)]
    return fig


def _live_trace(
    name: str, source: str, color: str, *, width: float = 1.6, dash: str | None = None, size: int = 4
) -> go.Scatter:
    return go.Scatter(
        x=(),
        y=(),
        name=name,
        mode="lines+markers",
        meta={"source": source},
        line={"color": color, "width": width, "dash": dash},
        marker={"size": size},
        hovertemplate=f"{name}: %{{y:.4g}}<extra></extra>",
    )


def _points(records: Any, x_key: str, y_key: str, offset: int) -> tuple[tuple[Any, ...], tuple[float, ...]]:
    """``(x, y)`` of the records with a finite ``y_key`` value (python numbers, for plotly)."""
    if records is None:
        return (), ()
    if isinstance(records, pd.DataFrame):
        if y_key not in records.columns or x_key not in records.columns:
            return (), ()
        pairs = zip(records[x_key].tolist(), records[y_key].tolist(), strict=True)
    else:
        pairs = ((r.get(x_key), r.get(y_key)) for r in records)
    xs: list[Any] = []
    ys: list[float] = []
    for x, y in pairs:
        try:
            value = float(y)
        except (TypeError, ValueError):
            continue
        if x is None or not np.isfinite(value):
            continue
        xs.append(int(x) + offset if offset else _plain_number(x))
        ys.append(value)
    return tuple(xs), tuple(ys)


def _plain_number(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x
