"""MLA: one latent (+ shared RoPE key) per token; absorbed or naive decode, every token attended.

Mirrors ``kvsparse/oracle/mla.py``. Absorbed (canonical): the latent rows are read once as keys, no
separate values (``n * key_row`` per reader of the query's shape; on an MLA model's shape, one
latent head of ``r + d_R``). Naive (HF's expanded cache): ``n * H * (d_N + d_R)`` key and
``n * H * d_V`` value elements from the method's own dimensions, whatever the query's shape.
A scaled integer format (``--kv int8|int4``) adds its scale bytes per cached row (a latent row, or
one head's key or value row), as ``kv_reads`` does for a K/V cache (tensor ``metadata``).
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, cost_model


@cost_model("mla", uses_budget=False,
            defaults=dict(heads=16, latent_dim=512, rope_dim=64, nope_dim=128, v_dim=128, form="absorbed"))
def cost(q: Query) -> list[Kernel]:
    bits = q.kv.element_bits
    if q.params.get("form", "absorbed") == "naive":
        h = int(q.param("heads"))
        kel = h * (int(q.param("nope_dim")) + int(q.param("rope_dim")))
        vel = h * int(q.param("v_dim"))
        for el in (kel, vel):
            if (el * bits) % 8:
                raise ValueError(f"{el} elements at {bits} bits are not a whole number of bytes")
        reads = {("hbm", "keys"): q.n * kel * bits // 8, ("hbm", "values"): q.n * vel * bits // 8}
        scales = q.n * h * (q.kv.scale_bytes_per_row(kel // h) + q.kv.scale_bytes_per_row(vel // h))
        flops = 2 * q.n * (kel + vel)
    else:
        reads = {("hbm", "keys"): q.readers * q.n * q.key_row}
        scales = q.readers * q.n * q.kv.scale_bytes_per_row(q.shape.d)
        flops = 2 * q.h_q * q.n * (q.shape.d + q.shape.d_v)
    if scales:
        reads[("hbm", "metadata")] = scales
    return [Kernel("mla_attention", reads=reads, flops=flops, writes=q.h_q * q.shape.d_v * 2)]
