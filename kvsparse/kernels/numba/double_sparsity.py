"""Double Sparsity in Numba: label scores ``q[c] . k_j[c]`` on each head's offline channels (labels
optionally fake-quantized per token), top-k tokens (core tie rule), exact attention over them.

Every convention is the oracle's (``kvsparse.oracle.double_sparsity.DoubleSparsity``). Labels and
scores are computed in float64 (bit-identical quantization codes to the oracle's).
"""
from __future__ import annotations

import numba
import numpy as np

from ...registry import register_kernel
from ._select import attend_token_mask, full_indices, topk_mask
from .attention import FASTMATH, check_float_arrays, dense_attention


@numba.njit(cache=True)
def _fake_quantize_inplace(x, bits):
    """``fake_quantize_per_token`` of one float64 row, in place (same operations and order as the oracle)."""
    levels = 2 ** bits - 1
    lo = x[0]
    hi = x[0]
    for c in range(1, x.shape[0]):
        lo = min(lo, x[c])
        hi = max(hi, x[c])
    span = hi - lo
    scale = span / levels if span > 0 else 1.0
    for c in range(x.shape[0]):
        code = np.rint((x[c] - lo) / scale)
        x[c] = min(max(code, 0.0), levels) * scale + lo


@numba.njit(cache=True)
def _fake_quantize(x, bits):
    out = x.astype(np.float64)
    _fake_quantize_inplace(out, bits)
    return out


@numba.njit(cache=True, parallel=True)
def label_cache(k, channels, bits):
    """``[H_kv_or_Hq, n, r]`` float64 key labels: rows of ``channels [R, r]`` index KV heads ``R == H_kv``
    or query heads (``R == H_q``, head h on KV head h // G). ``bits <= 0``: exact labels."""
    rows, r = channels.shape
    h_kv, n, _ = k.shape
    g = max(1, rows // h_kv)
    out = np.empty((rows, n, r), np.float64)
    for job in numba.prange(rows):
        kvh = job // g
        for j in range(n):
            for c in range(r):
                out[job, j, c] = k[kvh, j, channels[job, c]]
            if bits > 0:
                _fake_quantize_inplace(out[job, j], bits)
    return out


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def label_scores(q_labels, labels):
    """``[H_q, n]``: ``q_labels [H_q, r]`` against ``labels [R, n, r]`` (R = H_q, or H_kv shared by groups)."""
    h_q, r = q_labels.shape
    rows, n, _ = labels.shape
    g = h_q // rows
    s = np.empty((h_q, n), np.float64)
    for h in numba.prange(h_q):
        row = h // g
        for j in range(n):
            acc = 0.0
            for c in range(r):
                acc += q_labels[h, c] * labels[row, j, c]
            s[h, j] = acc
    return s


def scores(method, q, k, labels=None):
    """The ``[H_q, n]`` label scores of one step (``labels`` may be a maintained ``label_cache``)."""
    h_q, d = q.shape
    h_kv = k.shape[0]
    ch = method.channels_per_query_head(h_q, h_kv, d)
    shared = method.shared_by_group(h_q, h_kv)
    rows = ch[:: h_q // h_kv] if shared else ch
    bits = method.label_bits or 0
    if labels is None:
        labels = label_cache(k, np.ascontiguousarray(rows), bits)
    q_lab = np.take_along_axis(q.astype(np.float64), ch, axis=1)
    if bits and method.quantize_query_label:
        q_lab = np.stack([_fake_quantize(row, bits) for row in q_lab])
    return label_scores(np.ascontiguousarray(q_lab), labels)


@register_kernel("double_sparsity", "numba")
def double_sparsity(method, q, k, v, *, positions=None, scale=None, labels=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)``; ``method`` is a ``DoubleSparsity``.

    ``labels`` (``label_cache(k, rows, bits)``, maintained by a decoder) may be passed.
    """
    q, k, v = check_float_arrays(q, k, v)
    h_q, n = q.shape[0], k.shape[1]
    if method.is_dense(n):
        return dense_attention(q, k, v, scale=scale)[0], full_indices(h_q, n)
    mask = topk_mask(scores(method, q, k, labels), method.token_budget)
    out, _, indices = attend_token_mask(q, k, v, mask, scale=scale)
    return out, indices
