"""KV quantization (KIVI-style): packed int8/int4/int2 K and V, min-max scale and zero per group,
a full-precision residual of recent tokens; dense attention over the dequantized cache.

Mirrors ``kvsparse/oracle/kv_quant.py`` for ``base=None`` (dense): per reader, the quantized prefix
(``n_q`` tokens, per the residual rule) costs ``d * bits / 8`` bytes a row, the rest ``row_bytes(d)``;
scales: ``2 * scale_bits / 8`` bytes per group touched (per-token groups: ``n_q * ceil(d / G)``;
per-channel groups: ``ceil(n_q / G) * d``). Other methods are priced on a quantized cache with the
simulator's ``kv`` format (``--kv int8|int4``) instead; a ``base`` here is refused.
"""
from __future__ import annotations

import numpy as np

from ..costmodel import Kernel, Query, attention_flops, cost_model


def quantized_prefix(n, axis: str, residual: int, group: int, rule: str) -> np.ndarray:
    n = np.asarray(n, dtype=np.int64)
    if rule == "kivi":
        return residual * ((n - 1) // residual) if axis == "channel" else np.maximum(0, n - residual - 1)
    m = np.maximum(0, n - residual)
    return (m // group) * group if (axis == "channel" and group) else m


def scale_groups(n_q, axis: str, group: int, d: int) -> np.ndarray:
    if axis == "token":
        return n_q * -(-d // (d if group == 0 else min(group, d)))
    blocks = np.where(n_q > 0, 1, 0) if group == 0 else -(-n_q // group)
    return blocks * d


@cost_model("kv_quant", uses_budget=False,
            defaults=dict(base=None, key_bits=4, value_bits=4, key_axis="channel", value_axis="token",
                          group_size=32, residual=0, residual_rule="window", scale_bits=16))
def cost(q: Query) -> list[Kernel]:
    if q.params.get("base") is not None:
        raise ValueError("the kv_quant cost model prices base=None (dense attention); price other methods "
                         "on a quantized cache with the simulator's kv format (--kv int8 or int4)")
    d, full = q.shape.d, q.key_row
    pair = 2 * int(q.param("scale_bits")) // 8
    group, residual, rule = int(q.param("group_size")), int(q.param("residual")), q.param("residual_rule")
    reads = {("hbm", "keys"): 0, ("hbm", "values"): 0, ("hbm", "metadata"): 0}
    for tensor, bits, axis in (("keys", q.param("key_bits"), q.param("key_axis")),
                               ("values", q.param("value_bits"), q.param("value_axis"))):
        if (d * bits) % 8:
            raise ValueError(f"d={d} with {bits}-bit codes is not a whole number of bytes")
        n_q = quantized_prefix(q.n, axis, residual, group, rule)
        reads[("hbm", tensor)] = q.readers * (n_q * (d * bits // 8) + (q.n - n_q) * full)
        reads[("hbm", "metadata")] = reads[("hbm", "metadata")] + q.readers * scale_groups(n_q, axis, group, d) * pair
    return [Kernel("quantized_attention", reads=reads, flops=attention_flops(q, q.h_q * q.n),
                   writes=q.h_q * q.shape.d_v * 2)]
