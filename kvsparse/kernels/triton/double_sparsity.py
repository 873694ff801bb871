"""Double Sparsity in Triton: label scores ``q[c] . k_j[c]`` from the label cache (``reduced_scores``
over ``[R, n, r]`` contiguous labels), top-k tokens (core tie rule), split-K attention over them.

Every convention is the oracle's (``kvsparse.oracle.double_sparsity.DoubleSparsity``): channel
rankings with 1, H_kv or H_q rows (a label cache per KV head when shared by the group, per query head
otherwise), ``label_bits`` fake quantization of the key labels (and of the query label when
``quantize_query_label``), dense layers and ``token_budget >= n``. The label cache is built here by a
torch gather (a decoder maintains it: one label per appended token); quantization runs in float64 with
the oracle's operation order, so codes are bit-identical; the label dot product is fp32.
"""
from __future__ import annotations

import numpy as np

from ...registry import register_kernel
from .attention import attend_mask, dense_decode, indices_to_mask, to_numpy, to_torch, topk_core
from .reduced_scores import reduced_scores


def fake_quantize(x, bits: int):
    """Per-token asymmetric min-max fake quantization over the last axis, float64 (oracle's order)."""
    import torch
    x = x.to(torch.float64)
    levels = 2 ** bits - 1
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    scale = torch.where(span > 0, span / levels, torch.ones_like(span))
    return torch.round((x - lo) / scale) * scale + lo      # torch.round: half to even, like np.rint


def label_cache(method, k, h_q: int):
    """``(labels [R, n, r], channels [H_q, r] sorted)``: R = H_kv when the ranking is shared by the group."""
    import torch
    h_kv, n, d = k.shape
    ch = np.sort(method.channels_per_query_head(h_q, h_kv, d), axis=1)
    shared = method.shared_by_group(h_q, h_kv)
    g = h_q // h_kv
    rows = ch[::g] if shared else ch
    kv_of_row = np.arange(rows.shape[0]) if shared else np.arange(h_q) // g
    idx = torch.as_tensor(rows, device=k.device)
    labels = torch.gather(k[torch.as_tensor(kv_of_row, device=k.device)], 2,
                          idx[:, None, :].expand(-1, n, -1))
    if method.label_bits is not None:
        labels = fake_quantize(labels, method.label_bits)
    return labels.contiguous(), torch.as_tensor(ch, device=k.device)


def scores(method, q, k, labels=None):
    """``[H_q, n]`` fp32 label scores of one step (``labels`` from ``label_cache`` may be passed)."""
    import torch
    h_q = q.shape[0]
    if labels is None:
        labels, ch = label_cache(method, k, h_q)
    else:
        ch = torch.as_tensor(np.sort(method.channels_per_query_head(h_q, k.shape[0], q.shape[1]), axis=1),
                             device=q.device)
    q_lab = torch.gather(q.to(torch.float64), 1, ch)
    if method.label_bits is not None and method.quantize_query_label:
        q_lab = fake_quantize(q_lab, method.label_bits)
    r = ch.shape[1]
    kch = torch.arange(r, device=q.device)[None, :].expand(h_q, r)
    return reduced_scores(q_lab, labels, kch)


@register_kernel("double_sparsity", "triton")
def double_sparsity(method, q, k, v, *, positions=None, scale=None, labels=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)`` as NumPy."""
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    h_q, n = qt.shape[0], kt.shape[1]
    if method.is_dense(n):
        out, _ = dense_decode(qt, kt, vt, scale=scale)
        return to_numpy(out), [np.arange(n) for _ in range(h_q)]
    mask = indices_to_mask(topk_core(scores(method, qt, kt, labels), method.token_budget), n)
    out, _, idx = attend_mask(qt, kt, vt, mask, scale=scale)
    return to_numpy(out), idx
