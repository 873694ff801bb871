"""Head-masked decode attention (Deja Vu) on the CPU in Numba: only kept query heads are computed.

``q [H_q, d]``, ``k``/``v`` ``[H_kv, n, d]`` (float32 or float64), ``keep [H_q]`` bool. One ``prange``
task per KV head; a KV head none of whose query heads is kept is never read. Skipped heads output 0
and ``lse = -inf`` (the oracle's convention). Float64 accumulation.

The registered kernel with the oracle predictor (no ``head_mask``) is one dense pass: the predictor
ranks heads by their true output norm, so the kept heads' outputs are already computed.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ...oracle import core
from ...registry import register_kernel
from .attention import FASTMATH, _dot, _scale, _write_group, check_float_arrays, dense_attention


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _masked_kernel(q, k, v, keep, scale, out, lse):
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    g = h_q // h_kv
    for kvh in numba.prange(h_kv):
        for gi in range(g):
            for c in range(d):
                out[kvh * g + gi, c] = 0.0
            lse[kvh * g + gi] = -np.inf
        any_kept = False
        for gi in range(g):
            any_kept = any_kept or keep[kvh * g + gi]
        if not any_kept or n == 0:
            continue
        s = np.full((g, n), -np.inf, np.float64)
        mx = np.full(g, -np.inf, np.float64)
        for i in range(n):
            for gi in range(g):
                if keep[kvh * g + gi]:
                    x = _dot(q[kvh * g + gi], k[kvh, i]) * scale
                    s[gi, i] = x
                    if x > mx[gi]:
                        mx[gi] = x
        acc = np.zeros((g, d), np.float64)
        tot = np.zeros(g, np.float64)
        for i in range(n):
            for gi in range(g):
                if keep[kvh * g + gi]:
                    p = math.exp(s[gi, i] - mx[gi])
                    tot[gi] += p
                    for c in range(d):
                        acc[gi, c] += p * np.float64(v[kvh, i, c])
        _write_group(acc, tot, mx, kvh, out, lse)     # skipped heads have tot = 0: out 0, lse -inf


def head_masked_attention(q, k, v, keep, *, scale=None):
    """Attention of the kept heads only; returns ``(out [H_q, d], lse [H_q])`` in q's dtype."""
    q, k, v = check_float_arrays(q, k, v)
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.shape != (q.shape[0],):
        raise ValueError(f"keep must be a bool array of shape ({q.shape[0]},), got {keep.dtype} {keep.shape}")
    out = np.empty_like(q)
    lse = np.empty(q.shape[0], q.dtype)
    _masked_kernel(q, k, v, np.ascontiguousarray(keep), _scale(scale, q.shape[1]), out, lse)
    return out, lse


@register_kernel("deja_vu", "numba")
def deja_vu(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: the predictor's mask (``method.head_mask``) or the oracle predictor
    computed in the kernel's precision (dense pass, top heads by the norm of their output at the
    default scale ``1/sqrt(d)``, lower index wins ties).
    Returns ``(out, indices)``: every token for a kept head, none for a skipped one."""
    q, k, v = check_float_arrays(q, k, v)
    h_q, n = q.shape[0], k.shape[1]
    if method.head_mask is not None:
        if len(method.head_mask) != h_q:
            raise ValueError(f"head_mask must have one entry per query head ({h_q}), got {len(method.head_mask)}")
        keep = np.array(method.head_mask, dtype=bool)
        out, _ = head_masked_attention(q, k, v, keep, scale=scale)
    else:
        # the predictor needs every head's true output, and a kept head's output IS that row of the
        # dense pass (the same float64 arithmetic over all n tokens as _masked_kernel), so the step
        # reads K/V once: zero the skipped rows rather than attend the kept heads a second time.
        # The oracle predictor ranks outputs at the default scale 1/sqrt(d) (oracle/deja_vu.py) whatever
        # the step's scale: another scale needs a second dense pass for the ranking (found by the suite,
        # property_tests/suites_structural.py: ranking at the step's scale kept other heads)
        out, _ = dense_attention(q, k, v, scale=scale)
        default = scale is None or float(scale) == core.default_scale(q.shape[1])
        ranked = out if default else dense_attention(q, k, v)[0]
        keep = core.topk_mask(np.linalg.norm(ranked.astype(np.float64), axis=-1), method.heads_to_keep(h_q))
        out[~keep] = 0
    return out, [np.arange(n) if kept else np.zeros(0, np.int64) for kept in keep]
