"""What every panel shares: the state, a message line, error capture, background jobs.

A panel is an ``ipywidgets.VBox`` whose logic lives in plain methods (``load()``, ``run()``, ...)
that tests call directly; buttons only call those methods. Errors never escape a callback: a
:class:`cellkit.CellkitError` shows its message (it says what was wrong and how to fix it), any
other exception shows its type and message with the traceback folded away, and the panel stays
usable. An error that names the option it is about (``exc.param``) shows on the error line the
panel placed beside that option's control (:meth:`Panel.error_line`), with option names in the
panel's words; every new action clears the old error messages.
"""

from __future__ import annotations

import functools
import html
import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import ipywidgets as widgets

from cellkit import CellkitError

from ._state import StudioState

__all__ = ["Panel", "guarded"]

log = logging.getLogger("cellkit.widgets")
F = TypeVar("F", bound=Callable[..., Any])

_STYLE = {
    "info": "color:#1f4e79;background:#eef5fc;border-left:4px solid #1f77b4",
    "ok": "color:#1b5e20;background:#edf7ee;border-left:4px solid #2ca02c",
    "warning": "color:#6d4c00;background:#fff8e1;border-left:4px solid #ff9800",
    "error": "color:#8b0000;background:#fdecea;border-left:4px solid #d62728",
}


def guarded(fn: F) -> F:
    """Decorator for panel actions: exceptions become a message in the panel, never a dead widget.

    The wrapped method still returns its value; on error it returns ``None`` and the exception is
    kept in ``panel.last_error`` (tests assert on it).
    """

    @functools.wraps(fn)
    def wrapper(self: Panel, *args: Any, **kwargs: Any) -> Any:
        try:
            self.last_error = None
            self.clear_errors()  # a new action: old error messages go
            return fn(self, *args, **kwargs)
        except Exception as exc:
            self.show_error(exc)
            return None

    return wrapper  # type: ignore[return-value]


class Panel(widgets.VBox):
    """Base class of the studio's panels.

    Parameters
    ----------
    state
        The shared :class:`StudioState`; a fresh one when the panel is used alone.
    """

    #: tab title in the studio
    title: str = "Panel"

    def __init__(self, state: StudioState | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state if state is not None else StudioState()
        self.last_error: BaseException | None = None
        self.message = widgets.HTML(value="", layout=widgets.Layout(width="100%"))
        self.message.add_class("cellkit-message")
        self.add_class("cellkit-panel")
        self._job: threading.Thread | None = None
        #: option name (an error's ``param``) -> (its inline error line, the control's label)
        self._error_lines: dict[str, tuple[widgets.HTML, str]] = {}
        #: how the panel names options it has no error line for (``val_size`` -> "Validation fraction")
        self.option_words: dict[str, str] = {}
        self._fixes: dict[str, str] = {}
        # an error about the old data or model is stale once new ones arrive
        self.state.observe(lambda _change: self.clear_errors(), names=["adata", "model"])

    # -- messages
    def show_message(self, text: str, kind: str = "info", *, details: str | None = None) -> None:
        """Show ``text`` (plain text; escaped) in the panel's message line.

        ``kind`` is ``"info"``, ``"ok"``, ``"warning"`` or ``"error"``; ``details`` (e.g. a
        traceback) is folded under a "details" toggle.
        """
        body = html.escape(str(text)).replace("\n", "<br>")
        extra = ""
        if details:
            extra = (
                "<details style='margin-top:4px'><summary>details</summary>"
                f"<pre style='white-space:pre-wrap;font-size:11px'>{html.escape(details)}</pre></details>"
            )
        style = _STYLE.get(kind, _STYLE["info"])
        self.message.value = (
            f"<div class='cellkit-msg cellkit-{kind}' style='{style};padding:4px 8px;margin:4px 0'>"
            f"{body}{extra}</div>"
        )

    def clear_message(self) -> None:
        self.message.value = ""

    def error_line(self, param: str, label: str, *, fix: str | None = None) -> widgets.HTML:
        """An (empty) error line for the control of option ``param``; place it next to that control.

        An error whose ``param`` is ``param`` (see :class:`cellkit.CellkitError`) shows there instead
        of in the banner, with ``label`` (the control's words) in place of the option's name; ``fix``
        (the panel's own words) replaces the API's advice when the error states its ``problem``.
        """
        line = widgets.HTML(value="", layout=widgets.Layout(width="100%"))
        line.add_class("cellkit-inline-error")
        line.add_class(f"cellkit-error-{param}")
        self._error_lines[param] = (line, label)
        self.describe_option(param, label, fix=fix)
        return line

    def describe_option(self, param: str, label: str, *, fix: str | None = None) -> None:
        """Name option ``param`` by its control's ``label`` in messages; ``fix``: the panel's advice.

        An error about ``param`` that states its ``problem`` shows that problem and ``fix`` (the
        panel's words) instead of the API's advice (which may name parameters the panel lacks).
        """
        self.option_words[param] = label
        if fix:
            self._fixes[param] = fix

    def clear_errors(self) -> None:
        """Empty every inline error line, and the banner where it shows an error."""
        for line, _label in self._error_lines.values():
            line.value = ""
        if "cellkit-error" in self.message.value:
            self.message.value = ""

    def place_error(self, exc: BaseException) -> bool:
        """Show ``exc`` in the error line of its ``param``, if the panel has one; whether it did."""
        param = getattr(exc, "param", None)
        if not isinstance(exc, CellkitError) or param not in self._error_lines:
            return False
        body = html.escape(self.in_panel_words(exc)).replace("\n", "<br>")
        self._error_lines[param][0].value = (
            f"<div class='cellkit-msg cellkit-error' style='{_STYLE['error']};padding:2px 8px;margin:2px 0'>"
            f"{body}</div>"
        )
        return True

    def in_panel_words(self, exc: BaseException) -> str:
        """The message of ``exc`` as the panel says it: option names become the controls' labels.

        An error that states its ``problem`` separately gets the panel's own fix for its control
        (given to :meth:`error_line`) instead of the API's advice.
        """
        import re

        param, problem = getattr(exc, "param", None), getattr(exc, "problem", None)
        fix = self._fixes.get(param) if param else None
        text = f"{problem} {fix}" if problem and fix else str(exc)
        for name, label in self.option_words.items():
            text = re.sub(rf"\b{re.escape(name)}=\.\.\.", f"“{label}”", text)
            text = re.sub(rf"\b{re.escape(name)}=", f"“{label}” = ", text)
            if "_" in name:  # an identifier such as batch_key (a plain word like cells stays)
                text = re.sub(rf"\b{re.escape(name)}\b", f"“{label}”", text)
        return text

    def show_error(self, exc: BaseException) -> None:
        """Show an exception as a readable message (and log it).

        A :class:`cellkit.CellkitError` whose ``param`` has an :meth:`error_line` shows there, next
        to its control, in the panel's words (:meth:`in_panel_words`); the banner then points to it.
        Other errors show in the banner.
        """
        self.last_error = exc
        self.clear_errors()
        if self.place_error(exc):
            label = self._error_lines[exc.param][1]  # type: ignore[attr-defined]
            self.show_message(f"See the message under “{label}”.", "error")
            log.info("%s: %s", type(self).__name__, exc)
        elif isinstance(exc, CellkitError):
            self.show_message(self.in_panel_words(exc), "error")
            log.info("%s: %s", type(self).__name__, exc)
        else:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.show_message(f"Unexpected error — {type(exc).__name__}: {exc}", "error", details=tb)
            log.warning("%s failed:\n%s", type(self).__name__, tb)

    def error_text(self, param: str) -> str:
        """The inline error line of option ``param`` as plain text (for tests); ``""`` when empty."""
        import re

        line = self._error_lines[param][0]
        return html.unescape(re.sub(r"<[^>]+>", "", line.value.replace("<br>", "\n")))

    @property
    def message_text(self) -> str:
        """The message line as plain text (for tests)."""
        import re

        return (
            html.unescape(re.sub(r"<details.*?</details>", "", self.message.value, flags=re.S))
            .replace("<br>", "\n")
            .split(">", 1)[-1]
            .rsplit("</div>", 1)[0]
        )

    # -- background work
    @property
    def running(self) -> bool:
        """Whether this panel's background job is still running."""
        return self._job is not None and self._job.is_alive()

    def run_in_background(
        self,
        fn: Callable[[], Any],
        *,
        name: str,
        on_done: Callable[[Any], None] | None = None,
    ) -> threading.Thread:
        """Run ``fn`` in a daemon thread so the notebook stays usable.

        ``on_done(result)`` runs in that thread after success; an exception becomes the panel's
        error message. ``state.busy`` names the job while it runs. :meth:`wait` joins it.
        """
        if self.running:
            from cellkit import CellkitError as _E

            raise _E(f"{self.title}: a job is already running; wait for it or stop it first.")

        def target() -> None:
            self.state.busy = name
            try:
                result = fn()
                if on_done is not None:
                    on_done(result)
            except Exception as exc:
                self.show_error(exc)
            finally:
                self.state.busy = ""

        self._job = threading.Thread(target=target, name=f"cellkit-{name}", daemon=True)
        self._job.start()
        return self._job

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background job (if any) ends (for tests and scripts)."""
        if self._job is not None:
            self._job.join(timeout)


def plural(count: int, word: str) -> str:
    """``1 step``, ``3 steps``, ``1,024 cells``."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def labelled(text: str, widget: widgets.Widget, width: str = "130px") -> widgets.HBox:
    """``text`` to the left of ``widget`` (a compact form row)."""
    return widgets.HBox([widgets.Label(text, layout=widgets.Layout(width=width)), widget])


def html_table(frame: Any, *, max_rows: int = 50, float_format: str = "{:.3g}") -> str:
    """A small pandas DataFrame as an HTML table (escaped, numbers formatted), each column once.

    Every fact shows once and the header is one row: an unnamed integer index (row positions, e.g.
    a default ``RangeIndex``) is left out; an index named like a column holding the same values is
    left out (the column shows it); any other named index becomes the first column, under its name.
    A missing value (``NaN``, e.g. a p-value without a null distribution) shows as "–". The table
    sits in a ``div`` that scrolls sideways (``overflow-x: auto``) when it is wider than the panel.
    """
    import pandas as pd

    frame = _one_header(pd.DataFrame(frame).head(max_rows))
    show_index = frame.index.name is None and not pd.api.types.is_integer_dtype(frame.index.dtype)
    table = frame.to_html(
        classes="cellkit-table",
        border=0,
        float_format=lambda v: float_format.format(v),
        na_rep="–",
        escape=True,
        index=show_index,
    )
    # a wide table scrolls inside its panel instead of overflowing it
    return f"<div class='cellkit-table-scroll' style='max-width:100%;overflow-x:auto'>{table}</div>"


def _one_header(frame: Any) -> Any:
    """``frame`` with a named index turned into leading columns (dropped where a column repeats it)."""
    frame = frame.copy(deep=False)
    frame.columns = [str(c) for c in frame.columns]  # no column-axis name row in the header
    names = [n for n in frame.index.names if n is not None]
    if not names:
        return frame
    if len(names) == 1 and frame.index.nlevels == 1 and str(names[0]) in frame.columns:
        same = frame[str(names[0])].astype(str).to_numpy() == frame.index.astype(str).to_numpy()
        if same.all():
            return frame.reset_index(drop=True)
        frame.index = frame.index.rename(f"{names[0]} (index)")
    return frame.reset_index()
