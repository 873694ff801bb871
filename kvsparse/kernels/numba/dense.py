"""Dense decode attention kernel (Numba): every query head attends to all n tokens."""
from __future__ import annotations

import numpy as np

from ...registry import register_kernel
from .attention import check_float_arrays, dense_attention


@register_kernel("dense", "numba")
def dense(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract (see docs/kernels.md): returns ``(out [H_q, d], indices [H_q, n])``.

    ``method`` is the oracle's ``Dense()`` instance (no hyper-parameters); ``positions`` is ignored.
    """
    q, k, v = check_float_arrays(q, k, v)
    out, _ = dense_attention(q, k, v, scale=scale)
    return out, np.broadcast_to(np.arange(k.shape[1]), (q.shape[0], k.shape[1]))
