"""Absorbed MLA decode in Triton (``oracle/mla.py``): every query head attends the single latent head.

Inputs: ``q [H, r + d_R]`` = ``[q^L; q^R]`` (``w_uk``-absorbed), the view ``k [1, n, r + d_R]`` =
``[c; k^R]``. The values are the latent rows ``c`` themselves (the first r channels of each key row),
so the cache is read once: ``o^L_h = softmax_t(q^L_h . c_t + q^R_h . k^R_t) c_t``.

Memory layout and programs (Flash-Decoding, as ``attention.py``):
  rows     ``kv[t, :r]`` latent, ``kv[t, r:r + d_R]`` shared RoPE key; row stride ``r + d_R``
  program  (tile of 16 query heads, split of the sequence): the tile's ``q^L [16, r]`` and
           ``q^R [16, d_R]`` stay in registers; per block of BLOCK rows, two ``tl.dot`` give the
           logits ``[16, BLOCK]``, and ``P @ c`` accumulates ``[16, r]``. Tiling the heads keeps one
           program's state bounded when H is large (DeepSeek-V2: 128 heads over one latent head).
  merge    ``attention.py``'s log-sum-exp merge of the splits' ``(o^L, lse)``.
Precision as ``attention.py``: fp32 accumulation, probabilities rounded to the input dtype before
``P @ c`` (fp32 "ieee" dots for fp32 inputs, and for bf16 in the interpreter).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ...registry import register_kernel
from .attention import DOT_ROWS, _f32_dot, _kernels as _attention_kernels, _next_pow2, default_splits, to_numpy, to_torch


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, kv_ptr, part_out_ptr, part_lse_ptr, scale, H, N, chunk, stride_kn,
                     R: tl.constexpr, RP: tl.constexpr, DR: tl.constexpr, DRP: tl.constexpr,
                     HT: tl.constexpr, BLOCK: tl.constexpr, NUM_SPLITS, F32_DOT: tl.constexpr):
        tile = tl.program_id(0)
        split = tl.program_id(1)
        h = tile * HT + tl.arange(0, HT)
        h_mask = h < H
        r_offs = tl.arange(0, RP)
        r_mask = r_offs < R
        e_offs = tl.arange(0, DRP)
        e_mask = e_offs < DR
        q_lat = tl.load(q_ptr + h[:, None] * (R + DR) + r_offs[None, :], mask=h_mask[:, None] & r_mask[None, :],
                        other=0.0)
        q_rope = tl.load(q_ptr + h[:, None] * (R + DR) + R + e_offs[None, :],
                         mask=h_mask[:, None] & e_mask[None, :], other=0.0)
        start = split * chunk
        stop = tl.minimum(start + chunk, N)
        m = tl.full([HT], -1.0e30, tl.float32)
        l = tl.zeros([HT], tl.float32)
        acc = tl.zeros([HT, RP], tl.float32)
        for base in range(start, stop, BLOCK):
            t = base + tl.arange(0, BLOCK)
            t_mask = t < stop
            row = t.to(tl.int64)[:, None] * stride_kn
            c = tl.load(kv_ptr + row + r_offs[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)
            k_rope = tl.load(kv_ptr + row + R + e_offs[None, :], mask=t_mask[:, None] & e_mask[None, :], other=0.0)
            if F32_DOT:
                s = (tl.dot(q_lat.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
                     + tl.dot(q_rope.to(tl.float32), tl.trans(k_rope.to(tl.float32)), input_precision="ieee"))
            else:
                s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_rope, tl.trans(k_rope))
            s = tl.where(t_mask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if F32_DOT:
                pv = tl.dot(p.to(c.dtype).to(tl.float32), c.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(c.dtype), c)
            acc = acc * alpha[:, None] + pv
            m = m_new
        has = l > 0
        out = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        tl.store(part_out_ptr + (h[:, None] * NUM_SPLITS + split) * R + r_offs[None, :], out,
                 mask=h_mask[:, None] & r_mask[None, :])
        tl.store(part_lse_ptr + h * NUM_SPLITS + split, lse, mask=h_mask)

    return split_kernel


def mla_decode(q, kv, rope_dim: int, *, scale: float, num_splits=None, block: int = 32):
    """``(o^L [H, r], lse [H])`` of the absorbed decode: ``q [H, r + d_R]``, ``kv [n, r + d_R]`` (torch)."""
    import torch
    if q.dim() != 2 or kv.dim() != 2 or q.shape[1] != kv.shape[1]:
        raise ValueError(f"q must be [H, r + d_R] and kv [n, r + d_R] of one width, got {tuple(q.shape)} "
                         f"and {tuple(kv.shape)}")
    if q.dtype != kv.dtype:
        raise TypeError(f"q and kv must share one dtype, got {q.dtype} and {kv.dtype}")
    h, w = q.shape
    n = kv.shape[0]
    r = w - rope_dim
    if not 0 <= rope_dim < w:
        raise ValueError(f"rope_dim must lie in [0, {w}) (the view's width), got {rope_dim}")
    tiles = -(-h // DOT_ROWS)
    num_splits = max(1, int(num_splits if num_splits is not None else default_splits(tiles, n, q.device)))
    chunk = max(1, math.ceil(n / num_splits))
    part_out = torch.empty((h, num_splits, r), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((h, num_splits), dtype=torch.float32, device=q.device)
    q, kv = q.contiguous(), kv.contiguous()
    rp = max(16, _next_pow2(r))
    _kernel()[(tiles, num_splits)](q, kv, part_out, part_lse, float(scale), h, n, chunk, kv.stride(0),
                                   R=r, RP=rp, DR=rope_dim, DRP=max(16, _next_pow2(rope_dim)), HT=DOT_ROWS,
                                   BLOCK=max(16, _next_pow2(block)), NUM_SPLITS=num_splits, F32_DOT=_f32_dot(q.dtype))
    out = torch.empty((h, r), dtype=q.dtype, device=q.device)
    lse = torch.empty((h,), dtype=torch.float32, device=q.device)
    _attention_kernels()[1][(h,)](part_out, part_lse, out, lse, D=r, DP=rp, NUM_SPLITS=num_splits,
                                  SP=_next_pow2(num_splits))
    return out, lse


@register_kernel("mla", "triton")
def mla(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract on MLA's absorbed view (as the Numba kernel): ``q [H, r + d_R]``,
    ``k = [latent; k_rope] [1, n, r + d_R]``, ``v = [latent; 0]`` (never read: the values are the latent
    rows of ``k``). Returns ``[o^L; 0] [H, r + d_R]`` and the indices (every token) as NumPy."""
    qt, kt = to_torch(q, "q"), to_torch(k, "k")
    if kt.dim() != 3 or kt.shape[0] != 1:
        raise ValueError(f"k must be the single latent head [1, n, r + d_R], got shape {tuple(kt.shape)}")
    dr = method.rope_dim
    scale = method.default_scale if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    o_lat, _ = mla_decode(qt, kt[0], dr, scale=scale)
    out = np.zeros(tuple(qt.shape), np.float32)
    out[:, : qt.shape[1] - dr] = to_numpy(o_lat)
    return out, [np.arange(kt.shape[1]) for _ in range(qt.shape[0])]
