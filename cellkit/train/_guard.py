"""One training run at a time per process, and Ctrl-C as a cooperative stop."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from .._errors import CellkitError
from .._utils import get_logger

__all__ = ["SigintToStop", "TrainingError", "exclusive_training_run"]

log = get_logger("cellkit.train.trainer")


class TrainingError(CellkitError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


_RUN_GUARD = threading.Lock()
_ACTIVE_RUN: dict[str, Any] | None = None


@contextlib.contextmanager
def exclusive_training_run(what: str = "training run") -> Iterator[None]:
    """Hold the process's single training slot; a second concurrent run is refused.

    Two runs in one process share torch's process-wide random state (dropout, head
    initialisation, masking), so each would silently give weights different from its standalone
    run. :meth:`Trainer.fit` holds the slot for the whole run; :func:`cellkit.finetune`,
    :func:`cellkit.pretrain` take it before they seed anything. The holding thread may re-enter
    (a task's fit nested in the task). Other code of the process that draws from torch's global
    RNG while a run is active (building a model, ``torch.manual_seed`` in a notebook cell) still
    changes that run's random stream; cellkit cannot guard that.

    Raises
    ------
    TrainingError
        Another thread of this process holds the slot.
    """
    global _ACTIVE_RUN
    me = threading.current_thread()
    with _RUN_GUARD:
        active = _ACTIVE_RUN
        if active is not None and active["thread"] is not me:
            raise TrainingError(
                f"Another cellkit training run is active in this process ({active['what']} in thread "
                f"{active['thread'].name!r}, started {time.strftime('%H:%M:%S', time.localtime(active['since']))}); "
                "wait for it to finish or stop it (trainer.request_stop(), the studio's Stop button), then start "
                "this one. Two runs in one process share torch's global random state, so neither would give the "
                "weights it gives alone."
            )
        if active is None:
            active = _ACTIVE_RUN = {"thread": me, "what": what, "since": time.time(), "depth": 0}
        active["depth"] += 1
    try:
        yield
    finally:
        with _RUN_GUARD:
            active["depth"] -= 1
            if active["depth"] == 0:
                _ACTIVE_RUN = None


class SigintToStop:
    """While active (main thread only): first Ctrl-C requests a stop, the second one aborts."""

    def __init__(self, trainer: Any) -> None:
        self.trainer, self.previous = trainer, None

    def __enter__(self) -> SigintToStop:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.trainer._stop_reason is not None:
            raise KeyboardInterrupt
        log.warning("Interrupted: stopping at the end of this step (press Ctrl-C again to abort).")
        self.trainer.request_stop(reason="interrupted")

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
