"""CORM in Numba (stateful): attention over each unit's kept tokens, then the "recent message" rule
updates every kept key's last-important stamp and evicts keys minor for all of the last ``window``
queries. Conventions (units, the ``threshold / m`` importance test, prefill order, the protected
``recent`` span): the oracle's, ``kvsparse.oracle.corm`` (our definition of the method).

State: the K/V history (original positions, amortised growth), ``kept [U, capacity]`` and
``last [U, capacity]``; U = H_kv under ``gqa="union"`` (a group shares one cache), H_q otherwise.
Softmax scale: the one given to ``prefill`` (``None``: ``1/sqrt(d)``), stored in the state and used by
every decode step; ``decode``'s ``scale`` must be None or equal to it (the oracle's rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ...oracle import core
from ...oracle.method import decode_scale
from ...registry import register_kernel
from .attention import FASTMATH, _write_group, check_float_arrays, kept_group


@dataclass
class CORMKernelState:
    k: np.ndarray        # [H_kv, capacity, d]; rows [0, n) are tokens 0..n-1
    v: np.ndarray
    kept: np.ndarray     # [U, capacity] bool
    last: np.ndarray     # [U, capacity] int64
    n: int
    scale: float | None = None   # the softmax scale prefill was run with


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def corm_step(q, k, v, n, kept, last, threshold, scale, out):
    """Query at position ``n - 1`` attends each unit's kept keys among ``0..n-1`` (into ``out``);
    every kept key with probability ``>= threshold / m`` (m: keys the head attended) gets stamp n - 1.

    ``k``/``v`` ``[H_kv, capacity, d]`` (rows ``< n`` read), ``kept``/``last`` ``[U, capacity]``. The
    attention is ``attention.kept_group``'s (one ``prange`` task per KV head, as ``kept_attention``);
    the stamps are set inside the same task from its float64 exponentials and sums, so the test compares
    float64 probabilities (none rounded to the input dtype: a rounding could flip a key at the threshold
    against the oracle), and every unit lies inside one KV group (U = H_kv or H_q), so no two tasks
    write the same ``last`` entry."""
    h_q = q.shape[0]
    h_kv = k.shape[0]
    g = h_q // h_kv
    per_unit = h_q // kept.shape[0]
    t = n - 1
    lse = np.empty(h_q, np.float64)   # _write_group's, unused here
    for kvh in numba.prange(h_kv):
        rows, m, e, mx, tot, acc = kept_group(q, k, v, kept, n, scale, kvh)
        _write_group(acc, tot, mx, kvh, out, lse)
        for gi in range(g):
            u = (kvh * g + gi) // per_unit
            attended = 0
            for b in range(m):
                attended += kept[u, rows[b]]
            for b in range(m):
                if kept[u, rows[b]] and e[gi, b] / tot[gi] >= threshold / attended:
                    last[u, rows[b]] = t


@numba.njit(cache=True)
def corm_evict(kept, last, n, window, recent_span):
    t = n - 1
    for u in range(kept.shape[0]):
        for p in range(max(0, t + 1 - recent_span)):
            if t - last[u, p] >= window:
                kept[u, p] = False


def _units(method, h_q, h_kv):
    return h_kv if method.gqa == "union" else h_q


def _scale(scale, d):
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    return s


class CORMKernel:
    """Kernel-step contract, stateful form: ``prefill`` then ``decode`` per token (indices: original
    positions of the unit's kept tokens before this step's eviction, as the oracle reports)."""

    def prefill(self, method, q_prompt, k_prompt, v_prompt, *, scale=None) -> CORMKernelState:
        t, h_kv, d = k_prompt.shape
        if t < 1:
            raise ValueError("CORM's prefill needs at least one prompt token")
        h_q = q_prompt.shape[1]
        core.group_size(h_q, h_kv)
        cap = max(16, 2 * t)
        k = np.zeros((h_kv, cap, d), k_prompt.dtype)
        v = np.zeros((h_kv, cap, d), v_prompt.dtype)
        k[:, :t] = k_prompt.transpose(1, 0, 2)
        v[:, :t] = v_prompt.transpose(1, 0, 2)
        units = _units(method, h_q, h_kv)
        kept = np.zeros((units, cap), np.bool_)
        kept[:, :t] = True
        last = np.broadcast_to(np.arange(cap, dtype=np.int64), (units, cap)).copy()  # a key judges itself
        out = np.empty((h_q, d), np.float64)
        sc = _scale(scale, d)
        for i in range(t):   # causal: prompt query i sees keys 0..i, nothing evicted before the end
            q, _, _ = check_float_arrays(np.ascontiguousarray(q_prompt[i]), k, v)
            corm_step(q, k, v, i + 1, kept, last, float(method.threshold), sc, out)
        corm_evict(kept, last, t, method.window, method.recent_span)
        return CORMKernelState(k, v, kept, last, t, sc)

    def decode(self, method, state: CORMKernelState, q, k_new, v_new, *, scale=None):
        scale = decode_scale(state.scale, scale)
        if state.n == state.k.shape[1]:   # amortised growth
            grow = lambda x, fill: np.concatenate([x, np.full_like(x, fill)], axis=1)
            state = CORMKernelState(grow(state.k, 0), grow(state.v, 0), grow(state.kept, False),
                                    grow(state.last, 0), state.n, state.scale)
        t = state.n
        state.k[:, t] = k_new
        state.v[:, t] = v_new
        state.kept[:, t] = True
        state.last[:, t] = t
        n = t + 1
        q, k, v = check_float_arrays(q, state.k, state.v)
        out = np.empty(q.shape, np.float64)
        corm_step(q, k, v, n, state.kept, state.last, float(method.threshold), _scale(scale, q.shape[1]), out)
        per_unit = q.shape[0] // state.kept.shape[0]
        # one scan per unit (not per query head): the heads of a unit share its kept set
        rows = [np.flatnonzero(state.kept[u, :n]) for u in range(state.kept.shape[0])]
        indices = [rows[h // per_unit] for h in range(q.shape[0])]
        corm_evict(state.kept, state.last, n, method.window, method.recent_span)
        return CORMKernelState(state.k, state.v, state.kept, state.last, n, state.scale), (out.astype(q.dtype), indices)


corm = register_kernel("corm", "numba")(CORMKernel())
