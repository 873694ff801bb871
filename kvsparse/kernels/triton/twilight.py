"""Twilight in Triton: the base kernel's candidates (Quest page scores or Double Sparsity label
scores, core tie rule), re-scored on the device with per-token fake-quantized keys, pruned to the
smallest set reaching mass ``p``, then split-K attention over the kept tokens.

Kernels (one program per query head, or per (query head, block of candidates)):
  estimate_kernel  [H_q, B] float64 logits ``q . k~_j / sqrt(d)`` of the candidates ``cand [H_q, B]``
                   (int32, ascending, valid up to ``lengths``); ``k~`` is the key row fake-quantized
                   over its d channels in float64 (the oracle's operations and order, half-to-even
                   rounding), so the codes are bit-identical to the oracle's.
  top_p_search_kernel  the reference kernel's threshold bisection (oracle ``top_p_search``: same
                   ``mid``/``min_gt_low``/``max_le_high`` updates and stopping rule), a pass over the
                   row per iteration; writes the final ``low`` per head (kept: ``p_i > low``).
The softmax over candidates and the ``top_p="sort"`` rule (stable sort + cumulative sum) are float64
torch. Sums of mass are plain float64 (the oracle's are exactly rounded with ``math.fsum``): the
``sum >= p`` decision can differ only when a mass lies within ~``B * 2^-53`` of ``p``.
Every other convention is the oracle's (``kvsparse.oracle.twilight.Twilight``): dense layers,
``p >= 1`` (no estimate), ``bracket`` ("max", or "first": the probability of token 0 if it is a
candidate, else 0), ``epsilon``, ``quant_bits=None`` (exact keys).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ...oracle.double_sparsity import DoubleSparsity
from ...registry import register_kernel
from . import double_sparsity as ds
from .attention import _next_pow2, attend_mask, dense_decode, indices_to_mask, mask_to_indices, to_numpy, to_torch, topk_core
from .quest import method_pages


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def estimate_kernel(q_ptr, k_ptr, cand_ptr, len_ptr, out_ptr, scale, B, stride_kh, stride_kn,
                        G: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        BLOCK: tl.constexpr):
        h = tl.program_id(0)
        blk = tl.program_id(1)
        length = tl.load(len_ptr + h)
        b_offs = blk * BLOCK + tl.arange(0, BLOCK)
        b_mask = b_offs < length
        d_offs = tl.arange(0, DP)
        d_mask = d_offs < D
        m = b_mask[:, None] & d_mask[None, :]
        tok = tl.load(cand_ptr + h * B + b_offs, mask=b_mask, other=0)
        x = tl.load(k_ptr + (h // G) * stride_kh + tok[:, None] * stride_kn + d_offs[None, :], mask=m,
                    other=0.0).to(tl.float64)
        if BITS > 0:
            levels = 2.0 ** BITS - 1.0
            # padding rows (b_mask False) get lo = span = 0: no inf - inf
            lo = tl.where(b_mask, tl.min(tl.where(m, x, float("inf")), axis=1), 0.0)
            span = tl.where(b_mask, tl.max(tl.where(m, x, float("-inf")), axis=1) - lo, 0.0)
            qscale = tl.where(span > 0, span / levels, 1.0)
            c = (x - lo[:, None]) / qscale[:, None]
            f = tl.floor(c)
            frac = c - f
            odd = (f - 2.0 * tl.floor(f * 0.5)) != 0
            c = f + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)   # round half to even
            x = c * qscale[:, None] + lo[:, None]
        q = tl.load(q_ptr + h * D + d_offs, mask=d_mask, other=0.0).to(tl.float64)
        logit = tl.sum(tl.where(m, x * q[None, :], 0.0), axis=1) * scale
        tl.store(out_ptr + h * B + b_offs, logit, mask=b_mask)

    @triton.jit
    def top_p_search_kernel(p_ptr, len_ptr, high_ptr, low_ptr, target, epsilon, B, max_iterations,
                            BLOCK: tl.constexpr):
        h = tl.program_id(0)
        length = tl.load(len_ptr + h)
        low = 0.0
        high = tl.load(high_ptr + h)
        it = 0
        searching = length > 0
        while searching:
            mid = (low + high) / 2
            min_gt_low = high
            max_le_high = low
            mass = 0.0
            for base in range(0, B, BLOCK):
                offs = base + tl.arange(0, BLOCK)
                msk = offs < length
                p = tl.load(p_ptr + h * B + offs, mask=msk, other=0.0)
                min_gt_low = tl.minimum(min_gt_low, tl.min(tl.where(msk & (p > low), p, float("inf")), axis=0))
                max_le_high = tl.maximum(max_le_high, tl.max(tl.where(msk & (p <= high), p, float("-inf")), axis=0))
                mass += tl.sum(tl.where(msk & (p > mid), p, 0.0), axis=0)
            if mass >= target:
                low = mid
            else:
                high = tl.minimum(mid, max_le_high)
            it += 1
            searching = (max_le_high - min_gt_low > epsilon) & (it < max_iterations)
        tl.store(low_ptr + h, low)

    return estimate_kernel, top_p_search_kernel


def estimate_logits(q, k, cand, lengths, bits: int | None, scale: float, *, block: int = 32):
    """``[H_q, B]`` float64 estimated logits of the candidates (see the module doc)."""
    import torch
    h_q, d = q.shape
    h_kv = k.shape[0]
    width = cand.shape[1]
    out = torch.full((h_q, width), float("-inf"), dtype=torch.float64, device=q.device)
    if width == 0:
        return out
    k = k.contiguous()
    est, _ = _kernels()
    est[(h_q, -(-width // block))](q.contiguous(), k, cand.to(torch.int32).contiguous(),
                                   lengths.to(torch.int32).contiguous(), out, float(scale), width,
                                   k.stride(0), k.stride(1), G=h_q // h_kv, BITS=int(bits or 0), D=d,
                                   DP=_next_pow2(d), BLOCK=block)
    return out


def top_p_search(probs, lengths, p: float, high, *, epsilon: float = 0.0, max_iterations: int = 100_000,
                 block: int = 64):
    """Per row of ``probs [R, B]`` (float64, valid up to ``lengths``) the final ``low`` of the threshold
    bisection started at ``high [R]``; the kept entries are ``probs > low``."""
    import torch
    rows, width = probs.shape
    low = torch.zeros(rows, dtype=torch.float64, device=probs.device)
    if rows == 0:
        return low
    _, search = _kernels()
    search[(rows,)](probs.to(torch.float64).contiguous(), lengths.to(torch.int32).contiguous(),
                    high.to(torch.float64).contiguous(), low, float(p), float(epsilon), width,
                    int(max_iterations), BLOCK=min(block, _next_pow2(max(width, 1))))
    return low


def top_p_sort(probs, lengths, p: float):
    """``[R, B]`` kept mask: the shortest prefix in core tie-rule order whose mass reaches ``p`` (all if none)."""
    import torch
    valid = torch.arange(probs.shape[1], device=probs.device)[None, :] < lengths[:, None]
    ranked = torch.where(valid, probs, -1.0)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    sorted_p = torch.gather(torch.where(valid, probs, 0.0), 1, order)
    before = torch.cumsum(sorted_p, dim=1) - sorted_p            # mass of the entries ranked above
    reached = (torch.cumsum(sorted_p, dim=1) >= p).any(dim=1, keepdim=True)
    keep_sorted = (before < p) | ~reached
    keep = torch.zeros_like(valid).scatter_(1, order, keep_sorted)
    return keep & valid


def candidates(method, q, k):
    """``[H_q, n]`` bool: the base selector's candidates (everything on a dense layer)."""
    import torch
    h_q, n = q.shape[0], k.shape[1]
    base = method.base
    full = torch.ones((h_q, n), dtype=torch.bool, device=q.device)
    if method.dense_layer:
        return full
    if isinstance(base, DoubleSparsity):
        if base.is_dense(n):
            return full
        return indices_to_mask(topk_core(ds.scores(base, q, k), base.token_budget), n)
    if base.is_dense(n):
        return full
    p = base.page_size
    page_mask = indices_to_mask(method_pages(base, q, k), -(-n // p))
    return page_mask.repeat_interleave(p, dim=1)[:, :n]


@register_kernel("twilight", "triton")
def twilight(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)`` as NumPy."""
    import torch
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    h_q, n = qt.shape[0], kt.shape[1]
    cand = candidates(method, qt, kt)
    if method.dense_layer or method.p >= 1:
        if bool(cand.all()):
            out, _ = dense_decode(qt, kt, vt, scale=scale)
            return to_numpy(out), [np.arange(n) for _ in range(h_q)]
        kept = cand
    else:
        idx, lengths = mask_to_indices(cand)
        valid = torch.arange(idx.shape[1], device=qt.device)[None, :] < lengths[:, None]
        # the estimate uses the default 1/sqrt(d), as the oracle's (a scale only rescales attention)
        logits = estimate_logits(qt, kt, idx, lengths, method.quant_bits, 1.0 / math.sqrt(qt.shape[1]))
        probs = torch.softmax(torch.where(valid, logits, float("-inf")), dim=1)
        if method.top_p == "sort":
            keep = top_p_sort(probs, lengths, method.p)
        else:
            if method.bracket == "max":
                high = probs.amax(dim=1)
            else:
                high = torch.where(idx[:, 0] == 0, probs[:, 0], torch.zeros_like(probs[:, 0]))
            low = top_p_search(probs, lengths, method.p, high, epsilon=method.epsilon)
            keep = valid & (probs > low[:, None])
        kept = indices_to_mask_where(idx, keep, n)
    out, _, rows = attend_mask(qt, kt, vt, kept, scale=scale)
    return to_numpy(out), rows


def indices_to_mask_where(idx, keep, n: int):
    """``[R, n]`` mask of the entries of ``idx`` where ``keep`` is True (scatter of True only)."""
    import torch
    mask = torch.zeros((idx.shape[0], n + 1), dtype=torch.bool, device=idx.device)
    target = torch.where(keep, idx.to(torch.int64), torch.full_like(idx, n, dtype=torch.int64))
    return mask.scatter_(1, target, True)[:, :n]
