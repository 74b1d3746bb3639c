"""The cellkit exception hierarchy.

Every error cellkit raises on purpose derives from :class:`CellkitError`, so a notebook or a
widget can catch one type and show its message. Messages say what was wrong *and* how to fix it.
Subclasses also derive from the closest built-in type (``ValueError``, ``KeyError``-like lookups
use ``LookupError``, ``ImportError``) so generic ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "CellkitError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "UnknownGeneError",
    "VocabError",
]


class CellkitError(Exception):
    """Base class of every error cellkit raises deliberately.

    Parameters
    ----------
    *args
        The message (what was wrong and how to fix it; it may name the function's parameters).
    param
        The name of the option (parameter) that caused the error, where one did, e.g.
        ``"label_key"``: a user interface shows the message next to its control for that option.
    problem
        What was wrong, in words free of parameter names (no fix); ``None`` when the message has
        no separate statement of the problem. A user interface pairs it with a fix in its own words.
    """

    def __init__(self, *args: object, param: str | None = None, problem: str | None = None) -> None:
        super().__init__(*args)
        self.param = param
        self.problem = problem


class ConfigError(CellkitError, ValueError):
    """An invalid configuration value or an unsupported option."""


class CheckpointError(CellkitError):
    """A checkpoint directory or file that cannot be read as asked."""


class VocabError(CellkitError, ValueError):
    """A malformed gene vocabulary (gaps, duplicates, wrong size, missing specials)."""


class UnknownGeneError(CellkitError, LookupError):
    """A gene or token that is not in the vocabulary."""

    def __str__(self) -> str:  # LookupError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(CellkitError, ValueError):
    """Input data (arrays, AnnData, tokens) that cannot be used as given."""


class MissingDependencyError(CellkitError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""


class Cancelled(CellkitError):
    """A long call stopped because its :class:`cellkit.Progress` was cancelled.

    Nothing is written into the AnnData (results are stored only when a call ends normally).
    """
