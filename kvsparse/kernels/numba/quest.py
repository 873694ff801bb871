"""Quest in Numba: page metadata (element-wise key min/max per page), page scores
``sum_i max(q_i min_i, q_i max_i)`` per query head, top pages (the core tie rule), then attention
over the group's union of chosen pages with 0/1 per-head weights (each KV row read once per group).

Every convention is the oracle's (``kvsparse.oracle.quest.Quest``): the kernel reads the Method's
fields (budget rounding, ``last_page``, dense fallbacks, dense layers).
"""
from __future__ import annotations

import numba
import numpy as np

from ...registry import register_kernel
from ._select import mask_to_indices, masks_to_lists, topk_set
from .attention import FASTMATH, check_float_arrays, dense_attention, sparse_attention


@numba.njit(cache=True, parallel=True)
def page_metadata(k, page_size):
    """``(kmin, kmax)`` ``[H_kv, ceil(n/P), d]``; the partial last page covers its filled tokens only."""
    h_kv, n, d = k.shape
    n_pages = (n + page_size - 1) // page_size
    kmin = np.empty((h_kv, n_pages, d), k.dtype)
    kmax = np.empty((h_kv, n_pages, d), k.dtype)
    for job in numba.prange(h_kv * n_pages):
        h, p = job // n_pages, job % n_pages
        start = p * page_size
        for c in range(d):
            kmin[h, p, c] = k[h, start, c]
            kmax[h, p, c] = k[h, start, c]
        for i in range(start + 1, min(n, start + page_size)):
            for c in range(d):
                x = k[h, i, c]
                if x < kmin[h, p, c]:
                    kmin[h, p, c] = x
                if x > kmax[h, p, c]:
                    kmax[h, p, c] = x
    return kmin, kmax


@numba.njit(cache=True, fastmath=FASTMATH)
def page_scores(q, kmin, kmax):
    """``[H_q, n_pages]`` upper bounds (unscaled), query head h on KV head h // G."""
    h_q, d = q.shape
    h_kv, n_pages, _ = kmin.shape
    g = h_q // h_kv
    out = np.empty((h_q, n_pages), q.dtype)
    for job in range(h_kv):   # 1/P of the keys' bytes: not worth a parallel region's compile time
        for p in range(n_pages):
            for gi in range(g):
                h = job * g + gi
                s = max(q[h, 0] * kmin[job, p, 0], q[h, 0] * kmax[job, p, 0])
                for c in range(1, d):
                    a = q[h, c] * kmin[job, p, c]
                    b = q[h, c] * kmax[job, p, c]
                    s += a if a > b else b
                out[h, p] = s
    return out


@numba.njit(cache=True)
def _page_mask(scores, n, page_size, n_choose, last_always):
    """``[H_q, n]`` token mask of each head's top ``n_choose`` pages (+ the last page if ``last_always``)."""
    h_q, n_pages = scores.shape
    mask = np.zeros((h_q, n), np.bool_)
    for h in range(h_q):
        if last_always:
            chosen = topk_set(scores[h, : n_pages - 1], n_choose)
        else:
            chosen = topk_set(scores[h], n_choose)
        for p in chosen:
            for i in range(p * page_size, min(n, (p + 1) * page_size)):
                mask[h, i] = True
        if last_always:
            for i in range((n_pages - 1) * page_size, n):
                mask[h, i] = True
    return mask


def quest_mask(method, q, k, *, kmin=None, kmax=None):
    """The ``[H_q, n]`` token mask Quest selects, or ``None`` for a dense step."""
    n = k.shape[1]
    if method.is_dense(n):
        return None
    if kmin is None or kmax is None:
        kmin, kmax = page_metadata(k, method.page_size)
    scores = page_scores(q, kmin, kmax)
    n_pages = scores.shape[1]
    always = method.last_page == "always"
    n_choose = method.page_budget(n) - 1 if always else min(method.page_budget(n), n_pages)
    return _page_mask(scores, n, method.page_size, n_choose, always)


@register_kernel("quest", "numba")
def quest(method, q, k, v, *, positions=None, scale=None, kmin=None, kmax=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)``; ``method`` is a ``Quest``.

    ``kmin``/``kmax`` (``page_metadata(k, P)``) may be passed when maintained across steps.
    """
    q, k, v = check_float_arrays(q, k, v)
    mask = quest_mask(method, q, k, kmin=kmin, kmax=kmax)
    if mask is None:
        out, _ = dense_attention(q, k, v, scale=scale)
        return out, np.broadcast_to(np.arange(k.shape[1]), (q.shape[0], k.shape[1]))
    lists, lengths, w, shared = masks_to_lists(mask, k.shape[0], np.ones(1, q.dtype))
    out, _ = sparse_attention(q, k, v, lists, lengths, None if shared else w, scale=scale, check=False)
    return out, mask_to_indices(mask)
