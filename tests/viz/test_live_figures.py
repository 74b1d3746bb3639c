"""loss_figure / epoch_figure / fill_training_figure: the figures a live training view streams into."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

import cellkit.viz as cv
from cellkit.train import History

STEPS = [{"step": s, "loss": 1.0 / s, "loss/cls": 0.5 / s, "lr": 1e-3} for s in range(1, 7)]
EPOCHS = [
    {"epoch": 0, "step": 3, "val/loss": 0.9, "val/accuracy": 0.5},
    {"epoch": 1, "step": 6, "val/loss": 0.7, "val/accuracy": 0.75},
]


def _by_name(fig):
    return {t.name: t for t in fig.data}


def test_empty_figures_have_named_traces_with_their_source():
    fig = cv.loss_figure(losses=("loss", "loss/cls"), val_losses=("val/loss",))
    assert [t.name for t in fig.data] == ["loss", "loss/cls", "val/loss"]
    assert [t.meta["source"] for t in fig.data] == ["steps", "steps", "validations"]
    assert all(t.x == () for t in fig.data)
    ep = cv.epoch_figure()
    assert [t.name for t in ep.data] == list(cv._training.EPOCH_METRICS)
    assert {t.yaxis for t in ep.data if "loss" in t.name} == {"y"}
    assert {t.yaxis for t in ep.data if "loss" not in t.name} == {"y2"}
    assert ep.layout.yaxis2.range == (0, 1.02)


def test_loss_figure_from_records_frames_and_history():
    fig = cv.loss_figure(STEPS, EPOCHS, losses=("loss", "loss/cls"))
    t = _by_name(fig)
    assert t["loss"].x == (1, 2, 3, 4, 5, 6) and t["loss"].y[0] == pytest.approx(1.0)
    assert t["val/loss"].x == (3, 6) and t["val/loss"].y == pytest.approx((0.9, 0.7))
    framed = cv.loss_figure(pd.DataFrame(STEPS), pd.DataFrame(EPOCHS))
    assert _by_name(framed)["loss"].x == (1, 2, 3, 4, 5, 6)
    history = History(STEPS, EPOCHS)
    assert _by_name(cv.loss_figure(history))["val/loss"].x == (3, 6)


def test_epoch_figure_counts_epochs_from_one():
    fig = cv.epoch_figure(EPOCHS, metrics=("val/loss", "val/accuracy"))
    t = _by_name(fig)
    assert t["val/loss"].x == (1, 2) and t["val/accuracy"].y == pytest.approx((0.5, 0.75))


def test_fill_updates_a_figure_widget_and_skips_missing_and_non_finite():
    widget = go.FigureWidget(cv.loss_figure(losses=("loss", "loss/gep")))
    widget.add_scatter(x=(9,), y=(9,), name="someone else's")
    steps = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.5}]
    out = cv.fill_training_figure(widget, steps, None, validations=[{"step": 3, "val/loss": 0.4}])
    assert out is widget
    t = _by_name(widget)
    assert t["loss"].x == (1, 3) and t["loss/gep"].x == ()
    assert t["val/loss"].x == (3,)
    assert t["someone else's"].x == (9,), "traces without a source are left alone"
