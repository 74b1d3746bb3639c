"""Helpers shared by every layer. Imports nothing from the rest of cellkit except the errors."""

from __future__ import annotations

from ._io import atomic_path, atomic_write_bytes, atomic_write_text
from ._json import read_json
from ._log import get_logger
from ._optional import require

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "get_logger", "read_json", "require"]
