"""Cross-layer attention (CLA) decode on the CPU in Numba (see ``oracle/cla.py``).

Layer ``l`` attends densely over the cache of its producer layer ``(l // f) * f``; consumer layers store
no K/V. The attention itself is the shared dense kernel (``kernels/numba/attention.py``: one task per
KV head, each row loaded once for its G query heads, float64 accumulation). Queries of the layers of one
group cannot be batched into one pass over the shared cache: a consumer layer's query depends on the
producer layer's output, so ``cla_decode_layers`` runs the layers one after another, as a decoder does.
"""
from __future__ import annotations

import numpy as np

from ...oracle.cla import CLA
from ...registry import register_kernel
from .attention import FLOAT_DTYPES, dense_attention


def cla_decode_layers(method: CLA, q_layers, k_layers, v_layers, *, scale=None):
    """One decode step through ``L`` layers: ``q_layers [L, H_q, d]``; ``k_layers``/``v_layers``
    ``[L, H_kv, n, d]`` of which only producer layers' entries are read (a consumer's may hold
    anything). One dtype (float32 or float64). Returns ``(out [L, H_q, d], lse [L, H_q])``."""
    if not isinstance(method, CLA):
        raise TypeError(f"method must be a CLA instance, got {type(method).__name__}")
    for name, x, ndim in (("q_layers", q_layers, 3), ("k_layers", k_layers, 4), ("v_layers", v_layers, 4)):
        if not isinstance(x, np.ndarray) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32/float64 NumPy array, got {getattr(x, 'dtype', type(x))}")
        if x.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if not (q_layers.shape[0] == k_layers.shape[0] == v_layers.shape[0]):
        raise ValueError(f"q_layers, k_layers, v_layers must have the same number of layers, got "
                         f"{q_layers.shape[0]}, {k_layers.shape[0]}, {v_layers.shape[0]}")
    outs, lses = [], []
    for layer in range(q_layers.shape[0]):
        p = method.producer(layer)
        out, lse = dense_attention(q_layers[layer], k_layers[p], v_layers[p], scale=scale)
        outs.append(out)
        lses.append(lse)
    return np.stack(outs), np.stack(lses)


@register_kernel("cla", "numba")
def cla(method: CLA, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract of one layer: ``k``/``v`` are the shared cache of its producer layer (as
    ``CLA.step`` takes them); dense attention over it. Returns ``(out, indices)`` (every token)."""
    if not isinstance(method, CLA):
        raise TypeError(f"method must be a CLA instance, got {type(method).__name__}")
    out, _ = dense_attention(q, k, v, scale=scale)
    return out, np.broadcast_to(np.arange(k.shape[1]), (q.shape[0], k.shape[1]))


# the multi-layer contract the CLA suite checks beside the step (property_tests/suites_structural.py):
# decode_layers(method, q_layers, k_layers, v_layers, *, scale=None) -> out [L, H_q, d] (or a tuple led by it)
cla.decode_layers = cla_decode_layers
