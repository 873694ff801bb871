"""ClusterKV: score the prompt's key clusters (centroids), gather members up to the budget, attend.

Mirrors ``kvsparse/oracle/clusterkv.py`` (everything resident in HBM, as the repo's accuracy path):
with T prompt tokens, ``m = T - min(sinks, T)`` clustered keys in ``C = min(n_clusters, m)`` clusters
and ``r = clip(budget - sinks, 0, m)`` clustered tokens taken per head, the scorers (KV heads under
KV sharing, else query heads; none when r is 0 or m) read ``C`` centroids of ``d`` elements (at
``KVFormat.side_bits``: the KV element width, 16 bits beside ``--kv int8|int4``) and ``C`` int32
sizes; one int64 member index is read per selected clustered token (the group's union under
sharing). A head attends ``min(sinks, T) + r + (n - T)`` tokens. T defaults to ``n - generated``
(``generated`` = 1: a step right after prefill); ``observed`` may give ``prompt_len``,
``index_rows`` (the union of clustered selections) and ``rows``.
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, selection_rows, union_rows

CLUSTER_SIZE_BYTES = 4
MEMBER_INDEX_BYTES = 8


@cost_model("clusterkv", budget_param="budget",
            defaults=dict(n_clusters=400, sinks=16, budget=1024, gqa="per_query_head", generated=1))
def cost(q: Query) -> list[Kernel]:
    t = observed_or(q, "prompt_len", np.maximum(q.n - int(q.params.get("generated", 1)), 0))
    sinks = int(q.param("sinks"))
    m = t - np.minimum(sinks, t)
    c = np.minimum(int(q.param("n_clusters")), m)
    r = np.clip(q.budget - sinks, 0, m)
    ranking = (r > 0) & (r < m)
    scorers = np.where(ranking, q.h_kv if q.share_kv_heads else q.h_q, 0)
    shared = q.params.get("gqa", "per_query_head") == "mean_query"
    index_rows = observed_or(q, "index_rows", union_rows(q, r, per_kv_head=shared, cap=m))
    per_head = np.minimum(sinks, t) + r + (q.n - t)
    rows = observed_or(q, "rows", union_rows(q, per_head, per_kv_head=shared))
    score = Kernel("cluster_scores", reads={("hbm", "metadata"): scorers * c * (q.side_row + CLUSTER_SIZE_BYTES)},
                   writes=q.h_q * c * 4 * ranking, flops=2 * q.shape.d * q.h_q * c * ranking, compute="vector",
                   count=ranking.astype(np.int64))
    gather = Kernel("cluster_gather", reads={("hbm", "metadata"): index_rows * MEMBER_INDEX_BYTES},
                    staged=q.h_q * c * 4 * ranking, writes=q.h_q * r * 4, compute="vector",
                    count=(r > 0).astype(np.int64))
    attend = Kernel("sparse_attention", reads=kv_reads(q, rows), flops=attention_flops(q, q.h_q * per_head),
                    writes=q.h_q * q.shape.d_v * 2)
    return [score, gather, attend]


def observe(method, result, inp, *, h_kv, layout):
    sel = result.selection
    prompt_len = sel.n - 1            # the exactness test decodes one token after the prompt
    first = min(method.sinks, prompt_len)
    clustered = [ix[(ix >= first) & (ix < prompt_len)] for ix in sel.indices]
    if layout.share_kv_heads:
        g = sel.h_q // h_kv
        index_rows = sum(np.unique(np.concatenate(clustered[j * g:(j + 1) * g])).size for j in range(h_kv))
    else:
        index_rows = sum(ix.size for ix in clustered)
    return {"rows": selection_rows(sel, h_kv, layout.page_size, layout.share_kv_heads),
            "index_rows": index_rows, "prompt_len": prompt_len}


cost.observe = observe
cost.min_n = 2
