"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks + a rolling window of recent tokens.

Each step attends to the first ``sinks`` tokens and the most recent ones; nothing is scored.
Conventions (explicit fields of ``StreamingLLM``):

* ``recent_includes_current=True`` (canonical): the ``recent`` tokens include the current one, so a
  step over ``n`` tokens reads ``min(n, sinks + recent)`` tokens. ``False`` reproduces
  ``mit-han-lab/streaming-llm`` (``StartRecentKVCache`` evicts to ``S + R`` *after* each forward, so
  the next query reads ``S + R`` cached tokens plus itself: ``min(n, S + R + 1)``).
* ``schedule="every_step"`` (canonical, repo): the rule is re-applied at every step (rolling).
  ``"prefill_once"`` (kvpress ``StreamingLLMPress``): the prompt is cut once to ``n_kept =
  max(1, int(T (1 - compression_ratio)))`` tokens (sinks + the last ``n_kept - sinks``), then the
  cache grows by one token per step. kvpress's score is 1 on kept tokens and 0 elsewhere, kept by a
  top-k; ties (a budget below ``sinks``) follow the core rule (lower index wins).
* ``rope``: ``"as_given"`` (canonical) uses q and keys as given (post-RoPE at original positions, or
  no RoPE). ``"original"`` rotates pre-RoPE inputs at their original positions. ``"cache_index"``
  (the repo's pos-shift, and kvpress ``KeyRerotationPress``) gives each kept token its *slot* in the
  compacted cache: kept positions ``p_0 < ... < p_{m-1} = t`` are rotated to ``0..m-1`` and the query
  to ``m-1``. The repo caches pre-RoPE keys (``inputs_rotated=False``: ``core.rope_apply`` at the
  slots); post-RoPE inputs (``inputs_rotated=True``) are moved with ``core.rope_rerotate``.
* Selections index original positions; the kept set is the same for every head.

State: ``CacheState`` (the kept rows are per KV head; no scores). Traffic: the kept K/V rows
(``kv_traffic``); the re-rotation of ``cache_index`` reads the same rows and is not counted twice.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import StatefulMethod, decode_scale, prefill_scale
from .sliding_window import (CacheState, RATIO_ROUNDINGS, append_token, attend_kept, check_bool, check_choice,
                             check_new_token, check_prompt, kept_after_compression, new_history, selection_of,
                             stateless_positions)
from .types import Layout, Selection, StepResult, kv_traffic

SCHEDULES = ("every_step", "prefill_once")
ROPE_MODES = ("as_given", "original", "cache_index")


def sink_recent_mask(positions: np.ndarray, sinks: int, recent_span: int) -> np.ndarray:
    """``[n]`` bool: the ``sinks`` earliest positions and those within ``recent_span`` of the latest."""
    if positions.size == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(positions, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(positions.size)
    return (rank < sinks) | (positions > positions.max() - recent_span)


@register_method
@dataclass(frozen=True)
class StreamingLLM(StatefulMethod):
    name: ClassVar[str] = "streaming_llm"
    family: ClassVar[str] = "static"
    summary: ClassVar[str] = "S attention-sink tokens + the last R tokens (rolling)"

    sinks: int = 4
    recent: int = 2000
    recent_includes_current: bool = True
    schedule: str = "every_step"
    compression_ratio: float | None = None
    ratio_rounding: str = "exact"
    rope: str = "as_given"
    inputs_rotated: bool = False
    rope_base: float = 10000.0
    rope_layout: str = "half"

    def __post_init__(self):
        core.check_positive_int(self.sinks, "sinks", allow_zero=True)
        core.check_positive_int(self.recent, "recent", allow_zero=True)
        check_bool(self.recent_includes_current, "recent_includes_current")
        check_bool(self.inputs_rotated, "inputs_rotated")
        check_choice(self.schedule, SCHEDULES, "schedule")
        check_choice(self.rope, ROPE_MODES, "rope")
        check_choice(self.ratio_rounding, RATIO_ROUNDINGS, "ratio_rounding")
        check_choice(self.rope_layout, ("half", "interleaved"), "rope_layout")
        if self.schedule == "prefill_once":
            if self.compression_ratio is None:
                raise ValueError("schedule='prefill_once' needs compression_ratio (kvpress's budget)")
            kept_after_compression(1, self.compression_ratio)   # validates 0 <= ratio < 1
        elif self.sinks + self.recent_span == 0:
            raise ValueError("sinks + recent must be >= 1 (a step must attend to something)")

    @property
    def recent_span(self) -> int:
        """Recent tokens a step attends to, the current one included."""
        return self.recent if self.recent_includes_current else self.recent + 1

    # --- stateless view: the rolling rule is positional -------------------------------------
    def select(self, q, k, v, *, positions=None) -> Selection:
        if self.schedule != "every_step":
            raise NotImplementedError("prefill_once depends on the prompt length: use prefill()/decode()")
        pos = stateless_positions(positions, k.shape[1])
        keep = np.flatnonzero(sink_recent_mask(pos, self.sinks, self.recent_span))
        return Selection(tuple(keep for _ in range(q.shape[0])), k.shape[1])

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        if self.rope != "as_given":
            raise NotImplementedError("a RoPE mode needs the original positions: use prefill()/decode()")
        return attend_kept(q, k, v, selection.mask(), scale=scale)[0]

    # --- stateful -----------------------------------------------------------------------------
    def prefill(self, q_prompt, k_prompt, v_prompt, *, scale: float | None = None) -> CacheState:
        """The kept rows after the prompt; nothing is scored, ``scale`` is only stored for decode."""
        q_prompt, k_prompt, v_prompt = check_prompt(q_prompt, k_prompt, v_prompt)
        t, h_kv = k_prompt.shape[:2]
        scale = prefill_scale(scale, q_prompt.shape[2])
        pos = np.arange(t)
        if self.schedule == "prefill_once":
            if t <= self.sinks:
                raise ValueError(f"kvpress needs more prompt tokens than sinks={self.sinks}, got {t}")
            n_kept = kept_after_compression(t, self.compression_ratio, self.ratio_rounding)
            # kvpress prunes t - floor(t (1 - ratio)) middle tokens but keeps max(1, ...) by top-k
            n_pruned = t - kept_after_compression(t, self.compression_ratio, self.ratio_rounding, minimum=0)
            score = np.ones(t)
            score[self.sinks:self.sinks + n_pruned] = 0.0
            keep = np.zeros(t, dtype=bool)
            keep[core.topk_indices(score, n_kept)] = True
        else:
            keep = sink_recent_mask(pos, self.sinks, self.recent_span)
        return CacheState(new_history(k_prompt, v_prompt), t, t, np.tile(keep, (h_kv, 1)), scale=scale)

    def decode(self, state: CacheState, q, k_new, v_new, *, scale: float | None = None,
               layout: Layout = Layout()) -> tuple[CacheState, StepResult]:
        q, k_new, v_new = check_new_token(state, CacheState, q, k_new, v_new)
        scale = decode_scale(state.scale, scale)
        state = append_token(state, k_new, v_new)
        if self.schedule == "every_step":
            rule = sink_recent_mask(np.arange(state.n), self.sinks, self.recent_span)
            state = replace(state, kept=state.kept & rule[None, :])
        selection = selection_of(state.kept, q.shape[0])
        if self.rope == "as_given":
            out, _ = attend_kept(q, state.keys(), state.values(), state.kept, scale=scale)
        else:
            out = self.attend_rotated(q, state, scale=scale)
        h_kv, _, d = state.keys().shape
        return state, StepResult(selection, out, kv_traffic(selection, h_kv, d, layout))

    def attend_rotated(self, q: np.ndarray, state: CacheState, *, scale: float | None = None) -> np.ndarray:
        """Attention with keys and query rotated at original positions or at cache slots (softmax ``scale``)."""
        pos = np.flatnonzero(state.kept[0])          # positional rule: every KV head keeps the same
        k = state.keys()[:, pos]
        v = state.values()[:, pos]
        t = state.n - 1
        new_k_pos = pos if self.rope == "original" else np.arange(pos.size)
        new_q_pos = t if self.rope == "original" else pos.size - 1
        rope = dict(base=self.rope_base, layout=self.rope_layout)
        if self.inputs_rotated:
            k = core.rope_rerotate(k, pos, new_k_pos, **rope)
            q = core.rope_rerotate(q[:, None, :], [t], [new_q_pos], **rope)[:, 0]
        else:
            k = core.rope_apply(k, new_k_pos, **rope)
            q = core.rope_apply(q[:, None, :], [new_q_pos], **rope)[:, 0]
        return core.attend_dense(q, k, v, scale=scale)

    @classmethod
    def presets(cls) -> dict[str, "StreamingLLM"]:
        return {
            "canonical": cls(),
            # mit-han-lab/streaming-llm run_streaming_llama.py: start 4, recent 2000; evicts after each
            # forward (span S + R + 1); pre-RoPE cache re-rotated to cache slots (pos-shift)
            "streaming-llm-repo": cls(recent_includes_current=False, rope="cache_index"),
            # kvpress StreamingLLMPress: once at prefill, n_sink=4, original positions, float budget
            "kvpress": cls(schedule="prefill_once", compression_ratio=0.5, ratio_rounding="float"),
            # kvpress KeyRerotationPress(StreamingLLMPress()): kept keys moved to slots 0..n_kept-1
            "kvpress-key-rerotation": cls(schedule="prefill_once", compression_ratio=0.5, ratio_rounding="float",
                                          rope="cache_index", inputs_rotated=True),
        }
