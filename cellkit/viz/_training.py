"""Loss and metric curves of a training run (``cellkit.train.History`` frames)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .._errors import DataError
from ._common import TEMPLATE

__all__ = ["training_curves"]

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
