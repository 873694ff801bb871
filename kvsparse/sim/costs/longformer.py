"""Longformer (causal decode): a (dilated) window of ``window + 1`` keys + global tokens, one kernel.

Mirrors ``kvsparse/oracle/longformer.py`` (Traffic: the selected K/V rows, same set for every head,
once per KV head under sharing). Tokens: band ``min(window, (n - 1) // dilation) + 1`` plus the
global tokens before the current one outside the band (every token when the current one is global).
Rows: ``observed["rows"]`` when measured; else the band rounded out to pages (plain window) or one
row per token (dilated), plus one page per global token outside it. The simulator's budget is ``window``.
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, range_rows


@cost_model("longformer", budget_param="window", defaults=dict(window=256, dilation=1, global_tokens=(0,)))
def cost(q: Query) -> list[Kernel]:
    w, dil = q.budget, int(q.params.get("dilation", 1))
    cur = q.n - 1
    band = np.minimum(w, cur // dil) + 1
    glob_out = np.zeros(np.broadcast_shapes(q.n.shape, np.shape(w)), dtype=np.int64)
    cur_global = np.zeros_like(glob_out, dtype=bool)
    for g in set(int(x) for x in q.params.get("global_tokens", (0,))):
        dist = cur - g
        in_band = (dist >= 0) & (dist % dil == 0) & (dist <= w * dil)
        glob_out = glob_out + ((g <= cur) & ~in_band)
        cur_global = cur_global | (g == cur)
    tokens = np.where(cur_global, q.n, band + glob_out)
    if dil == 1:
        est = range_rows(q.n - band, q.n, q.n, q.page_size) + glob_out * q.page_size
    else:
        est = band * q.page_size + glob_out * q.page_size
    est = np.where(cur_global, q.n, np.minimum(q.n, est))
    rows = observed_or(q, "rows", q.readers * est)
    return [Kernel("window_global_attention", reads=kv_reads(q, rows), flops=attention_flops(q, q.h_q * tokens),
                   writes=q.h_q * q.shape.d_v * 2)]
