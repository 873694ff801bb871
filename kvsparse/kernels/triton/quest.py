"""Quest in Triton: page metadata (element-wise min/max of keys per page), page scores
``sum_i max(q_i * min_i, q_i * max_i)``, top pages, then attention over the chosen pages.

Memory layout:
  k           [H_kv, N, D]            keys of one sequence (contiguous; page p = tokens p*P .. p*P+P-1)
  kmin, kmax  [H_kv, NP_cap, D]       dtype of k (a min or max of fp16 values is exact in fp16, so the
                                      metadata costs 2 * D * 2 bytes per page, not fp32's 4);
                                      NP = ceil(N / P) used; the last page covers only its filled tokens
  q           [H_q, D]
  scores      [H_q, NP] fp32          one program per (KV head, block of pages) scores the whole group:
                                      the metadata rows are read once per group, not once per head
Page scores are per query head (Quest's convention). Because max(q_i lo_i, q_i hi_i) is q_i hi_i for
q_i > 0 and q_i lo_i for q_i < 0, the score is two matrix products, ``q+ @ hi^T + q- @ lo^T``.

Selection is per query head; the group's selections are merged into one list of pages per KV head
with a bit per query head (``union_of_group``), so attention reads every selected page once per
group however many of the group's heads chose it.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ...registry import register_kernel
from .attention import DOT_ROWS, _f32_dot, _next_pow2, decode_attention_page_list, to_numpy, to_torch, topk_core


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def metadata_kernel(k_ptr, kmin_ptr, kmax_ptr, N, first_page, stride_kh, stride_kn, stride_mh, stride_mp,
                        P: tl.constexpr, PP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
        h = tl.program_id(0)
        page = first_page + tl.program_id(1)
        t = page.to(tl.int64) * P + tl.arange(0, PP)
        t_mask = (tl.arange(0, PP) < P) & (t < N)
        d_offs = tl.arange(0, DP)
        m = t_mask[:, None] & (d_offs[None, :] < D)
        k = tl.load(k_ptr + h * stride_kh + t[:, None] * stride_kn + d_offs[None, :], mask=m, other=0.0)
        kmin = tl.min(tl.where(m, k, float("inf")), axis=0)
        kmax = tl.max(tl.where(m, k, float("-inf")), axis=0)
        out = h * stride_mh + page.to(tl.int64) * stride_mp + d_offs
        tl.store(kmin_ptr + out, kmin, mask=d_offs < D)
        tl.store(kmax_ptr + out, kmax, mask=d_offs < D)

    @triton.jit
    def score_kernel(q_ptr, kmin_ptr, kmax_ptr, s_ptr, NP, stride_mh, stride_mp,
                     G: tl.constexpr, GP: tl.constexpr, F32_DOT: tl.constexpr,
                     D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
        kvh = tl.program_id(0)
        blk = tl.program_id(1)
        g_offs = tl.arange(0, GP)
        d_offs = tl.arange(0, DP)
        p_offs = blk * BLOCK + tl.arange(0, BLOCK)
        q_mask = (g_offs[:, None] < G) & (d_offs[None, :] < D)
        q = tl.load(q_ptr + (kvh * G + g_offs[:, None]) * D + d_offs[None, :], mask=q_mask, other=0.0)
        m = (p_offs[:, None] < NP) & (d_offs[None, :] < D)
        rows = kvh * stride_mh + p_offs[:, None].to(tl.int64) * stride_mp + d_offs[None, :]
        lo = tl.load(kmin_ptr + rows, mask=m, other=0.0)
        hi = tl.load(kmax_ptr + rows, mask=m, other=0.0)
        if F32_DOT:
            q = q.to(tl.float32)
            pos = tl.maximum(q, 0.0)
            neg = tl.minimum(q, 0.0)
            s = (tl.dot(pos, tl.trans(hi.to(tl.float32)), input_precision="ieee")
                 + tl.dot(neg, tl.trans(lo.to(tl.float32)), input_precision="ieee"))
        else:
            zero = tl.zeros_like(q)
            s = tl.dot(tl.maximum(q, zero), tl.trans(hi)) + tl.dot(tl.minimum(q, zero), tl.trans(lo))
        out = s_ptr + (kvh * G + g_offs[:, None]) * NP + p_offs[None, :]
        tl.store(out, s, mask=(g_offs[:, None] < G) & (p_offs[None, :] < NP))

    return metadata_kernel, score_kernel


def _check_keys(k, page_size):
    import torch
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(f"k must be a [H_kv, N, D] torch.Tensor, got {type(k).__name__} "
                         f"of shape {tuple(getattr(k, 'shape', ()))}")
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")


def update_page_metadata(kmin, kmax, k, start: int, stop: int, page_size: int):
    """Recompute, in place, the metadata of every page holding a token of ``[start, stop)`` from the
    keys ``k[:, :stop]`` (all the page's filled tokens, not only the new ones: exact, and a page that
    was partial gets its new tokens). A decode step calls it with ``(n - 1, n)``: one page per KV head."""
    _check_keys(k, page_size)
    h_kv, n, d = k.shape
    if not (0 <= start <= stop <= n):
        raise ValueError(f"need 0 <= start <= stop <= N={n}, got start={start}, stop={stop}")
    first, last = start // page_size, -(-stop // page_size)
    if kmin.shape != kmax.shape or kmin.dim() != 3 or kmin.shape[0] != h_kv or kmin.shape[2] != d \
            or kmin.shape[1] < last:
        raise ValueError(f"kmin/kmax must be [H_kv={h_kv}, >= {last} pages, D={d}], got {tuple(kmin.shape)} "
                         f"and {tuple(kmax.shape)}")
    if kmin.dtype != k.dtype or kmax.dtype != k.dtype or kmin.stride(2) != 1 or kmax.stride() != kmin.stride():
        raise ValueError("kmin/kmax must have k's dtype and one layout, contiguous in D")
    if last > first:
        meta, _ = _kernels()
        k = k.contiguous()
        meta[(h_kv, last - first)](k, kmin, kmax, stop, first, k.stride(0), k.stride(1), kmin.stride(0),
                                   kmin.stride(1), P=page_size, PP=_next_pow2(page_size), D=d, DP=_next_pow2(d))
    return kmin, kmax


def page_metadata(k, page_size: int, capacity_pages: int | None = None):
    """Per KV head and page, element-wise min and max of the keys: ``(kmin, kmax)`` ``[H_kv, NP, D]``
    in ``k``'s dtype; ``capacity_pages`` > NP preallocates room for the pages decoding will add."""
    import torch
    _check_keys(k, page_size)
    h_kv, n, d = k.shape
    n_pages = math.ceil(n / page_size)
    cap = n_pages if capacity_pages is None else int(capacity_pages)
    if cap < n_pages:
        raise ValueError(f"capacity_pages must be >= {n_pages} (the pages of N={n}), got {capacity_pages}")
    kmin = torch.empty((h_kv, cap, d), dtype=k.dtype, device=k.device)
    kmax = torch.empty_like(kmin)
    return update_page_metadata(kmin, kmax, k, 0, n, page_size)


def page_scores(q, kmin, kmax, n_pages: int | None = None):
    """``[H_q, NP]`` fp32: the Quest upper bound ``sum_i max(q_i min_i, q_i max_i)`` of q.k on each
    of the first ``n_pages`` pages (default: all rows of the metadata)."""
    import torch
    if q.dim() != 2 or kmin.dim() != 3 or kmin.shape != kmax.shape or kmin.shape[2] != q.shape[1]:
        raise ValueError(f"q must be [H_q, D] and kmin/kmax [H_kv, NP, D] with the same D, got "
                         f"{tuple(q.shape)}, {tuple(kmin.shape)}, {tuple(kmax.shape)}")
    if q.dtype != kmin.dtype or kmax.dtype != kmin.dtype:
        raise TypeError(f"q, kmin and kmax must share one dtype, got {q.dtype}, {kmin.dtype}, {kmax.dtype}")
    h_q, d = q.shape
    h_kv = kmin.shape[0]
    n_pages = kmin.shape[1] if n_pages is None else int(n_pages)
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"H_q={h_q} must be divisible by H_kv={h_kv}")
    if kmin.stride(2) != 1 or kmax.stride() != kmin.stride():
        raise ValueError("kmin/kmax must share one layout, contiguous in D")
    if not 0 <= n_pages <= kmin.shape[1]:
        raise ValueError(f"n_pages must lie in [0, {kmin.shape[1]}] (the metadata's rows), got {n_pages}")
    g = h_q // h_kv
    scores = torch.empty((h_q, n_pages), dtype=torch.float32, device=q.device)
    if n_pages:
        _, score = _kernels()
        block = 64
        score[(h_kv, -(-n_pages // block))](q.contiguous(), kmin, kmax, scores, n_pages, kmin.stride(0),
                                            kmin.stride(1), G=g, GP=max(DOT_ROWS, _next_pow2(g)),
                                            F32_DOT=_f32_dot(q.dtype),
                                            D=d, DP=max(16, _next_pow2(d)), BLOCK=block)
    return scores


def select_pages(scores, page_budget: int):
    """Top ``page_budget`` pages per query head, ascending; ties go to the lower page (the core rule)."""
    return topk_core(scores, page_budget).sort(dim=1).values


def union_of_group(pages, h_kv: int, n_pages: int):
    """Per-query-head page lists ``[H_q, B]`` as one list per KV head: ``(union [H_kv, W] int32
    ascending, counts [H_kv], heads [H_kv, W] int32)`` with bit g of ``heads`` set when query head
    ``kvh*G + g`` chose the page. ``W = min(NP, G*B)`` is fixed by the shapes (no device sync)."""
    import torch
    if pages.dim() != 2 or h_kv < 1 or pages.shape[0] % h_kv:
        raise ValueError(f"pages must be [H_q, B] with H_q divisible by h_kv={h_kv}, got {tuple(pages.shape)}")
    h_q, width = pages.shape
    g = h_q // h_kv
    if g > 31:
        raise ValueError(f"a group of G={g} query heads does not fit the 31 bits of heads")
    chosen = torch.zeros((h_kv, g, n_pages), dtype=torch.int32, device=pages.device)
    chosen.scatter_(2, pages.to(torch.int64).reshape(h_kv, g, width), 1)
    bits = (chosen << torch.arange(g, dtype=torch.int32, device=pages.device)[None, :, None]).sum(dim=1,
                                                                                                 dtype=torch.int32)
    w = min(n_pages, g * width)
    order = torch.sort((bits == 0).to(torch.int8), dim=1, stable=True).indices[:, :w]   # chosen pages first
    return order.to(torch.int32), (bits != 0).sum(dim=1), torch.gather(bits, 1, order)


def quest_step(q, k, v, *, page_size: int, token_budget: int, kmin=None, kmax=None, scale=None,
               num_splits=None, share_group: bool = True, check_inputs: bool = False):
    """Quest decode step: scores -> top ``token_budget // page_size`` pages per query head -> attention.

    Returns ``(out [H_q, D], lse [H_q], pages [H_q, B_pages])`` (pages best first). Pass cached ``kmin``/``kmax`` (from
    :func:`page_metadata` / :func:`update_page_metadata`, possibly with spare capacity) to skip the
    metadata pass. ``share_group`` reads each selected page once per GQA group (the union, with a bit
    per head); ``False`` gives every query head its own list (each head reads its pages). Nothing is
    read back from the GPU, so the step can be captured in a CUDA graph.
    """
    _check_keys(k, page_size)
    if not isinstance(token_budget, int) or isinstance(token_budget, bool) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
    n = k.shape[1]
    n_pages = -(-n // page_size)
    if kmin is None or kmax is None:
        kmin, kmax = page_metadata(k, page_size)
    # top pages in score order (attention does not need them ascending: one sort fewer per step)
    pages = topk_core(page_scores(q, kmin, kmax, n_pages), max(1, token_budget // page_size))
    if share_group and q.shape[0] > k.shape[0]:
        union, counts, heads = union_of_group(pages, k.shape[0], n_pages)
        out, lse = decode_attention_page_list(q, k, v, union, counts, page_size=page_size, heads=heads, scale=scale,
                                              num_splits=num_splits, check_inputs=check_inputs)
    else:
        out, lse = decode_attention_page_list(q, k, v, pages, page_size=page_size, scale=scale,
                                              num_splits=num_splits, check_inputs=check_inputs)
    return out, lse, pages


def method_pages(method, q, k):
    """``[H_q, B]`` pages a :class:`kvsparse.oracle.quest.Quest` configuration attends (its page count,
    dense fallback and last-page rule), chosen on the device. Twilight's Quest base uses it too."""
    import torch
    h_q, n = q.shape[0], k.shape[1]
    p = method.page_size
    n_pages = -(-n // p)
    if method.is_dense(n):
        return torch.arange(n_pages, device=q.device)[None, :].expand(h_q, n_pages).contiguous()
    kmin, kmax = page_metadata(k, p)
    scores = page_scores(q, kmin, kmax)
    if method.last_page == "always":
        top = select_pages(scores[:, : n_pages - 1], method.page_budget(n) - 1)
        last = torch.full((h_q, 1), n_pages - 1, device=q.device, dtype=top.dtype)
        return torch.cat([top, last], dim=1)
    return select_pages(scores, min(method.page_budget(n), n_pages))


@register_kernel("quest", "triton")
def quest(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract for the Quest oracle (``kvsparse.oracle.quest.Quest``): scores, top-k and
    attention run on the GPU. Returns ``(out [H_q, d], indices per query head)`` as NumPy."""
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    h_q, n = qt.shape[0], kt.shape[1]
    p = method.page_size
    pages = method_pages(method, qt, kt)
    if h_q > kt.shape[0]:
        union, counts, heads = union_of_group(pages, kt.shape[0], -(-n // p))
        out, _ = decode_attention_page_list(qt, kt, vt, union, counts, page_size=p, heads=heads, scale=scale)
    else:
        out, _ = decode_attention_page_list(qt, kt, vt, pages, page_size=p, scale=scale)
    pages = pages.cpu().numpy().astype(np.int64)
    tok = (pages[:, :, None] * p + np.arange(p)[None, None, :]).reshape(h_q, -1)
    return to_numpy(out), [np.sort(row[row < n]) for row in tok]
