"""Dequantize-on-read decode attention on the CPU in Numba, and the quantizer (see ``oracle/kv_quant.py``).

A quantized tensor (keys or values of ``[H_kv, n, d]``) is passed as its stored parts, a tuple
``(codes, scale, zero, token_block, channel_block, bits, full)``:
  codes   uint8 [H_kv, n_q, d * bits / 8]  packed along channels, code j of a byte in bits [j*bits, (j+1)*bits)
  scale, zero   [H_kv, ceil(n_q / tb), ceil(d / cb)] in q's dtype; element (h, i, c) uses block (h, i // tb, c // cb)
  full    [H_kv, n - n_q, d] in q's dtype: the unquantized residual, tokens n_q .. n-1
all C-contiguous. A row ``i < n_q`` is rebuilt as ``code * scale + zero`` in float64 (the product is exact:
at most 8 + 24 significant bits) and rounded to q's dtype (the value a GPU kernel dequantizing into
registers of that dtype would hold); rows ``i >= n_q`` are read as is.

``quantize_cache`` builds these parts in Numba with the oracle's arithmetic (float64 min/max, the scale
and zero rounded to ``scale_dtype``, round-half-even codes), so its codes, scales and zeros are
bit-identical to ``stored_parts`` of the oracle's ``quantize_cache``. A decoder keeps them and passes
them as ``kv_quant(..., cache=(keys, values))``; without ``cache`` every call quantizes.

Selection: one index list per KV head (``[H_kv, B]`` + ``lengths``), optionally ``[H_q, B]`` weights
(0/1 for per-query-head sets: ``attention.union_with_weights``); ``None`` = every token. Each selected
K and V row is read and dequantized once per KV head and used by its G query heads. Float64 accumulation.

Inside the attention kernel a dequantized row is held in a permuted channel order: position
``p = sub * (d / per) + j`` holds channel ``c = j * per + sub`` (``per = 8 / bits`` codes per byte), so
unpacking code ``sub`` of every byte of the row is one contiguous loop over the bytes, which LLVM
vectorises (the natural order interleaves the codes of one byte and does not). A dot product does
not care about the order as long as q is permuted alike (with the keys' ``bits``), and the value
accumulators are un-permuted (with the values' ``bits``) when written out.

Work: one parallel task per (KV head, slice of its list), slices merged by log-sum-exp when there are
more threads than KV heads. A task dequantizes ``TILE_ROWS`` rows at a time into a float64
``tile [TILE_ROWS, d]`` (permuted order, L1-resident), from the packed codes and a scale/zero vector
``sp``/``zp [d]`` refilled when the token block changes; pass 1 over K tiles computes the G logits of
each row, pass 2 over V tiles the G accumulators. The cache is thus read once per KV group at its
packed size (int4: 1/8 of float32's bytes). The time is the dequantization's arithmetic, not memory:
at d = 128 int4 on one thread a row costs ~250 ns, of which ~110 ns without dequantizing (float32
dense attention: ~195 ns).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from ...oracle import core
from ...oracle.kv_quant import KVQuant, Quantized, pack_codes
from ...oracle.sparq import SparQ
from ...registry import register_kernel
from .attention import FASTMATH, _merge_kernel, _scale, _write_group, check_float_arrays, union_with_weights

MIN_SLICE_ROWS = 1024
"""Fewest rows of one KV head's list a parallel task takes (chosen, not tuned): ~0.25 ms of work,
so a slice's fixed costs (its buffers, its share of the [P, H_q, d] merge) stay small."""

_SCALE_CODES = {"float64": 0, "float32": 1, "float16": 2}


# --------------------------------------------------------------------------------------------
# the quantizer (no fastmath anywhere: the codes must be the oracle's to the bit)
# --------------------------------------------------------------------------------------------

@numba.njit(cache=True)
def _round_f16(x):
    """float64 -> float16 -> float64 with round-half-even (Numba has no float16 on the CPU): the
    spacing of float16 at |x| is a power of two, so ``rint(x / ulp) * ulp`` is exact; overflow
    (|x| rounds above 65504) gives inf, as NumPy's cast does."""
    if x == 0.0 or not math.isfinite(x):
        return x
    a = abs(x)
    e = math.frexp(a)[1] - 1                    # a in [2^e, 2^(e+1))
    ulp = math.ldexp(1.0, max(e, -14) - 10)     # below 2^-14 the subnormal spacing 2^-24
    r = np.rint(a / ulp) * ulp
    if r > 65504.0:
        r = np.inf
    return r if x > 0 else -r


@numba.njit(cache=True)
def _round_scale(x, scale_code):
    if scale_code == 1:
        return np.float64(np.float32(x))
    if scale_code == 2:
        return _round_f16(x)
    return x


@numba.njit(cache=True, error_model="numpy")
def _code(v, s, z, levels):
    """The oracle's ``clip(rint((x - zero) / scale), 0, levels)``, code 0 where scale == 0."""
    step = np.rint((v - z) / s)
    step = levels if step > levels else step
    step = step if step > 0.0 else 0.0
    return np.uint8(step) if s > 0 else np.uint8(0)


@numba.njit(cache=True, error_model="numpy")
def _quantize_blocks(x, h, ib0, ib1, n_q, bits, tb, cb, scale_code, codes, scale, zero):
    """Token blocks ``[ib0, ib1)`` of head h (see ``_quantize_kernel``); returns the count of
    non-finite values seen. No fastmath: every operation must be NumPy's, to the bit. NumPy's error
    model: a float division is IEEE's, without the zero check raising ZeroDivisionError that kept
    the code loop scalar (2x slower)."""
    d = x.shape[2]
    db = scale.shape[2]
    per = 8 // bits
    levels = np.float64((1 << bits) - 1)
    code = np.empty(d, np.uint8)
    nonfinite = 0
    for ib in range(ib0, ib1):
        r0, r1 = ib * tb, min(n_q, (ib + 1) * tb)
        # zero[h, ib] and scale[h, ib] hold the block's min and max until replaced (element indexing: a
        # view of them would cost an atomic incref per block, i.e. per row with per-token groups)
        if cb == 1:                             # per-channel groups: element-wise over the row, vectorised
            for c in range(d):
                zero[h, ib, c] = np.float64(x[h, r0, c])
                scale[h, ib, c] = np.float64(x[h, r0, c])
            for r in range(r0 + 1, r1):
                for c in range(d):
                    v = np.float64(x[h, r, c])
                    zero[h, ib, c] = v if v < zero[h, ib, c] else zero[h, ib, c]
                    scale[h, ib, c] = v if v > scale[h, ib, c] else scale[h, ib, c]
        else:
            for jb in range(db):
                c0, c1 = jb * cb, min(d, (jb + 1) * cb)
                a = np.float64(x[h, r0, c0])
                b = a
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        v = np.float64(x[h, r, c])
                        a = v if v < a else a
                        b = v if v > b else b
                zero[h, ib, jb] = a
                scale[h, ib, jb] = b
        for jb in range(db):
            s = _round_scale((scale[h, ib, jb] - zero[h, ib, jb]) / levels, scale_code)
            zero[h, ib, jb] = _round_scale(zero[h, ib, jb], scale_code)
            scale[h, ib, jb] = s
        for r in range(r0, r1):
            if cb == 1:                        # per-channel groups: one loop over the row, vectorised
                for c in range(d):
                    code[c] = _code(np.float64(x[h, r, c]), scale[h, ib, c], zero[h, ib, c], levels)
                    nonfinite += 0 if x[h, r, c] - x[h, r, c] == 0.0 else 1
            else:
                for jb in range(db):
                    s, z = scale[h, ib, jb], zero[h, ib, jb]
                    for c in range(jb * cb, min(d, (jb + 1) * cb)):
                        code[c] = _code(np.float64(x[h, r, c]), s, z, levels)
                        nonfinite += 0 if x[h, r, c] - x[h, r, c] == 0.0 else 1
            if per == 1:
                for j in range(d):
                    codes[h, r, j] = code[j]
            elif per == 2:
                for j in range(d // 2):
                    codes[h, r, j] = code[2 * j] | (code[2 * j + 1] << 4)
            else:
                for j in range(d // 4):
                    codes[h, r, j] = (code[4 * j] | (code[4 * j + 1] << 2) | (code[4 * j + 2] << 4)
                                      | (code[4 * j + 3] << 6))
    return nonfinite


QUANT_TASK_ROWS = 512
"""Rows per task of the parallel quantizer (whole token blocks): per-token blocks are one row, and a
task per row would pay a call's array increfs for every row."""


@numba.njit(cache=True, parallel=True)
def _quantize_kernel(x, n_q, bits, tb, cb, scale_code, codes, scale, zero, bad):
    """Quantize rows ``[0, n_q)`` of ``x [H, n, d]`` into ``codes [H, n_q, d*bits/8]`` and block
    ``scale``/``zero [H, nb, db]`` (float64); ``bad[t]`` counts the non-finite values task t saw.
    Each block's rows are read once for the min/max and again, from cache, for the codes."""
    h_n = x.shape[0]
    nb = scale.shape[1]
    per_task = max(1, QUANT_TASK_ROWS // tb)
    chunks = (nb + per_task - 1) // per_task
    for t in numba.prange(h_n * chunks):
        h, ch = t // chunks, t % chunks
        bad[t] = _quantize_blocks(x, h, ch * per_task, min(nb, (ch + 1) * per_task), n_q, bits, tb, cb, scale_code,
                                  codes, scale, zero)


def quantize_parts(x: np.ndarray, n_q: int, bits: int, token_block: int, channel_block: int, scale_dtype: str,
                   dtype) -> tuple:
    """The stored parts (module doc) of ``x [H, n, d]`` (C-contiguous float32/float64) with its first
    ``n_q`` rows quantized; scale and zero in ``dtype``. Bit-identical to ``stored_parts`` of the
    oracle's ``quantize(x[:, :n_q], ...)``."""
    h, n, d = x.shape
    if np.dtype(dtype) == np.float32 and scale_dtype == "float64":
        raise ValueError("float32 storage holds float32 scales: quantize with scale_dtype='float32'")
    if (d * bits) % 8:
        raise ValueError(f"d={d} codes of {bits} bits do not fill whole bytes")
    nb, db = -(-n_q // token_block), -(-d // channel_block)
    codes = np.empty((h, n_q, d * bits // 8), np.uint8)
    scale = np.empty((h, nb, db), np.float64)
    zero = np.empty((h, nb, db), np.float64)
    per_task = max(1, QUANT_TASK_ROWS // token_block)
    bad = np.zeros(max(h * -(-nb // per_task), 1), np.int64)
    _quantize_kernel(x, n_q, bits, token_block, channel_block, _SCALE_CODES[scale_dtype], codes, scale, zero, bad)
    full = np.ascontiguousarray(x[:, n_q:])
    if bad.any() or not np.isfinite(full).all():
        raise ValueError("k and v must be finite (the oracle refuses NaN/inf too)")
    return (codes, scale.astype(dtype), zero.astype(dtype), token_block, channel_block, bits,
            full.astype(dtype, copy=False))


def quantize_cache(method: KVQuant, k, v, dtype=None) -> tuple:
    """``(keys, values)`` stored parts of the cache ``k``/``v [H_kv, n, d]`` as ``method`` quantizes it
    (Numba), scales in ``dtype`` (default: k's). What a decoder keeps and passes as ``kv_quant``'s ``cache``."""
    k = np.ascontiguousarray(k)
    v = np.ascontiguousarray(v)
    dtype = np.dtype(k.dtype if dtype is None else dtype)
    n, d = k.shape[1:]
    nk, nv = method.quantized_lengths(n, d)
    return (quantize_parts(k, nk, method.key_bits, *method.blocks(method.key_axis, nk, d), method.scale_dtype, dtype),
            quantize_parts(v, nv, method.value_bits, *method.blocks(method.value_axis, nv, d), method.scale_dtype,
                           dtype))


def stored_parts(quantized: Quantized, full: np.ndarray, dtype) -> tuple:
    """``(codes, scale, zero, token_block, channel_block, bits, full)`` of one oracle-quantized tensor."""
    codes = np.ascontiguousarray(pack_codes(quantized.codes, quantized.bits))
    return (codes, np.ascontiguousarray(quantized.scale, dtype), np.ascontiguousarray(quantized.zero, dtype),
            quantized.token_block, quantized.channel_block, quantized.bits, np.ascontiguousarray(full, dtype))


@numba.njit(cache=True, parallel=True)
def _dequantize_kernel(codes, scale, zero, tb, cb, bits, full, out):
    """The float64 cache every read sees (the oracle's ``dequantize``: ``code * scale + zero`` in
    float64, then the residual), natural channel order."""
    h_n, n_q, _ = codes.shape
    d = out.shape[2]
    mask = (1 << bits) - 1
    for h in numba.prange(h_n):
        for i in range(n_q):
            for c in range(d):
                bit = c * bits
                code = (np.int64(codes[h, i, bit // 8]) >> (bit % 8)) & mask
                blk, grp = i // tb, c // cb
                out[h, i, c] = np.float64(code) * np.float64(scale[h, blk, grp]) + np.float64(zero[h, blk, grp])
        for i in range(full.shape[1]):
            for c in range(d):
                out[h, n_q + i, c] = np.float64(full[h, i, c])


def dequantize_parts(parts: tuple) -> np.ndarray:
    codes, scale, zero, tb, cb, bits, full = parts
    out = np.empty((full.shape[0], codes.shape[1] + full.shape[1], full.shape[2]))
    _dequantize_kernel(codes, scale, zero, tb, cb, bits, full, out)
    return out


# --------------------------------------------------------------------------------------------
# dequantize-on-read attention
# --------------------------------------------------------------------------------------------

def _channel_order(d: int, bits: int) -> np.ndarray:
    """The permuted order (module doc): entry p is the channel held at position p."""
    per = 8 // bits
    p = np.arange(d)
    return (p % (d // per)) * per + p // (d // per)


BYTE_CHUNK = 8
"""Bytes per constant-length chunk when a per-token row's scale vector is filled by broadcasting:
a loop of a fixed 8 is unrolled and vectorised, the runtime-length run of a group's bytes was not."""


def _scale_map(d: int, bits: int, cb: int) -> tuple:
    """``(gmap, mode)``: where the kernel's scale/zero vector of a token block comes from, computed
    once per call so that a refill indexes a map instead of dividing per channel.

    * mode 0: one entry per permuted position, ``gmap[p]`` = the group of the channel at p (any cb).
    * mode 1: every byte's codes share a group (cb a multiple of the codes per byte): one entry per
      byte, ``gmap[j]`` = the group of byte j, read at the same place for every code of the byte.
    * mode 2: as 1, and each aligned chunk of ``BYTE_CHUNK`` bytes lies in one group: the vector is
      filled by broadcasting ``gmap[j]``'s pair over the chunk instead of gathering per byte
      (per-token groups refill it every row; measured 66 vs 101 ns per d = 128 int4 row)."""
    per = 8 // bits
    nb = d // per
    if cb % per:
        return np.ascontiguousarray(_channel_order(d, bits) // cb, dtype=np.int64), 0
    gmap = np.ascontiguousarray(np.arange(nb) * per // cb, dtype=np.int64)
    return gmap, 2 if (cb // per) % BYTE_CHUNK == 0 and nb % BYTE_CHUNK == 0 else 1


def _like(x, like):
    return x


@overload(_like, jit_options={"cache": True})
def _like_impl(x, like):
    """``x`` (float64) rounded to ``like``'s float type and back: a compile-time choice, so each
    dtype gets a loop without a per-element select."""
    if like == types.float32:
        return lambda x, like: np.float64(np.float32(x))
    return lambda x, like: x


TILE_ROWS = 16
"""Rows dequantized per call of ``_dequant_tile``: 16 x d float64 (16 KiB at d = 128) stays in L1
between the dequantization and its use, and a call per 16 rows amortises what a call costs (the
arrays it takes are increfed and decrefed atomically, ~50 ns per call measured)."""


@numba.njit(cache=True, fastmath=FASTMATH)
def _dequant_tile(codes, sc, zr, tb, bits, full, gmap, mode, h, idx, has_idx, j0, j1, like, blk, sp, zp, tile):
    """Rows ``idx[h, j0:j1]`` (rows ``j0:j1`` without a list) of one tensor of head h into
    ``tile[:j1 - j0]``: float64 values of ``like``'s dtype, permuted order. ``sp``/``zp`` hold the
    scale/zero vector (``_scale_map``) of token block ``blk`` and are refilled only when the block
    changes (per-channel groups: once per tb rows; per-token groups: every row). Returns the block held."""
    n_q = codes.shape[1]
    d = tile.shape[1]
    per = 8 // bits
    nb = d // per
    mask = (1 << bits) - 1
    for t in range(j1 - j0):
        i = idx[h, j0 + t] if has_idx else j0 + t
        if i >= n_q:
            for sub in range(per):
                for j in range(nb):
                    tile[t, sub * nb + j] = np.float64(full[h, i - n_q, j * per + sub])
            continue
        b = i if tb == 1 else i // tb
        if b != blk:
            if mode == 2:
                for j8 in range(0, nb, BYTE_CHUNK):
                    s = np.float64(sc[h, b, gmap[j8]])
                    z = np.float64(zr[h, b, gmap[j8]])
                    for u in range(BYTE_CHUNK):
                        sp[j8 + u] = s
                        zp[j8 + u] = z
            else:
                for p in range(gmap.shape[0]):
                    sp[p] = np.float64(sc[h, b, gmap[p]])
                    zp[p] = np.float64(zr[h, b, gmap[p]])
            blk = b
        for sub in range(per):
            shift = sub * bits
            base = sub * nb
            if mode == 0:
                for j in range(nb):
                    x = np.float64((np.int32(codes[h, i, j]) >> shift) & mask) * sp[base + j] + zp[base + j]
                    tile[t, base + j] = _like(x, like)
            else:                             # a second loop: a variable offset into sp was not vectorised
                for j in range(nb):           # (measured ~2x slower)
                    x = np.float64((np.int32(codes[h, i, j]) >> shift) & mask) * sp[j] + zp[j]
                    tile[t, base + j] = _like(x, like)
    return blk


@numba.njit(cache=True, fastmath=FASTMATH)
def _attend_slice(qk, kc, ks, kz, ktb, kbits, kfull, kgmap, kmode, vc, vs, vz, vtb, vbits, vfull, vgmap, vmode,
                  idx, has_idx, w, has_w, scale, like, kvh, j0, j1, out, lse):
    """Attention of KV head ``kvh``'s G query heads over entries ``[j0, j1)`` of its list (all rows
    when ``has_idx`` is False) into ``out [H_q, d]`` (values' permuted order) and ``lse [H_q]``.
    Pass 1 dequantizes K a tile of rows at a time and computes the G logits of each row, pass 2 the
    same with V and the accumulators. A serial function called once per task of the parallel loop:
    LLVM vectorised these loops here and not inside the ``prange`` body (104 vs 240 ns per K row on
    one thread), and no per-row call or array view (``codes[h, i]``: an atomic incref/decref of
    the array each) is left in the row loops."""
    h_q, d = qk.shape
    h_kv = kfull.shape[0]
    g = h_q // h_kv
    tile = np.empty((TILE_ROWS, d), np.float64)
    sp = np.empty(d, np.float64)
    zp = np.empty(d, np.float64)
    s = np.empty((g, max(j1 - j0, 1)), np.float64)
    mx = np.full(g, -np.inf, np.float64)
    blk = -1
    for t0 in range(j0, j1, TILE_ROWS):
        t1 = min(j1, t0 + TILE_ROWS)
        blk = _dequant_tile(kc, ks, kz, ktb, kbits, kfull, kgmap, kmode, kvh, idx, has_idx, t0, t1, like, blk,
                            sp, zp, tile)
        for t in range(t1 - t0):
            j = t0 + t
            for gi in range(g):
                h = kvh * g + gi
                x = 0.0
                for c in range(d):
                    x += qk[h, c] * tile[t, c]
                x *= scale
                if has_w:
                    x = x + math.log(np.float64(w[h, j])) if w[h, j] > 0 else -np.inf
                s[gi, j - j0] = x
                if x > mx[gi]:
                    mx[gi] = x
    acc = np.zeros((g, d), np.float64)
    tot = np.zeros(g, np.float64)
    blk = -1
    for t0 in range(j0, j1, TILE_ROWS):
        t1 = min(j1, t0 + TILE_ROWS)
        blk = _dequant_tile(vc, vs, vz, vtb, vbits, vfull, vgmap, vmode, kvh, idx, has_idx, t0, t1, like, blk,
                            sp, zp, tile)
        for t in range(t1 - t0):
            j = t0 + t
            for gi in range(g):
                if mx[gi] == -np.inf:
                    continue
                pr = math.exp(s[gi, j - j0] - mx[gi])
                tot[gi] += pr
                for c in range(d):
                    acc[gi, c] += pr * tile[t, c]
    _write_group(acc, tot, mx, kvh, out, lse)


@numba.njit(cache=True, parallel=True)
def _quant_kernel(qk, kc, ks, kz, ktb, kbits, kfull, kgmap, kmode, vc, vs, vz, vtb, vbits, vfull, vgmap, vmode,
                  idx, lengths, has_idx, w, has_w, scale, like, parts, outs, lses):
    """One task per (KV head, slice of its list): ``parts`` slices per head, each writing its partial
    ``outs[part]`` and ``lses[part]``; the caller merges them when parts > 1."""
    h_kv = kfull.shape[0]
    for t in numba.prange(h_kv * parts):
        kvh, part = t // parts, t % parts
        m_tok = lengths[kvh]
        width = (m_tok + parts - 1) // parts
        j0 = min(m_tok, part * width)
        _attend_slice(qk, kc, ks, kz, ktb, kbits, kfull, kgmap, kmode, vc, vs, vz, vtb, vbits, vfull, vgmap,
                      vmode, idx, has_idx, w, has_w, scale, like, kvh, j0, min(m_tok, j0 + width), outs[part],
                      lses[part])


def _check_parts(name, parts, dtype, h_kv, d):
    codes, scale, zero, tb, cb, bits, full = parts
    if bits not in (2, 4, 8) or (d * bits) % 8 or tb < 1 or cb < 1:
        raise ValueError(f"{name}: bits {bits} (2, 4 or 8, whole bytes per row), token/channel blocks >= 1")
    n_q = codes.shape[1] if codes.ndim == 3 else -1
    want = {"codes": (h_kv, n_q, d * bits // 8), "scale": (h_kv, -(-n_q // tb), -(-d // cb)),
            "zero": (h_kv, -(-n_q // tb), -(-d // cb)), "full": (h_kv, full.shape[1] if full.ndim == 3 else -1, d)}
    for part, x in (("codes", codes), ("scale", scale), ("zero", zero), ("full", full)):
        if not isinstance(x, np.ndarray) or x.shape != want[part] or not x.flags.c_contiguous:
            raise ValueError(f"{name} {part} must be a C-contiguous {want[part]} array, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != (np.uint8 if part == "codes" else dtype):
            raise TypeError(f"{name} {part} must be {'uint8' if part == 'codes' else dtype}, got {x.dtype}")


def quantized_attention(q, keys: tuple, values: tuple, indices=None, lengths=None, weights=None, *, scale=None,
                        parts=None):
    """Attention over a quantized cache; ``keys``/``values`` are stored parts (module doc). Returns
    ``(out, lse)``. ``parts``: slices per KV head (default: enough for every thread, none under
    ``MIN_SLICE_ROWS`` rows), merged by log-sum-exp."""
    if not isinstance(q, np.ndarray) or q.dtype not in (np.float32, np.float64) or q.ndim != 2:
        raise TypeError(f"q must be a float32/float64 [H_q, d] array, got {getattr(q, 'dtype', type(q))}")
    h_q, d = q.shape
    h_kv = keys[6].shape[0] if getattr(keys[6], "ndim", 0) == 3 else 0
    if h_kv == 0 or h_q % h_kv:
        raise ValueError("keys and values must describe the same [H_kv, n, d] cache with H_q divisible by H_kv")
    _check_parts("keys", keys, q.dtype, h_kv, d)
    _check_parts("values", values, q.dtype, h_kv, d)
    kc, ks, kz, ktb, kcb, kbits, kfull = keys
    vc, vs, vz, vtb, vcb, vbits, vfull = values
    n = kc.shape[1] + kfull.shape[1]
    if vc.shape[1] + vfull.shape[1] != n:
        raise ValueError("keys and values must describe the same [H_kv, n, d] cache with H_q divisible by H_kv")
    if indices is None:
        idx, has_idx = np.zeros((1, 1), np.int64), False
        lengths = np.full(h_kv, n, np.int64)
        width = n
    else:
        idx, has_idx = np.ascontiguousarray(indices, dtype=np.int64), True
        lengths = np.full(h_kv, idx.shape[1], np.int64) if lengths is None else np.ascontiguousarray(lengths, np.int64)
        if idx.ndim != 2 or idx.shape[0] != h_kv or lengths.shape != (h_kv,) or (lengths > idx.shape[1]).any():
            raise ValueError(f"indices must be [H_kv={h_kv}, B] with lengths [H_kv] <= B")
        for h in range(h_kv):
            row = idx[h, :lengths[h]]
            if row.size and (row.min() < 0 or row.max() >= n or np.unique(row).size != row.size):
                raise ValueError(f"indices[{h}] must hold unique rows in [0, {n})")
        width = idx.shape[1]
    if weights is None:
        w, has_w = np.zeros((1, 1), q.dtype), False
    else:
        w, has_w = np.ascontiguousarray(weights, q.dtype), True
        if w.shape != (h_q, width):
            raise ValueError(f"weights must be [H_q, B] = {(h_q, width)}, got {w.shape}")
    if parts is None:
        longest = int(lengths.max(initial=0))
        parts = max(1, min(-(-numba.get_num_threads() // h_kv), longest // MIN_SLICE_ROWS))
    parts = int(parts)
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    qk = np.ascontiguousarray(q.astype(np.float64)[:, _channel_order(d, kbits)])
    outs = np.empty((parts, h_q, d))
    lses = np.empty((parts, h_q))
    _quant_kernel(qk, kc, ks, kz, ktb, kbits, kfull, *_scale_map(d, kbits, kcb),
                  vc, vs, vz, vtb, vbits, vfull, *_scale_map(d, vbits, vcb),
                  idx, lengths, has_idx, w, has_w, _scale(scale, d), q.dtype.type(0), parts, outs, lses)
    if parts > 1:
        merged, merged_lse = np.empty((h_q, d)), np.empty(h_q)
        _merge_kernel(outs, lses, merged, merged_lse)
    else:
        merged, merged_lse = outs[0], lses[0]
    out = np.empty_like(q)
    out[:, _channel_order(d, vbits)] = merged
    return out, merged_lse.astype(q.dtype)


def _check_cache(method: KVQuant, cache, h_kv: int, n: int, d: int, dtype) -> tuple:
    """The passed ``cache`` against the layout ``method`` stores for an ``n``-token cache: (keys, values)."""
    if not (isinstance(cache, tuple) and len(cache) == 2 and all(isinstance(p, tuple) and len(p) == 7 for p in cache)):
        raise TypeError("cache must be (keys, values) stored parts, as quantize_cache returns")
    nk, nv = method.quantized_lengths(n, d)
    for name, parts, n_q, bits, axis in (("keys", cache[0], nk, method.key_bits, method.key_axis),
                                         ("values", cache[1], nv, method.value_bits, method.value_axis)):
        _check_parts(name, parts, dtype, h_kv, d)
        tb, cb = method.blocks(axis, n_q, d)
        if parts[0].shape[1] != n_q or parts[6].shape[1] != n - n_q or tuple(parts[3:6]) != (tb, cb, bits):
            raise ValueError(f"cache {name} must hold {n_q} quantized + {n - n_q} full rows in {tb}x{cb} blocks at "
                             f"{bits} bits (the method's layout for n={n}), got {parts[0].shape[1]} + "
                             f"{parts[6].shape[1]} rows, blocks {parts[3]}x{parts[4]}, {parts[5]} bits")
    return cache


@register_kernel("kv_quant", "numba")
def kv_quant(method: KVQuant, q, k, v, *, positions=None, scale=None, cache=None):
    """Kernel-step contract: quantize the cache as the oracle does (in Numba, scales in q's dtype) unless
    ``cache`` (``(keys, values)`` stored parts, as ``quantize_cache`` returns; what a decoder keeps) is
    given, let the base method's oracle choose the tokens (and estimator weights) on the dequantized
    cache, then attend with the dequantize-on-read kernel. A given cache is trusted to be k/v's (its
    layout is checked against the method; its values are not recomputed). Attention over the
    selection is every composable base's output (RetrievalAttention's merge of disjoint parts
    included) except SparQ's: its ``alpha * y + (1 - alpha) * mean(V)`` mix is applied here in float64
    (alpha and mean(V) from the oracle on the dequantized cache). Returns ``(out, indices)``."""
    q, k, v = check_float_arrays(q, k, v)
    if method.scale_dtype == "float64" and q.dtype != np.float64:
        raise ValueError("a float32 kernel stores float32 scales: use KVQuant(scale_dtype='float32') to compare")
    h_kv, n, d = k.shape
    if cache is None:
        keys, values = quantize_cache(method, k, v, q.dtype)
    else:
        keys, values = _check_cache(method, cache, h_kv, n, d, q.dtype)
    if method.base is None:
        out, _ = quantized_attention(q, keys, values, scale=scale)
        return out, np.broadcast_to(np.arange(n), (q.shape[0], n))
    kh, vh = dequantize_parts(keys), dequantize_parts(values)
    q64 = q.astype(np.float64)
    sel = method.base.select(q64, kh, vh, positions=positions)
    lists, lengths, w = union_with_weights(sel.indices, h_kv, q.dtype, sel.weights)
    out, _ = quantized_attention(q, keys, values, lists, lengths, w, scale=scale)
    if isinstance(method.base, SparQ) and method.base.reallocate:
        approx = method.base.approximate(q64, kh)
        if not approx.dense:
            alpha = method.base.alpha(approx)[:, None]
            mean_v = core.expand_kv(vh.mean(axis=1), q.shape[0])
            out = (alpha * out.astype(np.float64) + (1.0 - alpha) * mean_v).astype(q.dtype)
    return out, list(sel.indices)
