"""Cross-layer attention (CLA) in Triton: layer ``l`` attends densely over the cache of its producer
layer ``(l // f) * f`` (``oracle/cla.py``); consumer layers store no K/V.

The attention is the split-K kernel over the whole shared cache. ``decode_layers`` runs the layers one
after another, as a decoder must: a consumer layer's query depends on the producer layer's output.
Layout: ``q_layers [L, H_q, D]``, ``k_layers, v_layers [L, H_kv, N, D]`` (a consumer's entries are
never read).
"""
from __future__ import annotations

import numpy as np

from ...oracle.cla import CLA
from ...registry import register_kernel
from .attention import dense_decode, to_numpy, to_torch


def _check_method(method):
    if not isinstance(method, CLA):
        raise TypeError(f"method must be a CLA instance, got {type(method).__name__}")


@register_kernel("cla", "triton")
def cla(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract of one layer (``k``/``v``: its producer's shared cache): ``(out, indices)``."""
    _check_method(method)
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    out, _ = dense_decode(qt, kt, vt, scale=scale)
    return to_numpy(out), [np.arange(kt.shape[1]) for _ in range(qt.shape[0])]


def decode_layers(method, q_layers, k_layers, v_layers, *, scale=None):
    """One decode step through ``L`` layers: ``out [L, H_q, d]`` as NumPy (each layer over its producer's cache)."""
    _check_method(method)
    for name, x, ndim in (("q_layers", q_layers, 3), ("k_layers", k_layers, 4), ("v_layers", v_layers, 4)):
        if np.ndim(x) != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {np.shape(x)}")
    if not (len(q_layers) == len(k_layers) == len(v_layers)):
        raise ValueError(f"q_layers, k_layers, v_layers must have the same number of layers, got "
                         f"{len(q_layers)}, {len(k_layers)}, {len(v_layers)}")
    outs = []
    for layer in range(len(q_layers)):
        p = method.producer(layer)
        out, _ = dense_decode(to_torch(q_layers[layer], "q_layers"), to_torch(k_layers[p], "k_layers"),
                              to_torch(v_layers[p], "v_layers"), scale=scale)
        outs.append(to_numpy(out))
    return np.stack(outs)


cla.decode_layers = decode_layers
