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
from ...oracle.retrieval_attention import candidates, static_set
from ...registry import register_kernel
from .attention import FASTMATH, _dot, attend_selection, check_float_arrays, merge_partials, sparse_attention


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def mips_topk(q, k, pool, top_k):
    """``[H_q, k_eff]``: per query head the ``k_eff = min(top_k, |pool|)`` pool tokens with the largest
    ``q . k`` of its KV head (float64 accumulation), ties to the lower index, sorted ascending."""
    h_q = q.shape[0]
    g = h_q // k.shape[0]
    k_eff = min(top_k, pool.shape[0])
    out = np.empty((h_q, k_eff), np.int64)
    for h in numba.prange(h_q):
        s = np.empty(pool.shape[0], np.float64)
        for j in range(pool.shape[0]):
            s[j] = -_dot(q[h], k[h // g, pool[j]])
        order = np.argsort(s, kind="mergesort")   # stable: equal scores keep the lower index first
        out[h] = np.sort(pool[order[:k_eff]])
    return out


@register_kernel("retrieval_attention", "numba")
def retrieval_attention(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out [H_q, d], indices [H_q, B])``. ``positions`` are ignored: the
    method indexes the cache (never compacted), as the oracle does."""
    if core.exact_ratio(method.recall) != 1:
        raise ValueError(f"the Numba retrieval_attention kernel implements exact retrieval only "
                         f"(recall = 1), got recall={method.recall!r}")
    q, k, v = check_float_arrays(q, k, v)
    h_q, n = q.shape[0], k.shape[1]
    static = static_set(n, method.sinks, method.window)
    pool = candidates(n, method.sinks, method.window)
    retrieved = mips_topk(q, k, pool, method.top_k)
    gpu_out, gpu_lse = sparse_attention(q, k, v, np.broadcast_to(static, (k.shape[0], static.size)),
                                        scale=scale, check=False)
    cpu_out, cpu_lse = attend_selection(q, k, v, list(retrieved), scale=scale)
    out, _ = merge_partials(np.stack([gpu_out, cpu_out]), np.stack([gpu_lse, cpu_lse]))
    sets = np.sort(np.concatenate([np.broadcast_to(static, (h_q, static.size)), retrieved], axis=1), axis=1)
    return out.astype(q.dtype), sets
