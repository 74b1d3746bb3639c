"""Compiled (numba) kernels for the per-cell hot loops of the tokenizers.

They compute exactly what the numpy reference implementations in :mod:`.scgpt` compute — same
float32/float64 operation order, same hash — row-parallel over the cells of a block. Tests check
them against the numpy versions and against scGPT's own output. numba comes with scanpy.
"""

from __future__ import annotations

import sys
import threading

import numba
import numpy as np

__all__ = [
    "KERNEL_LOCK",
    "bin_rows",
    "bin_rows_raw",
    "count_edges_le",
    "csr_arrays",
    "geneformer_count",
    "geneformer_rank",
    "row_argsort",
    "sample_compact",
    "scgpt_count",
    "scgpt_tokens",
]

class _KernelGuard:
    """Hold while calling a kernel: one caller at a time, and torch's thread count kept.

    numba's default ("workqueue") threading layer must not be entered from two threads at once
    (e.g. the studio tokenizing in a background thread while a notebook cell does too), and
    starting its parallel layer resets the process's OpenMP thread count, which torch shares: a
    ``torch.set_num_threads(1)`` made before tokenizing would silently become the core count.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._torch_threads: int | None = None

    def __enter__(self) -> _KernelGuard:
        self._lock.acquire()
        torch = sys.modules.get("torch")  # only when torch is loaded: tokenizing alone never imports it
        self._torch_threads = torch.get_num_threads() if torch is not None else None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            torch, wanted = sys.modules.get("torch"), self._torch_threads
            if torch is not None and wanted is not None and torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)
        finally:
            self._lock.release()


#: hold around every kernel call (see :class:`_KernelGuard`)
KERNEL_LOCK = _KernelGuard()


def csr_arrays(matrix):
    """``(data, indices, indptr)`` of an in-memory CSR matrix the kernels can read in place (float
    values, sorted indices, no duplicates), else ``None`` (then the rows are read as block copies)."""
    import scipy.sparse as sp

    if not (sp.issparse(matrix) and matrix.format == "csr" and matrix.dtype in (np.float32, np.float64)):
        return None
    if not matrix.has_canonical_format:
        return None
    return matrix.data, matrix.indices, matrix.indptr


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


@numba.njit(cache=True)
def _row_edges(vals, q):  # pragma: no cover - compiled
    """``np.quantile(vals, q)`` (linear) of one row, and a counting table for small integer rows.

    Returns ``(edges, counting, left_of, right_of)``: with ``counting`` (the row holds small
    non-negative integers) ``left_of[v]``/``right_of[v]`` are ``digitize(v, edges)`` and
    ``digitize(v, edges, right=True)`` for every value ``v`` present in the row.
    """
    n = vals.shape[0]
    n_edges = q.shape[0]
    # small non-negative integers (raw counts): a counting sort instead of a comparison sort
    top = 0.0
    integral = True
    for t in range(n):
        v = vals[t]
        if v > top:
            top = v
        if v != np.floor(v) or v < 0:
            integral = False
    counting = integral and top <= _COUNTING_LIMIT
    m = np.int64(top) if counting else 0
    if counting:
        cum = np.zeros(m + 1, dtype=np.int64)
        for t in range(n):
            cum[np.int64(vals[t])] += 1
        for v in range(1, m + 1):
            cum[v] += cum[v - 1]  # cum[v] = number of values <= v
        s = np.empty(0, dtype=vals.dtype)
    else:
        cum = np.zeros(0, dtype=np.int64)
        s = np.sort(vals)
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
            lo = vals.dtype.type(np.searchsorted(cum, pi, side="right"))
            hi = vals.dtype.type(np.searchsorted(cum, ni, side="right"))
        else:
            lo = s[pi]
            hi = s[ni]
        diff = hi - lo
        if gamma >= 0.5:
            edges[j] = hi - diff * (1.0 - gamma)
        else:
            edges[j] = lo + diff * gamma
    left_of = np.empty(m + 1 if counting else 0, dtype=np.int64)
    right_of = np.empty(m + 1 if counting else 0, dtype=np.int64)
    if counting:  # left/right once per distinct value
        for v in range(m + 1):
            if (cum[v] - (cum[v - 1] if v > 0 else 0)) > 0:
                left_of[v] = np.searchsorted(edges, np.float64(v), side="right")
                right_of[v] = np.searchsorted(edges, np.float64(v), side="left")
    return edges, counting, left_of, right_of


@numba.njit(cache=True)
def _kth_smallest(h, k):  # pragma: no cover - compiled
    """The ``k``-th smallest (0-based) of ``h``, 53-bit uniform hashes: a histogram of the top bits
    finds the bucket that holds it, and only that bucket (about one value) is sorted."""
    n = h.shape[0]
    bits = 1
    while bits < 16 and (1 << bits) < n:
        bits += 1
    shift = np.uint64(53 - bits)
    counts = np.zeros(1 << bits, dtype=np.int64)
    for t in range(n):
        counts[np.int64(h[t] >> shift)] += 1
    below = 0
    bucket = 0
    while below + counts[bucket] <= k:
        below += counts[bucket]
        bucket += 1
    members = np.empty(counts[bucket], dtype=np.uint64)
    j = 0
    for t in range(n):
        if np.int64(h[t] >> shift) == bucket:
            members[j] = h[t]
            j += 1
    members.sort()
    return members[k - below]


@numba.njit(cache=True, inline="always")
def _bin_of(v, edges, counting, left_of, right_of, ut):  # pragma: no cover - compiled
    """scGPT's ``ceil(u * (right - left) + left)`` for one value."""
    if counting:
        left = left_of[np.int64(v)]
        right = right_of[np.int64(v)]
    else:
        x = np.float64(v)
        left = np.searchsorted(edges, x, side="right")
        right = np.searchsorted(edges, x, side="left")
    return np.int64(np.ceil(ut * (right - left) + left))


@numba.njit(cache=True, inline="always")
def _bin_hashed(v, edges, counting, left_of, right_of, inner, token):  # pragma: no cover - compiled
    """:func:`_bin_of` with ``u = uniform_hash`` of (``inner``, ``token``), drawn only for values on
    an edge: elsewhere ``right == left`` and ``ceil(u * 0 + left) == left`` whatever ``u`` is."""
    if counting:
        left = left_of[np.int64(v)]
        right = right_of[np.int64(v)]
    else:
        x = np.float64(v)
        left = np.searchsorted(edges, x, side="right")
        right = np.searchsorted(edges, x, side="left")
    if right == left:
        return np.int64(left)
    ut = np.float64(_mix(inner ^ np.uint64(token)) >> np.uint64(11)) * (2.0**-53)
    return np.int64(np.ceil(ut * (right - left) + left))


@numba.njit(parallel=True, cache=True)
def bin_rows(
    data, indptr, q, u, use_hash, seed_mixed, row_keys, token_keys, out
):  # pragma: no cover - compiled
    """scGPT binning of CSR rows; ``u`` (len T) or, with ``use_hash``, per-(cell, gene) hashes."""
    n_rows = indptr.shape[0] - 1
    for r in numba.prange(n_rows):
        a = indptr[r]
        b = indptr[r + 1]
        if b == a:
            continue
        inner = _mix(seed_mixed ^ row_keys[r])  # the per-cell part of uniform_hash(seed, cell, gene)
        edges, counting, left_of, right_of = _row_edges(data[a:b], q)
        for t in range(a, b):
            if use_hash:
                ut = np.float64(_mix(inner ^ token_keys[t]) >> np.uint64(11)) * (2.0**-53)
            else:
                ut = u[t]
            out[t] = _bin_of(data[t], edges, counting, left_of, right_of, ut)


@numba.njit(cache=True)
def _row_edges_by_raw(vals, raws, q):  # pragma: no cover - compiled
    """:func:`_row_edges` of one row's values ``vals`` (normalised) using its raw counts ``raws``.

    Within a cell, normalize_total and log1p map a raw count to one value and keep the order, so
    the values listed in raw-count order are sorted: a counting sort of the raw counts replaces
    the comparison sort. Both properties are checked; ``ok`` is False (and the caller sorts) when
    the raw counts are not small non-negative integers or the values are not such a function of them.
    Returns ``(ok, edges, left_of, right_of)``, the last two indexed by raw count.
    """
    n = vals.shape[0]
    n_edges = q.shape[0]
    edges = np.empty(n_edges, dtype=np.float64)
    top = 0.0
    for t in range(n):
        v = raws[t]
        if not (v >= 0 and v == np.floor(v) and v <= _COUNTING_LIMIT):
            return False, edges, np.empty(0, np.int64), np.empty(0, np.int64)
        if v > top:
            top = v
    m = np.int64(top)
    cum = np.zeros(m + 1, dtype=np.int64)
    value_of = np.zeros(m + 1, dtype=vals.dtype)
    for t in range(n):
        v = np.int64(raws[t])
        if cum[v] and value_of[v] != vals[t]:
            return False, edges, np.empty(0, np.int64), np.empty(0, np.int64)
        value_of[v] = vals[t]
        cum[v] += 1
    last = -1
    for v in range(m + 1):
        if cum[v]:
            if last >= 0 and not (value_of[last] <= value_of[v]):
                return False, edges, np.empty(0, np.int64), np.empty(0, np.int64)
            last = v
    present = cum > 0
    for v in range(1, m + 1):
        cum[v] += cum[v - 1]  # cum[v] = number of values with raw count <= v
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
        lo = value_of[np.searchsorted(cum, pi, side="right")]  # the value at sorted position pi
        hi = value_of[np.searchsorted(cum, ni, side="right")]
        diff = hi - lo
        if gamma >= 0.5:
            edges[j] = hi - diff * (1.0 - gamma)
        else:
            edges[j] = lo + diff * gamma
    left_of = np.empty(m + 1, dtype=np.int64)
    right_of = np.empty(m + 1, dtype=np.int64)
    for v in range(m + 1):
        if present[v]:
            x = np.float64(value_of[v])
            left_of[v] = np.searchsorted(edges, x, side="right")
            right_of[v] = np.searchsorted(edges, x, side="left")
    return True, edges, left_of, right_of


@numba.njit(parallel=True, cache=True)
def bin_rows_raw(data, raw, indptr, q, u, out):  # pragma: no cover - compiled
    """:func:`bin_rows` (tie uniforms ``u``) of normalised CSR rows, sorting by their raw counts
    ``raw`` (same structure) where :func:`_row_edges_by_raw` allows it."""
    n_rows = indptr.shape[0] - 1
    for r in numba.prange(n_rows):
        a = indptr[r]
        b = indptr[r + 1]
        if b == a:
            continue
        ok, edges, left_of, right_of = _row_edges_by_raw(data[a:b], raw[a:b], q)
        if ok:
            for t in range(a, b):
                v = np.int64(raw[t])
                left = left_of[v]
                right = right_of[v]
                out[t] = np.int64(np.ceil(u[t] * (right - left) + left))
        else:
            edges, counting, left_of, right_of = _row_edges(data[a:b], q)
            for t in range(a, b):
                out[t] = _bin_of(data[t], edges, counting, left_of, right_of, u[t])


@numba.njit(parallel=True, cache=True)
def scgpt_count(data, indices, indptr, rows, col_tok, first, max_len, lengths):  # pragma: no cover
    """Output length of each selected CSR row (``<cls>`` + its nonzero vocabulary genes, capped at
    ``max_len`` when > 0); returns whether any stored value is negative or not finite."""
    bad = np.zeros(rows.shape[0], dtype=np.bool_)
    for i in numba.prange(rows.shape[0]):
        r = rows[i]
        n = 0
        for t in range(indptr[r], indptr[r + 1]):
            v = data[t]
            if not (v >= 0 and np.isfinite(v)):
                bad[i] = True
            if v != 0 and col_tok[indices[t]] >= 0:
                n += 1
        n += first
        if max_len > 0 and n > max_len:
            n = max_len
        lengths[i] = n
    return bad.any()


@numba.njit(parallel=True, cache=True)
def scgpt_tokens(
    data,
    indices,
    indptr,
    rows,
    col_tok,
    row_keys,
    q,
    bin_seed,
    sample_seed,
    first,
    cls_id,
    cls_value,
    max_len,
    offsets,
    out_ids,
    out_vals,
):  # pragma: no cover - compiled
    """scGPT ``deterministic`` tokens of CSR rows in one pass, written straight into the output.

    Per selected row ``rows[i]``: its nonzero values in vocabulary columns (``col_tok[column] >= 0``,
    column order) are binned as :func:`bin_rows` bins them (edges from *all* of them, ties spread by
    ``uniform_hash(seed, cell, gene)``); when ``first`` + their number exceeds ``max_len`` (> 0),
    the genes kept are those :func:`sample_compact` keeps (smallest hash of ``seed + 1``, column
    order). ``<cls>`` (when ``first``) then the kept genes go to ``out_*[offsets[i]:]``.
    """
    for i in numba.prange(rows.shape[0]):
        r = rows[i]
        a = indptr[r]
        b = indptr[r + 1]
        o = offsets[i]
        if first:
            out_ids[o] = cls_id
            out_vals[o] = cls_value
            o += 1
        vals = np.empty(b - a, dtype=data.dtype)
        toks = np.empty(b - a, dtype=np.int64)
        n = 0
        for t in range(a, b):
            if data[t] != 0:
                g = col_tok[indices[t]]
                if g >= 0:
                    vals[n] = data[t]
                    toks[n] = g
                    n += 1
        if n == 0:
            continue
        vals = vals[:n]
        toks = toks[:n]
        edges, counting, left_of, right_of = _row_edges(vals, q)
        inner = _mix(bin_seed ^ row_keys[i])
        if max_len > 0 and n + first > max_len:
            keep = max_len - first
            inner_s = _mix(sample_seed ^ row_keys[i])
            h = np.empty(n, dtype=np.uint64)
            for t in range(n):
                h[t] = _mix(inner_s ^ np.uint64(toks[t])) >> np.uint64(11)
            threshold = _kth_smallest(h, keep - 1)
            room = keep
            for t in range(n):
                if h[t] < threshold:
                    room -= 1
            for t in range(n):
                take = h[t] < threshold
                if not take and h[t] == threshold and room > 0:
                    take = True
                    room -= 1
                if take:
                    out_ids[o] = toks[t]
                    out_vals[o] = _bin_hashed(vals[t], edges, counting, left_of, right_of, inner, toks[t])
                    o += 1
        else:
            for t in range(n):
                out_ids[o] = toks[t]
                out_vals[o] = _bin_hashed(vals[t], edges, counting, left_of, right_of, inner, toks[t])
                o += 1


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
        threshold = _kth_smallest(h, k - 1)
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


# ================================================================================== geneformer
_SIGN = np.uint64(0x8000000000000000)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@numba.njit(cache=True)
def _argsort_distinct(keys):  # pragma: no cover - compiled
    """``(order, distinct)``: positions of ``keys`` in ascending order, equal keys in position order
    (a stable sort), and whether no two keys are equal (only then is the order unique, i.e. what
    any sort — numpy's quicksort included — returns).

    A bucket sort: keys map monotonically onto about ``len(keys)`` buckets by their offset from the
    smallest key, and each bucket (about one key) is sorted on its own.
    """
    n = keys.shape[0]
    nb = 1
    while nb < n:
        nb *= 2
    order, start = _bucket_order(keys, nb)
    for g in range(nb):
        if start[g + 1] - start[g] > 1:
            _sort_bucket(order, keys, start[g], start[g + 1])
    return order, _all_distinct(keys, order)


@numba.njit(cache=True)
def _key_range(keys):  # pragma: no cover - compiled
    """``(smallest, largest)`` key."""
    kmin = keys[0]
    kmax = keys[0]
    for t in range(keys.shape[0]):
        if keys[t] < kmin:
            kmin = keys[t]
        if keys[t] > kmax:
            kmax = keys[t]
    return kmin, kmax


@numba.njit(cache=True)
def _bucket_order(keys, nb):  # pragma: no cover - compiled
    """``(order, start)``: positions grouped into ``nb`` buckets by their key's offset from the smallest
    key (monotone in the key; position order within a bucket), and where each bucket starts in ``order``."""
    n = keys.shape[0]
    order = np.empty(n, dtype=np.int64)
    kmin, kmax = _key_range(keys)
    span = np.float64(kmax - kmin)
    scale = (nb - 1) / span if span > 0 else 0.0
    bucket = np.empty(n, dtype=np.int64)
    start = np.zeros(nb + 1, dtype=np.int64)
    for t in range(n):
        g = np.int64(np.float64(keys[t] - kmin) * scale)  # monotone in the key
        if g > nb - 1:
            g = nb - 1
        bucket[t] = g
        start[g + 1] += 1
    for g in range(nb):
        start[g + 1] += start[g]
    fill = start[:nb].copy()
    for t in range(n):
        order[fill[bucket[t]]] = t
        fill[bucket[t]] += 1
    return order, start


@numba.njit(cache=True)
def _sort_bucket(order, keys, a, b):  # pragma: no cover - compiled
    """Sort ``order[a:b]`` by key in place, stably: equal keys stay in position order."""
    if b - a <= 16:  # insertion sort
        for j in range(a + 1, b):
            p = order[j]
            k = keys[p]
            m = j - 1
            while m >= a and keys[order[m]] > k:
                order[m + 1] = order[m]
                m -= 1
            order[m + 1] = p
    else:  # stable, like the insertion sort
        sub = order[a:b].copy()
        perm = np.argsort(keys[sub], kind="mergesort")
        for j in range(b - a):
            order[a + j] = sub[perm[j]]


@numba.njit(cache=True)
def _all_distinct(keys, order):  # pragma: no cover - compiled
    """Whether no two keys are equal (``order`` sorts them, so equal keys are neighbours)."""
    distinct = True
    for j in range(keys.shape[0] - 1):
        if keys[order[j]] == keys[order[j + 1]]:
            distinct = False
            break
    return distinct


@numba.njit(parallel=True, cache=True)
def geneformer_count(data, indices, indptr, rows, col_map, rc, ts, recip_median, drop_zeros, full):
    """Genes per selected CSR row as Geneformer keeps them (vocabulary columns, ``col_map >= 0``; with
    ``drop_zeros`` only nonzero normalised values); returns whether any stored value is not a
    non-negative integer (the caller then raises the error)."""  # pragma: no cover - compiled
    bad = np.zeros(rows.shape[0], dtype=np.bool_)
    for i in numba.prange(rows.shape[0]):
        r = rows[i]
        n = 0
        for t in range(indptr[r], indptr[r + 1]):
            v = data[t]
            if not (v >= 0 and np.isfinite(v) and v == np.floor(v)):
                bad[i] = True
            c = col_map[indices[t]]
            if c >= 0:
                if drop_zeros and v * rc[i] * ts * recip_median[c] == 0:
                    continue
                n += 1
        full[i] = n
    return bad.any()


@numba.njit(parallel=True, cache=True)
def geneformer_rank(
    data,
    indices,
    indptr,
    rows,
    col_map,
    rc,
    ts,
    recip_median,
    out_tokens,
    drop_zeros,
    budget,
    shift,
    offsets,
    flat,
    fallback,
):  # pragma: no cover - compiled
    """Geneformer's rank encoding of selected CSR rows, written to ``flat[offsets[i] + shift:]``.

    The value of a gene is ``((count × rc[i]) × ts) × recip_median[column]`` in the operand dtypes,
    as numpy evaluates Geneformer's expression; genes go in descending value order, the first
    ``budget`` of them. That order is unique when a cell has no two equal values; a cell with
    equal values (or zeros) is flagged in ``fallback`` and left to numpy's ``argsort``, whose
    order of ties is the one Geneformer gets.
    """
    for i in numba.prange(rows.shape[0]):
        r = rows[i]
        a = indptr[r]
        b = indptr[r + 1]
        neg = np.empty(b - a, dtype=np.float64)
        cols = np.empty(b - a, dtype=np.int64)
        n = 0
        for t in range(a, b):
            c = col_map[indices[t]]
            if c < 0:
                continue
            v = data[t] * rc[i] * ts * recip_median[c]
            if v == 0:
                if drop_zeros:
                    continue
                fallback[i] = True  # +0.0 / -0.0 compare equal: numpy's order
            neg[n] = -np.float64(v)
            cols[n] = c
            n += 1
        if n == 0 or fallback[i]:
            continue
        # order-preserving integer keys of -value: ascending keys = descending values
        keys = neg[:n].view(np.uint64).copy()
        for t in range(n):
            if keys[t] & _SIGN:
                keys[t] = keys[t] ^ _ALL
            else:
                keys[t] = keys[t] ^ _SIGN
        order, distinct = _argsort_distinct(keys)
        if not distinct:
            fallback[i] = True
            continue
        o = offsets[i] + shift
        kept = min(n, budget)
        for j in range(kept):
            flat[o + j] = out_tokens[cols[order[j]]]


# ================================================================================== teddy
@numba.njit(cache=True)
def _float_keys(x):  # pragma: no cover - compiled
    """Unsigned keys that sort like the float64 values ``x`` (``-0.0`` as ``0.0``; no NaN); ``x`` is
    overwritten and returned reinterpreted."""
    for t in range(x.shape[0]):
        if x[t] == 0:
            x[t] = 0.0
    keys = x.view(np.uint64)
    for t in range(keys.shape[0]):
        if keys[t] & _SIGN:
            keys[t] = keys[t] ^ _ALL
        else:
            keys[t] = keys[t] ^ _SIGN
    return keys


@numba.njit(parallel=True, cache=True)
def row_argsort(values, indptr, descending, out):  # pragma: no cover - compiled
    """Stable per-row argsort of CSR rows: ``out[a:b]`` = global positions of row ``[a, b)`` by value
    (descending with ``descending``), equal values in position order — what
    ``np.lexsort((±values, rows))`` gives."""
    n_rows = indptr.shape[0] - 1
    for r in numba.prange(n_rows):
        a = indptr[r]
        b = indptr[r + 1]
        if b == a:
            continue
        x = np.empty(b - a, dtype=np.float64)
        for t in range(a, b):
            x[t - a] = -np.float64(values[t]) if descending else np.float64(values[t])
        order, _ = _argsort_distinct(_float_keys(x))
        for j in range(b - a):
            out[a + j] = a + order[j]


@numba.njit(parallel=True, cache=True)
def count_edges_le(values, indptr, edges, out):  # pragma: no cover - compiled
    """``out[t] = #{edges[r] <= values[t]}`` for each value of CSR row ``r``."""
    n_rows = indptr.shape[0] - 1
    n_edges = edges.shape[1]
    for r in numba.prange(n_rows):
        a = indptr[r]
        b = indptr[r + 1]
        if b == a:
            continue
        e = edges[r]
        monotone = True
        for j in range(n_edges - 1):
            if not (e[j] <= e[j + 1]):
                monotone = False
        for t in range(a, b):
            x = values[t]
            if monotone:
                out[t] = np.searchsorted(e, x, side="right")
            else:
                c = 0
                for j in range(n_edges):
                    if e[j] <= x:
                        c += 1
                out[t] = c
