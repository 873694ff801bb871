"""Longformer in Numba: the causal (dilated) window of the current position plus the global tokens,
one shared index list for all heads. Conventions: the oracle's (``kvsparse.oracle.longformer``:
one-sided ``window``, ``dilation``, a global current token attends to everything, explicit positions)."""
from __future__ import annotations

import numba
import numpy as np

from ...oracle.method import check_positions
from ...registry import register_kernel
from .attention import check_float_arrays, sparse_attention


@numba.njit(cache=True)
def longformer_keep(pos, window, dilation, global_tokens):
    """Sorted cache slots the current (largest) position attends to."""
    n = pos.shape[0]
    keep = np.empty(n, np.int64)
    if n == 0:
        return keep[:0]
    cur = pos.max()
    is_global = np.zeros(n, np.bool_)
    current_global = False
    for g in global_tokens:
        if g == cur:
            current_global = True
        for i in range(n):
            if pos[i] == g:
                is_global[i] = True
    m = 0
    for i in range(n):
        dist = cur - pos[i]
        if current_global or is_global[i] or (dist % dilation == 0 and dist <= window * dilation):
            keep[m] = i
            m += 1
    return keep[:m]


@register_kernel("longformer", "numba")
def longformer(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out [H_q, d], indices [H_q, B])``; ``method`` is a ``Longformer``."""
    q, k, v = check_float_arrays(q, k, v)
    n = k.shape[1]
    pos = np.arange(n, dtype=np.int64) if positions is None else np.asarray(check_positions(positions, n), np.int64)
    keep = longformer_keep(pos, method.window, method.dilation, np.asarray(method.global_tokens, np.int64).reshape(-1))
    out, _ = sparse_attention(q, k, v, np.broadcast_to(keep, (k.shape[0], keep.size)), scale=scale, check=False)
    return out, np.broadcast_to(keep, (q.shape[0], keep.size))
