"""Counter-based randomness: a vectorised hash from integer keys to uniform floats.

cellkit draws the randomness of data augmentation (masking, shuffling inside a cell) from a hash of
*what* is being decided rather than from a stream of a generator. The draw for a position of a
cell is ``uniform_hash(seed, epoch, cell_key, position)``: it depends only on those keys, so the
same cell gets the same mask whatever batch it lands in, in whatever order, on whatever number of
DataLoader workers or ranks. A stream generator (``np.random``, ``torch.Generator``) cannot
promise that, because the draws a cell gets depend on how many draws came before it.

The mixer is splitmix64 (Steele, Lea & Flood 2014) in wrapping ``uint64`` numpy arithmetic, which
is exact and identical on every platform numpy runs on. Keys are folded in one after another
(``h = mix(h ^ key)``), so every key changes every output bit with probability about one half.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

__all__ = ["cell_key", "hash64", "uniform_hash"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
_TO_UNIT = 2.0**-53


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of ``x + gamma`` (elementwise, wrapping ``uint64``)."""
    z = x + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def _as_u64(key: np.ndarray | int) -> np.ndarray:
    """Reinterpret an integer key (any signed/unsigned dtype, or a Python int) as ``uint64``."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return np.asarray(int(key) & _MASK64, dtype=np.uint64)
    arr = np.asarray(key)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype.kind not in "iub":
        raise TypeError(f"hash keys must be integers, got an array of dtype {arr.dtype}")
    # two's complement: -1 -> 2**64 - 1, the same on every platform
    return arr.astype(np.int64).astype(np.uint64) if arr.dtype.kind == "i" else arr.astype(np.uint64)


def hash64(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Mix ``seed`` and integer ``keys`` into 64-bit hashes.

    Parameters
    ----------
    seed
        Any integer (negative values wrap modulo ``2**64``).
    *keys
        Integers or integer arrays; arrays broadcast against each other.

    Returns
    -------
    ``uint64`` array with the broadcast shape of the keys (0-d when all keys are scalars).
    """
    with np.errstate(over="ignore"):
        h = _mix(_as_u64(seed))
        for key in keys:
            h = _mix(h ^ _as_u64(key))
    return h


def uniform_hash(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in ``[0, 1)`` that are a pure function of ``seed`` and ``keys``.

    Parameters
    ----------
    seed
        Any integer.
    *keys
        Integers or integer arrays that name the draw, e.g. ``(epoch, cell_key, position)``; arrays
        broadcast (``cell_keys[:, None]`` with ``positions[None, :]`` gives a ``(B, L)`` grid).

    Returns
    -------
    ``float64`` array with the broadcast shape of the keys; each value is a multiple of ``2**-53``.

    Examples
    --------
    >>> u = uniform_hash(0, 3, np.arange(4))
    >>> u.shape, bool(((u >= 0) & (u < 1)).all())
    ((4,), True)
    >>> bool((uniform_hash(0, 3, np.arange(4)) == u).all())
    True
    """
    return (hash64(seed, *keys) >> np.uint64(11)).astype(np.float64) * _TO_UNIT


def cell_key(names: Iterable[str] | np.ndarray | str) -> np.ndarray:
    """Stable 64-bit keys of cell names (BLAKE2b of the UTF-8 name, first 8 bytes, little-endian).

    Parameters
    ----------
    names
        ``(n,)`` cell names (anything ``str()`` accepts), or one name.

    Returns
    -------
    ``(n,)`` ``uint64`` (0-d for a single name). The same name always gives the same key, on any
    machine and in any process (unlike Python's salted ``hash``).
    """
    if isinstance(names, str):
        return np.asarray(_key_of(names), dtype=np.uint64)
    return np.fromiter((_key_of(str(n)) for n in np.asarray(names).ravel()), dtype=np.uint64)


def _key_of(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
