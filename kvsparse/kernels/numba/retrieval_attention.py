"""RetrievalAttention (exact retrieval) in Numba: attention over the static sinks + window, attention
over each query head's top-k inner-product neighbours among the other tokens, merged by log-sum-exp.

Only exact retrieval (``recall = 1``) is implemented: the approximate preset's misses are a seeded
model of an index, not a computation, and are refused with ``ValueError``. Conventions
(``kvsparse.oracle.retrieval_attention``): static set by cache index, MIPS on raw ``q . k``, ties to
the lower index, the two parts disjoint so the merge is exact softmax over their union."""
from __future__ import annotations

import numba
import numpy as np

from ...oracle import core
from ...oracle.retrieval_attention import candidates  # noqa: F401  (bench_kernels.py's stage builds its pool with it)
from ...registry import register_kernel
from ._select import topk_set
from .attention import FASTMATH, _dot, attend_selection, check_float_arrays, merge_partials, sparse_attention


TASKS_PER_THREAD = 2
"""The search splits each KV head's pool into just enough slices for this many tasks per thread: a
slice restarts its running top-k (``_scan_slice``), and the first rows of a slice nearly all enter
and get compacted (at n = 32,768, top_k = 100, one thread: 21 ms for 1 slice per KV head, 26 ms for
8, 42 ms for 64), so slices buy parallelism only."""


@numba.njit(cache=True)
def _compact(gi, k_eff, pos, sc, cnt, thr, full):
    """Cut group head ``gi``'s buffer row to its best ``k_eff`` (``topk_set``: the row is in ascending
    position, so ties go to the lower index); ``thr`` becomes their k-th score."""
    sel = topk_set(sc[gi, :cnt[gi]], k_eff)
    for b in range(sel.shape[0]):      # sel ascending and sel[b] >= b: in place
        pos[gi, b] = pos[gi, sel[b]]
        sc[gi, b] = sc[gi, sel[b]]
    cnt[gi] = sel.shape[0]
    if sel.shape[0] == k_eff:
        t = np.inf
        for b in range(k_eff):
            t = min(t, sc[gi, b])
        thr[gi] = t
        full[gi] = True


@numba.njit(cache=True, fastmath=FASTMATH)
def _scan_slice(qd, k, kvh, pool, lo, hi, k_eff, pos, sc, cnt, thr, full):
    """Pool positions ``[lo, hi)`` of KV head ``kvh`` into the G heads' buffer rows ``pos``/``sc
    [G, 2 k_eff]``, which hold the best ``k_eff`` so far plus later arrivals, in ascending position.
    Returns whether a score was NaN (the oracle refuses those; they never enter a buffer).

    Each K row is read once: the G float64 scores four heads at a time (one conversion of each row
    element feeds four accumulators). Once ``k_eff`` are held (``full``) a score enters only if strictly
    above its head's ``thr``, the k-th best held: a later row tying it loses to the k lower-index rows
    held. Before that everything not NaN enters, ``-inf`` included (the oracle ranks it last, not out).
    The append is inline and a full row is compacted (``_compact``) out of line: a call passing the
    arrays costs reference counting, which made the search 3x slower at 64 slices. Separate from the
    ``prange`` body: inlined there, the dot products ran 1.5x slower (measured)."""
    g = pos.shape[0]
    cap = pos.shape[1]
    d = qd.shape[1]
    base = kvh * g
    xs = np.empty(g, np.float64)
    nan = False
    for j in range(lo, hi):
        row = k[kvh, pool[j]]
        gi = 0
        while gi + 4 <= g:
            h = base + gi
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            a3 = 0.0
            for c in range(d):
                x = np.float64(row[c])
                a0 += qd[h, c] * x
                a1 += qd[h + 1, c] * x
                a2 += qd[h + 2, c] * x
                a3 += qd[h + 3, c] * x
            xs[gi] = a0
            xs[gi + 1] = a1
            xs[gi + 2] = a2
            xs[gi + 3] = a3
            gi += 4
        while gi < g:
            xs[gi] = _dot(qd[base + gi], row)
            gi += 1
        for gi in range(g):
            x = xs[gi]
            if x > thr[gi] or (x == thr[gi] and not full[gi]):
                c = cnt[gi]
                pos[gi, c] = j
                sc[gi, c] = x
                cnt[gi] = c + 1
                if c + 1 == cap:
                    _compact(gi, k_eff, pos, sc, cnt, thr, full)
            elif x != x:
                nan = True
    return nan


def static_and_pool(n, sinks, window):
    """The oracle's ``static_set`` and ``candidates`` as the ranges they are, ``[0, s) u [w, n)`` and
    ``[s, w)`` with ``s = min(sinks, n)``, ``w = max(n - window, s)``: its ``union1d``/``setdiff1d`` sort
    the whole cache's indices (4-9 ms at n = 32,768)."""
    s = min(sinks, n)
    w = max(n - window, s)
    return np.concatenate([np.arange(s), np.arange(w, n)]), np.arange(s, w)


def mips_topk(q, k, pool, top_k):
    """``[H_q, k_eff]``: per query head the ``k_eff = min(top_k, |pool|)`` pool tokens with the largest
    ``q . k`` of its KV head (float64 accumulation), ties to the lower index, sorted ascending."""
    m, k_eff = pool.shape[0], min(top_k, pool.shape[0])
    slices = max(1, min(-(-TASKS_PER_THREAD * numba.get_num_threads() // k.shape[0]), m // (16 * max(k_eff, 1))))
    out, nan = _mips_topk(q, k, pool, k_eff, slices)
    if nan:
        raise ValueError("q . k has NaN scores (non-finite q or k): the oracle's tie rule refuses them")
    return out


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _mips_topk(q, k, pool, k_eff, slices):
    """``mips_topk`` in ``slices`` slices per KV head.

    Layout: q ``[H_q, d]`` (copied to float64 ``qd``), k ``[H_kv, n, d]`` row-major, pool ``[m]``
    ascending cache indices. Pass 1: one task per (KV head, slice of the pool) streams the slice's K
    rows once for the group's G heads (``_scan_slice``) into per-head buffers ``pos``/``sc
    [G, 2 k_eff]``, left holding each head's slice top-``k_eff`` in ascending position,
    copied to ``cand_pos``/``cand_score [H_q, slices, k_eff]``. Pass 2, per query head: ``topk_set``
    over its slices' candidates concatenated. The top-k under (score desc, index asc) lies in the
    union of the slices' top-k under the same order, and the concatenation is in ascending index
    order, so ``topk_set``'s lower-index tie rule picks what one search over the whole pool would."""
    h_q = q.shape[0]
    h_kv = k.shape[0]
    g = h_q // h_kv
    m = pool.shape[0]
    out = np.zeros((h_q, k_eff), np.int64)
    if k_eff == 0:
        return out, False
    qd = np.empty(q.shape, np.float64)
    for h in range(h_q):
        for c in range(q.shape[1]):
            qd[h, c] = q[h, c]
    cand_pos = np.empty((h_q, slices, k_eff), np.int64)
    cand_score = np.empty((h_q, slices, k_eff), np.float64)
    cand_n = np.zeros((h_q, slices), np.int64)
    nan = np.zeros(h_kv * slices, np.bool_)
    for task in numba.prange(h_kv * slices):
        kvh, part = task // slices, task % slices
        pos = np.empty((g, 2 * k_eff), np.int64)
        sc = np.empty((g, 2 * k_eff), np.float64)
        cnt = np.zeros(g, np.int64)
        thr = np.full(g, -np.inf)
        full = np.zeros(g, np.bool_)
        nan[task] = _scan_slice(qd, k, kvh, pool, part * m // slices, (part + 1) * m // slices, k_eff,
                                pos, sc, cnt, thr, full)
        for gi in range(g):
            if cnt[gi] > k_eff:
                _compact(gi, k_eff, pos, sc, cnt, thr, full)
            h = kvh * g + gi
            for b in range(cnt[gi]):
                cand_pos[h, part, b] = pos[gi, b]
                cand_score[h, part, b] = sc[gi, b]
            cand_n[h, part] = cnt[gi]
    for h in numba.prange(h_q):
        total = 0
        for part in range(slices):
            total += cand_n[h, part]
        pos = np.empty(total, np.int64)
        sc = np.empty(total, np.float64)
        b = 0
        for part in range(slices):
            for t in range(cand_n[h, part]):
                pos[b] = cand_pos[h, part, t]
                sc[b] = cand_score[h, part, t]
                b += 1
        sel = topk_set(sc, k_eff)
        for i in range(sel.shape[0]):      # short only when NaN scores were left out (then refused)
            out[h, i] = pool[pos[sel[i]]]
    return out, nan.any()


@register_kernel("retrieval_attention", "numba")
def retrieval_attention(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out [H_q, d], indices [H_q, B])``. ``positions`` are ignored: the
    method indexes the cache (never compacted), as the oracle does."""
    if core.exact_ratio(method.recall) != 1:
        raise ValueError(f"the Numba retrieval_attention kernel implements exact retrieval only "
                         f"(recall = 1), got recall={method.recall!r}")
    q, k, v = check_float_arrays(q, k, v)
    h_q, n = q.shape[0], k.shape[1]
    static, pool = static_and_pool(n, method.sinks, method.window)
    retrieved = mips_topk(q, k, pool, method.top_k)
    gpu_out, gpu_lse = sparse_attention(q, k, v, np.broadcast_to(static, (k.shape[0], static.size)),
                                        scale=scale, check=False)
    cpu_out, cpu_lse = attend_selection(q, k, v, list(retrieved), scale=scale)
    out, _ = merge_partials(np.stack([gpu_out, cpu_out]), np.stack([gpu_lse, cpu_lse]))
    sets = np.sort(np.concatenate([np.broadcast_to(static, (h_q, static.size)), retrieved], axis=1), axis=1)
    return out.astype(q.dtype), sets
