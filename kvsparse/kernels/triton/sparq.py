"""SparQ in Triton: top-r |q| channels (host-sized, O(H d)), reduced-channel scores of every key on
the device (``reduced_scores``: r strided channels of each key row), top-k tokens (core tie rule),
split-K attention over them, and ``alpha * y + (1 - alpha) * mean(V)``.

Every convention is the oracle's (``kvsparse.oracle.sparq.SparQ``; the kernel reads its fields):
``gqa`` (per head, or group-summed |q| and scores with one index list per KV head), ``forced_recent``,
``extra_token``, the budget rounding and ``allocated_len`` (through ``method.rank``/``method.tokens``),
``reallocate``. Approximate logits are fp32 (the suite's band bounds their rounding); channels, tau
and alpha are float64. ``mean_v [H_kv, d]`` (the running mean a decoder keeps) may be passed.
"""
from __future__ import annotations

import numpy as np

from ...registry import register_kernel
from .attention import (dense_decode, indices_to_mask, attend_mask, rows_per_query_head, to_numpy, to_torch,
                        topk_core)
from .reduced_scores import reduced_scores


def approximate(method, q, k):
    """``(logits [H_q, n] fp32, rank_by [H_q, n], selected [H_q, n] bool)`` on torch tensors."""
    import torch
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    g = h_q // h_kv
    r, k_sel = method.rank(d), method.tokens(n)
    q64 = q.to(torch.float64)
    magnitude = q64.abs()
    if method.gqa == "group":
        magnitude = magnitude.reshape(h_kv, g, d).sum(dim=1).repeat_interleave(g, dim=0)
    channels = topk_core(magnitude, r).sort(dim=1).values
    l1_all = q64.abs().sum(dim=1)
    l1_chosen = torch.gather(q64.abs(), 1, channels).sum(dim=1)
    ratio = torch.where(l1_all > 0, l1_chosen / torch.where(l1_all > 0, l1_all, 1.0), 1.0)
    inv_tau = 1.0 / torch.sqrt(d * ratio)
    q_sel = torch.gather(q.to(torch.float32), 1, channels)
    s = reduced_scores(q_sel, k, channels) * inv_tau.to(torch.float32)[:, None]
    rank_by = s
    if method.gqa == "group":
        rank_by = s.reshape(h_kv, g, n).sum(dim=1).repeat_interleave(g, dim=0)
    if method.forced_recent:
        rank_by = rank_by.clone()
        rank_by[:, n - min(n, method.forced_recent):] = float("inf")
    return s, rank_by, indices_to_mask(topk_core(rank_by, k_sel), n)


@register_kernel("sparq", "triton")
def sparq(method, q, k, v, *, positions=None, scale=None, mean_v=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)`` as NumPy; ``method`` is a ``SparQ``."""
    import torch
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    h_q, n = qt.shape[0], kt.shape[1]
    h_kv = kt.shape[0]
    if method.tokens(n) >= n:
        out, _ = dense_decode(qt, kt, vt, scale=scale)
        return to_numpy(out), [np.arange(n) for _ in range(h_q)]
    s, _, selected = approximate(method, qt, kt)
    # group mode: one list per KV head, each selected row loaded once for the group
    rows = selected[:: h_q // h_kv] if method.gqa == "group" else selected
    y, _, idx = attend_mask(qt, kt, vt, rows, scale=scale)
    idx = rows_per_query_head(idx, h_q)
    if not method.reallocate:
        return to_numpy(y), idx
    p = torch.softmax(s.to(torch.float64), dim=1)
    alpha = (p * selected).sum(dim=1, keepdim=True)
    mv = vt.to(torch.float32).mean(dim=1) if mean_v is None else to_torch(mean_v, "mean_v").to(torch.float32)
    mv = mv.to(torch.float64).repeat_interleave(h_q // h_kv, dim=0)
    out = alpha * y.to(torch.float64) + (1.0 - alpha) * mv
    return to_numpy(out.to(qt.dtype if qt.dtype != torch.bfloat16 else torch.float32)), idx
