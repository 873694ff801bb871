"""Decode attention on the CPU in Numba: dense, over index sets, and the log-sum-exp merge.

Layout (C-contiguous; float32 or float64, one dtype for q, k, v and weights):
  q        [H_q, d]
  k, v     [H_kv, n, d]
  indices  [H_kv, B] int32/int64: ONE index list per KV head, shared by its G query heads, so each
           selected K and V row is loaded once per group. Entries past ``lengths[h]`` are ignored.
           Entries must be unique and lie in [0, n) (checked).
  weights  [H_q, B], optional, >= 0: multiplies exp(logit) of entry b for query head h. A per-query-head
           selection inside a group is expressed as the group's union list with 0/1 weights
           (``union_with_weights``); Horvitz-Thompson factors of estimators are weights too.
Outputs: out [H_q, d] and lse [H_q] (natural log of sum_b w_b exp(logit_b)), both in q's dtype;
an empty (or all-zero-weight) selection gives out = 0 and lse = -inf.

Growing caches (the stateful kernels' states): k, v ``[H_kv, capacity, d]`` C-contiguous buffers whose
first ``n`` rows are the cache. ``sparse_attention_prefix`` and ``kept_attention`` take the buffers and
``n`` and never read rows ``>= n``; slicing ``k[:, :n]`` instead would make the entry check copy the
whole cache each step (it is not contiguous). ``kept_attention`` takes a kept mask ``[U, n]`` (one set
per query head, or per KV group) instead of index lists, and can return the step's probabilities.

Each KV head is one task of a ``prange`` (parallel over heads). Per task, pass 1 reads each selected K
row once and computes the G logits; pass 2 reads each V row once and accumulates the G outputs with
exp(logit - max): no online rescaling. Logits, exponentials and sums accumulate in float64 whatever
the input dtype (as GPU kernels accumulate fp16 inputs in fp32): the output's error is then close to
one rounding to the input dtype, and the memory traffic (the point of a decode kernel) is unchanged.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# reassociation lets LLVM vectorise the dot products; no 'nnan'/'ninf': -inf is meaningful here
FASTMATH = {"reassoc", "contract", "nsz"}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


PREFETCH_AHEAD = 8
"""Rows prefetched ahead in a gather: index lists jump between random rows, which no hardware
prefetcher predicts; measured 1.75x faster on one thread (benchmarks/numba.md)."""


@intrinsic
def _prefetch(typingctx, row):
    """``llvm.prefetch`` (read, keep in all cache levels) of every 64-byte line of a 1-D C array."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        base = builder.ptrtoint(ary.data, ir.IntType(64))
        nbytes = builder.mul(ary.nitems, context.get_constant(types.intp, aryty.dtype.bitwidth // 8))
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        with cgutils.for_range_slice(builder, context.get_constant(types.intp, 0), nbytes,
                                     context.get_constant(types.intp, 64)) as (off, _):
            addr = builder.inttoptr(builder.add(base, off), i8p)
            builder.call(fn, [addr, ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 3),
                              ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()
    return types.void(row), codegen


@numba.njit(cache=True, fastmath=FASTMATH)
def _dot(a, b):
    s = 0.0   # float64 accumulation: the output's error is then about one rounding to the input dtype
    for c in range(a.shape[0]):
        s += np.float64(a[c]) * b[c]
    return s


@numba.njit(cache=True, fastmath=FASTMATH)
def _write_group(acc, tot, mx, kvh, out, lse):
    """The epilogue every decode kernel shares: normalise a KV head's G accumulators into out and lse
    (an empty selection: out = 0, lse = -inf)."""
    g, d = acc.shape
    for gi in range(g):
        h = kvh * g + gi
        if tot[gi] > 0:
            for c in range(d):
                out[h, c] = acc[gi, c] / tot[gi]
            lse[h] = mx[gi] + math.log(tot[gi])
        else:
            for c in range(d):
                out[h, c] = 0.0
            lse[h] = -np.inf


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _sparse_kernel(q, k, v, idx, lengths, w, has_w, scale, out, lse):
    h_q, d = q.shape
    h_kv = k.shape[0]
    g = h_q // h_kv
    width = idx.shape[1]
    for kvh in numba.prange(h_kv):
        m_tok = lengths[kvh]
        s = np.empty((g, width), np.float64)
        for j in range(m_tok):
            if j + PREFETCH_AHEAD < m_tok:
                _prefetch(k[kvh, idx[kvh, j + PREFETCH_AHEAD]])
            row = idx[kvh, j]
            for gi in range(g):
                s[gi, j] = _dot(q[kvh * g + gi], k[kvh, row]) * scale
        mx = np.full(g, -np.inf, np.float64)
        for gi in range(g):
            h = kvh * g + gi
            for j in range(m_tok):
                if has_w:
                    s[gi, j] = s[gi, j] + math.log(np.float64(w[h, j])) if w[h, j] > 0 else -np.inf
                if s[gi, j] > mx[gi]:
                    mx[gi] = s[gi, j]
        acc = np.zeros((g, d), np.float64)
        tot = np.zeros(g, np.float64)
        for j in range(m_tok):
            if j + PREFETCH_AHEAD < m_tok:
                _prefetch(v[kvh, idx[kvh, j + PREFETCH_AHEAD]])
            row = idx[kvh, j]
            for gi in range(g):
                if mx[gi] == -np.inf:
                    continue
                p = math.exp(s[gi, j] - mx[gi])
                tot[gi] += p
                for c in range(d):
                    acc[gi, c] += p * np.float64(v[kvh, row, c])
        _write_group(acc, tot, mx, kvh, out, lse)


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _dense_kernel(q, k, v, scale, out, lse):
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    g = h_q // h_kv
    for kvh in numba.prange(h_kv):
        s = np.empty((g, n), np.float64)
        mx = np.full(g, -np.inf, np.float64)
        for i in range(n):
            for gi in range(g):
                x = _dot(q[kvh * g + gi], k[kvh, i]) * scale
                s[gi, i] = x
                if x > mx[gi]:
                    mx[gi] = x
        acc = np.zeros((g, d), np.float64)
        tot = np.zeros(g, np.float64)
        for i in range(n):
            for gi in range(g):
                p = math.exp(s[gi, i] - mx[gi])
                tot[gi] += p
                for c in range(d):
                    acc[gi, c] += p * np.float64(v[kvh, i, c])
        _write_group(acc, tot, mx, kvh, out, lse)


@numba.njit(cache=True, fastmath=FASTMATH)
def kept_group(q, k, v, kept, n, scale, kvh):
    """One KV head's part of a kept-mask attention (the body of ``_kept_kernel``'s ``prange`` task,
    shared with CORM's step): ``(rows, m, e, mx, tot, acc)`` with ``rows[:m]`` the group's union of
    kept rows among ``0..n-1`` (ascending), ``e [G, m]`` the float64 exponentials ``exp(logit - mx)`` of
    each head's own kept rows (other entries undefined), ``tot [G]`` their sums, ``acc [G, d]`` the
    unnormalised outputs. The probability of row ``rows[b]`` for head gi is ``e[gi, b] / tot[gi]``."""
    h_q, d = q.shape
    g = h_q // k.shape[0]
    per_unit = h_q // kept.shape[0]
    # the group's union of kept rows, ascending: each row is loaded once for the G heads, and a
    # head's dot products are computed only on its own rows (no 0-weight work, unlike a union
    # list). Branch-free compaction: kept masks are irregular, a branch per position mispredicts.
    rows = np.empty(n + 1, np.int64)
    m = 0
    for j in range(n):
        hit = False
        for gi in range(g):
            hit |= kept[(kvh * g + gi) // per_unit, j]
        rows[m] = j
        m += hit
    s = np.empty((g, m), np.float64)
    mx = np.full(g, -np.inf, np.float64)
    for b in range(m):
        if b + PREFETCH_AHEAD < m:
            _prefetch(k[kvh, rows[b + PREFETCH_AHEAD]])
        row = rows[b]
        for gi in range(g):
            h = kvh * g + gi
            if kept[h // per_unit, row]:
                x = _dot(q[h], k[kvh, row]) * scale
                s[gi, b] = x
                if x > mx[gi]:
                    mx[gi] = x
    acc = np.zeros((g, d), np.float64)
    tot = np.zeros(g, np.float64)
    for b in range(m):
        if b + PREFETCH_AHEAD < m:
            _prefetch(v[kvh, rows[b + PREFETCH_AHEAD]])
        row = rows[b]
        for gi in range(g):
            h = kvh * g + gi
            if kept[h // per_unit, row]:
                e = math.exp(s[gi, b] - mx[gi])
                s[gi, b] = e
                tot[gi] += e
                for c in range(d):
                    acc[gi, c] += e * np.float64(v[kvh, row, c])
    return rows, m, s, mx, tot, acc


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _kept_kernel(q, k, v, kept, n, scale, out, lse, probs, with_probs):
    h_q = q.shape[0]
    h_kv = k.shape[0]
    g = h_q // h_kv
    per_unit = h_q // kept.shape[0]
    for kvh in numba.prange(h_kv):
        rows, m, e, mx, tot, acc = kept_group(q, k, v, kept, n, scale, kvh)
        if with_probs:
            for gi in range(g):
                h = kvh * g + gi
                for j in range(n):
                    probs[h, j] = 0.0
                if tot[gi] > 0:
                    for b in range(m):
                        if kept[h // per_unit, rows[b]]:
                            probs[h, rows[b]] = e[gi, b] / tot[gi]
        _write_group(acc, tot, mx, kvh, out, lse)


@numba.njit(cache=True, parallel=True)
def _merge_kernel(outs, lses, out, lse):
    parts, h_q, d = outs.shape
    for h in numba.prange(h_q):
        mx = -np.inf
        for p in range(parts):
            if lses[p, h] > mx:
                mx = lses[p, h]
        if mx == -np.inf:
            for c in range(d):
                out[h, c] = 0.0
            lse[h] = -np.inf
            continue
        tot = 0.0
        for c in range(d):
            out[h, c] = 0.0
        for p in range(parts):
            if lses[p, h] == -np.inf:
                continue  # an empty part has weight exactly 0
            wp = math.exp(lses[p, h] - mx)
            tot += wp
            for c in range(d):
                out[h, c] += wp * outs[p, h, c]
        for c in range(d):
            out[h, c] /= tot
        lse[h] = mx + math.log(tot)


@numba.njit(cache=True)
def _check_rows(idx, lengths, n):
    """-1 if every listed row is in [0, n) and unique within its list, else the offending list."""
    seen = np.zeros(n, np.int64) - 1
    for r in range(idx.shape[0]):
        for j in range(lengths[r]):
            x = idx[r, j]
            if x < 0 or x >= n or seen[x] == r:
                return r
            seen[x] = r
    return -1


# --------------------------------------------------------------------------------------------
# validation at the boundary (Python), then one call into compiled code
# --------------------------------------------------------------------------------------------

def _check_float_types(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.ndim != 2 or k.ndim != 3:
        raise ValueError(f"q must be [H_q, d] and k [H_kv, n, d], got shapes {q.shape} and {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {k.shape}, got {v.shape}")
    h_q, d = q.shape
    if k.shape[2] != d or k.shape[0] == 0 or h_q % k.shape[0]:
        raise ValueError(f"k {k.shape} must be [H_kv, n, d={d}] with H_q={h_q} divisible by H_kv")


def check_float_arrays(q, k, v):
    """q [H_q, d], k/v [H_kv, n, d] NumPy arrays of ONE float dtype (float32 or float64); returns them contiguous."""
    _check_float_types(q, k, v)
    return np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)


def check_float_buffers(q, k, v, n: int):
    """As ``check_float_arrays`` for a cache held in the first ``n`` rows of growing buffers
    ``k``/``v`` ``[H_kv, capacity, d]``: returns ``(q, k, v)`` with k/v the buffers themselves when they
    are C-contiguous. Why: ``k[:, :n]`` of a larger buffer is not contiguous, and making it so copies
    the whole cache every decode step, while the compiled kernels only ever address rows ``< n`` (those
    they are told about), so the buffer serves as is; rows ``>= n`` are never read. A non-contiguous
    buffer costs a copy of its first ``n`` rows only."""
    _check_float_types(q, k, v)
    n = int(n)
    if not 0 <= n <= k.shape[1]:
        raise ValueError(f"n must lie in [0, {k.shape[1]}] (the buffers' capacity), got {n}")
    if not (k.flags.c_contiguous and v.flags.c_contiguous):
        k, v = np.ascontiguousarray(k[:, :n]), np.ascontiguousarray(v[:, :n])
    return np.ascontiguousarray(q), k, v


def _scale(scale, d, dtype=None):
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    return s


def dense_attention(q, k, v, *, scale=None):
    """Exact decode attention over all n tokens; returns ``(out [H_q, d], lse [H_q])`` in q's dtype."""
    q, k, v = check_float_arrays(q, k, v)
    out = np.empty_like(q)
    lse = np.empty(q.shape[0], q.dtype)
    _dense_kernel(q, k, v, _scale(scale, q.shape[1], q.dtype), out, lse)
    return out, lse


def sparse_attention(q, k, v, indices, lengths=None, weights=None, *, scale=None, check: bool = True):
    """Attention over one index list per KV head (see module doc); returns ``(out, lse)``.

    ``check=False`` skips the O(B) uniqueness/range scan (the caller guarantees it; used by kernels
    that built the lists themselves). Out-of-range rows with ``check=False`` are undefined behaviour.
    """
    q, k, v = check_float_arrays(q, k, v)
    return _sparse_call(q, k, v, k.shape[1], indices, lengths, weights, scale, check)


def sparse_attention_prefix(q, k, v, n: int, indices, lengths=None, weights=None, *, scale=None,
                            check: bool = True):
    """``sparse_attention`` over the cache held in the first ``n`` rows of growing buffers ``k``/``v``
    ``[H_kv, capacity, d]`` (the states of the stateful kernels), without copying them
    (``check_float_buffers``). Indices must lie in ``[0, n)`` (checked against ``n``, not the capacity,
    unless ``check=False``). Same results as ``sparse_attention(q, k[:, :n], v[:, :n], ...)``."""
    q, k, v = check_float_buffers(q, k, v, n)
    return _sparse_call(q, k, v, int(n), indices, lengths, weights, scale, check)


def _sparse_call(q, k, v, n, indices, lengths, weights, scale, check):
    """The boundary checks of the index lists and weights, then the compiled kernel. ``k``/``v`` are
    C-contiguous ``[H_kv, rows >= n, d]``; ``n`` bounds the rows the lists may name."""
    h_q, d = q.shape
    h_kv = k.shape[0]
    idx = np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.ndim != 2 or idx.shape[0] != h_kv:
        raise ValueError(f"indices must be [H_kv={h_kv}, B], got shape {idx.shape}")
    idx = np.ascontiguousarray(idx, dtype=np.int64 if idx.dtype.itemsize > 4 or idx.dtype.kind == "u" else np.int32)
    width = idx.shape[1]
    if lengths is None:
        lengths = np.full(h_kv, width, np.int64)
    else:
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        if lengths.shape != (h_kv,) or (lengths < 0).any() or (lengths > width).any():
            raise ValueError(f"lengths must be [H_kv={h_kv}] with values in [0, {width}], got {lengths!r}")
    if check:
        bad = _check_rows(idx, lengths, n)
        if bad >= 0:
            raise ValueError(f"indices[{bad}] must hold unique rows in [0, {n}) within its length")
    if weights is None:
        w, has_w = np.zeros((1, 1), q.dtype), False
    else:
        w = np.asarray(weights)
        if w.dtype != q.dtype:
            raise TypeError(f"weights must have q's dtype {q.dtype}, got {w.dtype}")
        if w.shape != (h_q, width):
            raise ValueError(f"weights must be [H_q={h_q}, B={width}], got shape {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative")
        w, has_w = np.ascontiguousarray(w), True
    out = np.empty_like(q)
    lse = np.empty(h_q, q.dtype)
    _sparse_kernel(q, k, v, idx, lengths, w, has_w, _scale(scale, d, q.dtype), out, lse)
    return out, lse


def merge_partials(outs, lses):
    """Log-sum-exp merge of attentions over DISJOINT parts: ``outs [P, H, d]``, ``lses [P, H]``.

    An empty part (lse = -inf) has weight exactly 0; all parts empty gives (0, -inf). Float64 math.
    """
    outs = np.ascontiguousarray(outs, dtype=np.float64)
    lses = np.ascontiguousarray(lses, dtype=np.float64)
    if outs.ndim != 3 or lses.shape != outs.shape[:2] or outs.shape[0] == 0:
        raise ValueError(f"outs must be [P>0, H, d] and lses [P, H], got {outs.shape} and {lses.shape}")
    if np.isnan(lses).any() or (lses == np.inf).any():
        raise ValueError("lses must not contain NaN or +inf")
    out = np.empty(outs.shape[1:])
    lse = np.empty(outs.shape[1])
    _merge_kernel(outs, lses, out, lse)
    return out, lse


def union_with_weights(indices, h_kv: int, dtype=np.float32, weights=None):
    """Per-query-head index sets -> (``[H_kv, B]`` union lists, ``lengths``, ``[H_q, B]`` weights).

    Query head h's weight for entry b of its group's list is its own weight (1 without ``weights``)
    if the token is in its set, else 0; so the shared-list kernel computes each head's own attention.
    Returns weights ``None`` when every head of each group has the same set and no weights are given.
    """
    h_q = len(indices)
    g = h_q // h_kv
    sets = [np.asarray(ix, dtype=np.int64) for ix in indices]
    unions = [np.unique(np.concatenate(sets[j * g:(j + 1) * g])) for j in range(h_kv)]
    width = max((u.size for u in unions), default=0)
    lists = np.zeros((h_kv, width), np.int64)
    lengths = np.array([u.size for u in unions], np.int64)
    for j, u in enumerate(unions):
        lists[j, :u.size] = u
    shared = weights is None and all(sets[h].size == unions[h // g].size for h in range(h_q))
    if shared:
        return lists, lengths, None
    w = np.zeros((h_q, width), dtype)
    for h in range(h_q):
        pos = np.searchsorted(unions[h // g], sets[h])
        w[h, pos] = 1.0 if weights is None else np.asarray(weights[h], dtype)
    return lists, lengths, w


def attend_selection(q, k, v, indices, weights=None, *, scale=None):
    """Attention of each query head over its own index set (``Selection.indices`` form) -> ``(out, lse)``."""
    q, k, v = check_float_arrays(q, k, v)
    lists, lengths, w = union_with_weights(indices, k.shape[0], q.dtype, weights)
    return sparse_attention(q, k, v, lists, lengths, w, scale=scale)


def kept_attention(q, k, v, n: int, kept, *, scale=None, with_probs: bool = False):
    """Attention of each query head over its unit's row of a kept mask, on the first ``n`` rows of
    growing buffers ``k``/``v`` ``[H_kv, capacity, d]`` (not copied: ``check_float_buffers``).

    ``kept [U, n]`` bool, U = H_q (a set per query head) or any U with H_kv | U | H_q (query head h
    uses row ``h // (H_q / U)``; U = H_kv: a set shared by the group). Each selected K/V row is loaded
    once per KV group. Returns ``(out [H_q, d], lse [H_q], probs)`` in q's dtype; ``probs [H_q, n]``
    (the step's softmax over each head's kept rows, 0 elsewhere) only ``with_probs``, else None.
    Per head the same numbers as ``sparse_attention`` over its kept rows (float64 accumulation).
    """
    q, k, v = check_float_buffers(q, k, v, n)
    n = int(n)
    kept = np.ascontiguousarray(kept)
    h_q, h_kv = q.shape[0], k.shape[0]
    if kept.dtype != np.bool_ or kept.ndim != 2 or kept.shape[1] != n:
        raise ValueError(f"kept must be a bool [U, n={n}] array, got {kept.dtype} {kept.shape}")
    units = kept.shape[0]
    if units == 0 or units % h_kv or h_q % units:
        raise ValueError(f"kept has {units} rows: needs H_kv={h_kv} | U | H_q={h_q}")
    out = np.empty_like(q)
    lse = np.empty(h_q, q.dtype)
    probs = np.empty((h_q, n) if with_probs else (h_q, 0), q.dtype)
    _kept_kernel(q, k, v, kept, n, _scale(scale, q.shape[1], q.dtype), out, lse, probs, with_probs)
    return out, lse, (probs if with_probs else None)
