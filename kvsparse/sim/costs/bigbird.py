"""BigBird (causal decode): global + window + seeded random blocks of ``block_size`` tokens, per head.

Mirrors ``kvsparse/oracle/bigbird.py`` (Traffic: the selected K/V rows; the plan is computed, not read).
Which random blocks each head draws decides the group's union: ``observed["rows"]`` when measured,
else ``min(n, (global + window + random) * block_size)`` tokens per head (an upper bound) and the
union per ``group_union``. The simulator's budget is ``random_blocks``.
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, union_rows


@cost_model("bigbird", budget_param="random_blocks",
            defaults=dict(block_size=64, global_blocks=1, window_blocks=3, random_blocks=3, seed=0))
def cost(q: Query) -> list[Kernel]:
    bs = int(q.param("block_size"))
    blocks = int(q.param("global_blocks")) + int(q.param("window_blocks")) + q.budget
    per_head = np.minimum(q.n, blocks * bs)
    rows = observed_or(q, "rows", union_rows(q, per_head, scattered=False))
    return [Kernel("block_sparse_attention", reads=kv_reads(q, rows), flops=attention_flops(q, q.h_q * per_head),
                   writes=q.h_q * q.shape.d_v * 2)]
