"""Strict state-dict transfer: every tensor accounted for, every shape checked."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from cellkit._errors import CheckpointError

__all__ = ["load_state_strict"]


def _fmt(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    allow_missing: Iterable[str] = (),
    assign: bool = False,
) -> None:
    """Copy ``state`` into ``module``; raise :class:`CheckpointError` on any mismatch.

    Parameters
    ----------
    module
        Target module.
    state
        Tensors keyed by the module's own parameter/buffer names.
    source
        File or directory named in error messages.
    allow_missing
        Keys the caller knows are absent on purpose (tied aliases, freshly created heads).
    assign
        Make the given tensors the module's parameters (no copy; for modules built on the meta
        device).
    """
    expected = module.state_dict()
    allow = set(allow_missing)
    missing = set(expected) - set(state) - allow
    unexpected = set(state) - set(expected)
    wrong = {
        k: (tuple(state[k].shape), tuple(expected[k].shape))
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    }
    problems = []
    if missing:
        problems.append(f"missing tensors: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_fmt(unexpected)}")
    if wrong:
        shown = sorted(wrong.items())[:12]
        problems.append(
            "wrong shapes: " + ", ".join(f"{k} is {a} but the model needs {b}" for k, (a, b) in shown)
        )
    if problems:
        raise CheckpointError(
            f"{source}: the weights do not match the model architecture ({'; '.join(problems)}). "
            "The file is corrupt, incomplete, or its config does not describe these weights."
        )
    module.load_state_dict(dict(state), strict=False, assign=assign)
