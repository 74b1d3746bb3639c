"""A panel whose buttons follow its background job: one phase at a time ("idle" or a job's name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cellkit import ConfigError

from ._base import Panel
from ._state import StudioState

__all__ = ["JobPanel"]


class JobPanel(Panel):
    """Base of the perturbation panels: :meth:`_set_phase` enables the buttons for the phase.

    Subclasses implement :meth:`_update_buttons`; :meth:`_in_background` runs a job with the
    buttons in its phase and back to ``"idle"`` when it ends, whatever happens.
    """

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.phase = "idle"

    def _update_buttons(self) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _set_phase(self, phase: str) -> None:
        """Enable / disable the buttons for ``phase``."""
        self.phase = phase
        self._update_buttons()

    def _check_idle(self) -> None:
        if self.running:
            doing = {"training": "training", "stopping": "stopping"}.get(self.phase, "computing")
            raise ConfigError(
                f"The {self.title} panel is busy ({doing}); wait for it to finish"
                + (" or click “Stop”." if doing == "training" else ".")
            )

    def _in_background(
        self,
        fn: Callable[[], Any],
        *,
        name: str,
        phase: str,
        on_done: Callable[[Any], None],
        on_error: Callable[[], None] | None = None,
    ) -> None:
        """Run ``fn`` in the panel's background thread; the buttons follow ``phase`` until it ends."""

        def work() -> Any:
            try:
                return fn()
            except BaseException:
                (on_error or (lambda: self._set_phase("idle")))()
                raise

        def done(result: Any) -> None:
            try:
                on_done(result)
            finally:
                self._set_phase("idle")

        self._set_phase(phase)
        try:
            self.run_in_background(work, name=name, on_done=done)
        except BaseException:
            self._set_phase("idle")
            raise
