"""CORM (our definition, see the oracle): evict a key once the last ``window`` queries all found it
unimportant; one ``stamp_bits`` "last important" entry per (unit, attended token) is read each step.

Mirrors ``kvsparse/oracle/corm.py``: the attended K/V rows plus the stamps as tensor "auxiliary".
Units: KV heads (``gqa="union"``, canonical) or query heads. The kept set is input-dependent:
``observed["rows"]`` and ``observed["kept_entries"]`` when measured; otherwise the simulator's budget is
the expected kept tokens per unit (at least the protected recent span), and without a budget nothing
is evicted (the upper bound).
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, cost_model, observed_or, selection_rows
from .snapkv import eviction_kernels


@cost_model("corm", defaults=dict(window=32, recent=None, threshold=1.0, gqa="union", stamp_bits=32))
def cost(q: Query) -> list[Kernel]:
    span = max(1, int(q.params.get("recent") if q.params.get("recent") is not None else q.param("window")))
    per_unit = np.where(q.budget > 0, np.minimum(q.n, np.maximum(span, q.budget)), q.n)
    per_kv = q.params.get("gqa", "union") == "union"
    units = q.h_kv if per_kv else q.h_q
    entries = observed_or(q, "kept_entries", units * per_unit)
    stamps = entries * int(q.params.get("stamp_bits", 32)) // 8
    kernels = eviction_kernels(q, per_unit, per_kv_head=per_kv, name="attention_with_probs",
                               extra={("hbm", "auxiliary"): stamps})
    kernels[0].writes = kernels[0].writes + q.h_q * per_unit * 4
    kernels.append(Kernel("corm_evict", staged=q.h_q * per_unit * 4, writes=units * per_unit * 4,
                          compute="vector", flops=q.h_q * per_unit))
    return kernels


def observe(method, result, inp, *, h_kv, layout):
    sel = result.selection
    per_kv = method.gqa == "union"
    return {"rows": selection_rows(sel, h_kv, layout.page_size, layout.share_kv_heads),
            "kept_entries": int(sel.sizes.sum()) // (sel.h_q // h_kv if per_kv else 1)}


cost.observe = observe
