"""Dense decode attention: every query head over all n tokens; one fused split-K kernel.

Traffic: every K and V row once per KV head (once per query head without KV sharing), with the
KV format's scales as metadata. FLOPs: ``2 * n * (d + d_v)`` per query head.
"""
from __future__ import annotations

from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads


def dense_kernels(q: Query, name: str = "attention") -> list[Kernel]:
    return [Kernel(name, reads=kv_reads(q, q.readers * q.n), flops=attention_flops(q, q.h_q * q.n),
                   writes=q.h_q * q.shape.d_v * 2)]


@cost_model("dense", uses_budget=False)
def cost(q: Query) -> list[Kernel]:
    return dense_kernels(q)
