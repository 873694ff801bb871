"""Reduced-channel approximate scores in Triton (SparQ and Double Sparsity share this kernel).

    scores[h, j] = sum_c  q_sel[h, c] * k[h // G, j, kch[h, c]]

SparQ: ``q_sel`` = the query's top-r |q| components, ``kch`` their channel ids in the full key cache
(strided reads of r channels out of d). Double Sparsity: ``k`` is the label cache ``[H_kv, n, r]``
(the calibrated channels stored contiguously) and ``kch = arange(r)``.

Memory layout:
  q_sel  [H_q, R] fp32          kch [H_q, R] int32
  k      [H_kv, N, DK]          (DK = d for SparQ, r for a label cache)
  scores [H_q, N] fp32          one program per (query head, block of BLOCK tokens)
"""
from __future__ import annotations

import functools

from .attention import _next_pow2


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scores_kernel(q_ptr, ch_ptr, k_ptr, s_ptr, N, stride_kh, stride_kn,
                      G: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr):
        h = tl.program_id(0)
        blk = tl.program_id(1)
        r_offs = tl.arange(0, RP)
        r_mask = r_offs < R
        qv = tl.load(q_ptr + h * R + r_offs, mask=r_mask, other=0.0)
        ch = tl.load(ch_ptr + h * R + r_offs, mask=r_mask, other=0)
        n_offs = blk * BLOCK + tl.arange(0, BLOCK)
        n_mask = n_offs < N
        kk = tl.load(k_ptr + (h // G) * stride_kh + n_offs[:, None] * stride_kn + ch[None, :],
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        tl.store(s_ptr + h * N + n_offs, tl.sum(kk * qv[None, :], axis=1), mask=n_mask)

    return scores_kernel


def reduced_scores(q_sel, k, kch, *, block: int = 64):
    """``[H_q, N]`` fp32 approximate scores from ``R`` channels per query head (see module doc)."""
    import torch
    if q_sel.dim() != 2 or kch.shape != q_sel.shape:
        raise ValueError(f"q_sel and kch must both be [H_q, R], got {tuple(q_sel.shape)} and {tuple(kch.shape)}")
    if k.dim() != 3:
        raise ValueError(f"k must be [H_kv, N, DK], got shape {tuple(k.shape)}")
    h_q, r = q_sel.shape
    h_kv, n, dk = k.shape
    if h_q % h_kv:
        raise ValueError(f"H_q={h_q} must be divisible by H_kv={h_kv}")
    if r and (int(kch.min()) < 0 or int(kch.max()) >= dk):
        raise ValueError(f"kch must lie in [0, {dk})")
    scores = torch.empty((h_q, n), dtype=torch.float32, device=k.device)
    if n == 0:
        return scores
    k = k.contiguous()
    _kernel()[(h_q, -(-n // block))](q_sel.to(torch.float32).contiguous(), kch.to(torch.int32).contiguous(), k, scores,
                                     n, k.stride(0), k.stride(1), G=h_q // h_kv, R=r, RP=_next_pow2(max(r, 1)),
                                     BLOCK=block)
    return scores
