"""vAttention on the GPU: the Horvitz-Thompson estimator as weighted sparse decode attention.

The plan (sinks, local window, top-k, the residual statistics that fix each head's sample size) and
the draws are the Numba kernel's ``select`` on the host, in float64 from the inputs: the sample size is
an integer and every draw after it depends on it, so the plan is never computed in a low precision,
and the same generator gives the oracle's indices. The estimator then runs in Triton:
``decode_attention_indices`` with one list per query head (the heads' samples differ) and the HT
weights multiplying each ``exp(logit)``.

Layout: ``q [H_q, D]``, ``k, v [H_kv, N, D]``; lists ``[H_q, B] int32`` padded past ``lengths``,
weights ``[H_q, B] fp32``.
"""
from __future__ import annotations

import numpy as np

from ...registry import register_kernel
from ..numba.vattention import select
from .attention import decode_attention_indices, to_numpy, to_torch


def _as_plan_input(x) -> np.ndarray:
    """fp16/bf16 values widened to float32 (exact), so the plan sees the values the GPU sees."""
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


@register_kernel("vattention", "triton")
def vattention(method, q, k, v, *, positions=None, scale=None, rng=None, samples=None, base_samples=None):
    """Kernel-step contract for an estimator: ``(out [H_q, d], indices per query head, HT weights)``."""
    import torch
    indices, weights = select(method, _as_plan_input(q), _as_plan_input(k), _as_plan_input(v), scale=scale,
                              rng=rng, samples=samples, base_samples=base_samples)
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    width = max(1, max(len(ix) for ix in indices))
    lists = np.zeros((len(indices), width), np.int32)
    wts = np.zeros((len(indices), width), np.float32)
    for h, (ix, w) in enumerate(zip(indices, weights)):
        lists[h, : len(ix)] = ix
        wts[h, : len(ix)] = w
    lengths = torch.tensor([len(ix) for ix in indices], dtype=torch.int32)
    out, _ = decode_attention_indices(qt, kt, vt, torch.from_numpy(lists), lengths, torch.from_numpy(wts),
                                      scale=scale)
    return to_numpy(out), indices, weights
