"""CLA: groups of ``sharing_factor`` adjacent layers share one KV cache; dense attention in every layer.

Mirrors ``kvsparse/oracle/cla.py``: every layer reads its (shared) cache from HBM
(``consumer_reads="hbm"``, canonical), or a consumer layer reads nothing (``"reuse"``, an idealised
on-chip schedule). Layer-dependent: producer layers are ``layer % sharing_factor == 0``. The model's
weights and K/V writes are not changed by the simulator (it prices attention reads).
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads


@cost_model("cla", uses_budget=False, layer_dependent=True,
            defaults=dict(sharing_factor=2, consumer_reads="hbm"))
def cost(q: Query) -> list[Kernel]:
    f = int(q.param("sharing_factor"))
    producer = (q.layer % f) == 0
    reads_cache = producer | (q.params.get("consumer_reads", "hbm") == "hbm")
    rows = q.readers * q.n * reads_cache
    return [Kernel("attention", reads=kv_reads(q, rows), flops=attention_flops(q, q.h_q * q.n),
                   writes=q.h_q * q.shape.d_v * 2)]
