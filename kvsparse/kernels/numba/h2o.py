"""H2O in Numba: accumulated-attention scores, eviction to ``heavy + recent``, attention over the kept rows.

Prefill: every token's score is the column sum of the prompt's causal softmax (``snapkv.window_vote``
with the window = the whole prompt; ``score_normalization="visible_queries"`` divides by the number of
queries that see the key), reduced over the GQA group when ``gqa`` is ``mean|max|sum``. Decode: append
(score 0), evict (``timing``), attend the kept rows with ``attention.kept_attention`` on the state's
capacity buffers (no copy of the cache; it also returns this step's probabilities), add them to the
scores. Eviction over ``[U, n]`` booleans: the ``recent`` latest positions are protected (plus the
token leaving the window when ``leaving_token_competes=False``); the rest compete for the heavy slots
(core tie rule: higher score, then lower position), chosen per unit by a linear-time selection
(``_select.topk_set``) with the result of a stable sort (``evict_reference``). Scores are kept in the
kernel's dtype (``score_bits=32`` for float32). Softmax scale: the prefill vote and every decode step
use the ``scale`` given to ``prefill`` (``None``: ``1/sqrt(d)``), stored in the state; ``decode``'s
``scale`` must be None or equal to it (the oracle's rule).

Supported: ``execution="drop"`` with every other convention of ``kvsparse.oracle.h2o.H2O`` (budgets and
ratios frozen at prefill, ``timing``, ``leaving_token_competes``, ``decode_eviction``,
``score_normalization``, ``gqa``). ``execution="mask_sim"`` (the paper's masking simulation, not a
kernel path) raises ``ValueError``.
"""
from __future__ import annotations

import numba
import numpy as np

from ...oracle.method import decode_scale, prefill_scale
from ...oracle.sliding_window import reduce_group
from ...registry import register_kernel
from ._select import topk_set
from .attention import kept_attention
from .snapkv import EvictionState, append, check_prompt_arrays, new_state, unit_rows_per_query_head, window_vote


def _check_supported(method):
    if method.execution != "drop":
        raise ValueError(f"the Numba H2O kernel supports execution='drop' only, got {method.execution!r}")


def evict_reference(kept: np.ndarray, scores: np.ndarray, heavy: int, recent: int, protect_leaving: bool) -> np.ndarray:
    """Kept rows after one eviction round (the oracle's ``h2o.evict``, vectorised over units): a stable
    sort per unit, O(U n log n). ``evict`` computes the same by selection; this is its fallback for
    scores it cannot rank identically (NaN or -inf among the candidates)."""
    n = kept.shape[1]
    pos = np.arange(n)
    protected = pos >= n - recent
    if protect_leaving:
        protected = protected | (pos == n - recent - 1)
    slots = heavy - (kept & protected & (pos < n - recent)).sum(axis=1)          # [U]
    cand = kept & ~protected
    # rank candidates: higher score first, lower position on ties; non-candidates last
    key = np.where(cand, scores, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[None, :].repeat(kept.shape[0], 0), axis=1)
    return (kept & protected) | (cand & (rank < slots[:, None]))


@numba.njit(cache=True, parallel=True)
def _evict_rows(kept, scores, heavy, recent, protect_leaving, out):
    """``evict_reference`` per unit (``prange``), on the unit's kept positions only (compacted in
    ascending order; a decode keeps heavy + recent of n). The first ``slots`` of the stable descending
    sort of ``key`` (score for a candidate, -inf for a protected row) are ``topk_set(key, slots)``
    (the same tie rule: higher value, then lower position), found by selection instead of a sort.
    Dropping the unkept positions (key -inf in the reference) changes no candidate's rank unless a
    candidate's score is itself -inf or NaN (NaN also orders differently: argsort puts it last);
    such a unit is flagged in the returned ``[U]`` bools and the caller redoes the call with
    ``evict_reference``."""
    units, n = kept.shape
    bad = np.zeros(units, np.bool_)
    for u in numba.prange(units):
        pos = np.empty(n + 1, np.int64)      # branch-free compaction, one spare slot
        m = 0
        for p in range(n):
            pos[m] = p
            m += kept[u, p]
        key = np.empty(m, scores.dtype)
        cand = np.empty(m, np.bool_)
        for p in range(n):
            out[u, p] = False
        leaving = 0
        for b in range(m):
            p = pos[b]
            prot = p >= n - recent or (protect_leaving and p == n - recent - 1)
            if prot and p < n - recent:
                leaving += 1
            cand[b] = not prot
            key[b] = scores[u, p] if cand[b] else -np.inf
            if cand[b] and not key[b] > -np.inf:
                bad[u] = True
            if prot:
                out[u, p] = True
        slots = heavy - leaving
        if slots > 0 and not bad[u]:
            for b in topk_set(key, slots):
                if cand[b]:
                    out[u, pos[b]] = True
    return bad


def evict(kept: np.ndarray, scores: np.ndarray, heavy: int, recent: int, protect_leaving: bool) -> np.ndarray:
    """Kept rows after one eviction round (the oracle's ``h2o.evict``, vectorised over units): the
    ``recent`` latest positions are protected (and the one leaving the window if ``protect_leaving``);
    the other kept rows compete for ``heavy`` slots (less any protected leaving token) by score,
    higher first, lower position on ties. Same result as ``evict_reference``, in O(U n)."""
    kept = np.ascontiguousarray(kept, dtype=np.bool_)
    scores = np.ascontiguousarray(scores)
    if scores.dtype not in (np.float32, np.float64) or scores.shape != kept.shape:
        return evict_reference(kept, scores, heavy, recent, protect_leaving)
    out = np.empty(kept.shape, np.bool_)
    if _evict_rows(kept, scores, int(heavy), int(recent), bool(protect_leaving), out).any():
        return evict_reference(kept, scores, heavy, recent, protect_leaving)
    return out


class H2OKernel:
    """Kernel-step contract, stateful form: ``prefill`` then ``decode`` per token."""

    evict = staticmethod(evict)

    def prefill(self, method, q_prompt, k_prompt, v_prompt, *, scale=None) -> EvictionState:
        _check_supported(method)
        q_prompt, k_prompt, v_prompt = check_prompt_arrays(q_prompt, k_prompt, v_prompt)
        t, h_kv = k_prompt.shape[:2]
        scale = prefill_scale(scale, q_prompt.shape[2])
        scores = window_vote(q_prompt, k_prompt, t, scale=scale)
        if method.score_normalization == "visible_queries":
            scores = scores / np.arange(t, 0, -1).astype(scores.dtype)
        if method.gqa != "per_query_head":
            scores = reduce_group(scores, h_kv, method.gqa).astype(q_prompt.dtype)
        heavy, recent = method.budgets(t)
        kept = self.evict(np.ones(scores.shape, bool), scores, heavy, recent, False)
        return new_state(k_prompt, v_prompt, kept, scores=scores, heavy=heavy, recent=recent, scale=scale)

    def decode(self, method, state: EvictionState, q, k_new, v_new, *, scale=None):
        _check_supported(method)
        scale = decode_scale(state.scale, scale)
        state = append(state, k_new, v_new)
        protect = not method.leaving_token_competes
        if method.decode_eviction and method.timing == "before_attention":
            state.kept = self.evict(state.kept, state.scores, state.heavy, state.recent, protect)
        h_q, h_kv = q.shape[0], state.k.shape[0]
        # the capacity buffers as they are (k[:, :n] made contiguous would copy the whole cache)
        out, _, probs = kept_attention(q, state.k, state.v, state.n, state.kept, scale=scale, with_probs=True)
        if method.gqa != "per_query_head":
            probs = reduce_group(probs, h_kv, method.gqa).astype(probs.dtype)
        state.scores = state.scores + probs
        rows = unit_rows_per_query_head(state.kept, h_q)
        if method.decode_eviction and method.timing == "after_attention":
            state.kept = self.evict(state.kept, state.scores, state.heavy, state.recent, protect)
        return state, (out, rows)

    def __call__(self, method, q, k, v, *, positions=None, scale=None):
        raise TypeError("the H2O kernel is stateful: call h2o.prefill(...) then h2o.decode(...)")


h2o = register_kernel("h2o", "numba")(H2OKernel())
