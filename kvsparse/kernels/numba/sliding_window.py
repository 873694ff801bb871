"""Sliding window in Numba: each head attends to the tokens within ``window`` of the current
(largest) position, one shared index list per KV head. Conventions: the oracle's
(``kvsparse.oracle.sliding_window.SlidingWindow``: ``recent_includes_current``, explicit positions)."""
from __future__ import annotations

import numpy as np

from ...oracle.method import check_positions
from ...registry import register_kernel
from .attention import check_float_arrays, sparse_attention


@register_kernel("sliding_window", "numba")
def sliding_window(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out [H_q, d], indices [H_q, B])``; ``method`` is a ``SlidingWindow``.

    ``positions [n]`` (default ``arange(n)``): cache slots may hold tokens in any order."""
    q, k, v = check_float_arrays(q, k, v)
    h_q, n = q.shape[0], k.shape[1]
    pos = np.arange(n) if positions is None else check_positions(positions, n)
    span = method.window if method.recent_includes_current else method.window + 1
    keep = np.flatnonzero(pos > pos.max() - span) if n else np.zeros(0, np.int64)
    lists = np.broadcast_to(keep, (k.shape[0], keep.size))
    out, _ = sparse_attention(q, k, v, lists, scale=scale, check=False)
    return out, np.broadcast_to(keep, (h_q, keep.size))
