"""Double Sparsity: label-cache scores (r channels of every key), top-k, sparse attention.

Mirrors ``kvsparse/oracle/double_sparsity.py``: labels of ``r`` elements (``label_bits``, or the
width of derived stores, ``KVFormat.side_bits``: the KV element width of a plain format, 16 bits
beside ``--kv int8|int4``, as in ``kv_quant`` over Double Sparsity) plus a per-token scale and zero
when quantized, read for all n tokens once per KV head when the channel ranking is shared by the
group (and KV heads are shared), else per query head; none on a dense step (budget >= n). Selected
rows: per query head (the query label differs within a group), from ``kv_memory``: with "pcie" the
rows are copied over the host link and the attention re-reads them from HBM (staged bytes, not in
Traffic).
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, union_rows

SCORE_BYTES = 4
INDEX_BYTES = 4


@cost_model("double_sparsity", budget_param="token_budget",
            defaults=dict(channels=None, r=None, token_budget=256, label_bits=None, quantize_query_label=True,
                          label_scale_bits=16, kv_memory="hbm", dense_layers=0))
def cost(q: Query) -> list[Kernel]:
    d = q.shape.d
    r = min(d, q.params.get("r") or max(1, d // 8))
    label_bits = q.params.get("label_bits")
    bits = label_bits or q.kv.side_bits
    dense = q.budget >= q.n
    if (r * bits) % 8 and not np.all(dense):
        raise ValueError(f"a label of r={r} channels at {bits} bits is not a whole number of bytes")
    per_token = (r * bits) // 8 + (2 * int(q.params.get("label_scale_bits", 16)) // 8 if label_bits else 0)
    channels = q.params.get("channels")
    shared = channels is None or len(channels) in (1, q.h_kv)
    label_readers = q.h_kv if (shared and q.share_kv_heads) else q.h_q
    scored = np.where(dense, 0, q.n)
    per_head = np.minimum(q.n, q.budget)
    rows = observed_or(q, "rows", np.where(dense, q.readers * q.n, union_rows(q, per_head)))
    active = (~dense).astype(np.int64)
    memory = q.params.get("kv_memory", "hbm")
    kernels = [
        Kernel("ds_label_scores", reads={("hbm", "metadata"): scored * per_token * label_readers},
               writes=q.h_q * scored * SCORE_BYTES, flops=2 * r * q.h_q * scored, compute="vector", count=active),
        Kernel("ds_topk", staged=q.h_q * scored * SCORE_BYTES, writes=q.h_q * per_head * INDEX_BYTES * active,
               flops=q.h_q * scored, compute="vector", count=active),
    ]
    kv = kv_reads(q, rows, memory)
    attn_flops = attention_flops(q, q.h_q * np.where(dense, q.n, per_head))
    if memory == "hbm":
        kernels.append(Kernel("sparse_attention", reads=kv, flops=attn_flops, writes=q.h_q * q.shape.d_v * 2))
    else:
        moved = sum(kv.values())
        kernels += [Kernel("fetch_selected_kv", engine="pcie", reads=kv, writes=moved, transfers=q.readers),
                    Kernel("sparse_attention", staged=moved, flops=attn_flops, writes=q.h_q * q.shape.d_v * 2,
                           phase=1)]
    return kernels
