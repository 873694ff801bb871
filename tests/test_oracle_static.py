"""Static patterns: sliding window, StreamingLLM, BigBird (causal decode), Longformer (causal decode)."""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import Layout, Selection, core, run_decode
from kvsparse.oracle.bigbird import BigBird, bigbird_blocks
from kvsparse.oracle.dense import Dense
from kvsparse.oracle.longformer import Longformer, longformer_mask
from kvsparse.oracle.sliding_window import SlidingWindow
from kvsparse.oracle.streaming_llm import StreamingLLM
from kvsparse.property_tests.sequences import decode_sequences, make_decode_sequence, sizes
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input

SMALL = dict(max_n=60, max_h_kv=2, max_group=2, head_dims=(2, 4, 8))


def full_cache(seq, t):
    """Keys/values of tokens 0..t in cache layout [H_kv, t+1, d]."""
    return seq.k_seq[: t + 1].transpose(1, 0, 2), seq.v_seq[: t + 1].transpose(1, 0, 2)


def test_registered_static():
    registry.load_all()
    for name, cls in [("sliding_window", SlidingWindow), ("streaming_llm", StreamingLLM),
                      ("bigbird", BigBird), ("longformer", Longformer)]:
        assert registry.get(name).oracle is cls and cls.family == "static"
        assert "canonical" in cls.presets()


# --- the window and its off-by-one -------------------------------------------------------------

def check_window_selection(method, n, window, includes_current=True):
    """The window property, stated from the definition: exactly the latest min(n, span) positions."""
    q, k, v = np.zeros((1, 2)), np.zeros((1, n, 2)), np.zeros((1, n, 2))
    span = window if includes_current else window + 1
    got = method.select(q, k, v, positions=np.arange(n)).indices[0]
    assert list(got) == list(range(max(0, n - span), n)), (n, window, list(got))


@given(n=st.integers(1, 40), window=st.integers(1, 45), includes=st.booleans())
@example(n=5, window=5, includes=True)
@example(n=5, window=4, includes=False)
def test_window_is_the_latest_span(n, window, includes):
    check_window_selection(SlidingWindow(window=window, recent_includes_current=includes), n, window, includes)


def test_planted_off_by_one_window_is_caught():
    class OffByOne(SlidingWindow):
        def select(self, q, k, v, *, positions=None):       # reads one token too many
            sel = SlidingWindow(window=self.window + 1).select(q, k, v, positions=positions)
            return sel
    check_window_selection(OffByOne(window=3), 2, 3)        # a short context cannot tell...
    with pytest.raises(AssertionError):
        check_window_selection(OffByOne(window=3), 10, 3)    # ...a long one does


def test_window_hand_example():
    q, k, v = np.zeros((2, 2)), np.zeros((1, 7, 2)), np.zeros((1, 7, 2))
    assert list(SlidingWindow(window=3).select(q, k, v).indices[1]) == [4, 5, 6]
    assert list(StreamingLLM(sinks=2, recent=3).select(q, k, v).indices[0]) == [0, 1, 4, 5, 6]
    assert list(StreamingLLM(sinks=2, recent=3, recent_includes_current=False).select(q, k, v).indices[0]) == [
        0, 1, 3, 4, 5, 6]
    assert list(Longformer(window=2, global_tokens=(0, 5)).select(q, k, v).indices[0]) == [0, 4, 5, 6]
    assert list(Longformer(window=2, dilation=2, global_tokens=()).select(q, k, v).indices[0]) == [2, 4, 6]
    assert list(Longformer(window=1, global_tokens=(6,)).select(q, k, v).indices[0]) == list(range(7))


# --- budget covering the context is dense attention, exactly --------------------------------------

@given(inp=decode_inputs(**SMALL), extra=st.integers(0, 3))
def test_covering_budget_is_dense_exactly(inp, extra):
    n = inp.shapes.n
    dense = Dense().step(inp.q, inp.k, inp.v).output
    for m in (SlidingWindow(window=n + extra), StreamingLLM(sinks=extra, recent=n),
              StreamingLLM(sinks=n + extra, recent=0), Longformer(window=n - 1 + extra),
              BigBird(block_size=4, window_blocks=-(-n // 4) + extra)):
        res = m.step(inp.q, inp.k, inp.v)
        assert (res.selection.sizes == n).all(), m
        np.testing.assert_array_equal(res.output, dense)


@given(seq=decode_sequences(max_length=30), recent=sizes(12))
@example(seq=make_decode_sequence(6, 2, 1, 4, prefill_len=5), recent=1)
def test_streaming_llm_without_sinks_is_the_window(seq, recent):
    if recent == 0:
        recent = 1
    a = run_decode(StreamingLLM(sinks=0, recent=recent), seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=seq.prefill_len)
    b = run_decode(SlidingWindow(window=recent), seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=seq.prefill_len)
    for x, y in zip(a.steps, b.steps):
        assert x.selection == y.selection
        np.testing.assert_array_equal(x.output, y.output)
        assert x.traffic == y.traffic


@given(seq=decode_sequences(max_length=30), sinks=sizes(8, context=30), recent=sizes(10), includes=st.booleans())
def test_streaming_llm_size_closed_form_and_always_kept(seq, sinks, recent, includes):
    if sinks + recent == 0:
        recent = 1
    m = StreamingLLM(sinks=sinks, recent=recent, recent_includes_current=includes)
    run = run_decode(m, seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=seq.prefill_len)
    span = recent if includes else recent + 1
    for j, step in enumerate(run.steps):
        n = seq.prefill_len + j + 1
        kept = set(step.selection.indices[0])
        assert len(kept) == min(n, sinks + span)
        assert set(range(min(sinks, n))) <= kept and set(range(max(0, n - span), n)) <= kept
        # the stateless rule over the full cache gives the same step
        k, v = full_cache(seq, n - 1)
        assert m.select(seq.q_seq[n - 1], k, v) == step.selection


def test_kvpress_streaming_prefill_once_counts():
    seq = make_decode_sequence(24, 2, 1, 4, prefill_len=20)
    m = StreamingLLM(sinks=4, schedule="prefill_once", compression_ratio=0.3, ratio_rounding="float")
    run = run_decode(m, seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=20)
    n_kept = int(20 * (1 - 0.3))                        # 14: 4 sinks + the last 10 prompt tokens
    assert list(run.steps[0].selection.indices[0]) == [0, 1, 2, 3] + list(range(10, 21))
    assert [int(s.selection.sizes[0]) for s in run.steps] == [n_kept + 1, n_kept + 2, n_kept + 3, n_kept + 4]
    with pytest.raises(ValueError, match="more prompt tokens than sinks"):
        m.prefill(seq.q_seq[:4], seq.k_seq[:4], seq.v_seq[:4])


# --- RoPE conventions ----------------------------------------------------------------------------

def rope_sequence(seed=0, t=16, d=8):
    seq = make_decode_sequence(t, 4, 2, d, prefill_len=min(10, t - 1), seed=seed)
    pos = np.arange(t)
    q_rot = core.rope_apply(seq.q_seq.transpose(1, 0, 2), pos).transpose(1, 0, 2)
    k_rot = core.rope_apply(seq.k_seq.transpose(1, 0, 2), pos).transpose(1, 0, 2)
    return seq, q_rot, k_rot


def test_rope_modes_agree_with_explicit_rotation():
    seq, q_rot, k_rot = rope_sequence()
    run = lambda m, q, k: run_decode(m, q, k, seq.v_seq, prefill_len=seq.prefill_len).steps
    base = dict(sinks=2, recent=4)
    given_ = run(StreamingLLM(**base), q_rot, k_rot)
    original = run(StreamingLLM(**base, rope="original"), seq.q_seq, seq.k_seq)
    slots_pre = run(StreamingLLM(**base, rope="cache_index"), seq.q_seq, seq.k_seq)
    slots_post = run(StreamingLLM(**base, rope="cache_index", inputs_rotated=True), q_rot, k_rot)
    for a, b, c, e in zip(given_, original, slots_pre, slots_post):
        np.testing.assert_allclose(b.output, a.output, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(e.output, c.output, rtol=1e-12, atol=1e-12)   # rerotate == rotate pre-RoPE
    # once tokens are evicted, slot positions differ from original ones: the outputs must differ
    assert not np.allclose(slots_pre[-1].output, original[-1].output)
    # while nothing is evicted the slots ARE the positions
    full = dict(sinks=2, recent=100)
    a = run(StreamingLLM(**full, rope="cache_index"), seq.q_seq, seq.k_seq)[-1].output
    b = run(StreamingLLM(**full, rope="original"), seq.q_seq, seq.k_seq)[-1].output
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_cache_index_matches_hand_rotation():
    """The paper's example: cached [0,1,2,3,6,7,8] decoding 9 use positions 0..7."""
    seq, _, _ = rope_sequence(t=10)
    m = StreamingLLM(sinks=4, recent=4, rope="cache_index")
    step = run_decode(m, seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=9).steps[-1]
    kept = [0, 1, 2, 3, 6, 7, 8, 9]
    assert list(step.selection.indices[0]) == kept
    k = core.rope_apply(seq.k_seq[kept].transpose(1, 0, 2), np.arange(8))
    q = core.rope_apply(seq.q_seq[9][:, None, :], [7])[:, 0]
    np.testing.assert_allclose(step.output, core.attend_dense(q, k, seq.v_seq[kept].transpose(1, 0, 2)), rtol=1e-12)


# --- permutation of cache slots ------------------------------------------------------------------

@given(inp=decode_inputs(**SMALL), seed=st.integers(0, 2**31))
def test_permuting_slots_with_positions_leaves_output(inp, seed):
    perm = np.random.default_rng(seed).permutation(inp.shapes.n)
    methods = [SlidingWindow(window=5), StreamingLLM(sinks=2, recent=4), Longformer(window=3, dilation=2),
               BigBird(block_size=3, window_blocks=2, random_blocks=2, seed=seed % 7)]
    for m in methods:
        a = m.step(inp.q, inp.k, inp.v)
        b = m.step(inp.q, inp.k[:, perm], inp.v[:, perm], positions=perm)
        np.testing.assert_allclose(b.output, a.output, rtol=1e-12, atol=1e-12)
        assert [sorted(perm[ix]) for ix in b.selection.indices] == [list(ix) for ix in a.selection.indices]
        assert b.traffic == a.traffic


# --- BigBird and Longformer specifics ----------------------------------------------------------------

@given(qb=st.integers(0, 40), head=st.integers(0, 7), g=st.integers(0, 3), w=st.integers(1, 4),
       r=st.integers(0, 5), seed=st.integers(0, 100), layer=st.integers(0, 3))
def test_bigbird_block_plan(qb, head, g, w, r, seed, layer):
    kw = dict(global_blocks=g, window_blocks=w, random_blocks=r, seed=seed, layer=layer)
    blocks = bigbird_blocks(qb, head, **kw)
    np.testing.assert_array_equal(blocks, bigbird_blocks(qb, head, **kw))           # deterministic
    window = set(range(max(0, qb - w + 1), qb + 1))
    glob = set(range(min(g, qb + 1)))
    rand = set(blocks.tolist()) - window - glob
    candidates = set(range(min(g, max(0, qb - w + 1)), max(0, qb - w + 1)))
    assert window | glob <= set(blocks.tolist()) and rand <= candidates
    assert len(rand) == min(r, len(candidates))
    assert blocks.max() <= qb                                                         # causal


def test_bigbird_seeds_differ_and_selection_is_per_head():
    plans = {tuple(bigbird_blocks(30, 0, global_blocks=1, window_blocks=3, random_blocks=3, seed=s, layer=0))
             for s in range(20)}
    assert len(plans) > 10
    inp = make_decode_input(4, 2, 200, 4, seed=1)
    sel = BigBird(block_size=8).step(inp.q, inp.k, inp.v).selection
    assert len({tuple(ix) for ix in sel.indices}) > 1


def test_longformer_global_token_counted_once():
    """Global 7 is inside the window: attended once. A gather that lists it twice is detected."""
    inp = make_decode_input(2, 1, 10, 4, seed=3)
    res = Longformer(window=3, global_tokens=(0, 7)).step(inp.q, inp.k, inp.v)
    assert list(res.selection.indices[0]) == [0, 6, 7, 8, 9]
    once = core.attend_indices(inp.q, inp.k, inp.v, [[0, 6, 7, 8, 9]] * 2)
    np.testing.assert_allclose(res.output, once, rtol=1e-13)
    twice = core.attend_indices(inp.q, inp.k, inp.v, [[0, 6, 7, 8, 9]] * 2, [[1.0, 1.0, 2.0, 1.0, 1.0]] * 2)
    assert not np.allclose(res.output, twice, rtol=1e-6)


def check_longformer_globals(method, positions):
    """Every global token the cache holds (all are <= the current, largest, position) is selected, and
    the selection is exactly the dilated band plus those globals (everything if the current token is
    global), stated over positions, whatever slot holds them."""
    n = positions.size
    q, k, v = np.zeros((2, 2)), np.zeros((1, n, 2)), np.zeros((1, n, 2))
    sel = method.select(q, k, v, positions=positions)
    assert all(list(ix) == list(sel.indices[0]) for ix in sel.indices)
    chosen = {int(positions[i]) for i in sel.indices[0]}
    cur = int(positions.max())
    held = {int(p) for p in positions}
    globals_held = {g for g in method.global_tokens if g in held}
    assert globals_held <= chosen, (sorted(globals_held - chosen), cur)
    if cur in method.global_tokens:
        expected = held
    else:
        w, delta = method.window, method.dilation
        expected = {p for p in held if (cur - p) % delta == 0 and cur - p <= w * delta} | globals_held
    assert chosen == expected, (sorted(chosen ^ expected), cur)


@given(n=st.integers(1, 60), window=st.integers(0, 8), dilation=st.integers(1, 3),
       global_tokens=st.lists(st.integers(0, 80), unique=True, max_size=6), holes=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_longformer_selects_every_global_token_up_to_the_current_position(n, window, dilation, global_tokens,
                                                                          holes, seed):
    """Random global sets and n; the cache either holds 0..n-1 in order, or n distinct positions of
    0..79 (the latest one current) in a random slot order (an evicted or permuted cache)."""
    rng = np.random.default_rng(seed)
    positions = rng.choice(80, size=n, replace=False) if holes else np.arange(n)
    check_longformer_globals(Longformer(window=window, dilation=dilation, global_tokens=tuple(global_tokens)),
                             positions)


def test_planted_bug_matching_globals_by_slot_is_caught():
    """Globals matched against slot indices instead of positions: right for a 0..n-1 cache only."""
    class GlobalsBySlot(Longformer):
        def select(self, q, k, v, *, positions=None):
            pos = np.arange(k.shape[1]) if positions is None else np.asarray(positions)
            keep = longformer_mask(pos, self.window, self.dilation, ()) | np.isin(np.arange(pos.size),
                                                                                  self.global_tokens)
            return Selection(tuple(np.flatnonzero(keep) for _ in range(q.shape[0])), pos.size)
    m = GlobalsBySlot(window=2, global_tokens=(0, 3))
    check_longformer_globals(m, np.arange(12))
    with pytest.raises(AssertionError):
        check_longformer_globals(m, np.array([5, 3, 11, 0, 7, 9, 10, 2]))


def test_static_traffic_is_the_selected_rows():
    inp = make_decode_input(4, 2, 64, 8, seed=0)
    layout = Layout(element_bits=16, page_size=1)
    res = Longformer(window=9, global_tokens=(0, 1)).step(inp.q, inp.k, inp.v, layout=layout)
    assert res.traffic.get("hbm", "keys") == 2 * 12 * 8 * 2 and res.traffic.get("hbm", "values") == 2 * 12 * 8 * 2


def test_bad_parameters():
    with pytest.raises(ValueError, match="window"):
        SlidingWindow(window=0)
    with pytest.raises(ValueError, match="rope"):
        StreamingLLM(rope="slots")
    with pytest.raises(ValueError, match="compression_ratio"):
        StreamingLLM(schedule="prefill_once")
    with pytest.raises(TypeError, match="global_tokens"):
        Longformer(global_tokens=[0])
    with pytest.raises(ValueError, match="dilation"):
        Longformer(dilation=0)
