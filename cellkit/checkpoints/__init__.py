"""The edge of cellkit: the only code that knows file layouts and foreign key names."""

from __future__ import annotations

from .keymap import load_state_strict
from .native import is_native, read_native, write_native

__all__ = ["is_native", "load_state_strict", "read_native", "write_native"]
