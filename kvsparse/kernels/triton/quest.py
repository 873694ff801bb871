"""Quest in Triton: page metadata (element-wise min/max of keys per page), page scores
``sum_i max(q_i * min_i, q_i * max_i)``, top pages, then attention over the chosen pages.

Memory layout:
  k           [H_kv, N, D]            keys of one sequence
  kmin, kmax  [H_kv, NP, D] fp32      NP = ceil(N / P); the last page covers only its filled tokens
  q           [H_q, D]
  scores      [H_q, NP] fp32          one program per (query head, block of pages)
Page scores are per query head (Quest's convention); the GQA group shares the metadata rows.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ...registry import register_kernel
from .attention import _next_pow2, decode_attention_indices, to_numpy, to_torch


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def metadata_kernel(k_ptr, kmin_ptr, kmax_ptr, N, NP, stride_kh, stride_kn,
                        P: tl.constexpr, PP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
        h = tl.program_id(0)
        page = tl.program_id(1)
        t = page * P + tl.arange(0, PP)
        t_mask = (tl.arange(0, PP) < P) & (t < N)
        d_offs = tl.arange(0, DP)
        m = t_mask[:, None] & (d_offs[None, :] < D)
        k = tl.load(k_ptr + h * stride_kh + t[:, None] * stride_kn + d_offs[None, :], mask=m, other=0.0).to(tl.float32)
        kmin = tl.min(tl.where(m, k, float("inf")), axis=0)
        kmax = tl.max(tl.where(m, k, float("-inf")), axis=0)
        out = (h * NP + page) * D + d_offs
        tl.store(kmin_ptr + out, kmin, mask=d_offs < D)
        tl.store(kmax_ptr + out, kmax, mask=d_offs < D)

    @triton.jit
    def score_kernel(q_ptr, kmin_ptr, kmax_ptr, s_ptr, NP,
                     G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
        h = tl.program_id(0)
        blk = tl.program_id(1)
        kvh = h // G
        d_offs = tl.arange(0, DP)
        p_offs = blk * BLOCK + tl.arange(0, BLOCK)
        m = (p_offs[:, None] < NP) & (d_offs[None, :] < D)
        q = tl.load(q_ptr + h * D + d_offs, mask=d_offs < D, other=0.0).to(tl.float32)
        rows = (kvh * NP + p_offs[:, None]) * D + d_offs[None, :]
        lo = tl.load(kmin_ptr + rows, mask=m, other=0.0)
        hi = tl.load(kmax_ptr + rows, mask=m, other=0.0)
        s = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1)
        tl.store(s_ptr + h * NP + p_offs, s, mask=p_offs < NP)

    return metadata_kernel, score_kernel


def page_metadata(k, page_size: int):
    """Per KV head and page, element-wise min and max of the keys: ``(kmin, kmax)`` ``[H_kv, NP, D]`` fp32."""
    import torch
    if k.dim() != 3:
        raise ValueError(f"k must be [H_kv, N, D], got shape {tuple(k.shape)}")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    h_kv, n, d = k.shape
    n_pages = math.ceil(n / page_size)
    kmin = torch.empty((h_kv, n_pages, d), dtype=torch.float32, device=k.device)
    kmax = torch.empty_like(kmin)
    if n_pages:
        meta, _ = _kernels()
        k = k.contiguous()
        meta[(h_kv, n_pages)](k, kmin, kmax, n, n_pages, k.stride(0), k.stride(1),
                              P=page_size, PP=_next_pow2(page_size), D=d, DP=_next_pow2(d))
    return kmin, kmax


def page_scores(q, kmin, kmax):
    """``[H_q, NP]``: the Quest upper bound ``sum_i max(q_i min_i, q_i max_i)`` of q.k on each page."""
    import torch
    h_q, d = q.shape
    h_kv, n_pages, _ = kmin.shape
    if h_q % h_kv:
        raise ValueError(f"H_q={h_q} must be divisible by H_kv={h_kv}")
    scores = torch.empty((h_q, n_pages), dtype=torch.float32, device=q.device)
    if n_pages:
        _, score = _kernels()
        block = 64
        score[(h_q, triton_cdiv(n_pages, block))](q.contiguous(), kmin, kmax, scores, n_pages,
                                                   G=h_q // h_kv, D=d, DP=_next_pow2(d), BLOCK=block)
    return scores


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def select_pages(scores, page_budget: int):
    """Top ``page_budget`` pages per query head (ties broken by torch.topk: compare by scores)."""
    import torch
    k = min(int(page_budget), scores.shape[1])
    return torch.topk(scores, k, dim=1).indices.sort(dim=1).values


def quest_step(q, k, v, *, page_size: int, token_budget: int, kmin=None, kmax=None, scale=None,
               num_splits=None):
    """Quest decode step: scores -> top ``token_budget // page_size`` pages -> attention.

    Returns ``(out [H_q, D], lse [H_q], pages [H_q, B_pages])``. Pass cached ``kmin``/``kmax`` to skip the
    metadata pass (in decoding they are updated incrementally, not recomputed).
    """
    import torch
    n = k.shape[1]
    if kmin is None or kmax is None:
        kmin, kmax = page_metadata(k, page_size)
    pages = select_pages(page_scores(q, kmin, kmax), max(1, token_budget // page_size))
    tok, lengths = _tokens_of_pages(pages, page_size, n)
    out, lse = decode_attention_indices(q, k, v, tok, lengths, scale=scale, num_splits=num_splits)
    return out, lse, pages


def _tokens_of_pages(pages, page_size: int, n: int):
    """``[R, B*P]`` token ids of the pages (valid first) and their counts (the last page cut at n)."""
    import torch
    tok = (pages[:, :, None] * page_size + torch.arange(page_size, device=pages.device)[None, None, :]).reshape(pages.shape[0], -1)
    valid = tok < n
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    return torch.gather(tok, 1, order).to(torch.int32), valid.sum(dim=1)


@register_kernel("quest", "triton")
def quest(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract for the Quest oracle (``kvsparse.oracle.quest.Quest``): the page count,
    dense fallbacks and last-page rule come from ``method``; scores, top-k and attention run on the GPU.
    Returns ``(out [H_q, d], indices per query head)`` as NumPy."""
    import torch
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    h_q, n = qt.shape[0], kt.shape[1]
    p = method.page_size
    n_pages = -(-n // p)
    if method.is_dense(n):
        pages = torch.arange(n_pages, device=qt.device)[None, :].expand(h_q, n_pages)
    else:
        kmin, kmax = page_metadata(kt, p)
        scores = page_scores(qt, kmin, kmax)
        if method.last_page == "always":
            top = select_pages(scores[:, : n_pages - 1], method.page_budget(n) - 1)
            last = torch.full((h_q, 1), n_pages - 1, device=qt.device, dtype=top.dtype)
            pages = torch.cat([top, last], dim=1)
        else:
            pages = select_pages(scores, min(method.page_budget(n), n_pages))
    tok, lengths = _tokens_of_pages(pages.to(torch.int64), p, n)
    out, _ = decode_attention_indices(qt, kt, vt, tok, lengths, scale=scale)
    tok, lengths = tok.cpu().numpy(), lengths.cpu().numpy()
    return to_numpy(out), [np.sort(tok[h, : lengths[h]]) for h in range(h_q)]
