"""SparQ in Numba: top-r |q| channels, approximate logits over all keys on those channels, top-k
tokens (core tie rule), exact attention over them, ``alpha * y + (1 - alpha) * mean(V)``.

Every convention is the oracle's (``kvsparse.oracle.sparq.SparQ``; the kernel reads its fields).
Channels, tau and alpha are computed in float64; the approximate logits (``_select.channel_logits``: r channels
per query head, each K row read once per group) accumulate in float64 from the input dtype (the
suite's band rule bounds any rounding at the top-k cut-off).
"""
from __future__ import annotations

import numpy as np

from ...oracle import core
from ...registry import register_kernel
from ._select import attend_token_mask, channel_logits, full_indices, topk_mask
from .attention import check_float_arrays, dense_attention


def approximate(method, q, k, v=None):
    """``(logits [H_q, n], ranking scores [H_q, n], selected mask or None if dense, mean_v)`` for one step;
    ``mean_v`` [H_kv, d] (float64) is the mean of ``v`` over the tokens, computed in the logits' pass, or
    None without ``v``."""
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    g = h_q // h_kv
    r, k_sel = method.rank(d), method.tokens(n)
    q64 = q.astype(np.float64)
    magnitude = np.abs(q64)
    if method.gqa == "group":
        magnitude = np.repeat(magnitude.reshape(h_kv, g, d).sum(axis=1), g, axis=0)
    channels = np.sort(core.topk_indices(magnitude, r), axis=1)     # O(H d log d): not per token
    chosen = np.zeros((h_q, d), bool)
    np.put_along_axis(chosen, channels, True, axis=1)
    l1_all = np.abs(q64).sum(axis=1)
    l1_chosen = np.where(chosen, np.abs(q64), 0.0).sum(axis=1)
    ratio = np.divide(l1_chosen, l1_all, out=np.ones(h_q), where=l1_all > 0)
    inv_tau = 1.0 / np.sqrt(d * ratio)
    s, mean_v = channel_logits(q, k, np.ascontiguousarray(channels), inv_tau, v)
    if k_sel >= n:
        return s, s, None, mean_v
    rank_by = s
    if method.gqa == "group":
        rank_by = np.repeat(s.reshape(h_kv, g, n).sum(axis=1), g, axis=0)
    if method.forced_recent:
        rank_by = rank_by.copy()
        rank_by[:, n - min(n, method.forced_recent):] = np.inf
    return s, rank_by, topk_mask(rank_by, k_sel), mean_v


@register_kernel("sparq", "numba")
def sparq(method, q, k, v, *, positions=None, scale=None, mean_v=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)``; ``method`` is a ``SparQ``.

    ``mean_v [H_kv, d]`` (the running mean of the values, which a decoder maintains) may be passed;
    otherwise it is computed here, in float64, inside the approximate pass over the tokens (which
    then reads every value row next to its key row: no separate pass over V).
    """
    q, k, v = check_float_arrays(q, k, v)
    h_q, n = q.shape[0], k.shape[1]
    if method.tokens(n) >= n:
        return dense_attention(q, k, v, scale=scale)[0], full_indices(h_q, n)
    fold_mean = method.reallocate and mean_v is None
    s, _, mask, mv = approximate(method, q, k, v if fold_mean else None)
    y, _, indices = attend_token_mask(q, k, v, mask, scale=scale)
    if not method.reallocate:
        return y, indices
    # alpha = softmax(s) mass of the selection, in float64
    e = np.exp(s - s.max(axis=1, keepdims=True))
    alpha = (np.where(mask, e, 0.0).sum(axis=1) / e.sum(axis=1))[:, None]
    mv = np.repeat(mv if mean_v is None else np.asarray(mean_v, np.float64), h_q // k.shape[0], axis=0)
    return (alpha * y + (1.0 - alpha) * mv).astype(q.dtype), indices
