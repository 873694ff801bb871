"""H2O in Triton: accumulated-attention scores (prefill: the column sums of the prompt's causal
softmax, SnapKV's vote kernel with the window = the whole prompt; decode: this step's softmax
probabilities of the attended rows added to the scores), eviction to ``heavy + recent``, split-K
attention over the kept rows.

Kernel (decode): ``probs_kernel``, one program per (query head, block of attended rows): with the
step's ``lse [H_q]`` from the attention kernel, ``p_j = exp(scale * q . k_j - lse)`` scattered into a
``[H_q, n]`` fp32 row (zeros elsewhere), which the host reduces over the GQA group when ``gqa`` is
``mean|max|sum`` and adds to the fp32 scores ``[U, n]``. Eviction (core tie rule: stable sort) is torch.

Every convention of ``kvsparse.oracle.h2o.H2O`` with ``execution="drop"`` is honoured (budgets and
ratios frozen at prefill, ``timing``, ``leaving_token_competes``, ``decode_eviction``,
``score_normalization``, ``gqa``); ``execution="mask_sim"`` (the masking simulation of the paper's
tables, not a kernel path) raises ``ValueError``. Scores are fp32 (``score_bits=32``). Softmax scale:
the one given to ``prefill`` (``None``: ``1/sqrt(d)``) votes and is stored (``state.extra["scale"]``)
for every decode step; ``decode``'s ``scale`` must be None or equal to it (the oracle's rule).
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np

from ...oracle.method import decode_scale, prefill_scale
from ...registry import register_kernel
from .attention import _next_pow2, decode_attention_indices, mask_to_indices, rows_per_query_head, to_numpy, to_torch
from .snapkv import KernelCacheState, append, reduce_group, window_vote


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probs_kernel(q_ptr, k_ptr, idx_ptr, len_ptr, lse_ptr, out_ptr, N, scale, stride_kh, stride_kn, stride_ir,
                     G: tl.constexpr, ROW_IS_KV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     BLOCK: tl.constexpr):
        h = tl.program_id(0)
        blk = tl.program_id(1)
        row = h // G if ROW_IS_KV else h
        length = tl.load(len_ptr + row)
        b = blk * BLOCK + tl.arange(0, BLOCK)
        bm = b < length
        d_offs = tl.arange(0, DP)
        d_mask = d_offs < D
        tok = tl.load(idx_ptr + row * stride_ir + b, mask=bm, other=0)
        k = tl.load(k_ptr + (h // G) * stride_kh + tok[:, None] * stride_kn + d_offs[None, :],
                    mask=bm[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        q = tl.load(q_ptr + h * D + d_offs, mask=d_mask, other=0.0).to(tl.float32)
        p = tl.exp(tl.sum(k * q[None, :], axis=1) * scale - tl.load(lse_ptr + h))
        tl.store(out_ptr + h * N + tok, p, mask=bm)

    return probs_kernel


def step_probs(q, k, idx, lengths, lse, *, scale=None, block: int = 32):
    """``[H_q, n]`` fp32: the softmax probabilities of this step's attended rows (0 elsewhere)."""
    import torch
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    out = torch.zeros((h_q, n), dtype=torch.float32, device=q.device)
    width = idx.shape[1]
    if width == 0 or n == 0:
        return out
    k = k.contiguous()
    idx = idx.to(torch.int32).contiguous()
    _kernel()[(h_q, -(-width // block))](
        q.contiguous(), k, idx, lengths.to(torch.int32).contiguous(), lse.contiguous(), out, n,
        float(scale if scale is not None else 1.0 / math.sqrt(d)), k.stride(0), k.stride(1), idx.stride(0),
        G=h_q // h_kv, ROW_IS_KV=idx.shape[0] == h_kv and h_q != h_kv, D=d, DP=_next_pow2(d), BLOCK=block)
    return out


def evict(kept, scores, n: int, heavy: int, recent: int, protect_leaving: bool = False):
    """Oracle ``h2o.evict`` on device tensors: protected recent rows + the top ``heavy`` of the others."""
    import torch
    pos = torch.arange(n, device=kept.device)[None, :]
    protected = pos >= n - recent
    if protect_leaving:
        protected = protected | (pos == n - recent - 1)
    cand = kept & ~protected
    slots = heavy - (kept & protected & (pos < n - recent)).sum(dim=1, keepdim=True)
    order = torch.sort(torch.where(cand, scores, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=kept.device).expand_as(order))
    return (kept & protected) | (cand & (rank < slots))


def _unit_rows(method, probs, h_kv: int):
    return probs if method.gqa == "per_query_head" else reduce_group(probs, h_kv, method.gqa)


def _check_execution(method):
    if method.execution != "drop":
        raise ValueError(f"the Triton H2O kernel implements execution='drop' only, got {method.execution!r} "
                         "(mask_sim is the paper's masking simulation: use the oracle)")


def prefill(method, q_prompt, k_prompt, v_prompt, *, scale=None):
    import torch
    _check_execution(method)
    qp, kp, vp = to_torch(q_prompt, "q_prompt"), to_torch(k_prompt, "k_prompt"), to_torch(v_prompt, "v_prompt")
    if qp.dim() != 3 or kp.dim() != 3 or kp.shape != vp.shape or qp.shape[0] != kp.shape[0] or qp.shape[0] < 1:
        raise ValueError(f"prompt must be q [T>=1, H_q, d], k/v [T, H_kv, d], got {tuple(qp.shape)}, {tuple(kp.shape)}")
    t, h_kv = kp.shape[:2]
    scale = prefill_scale(scale, kp.shape[2])
    scores = window_vote(qp, kp, t, scale=scale)
    if method.score_normalization == "visible_queries":
        scores = scores / torch.arange(t, 0, -1, device=qp.device, dtype=torch.float32)
    scores = _unit_rows(method, scores, h_kv)
    heavy, recent = method.budgets(t)
    kept = evict(torch.ones(scores.shape, dtype=torch.bool, device=qp.device), scores, t, heavy, recent)
    return KernelCacheState(kp.transpose(0, 1).contiguous(), vp.transpose(0, 1).contiguous(), kept,
                            {"scores": scores, "heavy": heavy, "recent": recent, "scale": scale})


def decode(method, state: KernelCacheState, q, k_new, v_new, *, scale=None):
    import torch
    _check_execution(method)
    scale = decode_scale(state.extra.get("scale"), scale)
    state = append(state, k_new, v_new)
    scores = torch.cat([state.extra["scores"], torch.zeros((state.kept.shape[0], 1), device=state.kept.device)], 1)
    heavy, recent, n = state.extra["heavy"], state.extra["recent"], state.n
    kept = state.kept
    protect = not method.leaving_token_competes
    if method.decode_eviction and method.timing == "before_attention":
        kept = evict(kept, scores, n, heavy, recent, protect)
    qt = to_torch(q, "q")
    idx, lengths = mask_to_indices(kept)
    out, lse = decode_attention_indices(qt, state.k, state.v, idx, lengths, scale=scale)
    scores = scores + _unit_rows(method, step_probs(qt, state.k, idx, lengths, lse, scale=scale), state.k.shape[0])
    idx_np, len_np = idx.cpu().numpy(), lengths.cpu().numpy()
    rows = rows_per_query_head([idx_np[r, : len_np[r]].astype(np.int64) for r in range(idx_np.shape[0])], qt.shape[0])
    if method.decode_eviction and method.timing == "after_attention":
        kept = evict(kept, scores, n, heavy, recent, protect)
    state = replace(state, kept=kept, extra=dict(state.extra, scores=scores))
    return state, (to_numpy(out), rows)


@register_kernel("h2o", "triton")
def h2o(method, q, k, v, *, positions=None, scale=None):
    """H2O is stateful: use ``h2o.prefill`` / ``h2o.decode`` (the stateful kernel contract)."""
    raise TypeError("the H2O kernel is stateful: call h2o.prefill(method, q_prompt, k_prompt, v_prompt, scale=...) "
                    "then h2o.decode(method, state, q, k_new, v_new, scale=...)")


h2o.prefill = prefill
h2o.decode = decode
