"""LiveTraining: the one live training view, driven by synthetic training Events (no model, no thread)."""

from __future__ import annotations

import threading

import pytest

from cellkit.train import Event
from cellkit.widgets._live import LiveTraining, seconds_text


def _run(live: LiveTraining, *, epochs: int = 2, per_epoch: int = 3, start_step: int = 0, stop_after=None):
    """Emit what the trainer emits for ``epochs`` epochs of ``per_epoch`` steps (validation at each end)."""
    total = epochs * per_epoch
    step = start_step
    live.on_event(Event("train_start", step=step, epoch=step // per_epoch, total_steps=total, elapsed=0.0))
    for epoch in range(step // per_epoch, epochs):
        while step < (epoch + 1) * per_epoch:
            step += 1
            metrics = {"loss": 2.0 / step, "loss/cls": 1.0 / step, "loss/gep": 1.0 / step, "lr": 1e-3}
            live.on_event(
                Event("step_end", step=step, epoch=epoch, metrics=metrics, total_steps=total, elapsed=step)
            )
            if stop_after is not None and step == stop_after:
                live.on_event(Event("finish", step=step, epoch=epoch, status="stopped", total_steps=total))
                return
        val = {"val/loss": 1.0 / (epoch + 1), "val/accuracy": 0.5 + 0.1 * epoch, "val/macro_f1": 0.4}
        live.on_event(Event("validation", step=step, epoch=epoch, metrics=val, total_steps=total))
        # epoch_end carries the epoch that just ended (the trainer advances its counter afterwards)
        live.on_event(Event("epoch_end", step=step, epoch=epoch, metrics=dict(val), total_steps=total))
    live.on_event(Event("finish", step=step, epoch=epochs, status="completed", total_steps=total))


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


@pytest.fixture
def live():
    view = LiveTraining(
        losses=("loss",), val_losses=("val/loss",), epoch_metrics=("val/loss", "val/accuracy"), css_prefix="t"
    )
    view.update_interval = 0.0
    return view


def test_steps_validations_and_epochs_reach_the_figures(live):
    live.reset(epochs=2)
    assert not live.stop_button.disabled and live.status is None
    _run(live)
    assert tuple(live.loss_fig.data[0].x) == (1, 2, 3, 4, 5, 6)
    assert live.loss_fig.data[0].y[0] == pytest.approx(2.0)
    val = _trace(live.loss_fig, "val/loss")
    assert tuple(val.x) == (3, 6)  # drawn at the step each validation ran
    # one point per epoch, counted from 1: the epoch_end event's epoch is the one that ended
    assert tuple(_trace(live.epoch_fig, "val/loss").x) == (1, 2)
    assert tuple(_trace(live.epoch_fig, "val/accuracy").y) == pytest.approx((0.5, 0.6))
    assert live.progress.value == live.progress.max == 6
    assert live.status == "completed" and live.epoch == 2
    assert live.finish() == "completed"
    assert live.progress.bar_style == "success" and live.stop_button.disabled
    assert "t-loss" in live.loss_fig._dom_classes and "t-epochs" in live.epoch_fig._dom_classes
    assert "t-stop" in live.stop_button._dom_classes and "t-status" in live.status_html._dom_classes


def test_status_line_counts_epochs_from_one(live):
    live.reset(epochs=2)
    _run(live, epochs=2, per_epoch=3, stop_after=4)  # the first step of the second epoch
    assert live.epoch == 2 and live.step == 4
    assert "epoch 2/2" in live.status_html.value and "step 4/6" in live.status_html.value
    live.finish(note="checkpoint kept")
    assert live.status == "stopped" and live.progress.bar_style == "warning"
    assert live.where() == " at epoch 2, step 4"


def test_throttle_pushes_only_at_epoch_ends_and_finish():
    live = LiveTraining(losses=("loss",), val_losses=())
    live.update_interval = 1e9
    live.reset(epochs=2)
    seen = []
    total = 6
    live.on_event(Event("train_start", step=0, epoch=0, total_steps=total))
    for step in (1, 2):
        live.on_event(Event("step_end", step=step, epoch=0, metrics={"loss": 1.0}, total_steps=total))
        seen.append(len(live.loss_fig.data[0].x))
    assert seen == [0, 0], "a throttled view records without pushing"
    assert len(live.steps) == 2
    live.on_event(Event("step_end", step=3, epoch=0, metrics={"loss": 1.0}, total_steps=total))
    live.on_event(Event("epoch_end", step=3, epoch=0, metrics={}, total_steps=total))
    assert tuple(live.loss_fig.data[0].x) == (1, 2, 3)


def test_resume_keeps_the_curve_up_to_the_checkpoint(live):
    live.reset(epochs=2)
    _run(live, stop_after=4)
    live.steps.append({"step": 5, "loss": 9.0})  # recorded after the checkpoint (never kept)
    live.finish()
    live.reset(epochs=2, keep=True)
    assert live.status is None and not live.stop_button.disabled
    _run(live, start_step=4)
    assert tuple(live.loss_fig.data[0].x) == (1, 2, 3, 4, 5, 6), "no duplicates, no lost points"
    assert 9.0 not in live.loss_fig.data[0].y
    assert tuple(_trace(live.epoch_fig, "val/loss").x) == (1, 2)
    live.reset(epochs=1)  # a new run: a fresh plot
    assert live.loss_fig.data[0].x == () and live.steps == [] and live.progress.value == 0


def test_stop_sets_the_event_even_when_pressed_before_the_run_starts(live):
    live.reset(epochs=2)
    live.stop_button.click()  # no on_stop handler: request_stop
    assert live.stop_requested and live.stop_event.is_set() and live.stop_button.disabled
    live.stop_event.clear()  # what the trainer does when a run starts
    live.on_event(Event("train_start", step=0, epoch=0, total_steps=6))
    assert live.stop_event.is_set()
    live.reset(epochs=2)
    assert not live.stop_event.is_set() and not live.stop_requested


def test_on_stop_handler_and_buttons():
    from ipywidgets import Button

    calls = []
    start, resume = Button(description="Start"), Button(description="Resume")
    live = LiveTraining(buttons=(start,), buttons_after=(resume,), on_stop=lambda: calls.append("stop"))
    assert live.children[0].children == (start, live.stop_button, resume, live.progress)
    assert live.epoch_fig is None
    live.reset()
    live.stop_button.click()
    assert calls == ["stop"] and not live.stop_event.is_set()


def test_loss_columns_follow_the_objectives(live):
    live.reset(epochs=2, losses=("loss", "loss/cls", "loss/gep"))
    names = [t.name for t in live.loss_fig.data]
    assert names == ["loss", "loss/cls", "loss/gep", "val/loss"]
    _run(live)
    assert tuple(_trace(live.loss_fig, "loss/gep").x) == (1, 2, 3, 4, 5, 6)
    live.reset(epochs=2, losses=("loss",))
    assert [t.name for t in live.loss_fig.data] == ["loss", "val/loss"]


def test_fail_says_where_and_keeps_what_was_plotted():
    live = LiveTraining(update_interval=1e9)
    live.reset(epochs=1)
    live.fail()
    assert live.status == "failed" and "before training started" in live.status_html.value
    live.reset(epochs=1)
    live.on_event(Event("train_start", step=0, epoch=0, total_steps=3))
    for step in (1, 2):
        live.on_event(Event("step_end", step=step, epoch=0, metrics={"loss": 1.0}, total_steps=3))
    live.fail("state unchanged")
    assert tuple(live.loss_fig.data[0].x) == (1, 2)
    assert live.progress.bar_style == "danger" and live.stop_button.disabled
    assert "step 2" in live.status_html.value


def test_events_from_several_threads_are_all_recorded():
    live = LiveTraining(update_interval=0.0)
    live.reset(epochs=1)
    live.on_event(Event("train_start", step=0, epoch=0, total_steps=400))

    def emit(offset):
        for k in range(100):
            live.on_event(Event("step_end", step=offset + k + 1, epoch=0, metrics={"loss": 1.0}))

    threads = [threading.Thread(target=emit, args=(100 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live.push()
    assert sorted(live.loss_fig.data[0].x) == list(range(1, 401))


def test_non_finite_losses_are_left_out(live):
    live.reset(epochs=1)
    live.on_event(Event("train_start", step=0, epoch=0, total_steps=3))
    for step, loss in ((1, 1.0), (2, float("nan")), (3, 0.5)):
        live.on_event(Event("step_end", step=step, epoch=0, metrics={"loss": loss}))
    assert tuple(live.loss_fig.data[0].x) == (1, 3)


def test_seconds_text():
    assert seconds_text(float("nan")) == "?"
    assert seconds_text(3.21) == "3.2 s"
    assert seconds_text(125) == "2 min 05 s"
    assert seconds_text(3720) == "1 h 02 min"
