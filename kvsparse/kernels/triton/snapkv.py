"""SnapKV in Triton (PyramidKV reuses it with its own ``budget_total``): the prefill window vote,
pooling, selection; then decode over the compressed cache with the split-K attention kernel.

Kernels (prompt layout ``q [T, H_q, D]``, ``k [T, H_kv, D]``, contiguous; GQA: head h reads h // G):
  window_lse_kernel  one program per (query head, window row i): the log-sum-exp of row ``T-w+i``'s
                     causal logits over keys ``0..T-w+i`` (online max/sum, fp32).
  vote_kernel        one program per (query head, block of keys): ``sum_i exp(logit_ij - lse_i)`` over
                     the window rows that see key j (causal), i.e. the column sums of the window's
                     softmax rows; ``[H_q, T]`` fp32. H2O's prefill is the same vote with w = T.
Host side (torch, O(H T)): ``mean`` (divide by w), pooling with the oracle's ``core.pool1d`` rules
(``max`` pads -inf, ``avg`` counts the zero padding; ``torch.nn.functional`` pools with
``padding = kernel // 2``), GQA reduction before or after pooling, ``+inf`` on the window, the top
``budget_total`` per unit under the core tie rule (stable sort). Every convention is the oracle's
(``kvsparse.oracle.snapkv.SnapKV``). Decode: the new token is appended and kept by every unit; each
unit (query head, or KV head shared by its group) attends its kept rows; indices are original positions.
Softmax scale: the one given to ``prefill`` (``None``: ``1/sqrt(d)``) votes and is stored
(``state.extra["scale"]``) for every decode step; ``decode``'s ``scale`` must be None or equal to it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any


from ...oracle.method import decode_scale, prefill_scale
from ...registry import register_kernel
from .attention import _next_pow2, attend_mask, indices_to_mask, rows_per_query_head, to_numpy, to_torch, topk_core


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def window_lse_kernel(q_ptr, k_ptr, lse_ptr, T, W, scale, stride_qt, stride_kt,
                          G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
        h = tl.program_id(0)
        i = tl.program_id(1)
        row = T - W + i
        d_offs = tl.arange(0, DP)
        d_mask = d_offs < D
        q = tl.load(q_ptr + row * stride_qt + h * D + d_offs, mask=d_mask, other=0.0).to(tl.float32)
        m = -1.0e30
        l = 0.0
        for base in range(0, row + 1, BLOCK):
            j = base + tl.arange(0, BLOCK)
            jm = j <= row
            k = tl.load(k_ptr + j[:, None] * stride_kt + (h // G) * D + d_offs[None, :],
                        mask=jm[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            s = tl.where(jm, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m = m_new
        tl.store(lse_ptr + h * W + i, m + tl.log(l))

    @triton.jit
    def vote_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, T, W, scale, stride_qt, stride_kt,
                    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
        h = tl.program_id(0)
        blk = tl.program_id(1)
        j = blk * BLOCK + tl.arange(0, BLOCK)
        jm = j < T
        d_offs = tl.arange(0, DP)
        d_mask = d_offs < D
        k = tl.load(k_ptr + j[:, None] * stride_kt + (h // G) * D + d_offs[None, :],
                    mask=jm[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, W):
            row = T - W + i
            q = tl.load(q_ptr + row * stride_qt + h * D + d_offs, mask=d_mask, other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + h * W + i)
            s = tl.sum(k * q[None, :], axis=1) * scale
            acc += tl.where(jm & (j <= row), tl.exp(s - lse), 0.0)
        tl.store(out_ptr + h * T + j, acc, mask=jm)

    return window_lse_kernel, vote_kernel


def window_vote(q_prompt, k_prompt, window: int, *, scale=None, block: int = 32):
    """``[H_q, T]`` fp32: column sums of the causal softmax rows of the last ``window`` queries."""
    import torch
    t, h_q, d = q_prompt.shape
    h_kv = k_prompt.shape[1]
    if h_q % h_kv:
        raise ValueError(f"H_q={h_q} must be divisible by H_kv={h_kv}")
    if not 0 <= window <= t:
        raise ValueError(f"window must lie in [0, T={t}], got {window}")
    out = torch.zeros((h_q, t), dtype=torch.float32, device=q_prompt.device)
    if window == 0 or t == 0:
        return out
    q_prompt, k_prompt = q_prompt.contiguous(), k_prompt.contiguous()
    scale = float(scale if scale is not None else 1.0 / math.sqrt(d))
    lse = torch.empty((h_q, window), dtype=torch.float32, device=q_prompt.device)
    lse_kernel, vote = _kernels()
    meta = dict(G=h_q // h_kv, D=d, DP=_next_pow2(d), BLOCK=block)
    lse_kernel[(h_q, window)](q_prompt, k_prompt, lse, t, window, scale, q_prompt.stride(0), k_prompt.stride(0), **meta)
    vote[(h_q, -(-t // block))](q_prompt, k_prompt, lse, out, t, window, scale, q_prompt.stride(0),
                                k_prompt.stride(0), **meta)
    return out


def pool(scores, kernel: int, how: str):
    """``core.pool1d`` on the last axis (``how="none"`` or kernel 1: identity)."""
    import torch.nn.functional as F
    if how == "none" or kernel == 1 or scores.shape[-1] == 0:
        return scores.clone()
    x = scores[:, None, :]
    if how == "max":
        return F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)[:, 0]
    if how == "avg":
        return F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)[:, 0]
    raise ValueError(f"pool must be 'max', 'avg' or 'none', got {how!r}")


def reduce_group(scores, h_kv: int, how: str):
    """``[H_q, ...] -> [H_kv, ...]``: mean, max or sum over each KV head's consecutive query heads."""
    g = scores.shape[0] // h_kv
    grouped = scores.reshape((h_kv, g) + tuple(scores.shape[1:]))
    if how == "mean":
        return grouped.mean(dim=1)
    if how == "max":
        return grouped.amax(dim=1)
    if how == "sum":
        return grouped.sum(dim=1)
    raise ValueError(f"gqa must be 'mean', 'max' or 'sum', got {how!r}")


@dataclass
class KernelCacheState:
    """Device state of an eviction kernel: the whole K/V (``[H_kv, n, d]``, evicted rows are simply
    never read), ``kept [U, n]`` bool, and extras: ``scale`` (the softmax scale prefill was run with)
    and method-specific ones (H2O: ``scores``, budgets)."""

    k: Any
    v: Any
    kept: Any
    extra: dict

    @property
    def n(self) -> int:
        return int(self.k.shape[1])


def unit_scores(method, q_prompt, k_prompt, *, scale=None):
    """``[U, T]`` fp32 pooled prefix scores per unit, ``+inf`` on the window (oracle ``unit_scores``)."""
    import torch
    t, h_kv = k_prompt.shape[0], k_prompt.shape[1]
    w = method.window
    raw = window_vote(q_prompt, k_prompt, w, scale=scale)[:, : t - w]
    if method.window_score == "mean":
        raw = raw / w
    if method.gqa == "per_query_head":
        pooled = pool(raw, method.kernel, method.pool)
    elif method.reduce_before_pool:
        pooled = pool(reduce_group(raw, h_kv, method.gqa), method.kernel, method.pool)
    else:
        pooled = reduce_group(pool(raw, method.kernel, method.pool), h_kv, method.gqa)
    return torch.cat([pooled, torch.full((pooled.shape[0], w), float("inf"), device=pooled.device)], dim=1)


def prefill(method, q_prompt, k_prompt, v_prompt, *, scale=None):
    """Kernel prefill: the kept rows of every unit after the window vote (see the module doc)."""
    import torch
    qp, kp, vp = to_torch(q_prompt, "q_prompt"), to_torch(k_prompt, "k_prompt"), to_torch(v_prompt, "v_prompt")
    if qp.dim() != 3 or kp.shape != vp.shape or kp.dim() != 3 or qp.shape[0] != kp.shape[0] or qp.shape[0] < 1:
        raise ValueError(f"prompt must be q [T>=1, H_q, d], k/v [T, H_kv, d], got {tuple(qp.shape)}, {tuple(kp.shape)}")
    t, h_q = qp.shape[:2]
    h_kv = kp.shape[1]
    scale = prefill_scale(scale, kp.shape[2])
    units = h_q if method.gqa == "per_query_head" else h_kv
    n_total = method.budget_total(t)
    if method.compression_ratio is not None and t <= method.window:
        raise ValueError(f"kvpress needs more prompt tokens ({t}) than window ({method.window})")
    kept = torch.ones((units, t), dtype=torch.bool, device=qp.device)
    if n_total is not None:
        kept = indices_to_mask(topk_core(unit_scores(method, qp, kp, scale=scale), n_total), t)
    return KernelCacheState(kp.transpose(0, 1).contiguous(), vp.transpose(0, 1).contiguous(), kept, {"scale": scale})


def append(state: KernelCacheState, k_new, v_new) -> KernelCacheState:
    """Token n appended (kept by every unit). A decoder would write into a preallocated cache."""
    import torch
    kn, vn = to_torch(k_new, "k_new"), to_torch(v_new, "v_new")
    if kn.shape != (state.k.shape[0], state.k.shape[2]) or vn.shape != kn.shape:
        raise ValueError(f"k_new and v_new must be [H_kv, d] = {(state.k.shape[0], state.k.shape[2])}, "
                         f"got {tuple(kn.shape)}, {tuple(vn.shape)}")
    kept = torch.cat([state.kept, torch.ones((state.kept.shape[0], 1), dtype=torch.bool, device=state.kept.device)], 1)
    return replace(state, k=torch.cat([state.k, kn[:, None].to(state.k.dtype)], 1),
                   v=torch.cat([state.v, vn[:, None].to(state.v.dtype)], 1), kept=kept)


def decode(method, state: KernelCacheState, q, k_new, v_new, *, scale=None):
    """Kernel decode: append, attend every unit's kept rows; ``(state, (out, indices per query head))``."""
    scale = decode_scale(state.extra.get("scale"), scale)
    state = append(state, k_new, v_new)
    qt = to_torch(q, "q")
    out, _, rows = attend_mask(qt, state.k, state.v, state.kept, scale=scale)
    return state, (to_numpy(out), rows_per_query_head(rows, qt.shape[0]))


@register_kernel("snapkv", "triton")
def snapkv(method, q, k, v, *, positions=None, scale=None):
    """SnapKV is stateful: use ``snapkv.prefill`` / ``snapkv.decode`` (the stateful kernel contract)."""
    raise TypeError("the SnapKV kernel is stateful: call snapkv.prefill(method, q_prompt, k_prompt, v_prompt, "
                    "scale=...) then snapkv.decode(method, state, q, k_new, v_new, scale=...)")


snapkv.prefill = prefill
snapkv.decode = decode
