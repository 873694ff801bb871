"""SparQ: approximate scores from r query channels over all n keys, top-k, attention + mean(V) mix.

Mirrors ``kvsparse/oracle/sparq.py``: unless the step is dense (k >= n), the approximate pass reads
``r`` elements of all n keys per reader (KV heads when ``gqa="group"`` and KV heads are shared, query
heads otherwise), as tensor "keys", or "auxiliary" from the transposed copy (``transposed_keys``);
with ``reallocate`` the running mean of V (d elements of ``mean_value_bits``, else of
``KVFormat.side_bits``: 16 beside ``--kv int8|int4``) is read per KV head (shared) or per query head.
Beside a scaled format the approximate pass also reads the scale and zero of every group holding one
of its ``r`` channels, at most ``min(r, groups per row)`` per key and reader (as ``kv_quant`` over
SparQ prices it without a measurement). Tokens: ``k`` (the simulator's budget) or ``n / (2 rho)``; ``extra_token``
adds one. Selected rows: shared by the group with ``gqa="group"``, per query head otherwise.
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, union_rows

SCORE_BYTES = 4
INDEX_BYTES = 4


def _divide(a, b, rounding):
    if rounding == "floor":
        return a // b
    return np.round(np.asarray(a) / b).astype(np.int64)   # half to even, as Python's round


@cost_model("sparq", budget_param="k",
            defaults=dict(r=None, k=None, compression_ratio=8, rounding="floor", allocated_len=None,
                          gqa="per_head", forced_recent=0, extra_token=False, reallocate=True,
                          transposed_keys=False, mean_value_bits=None))
def cost(q: Query) -> list[Kernel]:
    d, rho, rounding = q.shape.d, int(q.param("compression_ratio")), q.param("rounding")
    r = min(d, q.params.get("r") or max(1, int(_divide(d, rho, rounding))))
    if q.params.get("k") is not None:
        k = q.budget
    else:
        length = q.n if q.params.get("allocated_len") is None else np.int64(q.params["allocated_len"])
        k = np.maximum(1, _divide(length, 2 * rho, rounding))
    tokens = np.minimum(q.n, k + int(bool(q.params.get("extra_token"))))
    dense = tokens >= q.n
    group = q.params.get("gqa", "per_head") == "group"
    key_readers = q.h_kv if (group and q.share_kv_heads) else q.h_q
    bits = np.where(dense, 0, q.n) * r * q.kv.element_bits * key_readers
    if np.any(bits % 8):
        raise ValueError("n x r elements at the KV width are not whole bytes")
    approx_tensor = "auxiliary" if q.params.get("transposed_keys") else "keys"
    approx_reads = {("hbm", approx_tensor): bits // 8}
    if q.kv.scale_bytes:                 # the scale and zero of each group holding a read channel
        groups = 1 if q.kv.group == 0 else -(-d // q.kv.group)
        approx_reads[("hbm", "metadata")] = np.where(dense, 0, q.n) * key_readers * min(r, groups) * q.kv.scale_bytes
    approx = Kernel("sparq_approx_scores", reads=approx_reads,
                    writes=q.h_q * np.where(dense, 0, q.n) * SCORE_BYTES,
                    flops=2 * r * q.h_q * np.where(dense, 0, q.n), compute="vector", count=(~dense).astype(np.int64))
    topk = Kernel("sparq_topk", staged=q.h_q * np.where(dense, 0, q.n) * SCORE_BYTES,
                  writes=q.h_q * tokens * INDEX_BYTES * ~dense, flops=q.h_q * np.where(dense, 0, q.n),
                  compute="vector", count=(~dense).astype(np.int64))
    rows = observed_or(q, "rows", np.where(dense, q.readers * q.n, union_rows(q, tokens, per_kv_head=group)))
    reads = kv_reads(q, rows)
    if q.params.get("reallocate", True):
        mean_bits = q.params.get("mean_value_bits") or q.kv.side_bits
        mean_bytes = np.where(dense, 0, q.shape.d_v * mean_bits * q.readers // 8)
        reads[("hbm", "auxiliary")] = reads.get(("hbm", "auxiliary"), 0) + mean_bytes
    attend = Kernel("sparse_attention_mix", reads=reads, flops=attention_flops(q, q.h_q * tokens),
                    writes=q.h_q * q.shape.d_v * 2)
    return [approx, topk, attend]
