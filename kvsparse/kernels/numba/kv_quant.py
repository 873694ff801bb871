"""Dequantize-on-read decode attention on the CPU in Numba (see ``oracle/kv_quant.py``).

A quantized tensor (keys or values of ``[H_kv, n, d]``) is passed as its stored parts:
  codes   uint8 [H_kv, n_q, d * bits / 8]  packed along channels, code j of a byte in bits [j*bits, (j+1)*bits)
  scale, zero   [H_kv, ceil(n_q / tb), ceil(d / cb)] in q's dtype; element (h, i, c) uses block (h, i // tb, c // cb)
  full    [H_kv, n - n_q, d] in q's dtype: the unquantized residual, tokens n_q .. n-1
A row ``i < n_q`` is rebuilt as ``code * scale + zero`` in float64 and rounded to q's dtype (the value
a GPU kernel dequantizing into registers of that dtype would hold); rows ``i >= n_q`` are read as is.

Selection: one index list per KV head (``[H_kv, B]`` + ``lengths``), optionally ``[H_q, B]`` weights
(0/1 for per-query-head sets: ``attention.union_with_weights``); ``None`` = every token. Each selected
K and V row is dequantized once per KV head and used by its G query heads. Float64 accumulation.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ...oracle import core
from ...oracle.kv_quant import KVQuant, Quantized, pack_codes
from ...oracle.sparq import SparQ
from ...registry import register_kernel
from .attention import FASTMATH, _scale, _write_group, check_float_arrays, union_with_weights


@numba.njit(cache=True)
def _load_row(codes, scale, zero, tb, cb, bits, full, h, i, round32, row):
    n_q = codes.shape[1]
    d = row.shape[0]
    if i >= n_q:
        for c in range(d):
            row[c] = np.float64(full[h, i - n_q, c])
        return
    mask = (1 << bits) - 1
    for c in range(d):
        bit = c * bits
        code = (np.int64(codes[h, i, bit // 8]) >> (bit % 8)) & mask
        x = np.float64(code) * np.float64(scale[h, i // tb, c // cb]) + np.float64(zero[h, i // tb, c // cb])
        row[c] = np.float64(np.float32(x)) if round32 else x


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _quant_kernel(q, kc, ks, kz, ktb, kcb, kbits, kfull, vc, vs, vz, vtb, vcb, vbits, vfull,
                  idx, lengths, w, has_w, scale, round32, out, lse):
    h_q, d = q.shape
    h_kv = kfull.shape[0]
    g = h_q // h_kv
    for kvh in numba.prange(h_kv):
        m_tok = lengths[kvh]
        row = np.empty(d, np.float64)
        s = np.empty((g, max(m_tok, 1)), np.float64)
        mx = np.full(g, -np.inf, np.float64)
        for j in range(m_tok):
            _load_row(kc, ks, kz, ktb, kcb, kbits, kfull, kvh, idx[kvh, j], round32, row)
            for gi in range(g):
                h = kvh * g + gi
                x = 0.0
                for c in range(d):
                    x += np.float64(q[h, c]) * row[c]
                x *= scale
                if has_w:
                    x = x + math.log(np.float64(w[h, j])) if w[h, j] > 0 else -np.inf
                s[gi, j] = x
                if x > mx[gi]:
                    mx[gi] = x
        acc = np.zeros((g, d), np.float64)
        tot = np.zeros(g, np.float64)
        for j in range(m_tok):
            _load_row(vc, vs, vz, vtb, vcb, vbits, vfull, kvh, idx[kvh, j], round32, row)
            for gi in range(g):
                if mx[gi] == -np.inf:
                    continue
                p = math.exp(s[gi, j] - mx[gi])
                tot[gi] += p
                for c in range(d):
                    acc[gi, c] += p * row[c]
        _write_group(acc, tot, mx, kvh, out, lse)


def stored_parts(quantized: Quantized, full: np.ndarray, dtype) -> tuple:
    """``(codes, scale, zero, token_block, channel_block, bits, full)`` of one tensor, ready for the kernel."""
    codes = np.ascontiguousarray(pack_codes(quantized.codes, quantized.bits))
    return (codes, np.ascontiguousarray(quantized.scale, dtype), np.ascontiguousarray(quantized.zero, dtype),
            quantized.token_block, quantized.channel_block, quantized.bits, np.ascontiguousarray(full, dtype))


def quantized_attention(q, keys: tuple, values: tuple, indices=None, lengths=None, weights=None, *, scale=None):
    """Attention over a quantized cache; ``keys``/``values`` are ``stored_parts`` tuples. Returns ``(out, lse)``."""
    if not isinstance(q, np.ndarray) or q.dtype not in (np.float32, np.float64) or q.ndim != 2:
        raise TypeError(f"q must be a float32/float64 [H_q, d] array, got {getattr(q, 'dtype', type(q))}")
    kc, ks, kz, ktb, kcb, kbits, kfull = keys
    vc, vs, vz, vtb, vcb, vbits, vfull = values
    h_q, d = q.shape
    h_kv = kfull.shape[0]
    n = kc.shape[1] + kfull.shape[1]
    if vc.shape[1] + vfull.shape[1] != n or kfull.shape[2] != d or vfull.shape[2] != d or h_q % h_kv:
        raise ValueError("keys and values must describe the same [H_kv, n, d] cache with H_q divisible by H_kv")
    for name, x in (("key scale", ks), ("key zero", kz), ("key full", kfull), ("value scale", vs),
                    ("value zero", vz), ("value full", vfull)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if indices is None:
        idx = np.broadcast_to(np.arange(n, dtype=np.int64), (h_kv, n)).copy()
        lengths = np.full(h_kv, n, np.int64)
    else:
        idx = np.ascontiguousarray(indices, dtype=np.int64)
        lengths = np.full(h_kv, idx.shape[1], np.int64) if lengths is None else np.ascontiguousarray(lengths, np.int64)
        if idx.ndim != 2 or idx.shape[0] != h_kv or lengths.shape != (h_kv,) or (lengths > idx.shape[1]).any():
            raise ValueError(f"indices must be [H_kv={h_kv}, B] with lengths [H_kv] <= B")
        for h in range(h_kv):
            row = idx[h, :lengths[h]]
            if row.size and (row.min() < 0 or row.max() >= n or np.unique(row).size != row.size):
                raise ValueError(f"indices[{h}] must hold unique rows in [0, {n})")
    if weights is None:
        w, has_w = np.zeros((1, 1), q.dtype), False
    else:
        w, has_w = np.ascontiguousarray(weights, q.dtype), True
        if w.shape != (h_q, idx.shape[1]):
            raise ValueError(f"weights must be [H_q, B] = {(h_q, idx.shape[1])}, got {w.shape}")
    out = np.empty_like(q)
    lse = np.empty(h_q, q.dtype)
    _quant_kernel(np.ascontiguousarray(q), kc, ks, kz, ktb, kcb, kbits, kfull, vc, vs, vz, vtb, vcb, vbits, vfull,
                  idx, lengths, w, has_w, _scale(scale, d), q.dtype == np.float32, out, lse)
    return out, lse


@register_kernel("kv_quant", "numba")
def kv_quant(method: KVQuant, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: quantize the cache as the oracle does (scales in q's dtype), let the base
    method's oracle choose the tokens (and estimator weights) on the dequantized cache, then attend with
    the dequantize-on-read kernel. Attention over the selection is every composable base's output
    (RetrievalAttention's merge of disjoint parts included) except SparQ's: its
    ``alpha * y + (1 - alpha) * mean(V)`` mix is applied here in float64 (alpha and mean(V) from the
    oracle on the dequantized cache). Returns ``(out, indices)``."""
    q, k, v = check_float_arrays(q, k, v)
    if method.scale_dtype == "float64" and q.dtype != np.float64:
        raise ValueError("a float32 kernel stores float32 scales: use KVQuant(scale_dtype='float32') to compare")
    cache = method.quantize_cache(k, v)
    keys = stored_parts(cache.keys, cache.k_full, q.dtype)
    values = stored_parts(cache.values, cache.v_full, q.dtype)
    if method.base is None:
        out, _ = quantized_attention(q, keys, values, scale=scale)
        return out, np.broadcast_to(np.arange(k.shape[1]), (q.shape[0], k.shape[1]))
    kh, vh = cache.dequantize()
    q64 = q.astype(np.float64)
    sel = method.base.select(q64, kh, vh, positions=positions)
    lists, lengths, w = union_with_weights(sel.indices, k.shape[0], q.dtype, sel.weights)
    out, _ = quantized_attention(q, keys, values, lists, lengths, w, scale=scale)
    if isinstance(method.base, SparQ) and method.base.reallocate:
        approx = method.base.approximate(q64, kh)
        if not approx.dense:
            alpha = method.base.alpha(approx)[:, None]
            mean_v = core.expand_kv(vh.mean(axis=1), q.shape[0])
            out = (alpha * out.astype(np.float64) + (1.0 - alpha) * mean_v).astype(q.dtype)
    return out, list(sel.indices)
