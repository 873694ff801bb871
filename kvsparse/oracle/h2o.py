"""H2O (Zhang et al., NeurIPS 2023): keep the heavy hitters (largest accumulated attention) + recent tokens.

Canonical rule, per unit (query head, or KV head when ``gqa`` reduces the group's attention):

* prefill: every token's score is the column sum of the prompt's causal attention (all P queries);
* step ``t``: append token ``t`` (score 0); evict down to ``heavy + recent`` tokens; attend; add this
  step's attention probabilities to the scores of the attended tokens.
* eviction: the ``recent`` latest positions (the current token included) are protected; of the other
  kept tokens the ``heavy`` with the largest scores stay (core tie rule: higher score, then lower
  position). An evicted token never returns.

So a step over ``n`` tokens reads ``min(n, heavy + recent)`` tokens, and the incremental score of a
kept token is the sum, over the steps that attended it, of its attention probability (the brute-force
property the tests check).

``recent = 0`` (heavy-only; canonical ``drop`` + ``before_attention``): nothing is protected, so the
new token (score 0) competes with the kept tokens before it is attended. Once the cache is full
(``n > heavy``) it loses (every kept score is ``>= 0``, and a tie goes to the lower position), so it
is evicted before its own step attends it: the current token is attended only while ``n <= heavy``,
and from then on every step attends the same ``heavy`` tokens (new tokens never enter the cache). With
``timing="after_attention"`` the current token is always attended (``heavy + 1`` tokens) and then
competes with the score of that one step. The masking simulation's ``recent = 0`` quirks are below.

Positions / RoPE (every execution and preset): q and the keys are used as given, i.e. post-RoPE at
their original positions (or no RoPE), as ``h2o_hf/utils_real_drop`` caches them. Evicting tokens
never re-rotates the kept keys, the query keeps its true position ``t``, and Selections index
original positions. So the output equals attention over the compacted cache of the kept tokens in
any slot order. There is no cache-index mode: H2O's ``_streaming`` variant re-rotates keys to cache
slots, which is StreamingLLM's ``rope="cache_index"`` and is not reproduced here.

Conventions (explicit fields of ``H2O``):

* ``heavy``/``recent`` as integers, or (``None``) from ``heavy_ratio``/``recent_ratio`` of the prompt
  length, frozen at prefill (the repos: 0.1 + 0.1). ``ratio_rounding="float"`` reproduces
  ``int(ratio * P)``. ``recent_rule="heavy_minus_one"``: FlexGen's ``hh_k - 1`` recent tokens.
* ``timing="before_attention"`` (canonical: the budget bounds what a step reads) or
  ``"after_attention"`` (``utils_real_drop``: evict after the forward, so a step reads
  ``heavy + recent + 1`` tokens and the new token's own attention counts before it is judged).
* ``leaving_token_competes=True``: the token that just left the recent window competes with the heavy
  hitters; ``False`` (FlexGen's ``acc[:src_s - hh_k]``): only the heavy set competes, and the leaving
  token joins it unconditionally.
* ``execution="mask_sim"`` reproduces ``h2o_hf/utils_hh`` (the paper's tables): nothing is dropped,
  a mask for the *next* step keeps the last ``recent`` slots of ``L + 1`` (the upcoming token included)
  plus the top ``heavy`` of positions ``[0, L - recent)``, so position ``L - recent`` is visible to
  neither set (the gap token; its score is kept and it competes again one step later); evicted
  scores are zeroed, but a zero-scored token can be chosen again (its K/V never left). With
  ``recent = 0`` the mask hides the query's own token and no score is ever zeroed (both reproduced).
* ``decode_eviction=False`` + ``score_normalization="visible_queries"`` + ``gqa="mean"`` +
  ``compression_ratio``: kvpress ``ObservedAttentionPress`` (one-shot at prefill: score = column sum /
  number of queries that see the key, mean over the group, keep ``max(1, int(T (1 - ratio)))`` with no
  recent window; the cache grows afterwards).
* ``gqa``: ``per_query_head`` (the repos; H2O is MHA code) or ``mean|max|sum``: each step's
  attention rows of a group are reduced to one row per KV head before they are accumulated.

Traffic: the attended K/V rows (``kv_traffic``) plus, as tensor ``auxiliary`` in HBM, the scores a
step reads: ``score_bits / 8`` bytes for every (unit, attended token) (read-add-write and the min
search of the eviction read the same values); ``mask_sim`` reads the whole score vector of every head
(``L`` entries). Writes are not counted (Traffic counts reads).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import StatefulMethod, decode_scale, prefill_scale
from .sliding_window import (CacheState, GQA_MODES, RATIO_ROUNDINGS, append_token, attend_kept, causal_probs,
                             check_bool, check_choice, check_new_token, check_prompt, check_ratio,
                             kept_after_compression, kept_from_ratio, new_history, reduce_group, selection_of)
from .types import Layout, StepResult, Traffic, kv_traffic

TIMINGS = ("before_attention", "after_attention")
EXECUTIONS = ("drop", "mask_sim")
NORMALIZATIONS = ("sum", "visible_queries")
RECENT_RULES = ("ratio", "heavy_minus_one")


@dataclass(frozen=True)
class H2OState(CacheState):
    """``CacheState`` + ``scores [U, n]`` (accumulated attention; meaningful on kept tokens), the
    frozen budgets, and for ``mask_sim`` the visibility mask of the next step (``[U, n + 1]``)."""

    scores: np.ndarray = None
    heavy: int = 0
    recent: int = 0
    next_mask: np.ndarray | None = None


def evict(kept: np.ndarray, scores: np.ndarray, n: int, heavy: int, recent: int,
          protect_leaving: bool = False) -> np.ndarray:
    """Kept rows after one eviction round at ``n`` tokens (see the module docstring)."""
    pos = np.arange(n)
    protected = pos >= n - recent
    if protect_leaving:
        protected = protected | (pos == n - recent - 1)
    out = kept & protected
    for u in range(kept.shape[0]):
        cand = np.flatnonzero(kept[u] & ~protected)
        slots = heavy - int((kept[u] & protected & (pos < n - recent)).sum())
        if cand.size <= slots:
            out[u, cand] = True
        elif slots > 0:
            out[u, cand[core.topk_indices(scores[u, cand], slots)]] = True
    return out


@register_method
@dataclass(frozen=True)
class H2O(StatefulMethod):
    name: ClassVar[str] = "h2o"
    family: ClassVar[str] = "eviction"
    summary: ClassVar[str] = "heavy hitters by accumulated attention + recent tokens; evicted tokens never return"

    heavy: int | None = None
    recent: int | None = None
    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    ratio_rounding: str = "exact"
    recent_rule: str = "ratio"
    compression_ratio: float | None = None
    timing: str = "before_attention"
    leaving_token_competes: bool = True
    execution: str = "drop"
    decode_eviction: bool = True
    score_normalization: str = "sum"
    gqa: str = "per_query_head"
    score_bits: int = 32

    def __post_init__(self):
        for f in ("heavy", "recent"):
            if getattr(self, f) is not None:
                core.check_positive_int(getattr(self, f), f, allow_zero=True)
        check_ratio(self.heavy_ratio, "heavy_ratio")
        check_ratio(self.recent_ratio, "recent_ratio")
        if self.compression_ratio is not None:
            kept_after_compression(1, self.compression_ratio)
        check_choice(self.ratio_rounding, RATIO_ROUNDINGS, "ratio_rounding")
        check_choice(self.recent_rule, RECENT_RULES, "recent_rule")
        check_choice(self.timing, TIMINGS, "timing")
        check_choice(self.execution, EXECUTIONS, "execution")
        check_choice(self.score_normalization, NORMALIZATIONS, "score_normalization")
        check_choice(self.gqa, GQA_MODES, "gqa")
        check_bool(self.leaving_token_competes, "leaving_token_competes")
        check_bool(self.decode_eviction, "decode_eviction")
        core.check_positive_int(self.score_bits, "score_bits")
        if self.execution == "mask_sim" and self.gqa != "per_query_head":
            raise ValueError("execution='mask_sim' is the MHA reference code: it needs gqa='per_query_head'")
        if self.heavy is not None and self.recent is not None and self.heavy + self.recent == 0:
            raise ValueError("heavy + recent must be >= 1 (a step must attend to something)")

    def budgets(self, prompt_len: int) -> tuple[int, int]:
        """``(heavy, recent)`` for a prompt of ``prompt_len`` tokens (frozen for the whole decode)."""
        if self.compression_ratio is not None:
            return kept_after_compression(prompt_len, self.compression_ratio, self.ratio_rounding), 0
        heavy = self.heavy if self.heavy is not None else kept_from_ratio(prompt_len, self.heavy_ratio,
                                                                          self.ratio_rounding)
        if self.recent is not None:
            recent = self.recent
        elif self.recent_rule == "heavy_minus_one":
            recent = max(heavy - 1, 0)
        else:
            recent = kept_from_ratio(prompt_len, self.recent_ratio, self.ratio_rounding)
        if heavy + recent == 0:
            raise ValueError(f"heavy + recent is 0 for a prompt of {prompt_len} tokens: raise the ratios")
        return heavy, recent

    def unit_rows(self, probs: np.ndarray, h_kv: int) -> np.ndarray:
        """Per-query-head attention rows as the rows of this method's units."""
        return probs if self.gqa == "per_query_head" else reduce_group(probs, h_kv, self.gqa)

    # --- prefill --------------------------------------------------------------------------------
    def prefill(self, q_prompt, k_prompt, v_prompt, *, scale: float | None = None) -> H2OState:
        q_prompt, k_prompt, v_prompt = check_prompt(q_prompt, k_prompt, v_prompt, min_len=1)
        t, h_kv = k_prompt.shape[:2]
        scale = prefill_scale(scale, q_prompt.shape[2])
        probs = causal_probs(q_prompt, k_prompt, np.arange(t), scale=scale)          # [H_q, t, t]
        scores = probs.sum(axis=1)
        if self.score_normalization == "visible_queries":
            scores = scores / np.arange(t, 0, -1)
        scores = self.unit_rows(scores, h_kv)
        heavy, recent = self.budgets(t)
        kept = np.ones(scores.shape, dtype=bool)
        state = H2OState(new_history(k_prompt, v_prompt), t, t, kept, scores, heavy, recent, scale=scale)
        if self.execution == "mask_sim":
            return replace(state, **self.sim_next_mask(scores, heavy, recent))
        return replace(state, kept=evict(kept, scores, t, heavy, recent))

    # --- decode ---------------------------------------------------------------------------------
    def decode(self, state: H2OState, q, k_new, v_new, *, scale: float | None = None,
               layout: Layout = Layout()) -> tuple[H2OState, StepResult]:
        q, k_new, v_new = check_new_token(state, H2OState, q, k_new, v_new)
        scale = decode_scale(state.scale, scale)
        state = append_token(state, k_new, v_new)
        state = replace(state, scores=np.concatenate([state.scores, np.zeros((state.scores.shape[0], 1))], axis=1))
        if self.execution == "mask_sim":
            return self.decode_mask_sim(state, q, layout, scale)
        h_kv, n, d = state.keys().shape
        evicting = self.decode_eviction
        if evicting and self.timing == "before_attention":
            state = replace(state, kept=evict(state.kept, state.scores, n, state.heavy, state.recent,
                                              protect_leaving=not self.leaving_token_competes))
        out, probs = attend_kept(q, state.keys(), state.values(), state.kept, with_probs=True, scale=scale)
        state = replace(state, scores=state.scores + self.unit_rows(probs, h_kv))
        selection = selection_of(state.kept, q.shape[0])
        read_scores = int(state.kept.sum()) if evicting else 0     # no decode eviction: scores are never read
        traffic = kv_traffic(selection, h_kv, d, layout) + self.score_traffic(read_scores, layout)
        if evicting and self.timing == "after_attention":
            state = replace(state, kept=evict(state.kept, state.scores, n, state.heavy, state.recent,
                                              protect_leaving=not self.leaving_token_competes))
        return state, StepResult(selection, out, traffic)

    def score_traffic(self, entries: int, layout: Layout) -> Traffic:
        return Traffic({("hbm", "auxiliary"): entries * self.score_bits // 8}, layout)

    # --- the masking simulation of h2o_hf/utils_hh ------------------------------------------------
    @staticmethod
    def sim_next_mask(scores: np.ndarray, heavy: int, recent: int) -> dict:
        """The next step's mask and the zeroed scores, literally as ``LlamaAttention_heavy_hitter``."""
        h, n = scores.shape
        mask = np.ones((h, n + 1), dtype=bool)
        if n > heavy + recent:
            if recent:
                mask[:, :-recent] = False
                selected = scores[:, :-recent]
            else:
                mask[:, :] = False
                selected = scores
            if heavy:
                top = core.topk_indices(selected, heavy)
                np.put_along_axis(mask, top, True, axis=1)
        score_mask = mask[:, :-1].copy()
        score_mask[:, -recent:] = True     # recent = 0: `x[:, -0:]` is every column (reproduced)
        return {"next_mask": mask, "scores": scores * score_mask}

    def decode_mask_sim(self, state: H2OState, q, layout: Layout,
                        scale: float | None = None) -> tuple[H2OState, StepResult]:
        h_kv, n, d = state.keys().shape
        visible = state.next_mask
        out, probs = attend_kept(q, state.keys(), state.values(), visible, with_probs=True, scale=scale)
        scores = state.scores + probs
        selection = selection_of(visible, q.shape[0])
        traffic = kv_traffic(selection, h_kv, d, layout) + self.score_traffic(scores.shape[0] * n, layout)
        state = replace(state, kept=visible, **self.sim_next_mask(scores, state.heavy, state.recent))
        return state, StepResult(selection, out, traffic)

    def select(self, q, k, v, *, positions=None):
        raise NotImplementedError("H2O is stateful: use prefill() then decode(), or run_decode()")

    @classmethod
    def presets(cls) -> dict[str, "H2O"]:
        return {
            "canonical": cls(),
            # h2o_hf/utils_real_drop (H2OKVCache_LayerWise): evict after every forward, recent includes
            # the current token; run_summarization.py: --hh_size 1024 --recent_size 1024
            "h2o-real-drop": cls(heavy=1024, recent=1024, timing="after_attention"),
            # h2o_hf/utils_hh (paper tables): masking simulation, int(0.1 P) + int(0.1 P), gap token
            "h2o-mask-sim": cls(execution="mask_sim", ratio_rounding="float"),
            # h2o_flexgen: hh_k = int(P * hh_ratio) heavy + hh_k - 1 recent + the new token; only the
            # heavy set competes (argmin over acc[:src_s - hh_k]); ratio 0.1 here
            "h2o-flexgen": cls(ratio_rounding="float", recent_rule="heavy_minus_one", timing="after_attention",
                               leaving_token_competes=False),
            # kvpress ObservedAttentionPress (H2O-like, prefill only): compression 0.5 here
            "kvpress-observed-attention": cls(compression_ratio=0.5, ratio_rounding="float",
                                              decode_eviction=False, score_normalization="visible_queries",
                                              gqa="mean"),
        }
