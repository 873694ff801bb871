"""Deja Vu's head sparsity in Triton: only the kept query heads attend; a KV head none of whose query
heads is kept is never read.

The cache goes in as one list of 64-token pages per KV head with a bit per kept query head (the
split-K kernel's ``heads``), so a group reads its K/V once whichever of its heads are kept, and a
skipped head outputs 0 with ``lse = -inf`` (the oracle's convention). Without a ``head_mask`` the
oracle predictor runs in the kernel's precision: one dense pass, the top heads by the norm of their
output at the default scale ``1/sqrt(d)`` (a second pass when the step's scale differs), ties to the
lower head index; the skipped rows are then zeroed.

Layout: ``q [H_q, D]``, ``k, v [H_kv, N, D]``; pages ``[H_kv, ceil(N / 64)]``, heads ``[H_kv, ...]`` int32.
"""
from __future__ import annotations

import numpy as np

from ...oracle import core
from ...registry import register_kernel
from .attention import decode_attention_page_list, dense_decode, to_numpy, to_torch, topk_core

PAGE = 64


def head_masked_attention(q, k, v, keep, *, scale=None):
    """Attention of the heads with ``keep [H_q]`` (bool tensor) set; ``(out [H_q, D], lse [H_q])``."""
    import torch
    h_q = q.shape[0]
    h_kv, n = k.shape[0], k.shape[1]
    if keep.dtype != torch.bool or tuple(keep.shape) != (h_q,):
        raise ValueError(f"keep must be a bool tensor of shape ({h_q},), got {keep.dtype} {tuple(keep.shape)}")
    g = h_q // h_kv
    bits = (keep.to(torch.int32).reshape(h_kv, g) << torch.arange(g, dtype=torch.int32, device=keep.device)).sum(1)
    pages = -(-n // PAGE)
    entries = torch.arange(pages, dtype=torch.int32, device=q.device)[None, :].expand(h_kv, pages).contiguous()
    counts = torch.where(bits.to(q.device) != 0, pages, 0)
    heads = bits.to(device=q.device, dtype=torch.int32)[:, None].expand(h_kv, pages).contiguous()
    return decode_attention_page_list(q, k, v, entries, counts, page_size=PAGE, heads=heads, scale=scale)


@register_kernel("deja_vu", "triton")
def deja_vu(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out, indices)`` as NumPy; every token for a kept head, none otherwise."""
    import torch
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    h_q, n = qt.shape[0], kt.shape[1]
    if method.head_mask is not None:
        if len(method.head_mask) != h_q:
            raise ValueError(f"head_mask must have one entry per query head ({h_q}), got {len(method.head_mask)}")
        keep = torch.tensor(list(method.head_mask), dtype=torch.bool, device=qt.device)
        out, _ = head_masked_attention(qt, kt, vt, keep, scale=scale)
    else:
        out, _ = dense_decode(qt, kt, vt, scale=scale)
        default = scale is None or float(scale) == core.default_scale(qt.shape[1])
        ranked = out if default else dense_decode(qt, kt, vt)[0]
        top = topk_core(torch.linalg.vector_norm(ranked.float(), dim=-1)[None, :], method.heads_to_keep(h_q))[0]
        keep = torch.zeros(h_q, dtype=torch.bool, device=qt.device)
        keep[top] = True
        out = torch.where(keep[:, None], out, torch.zeros_like(out))
    keep = keep.cpu().numpy()
    return to_numpy(out), [np.arange(n) if kept else np.zeros(0, np.int64) for kept in keep]
