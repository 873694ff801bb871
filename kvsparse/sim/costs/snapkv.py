"""SnapKV: once, at prefill, the last ``window`` prompt queries choose the kept prefix; afterwards every
step attends the kept prompt tokens plus every generated token (one attention kernel, no scores).

Mirrors ``kvsparse/oracle/snapkv.py`` (its Traffic is the kept K/V rows): kept per unit =
``budget_total(T)`` (``capacity`` once ``T >= capacity``, or ``max(1, T (1 - ratio))`` with a
compression ratio; T when uncompressed) + ``n - T``; units are query heads (``gqa="per_query_head"``,
count with ``share_kv_heads=False`` for the repo's G-times cache) or KV heads. T =
``observed["prompt_len"]`` or ``n - generated`` (default 1). Prefill scoring is not priced (decode only).
The simulator's budget is ``capacity``.
"""
from __future__ import annotations

import numpy as np

from ...oracle.sliding_window import kept_after_compression
from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, selection_rows, union_rows


def prompt_len(q: Query) -> np.ndarray:
    return observed_or(q, "prompt_len", np.maximum(q.n - int(q.params.get("generated", 1)), 1))


def snapkv_kept(q: Query, t) -> np.ndarray:
    """Prompt tokens kept per unit (window included)."""
    ratio = q.params.get("compression_ratio")
    if ratio is not None:
        rounding = q.params.get("ratio_rounding", "exact")
        return np.vectorize(lambda x: kept_after_compression(int(x), ratio, rounding), otypes=[np.int64])(t)
    return np.where(t < q.budget, t, q.budget)


def check_capacity(q: Query) -> None:
    if q.params.get("compression_ratio") is None and np.any(q.budget <= int(q.param("window"))):
        raise ValueError(f"capacity must exceed window={q.param('window')} (the repo asserts it), "
                         f"got min {int(np.min(q.budget))}")


def eviction_kernels(q: Query, per_unit, *, per_kv_head: bool, name: str = "kept_attention", extra=None):
    rows = observed_or(q, "rows", union_rows(q, per_unit, per_kv_head=per_kv_head))
    reads = kv_reads(q, rows)
    for key, b in (extra or {}).items():
        reads[key] = reads.get(key, 0) + b
    return [Kernel(name, reads=reads, flops=attention_flops(q, q.h_q * per_unit), writes=q.h_q * q.shape.d_v * 2)]


@cost_model("snapkv", budget_param="capacity",
            defaults=dict(window=32, capacity=2048, compression_ratio=None, ratio_rounding="exact",
                          gqa="per_query_head", generated=1))
def cost(q: Query) -> list[Kernel]:
    t = prompt_len(q)
    check_capacity(q)
    if q.params.get("compression_ratio") is not None and np.any(t <= int(q.param("window"))):
        raise ValueError(f"kvpress needs more prompt tokens than window={q.param('window')}")
    per_unit = np.minimum(q.n, snapkv_kept(q, t) + (q.n - t))
    return eviction_kernels(q, per_unit, per_kv_head=q.params.get("gqa", "per_query_head") != "per_query_head")


def observe(method, result, inp, *, h_kv, layout):
    sel = result.selection
    return {"rows": selection_rows(sel, h_kv, layout.page_size, layout.share_kv_heads), "prompt_len": sel.n - 1}


cost.observe = observe
cost.min_n = 2
