"""SnapKV (Li et al., 2024): the last ``window`` prompt queries vote once, at prefill, for prefix tokens.

Prefill of ``T`` tokens (``window_scores``): the window queries (positions ``T-w..T-1``) attend
causally over all ``T`` keys; a prefix token's score is the sum (``window_score="sum"``, the repo)
or mean (kvpress) over the window queries of its softmax probability, with no renormalisation over
the prefix. The prefix scores are pooled along positions (``core.pool1d``: ``max`` pads -inf, ``avg``
divides by the kernel counting the zero padding; ``none`` or kernel 1 is the identity). The window is
always kept (score ``+inf``) and the top ``n_total`` tokens of ``[pooled prefix, window]`` stay (core
tie rule: higher score, then lower position), so a budget below ``w`` keeps the earliest window tokens
(kvpress pads the window with ``max + 1``: its choice among them is arbitrary). After prefill nothing
is evicted: the cache grows by one token per step, at original positions.

Budget (``budget_total``): with ``compression_ratio=None`` (the repo), no compression if
``T < capacity``, else ``n_total = capacity`` (``capacity - window`` prefix tokens + the window;
``T == capacity`` *does* go through selection). With a ``compression_ratio`` (kvpress), always
compress to ``max(1, int(T (1 - ratio)))`` tokens, window included; ``T <= window`` is an error.

GQA (``gqa``): ``per_query_head`` (the repo ``repeat_kv``s before compressing: each query head keeps
its own set, a G-times larger cache; count its bytes with ``Layout(share_kv_heads=False)``), or one
set per KV head from the group's scores reduced by ``mean|max|sum``, after pooling
(``reduce_before_pool=False``, kvpress) or before it (KVCache-Factory's ``kv_head`` mode).

Positions / RoPE: q and the keys are used as given, i.e. post-RoPE at their original positions (or
no RoPE), as the repo and kvpress cache them. The window queries are scored at their original
positions. Compression never re-rotates the kept keys. Decode queries use their true position ``t``,
not the compacted cache length. Selections index original positions. So the output equals attention
over the compacted cache of the kept tokens in any slot order. For cache-index positions (kvpress
``KeyRerotationPress``), rotate outside the oracle, or see StreamingLLM's ``rope`` field.

State: ``CacheState`` (kept rows per unit). Traffic: the kept K/V rows (``kv_traffic``); no scores
are read after prefill.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import StatefulMethod, decode_scale, prefill_scale
from .sliding_window import (CacheState, GQA_MODES, RATIO_ROUNDINGS, append_token, attend_kept, causal_probs,
                             check_bool, check_choice, check_new_token, check_prompt, kept_after_compression,
                             new_history, reduce_group, selection_of)
from .types import Layout, StepResult, kv_traffic

POOLS = ("max", "avg", "none")
WINDOW_SCORES = ("sum", "mean")


def window_scores(q_prompt: np.ndarray, k_prompt: np.ndarray, window: int, *, how: str = "sum",
                  scale: float | None = None) -> np.ndarray:
    """``[H_q, T - window]``: the window queries' causal softmax mass on each prefix token (logits
    scaled by ``scale``; None: ``1/sqrt(d)``)."""
    t = q_prompt.shape[0]
    probs = causal_probs(q_prompt, k_prompt, np.arange(t - window, t), scale=scale)[:, :, : t - window]
    return probs.sum(axis=1) if how == "sum" else probs.mean(axis=1)


def pool_scores(scores: np.ndarray, kernel: int, pool: str) -> np.ndarray:
    return scores.copy() if pool == "none" else core.pool1d(scores, kernel, pool)


@register_method
@dataclass(frozen=True)
class SnapKV(StatefulMethod):
    name: ClassVar[str] = "snapkv"
    family: ClassVar[str] = "eviction"
    summary: ClassVar[str] = "once at prefill: last-w queries vote (pooled) for prefix tokens; keep top + window"

    window: int = 32
    capacity: int = 2048
    compression_ratio: float | None = None
    ratio_rounding: str = "exact"
    kernel: int = 7
    pool: str = "max"
    window_score: str = "sum"
    gqa: str = "per_query_head"
    reduce_before_pool: bool = False

    def __post_init__(self):
        core.check_positive_int(self.window, "window")
        core.check_positive_int(self.capacity, "capacity")
        core.check_positive_int(self.kernel, "kernel")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (centred pooling), got {self.kernel}")
        if self.compression_ratio is None and self.capacity <= self.window:
            raise ValueError(f"capacity ({self.capacity}) must exceed window ({self.window}), as the repo asserts")
        if self.compression_ratio is not None:
            kept_after_compression(1, self.compression_ratio)
        check_choice(self.ratio_rounding, RATIO_ROUNDINGS, "ratio_rounding")
        check_choice(self.pool, POOLS, "pool")
        check_choice(self.window_score, WINDOW_SCORES, "window_score")
        check_choice(self.gqa, GQA_MODES, "gqa")
        check_bool(self.reduce_before_pool, "reduce_before_pool")

    def budget_total(self, t: int) -> int | None:
        """Tokens kept after a prompt of ``t`` tokens, window included; ``None``: no compression."""
        if self.compression_ratio is not None:
            return kept_after_compression(t, self.compression_ratio, self.ratio_rounding)
        return None if t < self.capacity else self.capacity

    def unit_scores(self, q_prompt, k_prompt, *, scale: float | None = None) -> np.ndarray:
        """``[U, T]``: pooled prefix scores per unit, ``+inf`` on the window (softmax ``scale``)."""
        t, h_kv = k_prompt.shape[:2]
        raw = window_scores(q_prompt, k_prompt, self.window, how=self.window_score, scale=scale)
        if self.gqa == "per_query_head":
            pooled = pool_scores(raw, self.kernel, self.pool)
        elif self.reduce_before_pool:
            pooled = pool_scores(reduce_group(raw, h_kv, self.gqa), self.kernel, self.pool)
        else:
            pooled = reduce_group(pool_scores(raw, self.kernel, self.pool), h_kv, self.gqa)
        return np.concatenate([pooled, np.full((pooled.shape[0], self.window), np.inf)], axis=1)

    def prefill(self, q_prompt, k_prompt, v_prompt, *, scale: float | None = None) -> CacheState:
        q_prompt, k_prompt, v_prompt = check_prompt(q_prompt, k_prompt, v_prompt, min_len=1)
        t, h_kv = k_prompt.shape[:2]
        h_q = q_prompt.shape[1]
        scale = prefill_scale(scale, q_prompt.shape[2])
        units = h_q if self.gqa == "per_query_head" else h_kv
        n_total = self.budget_total(t)
        if self.compression_ratio is not None and t <= self.window:
            raise ValueError(f"kvpress needs more prompt tokens ({t}) than window ({self.window})")
        kept = np.ones((units, t), dtype=bool)
        if n_total is not None:
            scores = self.unit_scores(q_prompt, k_prompt, scale=scale)
            kept[:] = False
            np.put_along_axis(kept, core.topk_indices(scores, n_total), True, axis=1)
        return CacheState(new_history(k_prompt, v_prompt), t, t, kept, scale=scale)

    def decode(self, state: CacheState, q, k_new, v_new, *, scale: float | None = None,
               layout: Layout = Layout()) -> tuple[CacheState, StepResult]:
        q, k_new, v_new = check_new_token(state, CacheState, q, k_new, v_new)
        scale = decode_scale(state.scale, scale)
        state = append_token(state, k_new, v_new)
        out, _ = attend_kept(q, state.keys(), state.values(), state.kept, scale=scale)
        selection = selection_of(state.kept, q.shape[0])
        h_kv, _, d = state.keys().shape
        return state, StepResult(selection, out, kv_traffic(selection, h_kv, d, layout))

    def select(self, q, k, v, *, positions=None):
        raise NotImplementedError("SnapKV is stateful: use prefill() then decode(), or run_decode()")

    @classmethod
    def presets(cls) -> dict[str, "SnapKV"]:
        return {
            "canonical": cls(),
            # FasterDecoding/SnapKV LongBench configs (ablation_c2048_w32_k7_maxpool): per query head
            "snapkv-repo": cls(window=32, capacity=2048, kernel=7, pool="max"),
            # kvpress SnapKVPress defaults: w=64, k=5, avg pool, mean over window queries, pool then mean
            # over the GQA group, window inside the budget int(T (1 - ratio)); ratio 0.5 here
            "kvpress": cls(window=64, kernel=5, pool="avg", window_score="mean", gqa="mean",
                           compression_ratio=0.5, ratio_rounding="float"),
            # KVCache-Factory kv_head granularity: group scores reduced (mean) before pooling; w=8 as run_longbench
            "kvcache-factory-kv-head": cls(window=8, kernel=7, pool="max", gqa="mean", reduce_before_pool=True),
        }
