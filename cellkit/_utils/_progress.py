"""One way for a long call to report progress and to be cancelled (``progress=`` of every long call).

Every long AnnData-facing function takes ``progress: bool | Progress``: ``True`` draws a ``tqdm``
bar, ``False`` nothing, and a :class:`Progress` lets a widget or a script follow the call (done /
total, elapsed, an estimate of the time left) and stop it. The functions open the work with
:func:`track` and call :meth:`Progress.advance` after each batch; a nested call given the same
object (e.g. :func:`cellkit.embed_cells` → its forward passes) adds to the outer count instead of
starting a new one. A cancelled :class:`Progress` raises :class:`cellkit.Cancelled` at the next
batch, before any result is written.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._errors import Cancelled, ConfigError

__all__ = ["Progress", "track"]


class Progress:
    """Follow a long cellkit call from another thread, with an estimate, and cancel it.

    Pass it as ``progress=`` to :func:`cellkit.embed_cells`, :func:`cellkit.predict`,
    :func:`cellkit.tokenize`, the attention and gene-embedding functions of
    :mod:`cellkit.analysis` or :func:`~cellkit.analysis.in_silico_perturb`. The call counts its
    work (cells, perturbations) in :attr:`done` of :attr:`total` and calls ``callback(done, total)``
    after each batch, from the thread running the call. :meth:`cancel` (or setting
    ``stop_event``) makes the call raise :class:`cellkit.Cancelled` at its next batch; nothing is
    written into the AnnData then. One object follows one call at a time; a new call starts the
    count again.

    Parameters
    ----------
    callback
        ``callback(done, total)``, called when the call starts (``done=0``) and after each batch.
    stop_event
        A :class:`threading.Event` shared with whoever cancels (a new one by default).
    bar
        Also draw a ``tqdm`` bar (as ``progress=True`` does).

    Examples
    --------
    >>> p = cellkit.Progress(lambda done, total: print(f"{done}/{total}"))
    >>> cellkit.embed_cells(adata, model, progress=p)       # p.cancel() from another thread stops it
    """

    def __init__(
        self,
        callback: Callable[[int, int], Any] | None = None,
        *,
        stop_event: threading.Event | None = None,
        bar: bool = False,
    ) -> None:
        if callback is not None and not callable(callback):
            raise ConfigError(f"Progress(callback=...) must be callable, got {type(callback).__name__}.")
        self.callback = callback
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.bar = bool(bar)
        self.done = 0
        self.total = 0
        self.desc = ""
        self.unit = "cell"
        self.started: float | None = None
        self._depth = 0
        self._tqdm: Any = None

    # -- what a caller reads
    @property
    def running(self) -> bool:
        """Whether a call is following this object now."""
        return self._depth > 0

    @property
    def elapsed(self) -> float:
        """Seconds since the call started (0 before)."""
        return 0.0 if self.started is None else time.monotonic() - self.started

    @property
    def fraction(self) -> float:
        """``done / total`` (0 while the total is unknown)."""
        return self.done / self.total if self.total else 0.0

    @property
    def eta(self) -> float | None:
        """Estimated seconds left (``None`` until the first batch is done)."""
        if not self.done or not self.total:
            return None
        return self.elapsed / self.done * max(self.total - self.done, 0)

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called (or ``stop_event`` set)."""
        return self.stop_event.is_set()

    def cancel(self) -> None:
        """Ask the call to stop at its next batch (it raises :class:`cellkit.Cancelled`)."""
        self.stop_event.set()

    def reset(self) -> None:
        """Forget an earlier cancel, so the object can follow a new call."""
        self.stop_event.clear()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else ("running" if self.running else "idle")
        return f"Progress({self.desc or 'no call'}: {self.done}/{self.total} {self.unit}s, {state})"

    # -- what cellkit calls
    def check(self) -> None:
        """Raise :class:`cellkit.Cancelled` when the call was cancelled."""
        if self.cancelled:
            what = self.desc or "the call"
            raise Cancelled(
                f"Cancelled {what} after {self.done:,} of {self.total:,} {self.unit}s; nothing was written."
            )

    def advance(self, n: int) -> None:
        """Count ``n`` more units done, tell the callback, and stop here when cancelled."""
        self.done = min(self.done + int(n), self.total) if self.total else self.done + int(n)
        if self._tqdm is not None:
            self._tqdm.update(int(n))
        self._notify()
        self.check()

    def _notify(self) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total)

    @contextlib.contextmanager
    def _follow(self, total: int, desc: str, unit: str) -> Iterator[Progress]:
        if self._depth:  # a nested call: the outer one counts
            self._depth += 1
            try:
                self.check()
                yield self
            finally:
                self._depth -= 1
            return
        self.done, self.total, self.desc, self.unit = 0, int(total), desc, unit
        self.started = time.monotonic()
        self._depth = 1
        try:
            with contextlib.ExitStack() as stack:
                if self.bar:
                    from tqdm.auto import tqdm

                    self._tqdm = stack.enter_context(
                        tqdm(total=self.total, desc=desc, unit=unit, leave=False)
                    )
                self.check()
                self._notify()
                yield self
        finally:
            self._depth = 0
            self._tqdm = None


def track(progress: bool | Progress, *, total: int, desc: str, unit: str = "cell") -> Any:
    """Context manager over a long call's work: yields the :class:`Progress` to advance.

    ``progress`` is the call's ``progress=`` argument: ``True`` (a ``tqdm`` bar), ``False``
    (silent) or a :class:`Progress` (followed; inside an outer call, the outer count goes on).
    """
    if isinstance(progress, Progress):
        return progress._follow(total, desc, unit)
    if not isinstance(progress, bool | int):
        raise ConfigError(
            f"progress must be True, False or a cellkit.Progress, got {type(progress).__name__}."
        )
    return Progress(bar=bool(progress))._follow(total, desc, unit)
