"""Twilight in Numba: the base kernel's candidates (Quest or Double Sparsity), per-token
fake-quantized keys re-scoring them, the smallest set reaching mass ``p`` (sort-and-accumulate or
the reference's threshold bisection), exact attention over it.

Every convention is the oracle's (``kvsparse.oracle.twilight.Twilight``). Estimates are float64;
mass sums are compensated (Neumaier), which decides ``sum >= p`` like the oracle's exactly rounded
``math.fsum`` except when a prefix sum lies within ~1e-32 of ``p``.

Where the time goes (benchmarks/numba.md, "Every kernel vs its oracle"): the fake-quantized estimate
of every candidate row, the base selector (Quest's page min/max reads the whole cache unless a decoder
passes them), and the attention over the group's union of kept sets. The top-p cut is one weighted
quickselect per head, heads in parallel.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ...oracle.double_sparsity import DoubleSparsity
from ...registry import register_kernel
from ._select import attend_token_mask, full_indices, partition3, topk_mask, topk_set
from .attention import _dot, check_float_arrays, dense_attention
from .double_sparsity import _fake_quantize_inplace
from .double_sparsity import scores as ds_scores
from .quest import quest_mask


@numba.njit(cache=True, parallel=True)
def estimated_probabilities(q, k, cand, bits, scale):
    """``[H_q, n]`` float64 ``p_hat``: softmax over each head's candidates (``cand [H_q, n]``) of
    ``q . k~ * scale`` with ``k~`` fake-quantized per token to ``bits`` (``bits <= 0``: exact); 0 elsewhere.
    Each candidate row is quantized once for its KV group."""
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    g = h_q // h_kv
    probs = np.zeros((h_q, n), np.float64)
    for kvh in numba.prange(h_kv):
        row = np.empty(d, np.float64)
        mx = np.full(g, -np.inf)
        for j in range(n):
            wanted = False
            for gi in range(g):
                wanted = wanted or cand[kvh * g + gi, j]
            if not wanted:
                continue
            for c in range(d):
                row[c] = k[kvh, j, c]
            if bits > 0:
                _fake_quantize_inplace(row, bits)
            for gi in range(g):
                h = kvh * g + gi
                if cand[h, j]:
                    probs[h, j] = _dot(q[h], row) * scale   # float64, vectorised (reassociated) sum
                    mx[gi] = max(mx[gi], probs[h, j])
        for gi in range(g):
            h = kvh * g + gi
            tot = 0.0
            for j in range(n):
                if cand[h, j]:
                    probs[h, j] = math.exp(probs[h, j] - mx[gi])
                    tot += probs[h, j]
            for j in range(n):
                if cand[h, j]:
                    probs[h, j] /= tot
    return probs


@numba.njit(cache=True)
def _neumaier_add(s, c, x):
    t = s + x
    if abs(s) >= abs(x):
        c += (s - t) + x
    else:
        c += (x - t) + s
    return t, c


@numba.njit(cache=True)
def _mass_above(p, thr):
    s, c = 0.0, 0.0
    for x in p:
        if x > thr:
            s, c = _neumaier_add(s, c, x)
    return s + c


@numba.njit(cache=True)
def _top_p_count(p, target):
    """Length of the shortest prefix (largest entries first) whose compensated mass reaches ``target``;
    ``m`` if none does. One weighted quickselect (expected O(m), no sort): partition around a pivot;
    if the entries above it, on top of the mass already committed, reach the target the cut lies among
    them, otherwise commit them and then the pivot's ties one at a time. Tied values have equal mass
    whichever of them a prefix holds, so only the length matters."""
    m = p.shape[0]
    if m == 0:
        return 0
    if not target > 0:
        return 1
    a = p.copy()
    lo, hi = 0, m - 1
    s, c = 0.0, 0.0           # compensated mass of the committed entries (each above all of a[lo..hi])
    count = 0
    while lo <= hi:
        pivot, gt, lt = partition3(a, lo, hi)     # [lo, gt) > pivot, [gt, lt] == pivot, (lt, hi] < pivot
        s1, c1 = s, c
        for j in range(lo, gt):
            s1, c1 = _neumaier_add(s1, c1, a[j])
        if s1 + c1 >= target:
            hi = gt - 1       # non-empty: the committed mass alone is below the target
            continue
        s, c, count = s1, c1, count + (gt - lo)
        for _ in range(lt - gt + 1):
            s, c = _neumaier_add(s, c, pivot)
            count += 1
            if s + c >= target:
                return count
        lo = lt + 1
    return m


@numba.njit(cache=True)
def top_p_sort(p, target):
    """Mask of the shortest prefix (core tie rule order) whose mass reaches ``target``; all if none does.

    No sort: ``_top_p_count`` finds the length, then the kept set is the top-length set under the tie
    rule (lower index first)."""
    keep = np.zeros(p.shape[0], np.bool_)
    for i in topk_set(p, _top_p_count(p, target)):
        keep[i] = True
    return keep


@numba.njit(cache=True)
def top_p_search(p, target, high, epsilon):
    """The reference kernel's threshold bisection (oracle ``top_p_search``): mask ``p > low``."""
    low = 0.0
    for _ in range(100_000):
        mid = (low + high) / 2
        min_gt_low = high
        max_le_high = low
        for x in p:
            if x > low and x < min_gt_low:
                min_gt_low = x
            if x <= high and x > max_le_high:
                max_le_high = x
        if _mass_above(p, mid) >= target:
            low = mid
        else:
            high = min(mid, max_le_high)
        if not max_le_high - min_gt_low > epsilon:
            return p > low
    raise RuntimeError("top_p_search did not stop")


@numba.njit(cache=True, parallel=True)
def prune(probs, cand, target, search, bracket_first, epsilon):
    """``[H_q, n]`` kept mask: per head (in parallel), top-p over its candidates (ascending token order)."""
    h_q, n = probs.shape
    kept = np.zeros((h_q, n), np.bool_)
    for h in numba.prange(h_q):
        idx = np.flatnonzero(cand[h])
        if idx.size == 0:
            continue
        p = probs[h, idx]
        if not search:
            keep = top_p_sort(p, target)
        else:
            if bracket_first:
                high = p[0] if idx[0] == 0 else 0.0
            else:
                high = p.max()
            keep = top_p_search(p, target, high, epsilon)
        for b in range(idx.size):
            if keep[b]:
                kept[h, idx[b]] = True
    return kept


def candidates(method, q, k, *, kmin=None, kmax=None):
    """The base selector's ``[H_q, n]`` candidate mask (all True on a dense step); ``kmin``/``kmax``:
    a Quest base's page metadata, when a decoder maintains it."""
    h_q, n = q.shape[0], k.shape[1]
    base = method.base
    if method.dense_layer:
        return np.ones((h_q, n), bool)
    if isinstance(base, DoubleSparsity):
        if base.is_dense(n):
            return np.ones((h_q, n), bool)
        return topk_mask(ds_scores(base, q, k), base.token_budget)
    mask = quest_mask(base, q, k, kmin=kmin, kmax=kmax)
    return np.ones((h_q, n), bool) if mask is None else mask


@register_kernel("twilight", "numba")
def twilight(method, q, k, v, *, positions=None, scale=None, kmin=None, kmax=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)``; ``method`` is a ``Twilight``.

    ``kmin``/``kmax`` (``quest.page_metadata(k, P)`` of a Quest base, maintained by a decoder) may be
    passed; otherwise the base computes them, which reads every key row."""
    q, k, v = check_float_arrays(q, k, v)
    h_q, n = q.shape[0], k.shape[1]
    cand = candidates(method, q, k, kmin=kmin, kmax=kmax)
    if method.dense_layer or method.p >= 1:
        if cand.all():
            return dense_attention(q, k, v, scale=scale)[0], full_indices(h_q, n)
        kept = cand
    else:
        # the estimate uses the default 1/sqrt(d), as the oracle's (a scale only rescales attention)
        probs = estimated_probabilities(q, k, cand, method.quant_bits or 0, 1.0 / math.sqrt(q.shape[1]))
        kept = prune(probs, cand, float(method.p), method.top_p == "search", method.bracket == "first",
                     float(method.epsilon))
    out, _, indices = attend_token_mask(q, k, v, kept, scale=scale)
    return out, indices
