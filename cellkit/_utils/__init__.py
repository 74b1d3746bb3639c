"""Helpers shared by every layer. Imports nothing from the rest of cellkit except the errors."""

from __future__ import annotations

from ._io import (
    AtomicDirectory,
    atomic_directory,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    ensure_writable_dir,
    fsync_dir,
    recover_directory,
)
from ._json import parse_json, read_json
from ._log import get_logger
from ._optional import require
from ._progress import Progress, track

__all__ = [
    "AtomicDirectory",
    "Progress",
    "atomic_directory",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "ensure_writable_dir",
    "fsync_dir",
    "get_logger",
    "parse_json",
    "read_json",
    "recover_directory",
    "require",
    "track",
]
