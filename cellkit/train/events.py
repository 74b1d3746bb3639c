"""Training events and callbacks: what the studio's live plots (and any script) subscribe to.

The trainer emits an :class:`Event` at each point of its life. A callback is either an object
with ``on_<kind>(event)`` methods (subclass :class:`Callback` and override what you need) or a
plain callable that receives every event. Callbacks run on the training thread: keep them quick
(throttle plot updates) — an exception in a callback is logged and training goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .._utils import get_logger

__all__ = ["EVENT_KINDS", "Callback", "Event", "EventKind", "dispatch"]

log = get_logger(__name__)

EventKind = Literal["train_start", "step_end", "epoch_end", "validation", "checkpoint", "finish", "error"]
EVENT_KINDS: tuple[str, ...] = (
    "train_start",
    "step_end",
    "epoch_end",
    "validation",
    "checkpoint",
    "finish",
    "error",
)


@dataclass
class Event:
    """One moment of training.

    Attributes
    ----------
    kind
        ``"train_start"``, ``"step_end"``, ``"epoch_end"``, ``"validation"``, ``"checkpoint"``,
        ``"finish"`` or ``"error"``.
    step
        Optimizer steps done so far.
    epoch
        Current epoch (0-based; at ``epoch_end`` the epoch that just ended).
    metrics
        Numbers of this moment: ``loss``, ``loss/<objective>``, ``lr``, ``accuracy``, ``val/...``.
    total_steps
        Planned optimizer steps of the whole run (``None`` for streamed data of unknown length).
    status
        ``finish``: ``"completed"``, ``"stopped"``, ``"interrupted"`` or ``"early_stopped"``.
    path
        ``checkpoint``: the checkpoint directory written.
    error
        ``error``: the exception.
    elapsed
        Seconds since the run (or the resumed run) started.
    """

    kind: str
    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    total_steps: int | None = None
    status: str | None = None
    path: str | None = None
    error: BaseException | None = None
    elapsed: float = 0.0
    time: float = field(default_factory=time.time)


class Callback:
    """Base class: override the ``on_<kind>`` methods you need; each receives an :class:`Event`."""

    def on_train_start(self, event: Event) -> None: ...

    def on_step_end(self, event: Event) -> None: ...

    def on_epoch_end(self, event: Event) -> None: ...

    def on_validation(self, event: Event) -> None: ...

    def on_checkpoint(self, event: Event) -> None: ...

    def on_finish(self, event: Event) -> None: ...

    def on_error(self, event: Event) -> None: ...


def dispatch(callbacks: Iterable[Callback | Callable[[Event], Any]], event: Event) -> None:
    """Send ``event`` to every callback; ``Exception``\\ s are logged, interrupts propagate."""
    for cb in callbacks:
        fn = getattr(cb, f"on_{event.kind}", None)
        if fn is None:
            if not callable(cb):
                continue
            fn = cb
        try:
            fn(event)
        except Exception as e:  # a broken plot must not kill a long run
            log.warning("callback %r failed on %s: %s: %s", cb, event.kind, type(e).__name__, e)
