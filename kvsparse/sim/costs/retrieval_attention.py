"""RetrievalAttention: static set (sinks + window) on the GPU, nearest-neighbour search and attention
over the retrieved keys on the host, partial outputs merged on the GPU.

Mirrors ``kvsparse/oracle/retrieval_attention.py``: HBM K/V rows of the static set; host key reads
of the search (a flat scan of all candidates once per KV head under KV sharing or per query head;
with ``scan_ratio`` ``max(k_eff, floor(ratio * candidates))`` keys per query head); host K/V rows of
the retrieved set (``observed["retrieved_rows"]``, else ``k_eff`` per query head and the group's
union per ``group_union``); over the link only the query (down) and the partial output and LSE (up),
``d`` elements each at ``KVFormat.side_bits`` (the KV element width, as the oracle counts them; 16
bits beside ``--kv int8|int4``: they are activations, not cache rows). Beside a scaled format the
flat scan also reads each scanned key's scales (host ``metadata``), as ``kv_quant`` prices it.
Phases: query down; GPU static attention overlapping the host search + attention; result up, merge.
The simulator's budget is ``top_k``.
"""
from __future__ import annotations

import numpy as np

from ...oracle import core

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, sink_window_rows, union_rows


def _floor_ratio(count, ratio) -> np.ndarray:
    """``core.budget_from_ratio`` over an array: floor(count * ratio) on exact rationals."""
    r = core.exact_ratio(ratio)
    return (np.asarray(count, dtype=np.int64) * r.numerator) // r.denominator


@cost_model("retrieval_attention", budget_param="top_k",
            defaults=dict(sinks=128, window=512, top_k=100, recall=1.0, scan_ratio=None, lse_bytes=4))
def cost(q: Query) -> list[Kernel]:
    sinks, window = int(q.param("sinks")), int(q.param("window"))
    pool = np.maximum(0, q.n - window - sinks)
    k_eff = np.minimum(q.budget, pool)
    on = k_eff > 0
    row, message = q.key_row, q.side_row
    scan_ratio = q.params.get("scan_ratio")
    if scan_ratio is None:
        searches, scanned = (q.h_kv if q.share_kv_heads else q.h_q), pool
    else:
        searches, scanned = q.h_q, np.maximum(k_eff, _floor_ratio(pool, scan_ratio))
    gpu_rows = q.readers * sink_window_rows(q.n, sinks, window, q.page_size)
    host_rows = observed_or(q, "retrieved_rows", union_rows(q, k_eff, cap=pool))
    down = q.h_q * message * on
    up = (q.h_q * message + q.h_q * int(q.param("lse_bytes"))) * on
    scan = {("host", "keys"): searches * scanned * row * on}
    if q.kv.scale_bytes:
        scan[("host", "metadata")] = searches * scanned * q.kv.scale_bytes_per_row(q.shape.d) * on
    n_static = q.n - pool
    return [
        Kernel("send_query", engine="pcie", reads={("pcie", "auxiliary"): down}, transfers=on.astype(np.int64),
               count=on.astype(np.int64), phase=0),
        Kernel("static_attention", reads=kv_reads(q, gpu_rows), flops=attention_flops(q, q.h_q * n_static),
               writes=q.h_q * q.shape.d_v * 4, phase=1),
        Kernel("host_search", engine="host", reads=scan,
               flops=2 * q.shape.d * searches * scanned * on, phase=1),
        Kernel("host_attention", engine="host", reads=kv_reads(q, host_rows, "host"),
               flops=attention_flops(q, q.h_q * k_eff), phase=1),
        Kernel("return_partial", engine="pcie", reads={("pcie", "auxiliary"): up}, transfers=on.astype(np.int64),
               count=on.astype(np.int64), phase=2),
        Kernel("merge", writes=q.h_q * q.shape.d_v * 2 * on, flops=6 * q.h_q * q.shape.d_v * on, compute="vector",
               count=on.astype(np.int64), phase=3),
    ]


def observe(method, result, inp, *, h_kv, layout):
    from ..costmodel import selection_rows
    from ...oracle.types import Selection
    _, retrieved = method.split(result.selection)
    sel = Selection(tuple(retrieved), result.selection.n)
    return {"retrieved_rows": selection_rows(sel, h_kv, layout.page_size, layout.share_kv_heads)}


cost.observe = observe
