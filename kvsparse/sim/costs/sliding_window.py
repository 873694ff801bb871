"""Sliding window: the last ``window`` tokens (``window + 1`` when the current token is not counted).

Mirrors ``kvsparse/oracle/sliding_window.py``: the same rows for every head, read once per KV head
under KV sharing, page-rounded. The simulator's budget is ``window``.
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, range_rows


@cost_model("sliding_window", budget_param="window", defaults=dict(window=1024, recent_includes_current=True))
def cost(q: Query) -> list[Kernel]:
    span = q.budget + (0 if q.params.get("recent_includes_current", True) else 1)
    rows = range_rows(q.n - span, q.n, q.n, q.page_size)
    tokens = np.minimum(q.n, span)
    return [Kernel("window_attention", reads=kv_reads(q, q.readers * rows),
                   flops=attention_flops(q, q.h_q * tokens), writes=q.h_q * q.shape.d_v * 2)]
