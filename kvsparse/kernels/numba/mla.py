"""Absorbed MLA decode on the CPU in Numba (see ``oracle/mla.py`` for the shapes).

Inputs (one dtype, float32 or float64): ``q_latent [H, r]`` (``w_uk``-absorbed queries), ``q_rope [H, d_R]``,
``latent [n, r]``, ``k_rope [n, d_R]``. Output ``o^L [H, r]`` and ``lse [H]``.

The latent cache is one KV head shared by all H heads: multi-query attention over ``[c; k^R]`` with
values ``[c; 0]``, i.e. ``o^L_h = softmax_t(q^L_h . c_t + q^R_h . k^R_t) c_t``. One KV head gives the
shared kernels one ``prange`` task (one core), so this kernel splits the sequence instead (split-K,
"flash decoding"): ``_partials`` runs one task per chunk of rows and ``attention._merge_kernel`` merges
the chunks' ``(o^L, lse)`` by log-sum-exp. Float64 accumulation, as in ``attention.py``.

Memory layout (row-major, rows are tokens):

  latent    rows ``lat[t, :r]``;  k_rope rows ``rope[t, roff:roff + d_R]``
            ``mla_decode``: two arrays, ``roff = 0``; the registered kernel: both are the view's
            ``k[0] = [c; k^R] [n, r + d_R]`` itself with ``roff = r`` (no copy of the cache)
  qd        ``[H, r + d_R]`` float64 copy of ``[q^L; q^R]`` (small)
  task      rows ``[lo, hi)`` of one chunk, walked in blocks of ``BLOCK`` rows; per block the rows
            are converted once into ``xb [BLOCK, r + d_R]`` float64 ``[c; k^R]``, give the logits
            ``s [H, BLOCK]`` (then the weights ``exp(s - max)`` in place), and ``xb[:, :r]``
            accumulates into ``acc [H, r]``, rescaled when a block raises a head's running max
  partials  ``outs [chunks, H, r]``, ``lses [chunks, H]`` float64, merged into ``o^L``/``lse``

Both products run as 4 heads x 4 rows register tiles (``_logits_tile``, ``_accumulate_tile``): one
load of a row element feeds four heads, one load of a query or accumulator element four rows; a
block converts each element once, where converting inside the tiles did it 8 times.
``mla_decode(..., w_uv=...)`` also returns ``o_h = w_uv[h] o^L_h``.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ...registry import register_kernel
from .attention import FASTMATH, FLOAT_DTYPES, _merge_kernel, _write_group

BLOCK = 16
"""Rows per block, a multiple of the 4-row tile: ``xb`` (74 KB at width 576) stays in L2 from the
logits to the accumulation, and a 4-row tile plus 4 query rows (37 KB) fit L1."""
CHUNK_MIN = 32
MAX_CHUNKS = 16
"""Chunks (tasks): ``n // CHUNK_MIN`` capped at ``MAX_CHUNKS``, a fixed split (the result does not
depend on the thread count). 16 tasks of 2,048 rows at n = 32,768 balance 2 cores; the 32-row
minimum makes the tests' short caches (n <= 120) split and merge too, each chunk in several blocks."""


@numba.njit(cache=True, fastmath=FASTMATH)
def _logits_tile(qd, h, xb, t, s):
    """``s[h + a, t + b] = qd[h + a] . xb[t + b]`` for a, b < 4."""
    w = qd.shape[1]
    x0, x1, x2, x3 = xb[t], xb[t + 1], xb[t + 2], xb[t + 3]
    q0, q1, q2, q3 = qd[h], qd[h + 1], qd[h + 2], qd[h + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = 0.0
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = 0.0
    for c in range(w):
        a00 += q0[c] * x0[c]
        a01 += q0[c] * x1[c]
        a02 += q0[c] * x2[c]
        a03 += q0[c] * x3[c]
        a10 += q1[c] * x0[c]
        a11 += q1[c] * x1[c]
        a12 += q1[c] * x2[c]
        a13 += q1[c] * x3[c]
        a20 += q2[c] * x0[c]
        a21 += q2[c] * x1[c]
        a22 += q2[c] * x2[c]
        a23 += q2[c] * x3[c]
        a30 += q3[c] * x0[c]
        a31 += q3[c] * x1[c]
        a32 += q3[c] * x2[c]
        a33 += q3[c] * x3[c]
    s[h, t], s[h, t + 1], s[h, t + 2], s[h, t + 3] = a00, a01, a02, a03
    s[h + 1, t], s[h + 1, t + 1], s[h + 1, t + 2], s[h + 1, t + 3] = a10, a11, a12, a13
    s[h + 2, t], s[h + 2, t + 1], s[h + 2, t + 2], s[h + 2, t + 3] = a20, a21, a22, a23
    s[h + 3, t], s[h + 3, t + 1], s[h + 3, t + 2], s[h + 3, t + 3] = a30, a31, a32, a33


@numba.njit(cache=True, fastmath=FASTMATH)
def _accumulate_tile(acc, h, p, xb, t):
    """``acc[h + a, :r] += sum_b p[h + a, t + b] * xb[t + b, :r]`` for a, b < 4."""
    r = acc.shape[1]
    x0, x1, x2, x3 = xb[t], xb[t + 1], xb[t + 2], xb[t + 3]
    o0, o1, o2, o3 = acc[h], acc[h + 1], acc[h + 2], acc[h + 3]
    p00, p01, p02, p03 = p[h, t], p[h, t + 1], p[h, t + 2], p[h, t + 3]
    p10, p11, p12, p13 = p[h + 1, t], p[h + 1, t + 1], p[h + 1, t + 2], p[h + 1, t + 3]
    p20, p21, p22, p23 = p[h + 2, t], p[h + 2, t + 1], p[h + 2, t + 2], p[h + 2, t + 3]
    p30, p31, p32, p33 = p[h + 3, t], p[h + 3, t + 1], p[h + 3, t + 2], p[h + 3, t + 3]
    for c in range(r):
        o0[c] += p00 * x0[c] + p01 * x1[c] + p02 * x2[c] + p03 * x3[c]
        o1[c] += p10 * x0[c] + p11 * x1[c] + p12 * x2[c] + p13 * x3[c]
        o2[c] += p20 * x0[c] + p21 * x1[c] + p22 * x2[c] + p23 * x3[c]
        o3[c] += p30 * x0[c] + p31 * x1[c] + p32 * x2[c] + p33 * x3[c]


@numba.njit(cache=True, fastmath=FASTMATH)
def _chunk(qd, lat, rope, roff, scale, lo, hi, out, lse):
    """Rows ``[lo, hi)``: ``out [H, r]`` (normalised) and ``lse [H]`` of attention over the chunk."""
    h_n, w = qd.shape
    r = out.shape[1]
    dr = w - r
    h4 = h_n - h_n % 4
    acc = np.zeros((h_n, r), np.float64)
    mx = np.full(h_n, -np.inf)
    tot = np.zeros(h_n, np.float64)
    s = np.empty((h_n, BLOCK), np.float64)
    xb = np.empty((BLOCK, w), np.float64)
    for b0 in range(lo, hi, BLOCK):
        nb = min(BLOCK, hi - b0)
        t4 = nb - nb % 4
        for t in range(nb):
            for c in range(r):
                xb[t, c] = lat[b0 + t, c]
            for c in range(dr):
                xb[t, r + c] = rope[b0 + t, roff + c]
        for h in range(0, h4, 4):
            for t in range(0, t4, 4):
                _logits_tile(qd, h, xb, t, s)
        for h in range(h_n):
            for t in range(t4 if h < h4 else 0, nb):
                acc_ = 0.0
                for c in range(w):
                    acc_ += qd[h, c] * xb[t, c]
                s[h, t] = acc_
        for h in range(h_n):
            m = mx[h]
            for t in range(nb):
                s[h, t] *= scale
                m = max(m, s[h, t])
            if m > mx[h]:
                if mx[h] > -np.inf:           # rescale what earlier blocks accumulated to the new max
                    f = math.exp(mx[h] - m)
                    tot[h] *= f
                    for c in range(r):
                        acc[h, c] *= f
                mx[h] = m
            for t in range(nb):
                e = math.exp(s[h, t] - m)
                s[h, t] = e
                tot[h] += e
        for h in range(0, h4, 4):
            for t in range(0, t4, 4):
                _accumulate_tile(acc, h, s, xb, t)
        for h in range(h_n):
            for t in range(t4 if h < h4 else 0, nb):
                e = s[h, t]
                for c in range(r):
                    acc[h, c] += e * xb[t, c]
    _write_group(acc, tot, mx, 0, out, lse)      # one "KV head" holding all H query heads


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _partials(qd, lat, rope, roff, scale, chunks, outs, lses):
    n = lat.shape[0]
    for part in numba.prange(chunks):
        _chunk(qd, lat, rope, roff, scale, part * n // chunks, (part + 1) * n // chunks, outs[part], lses[part])


def _decode(q_latent, q_rope, lat, rope, roff, scale, dtype):
    """``(o^L [H, r], lse [H])`` in ``dtype``; ``lat``/``rope`` C-contiguous, rows as in the module doc."""
    h_n, r = q_latent.shape
    n = lat.shape[0]
    qd = np.concatenate([q_latent, q_rope], axis=1).astype(np.float64)
    chunks = max(1, min(MAX_CHUNKS, n // CHUNK_MIN))
    outs = np.empty((chunks, h_n, r), np.float64)
    lses = np.empty((chunks, h_n), np.float64)
    _partials(qd, lat, rope, roff, float(scale), chunks, outs, lses)
    out = np.empty((h_n, r), np.float64)
    lse = np.empty(h_n, np.float64)
    _merge_kernel(outs, lses, out, lse)
    return out.astype(dtype), lse.astype(dtype)


def _check(name, x, ndim, dtype=None, like="q_latent"):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like {like}, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _check_scale(scale):
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")


def mla_decode(q_latent, q_rope, latent, k_rope, *, scale: float, w_uv=None):
    """Absorbed MLA decode; returns ``(o_latent [H, r], lse [H])`` or, with ``w_uv [H, d_V, r]``,
    ``(o [H, d_V], o_latent, lse)``."""
    q_latent = _check("q_latent", q_latent, 2)
    dt = q_latent.dtype
    q_rope = _check("q_rope", q_rope, 2, dt)
    latent = _check("latent", latent, 2, dt)
    k_rope = _check("k_rope", k_rope, 2, dt)
    h_n, r = q_latent.shape
    n = latent.shape[0]
    if q_rope.shape[0] != h_n or latent.shape[1] != r or k_rope.shape != (n, q_rope.shape[1]):
        raise ValueError(f"shapes must be q_latent [H, r], q_rope [H, d_R], latent [n, r], k_rope [n, d_R]; got "
                         f"{q_latent.shape}, {q_rope.shape}, {latent.shape}, {k_rope.shape}")
    _check_scale(scale)
    out, lse = _decode(q_latent, q_rope, latent, k_rope, 0, scale, dt)
    if w_uv is None:
        return out, lse
    w_uv = np.asarray(w_uv)
    if w_uv.ndim != 3 or w_uv.shape[0] != h_n or w_uv.shape[2] != r:
        raise ValueError(f"w_uv must be [H={h_n}, d_V, r={r}], got {w_uv.shape}")
    return np.einsum("hdr,hr->hd", w_uv.astype(np.float64), out.astype(np.float64)).astype(dt), out, lse


@register_kernel("mla", "numba")
def mla(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract on MLA's absorbed view (``oracle/mla.py``): ``q [H, r + d_R]``,
    ``k = [latent; k_rope] [1, n, r + d_R]``, ``v = [latent; 0]`` (never read: the values are the
    latent rows of ``k``). Returns ``[o^L; 0] [H, r + d_R]`` and the indices (every token)."""
    q = _check("q", q, 2)
    k = _check("k", k, 3, q.dtype, like="q")
    if k.shape[0] != 1:
        raise ValueError(f"k must be the single latent head [1, n, r + d_R], got shape {k.shape}")
    d, dr = k.shape[2], method.rope_dim
    if d <= dr:
        raise ValueError(f"the view's width {d} must exceed rope_dim={dr}")
    if q.shape[1] != d:
        raise ValueError(f"q must be [H, {d}] like the view, got shape {q.shape}")
    r = d - dr
    scale = method.default_scale if scale is None else scale
    _check_scale(scale)
    o_lat, _ = _decode(q[:, :r], q[:, r:], k[0], k[0], r, scale, q.dtype)
    out = np.zeros(q.shape, q.dtype)
    out[:, :r] = o_lat
    return out, np.broadcast_to(np.arange(k.shape[1]), (q.shape[0], k.shape[1]))
