"""The AnnData contract every cellkit entry point keeps.

Checks shared by every function that takes or writes an AnnData, so that a caller's object and
the results written into it stay trustworthy:

- :func:`check_adata`: refuse, before any work, an AnnData whose ``obs_names`` are not unique
  (cellkit maps results back to cells by name). ``O(n_obs)``, works on backed AnnData (``obs``
  is always in memory).
- :func:`check_keys_free` / :func:`record_written`: never silently replace an ``obs`` /
  ``obsm`` / ``uns`` / ``var`` / … entry that cellkit did not write. Writers take
  ``overwrite=True`` to replace someone else's entry; an entry cellkit wrote itself may be
  replaced freely (re-running a notebook cell works).
- :func:`check_finite_rows` / :func:`finite_embedding`: results that come out non-finite raise
  instead of being written as NaN, and embeddings read back from ``obsm`` are checked.

The registry of what cellkit wrote
----------------------------------
Every time a cellkit function writes results into an AnnData it also records the keys in
``adata.uns["cellkit"]["written"]`` (``{"obs": [...], "obsm": [...], "uns": [...]}``: plain lists
of strings, so the record survives ``write_h5ad`` / ``read_h5ad``, ``adata.copy()`` and
subsetting). Nothing is recorded, and ``uns["cellkit"]`` is not created, by a call that writes
nothing. The record is by name only: an entry the user replaces after cellkit wrote it still
counts as cellkit's (delete the key from the record, or from the AnnData, to protect it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import DataError

__all__ = [
    "REGISTRY_KEY",
    "check_adata",
    "check_finite_rows",
    "check_keys_free",
    "check_obs_names",
    "finite_embedding",
    "record_written",
    "written_keys",
]

#: ``uns`` key of cellkit's record of the entries it wrote
REGISTRY_KEY = "cellkit"
_ATTRS = ("obs", "var", "obsm", "varm", "obsp", "varp", "layers", "uns")


# ----------------------------------------------------------------------------- inputs
def check_obs_names(names: Any, *, what: str) -> None:
    """Refuse non-unique cell names (``O(n)``: one hash pass), naming a few and the fix."""
    import pandas as pd

    index = names if isinstance(names, pd.Index) else pd.Index(np.asarray(names).astype(str))
    if index.is_unique:
        return
    dup = index[index.duplicated()].unique()
    raise DataError(
        f"{what}: the cell names (obs_names) are not unique: {len(dup):,} name(s) occur more than once, e.g. "
        f"{[str(d) for d in dup[:3]]}. cellkit matches cells and results by name; make the names unique first "
        "with adata.obs_names_make_unique()."
    )


def check_adata(adata: Any, *, what: str, allow_other: bool = False) -> None:
    """Refuse what an AnnData entry point cannot use safely, before any work.

    Parameters
    ----------
    adata
        The caller's object (in memory, a view or backed).
    what
        The function's name, for the message (e.g. ``"cellkit.embed_cells"``).
    allow_other
        Let anything that is not an AnnData through unchecked (entry points that also take
        paths or tokens check those themselves).

    Raises
    ------
    DataError
        Not an AnnData (unless ``allow_other``), or ``obs_names`` that are not unique.
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        if allow_other:
            return
        raise DataError(f"{what} takes an AnnData, got {type(adata).__name__}.")
    check_obs_names(adata.obs_names, what=what)


# ----------------------------------------------------------------------------- outputs
def _keys_of(adata: Any, attr: str) -> Iterable[Any]:
    if attr not in _ATTRS:  # pragma: no cover - programming error
        raise ValueError(f"unknown AnnData attribute {attr!r}")
    if attr in ("obs", "var"):
        return getattr(adata, attr).columns
    return getattr(adata, attr).keys()


def written_keys(adata: Any) -> dict[str, set[str]]:
    """``{attribute: keys}`` cellkit recorded as written into ``adata`` (see the module notes)."""
    reg = adata.uns.get(REGISTRY_KEY) if REGISTRY_KEY in adata.uns else None
    if not isinstance(reg, Mapping):
        return {}
    written = reg.get("written")
    if not isinstance(written, Mapping):
        return {}
    out: dict[str, set[str]] = {}
    for attr, keys in written.items():
        if isinstance(keys, str):
            keys = [keys]
        try:
            out[str(attr)] = {str(k) for k in np.asarray(keys, dtype=object).ravel()}
        except (TypeError, ValueError):  # pragma: no cover - a foreign structure: nothing is ours
            continue
    return out


def _check_key(attr: str, key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise DataError(f"key_added must be a non-empty string, got {key!r}.")
    if attr == "uns" and key == REGISTRY_KEY:
        raise DataError(
            f"uns[{REGISTRY_KEY!r}] is where cellkit records the keys it wrote; choose another key_added."
        )
    return key


def check_keys_free(adata: Any, keys: Sequence[tuple[str, str]], *, overwrite: bool, what: str) -> None:
    """Refuse to write over entries cellkit did not write, unless ``overwrite``.

    Call this before any work; it reads ``adata`` only.

    Parameters
    ----------
    adata
        The AnnData the results go into.
    keys
        ``(attribute, key)`` pairs about to be written, e.g. ``[("obsm", "X_cellkit")]``.
    overwrite
        Replace existing entries whoever wrote them.
    what
        The function's name, for the message.

    Raises
    ------
    DataError
        Naming the taken entries and both fixes (another ``key_added``, or ``overwrite=True``).
    """
    keys = [(attr, _check_key(attr, key)) for attr, key in keys]
    reg = adata.uns.get(REGISTRY_KEY) if REGISTRY_KEY in adata.uns else None
    if reg is not None and not isinstance(reg, Mapping):
        raise DataError(
            f"adata.uns[{REGISTRY_KEY!r}] holds a {type(reg).__name__}; cellkit keeps its record of written keys "
            f"there. Rename it (adata.uns['my_key'] = adata.uns.pop({REGISTRY_KEY!r})) and call {what} again."
        )
    if overwrite:
        return
    own = written_keys(adata)
    taken = [
        f"{attr}[{key!r}]"
        for attr, key in keys
        if key in set(map(str, _keys_of(adata, attr))) and key not in own.get(attr, set())
    ]
    if taken:
        raise DataError(
            f"{what} would overwrite {', '.join(taken)}, which cellkit did not write (another method's result or "
            "your data). Pass another key_added=..., or overwrite=True to replace it."
        )


def record_written(adata: Any, keys: Iterable[tuple[str, str]]) -> None:
    """Record in ``adata.uns["cellkit"]["written"]`` that cellkit wrote these ``(attribute, key)`` entries."""
    reg = adata.uns.get(REGISTRY_KEY) if REGISTRY_KEY in adata.uns else None
    reg = dict(reg) if isinstance(reg, Mapping) else {}
    own = written_keys(adata)
    for attr, key in keys:
        own.setdefault(attr, set()).add(str(key))
    reg["written"] = {attr: sorted(ks) for attr, ks in sorted(own.items())}
    adata.uns[REGISTRY_KEY] = reg


# ----------------------------------------------------------------------------- non-finite results
def check_finite_rows(
    x: np.ndarray, *, what: str, names: Sequence[Any] | None = None, skip: np.ndarray | None = None
) -> None:
    """Raise when rows of a result (one per cell) hold NaN or inf.

    Parameters
    ----------
    x
        ``(n_cells, ...)`` result.
    what
        What it is ("embeddings", "class probabilities"), for the message.
    names
        Cell names (for examples in the message).
    skip
        Boolean mask of rows that may be non-finite by design (cells with no vocabulary gene).
    """
    x = np.asarray(x)
    if not len(x):
        return
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if skip is not None:
        bad &= ~np.asarray(skip, dtype=bool)
    if not bad.any():
        return
    examples = "" if names is None else f", e.g. {[str(n) for n in np.asarray(names)[bad][:3]]}"
    raise DataError(
        f"The {what} of {int(bad.sum()):,} of {len(x):,} cells came out NaN or infinite{examples}; nothing was "
        "written. Likely causes: non-finite input values (check the expression matrix for NaN / inf) or a model "
        "whose weights diverged during fine-tuning (lower the learning rate, use amp=None, or reload the last "
        "good checkpoint)."
    )


def finite_embedding(x: Any, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """An ``obsm`` embedding as float32 and the mask of its usable rows.

    Rows that are entirely NaN are cells left out on purpose (``embed_cells(cells=...)`` or
    ``on_empty="nan"``) and are masked; any other non-finite value is an error.

    Raises
    ------
    DataError
        For infinite values or rows that are only partly NaN.
    """
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise DataError(f"{what} must be a 2-D (cells × dimensions) array, got shape {arr.shape}.")
    nan = np.isnan(arr)
    missing = nan.all(axis=1) if arr.shape[1] else np.zeros(len(arr), dtype=bool)
    broken = ~missing & ~np.isfinite(arr).all(axis=1)
    if broken.any():
        raise DataError(
            f"{what} has non-finite values (inf, or NaN in part of a row) in {int(broken.sum()):,} cells; rows that "
            "are entirely NaN are treated as cells left out, anything else is a broken embedding. Recompute it "
            "(cellkit.embed_cells) or drop those cells."
        )
    return arr, ~missing
