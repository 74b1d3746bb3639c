from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``cellkit.<name>`` (library code never configures handlers)."""
    if not name.startswith("cellkit"):
        name = f"cellkit.{name}"
    return logging.getLogger(name)
