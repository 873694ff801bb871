"""Twilight: base selector (Quest or Double Sparsity) -> quantized-key estimate -> top-p -> attention.

Mirrors ``kvsparse/oracle/twilight.py``: the base selector's metadata reads (its own cost model's
estimate kernels, without its attention), the estimate's reads of the candidates' keys (union per
KV head under KV sharing, per query head otherwise; not page-rounded): ``d * quant_bits / 8`` bytes
plus a scale and zero per row as "auxiliary", or full key rows as "keys" without quantization (with
their scales as "metadata" beside ``--kv int8|int4``); then the kept rows. The simulator's budget is
the base selector's token budget (the candidates).
Data-dependent sizes: ``observed["candidate_rows"]`` and ``observed["rows"]``; without them the
candidates are the base's analytic count and the kept set is ``kept_tokens`` per head (default 146,
the upper end of the 126-146 average Twilight reports), at most the candidates.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..costmodel import (Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, selection_rows,
                         union_rows)
from . import double_sparsity, quest

SCORE_BYTES = 4


def _base(q: Query):
    base = q.param("base")
    params = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)} if dataclasses.is_dataclass(base) \
        else dict(base)
    kind = getattr(base, "name", params.get("name", "quest"))
    budget = np.where(q.budget > 0, q.budget, params["token_budget"])
    params["token_budget"] = budget
    return kind, dataclasses.replace(q, params=params, budget=budget, observed={})


@cost_model("twilight", defaults=dict(base=dict(name="quest", token_budget=8192, page_size=16, budget_rounding="floor",
                                                min_pages=1, last_page="scored", dense_if_budget_covers=True,
                                                cap_budget_at_n=False), p=0.85, quant_bits=4,
                                      quant_scale_bits=16, dense_layers=2, kept_tokens=146))
def cost(q: Query) -> list[Kernel]:
    kind, bq = _base(q)
    if kind == "quest":
        base_kernels = quest.cost(bq)
        pages, n_pages, dense = quest.quest_pages(bq)
        P = int(bq.param("page_size"))
        cand_per_head = np.where(dense, q.n, np.minimum(q.n, np.minimum(pages, n_pages) * P))
    elif kind == "double_sparsity":
        base_kernels = double_sparsity.cost(bq)
        cand_per_head = np.minimum(q.n, bq.budget)
    else:
        raise ValueError(f"base must be quest or double_sparsity, got {kind!r}")
    base_kernels = [k for k in base_kernels if k.name != "sparse_attention"]
    estimate_on = float(q.param("p")) < 1
    cand_rows = observed_or(q, "candidate_rows", union_rows(q, cand_per_head))
    bits = q.params.get("quant_bits")
    d = q.shape.d
    if bits is None:
        est_reads = {("hbm", "keys"): cand_rows * q.key_row * estimate_on}
        if q.kv.scale_bytes:             # the candidates' key scales beside a scaled format (--kv int8|int4)
            est_reads[("hbm", "metadata")] = cand_rows * q.kv.scale_bytes_per_row(d) * estimate_on
    else:
        if (d * bits) % 8:
            raise ValueError(f"d={d} at {bits} bits is not a whole number of bytes")
        per_row = d * bits // 8 + 2 * int(q.param("quant_scale_bits")) // 8
        est_reads = {("hbm", "auxiliary"): cand_rows * per_row * estimate_on}
    kept_per_head = np.minimum(cand_per_head, int(q.params.get("kept_tokens", 146))) if estimate_on else cand_per_head
    rows = observed_or(q, "rows", union_rows(q, kept_per_head))
    on = np.int64(estimate_on)
    return base_kernels + [
        Kernel("twilight_estimate", reads=est_reads, writes=q.h_q * cand_per_head * SCORE_BYTES * on,
               flops=2 * d * q.h_q * cand_per_head * on, compute="vector", count=on),
        Kernel("twilight_top_p", staged=q.h_q * cand_per_head * SCORE_BYTES * on,
               flops=4 * q.h_q * cand_per_head * on, compute="vector", count=on),
        Kernel("sparse_attention", reads=kv_reads(q, rows), flops=attention_flops(q, q.h_q * kept_per_head),
               writes=q.h_q * q.shape.d_v * 2),
    ]


def observe(method, result, inp, *, h_kv, layout):
    cand = method.candidates(inp.q, inp.k, inp.v)
    sets = cand.kv_union(h_kv) if layout.share_kv_heads else cand.indices
    return {"rows": selection_rows(result.selection, h_kv, layout.page_size, layout.share_kv_heads),
            "candidate_rows": sum(ix.size for ix in sets)}


cost.observe = observe
