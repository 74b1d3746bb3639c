"""Compiled (numba) kernels for the per-cell hot loops of the tokenizers.

They compute exactly what the numpy reference implementations in :mod:`.scgpt` compute — same
float32/float64 operation order, same hash — row-parallel over the cells of a block. Tests check
them against the numpy versions and against scGPT's own output. numba comes with scanpy.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["bin_rows", "sample_keep"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


@numba.njit(cache=True, inline="always")
def _mix(x):
    z = x + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def _uniform(seed_mixed, key1, key2):
    # == cellkit.data._hashing.uniform_hash(seed, key1, key2)
    h = _mix(_mix(seed_mixed ^ key1) ^ key2)
    return np.float64(h >> np.uint64(11)) * (2.0**-53)


@numba.njit(parallel=True, cache=True)
def bin_rows(
    data, indptr, q, u, use_hash, seed_mixed, row_keys, token_keys, out
):  # pragma: no cover - compiled
    """scGPT binning of CSR rows; ``u`` (len T) or, with ``use_hash``, per-(cell, gene) hashes."""
    n_rows = indptr.shape[0] - 1
    n_edges = q.shape[0]
    for r in numba.prange(n_rows):
        a = indptr[r]
        b = indptr[r + 1]
        n = b - a
        if n == 0:
            continue
        s = np.sort(data[a:b])
        edges = np.empty(n_edges, dtype=np.float64)
        for j in range(n_edges):
            virtual = (n - 1) * q[j]
            if virtual >= n - 1:
                lo = s[n - 1]
                hi = s[n - 1]
                gamma = virtual + 1.0
            else:
                prev = np.floor(virtual)
                pi = np.int64(prev)
                lo = s[pi]
                hi = s[pi + 1]
                gamma = virtual - prev
            diff = hi - lo
            if gamma >= 0.5:
                edges[j] = hi - diff * (1.0 - gamma)
            else:
                edges[j] = lo + diff * gamma
        for t in range(a, b):
            x = np.float64(data[t])
            left = np.searchsorted(edges, x, side="right")
            right = np.searchsorted(edges, x, side="left")
            if use_hash:
                ut = _uniform(seed_mixed, row_keys[r], token_keys[t])
            else:
                ut = u[t]
            out[t] = np.int64(np.ceil(ut * (right - left) + left))


@numba.njit(parallel=True, cache=True)
def sample_keep(
    offsets, token_keys, row_keys, seed_mixed, max_len, first, keep
):  # pragma: no cover - compiled
    """Mark, per too-long row, the first ``first`` tokens and the ``max_len - first`` smallest hashes."""
    n_rows = offsets.shape[0] - 1
    for r in numba.prange(n_rows):
        a = offsets[r]
        b = offsets[r + 1]
        if b - a <= max_len:
            continue
        m = b - a - first
        h = np.empty(m, dtype=np.float64)
        for t in range(m):
            h[t] = _uniform(seed_mixed, row_keys[r], token_keys[a + first + t])
        k = max_len - first
        # the k smallest hashes; equal hashes (a gene listed twice) are taken in column order
        threshold = np.partition(h, k - 1)[k - 1]
        below = 0
        for t in range(m):
            if h[t] < threshold:
                below += 1
        room = k - below
        for t in range(m):
            if h[t] < threshold:
                keep[a + first + t] = True
            elif h[t] == threshold and room > 0:
                keep[a + first + t] = True
                room -= 1
            else:
                keep[a + first + t] = False
