"""Property suites (``suites.MethodSuite``) of the stateful eviction methods: H2O, SnapKV, PyramidKV.

Each step of a decode is checked against the oracle (``suites.check_decode``): the kernel's kept set
per query head must equal the oracle's, or be a valid top-k of the oracle's per-token scores within a
rounding band (``suites.valid_topk``). The scores of a step (``+inf``: always kept, ``-inf``: can no
longer be kept):

* H2O: the accumulated attention of each unit (query head, or KV head for a GQA-reduced ``gqa``);
  ``+inf`` on the protected recent positions (and the leaving token when ``leaving_token_competes`` is
  False); ``-inf`` on tokens evicted earlier. At the first decode step every prompt token competes
  (evicting at prefill then at ``T + 1`` keeps the top of all of them). With
  ``timing="after_attention"`` a step reads what the previous step's eviction kept: its candidates are
  the previous state's kept rows (remembered from the previous call of the score function); when that
  state was not seen, and with ``decode_eviction=False`` after the first step (nothing changes after
  prefill), the selection must match exactly.
* SnapKV / PyramidKV: the pooled window vote of each prompt token (``SnapKV.unit_scores``, ``+inf`` on
  the window); every decoded token ``+inf``. No compression: everything ``+inf``.

Band (per query head, from the float64 values): a probability ``p = exp(l - lse)`` computed in
``dtype`` has relative error at most ``2 lb + c u`` where ``lb`` bounds the logit's rounding error
(``suites.dot_band``, any summation order) and ``u`` the unit roundoff; a score is a sum (then
pooled / averaged / group-reduced: operations that do not increase a relative bound beyond the
largest term) of such probabilities over at most ``n`` queries, so its error is at most
``smax (2 lb + (m + 8) u) + (m + 8) tiny`` with ``smax`` the unit's largest raw score,
``m = n + w + kernel + G + d`` (H2O: ``n + d + H_q``) and ``tiny`` the dtype's smallest normal number (a
probability that underflows, or is flushed to zero, is off by less than that). ``lb`` is taken at the
softmax scale the oracle state was prefilled with (``state.scale``). ``lb`` needs the queries that
voted, which the oracle state does not hold: the sequences strategy of these suites (and the
trace-drawn sequences of ``suites.suite_inputs``) remembers what it drew (``remember``), and a
sequence the suites never saw is judged with band 0.
"""
from __future__ import annotations

from collections import deque

import numpy as np
from hypothesis import strategies as st

from .. import registry
from ..oracle import core
from ..oracle.sliding_window import reduce_group
from . import tolerances
from .sequences import decode_sequences
from .suites import MethodSuite, dot_band

_SEEN: deque = deque(maxlen=64)


def remember(q_seq, k_seq) -> None:
    """Record a sequence's queries so the band of a later step can bound the logits' rounding."""
    _SEEN.append((np.asarray(q_seq, np.float64), np.asarray(k_seq, np.float64)))


def _queries_of(state, dtype: str):
    """The rounded queries ``[T, H_q, d]`` of the remembered sequence whose keys the state holds, or None."""
    keys = state.keys()                                   # [H_kv, n, d], already rounded to dtype
    for q_seq, k_seq in reversed(_SEEN):
        if k_seq.shape[0] >= state.n and k_seq.shape[1:] == (keys.shape[0], keys.shape[2]) and np.array_equal(
                tolerances.round_to(k_seq[: state.n], dtype).transpose(1, 0, 2), keys):
            return tolerances.round_to(q_seq, dtype)
    return None


@st.composite
def eviction_sequences(draw, **kwargs):
    """``decode_sequences`` as the ``(q_seq, k_seq, v_seq, prefill_len)`` tuple suites take, remembered."""
    seq = draw(decode_sequences(**kwargs))
    remember(seq.q_seq, seq.k_seq)
    return seq.q_seq, seq.k_seq, seq.v_seq, seq.prefill_len


def _to_heads(rows: np.ndarray, h_q: int) -> np.ndarray:
    return rows if rows.shape[0] == h_q else np.repeat(rows, h_q // rows.shape[0], axis=0)


def _logit_band(queries: np.ndarray, keys: np.ndarray, dtype: str, scale: float | None) -> np.ndarray:
    """``[H_q]``: the largest logit rounding bound over the given query rows ``[m, H_q, d]`` at softmax
    ``scale`` (None: ``1/sqrt(d)``)."""
    scale = core.default_scale(queries.shape[2]) if scale is None else scale
    return np.max([dot_band(qi, keys, dtype, scale=scale) for qi in queries], axis=0)


def _band(raw_max: np.ndarray, lb: np.ndarray, terms: int, dtype: str) -> np.ndarray:
    # relative rounding, plus an absolute term per summed probability: one that underflows (or is
    # flushed to zero) in dtype is off by at most the smallest normal number
    tiny = float(np.finfo(tolerances.numpy_dtype(dtype)).tiny)
    return raw_max * (2 * lb + (terms + 8) * tolerances.dtype_eps(dtype)) + (terms + 8) * tiny


def _exact(kept_heads: np.ndarray):
    return np.where(kept_heads, np.inf, -np.inf), np.zeros(kept_heads.shape[0])


# --- h2o ---------------------------------------------------------------------------------------

@st.composite
def _h2o_methods(draw, shapes):
    from ..oracle.h2o import H2O
    common = dict(timing=draw(st.sampled_from(["before_attention", "after_attention"])),
                  leaving_token_competes=draw(st.booleans()),
                  gqa=draw(st.sampled_from(["per_query_head", "mean", "max", "sum"])))
    kind = draw(st.sampled_from(["fixed", "ratio", "kvpress"]))
    if kind == "fixed":
        return H2O(heavy=draw(st.integers(0, 8)), recent=draw(st.integers(1, 8)), **common)
    if kind == "ratio":   # recent fixed >= 1: heavy + recent >= 1 for any prompt
        return H2O(heavy_ratio=draw(st.sampled_from([0.1, 0.3, 0.5])), recent=draw(st.integers(1, 4)),
                   ratio_rounding=draw(st.sampled_from(["exact", "float"])), **common)
    return H2O(compression_ratio=draw(st.sampled_from([0.25, 0.5, 0.8])), ratio_rounding="float",
               decode_eviction=False, score_normalization="visible_queries", gqa="mean")


_PREVIOUS: list = [None, None, None]     # (history, n, kept) of the state the last call saw


def _previous_kept(state):
    """The kept rows of the state one step before ``state`` in the same decode, if the last call saw it
    (check_decode calls the score function once per step, in order; decodes share one history)."""
    history, n, kept = _PREVIOUS
    _PREVIOUS[:] = [state.history, state.n, state.kept]
    return kept if history is state.history and n == state.n - 1 else None


def _eviction_scores(method, state, cand, scores, n):
    """Scores of one eviction at ``n`` tokens over the candidate rows ``cand [U, n]`` (module doc)."""
    pos = np.arange(n)
    protected = pos >= n - state.recent
    if not method.leaving_token_competes:
        protected |= pos == n - state.recent - 1
    return np.where(cand, np.where(protected[None, :], np.inf, scores), -np.inf)


def _h2o_scores(method, state, q, k_new, v_new, dtype):
    h_q, d = q.shape
    prev = _previous_kept(state)
    n = state.n + 1
    kept = np.concatenate([state.kept, np.ones((state.kept.shape[0], 1), bool)], axis=1)
    scores = np.concatenate([state.scores, np.zeros((state.scores.shape[0], 1))], axis=1)
    first = state.n == state.prompt_len
    pos = np.arange(n)
    if first:
        t = state.prompt_len
        if method.decode_eviction and method.timing == "before_attention":
            cut = n - state.recent - (0 if method.leaving_token_competes else 1)
        else:           # the selection is the prefill's eviction at t, plus the new token
            cut = t - state.recent
        s = np.where(pos[None, :] < cut, scores, np.inf)
    elif method.decode_eviction and method.timing == "before_attention":
        s = _eviction_scores(method, state, kept, scores, n)
    elif method.decode_eviction and prev is not None:
        # after attention: this step reads what the last eviction (at n - 1, over the previous
        # step's kept rows and its new token, with the current scores) kept, plus the new token
        cand = np.concatenate([prev, np.ones((prev.shape[0], 1), bool)], axis=1)
        s = np.concatenate([_eviction_scores(method, state, cand, state.scores, state.n),
                            np.full((cand.shape[0], 1), np.inf)], axis=1)
    else:
        return _exact(_to_heads(kept, h_q))
    s = _to_heads(s, h_q)
    queries = _queries_of(state, dtype)
    if queries is None:
        return s, np.zeros(h_q)
    lb = _logit_band(np.concatenate([queries[: state.n], q[None]]), state.keys(), dtype, state.scale)
    if method.gqa != "per_query_head":
        lb = np.repeat(reduce_group(lb[:, None], state.kept.shape[0], "max")[:, 0], h_q // state.kept.shape[0])
    finite = np.where(np.isfinite(s), np.abs(s), 0.0).max(axis=1)
    return s, _band(finite, lb, n + d + h_q, dtype)


registry.register_suite("h2o")(MethodSuite("h2o", _h2o_methods,
                                           sequences=eviction_sequences(max_length=20, max_h_kv=2, max_group=2,
                                                                        head_dims=(4, 8, 16)),
                                           scores=_h2o_scores))


# --- snapkv / pyramidkv ------------------------------------------------------------------------

def _pooling(draw):
    return dict(kernel=draw(st.sampled_from([1, 3, 5, 7])), pool=draw(st.sampled_from(["max", "avg", "none"])),
                window_score=draw(st.sampled_from(["sum", "mean"])),
                gqa=draw(st.sampled_from(["per_query_head", "mean", "max", "sum"])),
                reduce_before_pool=draw(st.booleans()))


@st.composite
def _snapkv_methods(draw, shapes):
    from ..oracle.snapkv import SnapKV
    window = draw(st.integers(1, 4))
    if draw(st.booleans()):
        return SnapKV(window=window, capacity=draw(st.integers(window + 1, 20)), **_pooling(draw))
    # kvpress mode needs prompt > window: the sequences below have prompts of >= 5 tokens
    return SnapKV(window=window, compression_ratio=draw(st.sampled_from([0.3, 0.5, 0.8])),
                  ratio_rounding="float", **_pooling(draw))


@st.composite
def _pyramidkv_methods(draw, shapes):
    from ..oracle.pyramidkv import PyramidKV
    layers = draw(st.integers(1, 4))
    window = draw(st.integers(1, 4))
    common = dict(window=window, beta=draw(st.integers(1, 4)), layer=draw(st.integers(0, layers - 1)),
                  num_layers=layers, **_pooling(draw))
    if draw(st.booleans()):
        return PyramidKV(capacity=draw(st.integers(window + 1, 14)), **common)
    return PyramidKV(compression_ratio=draw(st.sampled_from([0.3, 0.5, 0.8])), ratio_rounding="float",
                     arithmetic="float", **common)


def _snapkv_scores(method, state, q, k_new, v_new, dtype):
    from ..oracle.snapkv import window_scores
    h_q, d = q.shape
    t, n = state.prompt_len, state.n + 1
    kept = np.concatenate([state.kept, np.ones((state.kept.shape[0], 1), bool)], axis=1)
    queries = _queries_of(state, dtype)
    if queries is None or method.budget_total(t) is None:
        return _exact(_to_heads(kept, h_q))
    h_kv = state.keys().shape[0]
    k_prompt = state.keys()[:, :t].transpose(1, 0, 2)
    s = np.full((kept.shape[0], n), np.inf)
    s[:, :t] = method.unit_scores(queries[:t], k_prompt, scale=state.scale)
    raw = window_scores(queries[:t], k_prompt, method.window, how=method.window_score, scale=state.scale)
    raw_max = raw.max(axis=1, initial=0.0)
    lb = _logit_band(queries[t - method.window:t], state.keys()[:, :t], dtype, state.scale)
    g = h_q // h_kv
    if method.gqa != "per_query_head":   # a unit's score mixes its group: take the group's worst
        raw_max = np.repeat(raw_max.reshape(h_kv, g).max(axis=1) * (g if method.gqa == "sum" else 1), g)
        lb = np.repeat(lb.reshape(h_kv, g).max(axis=1), g)
    return _to_heads(s, h_q), _band(raw_max, lb, t + method.window + method.kernel + g + d, dtype)


_SNAP_SEQUENCES = eviction_sequences(max_length=20, max_h_kv=2, max_group=2, head_dims=(4, 8, 16),
                                     prefill_len=st.integers(5, 18))
# min_prompt: the kvpress modes need a prompt longer than the window (<= 4 here)
registry.register_suite("snapkv")(MethodSuite("snapkv", _snapkv_methods, sequences=_SNAP_SEQUENCES,
                                              scores=_snapkv_scores, min_prompt=5))
registry.register_suite("pyramidkv")(MethodSuite("pyramidkv", _pyramidkv_methods, sequences=_SNAP_SEQUENCES,
                                                 scores=_snapkv_scores, min_prompt=5))
