"""LoRC: the cache stores a rank-r latent per token (truncated-SVD K/V projections), rebuilt per head.

Mirrors ``kvsparse/oracle/lorc.py``: ``n * key_rank`` and ``n * value_rank`` latent elements read once
per step (shared by every head), ranks given or ``floor(ratio * H_kv * d)`` (at least 1). The rebuild
``(x A) B`` costs ``2 * n * r * H_kv * d`` FLOPs per tensor (B is a weight: not counted as KV bytes).
A scaled integer format (``--kv int8|int4``) adds its scale bytes per latent row (tensor ``metadata``).
"""
from __future__ import annotations

from ...oracle import core
from ..costmodel import Kernel, Query, attention_flops, cost_model


def lorc_ranks(q: Query) -> tuple[int, int]:
    full = q.h_kv * q.shape.d

    def one(rank, ratio):
        r = core.budget_from_ratio(full, ratio, minimum=1) if rank is None else int(rank)
        if r > full:
            raise ValueError(f"rank {r} exceeds the full rank {full}")
        return r
    return one(q.params.get("key_rank"), q.param("key_ratio")), one(q.params.get("value_rank"), q.param("value_ratio"))


@cost_model("lorc", uses_budget=False, defaults=dict(key_ratio=0.5, value_ratio=0.5, key_rank=None, value_rank=None))
def cost(q: Query) -> list[Kernel]:
    rk, rv = lorc_ranks(q)
    bits = q.kv.element_bits
    for r in (rk, rv):
        if (r * bits) % 8:
            raise ValueError(f"a rank-{r} latent at {bits} bits is not a whole number of bytes")
    full = q.h_kv * q.shape.d
    reads = {("hbm", "keys"): q.n * rk * bits // 8, ("hbm", "values"): q.n * rv * bits // 8}
    scales = q.n * (q.kv.scale_bytes_per_row(rk) + q.kv.scale_bytes_per_row(rv))
    if scales:
        reads[("hbm", "metadata")] = scales
    return [Kernel("lorc_rebuild_attention", reads=reads,
                   flops=2 * q.n * (rk + rv) * full + attention_flops(q, q.h_q * q.n),
                   writes=q.h_q * q.shape.d_v * 2)]
