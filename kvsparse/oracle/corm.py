"""CORM (Dai et al., arXiv 2404.15949, "Cache Optimization with Recent Message"): evict a key once
every one of the last ``window`` queries gave it below-average attention.

No official code exists and the paper's method section was not available to us (only its abstract:
adjacent queries are similar, and the current query's attention can rely on the attention
information of a small set of recent queries; the eviction policy needs no fine-tuning and is
compatible with GQA). The rule below is OUR DEFINITION; every point marked [assumption] is a
parameter so that it can be changed once the paper is checked:

* Key ``p`` is *important* for a query that attended ``m`` keys iff its probability is
  ``>= threshold / m`` [assumption: ``threshold = 1``, i.e. at least the uniform share].
* State per unit: ``last_important[u, p]``, the last query position for which ``p`` was important;
  a key counts as important at its own step (``last_important[p] = p`` when it is appended) so a key
  is never judged by fewer than ``window`` queries.
* After the attention of step ``t`` (the current query is one of the judges), key ``p`` is evicted iff
  ``t - last_important[p] >= window`` (minor for all of the last ``window`` queries) and it is not
  among the ``recent`` latest positions [assumption: ``recent = window``; the current token is
  always kept].
* Prefill: the causal attention of every prompt query updates ``last_important`` (query ``i``
  attended ``i + 1`` keys), then the rule is applied at ``t = P - 1`` [assumption].
* GQA (``gqa``): ``"union"`` (canonical [assumption]): one cache per KV head, a key is important if
  it is important for any query head of the group; ``"per_query_head"``: one cache per query head.
* Positions / RoPE (a convention, not an [assumption] about the paper): q and the keys are used as
  given, i.e. post-RoPE at their original positions (or no RoPE). Evicting never re-rotates the kept
  keys, the query keeps its true position ``t``, and Selections index original positions.
* The budget is input-dependent (no fixed size); ``alpha``-like knobs are ``threshold`` and ``window``.
  ``threshold = 0`` never evicts (dense attention).

Traffic: the attended K/V rows (``kv_traffic``) plus, tensor ``auxiliary`` in HBM, one
``stamp_bits``-bit ``last_important`` entry per (unit, attended token), read to decide eviction.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import StatefulMethod, decode_scale, prefill_scale
from .sliding_window import (CacheState, append_token, attend_kept, causal_probs, check_choice, check_new_token,
                             check_prompt, new_history, selection_of, units_to_query_heads)
from .types import Layout, StepResult, Traffic, kv_traffic

CORM_GQA = ("union", "per_query_head")


@dataclass(frozen=True)
class CORMState(CacheState):
    """``CacheState`` + ``last_important [U, n]``: the last query position that found each key important."""

    last_important: np.ndarray = None


@register_method
@dataclass(frozen=True)
class CORM(StatefulMethod):
    name: ClassVar[str] = "corm"
    family: ClassVar[str] = "eviction"
    summary: ClassVar[str] = "evict a key once all of the last w queries gave it < threshold/m attention (our definition)"

    window: int = 32
    recent: int | None = None
    threshold: float = 1.0
    gqa: str = "union"
    stamp_bits: int = 32

    def __post_init__(self):
        core.check_positive_int(self.window, "window")
        if self.recent is not None:
            core.check_positive_int(self.recent, "recent", allow_zero=True)
        if isinstance(self.threshold, bool) or not np.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")
        check_choice(self.gqa, CORM_GQA, "gqa")
        core.check_positive_int(self.stamp_bits, "stamp_bits")

    @property
    def recent_span(self) -> int:
        """Latest positions never evicted (the current token always among them)."""
        return max(1, self.window if self.recent is None else self.recent)

    def important(self, probs: np.ndarray, attended: np.ndarray, h_kv: int) -> np.ndarray:
        """``[U, ..., n]`` bool from per-query-head probabilities ``[H_q, ..., n]`` and key counts ``m``."""
        imp = probs >= self.threshold / attended
        if self.gqa == "union":
            imp = imp.reshape((h_kv, -1) + imp.shape[1:]).any(axis=1)
        return imp

    def evict(self, kept: np.ndarray, last_important: np.ndarray, t: int) -> np.ndarray:
        pos = np.arange(kept.shape[1])
        stale = (t - last_important >= self.window) & (pos < t + 1 - self.recent_span)
        return kept & ~stale

    def prefill(self, q_prompt, k_prompt, v_prompt, *, scale: float | None = None) -> CORMState:
        q_prompt, k_prompt, v_prompt = check_prompt(q_prompt, k_prompt, v_prompt, min_len=1)
        t, h_kv = k_prompt.shape[:2]
        h_q = q_prompt.shape[1]
        scale = prefill_scale(scale, q_prompt.shape[2])
        probs = causal_probs(q_prompt, k_prompt, np.arange(t), scale=scale)    # [H_q, t, t]
        causal = np.arange(t)[None, :] <= np.arange(t)[:, None]                # [query, key]
        imp = self.important(probs, np.arange(1, t + 1)[None, :, None], h_kv) & causal   # [U, query, key]
        rows = np.where(imp, np.arange(t)[None, :, None], -1).max(axis=1)       # last important query
        last = np.maximum(rows, np.arange(t)[None, :])
        kept = np.ones(last.shape, dtype=bool)
        return CORMState(new_history(k_prompt, v_prompt), t, t, self.evict(kept, last, t - 1), last, scale=scale)

    def decode(self, state: CORMState, q, k_new, v_new, *, scale: float | None = None,
               layout: Layout = Layout()) -> tuple[CORMState, StepResult]:
        q, k_new, v_new = check_new_token(state, CORMState, q, k_new, v_new)
        scale = decode_scale(state.scale, scale)
        t = state.n
        state = append_token(state, k_new, v_new)
        last = np.concatenate([state.last_important, np.full((state.kept.shape[0], 1), t)], axis=1)
        h_kv, n, d = state.keys().shape
        out, probs = attend_kept(q, state.keys(), state.values(), state.kept, with_probs=True, scale=scale)
        attended = units_to_query_heads(state.kept, q.shape[0]).sum(axis=1)[:, None]
        imp = self.important(probs, attended, h_kv) & state.kept
        last = np.where(imp, t, last)
        selection = selection_of(state.kept, q.shape[0])
        aux = Traffic({("hbm", "auxiliary"): int(state.kept.sum()) * self.stamp_bits // 8}, layout)
        state = replace(state, kept=self.evict(state.kept, last, t), last_important=last)
        return state, StepResult(selection, out, kv_traffic(selection, h_kv, d, layout) + aux)

    def select(self, q, k, v, *, positions=None):
        raise NotImplementedError("CORM is stateful: use prefill() then decode(), or run_decode()")

    @classmethod
    def presets(cls) -> dict[str, "CORM"]:
        return {
            "canonical": cls(),
            # one cache per query head (no GQA sharing), for comparison with per-head H2O/SnapKV
            "per-query-head": cls(gqa="per_query_head"),
        }
