"""One live view of a training run for every panel that trains: curves, progress, status, Stop.

:class:`LiveTraining` is a training :class:`~cellkit.train.Event` callback plus the widgets that
show it: a loss figure (:func:`cellkit.viz.loss_figure`), optionally a per-epoch metrics figure
(:func:`cellkit.viz.epoch_figure`), a progress bar, a status line and a Stop button wired to a
``threading.Event`` the training API takes as ``stop_event``. Throttling, thread safety, the
epoch numbering and the resume bookkeeping live here once; panels only lay it out and react to
the result.
"""

from __future__ import annotations

import html
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

import cellkit.viz

from ._progress import warning_while_enabled

__all__ = ["LiveTraining", "TrainsLive", "seconds_text"]

#: default seconds between two figure pushes (train start, epoch ends, validations, the finish
#: and errors always push)
UPDATE_INTERVAL = 0.3
#: event kinds that push whatever the throttle says
_ALWAYS_PUSH = ("train_start", "epoch_end", "validation", "finish", "error")
#: run statuses that mean "the run reached its end" (the others leave a resumable checkpoint)
DONE_STATUSES = ("completed", "early_stopped")


def seconds_text(s: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``1 h 02 min`` (``?`` for a non-finite duration)."""
    if not math.isfinite(s):
        return "?"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class LiveTraining(widgets.VBox):
    """Live curves, progress, status line and Stop button of one training run (any panel).

    Usage in a panel (three steps; the training function is any cellkit API that takes
    ``callbacks`` and ``stop_event`` — :func:`cellkit.finetune`, :func:`cellkit.pretrain`,
    :func:`cellkit.fit_perturbation_model`)::

        self.live = LiveTraining(losses=("loss",), val_losses=("val/loss",), y_title="MSE",
                                 css_prefix="cellkit-perturb", loss_class="cellkit-perturb-loss",
                                 buttons=(self.train_button,), on_stop=self.stop)
        # in the layout: self.live (control row with the buttons, Stop and the progress bar;
        # status line; figures)

        # start (main thread), then train in a background thread:
        self.live.reset(epochs=kw["epochs"])
        result = cellkit.fit_perturbation_model(adata, **kw, callbacks=[self.live.on_event],
                                                stop_event=self.live.stop_event, progress=False)
        self.live.finish(result)          # or, on an exception: self.live.fail()

        # the panel's stop() (the Stop button calls on_stop, else request_stop directly):
        self.live.request_stop()

    Events arrive on the training thread: they are recorded under a lock and pushed to the
    figures from that thread (ipywidgets comm messages from a background thread reach the
    browser), at most every :attr:`update_interval` seconds plus at the train start, every epoch
    end and validation, the finish and an error.

    Parameters
    ----------
    losses
        Per-step loss columns drawn in :attr:`loss_fig` (``"loss"``, ``"loss/<objective>"``).
    val_losses
        Validation losses drawn in :attr:`loss_fig` at the step each validation ran.
    epoch_metrics
        Per-epoch metrics for a second figure, :attr:`epoch_fig` (none when empty).
    title, y_title
        Title and y-axis title of the loss figure.
    epoch_title
        Title of the per-epoch figure.
    css_prefix
        CSS class prefix of the parts: ``<prefix>-stop``, ``<prefix>-progress``,
        ``<prefix>-status`` (browser tests find them by these).
    loss_class, epoch_class
        CSS classes of the two figures (default ``<prefix>-loss`` and ``<prefix>-epochs``).
    buttons, buttons_after
        The panel's own buttons shown before and after Stop in the control row (Start; Resume).
    on_stop
        Called by the Stop button (a panel's ``stop()`` that also updates its own state and
        then calls :meth:`request_stop`); default :meth:`request_stop`.
    update_interval
        Seconds between two pushes.
    width, height
        Size of each figure in pixels.

    Attributes
    ----------
    loss_fig, epoch_fig
        The live ``FigureWidget``\\ s (``epoch_fig`` is ``None`` without ``epoch_metrics``).
    progress, status_html, stop_button
        Step progress bar, status line (epoch, step, loss, validation loss, elapsed, ETA), Stop.
    stop_event
        Pass it as ``stop_event=`` to the training function; Stop sets it.
    stop_requested
        Whether Stop was pressed during the current run.
    steps, validations, epochs
        The records of the run so far (dicts: ``step``/``epoch`` plus the event's metrics).
    last_event
        The last :class:`~cellkit.train.Event` received.
    status
        ``None`` while running, else the finished run's status (or ``"failed"``).
    planned_epochs
        Epochs of the whole run (from :meth:`reset`; ``None`` when unknown).
    """

    def __init__(
        self,
        *,
        losses: Sequence[str] = ("loss",),
        val_losses: Sequence[str] = ("val/loss",),
        epoch_metrics: Sequence[str] = (),
        title: str = "Training loss",
        y_title: str = "loss",
        epoch_title: str = "Validation per epoch",
        css_prefix: str = "cellkit-live",
        loss_class: str | None = None,
        epoch_class: str | None = None,
        buttons: Sequence[widgets.Widget] = (),
        buttons_after: Sequence[widgets.Widget] = (),
        on_stop: Callable[[], Any] | None = None,
        update_interval: float = UPDATE_INTERVAL,
        width: int = 470,
        height: int = 320,
    ) -> None:
        super().__init__()
        self.add_class("cellkit-live")
        self.update_interval = float(update_interval)
        self.stop_event = threading.Event()
        self.stop_requested = False
        self.status: str | None = None
        self.planned_epochs: int | None = None
        self.last_event: Any = None
        self.steps: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._push_lock = threading.Lock()
        self._last_push = 0.0
        self._first_step = 0
        self._epoch = 0
        self._total: int | None = None
        self._figure_args = {"title": title, "y_title": y_title, "width": width, "height": height}
        self._val_losses = tuple(val_losses)

        self.loss_fig = go.FigureWidget(
            cellkit.viz.loss_figure(losses=tuple(losses), val_losses=self._val_losses, **self._figure_args)
        )
        self.loss_fig.add_class(loss_class or f"{css_prefix}-loss")
        self.epoch_fig: go.FigureWidget | None = None
        figures: list[widgets.Widget] = [self.loss_fig]
        if epoch_metrics:
            self.epoch_fig = go.FigureWidget(
                cellkit.viz.epoch_figure(
                    metrics=tuple(epoch_metrics), title=epoch_title, width=width, height=height
                )
            )
            self.epoch_fig.add_class(epoch_class or f"{css_prefix}-epochs")
            figures.append(self.epoch_fig)

        self.stop_button = widgets.Button(
            layout=widgets.Layout(width="max-content"),
            description="Stop",
            button_style="warning",
            icon="stop",
            disabled=True,
        )
        warning_while_enabled(self.stop_button)
        self.stop_button.add_class(f"{css_prefix}-stop")
        self.stop_button.on_click(lambda _b: (on_stop or self.request_stop)())
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="420px"))
        self.progress.add_class(f"{css_prefix}-progress")
        self.status_html = widgets.HTML("idle")
        self.status_html.add_class(f"{css_prefix}-status")
        self.children = [
            widgets.HBox([*buttons, self.stop_button, *buttons_after, self.progress]),
            self.status_html,
            widgets.HBox(figures, layout=widgets.Layout(flex_flow="row wrap")),
        ]

    # ------------------------------------------------------------------ run lifecycle
    def reset(
        self, *, epochs: int | None = None, losses: Sequence[str] | None = None, keep: bool = False
    ) -> None:
        """Get ready for a run (call on the main thread before training starts); enables Stop.

        Parameters
        ----------
        epochs
            Planned epochs (the status line's ``epoch e/E``).
        losses
            New per-step loss columns for the loss figure (e.g. one per objective); default: keep.
        keep
            Keep the curves recorded so far: a resumed run goes on from its checkpoint (points
            recorded after the checkpoint are dropped when its ``train_start`` event arrives).
        """
        with self._lock:
            if not keep:
                self.steps, self.validations, self.epochs = [], [], []
                self.last_event = None
            self.stop_event.clear()
            self.stop_requested = False
            self.status = None
            self.planned_epochs = epochs
            self._total = None
        if losses is not None and tuple(losses) != tuple(t.name for t in self._step_traces()):
            self._set_losses(tuple(losses))
        self.stop_button.disabled = False
        self.progress.bar_style = "info"
        if not keep:
            self.progress.value, self.progress.max = 0, 1
        self.status_html.value = "preparing…"
        self.push()

    def on_event(self, event: Any) -> None:
        """The training callback: pass ``callbacks=[live.on_event]`` (runs on the training thread)."""
        kind = event.kind
        with self._lock:
            self.last_event = event
            if kind == "train_start":
                self._start(event)
            elif kind == "step_end":
                self._epoch = int(event.epoch)
                self.steps.append({"step": int(event.step), **event.metrics})
            elif kind == "validation":
                self.validations.append({"step": int(event.step), **event.metrics})
            elif kind == "epoch_end":  # event.epoch: the epoch that just ended (0-based)
                self._epoch = int(event.epoch)
                self.epochs.append({"epoch": int(event.epoch), "step": int(event.step), **event.metrics})
            elif kind == "finish":
                self.status = event.status
        if kind == "train_start" and self.stop_requested:
            self.stop_event.set()  # Stop was pressed while the data were prepared (the run clears it)
        if kind in _ALWAYS_PUSH or time.monotonic() - self._last_push >= self.update_interval:
            self.push()

    def _start(self, event: Any) -> None:
        """A (resumed) run starts at ``event.step``: forget what was recorded after its checkpoint."""
        step, epoch = int(event.step), int(event.epoch)
        self._first_step = step
        self._epoch = epoch
        self._total = event.total_steps
        self.status = None
        self.steps = [r for r in self.steps if r["step"] <= step]
        self.validations = [r for r in self.validations if r["step"] <= step]
        self.epochs = [r for r in self.epochs if r["epoch"] < epoch]

    def preparing(self) -> Any:
        """A :class:`cellkit.Progress` for the step before the training (tokenizing the cells).

        Pass it as ``progress=`` to :func:`cellkit.finetune`: the bar and the status line follow
        the tokenizing (count, elapsed, an estimate), and Stop cancels it (the call raises
        :class:`cellkit.Cancelled` before any training). Call after :meth:`reset`.
        """
        from cellkit import Progress

        def show(done: int, total: int) -> None:
            now = time.monotonic()
            if 0 < done < total and now - self._last_push < self.update_interval:
                return
            self._last_push = now
            self.progress.max, self.progress.value = max(total, 1), min(done, max(total, 1))
            parts = [
                f"{(tracker.desc or 'preparing').capitalize()} before training: {done:,} of {total:,} {tracker.unit}s",
                f"{seconds_text(tracker.elapsed)} elapsed",
            ]
            if tracker.eta is not None:
                parts.append(f"ETA {seconds_text(tracker.eta)}")
            self.status_html.value = html.escape(" · ".join(parts))

        tracker = Progress(show, stop_event=self.stop_event)
        return tracker

    def request_stop(self) -> None:
        """Ask the run to stop at the end of the current step (thread-safe); disables Stop."""
        self.stop_requested = True
        self.stop_event.set()
        self.stop_button.disabled = True
        self.status_html.value = html.escape(f"stopping at the end of step {self.step + 1}…")

    def finish(self, result: Any = None, *, note: str | None = None) -> str:
        """The run returned: final push, bar colour, Stop disabled; returns the run's status.

        Parameters
        ----------
        result
            What the training function returned (its ``status`` is used), a status string, or
            ``None`` for the status of the ``finish`` event.
        note
            Added to the status line of a run that did not reach its end (``"checkpoint kept"``).
        """
        status = result if isinstance(result, str) else getattr(result, "status", None)
        status = status or self.status or "completed"
        self.status = status
        self.stop_button.disabled = True
        self.push()
        done = status in DONE_STATUSES
        self.progress.bar_style = "success" if done else "warning"
        if not done:
            extra = f" · {note}" if note else ""
            self.status_html.value = html.escape(f"{status}{self.where()}{extra}")
        return status

    def fail(self, note: str | None = None) -> None:
        """The run raised: push what was recorded, say where it failed, disable Stop."""
        self.status = "failed"
        self.stop_button.disabled = True
        self.push()
        self.progress.bar_style = "danger"
        where = self.where() or " before training started"
        self.status_html.value = html.escape(f"failed{where}" + (f"; {note}" if note else ""))

    def cancelled(self, note: str) -> None:
        """Stop ended the step before the training (see :meth:`preparing`): say so, disable Stop."""
        self.status = "stopped"
        self.stop_button.disabled = True
        self.progress.bar_style = "warning"
        self.status_html.value = html.escape(f"stopped before training: {note}")

    def show_history(self, history: Any, status: str) -> None:
        """Show a finished or loaded run's records (a :class:`~cellkit.train.History`) with a status.

        Parameters
        ----------
        history
            The run's history (``step_records`` and ``epoch_records``); validation losses are read
            from the epoch records.
        status
            The status line, e.g. ``"loaded · 30 genes"``.
        """
        epochs = [dict(r) for r in history.epoch_records]
        with self._lock:
            self.steps = [dict(r) for r in history.step_records]
            self.epochs = epochs
            self.validations = [r for r in epochs if any(k in r for k in self._val_losses)]
            self.last_event = None
            self.status = "completed"
        self.stop_button.disabled = True
        self.push()
        self.progress.value, self.progress.max, self.progress.bar_style = 1, 1, "success"
        self.status_html.value = html.escape(status)

    # ------------------------------------------------------------------ what is shown
    @property
    def step(self) -> int:
        """Optimizer steps done so far (of the last event)."""
        return int(self.last_event.step) if self.last_event is not None else 0

    @property
    def epoch(self) -> int:
        """The current epoch, counted from 1 (the epoch of the last step or epoch end)."""
        return self._epoch + 1

    def where(self) -> str:
        """`` at epoch e, step s`` of the last event (empty before any)."""
        if self.last_event is None:
            return ""
        return f" at epoch {self.epoch}, step {self.step}"

    def push(self) -> None:
        """Send the records to the figures and refresh progress and status (any thread)."""
        with self._lock:
            steps, validations, epochs = list(self.steps), list(self.validations), list(self.epochs)
            event, total = self.last_event, self._total
        with self._push_lock:
            cellkit.viz.fill_training_figure(self.loss_fig, steps, epochs, validations=validations)
            if self.epoch_fig is not None:
                cellkit.viz.fill_training_figure(self.epoch_fig, None, epochs)
            if event is not None:
                step = int(event.step)
                top = max(int(total or 0), step, 1)
                self.progress.max = top
                self.progress.value = min(step, top)
                self.status_html.value = self._status_text(event, total, steps, validations)
            self._last_push = time.monotonic()

    def _status_text(self, event: Any, total: int | None, steps: list[dict], validations: list[dict]) -> str:
        planned = self.planned_epochs if self.planned_epochs is not None else "?"
        parts = [f"epoch {self.epoch}/{planned}", f"step {event.step}/{total if total is not None else '?'}"]
        loss = _last(steps, "loss")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        for key in self._val_losses:
            value = _last(validations, key)
            if value is not None:
                parts.append(f"{key} {value:.4f}")
        parts.append(f"{seconds_text(event.elapsed)} elapsed")
        done = int(event.step) - self._first_step
        if total is not None and done > 0 and event.kind != "finish":
            parts.append(f"ETA {seconds_text((total - event.step) * event.elapsed / done)}")
        return " · ".join(html.escape(str(p)) for p in parts)

    # ------------------------------------------------------------------ figure traces
    def _step_traces(self) -> list[Any]:
        return [t for t in self.loss_fig.data if (t.meta or {}).get("source") == "steps"]

    def _set_losses(self, losses: tuple[str, ...]) -> None:
        fresh = cellkit.viz.loss_figure(losses=losses, val_losses=self._val_losses, **self._figure_args)
        self.loss_fig.data = ()
        self.loss_fig.add_traces(list(fresh.data))


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    """The last finite value of ``key`` in ``records``."""
    for r in reversed(records):
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            return float(v)
    return None


class TrainsLive:
    """Mixin of a panel that trains with a :class:`LiveTraining` view in ``self.live``."""

    live: LiveTraining

    @property
    def update_interval(self) -> float:
        """Seconds between two live-plot pushes (epoch ends and the finish always push)."""
        return self.live.update_interval

    @update_interval.setter
    def update_interval(self, value: float) -> None:
        self.live.update_interval = float(value)
