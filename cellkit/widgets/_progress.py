"""The job-progress row every long panel action shares: a bar, "x of y · elapsed · ETA", Cancel.

A panel calls :meth:`JobProgress.run` with the work (a function of a :class:`cellkit.Progress`,
passed on as ``progress=`` to the public API), the buttons that would start it twice and what to
do with the result. While the job runs those buttons are disabled, the bar moves with the API's
own count and Cancel asks the call to stop at its next batch (it raises
:class:`cellkit.Cancelled` and writes nothing). The row stays visible afterwards with the outcome
("done in 12 s", "cancelled after 120 of 700 cells").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets

from cellkit import Cancelled, ConfigError, Progress

from ._base import Panel

__all__ = ["JobProgress", "duration", "warning_while_enabled"]

#: seconds between two pushes of the bar to the browser (the first and the last always go)
UPDATE_INTERVAL = 0.25


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def warning_while_enabled(button: widgets.Button) -> widgets.Button:
    """Give a Stop / Cancel ``button`` its orange ``"warning"`` style only while it is enabled.

    A disabled button keeps its colour in ipywidgets, so an idle Stop would still look pressable;
    this keeps the style in step with ``button.disabled`` (now and on every change).

    Parameters
    ----------
    button
        The Stop or Cancel button.

    Returns
    -------
    ipywidgets.Button
        ``button``.
    """

    def sync(_change: Any = None) -> None:
        button.button_style = "" if button.disabled else "warning"

    button.observe(sync, names="disabled")
    sync()
    return button


class _Cancelled:
    """What a cancelled job returns to the panel's ``on_done`` step (instead of a result)."""

    def __init__(self, exc: Cancelled) -> None:
        self.exc = exc


class JobProgress(widgets.HBox):
    """A progress bar with an estimate and a Cancel button for one panel's long jobs.

    Parameters
    ----------
    css_prefix
        CSS class prefix of the parts (browser tests find them): ``<prefix>`` on the row,
        ``<prefix>-bar``, ``<prefix>-status``, ``<prefix>-cancel``; every row also has the
        classes ``cellkit-job``, ``cellkit-job-bar``, ``cellkit-job-status``, ``cellkit-job-cancel``.
    update_interval
        Seconds between two pushes of the bar.

    Attributes
    ----------
    bar, status, cancel_button
        The ``FloatProgress`` (0 … 1), the status line and Cancel.
    progress
        The :class:`cellkit.Progress` of the running (or last) job.
    outcome
        ``""`` before any job, ``"running"``, ``"done"``, ``"cancelled"`` or ``"failed"``.
    """

    def __init__(self, *, css_prefix: str = "cellkit-job", update_interval: float = UPDATE_INTERVAL) -> None:
        self.bar = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, layout=widgets.Layout(width="260px"))
        self.status = widgets.HTML("", layout=widgets.Layout(margin="0 8px", width="auto"))
        self.cancel_button = widgets.Button(
            description="Cancel",
            icon="stop",
            button_style="warning",
            tooltip="stop this step at its next batch; nothing is written",
            layout=widgets.Layout(width="100px"),
        )
        warning_while_enabled(self.cancel_button)
        self.cancel_button.on_click(lambda _b: self.cancel())
        super().__init__(
            [self.bar, self.status, self.cancel_button],
            layout=widgets.Layout(display="none", align_items="center"),
        )
        for part, cls in (
            (self, ""),
            (self.bar, "-bar"),
            (self.status, "-status"),
            (self.cancel_button, "-cancel"),
        ):
            part.add_class(f"cellkit-job{cls}")
            if css_prefix != "cellkit-job":
                part.add_class(f"{css_prefix}{cls}")
        self.update_interval = float(update_interval)
        self.progress: Progress | None = None
        self.outcome = ""
        self.name = ""
        self._buttons: list[tuple[widgets.Button, bool]] = []
        self._last_push = 0.0
        self._pushed = 0  # the done count last pushed
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """Whether a job is running."""
        return self.outcome == "running"

    def cancel(self) -> None:
        """Ask the running job to stop at its next batch (the Cancel button)."""
        if not self.running or self.progress is None:
            return
        self.progress.cancel()
        self.cancel_button.disabled = True
        self.status.value = f"{self._text()} · cancelling…"

    def step(self, text: str, *, cancellable: bool = False) -> None:
        """Name a step that reports no count (e.g. a UMAP layout); Cancel waits for it unless ``cancellable``."""
        self.bar.bar_style = "info"
        self.cancel_button.disabled = not cancellable or (
            self.progress is not None and self.progress.cancelled
        )
        self.status.value = f"{text} …"

    # ------------------------------------------------------------------ running a job
    def run(
        self,
        panel: Panel,
        fn: Callable[[Progress], Any],
        *,
        name: str,
        buttons: Sequence[widgets.Button] = (),
        on_done: Callable[[Any], None] | None = None,
        background: bool = False,
    ) -> Any:
        """Run ``fn(progress)`` with ``buttons`` disabled, the bar following ``progress``.

        ``on_done(result)`` shows the result; a cancelled job shows the cancel message instead.
        With ``background`` the job runs in the panel's background thread
        (:meth:`Panel.run_in_background`) and ``None`` is returned; else its result (``None`` when
        cancelled).
        """
        if self.running:
            raise ConfigError(
                f"{panel.title}: “{self.name}” is still running; wait for it or click “Cancel”."
            )
        progress = self._start(name, buttons)

        def work() -> Any:
            try:
                return fn(progress)
            except Cancelled as exc:
                return _Cancelled(exc)
            except BaseException:
                self._finish("failed")
                raise

        def done(result: Any) -> None:
            try:
                if isinstance(result, _Cancelled):
                    panel.show_message(str(result.exc), "warning")
                    self._finish("cancelled")
                    return
                if on_done is not None:
                    self.step(f"{name}: showing the result")  # the call is over: nothing left to cancel
                    on_done(result)
            except BaseException:
                self._finish("failed")
                raise
            self._finish("done")

        if background:
            try:
                panel.run_in_background(work, name=name, on_done=done)
            except BaseException:
                self._finish("failed")
                raise
            return None
        result = work()
        done(result)
        return None if isinstance(result, _Cancelled) else result

    def _start(self, name: str, buttons: Sequence[widgets.Button]) -> Progress:
        self.name, self.outcome = name, "running"
        self._buttons = [(b, b.disabled) for b in buttons]
        for b in buttons:
            b.disabled = True
        self.progress = Progress(self._on_progress)
        self._last_push, self._pushed = 0.0, 0
        self.bar.value, self.bar.bar_style = 0.0, ""
        self.cancel_button.disabled = False
        self.cancel_button.layout.display = None
        self.status.value = f"{name} — starting …"
        self.layout.display = None
        return self.progress

    def _finish(self, outcome: str) -> None:
        if not self.running:
            return
        self.outcome = outcome
        for b, was in self._buttons:
            b.disabled = was
        self._buttons = []
        self.cancel_button.layout.display = "none"
        p = self.progress
        took = duration(p.elapsed) if p is not None else ""
        if outcome == "done":
            self.bar.value, self.bar.bar_style = 1.0, "success"
            self.status.value = f"{self.name}: done in {took}"
        elif outcome == "cancelled" and p is not None:
            self.bar.bar_style = "warning"
            self.status.value = f"{self.name}: cancelled after {p.done:,} of {p.total:,} {p.unit}s ({took})"
        else:
            self.bar.bar_style = "danger"
            self.status.value = f"{self.name}: stopped by an error after {took}"

    def _on_progress(self, done: int, total: int) -> None:
        """The API's callback (the job's thread): push at most every ``update_interval`` seconds."""
        now = time.monotonic()
        first = done > 0 and self._pushed == 0  # the first batch always shows (and the estimate with it)
        if 0 < done < total and not first and now - self._last_push < self.update_interval:
            return
        with self._lock:
            self._last_push, self._pushed = now, done
            self.bar.value = done / total if total else 0.0
            if self.progress is not None and not self.progress.cancelled:
                self.status.value = self._text()

    def _text(self) -> str:
        p = self.progress
        if p is None:
            return ""
        what = (p.desc or self.name).capitalize()
        parts = [f"{what}: {p.done:,} of {p.total:,} {p.unit}s", f"{duration(p.elapsed)} elapsed"]
        eta = p.eta
        parts.append("estimating time left" if eta is None else f"about {duration(eta)} left")
        return " · ".join(parts)
