"""ClusterKV in Numba (stateful): decode-time cluster ranking, budget filling and attention.

Prefill clusters each KV head's prompt keys with the oracle's ``kmeans`` (float64, seeded: the
clustering is a one-off plan, and reusing it keeps the two states identical) and stores, per KV head,
the centroids (float64 metadata), the clustered positions grouped by cluster (ascending inside each)
and the cluster offsets. Each decode step ranks the clusters by ``q . c`` (float64 accumulation,
ties to the lower cluster id), takes members in that order up to ``clip(budget - sinks, 0, m)``
tokens, adds the sinks and every generated token, and attends over those per-head sets
(``attention.kept_attention`` on the state's capacity buffers: no copy of the cache, each row loaded
once per KV group).
Conventions: ``kvsparse.oracle.clusterkv`` (budget counts sinks, not generated tokens; gqa policies).
Softmax scale: ranking is unscaled (``q . c``); the scale given to ``prefill`` (``None``: ``1/sqrt(d)``)
is stored and used by every decode step's attention; ``decode``'s ``scale`` must be None or equal to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ...oracle import core
from ...oracle.clusterkv import clustered_budget
from ...oracle.method import decode_scale, prefill_scale
from ...registry import register_kernel
from .attention import FASTMATH, _dot, check_float_buffers, kept_attention
from .snapkv import unit_rows_per_query_head


@dataclass
class ClusterKVKernelState:
    k: np.ndarray           # [H_kv, capacity, d]; rows [0, n) are tokens 0..n-1
    v: np.ndarray
    n: int
    prompt_len: int
    first: int              # clustered positions are [first, prompt_len)
    centroids: np.ndarray   # [H_kv, C, d] float64
    members: np.ndarray     # [H_kv, m] positions grouped by cluster
    offsets: np.ndarray     # [H_kv, C + 1]
    scale: float | None = None   # the softmax scale prefill was given


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def fill_budget(queries, centroids, members, offsets, r):
    """``[H_q, r]``: per query head the first ``r`` members of its KV head's clusters ranked by
    ``query . centroid`` (descending, lower id on ties), members in ascending position."""
    h_q = queries.shape[0]
    g = h_q // centroids.shape[0]
    c = centroids.shape[1]
    out = np.empty((h_q, r), np.int64)
    for h in numba.prange(h_q):
        kv = h // g
        s = np.empty(c, np.float64)
        for j in range(c):
            s[j] = -_dot(queries[h], centroids[kv, j])
        order = np.argsort(s, kind="mergesort")   # stable: equal scores keep the lower cluster id first
        taken = 0
        for j in order:
            for i in range(offsets[kv, j], offsets[kv, j + 1]):
                if taken == r:
                    break
                out[h, taken] = members[kv, i]
                taken += 1
            if taken == r:
                break
    return out


class ClusterKVKernel:
    """Kernel-step contract, stateful form: ``prefill`` then ``decode`` per token (original positions).
    ``decode`` appends to the state in place and returns it (the K/V buffers grow by doubling)."""

    def prefill(self, method, q_prompt, k_prompt, v_prompt, *, scale=None) -> ClusterKVKernelState:
        t, h_kv, d = k_prompt.shape
        scale = prefill_scale(scale, d)
        if q_prompt.ndim != 3 or v_prompt.shape != k_prompt.shape or q_prompt.shape[0] != t:
            raise ValueError(f"prompts must be q [T, H_q, d], k/v [T, H_kv, d]; got {q_prompt.shape}, "
                             f"{k_prompt.shape}, {v_prompt.shape}")
        core.group_size(q_prompt.shape[1], h_kv)
        first = min(method.sinks, t)
        fits = method.cluster(k_prompt)           # the oracle's k-means, per KV head
        centroids = np.stack([f.centroids for f in fits]).reshape(h_kv, -1, d)
        members = np.stack([np.argsort(f.labels, kind="stable") + first for f in fits]).reshape(h_kv, t - first)
        offsets = np.stack([np.concatenate([[0], np.cumsum(f.sizes)]) for f in fits]).astype(np.int64)
        cap = max(16, 2 * t)
        k = np.zeros((h_kv, cap, d), k_prompt.dtype)
        v = np.zeros((h_kv, cap, d), v_prompt.dtype)
        k[:, :t] = k_prompt.transpose(1, 0, 2)
        v[:, :t] = v_prompt.transpose(1, 0, 2)
        return ClusterKVKernelState(k, v, t, t, first, np.ascontiguousarray(centroids),
                                    np.ascontiguousarray(members, dtype=np.int64), offsets.reshape(h_kv, -1),
                                    scale)

    def decode(self, method, state: ClusterKVKernelState, q, k_new, v_new, *, scale=None):
        scale = decode_scale(state.scale, scale)
        if state.n == state.k.shape[1]:   # amortised growth
            grow = lambda x: np.concatenate([x, np.zeros_like(x)], axis=1)
            state.k, state.v = grow(state.k), grow(state.v)
        state.k[:, state.n] = k_new
        state.v[:, state.n] = v_new
        state.n += 1
        # the buffers as they are: slicing [:, :n] and making it contiguous would copy the whole cache
        q, k, v = check_float_buffers(q, state.k, state.v, state.n)
        h_q, d = q.shape
        h_kv, m = state.members.shape
        r = clustered_budget(method.budget, method.sinks, m)
        if r == m:
            chosen = np.repeat(state.members, h_q // h_kv, axis=0)
        elif r == 0:
            chosen = np.zeros((h_q, 0), np.int64)
        else:
            queries = q.astype(np.float64)
            if method.gqa == "mean_query":
                g = h_q // h_kv
                queries = np.repeat(queries.reshape(h_kv, g, d).mean(axis=1), g, axis=0)
            elif method.gqa != "per_query_head":
                raise ValueError(f"gqa must be 'per_query_head' or 'mean_query', got {method.gqa!r}")
            chosen = fill_budget(np.ascontiguousarray(queries), state.centroids, state.members, state.offsets, r)
        # per query head a kept mask: the sinks, every generated token, the chosen members (disjoint
        # by construction: members lie in [first, prompt_len), each once)
        kept = np.zeros((h_q, state.n), np.bool_)
        kept[:, : state.first] = True
        kept[:, state.prompt_len:] = True
        np.put_along_axis(kept, chosen, True, axis=1)
        out, _, _ = kept_attention(q, k, v, state.n, kept, scale=scale)
        return state, (out, unit_rows_per_query_head(kept, h_q))


clusterkv = register_kernel("clusterkv", "numba")(ClusterKVKernel())
