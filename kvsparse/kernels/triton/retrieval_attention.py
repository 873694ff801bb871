"""RetrievalAttention (exact retrieval) in Triton: raw ``q . k`` over the cache (the search), each query
head's top-k among the candidates, then attention over the static set and the retrieved tokens.

Only exact retrieval (``recall = 1``) is implemented, as in the Numba kernel: the approximate preset's
misses are a seeded model of an index, not a computation. Conventions: the oracle's
(``kvsparse.oracle.retrieval_attention``: static set by cache index, MIPS on raw ``q . k``, ties to the
lower index). The oracle merges two disjoint partial attentions (GPU and CPU) by log-sum-exp; over
disjoint sets that is exactly softmax attention over their union, which is what runs here (one pass).

Layout: ``q [H_q, D]``, ``k, v [H_kv, N, D]``; scores ``[H_q, N] fp32`` from the reduced-channel
kernel with every channel (``reduced_scores``); the kept mask ``[H_q, N]``.
"""
from __future__ import annotations

import numpy as np

from ...oracle import core
from ...oracle.retrieval_attention import static_set
from ...registry import register_kernel
from .attention import attend_mask, to_numpy, to_torch, topk_core
from .reduced_scores import reduced_scores


@register_kernel("retrieval_attention", "triton")
def retrieval_attention(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)`` as NumPy."""
    import torch
    if core.exact_ratio(method.recall) != 1:
        raise ValueError(f"the Triton retrieval_attention kernel implements exact retrieval only (recall = 1), "
                         f"got recall={method.recall!r}")
    if positions is not None:
        raise NotImplementedError("the static set is by cache index: positions are not used")
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    h_q, d = qt.shape
    n = kt.shape[1]
    static = torch.from_numpy(static_set(n, method.sinks, method.window)).to(qt.device)
    keep = torch.zeros((h_q, n), dtype=torch.bool, device=qt.device)
    keep[:, static] = True
    k_eff = min(method.top_k, n - static.numel())
    if k_eff > 0:
        everything = torch.arange(d, dtype=torch.int32, device=qt.device)[None, :].expand(h_q, d)
        scores = reduced_scores(qt.float(), kt, everything)
        scores[:, static] = float("-inf")               # candidates only: [sinks, n - window)
        keep.scatter_(1, topk_core(scores, k_eff), True)
    out, _, rows = attend_mask(qt, kt, vt, keep, scale=scale)
    return to_numpy(out), [r.astype(np.int64) for r in rows]
