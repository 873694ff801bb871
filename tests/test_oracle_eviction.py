"""Eviction oracles: H2O (all variants), SnapKV, PyramidKV, CORM.

Expected values are computed here from the definitions with plain NumPy loops (naive softmax per
row), never with the oracle's own helpers.
"""
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import Layout, core, run_decode
from kvsparse.oracle.corm import CORM
from kvsparse.oracle.dense import Dense
from kvsparse.oracle.h2o import H2O
from kvsparse.oracle.pyramidkv import PyramidKV, pyramid_budget
from kvsparse.oracle.sliding_window import SlidingWindow, selection_of
from kvsparse.oracle.snapkv import SnapKV
from kvsparse.oracle.streaming_llm import StreamingLLM
from kvsparse.property_tests.sequences import (decode_sequences, edge_lengths, make_decode_sequence, size_edges,
                                               sizes)


def naive_probs(q, keys):
    """Softmax of q . k / sqrt(d) over the given key rows, one row at a time."""
    s = keys @ q / np.sqrt(q.shape[0])
    e = np.exp(s - s.max())
    return e / e.sum()


def dense_output(seq, t):
    """Dense attention on a contiguous [H_kv, t+1, d] cache (the layout the oracles store; einsum's
    rounding may depend on the memory layout, so "exactly" is stated for the same layout)."""
    k = np.ascontiguousarray(seq.k_seq[: t + 1].transpose(1, 0, 2))
    v = np.ascontiguousarray(seq.v_seq[: t + 1].transpose(1, 0, 2))
    return Dense().step(seq.q_seq[t], k, v).output


def run(method, seq):
    return run_decode(method, seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=seq.prefill_len)


def test_registered_eviction():
    registry.load_all()
    for name, cls in [("h2o", H2O), ("snapkv", SnapKV), ("pyramidkv", PyramidKV), ("corm", CORM)]:
        assert registry.get(name).oracle is cls and cls.family == "eviction" and cls.stateful


def test_sequence_strategies_reach_the_edges():
    assert edge_lengths(16, 4) == [4, 5, 15, 16, 17, 23, 24]       # w, w+1, C-1, C, C+1, 2(C-w)-1, 2(C-w)
    assert {0, 1, 29, 30, 31} <= set(size_edges(8, context=30))     # r = hh = S = 0 and S >= T


# --- budgets covering the context: dense, exactly -------------------------------------------------

@given(seq=decode_sequences(max_length=24), extra=st.integers(0, 2))
def test_covering_budgets_are_dense_exactly(seq, extra):
    t_max = seq.length
    methods = [H2O(heavy=t_max + extra, recent=0), H2O(heavy=0, recent=t_max + extra),
               H2O(heavy=extra, recent=t_max, timing="after_attention"),
               SnapKV(window=1, capacity=seq.prefill_len + 1 + extra),
               PyramidKV(window=1, capacity=seq.prefill_len + 1 + extra, num_layers=4, layer=3),
               CORM(window=1, threshold=0.0)]
    for m in methods:
        for j, step in enumerate(run(m, seq).steps):
            t = seq.prefill_len + j
            assert (step.selection.sizes == t + 1).all(), m
            np.testing.assert_array_equal(step.output, dense_output(seq, t))


# --- H2O --------------------------------------------------------------------------------------------

@given(seq=decode_sequences(max_length=30), recent=sizes(8).filter(lambda r: r >= 1))
def test_h2o_without_heavy_hitters_is_the_window(seq, recent):
    for timing, span in (("before_attention", recent), ("after_attention", recent + 1)):
        a = run(H2O(heavy=0, recent=recent, timing=timing), seq)
        b = run(SlidingWindow(window=span), seq)
        for x, y in zip(a.steps, b.steps):
            assert x.selection == y.selection
            np.testing.assert_allclose(x.output, y.output, rtol=1e-13, atol=1e-15)


def h2o_replay(method, seq):
    """prefill + decode by hand, keeping every state: [(state_before, step_result, state_after)]."""
    state = method.prefill(seq.q_seq[: seq.prefill_len], seq.k_seq[: seq.prefill_len], seq.v_seq[: seq.prefill_len])
    out = [(None, None, state)]
    for t in range(seq.prefill_len, seq.length):
        new, res = method.decode(state, seq.q_seq[t], seq.k_seq[t], seq.v_seq[t])
        out.append((state, res, new))
        state = new
    return out


def check_h2o_scores(method, seq):
    """Accumulated score of every kept token == brute-force sum of the attention it received."""
    h_q = seq.q_seq.shape[1]
    g = h_q // seq.k_seq.shape[1]
    brute = np.zeros((h_q, seq.length))
    p = seq.prefill_len
    for h in range(h_q):
        for i in range(p):                                    # prefill: every prompt row, causal
            brute[h, : i + 1] += naive_probs(seq.q_seq[i, h], seq.k_seq[: i + 1, h // g])
    replay = h2o_replay(method, seq)
    for before, res, after in replay[1:]:
        t = after.n - 1
        for h in range(h_q):
            ix = res.selection.indices[h]
            brute[h, ix] += naive_probs(seq.q_seq[t, h], seq.k_seq[ix, h // g])
        kept = after.kept
        np.testing.assert_allclose(after.scores[kept], brute[:, : after.n][kept], rtol=1e-10, atol=1e-12)


@given(seq=decode_sequences(max_length=28), heavy=sizes(6), recent=sizes(6), timing=st.sampled_from(
    ["before_attention", "after_attention"]))
@example(seq=make_decode_sequence(12, 2, 1, 4, prefill_len=6), heavy=2, recent=0, timing="before_attention")
def test_h2o_incremental_score_is_the_brute_force_sum(seq, heavy, recent, timing):
    if heavy + recent == 0:
        heavy = 1
    check_h2o_scores(H2O(heavy=heavy, recent=recent, timing=timing), seq)


def test_planted_bug_in_score_accumulation_is_caught():
    class ForgetsPrefill(H2O):                      # accumulates decode rows only
        def prefill(self, q, k, v):
            state = super().prefill(q, k, v)
            return replace(state, scores=np.zeros_like(state.scores))
    seq = make_decode_sequence(14, 2, 1, 4, prefill_len=8, seed=2)
    check_h2o_scores(H2O(heavy=2, recent=2), seq)
    with pytest.raises(AssertionError):
        check_h2o_scores(ForgetsPrefill(heavy=2, recent=2), seq)


def check_h2o_eviction(method, seq, heavy, recent):
    """Cache-size closed form, recent window present, and every eviction a valid top-k (tie rule).
    With ``recent = 0`` (documented in h2o.py): the current token is attended iff ``n <= heavy``."""
    for before, res, after in h2o_replay(method, seq)[1:]:
        n = after.n
        sizes_ = res.selection.sizes
        assert (sizes_ == min(n, heavy + recent)).all(), (n, sizes_)
        for ix in res.selection.indices:
            assert set(range(max(0, n - recent), n)) <= set(ix)
            if recent == 0:
                assert ((n - 1) in ix) == (n <= heavy), (n, heavy, list(ix))
        # the tokens evicted at this step lost to the kept non-recent ones: score, then lower index
        scores = before.scores
        for u in range(after.kept.shape[0]):
            evicted = np.flatnonzero(before.kept[u] & ~after.kept[u, :-1])
            kept = np.flatnonzero(after.kept[u, :-1] & (np.arange(n - 1) < n - recent))
            for e in evicted:
                for k in kept:
                    assert (scores[u, k], -k) >= (scores[u, e], -e), (u, k, e)


H2O_EDGES = ("C-1", "C", "C+1", "r", "r+1", "any")


@st.composite
def h2o_cases(draw, edge="any", max_size=6, max_length=24):
    """``(seq, heavy, recent)``: sizes reach 0 (``hh = 0`` or ``r = 0``; not both) and the prefill length
    ``T`` sits at ``edge`` relative to ``C = hh + r`` (``"C-1"``, ``"C"``, ``"C+1"``, ``"r"``,
    ``"r+1"``; ``T >= 1``, so ``T = 0`` becomes 1) or, for ``"any"``, anywhere in ``1 .. max_length``;
    then 2 to 10 decode steps."""
    heavy, recent = draw(sizes(max_size)), draw(sizes(max_size))
    if heavy + recent == 0:
        heavy = 1
    c = heavy + recent
    at = {"C-1": c - 1, "C": c, "C+1": c + 1, "r": recent, "r+1": recent + 1}
    prefill = draw(st.integers(1, max_length)) if edge == "any" else max(1, at[edge])
    seq = draw(decode_sequences(prefill_len=prefill, length=prefill + draw(st.integers(2, 10))))
    return seq, heavy, recent


@pytest.mark.parametrize("edge", H2O_EDGES)      # each edge is reached in every profile, not by luck
@given(data=st.data())
def test_h2o_cache_size_recent_window_and_valid_topk(edge, data):
    seq, heavy, recent = data.draw(h2o_cases(edge), label="case")
    check_h2o_eviction(H2O(heavy=heavy, recent=recent), seq, heavy, recent)


def test_planted_bug_attending_the_current_token_at_recent_zero_is_caught():
    """A variant that protects the current token when ``recent = 0`` (one heavy slot less, so the cache
    size is still right and every eviction is still a valid top-k) breaks only the ``r = 0`` rule."""
    import kvsparse.oracle.h2o as h2o_module
    original = h2o_module.evict

    def evict_protecting_current(kept, scores, n, heavy, recent, protect_leaving=False):
        if recent == 0 and heavy > 1:
            return original(kept, scores, n, heavy - 1, 1, protect_leaving)
        return original(kept, scores, n, heavy, recent, protect_leaving)
    seq = make_decode_sequence(14, 2, 1, 4, prefill_len=6, seed=5)
    check_h2o_eviction(H2O(heavy=3, recent=0), seq, 3, 0)
    h2o_module.evict = evict_protecting_current
    try:
        with pytest.raises(AssertionError) as caught:
            check_h2o_eviction(H2O(heavy=3, recent=0), seq, 3, 0)
        assert "== (7 <= 3)" in str(caught.value)               # the r = 0 rule, at the first full step
    finally:
        h2o_module.evict = original


def test_planted_bug_evicting_the_largest_score_is_caught():
    import kvsparse.oracle.h2o as h2o_module
    original = h2o_module.evict

    def evict_wrong(kept, scores, n, heavy, recent, protect_leaving=False):
        return original(kept, -scores, n, heavy, recent, protect_leaving)
    seq = make_decode_sequence(16, 2, 1, 4, prefill_len=6, seed=5)
    check_h2o_eviction(H2O(heavy=2, recent=2), seq, 2, 2)
    h2o_module.evict = evict_wrong
    try:
        with pytest.raises(AssertionError):
            check_h2o_eviction(H2O(heavy=2, recent=2), seq, 2, 2)
    finally:
        h2o_module.evict = original


def test_h2o_mask_sim_gap_token():
    """Masking simulation: heavy 2 + recent 2 visible, but position L - recent is never visible."""
    seq = make_decode_sequence(30, 2, 2, 4, prefill_len=20, seed=1)
    m = H2O(execution="mask_sim", ratio_rounding="float")         # int(0.1 * 20) = 2 heavy + 2 recent
    for j, step in enumerate(run(m, seq).steps):
        t = 20 + j                         # the mask of this step was made at the previous step (L = t keys)
        for ix in step.selection.indices:
            assert len(ix) == 4 and t in ix and t - 1 in ix and (t - 2) not in ix   # the gap token
    # recent = 0: the query cannot see its own token, and evicted scores are never zeroed
    m0 = H2O(heavy=3, recent=0, execution="mask_sim")
    state = m0.prefill(seq.q_seq[:20], seq.k_seq[:20], seq.v_seq[:20])
    state, res = m0.decode(state, seq.q_seq[20], seq.k_seq[20], seq.v_seq[20])
    assert all(20 not in ix and len(ix) == 3 for ix in res.selection.indices)
    assert (state.scores[:, :20] > 0).all()


def test_h2o_flexgen_budget_and_leaving_token():
    seq = make_decode_sequence(40, 2, 2, 4, prefill_len=30, seed=4)
    m = H2O.presets()["h2o-flexgen"]                   # hh_k = int(30 * 0.1) = 3: 3 heavy + 2 recent + new
    for before, res, after in h2o_replay(m, seq)[1:]:
        n = after.n
        assert (res.selection.sizes == 6).all()
        leaving = n - 3                                # left the recent window at this step: joins the heavies
        assert after.kept[:, leaving].all()


def test_h2o_traffic_counts_scores_as_auxiliary():
    seq = make_decode_sequence(20, 4, 2, 8, prefill_len=12)
    step = run_decode(H2O(heavy=3, recent=2), seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=12,
                      layout=Layout(element_bits=16)).steps[-1]
    union = sum(len(set(step.selection.indices[2 * j]) | set(step.selection.indices[2 * j + 1])) for j in range(2))
    assert step.traffic.get("hbm", "keys") == union * 8 * 2
    assert step.traffic.get("hbm", "auxiliary") == 4 * 5 * 4        # 4 heads x 5 kept tokens x fp32


# --- SnapKV / PyramidKV ----------------------------------------------------------------------------

def naive_snapkv_keep(seq, window, n_total, kernel, pool):
    """Per query head: window votes (naive softmax), pooled by explicit loops, window forced in."""
    p = seq.prefill_len
    h_q = seq.q_seq.shape[1]
    g = h_q // seq.k_seq.shape[1]
    keeps = []
    for h in range(h_q):
        s = np.zeros(p - window)
        for i in range(p - window, p):
            s += naive_probs(seq.q_seq[i, h], seq.k_seq[: i + 1, h // g])[: p - window]
        half = kernel // 2
        pooled = np.array([(max(s[max(0, j - half): j + half + 1]) if pool == "max"
                            else s[max(0, j - half): j + half + 1].sum() / kernel) for j in range(p - window)])
        order = sorted(range(p - window), key=lambda j: (-pooled[j], j))
        keeps.append(sorted(order[: max(0, n_total - window)]) + list(range(p - window, p)))
    return keeps, pooled


@given(seq=decode_sequences(min_length=8, max_length=30, edge_capacity=9, edge_window=3),
       kernel=st.sampled_from([1, 3, 5]), pool=st.sampled_from(["max", "avg"]))
def test_snapkv_selection_matches_the_definition(seq, kernel, pool):
    """Every step: the prompt tokens chosen at prefill + every decoded token so far."""
    check_snapkv_against_the_definition(seq, kernel, pool)


@pytest.mark.parametrize("prefill", edge_lengths(9, 3))
def test_snapkv_selection_at_every_edge_prompt_length(prefill):
    """The boundaries of C = 9, w = 3 (C-1, C, C+1, w, w+1, ...) every run, not only when the drawn
    prompt lengths happen to hit them (the strategy draws an edge half of the time)."""
    for kernel, pool in ((1, "max"), (3, "avg"), (5, "max")):
        seq = make_decode_sequence(prefill + 3, 4, 2, 4, prefill_len=prefill, family="gaussian", seed=prefill)
        check_snapkv_against_the_definition(seq, kernel, pool)


def check_snapkv_against_the_definition(seq, kernel, pool):
    window, capacity = 3, 9
    p = seq.prefill_len
    expected = naive_snapkv_keep(seq, window, capacity, kernel, pool)[0] if p >= capacity else None
    for j, step in enumerate(run(SnapKV(window=window, capacity=capacity, kernel=kernel, pool=pool), seq).steps):
        decoded = set(range(p, p + j + 1))
        for h, ix in enumerate(step.selection.indices):
            prompt = set(range(p)) if expected is None else set(expected[h])   # T < C: nothing compressed
            assert set(ix) == prompt | decoded, (j, h, sorted(ix))


def naive_prefill_total(method, t):
    """Tokens kept after a ``t``-token prompt (``None``: all), from the docstrings' closed forms."""
    c, w = method.capacity, method.window
    if t < c:
        return None
    if not isinstance(method, PyramidKV) or t < 2 * (c - w):
        return c
    b = c - w
    lo, hi = b // method.beta, 2 * b - b // method.beta
    if hi >= t - w:
        hi, lo = t - w, 2 * b - (t - w)
    steps = (hi - lo) // (method.num_layers - 1) if method.num_layers > 1 else 0
    return hi - method.layer * steps + w


def check_snapkv_steps(method, seq, steps=None):
    """At every step t: |kept| = (prefill total or T) + (t - T + 1), with the window and every decoded
    token kept. ``steps`` limits the check to the first steps (to show what that would miss)."""
    p, w = seq.prefill_len, method.window
    total = naive_prefill_total(method, p)
    for j, step in enumerate(run(method, seq).steps[:steps]):
        assert (step.selection.sizes == (p if total is None else total) + j + 1).all(), (j, step.selection.sizes)
        for ix in step.selection.indices:
            assert set(range(max(0, p - w), p + j + 1)) <= set(ix), (j, sorted(ix))


SNAPKV_EDGES = ("C-1", "C", "C+1", "w", "w+1", "2B-1", "2B", "any")      # B = C - w: PyramidKV's threshold


@st.composite
def snapkv_cases(draw, kind, edge, max_length=32):
    """``(method, seq)``: a SnapKV or PyramidKV, a prefill length ``T`` at ``edge`` (``T >= 1``; ``"any"``:
    ``1 .. max_length``), then 2 to 8 decode steps."""
    window = draw(st.integers(1, 4))
    capacity = draw(st.integers(window + 1, 14))
    kw = dict(window=window, capacity=capacity, kernel=draw(st.sampled_from([1, 3, 5])),
              pool=draw(st.sampled_from(["max", "avg", "none"])),
              gqa=draw(st.sampled_from(["per_query_head", "mean", "max", "sum"])),
              reduce_before_pool=draw(st.booleans()))
    if kind == "pyramidkv":
        layers = draw(st.integers(1, 6))
        method = PyramidKV(**kw, beta=draw(st.integers(1, 20)), num_layers=layers,
                           layer=draw(st.integers(0, layers - 1)))
    else:
        method = SnapKV(**kw)
    b = capacity - window
    at = {"C-1": capacity - 1, "C": capacity, "C+1": capacity + 1, "w": window, "w+1": window + 1,
          "2B-1": 2 * b - 1, "2B": 2 * b}
    prefill = draw(st.integers(1, max_length)) if edge == "any" else max(1, at[edge])
    steps = draw(st.integers(2, 8))                        # several decode steps: "every step" means something
    return method, draw(decode_sequences(prefill_len=prefill, length=prefill + steps))


@pytest.mark.parametrize("edge", SNAPKV_EDGES)
@pytest.mark.parametrize("kind", ["snapkv", "pyramidkv"])
@given(data=st.data())
def test_snapkv_pyramidkv_cache_size_and_window_at_every_step(kind, edge, data):
    check_snapkv_steps(*data.draw(snapkv_cases(kind, edge), label="case"))


def test_planted_decode_eviction_is_caught_only_after_the_first_step():
    """A SnapKV that drops its oldest kept token after each decode step is right at step 0."""
    class Rolling(SnapKV):
        def decode(self, state, q, k_new, v_new, *, layout=Layout()):
            new, res = super().decode(state, q, k_new, v_new, layout=layout)
            kept = new.kept.copy()
            kept[np.arange(kept.shape[0]), kept.argmax(axis=1)] = False
            return replace(new, kept=kept), res
    seq = make_decode_sequence(20, 2, 1, 4, prefill_len=12, seed=3)
    check_snapkv_steps(SnapKV(window=3, capacity=8), seq)
    check_snapkv_steps(Rolling(window=3, capacity=8), seq, steps=1)    # a first-step check passes...
    with pytest.raises(AssertionError):
        check_snapkv_steps(Rolling(window=3, capacity=8), seq)          # ...every step does not


@given(seq=decode_sequences(min_length=6, max_length=30))
def test_snapkv_kernel_one_is_unpooled(seq):
    a = run(SnapKV(window=2, capacity=5, kernel=1, pool="max"), seq)
    b = run(SnapKV(window=2, capacity=5, pool="none"), seq)
    c = run(SnapKV(window=2, capacity=5, kernel=1, pool="avg"), seq)
    for x, y, z in zip(a.steps, b.steps, c.steps):
        assert x.selection == y.selection == z.selection
        np.testing.assert_array_equal(x.output, y.output)


@given(seq=decode_sequences(min_length=6, max_length=40), layer=st.integers(0, 5), gqa=st.sampled_from(
    ["per_query_head", "mean", "max"]))
def test_pyramidkv_below_threshold_is_snapkv(seq, layer, gqa):
    window, capacity = 2, 16
    if seq.prefill_len >= 2 * (capacity - window):
        return                                   # the pyramid branch proper
    a = run(PyramidKV(window=window, capacity=capacity, layer=layer, num_layers=6, gqa=gqa), seq)
    b = run(SnapKV(window=window, capacity=capacity, gqa=gqa), seq)
    for x, y in zip(a.steps, b.steps):
        assert x.selection == y.selection


def test_pyramid_budget_schedule_hand_values():
    """KVCache-Factory's integer schedule: T=8000, C=128, w=8, L=32 gives 242 .. 25, mean 133.5 > 128."""
    caps = [pyramid_budget(8000, capacity=128, window=8, beta=20, layer=l, num_layers=32) for l in range(32)]
    assert caps[0] == 242 and caps[31] == 25 and np.mean(caps) == 133.5
    assert pyramid_budget(127, capacity=128, window=8, beta=20, layer=5, num_layers=32) is None   # T < C
    assert pyramid_budget(200, capacity=128, window=8, beta=20, layer=5, num_layers=32) == 128   # T < 2B
    assert pyramid_budget(8000, capacity=128, window=8, beta=20, layer=0, num_layers=1) == 242   # steps = 0


def test_snapkv_gqa_modes_and_window_kept():
    seq = make_decode_sequence(40, 4, 2, 8, prefill_len=32, seed=7)
    per_head = run(SnapKV(window=4, capacity=12), seq).steps[0].selection
    shared = run(SnapKV(window=4, capacity=12, gqa="mean"), seq).steps[0].selection
    assert len({tuple(ix) for ix in per_head.indices}) > 2      # per query head: G-times cache
    assert shared.indices[0].tolist() == shared.indices[1].tolist()
    for sel in (per_head, shared):
        assert (sel.sizes == 13).all() and all(set(range(28, 33)) <= set(ix) for ix in sel.indices)
    for gqa in ("per_query_head", "mean"):                       # and at every later step
        for j, step in enumerate(run(SnapKV(window=4, capacity=12, gqa=gqa), seq).steps):
            sel = step.selection
            assert (sel.sizes == 13 + j).all() and all(set(range(28, 33 + j)) <= set(ix) for ix in sel.indices)


# --- CORM -------------------------------------------------------------------------------------------

def check_corm(method, seq):
    """Recent tokens kept; an evicted key was below threshold/m for each of the last `window` queries
    (naive probabilities over each step's attended set, the current step included)."""
    h_q = seq.q_seq.shape[1]
    g = h_q // seq.k_seq.shape[1]
    state = method.prefill(seq.q_seq[: seq.prefill_len], seq.k_seq[: seq.prefill_len], seq.v_seq[: seq.prefill_len])
    history = []                                          # (t, per-head {pos: prob}) of decode steps
    for t in range(seq.prefill_len, seq.length):
        new, res = method.decode(state, seq.q_seq[t], seq.k_seq[t], seq.v_seq[t])
        probs = []
        for h in range(h_q):
            ix = res.selection.indices[h]
            pr = naive_probs(seq.q_seq[t, h], seq.k_seq[ix, h // g])
            probs.append({int(i): (p, len(ix)) for i, p in zip(ix, pr)})
        history.append(probs)
        recent = max(1, method.window if method.recent is None else method.recent)
        assert new.kept[:, max(0, t + 1 - recent): t + 1].all()
        evicted = np.argwhere(state.kept & ~new.kept[:, :-1])
        for u, pos in evicted:
            heads = range(u * g, (u + 1) * g) if method.gqa == "union" else [u]
            assert len(history) >= method.window, "evicted before enough decode queries judged it"
            for probs_t in history[-method.window:]:
                for h in heads:
                    p, m = probs_t[h][int(pos)]
                    assert p < method.threshold / m, (u, pos, p, m)
        state = new


@given(seq=decode_sequences(max_length=30, min_length=4), window=st.integers(1, 4),
       threshold=st.sampled_from([0.5, 1.0, 2.0]), gqa=st.sampled_from(["union", "per_query_head"]))
def test_corm_evicts_only_keys_minor_for_the_whole_window(seq, window, threshold, gqa):
    seq = replace(seq, prefill_len=1)                     # every judgement is a decode step we can see
    check_corm(CORM(window=window, threshold=threshold, gqa=gqa), seq)


def test_corm_evicts_something_and_planted_bug_is_caught():
    seq = replace(make_decode_sequence(40, 4, 2, 8, prefill_len=10, family="sink_and_local", seed=3), prefill_len=1)
    run_ = run_decode(CORM(window=2), seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=1)
    assert run_.steps[-1].selection.sizes.max() < 40           # it does evict
    check_corm(CORM(window=2), seq)

    class Impatient(CORM):                                      # judges after one query, not `window`
        def evict(self, kept, last_important, t):
            return CORM(window=1, recent=self.window).evict(kept, last_important, t)
    with pytest.raises(AssertionError):
        check_corm(Impatient(window=2), seq)


# --- slot permutation: the output is attention over the compacted cache, slots in any order ----------

def rotated(seq):
    """``seq`` with q and keys rotated by RoPE at their original positions (post-RoPE inputs)."""
    pos = np.arange(seq.length)
    q = core.rope_apply(seq.q_seq.transpose(1, 0, 2), pos).transpose(1, 0, 2)
    k = core.rope_apply(seq.k_seq.transpose(1, 0, 2), pos).transpose(1, 0, 2)
    return replace(seq, q_seq=np.ascontiguousarray(q), k_seq=np.ascontiguousarray(k))


def attention_rounding_bound(q, keys, values):
    """Bound on |naive attention - any other float64 evaluation| of one query over ``keys``/``values``.

    Each logit is a d-term dot product (times 1/sqrt(d)), off by at most ``delta = 4 d u A`` (``A`` the
    largest ``sum_i |q_i k_i| / sqrt(d)``, ``u = 2^-53``, the 4 covering both evaluations and a 1-ulp
    difference of RoPE'd key entries). Logits off by ``delta`` move each probability by a factor
    ``exp(+-2 delta)``, so the output moves by at most ``(exp(2 delta) - 1) max|v|``; both weighted sums of
    ``m`` rows and both normalisations add ``(2m + 8) u max|v|``."""
    d = q.shape[0]
    u = np.finfo(float).eps / 2
    a = (np.abs(keys) @ np.abs(q)).max() / np.sqrt(d)
    vmax = np.abs(values).max()
    return (np.expm1(2 * 4 * d * u * a) + (2 * keys.shape[0] + 8) * u) * vmax


def check_permuted_compacted_cache(method, seq, seed, *, permute_values=True):
    """At every decode step, query head ``h``'s output == naive attention over a compacted cache of its
    kept tokens whose slots are randomly permuted: positions, keys and values permuted together, the
    pre-RoPE keys rotated at their (permuted) original positions and the query at its true position t.
    The method runs on the post-RoPE sequence (the eviction oracles' convention: keys as given)."""
    post = rotated(seq)
    rng = np.random.default_rng(seed)
    g = seq.q_seq.shape[1] // seq.k_seq.shape[1]
    for j, step in enumerate(run(method, post).steps):
        t = seq.prefill_len + j
        for h, ix in enumerate(step.selection.indices):
            pos = ix[rng.permutation(ix.size)]                  # slot i holds original position pos[i]
            keys = core.rope_apply(seq.k_seq[pos, h // g][None], pos)[0]
            values = seq.v_seq[pos if permute_values else ix, h // g]
            q = post.q_seq[t, h]
            expected = naive_probs(q, keys) @ values
            np.testing.assert_allclose(step.output[h], expected, rtol=0, atol=attention_rounding_bound(q, keys, values),
                                       err_msg=f"{method}, t={t}, h={h}")


@given(seq=decode_sequences(max_length=24), heavy=sizes(5), recent=sizes(5), layer=st.integers(0, 3),
       gqa=st.sampled_from(["per_query_head", "mean", "max"]), seed=st.integers(0, 2**32 - 1))
def test_output_is_attention_over_a_permuted_compacted_cache(seq, heavy, recent, layer, gqa, seed):
    if heavy + recent == 0:
        heavy = 1
    methods = [H2O(heavy=heavy, recent=recent, gqa=gqa), H2O(heavy=heavy, recent=recent, timing="after_attention"),
               H2O(heavy=heavy, recent=recent, execution="mask_sim"),
               SnapKV(window=2, capacity=5, kernel=3, gqa=gqa),
               PyramidKV(window=2, capacity=6, num_layers=4, layer=layer, gqa=gqa),
               CORM(window=2, gqa="per_query_head" if gqa == "per_query_head" else "union")]
    for m in methods:
        check_permuted_compacted_cache(m, seq, seed)


def test_planted_bugs_in_slots_positions_and_reported_sets_are_caught():
    seq = make_decode_sequence(20, 4, 2, 8, prefill_len=10, seed=11)
    check_permuted_compacted_cache(H2O(heavy=2, recent=3), seq, 0)
    # values not permuted with their keys
    with pytest.raises(AssertionError):
        check_permuted_compacted_cache(H2O(heavy=2, recent=3), seq, 0, permute_values=False)
    # cache-index positions (kept keys re-rotated to slots 0..m-1): right while nothing is evicted...
    check_permuted_compacted_cache(StreamingLLM(sinks=2, recent=30, rope="cache_index", inputs_rotated=True), seq, 0)
    with pytest.raises(AssertionError):      # ...wrong once tokens are evicted
        check_permuted_compacted_cache(StreamingLLM(sinks=2, recent=3, rope="cache_index", inputs_rotated=True),
                                       seq, 0)

    class AttendsBeforeEvicting(H2O):         # output over the cache before eviction, Selection after it
        def decode(self, state, q, k_new, v_new, *, layout=Layout()):
            new, res = H2O.decode(replace(self, timing="after_attention"), state, q, k_new, v_new, layout=layout)
            return new, replace(res, selection=selection_of(new.kept, q.shape[0]))
    with pytest.raises(AssertionError):
        check_permuted_compacted_cache(AttendsBeforeEvicting(heavy=2, recent=3), seq, 0)


def test_eviction_bad_parameters_and_states():
    with pytest.raises(ValueError, match="capacity"):
        SnapKV(window=8, capacity=8)
    with pytest.raises(ValueError, match="kernel"):
        SnapKV(kernel=4)
    with pytest.raises(ValueError, match="gqa"):
        H2O(gqa="union")
    with pytest.raises(ValueError, match="heavy \\+ recent"):
        H2O(heavy=0, recent=0)
    with pytest.raises(ValueError, match="layer"):
        PyramidKV(layer=32, num_layers=32)
    with pytest.raises(ValueError, match="threshold"):
        CORM(threshold=-1.0)
    seq = make_decode_sequence(8, 2, 1, 4, prefill_len=6)
    state = SnapKV(window=2, capacity=4).prefill(seq.q_seq[:6], seq.k_seq[:6], seq.v_seq[:6])
    with pytest.raises(TypeError, match="H2OState"):
        H2O(heavy=2, recent=2).decode(state, seq.q_seq[6], seq.k_seq[6], seq.v_seq[6])
    with pytest.raises(ValueError, match="k_new"):
        SnapKV(window=2, capacity=4).decode(state, seq.q_seq[6], seq.k_seq[6][:, :2], seq.v_seq[6])
    with pytest.raises(ValueError, match="more prompt tokens"):
        SnapKV.presets()["kvpress"].prefill(seq.q_seq[:6], seq.k_seq[:6], seq.v_seq[:6])


def test_old_states_stay_valid_after_branching():
    """Decoding twice from one state (explicit state, shared history) gives the same result."""
    seq = make_decode_sequence(12, 2, 1, 4, prefill_len=8, seed=9)
    m = H2O(heavy=2, recent=2)
    s0 = m.prefill(seq.q_seq[:8], seq.k_seq[:8], seq.v_seq[:8])
    s1, r1 = m.decode(s0, seq.q_seq[8], seq.k_seq[8], seq.v_seq[8])
    m.decode(s1, seq.q_seq[9], seq.k_seq[9], seq.v_seq[9])
    _, r1b = m.decode(s0, seq.q_seq[8], seq.k_seq[8] + 1.0, seq.v_seq[8])      # a different branch
    s1c, r1c = m.decode(s0, seq.q_seq[8], seq.k_seq[8], seq.v_seq[8])
    np.testing.assert_array_equal(r1.output, r1c.output)
    assert not np.array_equal(r1b.output, r1.output)
    np.testing.assert_array_equal(s1.keys(), s1c.keys())


# --- the softmax scale: every logit of prefill and decode is formed with it -------------------------

def _scaled_methods():
    from kvsparse.oracle.clusterkv import ClusterKV
    return [H2O(heavy=3, recent=2), H2O(heavy=2, recent=2, timing="after_attention", gqa="mean"),
            H2O(execution="mask_sim", heavy=3, recent=2), H2O.presets()["kvpress-observed-attention"],
            CORM(window=2), CORM(window=3, gqa="per_query_head", threshold=0.5),
            SnapKV(window=2, capacity=6, kernel=3),
            SnapKV(window=3, kernel=3, pool="avg", window_score="mean", gqa="mean", compression_ratio=0.5),
            PyramidKV(window=2, capacity=6, beta=2, layer=1, num_layers=3, kernel=3, pool="avg"),
            StreamingLLM(sinks=2, recent=4), replace(StreamingLLM.presets()["streaming-llm-repo"], recent=4),
            ClusterKV(n_clusters=3, sinks=1, budget=5, iterations=3)]


def check_scale_is_a_query_factor(method, seq, scale):
    """``scale * q.k`` = ``(1/sqrt(d)) * (c q).k`` with ``c = scale sqrt(d)``: the run at ``scale`` equals the
    default-scale run on queries multiplied by ``c`` (same selections; outputs up to rounding)."""
    c = scale * np.sqrt(seq.q_seq.shape[2])
    a = run_decode(method, seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=seq.prefill_len, scale=scale)
    b = run_decode(method, seq.q_seq * c, seq.k_seq, seq.v_seq, prefill_len=seq.prefill_len)
    for t, (x, y) in enumerate(zip(a.steps, b.steps)):
        assert x.selection == y.selection, f"{method!r}, step {t}: selections differ at scale={scale}"
        np.testing.assert_allclose(x.output, y.output, rtol=1e-9, atol=1e-12, err_msg=f"{method!r}, step {t}")


@pytest.mark.parametrize("method", _scaled_methods(), ids=repr)
def test_stateful_oracles_form_every_logit_with_the_scale(method):
    for seed in range(3):
        seq = make_decode_sequence(18, 4, 2, 8, prefill_len=12, seed=seed, family="sink_and_local")
        for scale in (0.1, 1.3):
            check_scale_is_a_query_factor(method, seq, scale)


def test_a_prefill_that_forgets_the_scale_is_caught():
    from kvsparse.oracle.method import prefill_scale

    class ForgetsScaleAtPrefill(H2O):       # scores the prompt at 1/sqrt(d), then claims the scale
        def prefill(self, q, k, v, *, scale=None):
            return replace(super().prefill(q, k, v), scale=prefill_scale(scale, q.shape[2]))

    seq = make_decode_sequence(18, 4, 2, 8, prefill_len=12, seed=0, family="sink_and_local")
    check_scale_is_a_query_factor(H2O(heavy=3, recent=2), seq, 1.3)
    with pytest.raises(AssertionError, match="selections differ"):
        check_scale_is_a_query_factor(ForgetsScaleAtPrefill(heavy=3, recent=2), seq, 1.3)
