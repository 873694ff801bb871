"""H2O in Numba: accumulated-attention scores, eviction to ``heavy + recent``, attention over the kept rows.

Prefill: every token's score is the column sum of the prompt's causal softmax (``snapkv.window_vote``
with the window = the whole prompt; ``score_normalization="visible_queries"`` divides by the number of
queries that see the key), reduced over the GQA group when ``gqa`` is ``mean|max|sum``. Decode: append
(score 0), evict (``timing``), attend the kept rows with ``snapkv.masked_attention`` (which also
returns this step's probabilities), add them to the scores. Eviction is NumPy over ``[U, n]``
booleans: the ``recent`` latest positions are protected (plus the token leaving the window when
``leaving_token_competes=False``); the rest compete for the heavy slots by a stable sort (core tie
rule). Scores are kept in the kernel's dtype (``score_bits=32`` for float32). Softmax scale: the
prefill vote and every decode step use the ``scale`` given to ``prefill`` (``None``: ``1/sqrt(d)``),
stored in the state; ``decode``'s ``scale`` must be None or equal to it (the oracle's rule).

Supported: ``execution="drop"`` with every other convention of ``kvsparse.oracle.h2o.H2O`` (budgets and
ratios frozen at prefill, ``timing``, ``leaving_token_competes``, ``decode_eviction``,
``score_normalization``, ``gqa``). ``execution="mask_sim"`` (the paper's masking simulation, not a
kernel path) raises ``ValueError``.
"""
from __future__ import annotations

import numpy as np

from ...oracle.method import decode_scale, prefill_scale
from ...oracle.sliding_window import reduce_group
from ...registry import register_kernel
from .snapkv import EvictionState, append, check_prompt_arrays, masked_attention, new_state, rows_per_query_head, window_vote


def _check_supported(method):
    if method.execution != "drop":
        raise ValueError(f"the Numba H2O kernel supports execution='drop' only, got {method.execution!r}")


def evict(kept: np.ndarray, scores: np.ndarray, heavy: int, recent: int, protect_leaving: bool) -> np.ndarray:
    """Kept rows after one eviction round (the oracle's ``h2o.evict``, vectorised over units)."""
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
        mask = rows_per_query_head(state.kept, h_q)
        out, probs = masked_attention(q, state.k[:, : state.n], state.v[:, : state.n], mask, scale=scale)
        if method.gqa != "per_query_head":
            probs = reduce_group(probs, h_kv, method.gqa).astype(probs.dtype)
        state.scores = state.scores + probs
        rows = [np.flatnonzero(r) for r in mask]
        if method.decode_eviction and method.timing == "after_attention":
            state.kept = self.evict(state.kept, state.scores, state.heavy, state.recent, protect)
        return state, (out, rows)

    def __call__(self, method, q, k, v, *, positions=None, scale=None):
        raise TypeError("the H2O kernel is stateful: call h2o.prefill(...) then h2o.decode(...)")


h2o = register_kernel("h2o", "numba")(H2OKernel())
