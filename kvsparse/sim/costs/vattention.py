"""vAttention: sinks + local window + top-k attended exactly, a uniform sample of the rest (HT-scaled).

Mirrors ``kvsparse/oracle/vattention.py``, whose Traffic is the selected K/V rows only (the per-head
union under KV sharing): ``observed["rows"]`` when measured. Analytic estimate per head: sinks + local
+ heavy (ints are tokens, floats fractions of n, exact floor) + a sample of ``sample_rate`` of the rest
(default 0.05, the paper's base rate; the real sample size follows (epsilon, delta) and the data).
Timed but not in Traffic (as the oracle states): the top-k selector's scores over every key
(``staged``, one key row and its scales per reader: an exact selector).
The simulator's budget is ``heavy`` (tokens).
"""
from __future__ import annotations

from numbers import Integral

import numpy as np

from ...oracle import core
from ..costmodel import Kernel, Query, attention_flops, cost_model, kv_reads, observed_or, union_rows

SCORE_BYTES = 4


def _size(spec, n) -> np.ndarray:
    if isinstance(spec, Integral) or (isinstance(spec, np.ndarray) and spec.dtype.kind in "iu"):
        return np.minimum(spec, n)
    r = core.exact_ratio(spec)
    return (np.asarray(n, dtype=np.int64) * r.numerator) // r.denominator


@cost_model("vattention", budget_param="heavy",
            defaults=dict(sinks=128, local=128, heavy=0.05, sample_rate=0.05))
def cost(q: Query) -> list[Kernel]:
    heavy_spec = q.params.get("heavy", 0.05)
    heavy = q.budget if isinstance(heavy_spec, (Integral, np.ndarray)) else heavy_spec
    fixed = np.minimum(q.n, _size(q.param("sinks"), q.n) + _size(q.param("local"), q.n))
    fixed = np.minimum(q.n, fixed + _size(heavy, q.n))
    rest = q.n - fixed
    sample = np.minimum(rest, np.ceil(float(q.params.get("sample_rate", 0.05)) * rest).astype(np.int64))
    per_head = fixed + sample
    rows = observed_or(q, "rows", union_rows(q, per_head))
    scoring = (_size(heavy, q.n) > 0).astype(np.int64)
    return [
        Kernel("vatt_topk_scores", staged=q.readers * q.n * (q.key_row + q.kv.scale_bytes_per_row(q.shape.d)) * scoring,
               writes=q.h_q * q.n * SCORE_BYTES * scoring, flops=2 * q.shape.d * q.h_q * q.n * scoring,
               count=scoring),
        Kernel("vatt_sample_attention", reads=kv_reads(q, rows), flops=attention_flops(q, q.h_q * per_head),
               writes=q.h_q * q.shape.d_v * 2),
    ]
