"""SnapKV in Numba (PyramidKV and H2O reuse its kernels): prefill window vote, pooling, selection;
decode over the kept rows of each unit.

Kernels (float32 or float64 inputs; logits, exponentials and sums accumulate in float64, results are
stored in the input dtype, as ``attention.py``):
  window_vote        ``[H_q, T]``: column sums of the causal softmax rows of the last ``w`` prompt
                     queries (H2O's prefill is the same vote with ``w = T``); ``prange`` over query heads.
  masked_attention   one decode step over a per-query-head kept mask ``[H_q, n]``: output ``[H_q, d]``
                     and the step's probabilities ``[H_q, n]`` (0 off the mask); ``prange`` over heads.
Decode attends with ``attention.kept_attention`` on the state's ``[H_kv, capacity, d]`` buffers (rows
``< n`` read, no copy of the cache; each kept row loaded once per KV group).
Host side (NumPy, O(H T)): mean over the window, pooling (``core.pool1d``: the oracle's padding
rules), GQA reduction before/after pooling, ``+inf`` on the window, top ``budget_total`` per unit by
a stable sort (core tie rule: higher score, then lower position). Every convention is the oracle's
(``kvsparse.oracle.snapkv.SnapKV``); the budget comes from ``method.budget_total`` so PyramidKV's
per-layer budget is honoured by the same code. Softmax scale: ``prefill(..., scale=None)`` votes with
it (``None``: ``1/sqrt(d)``) and stores it in the state; ``decode(..., scale=None)`` uses the state's,
an explicit one must equal it (``kvsparse.oracle.method.decode_scale``), as the oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ...oracle import core
from ...oracle.method import decode_scale, prefill_scale
from ...oracle.sliding_window import reduce_group
from ...registry import register_kernel
from .attention import FASTMATH, _dot, check_float_arrays, kept_attention


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _window_vote(q, k, w, scale, out):
    t, h_q, d = q.shape
    g = h_q // k.shape[1]
    for h in numba.prange(h_q):
        kvh = h // g
        acc = np.zeros(t)
        logit = np.empty(t)
        for i in range(t - w, t):
            mx = -np.inf
            for j in range(i + 1):
                logit[j] = _dot(q[i, h], k[j, kvh]) * scale
                mx = max(mx, logit[j])
            tot = 0.0
            for j in range(i + 1):
                logit[j] = math.exp(logit[j] - mx)
                tot += logit[j]
            for j in range(i + 1):
                acc[j] += logit[j] / tot
        for j in range(t):
            out[h, j] = acc[j]


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _masked_attention(q, k, v, mask, scale, out, probs):
    h_q, d = q.shape
    n = k.shape[1]
    g = h_q // k.shape[0]
    for h in numba.prange(h_q):
        kvh = h // g
        logit = np.full(n, -np.inf)
        mx = -np.inf
        for j in range(n):
            if mask[h, j]:
                logit[j] = _dot(q[h], k[kvh, j]) * scale
                mx = max(mx, logit[j])
        tot = 0.0
        acc = np.zeros(d)
        for j in range(n):
            if mask[h, j]:
                e = math.exp(logit[j] - mx)
                logit[j] = e
                tot += e
                for c in range(d):
                    acc[c] += e * v[kvh, j, c]
        for j in range(n):
            probs[h, j] = logit[j] / tot if mask[h, j] and tot > 0 else 0.0
        for c in range(d):
            out[h, c] = acc[c] / tot if tot > 0 else 0.0


def window_vote(q_prompt, k_prompt, window: int, *, scale=None) -> np.ndarray:
    """``[H_q, T]`` in the input dtype: the last ``window`` queries' causal softmax mass on each key."""
    q_prompt, k_prompt = np.ascontiguousarray(q_prompt), np.ascontiguousarray(k_prompt)
    t, h_q, d = q_prompt.shape
    out = np.empty((h_q, t), q_prompt.dtype)
    _window_vote(q_prompt, k_prompt, window, core.default_scale(d) if scale is None else float(scale), out)
    return out


def masked_attention(q, k, v, mask, *, scale=None):
    """``(out [H_q, d], probs [H_q, n])`` of one decode step over the kept mask ``[H_q, n]``."""
    q, k, v = check_float_arrays(q, k, v)
    out = np.empty(q.shape, q.dtype)
    probs = np.empty((q.shape[0], k.shape[1]), q.dtype)
    _masked_attention(q, k, v, np.ascontiguousarray(mask), core.default_scale(q.shape[1]) if scale is None
                      else float(scale), out, probs)
    return out, probs


def topk_rows(scores: np.ndarray, size: int) -> np.ndarray:
    """Boolean ``[U, n]``: the top ``size`` per row, higher score first, lower position on ties."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :size]
    kept = np.zeros(scores.shape, bool)
    np.put_along_axis(kept, order, True, axis=1)
    return kept


def rows_per_query_head(rows: np.ndarray, h_q: int) -> np.ndarray:
    return rows if rows.shape[0] == h_q else np.repeat(rows, h_q // rows.shape[0], axis=0)


@numba.njit(cache=True, parallel=True)
def kept_rows(kept):
    """``kept [U, n]`` bool -> ``(rows [U, B + 1], counts [U])``: row u's kept positions, ascending, in
    ``rows[u, :counts[u]]`` (B = the largest count; the rest is scratch). ``prange`` over units."""
    units, n = kept.shape
    counts = np.zeros(units, np.int64)
    for u in numba.prange(units):
        c = 0
        for j in range(n):
            c += kept[u, j]
        counts[u] = c
    # branch-free compaction (kept masks are irregular: a branch per position mispredicts); every
    # position is written at the cursor, which advances only past kept ones, hence one spare column
    rows = np.empty((units, (counts.max() if units else 0) + 1), np.int64)
    for u in numba.prange(units):
        b = 0
        for j in range(n):
            rows[u, b] = j
            b += kept[u, j]
    return rows, counts


def unit_rows_per_query_head(kept: np.ndarray, h_q: int) -> list:
    """Per query head, the kept positions of its unit (``kept [U, n]``, U | H_q), ascending: what
    ``flatnonzero`` of each row of ``rows_per_query_head`` gives, from one compiled scan of ``kept``
    (the heads of a unit share one view)."""
    rows, counts = kept_rows(np.ascontiguousarray(kept, dtype=np.bool_))
    views = [rows[u, : counts[u]] for u in range(kept.shape[0])]
    per_unit = h_q // kept.shape[0]
    return [views[h // per_unit] for h in range(h_q)]


@dataclass
class EvictionState:
    """K/V of every token (original positions, ``[H_kv, capacity, d]``, rows ``< n`` valid), the kept
    mask per unit ``[U, n]``, (H2O) the accumulated scores ``[U, n]`` in the kernel's dtype, and the
    softmax scale prefill was run with."""

    k: np.ndarray
    v: np.ndarray
    n: int
    kept: np.ndarray
    scores: np.ndarray | None = None
    heavy: int = 0
    recent: int = 0
    scale: float | None = None


def new_state(k_prompt, v_prompt, kept, **extra) -> EvictionState:
    t, h_kv, d = k_prompt.shape
    cap = max(16, 2 * t)
    k = np.zeros((h_kv, cap, d), k_prompt.dtype)
    v = np.zeros((h_kv, cap, d), v_prompt.dtype)
    k[:, :t], v[:, :t] = k_prompt.transpose(1, 0, 2), v_prompt.transpose(1, 0, 2)
    return EvictionState(k, v, t, kept, **extra)


def append(state: EvictionState, k_new, v_new) -> EvictionState:
    """A new state with token ``n`` appended (kept by every unit; score 0); the old one stays valid
    as long as nobody appends to it again (the buffers are shared, rows < n never change)."""
    k, v, n = state.k, state.v, state.n
    if n == k.shape[1]:   # amortised growth
        k, v = (np.concatenate([x, np.zeros_like(x)], axis=1) for x in (k, v))
    k[:, n], v[:, n] = k_new, v_new
    kept = np.concatenate([state.kept, np.ones((state.kept.shape[0], 1), bool)], axis=1)
    scores = None if state.scores is None else np.concatenate(
        [state.scores, np.zeros((state.scores.shape[0], 1), state.scores.dtype)], axis=1)
    return EvictionState(k, v, n + 1, kept, scores, state.heavy, state.recent, state.scale)


def check_prompt_arrays(q_prompt, k_prompt, v_prompt):
    """``q [T, H_q, d]``, ``k``/``v`` ``[T, H_kv, d]``, one float dtype, ``T >= 1``, H_q a multiple of H_kv."""
    arrays = [np.ascontiguousarray(x) for x in (q_prompt, k_prompt, v_prompt)]
    for name, x in zip(("q_prompt", "k_prompt", "v_prompt"), arrays):
        if x.ndim != 3 or x.dtype not in (np.float32, np.float64):
            raise ValueError(f"{name} must be a 3-D float32/float64 array [T, heads, d], got {x.dtype} {x.shape}")
    q, k, v = arrays
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q_prompt [T, H_q, d] and k_prompt/v_prompt [T, H_kv, d] must agree, got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if q.shape[0] < 1:
        raise ValueError("the prompt must hold at least one token")
    core.group_size(q.shape[1], k.shape[1])
    return q, k, v


def _pool(x, method):
    return x.copy() if method.pool == "none" else core.pool1d(x, method.kernel, method.pool).astype(x.dtype)


class SnapKVKernel:
    """Kernel-step contract, stateful form: ``prefill`` then ``decode`` per token."""

    def unit_scores(self, method, q_prompt, k_prompt, *, scale=None) -> np.ndarray:
        t, h_kv = k_prompt.shape[:2]
        raw = window_vote(q_prompt, k_prompt, method.window, scale=scale)[:, : t - method.window]
        if method.window_score == "mean":
            raw = raw / raw.dtype.type(method.window)
        if method.gqa == "per_query_head":
            pooled = _pool(raw, method)
        elif method.reduce_before_pool:
            pooled = _pool(reduce_group(raw, h_kv, method.gqa).astype(raw.dtype), method)
        else:
            pooled = reduce_group(_pool(raw, method), h_kv, method.gqa).astype(raw.dtype)
        return np.concatenate([pooled, np.full((pooled.shape[0], method.window), np.inf, raw.dtype)], axis=1)

    def prefill(self, method, q_prompt, k_prompt, v_prompt, *, scale=None) -> EvictionState:
        q_prompt, k_prompt, v_prompt = check_prompt_arrays(q_prompt, k_prompt, v_prompt)
        t, h_kv = k_prompt.shape[:2]
        scale = prefill_scale(scale, q_prompt.shape[2])
        units = q_prompt.shape[1] if method.gqa == "per_query_head" else h_kv
        if method.compression_ratio is not None and t <= method.window:
            raise ValueError(f"kvpress needs more prompt tokens ({t}) than window ({method.window})")
        n_total = method.budget_total(t)
        kept = np.ones((units, t), bool) if n_total is None else \
            topk_rows(self.unit_scores(method, q_prompt, k_prompt, scale=scale), n_total)
        return new_state(k_prompt, v_prompt, kept, scale=scale)

    def decode(self, method, state: EvictionState, q, k_new, v_new, *, scale=None):
        scale = decode_scale(state.scale, scale)
        state = append(state, k_new, v_new)
        # the capacity buffers as they are (k[:, :n] made contiguous would copy the whole cache)
        out, _, _ = kept_attention(q, state.k, state.v, state.n, state.kept, scale=scale)
        return state, (out, unit_rows_per_query_head(state.kept, q.shape[0]))

    def __call__(self, method, q, k, v, *, positions=None, scale=None):
        raise TypeError(f"the {method.name} kernel is stateful: call .prefill(...) then .decode(...)")


snapkv = register_kernel("snapkv", "numba")(SnapKVKernel())
