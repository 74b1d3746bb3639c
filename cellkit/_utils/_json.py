"""One bounded JSON reader for every JSON file cellkit reads.

``json.loads(path.read_text())`` on a file from somewhere else can read a named pipe forever, load
gigabytes, or recurse until Python gives up (``RecursionError``). :func:`read_json` reads only
regular files up to ``max_bytes``, refuses nesting deeper than ``max_depth`` (checked without
recursion, before parsing), standard-JSON only (no ``NaN`` / ``Infinity``, no repeated keys), and
turns every failure into the caller's :class:`cellkit.CellkitError` subclass naming the file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from .._errors import CellkitError, DataError

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "parse_json", "read_json"]

#: default size limit of a JSON file (bytes); vocabularies of ~100k genes take a few MB
MAX_JSON_BYTES = 64 * 1024 * 1024
#: default nesting limit: cellkit's own files nest at most a handful of levels
MAX_JSON_DEPTH = 32

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def read_json(
    path: str | os.PathLike[str],
    *,
    what: str = "JSON file",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    expect: type | tuple[type, ...] | None = None,
    error: type[CellkitError] = DataError,
) -> Any:
    """Parse a JSON file in time and memory proportional to its size.

    Parameters
    ----------
    path
        The file.
    what
        What the file is, for messages (``"vocabulary"``, ``"model config"`` …).
    max_bytes
        Largest accepted file size.
    max_depth
        Deepest accepted nesting of arrays / objects.
    expect
        The type(s) the top-level value must have (e.g. ``dict``); ``None`` accepts any.
    error
        The :class:`cellkit.CellkitError` subclass raised.

    Returns
    -------
    The parsed value (``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` or ``None``).

    Raises
    ------
    error
        Missing file, not a regular file, larger than ``max_bytes``, not UTF-8, not valid
        standard JSON, nested deeper than ``max_depth``, a key repeated in one object, or a
        top-level value of the wrong type. The message names the file.
    """
    path = Path(path)
    label = f"{what} {path}"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"The {label} does not exist.") from None
    except OSError as exc:
        raise error(f"Cannot read the {label} ({exc.strerror or exc}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"The {label} is not a regular file.")
    if st.st_size > max_bytes:
        raise error(f"The {label} is {st.st_size:,} bytes; at most {max_bytes:,} are read.")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(st.st_size + 1)  # +1: notice a file that grew since stat
    except OSError as exc:
        raise error(f"Cannot read the {label} ({exc.strerror or exc}).") from None
    if len(raw) > max_bytes:
        raise error(f"The {label} is larger than {max_bytes:,} bytes.")
    return _parse(raw, label=label, max_depth=max_depth, expect=expect, error=error)


def parse_json(
    data: str | bytes,
    *,
    what: str = "JSON text",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    expect: type | tuple[type, ...] | None = None,
    error: type[CellkitError] = DataError,
) -> Any:
    """Parse JSON text held in memory with the limits and checks of :func:`read_json`.

    For JSON that does not come from a file (a config string, a command-line value); ``what``
    names it in messages.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise error(f"The {what} is {len(raw):,} bytes; at most {max_bytes:,} are read.")
    return _parse(raw, label=what, max_depth=max_depth, expect=expect, error=error)


def _parse(
    raw: bytes,
    *,
    label: str,
    max_depth: int,
    expect: type | tuple[type, ...] | None,
    error: type[CellkitError],
) -> Any:
    depth = _depth(raw)
    if depth > max_depth:
        raise error(
            f"The {label} nests arrays/objects {depth} levels deep; at most {max_depth} are accepted."
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"The {label} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise error(
            f"The {label} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
        ) from None
    except _JSONValueError as exc:
        raise error(f"The {label} is not standard JSON: {exc}.") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise error(f"The {label} cannot be parsed ({type(exc).__name__}: {str(exc)[:200]}).") from None
    if expect is not None and not isinstance(value, expect):
        kinds = {dict: "a JSON object", list: "a JSON array"}
        want = " or ".join(
            kinds.get(t, t.__name__) for t in (expect if isinstance(expect, tuple) else (expect,))
        )
        raise error(f"The {label} holds {_kind(value)} at the top level; expected {want}.")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _depth(raw: bytes) -> int:
    """Deepest bracket nesting outside strings (one linear pass, no recursion)."""
    depth = best = 0
    for m in _BRACKETS.finditer(_STRING.sub(b'""', raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            best = max(best, depth)
        else:
            depth -= 1
    return best


class _JSONValueError(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _JSONValueError(f"{name} is not a JSON value (write a number or null)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _JSONValueError(f"the key {dup!r} appears more than once in one object")
    return out
