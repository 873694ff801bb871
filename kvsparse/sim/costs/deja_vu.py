"""Deja Vu (attention heads): only the heads a predictor keeps are computed, over all n tokens.

Mirrors ``kvsparse/oracle/deja_vu.py``: the kept query heads' K/V rows; under KV sharing a KV head is
read once if any query head of its group is kept (which ones is data-dependent: ``observed["rows"]``,
else the upper bound ``min(H_kv, kept)`` KV heads). Kept heads: ``head_mask`` when given, else
``head_budget`` (the simulator's budget, in heads) or ``floor(head_ratio * H_q)``, at least 1. The
predictor (a small MLP on the hidden state) is weights, not KV, and is not priced.
"""
from __future__ import annotations

import numpy as np

from ...oracle import core
from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or


@cost_model("deja_vu", budget_param="head_budget", defaults=dict(head_ratio=0.5, head_budget=None, head_mask=None))
def cost(q: Query) -> list[Kernel]:
    mask = q.params.get("head_mask")
    if mask is not None:
        kept = np.int64(sum(bool(m) for m in mask))
    elif q.params.get("head_budget") is not None:
        kept = np.minimum(q.budget, q.h_q)
    else:
        kept = np.int64(core.budget_from_ratio(q.h_q, q.param("head_ratio"), minimum=1))
    heads_read = np.minimum(q.h_kv, kept) if q.share_kv_heads else kept
    rows = observed_or(q, "rows", heads_read * q.n)
    return [Kernel("kept_heads_attention", reads=kv_reads(q, rows), flops=attention_flops(q, kept * q.n),
                   writes=q.h_q * q.shape.d_v * 2)]
