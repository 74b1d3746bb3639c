"""Writing result tables to disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import ConfigError, DataError
from .._utils import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["write_csv"]


def write_csv(frame: pd.DataFrame, path: str | os.PathLike[str], *, index: bool = False) -> Path:
    """Write a result table to a CSV file atomically (a temporary file, then a rename).

    An interrupted write leaves the previous file (or none), never half a table.

    Parameters
    ----------
    frame
        The table, e.g. :attr:`cellkit.analysis.InSilicoResult.summary`.
    path
        The file (``~`` is expanded); its folder must exist.
    index
        Also write the row index.

    Returns
    -------
    The file written.

    Raises
    ------
    ConfigError
        For an empty path.
    DataError
        When ``path`` is a folder or its folder does not exist.

    Examples
    --------
    >>> write_csv(res.summary, "perturbation.csv")  # doctest: +SKIP
    """
    text = str(path).strip()
    if not text:
        raise ConfigError("Enter the CSV file path to write (e.g. perturbation.csv).")
    where = Path(text).expanduser()
    if where.is_dir():
        raise DataError(f"{where} is a folder; give a file name such as {where / 'table.csv'}.")
    if not where.parent.is_dir():
        raise DataError(f"The folder {where.parent} does not exist; create it or choose another path.")
    atomic_write_text(where, frame.to_csv(index=index))
    return where
