"""Compiled (numba) kernels for the per-cell hot loops of the tokenizers.

They compute exactly what the numpy reference implementations in :mod:`.scgpt` compute — same
float32/float64 operation order, same hash — row-parallel over the cells of a block. Tests check
them against the numpy versions and against scGPT's own output. numba comes with scanpy.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

__all__ = ["KERNEL_LOCK", "bin_rows", "sample_compact"]

#: numba's default ("workqueue") threading layer must not be entered from two threads at once
#: (e.g. the studio tokenizing in a background thread while a notebook cell does too)
KERNEL_LOCK = threading.Lock()

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
#: integer-valued rows whose maximum is at most this use a counting sort
_COUNTING_LIMIT = 65536.0


@numba.njit(cache=True, inline="always")
def _mix(x):
    z = x + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


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
        inner = _mix(seed_mixed ^ row_keys[r])  # the per-cell part of uniform_hash(seed, cell, gene)
        # small non-negative integers (raw counts): a counting sort instead of a comparison sort
        top = 0.0
        integral = True
        for t in range(a, b):
            v = data[t]
            if v > top:
                top = v
            if v != np.floor(v) or v < 0:
                integral = False
        counting = integral and top <= _COUNTING_LIMIT
        if counting:
            m = np.int64(top)
            cum = np.zeros(m + 1, dtype=np.int64)
            for t in range(a, b):
                cum[np.int64(data[t])] += 1
            for v in range(1, m + 1):
                cum[v] += cum[v - 1]  # cum[v] = number of values <= v
            s = np.empty(0, dtype=data.dtype)
        else:
            s = np.sort(data[a:b])
        edges = np.empty(n_edges, dtype=np.float64)
        for j in range(n_edges):
            virtual = (n - 1) * q[j]
            if virtual >= n - 1:
                pi = n - 1
                ni = n - 1
                gamma = virtual + 1.0
            else:
                prev = np.floor(virtual)
                pi = np.int64(prev)
                ni = pi + 1
                gamma = virtual - prev
            if counting:  # the value at sorted position p is the smallest v with cum[v] > p
                lo = data.dtype.type(np.searchsorted(cum, pi, side="right"))
                hi = data.dtype.type(np.searchsorted(cum, ni, side="right"))
            else:
                lo = s[pi]
                hi = s[ni]
            diff = hi - lo
            if gamma >= 0.5:
                edges[j] = hi - diff * (1.0 - gamma)
            else:
                edges[j] = lo + diff * gamma
        if counting:  # left/right once per distinct value
            left_of = np.empty(m + 1, dtype=np.int64)
            right_of = np.empty(m + 1, dtype=np.int64)
            for v in range(m + 1):
                if (cum[v] - (cum[v - 1] if v > 0 else 0)) > 0:
                    left_of[v] = np.searchsorted(edges, np.float64(v), side="right")
                    right_of[v] = np.searchsorted(edges, np.float64(v), side="left")
        for t in range(a, b):
            x = np.float64(data[t])
            if counting:
                left = left_of[np.int64(data[t])]
                right = right_of[np.int64(data[t])]
            else:
                left = np.searchsorted(edges, x, side="right")
                right = np.searchsorted(edges, x, side="left")
            if use_hash:
                ut = np.float64(_mix(inner ^ token_keys[t]) >> np.uint64(11)) * (2.0**-53)
            else:
                ut = u[t]
            out[t] = np.int64(np.ceil(ut * (right - left) + left))


@numba.njit(parallel=True, cache=True)
def sample_compact(
    offsets, ids, vals, row_keys, seed_mixed, max_len, first, new_offsets, out_ids, out_vals
):  # pragma: no cover
    """Keep, per row longer than ``max_len``, the first ``first`` tokens and the ``max_len - first``
    tokens with the smallest ``uniform_hash(seed, cell key, token id)`` (equal hashes in column
    order), writing the kept tokens of every row, in their order, to ``out_ids``/``out_vals``."""
    n_rows = offsets.shape[0] - 1
    for r in numba.prange(n_rows):
        a = offsets[r]
        b = offsets[r + 1]
        o = new_offsets[r]
        if b - a <= max_len:
            for t in range(a, b):
                out_ids[o + t - a] = ids[t]
                out_vals[o + t - a] = vals[t]
            continue
        m = b - a - first
        # uniform_hash(seed, cell key, token) is monotone in this 64-bit hash (the uniform is its top
        # 53 bits): compare hashes directly, with the per-cell part of the mix computed once
        inner = _mix(seed_mixed ^ row_keys[r])
        h = np.empty(m, dtype=np.uint64)
        for t in range(m):
            h[t] = _mix(inner ^ np.uint64(ids[a + first + t])) >> np.uint64(11)
        k = max_len - first
        threshold = np.partition(h, k - 1)[k - 1]
        below = 0
        for t in range(m):
            if h[t] < threshold:
                below += 1
        room = k - below
        for t in range(first):
            out_ids[o + t] = ids[a + t]
            out_vals[o + t] = vals[a + t]
        w = o + first
        for t in range(m):
            take = h[t] < threshold
            if not take and h[t] == threshold and room > 0:
                take = True
                room -= 1
            if take:
                out_ids[w] = ids[a + first + t]
                out_vals[w] = vals[a + first + t]
                w += 1
