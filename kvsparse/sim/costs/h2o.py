"""H2O: heavy hitters (accumulated attention) + recent tokens; scores read and updated every step.

Mirrors ``kvsparse/oracle/h2o.py``: the attended K/V rows plus ``score_bits / 8`` bytes of score per
(unit, attended token) when decode eviction runs (``mask_sim``: the whole score vector, ``n`` per unit;
kvpress one-shot: none). Analytic kept per unit, with ``heavy``/``recent`` from the prompt length
T = ``observed["prompt_len"]`` or ``n - generated``: ``min(n, heavy + recent)`` before attention, one
more after attention, when the leaving token is protected, or in the masking simulation, ``kept + (n - T)`` for the one-shot press.
``observed`` may give ``rows`` and ``score_entries``. H2O needs the attention probabilities, so the
attention kernel is not a fused FlashAttention: it writes them (``h_q * kept * 4`` bytes) and a second
kernel updates the scores. The simulator's budget is ``heavy``.
"""
from __future__ import annotations

import numpy as np

from ...oracle.sliding_window import kept_after_compression, kept_from_ratio
from ..costmodel import Kernel, Query, cost_model, observed_or, selection_rows
from .snapkv import eviction_kernels, prompt_len


def _per_prompt(fn, t):
    return np.vectorize(lambda x: fn(int(x)), otypes=[np.int64])(t)


@cost_model("h2o", budget_param="heavy",
            defaults=dict(heavy=None, recent=None, heavy_ratio=0.1, recent_ratio=0.1, ratio_rounding="exact",
                          recent_rule="ratio", compression_ratio=None, timing="before_attention",
                          leaving_token_competes=True, execution="drop", decode_eviction=True,
                          gqa="per_query_head", score_bits=32, generated=1))
def cost(q: Query) -> list[Kernel]:
    t = prompt_len(q)
    rounding = q.params.get("ratio_rounding", "exact")
    units = q.h_q if q.params.get("gqa", "per_query_head") == "per_query_head" else q.h_kv
    ratio = q.params.get("compression_ratio")
    if ratio is not None:
        per_unit = np.minimum(q.n, _per_prompt(lambda x: kept_after_compression(x, ratio, rounding), t) + (q.n - t))
    else:
        heavy = q.budget if q.params.get("heavy") is not None else _per_prompt(
            lambda x: kept_from_ratio(x, q.param("heavy_ratio"), rounding), t)
        if q.params.get("recent") is not None:
            recent = np.int64(q.params["recent"])
        elif q.params.get("recent_rule") == "heavy_minus_one":
            recent = np.maximum(heavy - 1, 0)
        else:
            recent = _per_prompt(lambda x: kept_from_ratio(x, q.param("recent_ratio"), rounding), t)
        if np.any(heavy + recent == 0):
            raise ValueError("heavy + recent is 0 for this prompt length: raise the ratios")
        # one more token: evicting after attention, protecting the leaving token, or the masking
        # simulation (its mask was made one step earlier, for n - 1 tokens)
        extra = int(q.params.get("timing") == "after_attention" or not q.params.get("leaving_token_competes", True)
                    or q.params.get("execution") == "mask_sim")
        per_unit = np.minimum(q.n, heavy + recent + extra)
    evicting = bool(q.params.get("decode_eviction", True)) and ratio is None
    if q.params.get("execution") == "mask_sim":
        entries = units * q.n
    else:
        entries = observed_or(q, "score_entries", units * per_unit) * evicting
    score_bytes = entries * int(q.params.get("score_bits", 32)) // 8
    kernels = eviction_kernels(q, per_unit, per_kv_head=units == q.h_kv and q.group > 1, name="attention_with_probs")
    kernels[0].writes = kernels[0].writes + q.h_q * per_unit * 4
    kernels.append(Kernel("h2o_score_update", reads={("hbm", "auxiliary"): score_bytes},
                          staged=q.h_q * per_unit * 4 * evicting, writes=score_bytes, compute="vector",
                          flops=q.h_q * per_unit, count=np.int64(evicting)))
    return kernels


def observe(method, result, inp, *, h_kv, layout):
    sel = result.selection
    units_per_kv = method.gqa != "per_query_head"
    entries = int(sel.sizes.sum()) // (sel.h_q // h_kv if units_per_kv else 1)
    return {"rows": selection_rows(sel, h_kv, layout.page_size, layout.share_kv_heads),
            "prompt_len": sel.n - 1, "score_entries": entries}


cost.observe = observe
cost.min_n = 2
