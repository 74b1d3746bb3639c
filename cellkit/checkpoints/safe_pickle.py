"""A restricted unpickler for Geneformer's dictionary ``.pkl`` files.

Pickle can run arbitrary code on load; these files come from the internet. This unpickler admits
only plain containers and scalars: ``dict``, ``list``, ``tuple``, ``set``, ``str``, ``bytes``,
``int``, ``float``, ``bool``, ``None`` and numpy scalars (``numpy.int16``, ``numpy.float64``, ...,
which Geneformer's V1 dictionaries contain). Any other global — ``os.system``, ``builtins.eval``,
an arbitrary class — is refused before it can be called.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cellkit._errors import CheckpointError

__all__ = ["safe_load_pickle"]

_NUMPY_SCALARS = {
    name
    for name in (
        "bool_",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "str_",
    )
    if hasattr(np, name)
}
_ALLOWED_BUILTINS = {
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "str",
    "bytes",
    "int",
    "float",
    "bool",
    "complex",
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _ALLOWED_BUILTINS:
            return getattr(__import__("builtins"), name)
        # numpy scalars are pickled as numpy.core.multiarray.scalar(dtype, bytes) + dtype(...)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _checked_scalar
        if module == "numpy" and name == "dtype":
            return _checked_dtype
        if module == "numpy" and name in _NUMPY_SCALARS:
            return getattr(np, name)
        if module == "_codecs" and name == "encode":  # protocol-2 pickles store bytes this way
            return _latin1_encode
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode outside the latin1 bytes idiom")
    return text.encode("latin1")


def _checked_dtype(spec: Any, *args: Any) -> np.dtype:
    dt = np.dtype(spec, *args)
    if dt.kind not in "biufcUS" or dt.fields is not None:
        raise pickle.UnpicklingError(f"refused numpy dtype {dt!r}")
    return dt


def _checked_scalar(dtype: np.dtype, data: bytes = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufcUS" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("refused numpy scalar of a non-plain dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` admitting only plain containers, scalars and numpy scalars.

    Raises
    ------
    CheckpointError
        If the file is missing, corrupt, or references anything else (e.g. code to execute).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused by cellkit's safe unpickler ({exc}). Geneformer dictionaries hold only "
            "dicts of strings and numbers; this file contains something else and was not executed."
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CheckpointError(
            f"{path} is not a readable pickle ({type(exc).__name__}: {exc}); it is truncated or corrupt."
        ) from None
