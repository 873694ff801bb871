"""Compiled building blocks shared by the Numba method kernels: the top-k tie rule and turning per
query-head token masks into the shared per-KV-head lists of ``attention.sparse_attention``."""
from __future__ import annotations

import numba
import numpy as np

from .attention import FASTMATH

SLICES = 64   # tasks per KV head in _channel_pass


def channel_logits(q, k, channels, factor, v=None):
    """``[H_q, n]`` float64 ``factor[h] * sum_{c in channels[h]} q[h, c] k[j, c]``, summed in float64 from
    the input dtype. Each K row is read once for its KV group (row-major keys: touching r of d channels
    costs the row's cache lines anyway), r multiply-adds per query head. Tasks: KV head x 64 slices of
    the sequence, so 2 cores stay busy with few KV heads. SparQ's reduced logits; all channels and
    ``factor = scale`` are exact-precision logits (vAttention's plan).

    Returns ``(logits, mean_v)``: with ``v`` ``[H_kv, n, d]``, ``mean_v`` is its float64 mean over the n
    tokens ``[H_kv, d]``, else None. Each task also sums its slice of V, row j next to row j of K, in the
    same parallel region: at n = 32768 (H_kv = 8, d = 128, float32) this added 3-5 ms to the pass, where
    NumPy's mean took 25 ms and a separate parallel pass over V 7 ms plus a second fork/join."""
    h_kv, n, d = k.shape
    s = np.empty((q.shape[0], n), np.float64)
    v_part = np.zeros((h_kv, SLICES, 0 if v is None else d), np.float64)
    _channel_pass(q, k, k if v is None else v, channels, factor, s, v_part)
    return s, (None if v is None else v_part.sum(axis=1) / n)


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _channel_pass(q, k, v, channels, factor, s, v_part):
    """``channel_logits`` into ``s``; if ``v_part`` is ``[H_kv, SLICES, d]`` (not 0 wide), the float64 sum of
    each slice's V rows into it."""
    h_q, r = channels.shape
    h_kv, n, d = k.shape
    g = h_q // h_kv
    with_v = v_part.shape[2] > 0
    for task in numba.prange(h_kv * SLICES):
        kvh, part = task // SLICES, task % SLICES
        vsum = np.zeros(d, np.float64)
        for j in range(part * n // SLICES, (part + 1) * n // SLICES):
            for gi in range(g):
                h = kvh * g + gi
                acc = 0.0
                for c in range(r):
                    ch = channels[h, c]
                    acc += np.float64(q[h, ch]) * np.float64(k[kvh, j, ch])
                s[h, j] = acc * factor[h]
            if with_v:   # here, not in a second loop over the slice: measured faster (two streams)
                row = v[kvh, j]
                for c in range(d):
                    vsum[c] += np.float64(row[c])
        if with_v:
            v_part[kvh, part] = vsum


@numba.njit(cache=True)
def kth_largest(scores, k):
    """The ``k``-th largest value (1-based).

    Long rows: a strided sample's order statistic gives a threshold ``t`` a little below the k-th
    value; if at least ``k`` entries are ``>= t``, the k-th largest of those is the answer (every entry
    above the k-th value is among them), found by quickselect on a short array. Otherwise, and for
    short rows, quickselect on a copy of the whole row."""
    m = scores.shape[0]
    if m > 8192:
        step = m // 1024
        sample = scores[::step].copy()
        rank = min(sample.shape[0], (k * sample.shape[0]) // m + 16)
        t = _quickselect(sample, rank)
        cand = scores[scores >= t]
        if cand.shape[0] >= k:
            return _quickselect(cand, k)
    return _quickselect(scores.copy(), k)


@numba.njit(cache=True)
def partition3(a, lo, hi):
    """Descending three-way partition of ``a[lo..hi]`` around a median-of-three pivot, in place:
    ``[lo, gt) > pivot``, ``[gt, lt] == pivot``, ``(lt, hi] < pivot``. Returns ``(pivot, gt, lt)``."""
    mid = (lo + hi) // 2
    x, y, z = a[lo], a[mid], a[hi]
    pivot = max(min(x, y), min(max(x, y), z))
    gt, i, lt = lo, lo, hi
    while i <= lt:
        if a[i] > pivot:
            a[gt], a[i] = a[i], a[gt]
            gt += 1
            i += 1
        elif a[i] < pivot:
            a[lt], a[i] = a[i], a[lt]
            lt -= 1
        else:
            i += 1
    return pivot, gt, lt


@numba.njit(cache=True)
def _quickselect(a, k):
    """``k``-th largest of ``a`` (reordered in place): three-way quickselect, median-of-three pivot;
    equal values are grouped, so many ties stay linear. Compiles far faster than ``np.partition``."""
    lo, hi = 0, a.shape[0] - 1
    target = k - 1            # position in descending order
    while True:
        if lo == hi:
            return a[lo]
        pivot, gt, lt = partition3(a, lo, hi)
        if target < gt:
            hi = gt - 1
        elif target <= lt:
            return pivot
        else:
            lo = lt + 1


@numba.njit(cache=True)
def topk_set(scores, k):
    """THE tie rule on one row, as a set: the ``k`` highest scores (the lower index winning ties),
    returned in ascending index order. O(m): a selection finds the k-th largest value, then one pass
    keeps everything above it and the lowest-indexed tokens equal to it. No NaN allowed."""
    m = scores.shape[0]
    k = min(k, m)
    out = np.empty(k, np.int64)
    if k == 0:
        return out
    if k == m:
        for i in range(m):
            out[i] = i
        return out
    kth = kth_largest(scores, k)
    above = 0
    for i in range(m):
        if scores[i] > kth:
            above += 1
    ties = k - above
    b = 0
    for i in range(m):
        x = scores[i]
        if x > kth or (x == kth and ties > 0):
            if x == kth:
                ties -= 1
            out[b] = i
            b += 1
    return out


@numba.njit(cache=True, parallel=True)
def topk_mask(scores, k):
    """Row-wise ``topk_set`` over ``[R, m]`` scores as a boolean mask ``[R, m]``."""
    rows, m = scores.shape
    mask = np.zeros((rows, m), np.bool_)
    for r in numba.prange(rows):
        for i in topk_set(scores[r], k):
            mask[r, i] = True
    return mask


@numba.njit(cache=True)
def masks_to_lists(mask, h_kv, dtype_one):
    """``mask [H_q, n]`` (who attends what) -> union lists ``[H_kv, B]``, lengths, weights ``[H_q, B]``.

    A boolean mask gives 0/1 weights; a float ``mask`` is a dense weight array (0 = not attended) whose
    values are carried over (an estimator's HT factors). ``dtype_one`` is a 1-element array whose dtype
    the weights take. ``shared`` is True when every head of each group has the same set (for a boolean
    mask the weights can then be dropped; a float mask's weights may still differ between heads).
    """
    h_q, n = mask.shape
    g = h_q // h_kv
    counts = np.zeros(h_kv, np.int64)
    shared = True
    for j in range(h_kv):
        for i in range(n):
            any_ = False
            all_ = True
            for gi in range(g):
                if mask[j * g + gi, i]:
                    any_ = True
                else:
                    all_ = False
            if any_:
                counts[j] += 1
                if not all_:
                    shared = False
    width = counts.max() if h_kv else 0
    lists = np.zeros((h_kv, width), np.int64)
    w = np.zeros((h_q, width), dtype_one.dtype)
    for j in range(h_kv):
        b = 0
        for i in range(n):
            hit = False
            for gi in range(g):
                if mask[j * g + gi, i]:
                    hit = True
                    w[j * g + gi, b] = mask[j * g + gi, i]
            if hit:
                lists[j, b] = i
                b += 1
    return lists, counts, w, shared


def mask_to_indices(mask):
    """Per query head, the sorted tokens of a ``[H_q, n]`` mask (what a kernel reports)."""
    return tuple(np.flatnonzero(row) for row in mask)


def attend_token_mask(q, k, v, mask, *, scale=None):
    """Attention of each query head over its row of ``mask [H_q, n]``, each KV row read once per group.

    Returns ``(out, lse, indices)`` with ``indices`` per query head (what a kernel reports)."""
    from .attention import sparse_attention
    lists, lengths, w, shared = masks_to_lists(mask, k.shape[0], np.ones(1, q.dtype))
    out, lse = sparse_attention(q, k, v, lists, lengths, None if shared else w, scale=scale, check=False)
    return out, lse, mask_to_indices(mask)


def full_indices(h_q, n):
    return np.broadcast_to(np.arange(n), (h_q, n))
