"""Quest: page estimate (min/max metadata), top-k over page scores, sparse attention over the pages.

Mirrors ``kvsparse/oracle/quest.py`` field by field (token budget = the simulator's budget):
metadata read = ``2 * scored_pages * side_row * readers``; no estimate on a dense step (budget
covering the context, or the kernel path's few-pages rule). ``side_row`` is ``d`` elements at the KV
element width for a plain format (fp16/bf16/fp8, the oracle's ``layout.row_bytes(d)``) and at 16 bits
beside a scaled integer format (``--kv int8|int4``): the page min/max are a separate fp16 store, as in
``kv_quant`` over Quest (preset ``quest-int4``); see ``costmodel``'s module doc. Selected rows: the oracle's selection
when measured (``observed["rows"]``), otherwise every chosen page full (an upper bound: a chosen partial
last page holds fewer), and under GQA sharing the group's union per ``group_union`` (default G).
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, union_rows

SCORE_BYTES = 4   # fp32 page scores
INDEX_BYTES = 4   # int32 page indices


def quest_pages(q: Query):
    """(page budget, pages in the cache, dense step?) as arrays."""
    P = int(q.param("page_size"))
    b = np.minimum(q.n, q.budget) if q.param("cap_budget_at_n") else q.budget
    rounding = q.param("budget_rounding")
    if rounding == "floor":
        pages = b // P
    elif rounding == "ceil":
        pages = -(-b // P)
    elif rounding == "twilight":
        pages = np.maximum(1, b // P) + (b % P != 0)
    else:
        raise ValueError(f"budget_rounding must be floor, ceil or twilight, got {rounding!r}")
    pages = np.maximum(int(q.param("min_pages")), pages)
    n_pages = -(-q.n // P)
    dense = np.zeros(np.broadcast_shapes(q.n.shape, q.budget.shape), dtype=bool)
    if q.param("dense_if_budget_covers"):
        dense = dense | (q.budget >= q.n)
    if q.param("last_page") == "always":
        dense = dense | (n_pages <= pages)
    return pages, n_pages, dense


@cost_model("quest", budget_param="token_budget",
            defaults=dict(token_budget=1024, page_size=16, budget_rounding="floor", min_pages=1,
                          last_page="scored", dense_if_budget_covers=True, cap_budget_at_n=False,
                          dense_layers=2))
def cost(q: Query) -> list[Kernel]:
    P = int(q.param("page_size"))
    pages, n_pages, dense = quest_pages(q)
    scored = np.where(dense, 0, n_pages - 1 if q.param("last_page") == "always" else n_pages)
    kept_pages = np.minimum(pages, n_pages)
    per_head = np.where(dense, q.n, np.minimum(q.n, kept_pages * P))
    if P % q.page_size:   # Quest pages straddle KV pages: up to one extra KV page per Quest page
        per_head = np.minimum(q.n, per_head + np.where(dense, 0, kept_pages * q.page_size))
    rows = observed_or(q, "rows", np.where(dense, q.readers * q.n, union_rows(q, per_head, scattered=False)))
    active = (~dense).astype(np.int64)
    estimate = Kernel("quest_estimate", reads={("hbm", "metadata"): 2 * scored * q.side_row * q.readers},
                      writes=q.h_q * scored * SCORE_BYTES, flops=4 * q.shape.d * q.h_q * scored,
                      compute="vector", count=active)
    topk = Kernel("quest_topk", staged=q.h_q * scored * SCORE_BYTES, writes=q.h_q * kept_pages * INDEX_BYTES * active,
                  flops=q.h_q * scored, compute="vector", count=active)
    attend = Kernel("sparse_attention", reads=kv_reads(q, rows), flops=attention_flops(q, q.h_q * per_head),
                    writes=q.h_q * q.shape.d_v * 2)
    return [estimate, topk, attend]
