"""PyramidKV: SnapKV with a per-layer prompt budget falling linearly with depth (layer-dependent).

Mirrors ``kvsparse/oracle/pyramidkv.py``: ``pyramid_budget`` below re-derives the integer
(KVCache-Factory) and float (kvpress) arithmetic, vectorized over prompt lengths and layers; the number
of layers is the model's (``Query.n_layers``) unless ``num_layers`` is given. Kept per unit: that
budget (T when uncompressed) + ``n - T``. The simulator's budget is the mean ``capacity``.
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, cost_model, observed_or
from .snapkv import check_capacity, eviction_kernels, observe as snapkv_observe, prompt_len


def pyramid_budget(t, *, capacity, window: int, beta: int, layer, num_layers: int, arithmetic: str,
                   compression_ratio=None) -> np.ndarray:
    """Prompt tokens kept per layer (window included); ``t`` where nothing is compressed."""
    t = np.asarray(t, dtype=np.int64)
    layer = np.asarray(layer, dtype=np.int64)
    if arithmetic == "float":
        keep = t * (1 - float(compression_ratio))
        cap = window + keep
        lo = (cap - window) / beta
        hi = (cap - window) * 2 - lo
        clamp = hi >= t - window
        hi, lo = np.where(clamp, t - window, hi), np.where(clamp, (cap - window) * 2 - (t - window), lo)
        valid = (t >= hi) & (hi >= lo) & (lo >= window)
        steps = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return np.where(valid, np.round(hi - layer * steps), np.maximum(1, np.round(keep))).astype(np.int64)
    capacity = np.asarray(capacity, dtype=np.int64)
    b = capacity - window
    lo = b // beta
    hi = 2 * b - lo
    clamp = hi >= t - window
    hi, lo = np.where(clamp, t - window, hi), np.where(clamp, 2 * b - (t - window), lo)
    steps = (hi - lo) // (num_layers - 1) if num_layers > 1 else 0
    return np.where(t < capacity, t, np.where(t < 2 * b, capacity, hi - layer * steps + window))


@cost_model("pyramidkv", budget_param="capacity", layer_dependent=True,
            defaults=dict(window=8, beta=20, capacity=2048, compression_ratio=None, ratio_rounding="exact",
                          arithmetic="integer", gqa="per_query_head", generated=1))
def cost(q: Query) -> list[Kernel]:
    t = prompt_len(q)
    window = int(q.param("window"))
    check_capacity(q)
    if q.params.get("compression_ratio") is not None and np.any(t <= window):
        raise ValueError(f"kvpress needs more prompt tokens than window={window}")
    kept = pyramid_budget(t, capacity=q.budget, window=window, beta=int(q.param("beta")), layer=q.layer,
                          num_layers=int(q.params.get("num_layers") or q.n_layers),
                          arithmetic=q.params.get("arithmetic", "integer"),
                          compression_ratio=q.params.get("compression_ratio"))
    per_unit = np.minimum(q.n, kept + (q.n - t))
    return eviction_kernels(q, per_unit, per_kv_head=q.params.get("gqa", "per_query_head") != "per_query_head")


cost.observe = snapkv_observe
cost.min_n = 2
