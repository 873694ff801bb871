"""StreamingLLM: ``sinks`` first tokens + the most recent ones; one attention kernel, nothing scored.

Mirrors ``kvsparse/oracle/streaming_llm.py``. ``schedule="every_step"``: the rows of
``[0, sinks) u [n - span, n)`` (span = ``recent``, plus one when the current token is not counted),
page-rounded, once per KV head under KV sharing. ``"prefill_once"`` (kvpress): the prompt of T tokens
was cut to ``n_kept`` tokens, then every generated token is kept: ``n_kept + (n - T)`` tokens, with
T = ``observed["prompt_len"]`` or ``n - generated`` (default 1) and, without ``observed["rows"]``, the
kept prompt tokens counted as if contiguous. Re-rotation to cache slots reads the same rows (not
counted twice). The simulator's budget is ``recent``.
"""
from __future__ import annotations

import numpy as np

from ...oracle.sliding_window import kept_after_compression
from ..costmodel import (Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, range_rows,
                         selection_rows, sink_window_rows)


@cost_model("streaming_llm", budget_param="recent",
            defaults=dict(sinks=4, recent=2000, recent_includes_current=True, schedule="every_step",
                          compression_ratio=None, ratio_rounding="exact", generated=1))
def cost(q: Query) -> list[Kernel]:
    sinks = int(q.param("sinks"))
    if q.params.get("schedule", "every_step") == "every_step":
        span = q.budget + (0 if q.params.get("recent_includes_current", True) else 1)
        rows = sink_window_rows(q.n, sinks, span, q.page_size)
        tokens = np.minimum(q.n, np.minimum(sinks, q.n) + span)   # upper bound when the ranges overlap
        tokens = np.minimum(tokens, q.n)
    else:
        t = observed_or(q, "prompt_len", np.maximum(q.n - int(q.params.get("generated", 1)), 1))
        if np.any(t <= sinks):
            raise ValueError(f"prefill_once (kvpress) needs more prompt tokens than sinks={sinks}")
        ratio, rounding = q.param("compression_ratio"), q.params.get("ratio_rounding", "exact")
        kept = np.vectorize(lambda x: kept_after_compression(int(x), ratio, rounding), otypes=[np.int64])(t)
        tokens = kept + (q.n - t)
        rows = range_rows(q.n - tokens, q.n, q.n, q.page_size)
    rows = observed_or(q, "rows", q.readers * rows)
    return [Kernel("sink_window_attention", reads=kv_reads(q, rows), flops=attention_flops(q, q.h_q * tokens),
                   writes=q.h_q * q.shape.d_v * 2)]


def observe(method, result, inp, *, h_kv, layout):
    sel = result.selection
    out = {"prompt_len": sel.n - 1}          # the exactness test decodes one token after the prompt
    if method.schedule != "every_step":
        out["rows"] = selection_rows(sel, h_kv, layout.page_size, layout.share_kv_heads)
    return out


cost.observe = observe
cost.min_n = 2
