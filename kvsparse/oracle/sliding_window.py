"""Sliding window: each query attends to the last ``window`` tokens. The base pattern of every
static and eviction method (StreamingLLM with S = 0, H2O with hh = 0), so this module also holds the
small helpers the eviction oracles share (public, documented here once):

* ``KVHistory`` / ``CacheState``: the K/V of every token seen (original positions ``0..n-1``) and,
  per *unit* (a query head or a KV head), a boolean row of which tokens the unit still keeps.
  Eviction oracles keep every row and mask the evicted ones: attention over the kept set of an
  original-position cache is exactly attention over a compacted cache (attention is a set function),
  and the Selection indexes original positions as the spine requires.
* ``attend_kept``: output (``core.attend_mask``; all-kept rows give ``core.attend_dense`` bit for bit)
  and, where a method accumulates them, the attention probabilities (``core.softmax``).
* ``causal_probs``: rows of the causal softmax of a prompt, chunked (prefill scoring).
* ``reduce_group``: GQA reduction of per-query-head scores to per-KV-head scores (mean|max|sum).
* ``kept_from_ratio``: budgets from ratios, exact (``core.budget_from_ratio``) or the reference
  repos' float truncation ``int(n * ratio)`` (reproduced where a preset must match a repo).

Conventions of ``SlidingWindow`` (explicit fields):

* ``window`` tokens; ``recent_includes_current=True`` (canonical): the current token is one of
  them, the step reads ``min(n, window)`` tokens. ``False``: ``window`` earlier tokens plus the
  current one (StreamingLLM's repo: span ``window + 1``).
* Positions: the current token is the one with the largest position (``positions`` default
  ``arange(n)``); a token is in the window iff ``p > p_cur - window`` (``>=`` with the current token
  excluded from the count). Cache slots may be in any order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import ClassVar, Sequence

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .types import Selection

GQA_REDUCTIONS = ("mean", "max", "sum")
GQA_MODES = ("per_query_head",) + GQA_REDUCTIONS
RATIO_ROUNDINGS = ("exact", "float")


# --------------------------------------------------------------------------------------------
# shared helpers of the eviction oracles
# --------------------------------------------------------------------------------------------

def check_choice(value, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_ratio(value, name: str, *, allow_one: bool = True) -> float:
    r = core.exact_ratio(value)
    if not allow_one and r == 1:
        raise ValueError(f"{name} must be < 1, got {value!r}")
    return value


def kept_from_ratio(n: int, ratio, rounding: str = "exact") -> int:
    """``floor(n * ratio)``: exact on rationals, or the reference repos' ``int(n * ratio)`` in floats."""
    check_choice(rounding, RATIO_ROUNDINGS, "rounding")
    core.exact_ratio(ratio)
    if rounding == "float":
        return int(n * float(ratio))
    return core.budget_from_ratio(n, ratio)


def kept_after_compression(n: int, compression_ratio, rounding: str = "exact", *, minimum: int = 1) -> int:
    """Tokens kvpress keeps: ``max(minimum, int(n * (1 - ratio)))`` (``float``) or its exact floor."""
    r = core.exact_ratio(compression_ratio)
    if r == 1:
        raise ValueError(f"compression_ratio must be < 1, got {compression_ratio!r}")
    if check_choice(rounding, RATIO_ROUNDINGS, "rounding") == "float":
        return max(minimum, int(n * (1 - float(compression_ratio))))
    return max(minimum, core.budget_from_ratio(n, 1 - Fraction(r)))


def reduce_group(scores: np.ndarray, h_kv: int, how: str) -> np.ndarray:
    """``[H_q, ...] -> [H_kv, ...]``: mean, max or sum over each KV head's consecutive query heads."""
    check_choice(how, GQA_REDUCTIONS, "how")
    g = core.group_size(scores.shape[0], h_kv)
    grouped = scores.reshape((h_kv, g) + scores.shape[1:])
    return {"mean": np.mean, "max": np.max, "sum": np.sum}[how](grouped, axis=1)


def units_to_query_heads(rows: np.ndarray, h_q: int) -> np.ndarray:
    """Per-unit rows ``[U, ...]`` (U = H_q, or H_kv shared by a group) as per-query-head rows."""
    return rows if rows.shape[0] == h_q else core.expand_kv(rows, h_q)


def causal_probs(q_seq: np.ndarray, k_seq: np.ndarray, rows, *, scale: float | None = None,
                 chunk: int = 256) -> np.ndarray:
    """``[H_q, len(rows), T]``: causal softmax rows (query ``i`` sees keys ``0..i``) of a prompt.

    ``q_seq [T, H_q, d]``, ``k_seq [T, H_kv, d]``; rows are query positions. Computed in chunks of
    query rows with ``core.logits`` (the rows of a chunk are stacked as extra query heads of each
    KV head, so the consecutive GQA grouping is preserved).
    """
    rows = np.asarray(rows, dtype=np.int64)
    t, h_q, d = q_seq.shape
    h_kv = k_seq.shape[1]
    g = core.group_size(h_q, h_kv)
    k = np.ascontiguousarray(k_seq.transpose(1, 0, 2))
    out = np.empty((h_q, rows.size, t))
    for s in range(0, rows.size, chunk):
        r = rows[s:s + chunk]
        c = r.size
        q = q_seq[r].reshape(c, h_kv, g, d).transpose(1, 2, 0, 3).reshape(h_kv * g * c, d)
        lg = core.logits(q, k, scale if scale is not None else core.default_scale(d))
        lg = lg.reshape(h_q, c, t)
        lg = np.where(np.arange(t)[None, None, :] <= r[None, :, None], lg, -np.inf)
        out[:, s:s + c] = core.softmax(lg, axis=-1)
    return out


class KVHistory:
    """Append-only ``[H_kv, capacity, d]`` buffers of K and V at original positions.

    States share one history: a state of ``n`` tokens reads only rows ``< n``, which never change.
    Appending at ``n`` below the filled length (a second decode from an old state) copies first, so
    every state stays valid.
    """

    def __init__(self, k: np.ndarray, v: np.ndarray, capacity: int | None = None):
        h_kv, n, d = k.shape
        cap = max(capacity or 0, n + 64)      # room for some decode steps; doubles when full
        self._k = np.empty((h_kv, cap, d))
        self._v = np.empty((h_kv, cap, d))
        self._k[:, :n], self._v[:, :n] = k, v
        self.filled = n

    def append(self, n: int, k_new: np.ndarray, v_new: np.ndarray) -> "KVHistory":
        hist = self
        if n != self.filled or n == self._k.shape[1]:
            hist = KVHistory(self._k[:, :n], self._v[:, :n], capacity=2 * n + 16)
        hist._k[:, n], hist._v[:, n] = k_new, v_new
        hist.filled = n + 1
        return hist

    def keys(self, n: int) -> np.ndarray:
        return self._k[:, :n]

    def values(self, n: int) -> np.ndarray:
        return self._v[:, :n]


@dataclass(frozen=True)
class CacheState:
    """What an eviction method carries between steps: every token's K/V and the kept rows.

    ``kept[u, p]`` says whether unit ``u`` (query head, or KV head shared by its group) still holds
    the token at original position ``p`` (``kept.shape = (U, n)``); ``prompt_len`` is the prefill
    length; ``scale`` the softmax scale prefill was run with (keyword-only, so it follows the fields
    subclasses add; ``None`` in a state built by hand: ``1/sqrt(d)``, or whatever decode is given).
    Subclasses add their scores.
    """

    history: KVHistory
    n: int
    prompt_len: int
    kept: np.ndarray
    scale: float | None = field(default=None, kw_only=True)

    @property
    def cache_sizes(self) -> np.ndarray:
        """Tokens each unit holds."""
        return self.kept.sum(axis=1)

    def keys(self) -> np.ndarray:
        return self.history.keys(self.n)

    def values(self) -> np.ndarray:
        return self.history.values(self.n)


def check_new_token(state: CacheState, state_type: type, q, k_new, v_new):
    """Validate one decode step's inputs against a state; returns float64 arrays."""
    if not isinstance(state, state_type):
        raise TypeError(f"state must be a {state_type.__name__} (from prefill), got {type(state).__name__}")
    h_kv, _, d = state.history.keys(0).shape
    q = core.as_float64(q, "q", ndim=2)
    k_new = core.as_float64(k_new, "k_new", ndim=2)
    v_new = core.as_float64(v_new, "v_new", ndim=2)
    if k_new.shape != (h_kv, d) or v_new.shape != (h_kv, d):
        raise ValueError(f"k_new and v_new must have shape (H_kv, d) = {(h_kv, d)}, got {k_new.shape}, {v_new.shape}")
    if q.shape[1] != d or q.shape[0] % h_kv:
        raise ValueError(f"q must have shape (H_q, {d}) with H_q a multiple of H_kv={h_kv}, got {q.shape}")
    return q, k_new, v_new


def append_token(state: CacheState, k_new, v_new, *, keep_new: bool = True) -> CacheState:
    """The state with token ``n`` appended (kept by every unit unless ``keep_new`` is False)."""
    hist = state.history.append(state.n, k_new, v_new)
    col = np.full((state.kept.shape[0], 1), keep_new)
    return replace(state, history=hist, n=state.n + 1, kept=np.concatenate([state.kept, col], axis=1))


def selection_of(kept: np.ndarray, h_q: int) -> Selection:
    """The Selection (original positions) of per-unit kept rows."""
    rows = units_to_query_heads(kept, h_q)
    return Selection(tuple(np.flatnonzero(r) for r in rows), rows.shape[1])


def attend_kept(q: np.ndarray, k: np.ndarray, v: np.ndarray, kept: np.ndarray, *,
                with_probs: bool = False, scale: float | None = None):
    """Attention of each query head over its unit's kept tokens: ``(output, probs or None)``.

    ``kept [U, n]`` (U = H_q, or H_kv shared by the group). ``probs [H_q, n]`` is the softmax over the
    kept set (0 elsewhere), the row every score-accumulating method adds up. Everything kept:
    ``core.attend_dense`` (dense attention bit for bit). Otherwise, without probabilities: small kept
    sets are gathered once per unit (a group sharing one set gathers it once) and attended with
    ``core.attend_dense``, large ones go through ``core.attend_mask`` (no gather); with probabilities:
    one ``core.logits``/``core.softmax`` pass and a matrix product with V. All are exact attention over
    the set; they differ only in rounding.
    """
    h_q, n = q.shape[0], k.shape[1]
    h_kv = k.shape[0]
    g = core.group_size(h_q, h_kv)
    if kept.shape[0] == h_q and g > 1:
        grouped = kept.reshape(h_kv, g, n)
        if (grouped == grouped[:, :1]).all():            # one set per group: gather it once
            kept = grouped[:, 0]
    if kept.all():                                     # dense attention, bit for bit
        out = core.attend_dense(q, k, v, scale=scale)
        return out, (core.softmax(core.logits(q, k, scale), axis=-1) if with_probs else None)
    if not with_probs and kept.sum() * 2 > kept.size:
        return core.attend_mask(q, k, v, units_to_query_heads(kept, h_q), scale=scale), None
    if with_probs:
        # one pass: the probabilities (core.logits + core.softmax over the kept set), then the
        # probability-weighted sum of the value rows (a matrix product per KV head)
        mask = units_to_query_heads(kept, h_q)
        probs = core.softmax(np.where(mask, core.logits(q, k, scale), -np.inf), axis=-1)
        # einsum, as core does: np.matmul's threaded BLAS is ~70x slower on a shared 2-core machine
        out = np.einsum("hgn,hnd->hgd", probs.reshape(h_kv, g, n), v).reshape(h_q, q.shape[1])
        return out, probs
    per_query_head = kept.shape[0] == h_q
    out = np.zeros((h_q, q.shape[1]))
    for u in range(kept.shape[0]):
        heads = slice(u, u + 1) if per_query_head else slice(u * g, (u + 1) * g)
        j = u // g if per_query_head else u
        rows = np.flatnonzero(kept[u])
        if rows.size:                                  # an empty set attends to nothing: output 0
            out[heads] = core.attend_dense(q[heads], k[j:j + 1, rows], v[j:j + 1, rows], scale=scale)
    return out, None


def check_prompt(q_prompt, k_prompt, v_prompt, *, min_len: int = 0):
    from .method import check_sequence
    q_prompt, k_prompt, v_prompt = check_sequence(q_prompt, k_prompt, v_prompt)
    if q_prompt.shape[0] < min_len:
        raise ValueError(f"the prompt must have at least {min_len} tokens, got {q_prompt.shape[0]}")
    return q_prompt, k_prompt, v_prompt


def new_history(k_prompt: np.ndarray, v_prompt: np.ndarray) -> KVHistory:
    return KVHistory(np.ascontiguousarray(k_prompt.transpose(1, 0, 2)),
                     np.ascontiguousarray(v_prompt.transpose(1, 0, 2)))


def stateless_positions(positions, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------

def window_mask(positions: np.ndarray, window: int, recent_includes_current: bool = True) -> np.ndarray:
    """``[n]`` bool: tokens within ``window`` of the current (largest) position."""
    if positions.size == 0:
        return np.zeros(0, dtype=bool)
    cur = positions.max()
    span = window if recent_includes_current else window + 1
    return positions > cur - span


@dataclass(frozen=True)
class StaticPattern(Method):
    """Base of the positional patterns: attention over the selected set (``attend_kept``: dense bit for
    bit when the selection is full)."""

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        return attend_kept(q, k, v, selection.mask(), scale=scale)[0]


@register_method
@dataclass(frozen=True)
class SlidingWindow(StaticPattern):
    name: ClassVar[str] = "sliding_window"
    family: ClassVar[str] = "static"
    summary: ClassVar[str] = "the last `window` tokens (current token included)"

    window: int = 1024
    recent_includes_current: bool = True

    def __post_init__(self):
        check_bool(self.recent_includes_current, "recent_includes_current")
        core.check_positive_int(self.window, "window", allow_zero=not self.recent_includes_current)

    def select(self, q, k, v, *, positions=None) -> Selection:
        pos = stateless_positions(positions, k.shape[1])
        keep = np.flatnonzero(window_mask(pos, self.window, self.recent_includes_current))
        return Selection(tuple(keep for _ in range(q.shape[0])), k.shape[1])

    @classmethod
    def presets(cls) -> dict[str, "SlidingWindow"]:
        return {
            "canonical": cls(),
            # the span StreamingLLM's repo gives its recent part: `window` earlier tokens + the current
            "window-plus-current": cls(recent_includes_current=False),
        }
