from __future__ import annotations

import importlib
from types import ModuleType

from cellkit._errors import MissingDependencyError


def require(module: str, *, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import an optional dependency or raise :class:`MissingDependencyError` naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" for {purpose}" if purpose else ""
        hint = f'pip install "cellkit[{extra}]"' if extra else f"pip install {module.split('.')[0]}"
        raise MissingDependencyError(
            f"{module!r} is needed{what} but is not installed; install it with `{hint}`."
        ) from exc
