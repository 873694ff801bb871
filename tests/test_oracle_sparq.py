"""SparQ oracle: r = d is exact top-k with alpha = exact mass; presets; the temperature; traffic."""
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import Layout, Selection, core, kv_traffic
from kvsparse.oracle.sparq import SparQ
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input

INPUTS = decode_inputs(max_n=60, max_h_kv=2, max_group=3, head_dims=(1, 2, 4, 8, 16, 32))


def exact_topk_and_mass(q, k, budget):
    s = core.logits(q, k)
    top = [np.sort(r) for r in core.topk_indices(s, budget)]
    p = core.softmax(s)
    return top, np.array([math.fsum(p[h, ix]) for h, ix in enumerate(top)])


def check_full_rank_is_exact(method, q, k, v):
    d, n = q.shape[1], k.shape[1]
    m = replace(method, r=d)
    budget = m.tokens(n)
    res = m.step(q, k, v)
    top, mass = exact_topk_and_mass(q, k, budget)
    assert res.selection == Selection(tuple(top), n)
    alpha = m.alpha(m.approximate(q, k))
    np.testing.assert_array_equal(alpha, mass if budget < n else np.ones(q.shape[0]))
    y = core.attend_indices(q, k, v, top)
    mean_v = core.expand_kv(v.mean(axis=1), q.shape[0])
    np.testing.assert_allclose(res.output, alpha[:, None] * y + (1 - alpha[:, None]) * mean_v, rtol=1e-12, atol=1e-12)


def test_registered():
    registry.load_all()
    assert registry.get("sparq").oracle is SparQ and SparQ.family == "dynamic"


@given(inp=INPUTS, data=st.data())
@example(inp=make_decode_input(4, 2, 12, 4, "near_ties", 5), data=None)
def test_full_rank_is_exact_topk_and_exact_mass(inp, data):
    n = inp.k.shape[1]
    k = data.draw(st.integers(1, max(1, n))) if data is not None else 3
    check_full_rank_is_exact(SparQ(k=k), inp.q, inp.k, inp.v)


def test_planted_bug_alpha_over_selection_only_is_caught():
    """alpha taken as the softmax mass *within* the selection (always 1) fails the property."""
    class Buggy(SparQ):
        def alpha(self, approx):
            return np.ones(approx.probs.shape[0])
    inp = make_decode_input(2, 1, 20, 8, "gaussian", 0)
    check_full_rank_is_exact(SparQ(k=5), inp.q, inp.k, inp.v)
    with pytest.raises(AssertionError):
        check_full_rank_is_exact(Buggy(k=5), inp.q, inp.k, inp.v)


@given(inp=INPUTS, data=st.data())
def test_budget_covering_context_is_dense(inp, data):
    n = inp.k.shape[1]
    research = replace(SparQ.presets()["llm-inference-research"], k=max(1, n - 1))   # selects k + 1 = n
    for method in (SparQ(k=data.draw(st.integers(n, 2 * n))), research, SparQ(compression_ratio=1, allocated_len=2 * n)):
        res = method.step(inp.q, inp.k, inp.v)
        assert res.selection == Selection.full(inp.q.shape[0], n)
        np.testing.assert_allclose(res.output, core.attend_dense(inp.q, inp.k, inp.v), rtol=1e-12, atol=1e-12)
        assert res.traffic.get("hbm", "auxiliary") == 0


@given(inp=decode_inputs(max_n=60, max_h_kv=3, group=1, head_dims=(4, 8, 16)), k=st.integers(1, 20),
       r=st.integers(1, 4))
def test_group_mode_equals_per_head_without_gqa(inp, k, r):
    a = SparQ(k=k, r=r).step(inp.q, inp.k, inp.v)
    b = SparQ(k=k, r=r, gqa="group").step(inp.q, inp.k, inp.v)
    assert a.selection == b.selection
    np.testing.assert_array_equal(a.output, b.output)


@given(inp=decode_inputs(min_n=3, max_n=60, max_h_kv=2, max_group=4, head_dims=(4, 8, 16)), k=st.integers(1, 10))
def test_research_preset_shares_tokens_and_forces_the_current_token(inp, k):
    m = replace(SparQ.presets()["llm-inference-research"], k=k)
    n, g = inp.k.shape[1], inp.q.shape[0] // inp.k.shape[0]
    sel = m.select(inp.q, inp.k, inp.v)
    for h, ix in enumerate(sel.indices):
        assert ix.size == min(n, k + 1) and ix[-1] == n - 1
        np.testing.assert_array_equal(ix, sel.indices[(h // g) * g])


def test_temperature_hand_example():
    # q = (3, -1, 0.5, 0), r = 1: channel 0; tau = sqrt(4 * 3 / 4.5); s_j = 3 k_j0 / tau
    q = np.array([[3.0, -1.0, 0.5, 0.0]])
    k = np.array([[[1.0, 5.0, 0.0, 0.0], [0.0, 0.0, 9.0, 0.0], [2.0, -3.0, 0.0, 1.0]]])
    approx = SparQ(r=1, k=1).approximate(q, k)
    tau = math.sqrt(4 * 3 / 4.5)
    assert list(approx.channels[0]) == [0]
    assert approx.tau[0] == pytest.approx(tau, rel=1e-15)
    np.testing.assert_allclose(approx.logits[0], [3 / tau, 0.0, 6 / tau], rtol=1e-15)
    assert list(approx.selected[0]) == [2]
    e = np.exp(np.array([3, 0, 6]) / tau)
    assert SparQ(r=1, k=1).alpha(approx)[0] == pytest.approx(e[2] / e.sum(), rel=1e-14)


def test_group_channels_sum_magnitudes():
    # head 0 favours channel 0 slightly, head 1 channel 1 strongly: the group picks channel 1
    q = np.array([[2.0, 1.9, 0.0], [0.0, 3.0, 0.1]])
    k = np.zeros((1, 4, 3))
    approx = SparQ(r=1, k=2, gqa="group").approximate(q, k)
    assert approx.channels.tolist() == [[1], [1]]
    assert SparQ(r=1, k=2).approximate(q, k).channels.tolist() == [[0], [1]]


def test_zero_query_is_finite():
    inp = make_decode_input(2, 1, 10, 4, "gaussian", 0)
    res = SparQ(k=3, r=2).step(np.zeros((2, 4)), inp.k, inp.v)
    assert np.isfinite(res.output).all()
    assert [list(ix) for ix in res.selection.indices] == [[0, 1, 2], [0, 1, 2]]   # all scores 0: lower index


def test_budget_rules():
    m = SparQ()
    assert (m.rank(128), m.tokens(32768), m.tokens(10)) == (16, 2048, 1)
    gpt = SparQ.presets()["sparq-gpt-fast"]
    assert gpt.rank(4) == 1 and replace(gpt, allocated_len=40).tokens(30) == 2   # round(40 / 16) = 2 (half-even)
    assert replace(gpt, allocated_len=4096).tokens(100) == 100                    # k = 256 capped at n


def test_traffic_hand_count():
    # H_q = 4, H_kv = 2, n = 64, d = 16: r = 2, k = 4; fp16
    inp = make_decode_input(4, 2, 64, 16, "gaussian", 3)
    res = SparQ().step(inp.q, inp.k, inp.v)
    kv = kv_traffic(res.selection, 2, 16, Layout())
    assert res.traffic.get("hbm", "keys") == kv.get("hbm", "keys") + 64 * 2 * 2 * 4    # n r b_e per query head
    assert res.traffic.get("hbm", "auxiliary") == 16 * 2 * 2                           # mean(V) per KV head
    res = SparQ(gqa="group").step(inp.q, inp.k, inp.v)
    assert res.traffic.get("hbm", "keys") == kv_traffic(res.selection, 2, 16, Layout()).get("hbm", "keys") + 64 * 2 * 2 * 2
    res = SparQ.presets()["sparq-gpt-fast"].step(inp.q, inp.k, inp.v)
    assert res.traffic.get("hbm", "keys") == kv_traffic(res.selection, 2, 16, Layout()).get("hbm", "keys")
    assert res.traffic.get("hbm", "auxiliary") == 64 * 2 * 2 * 4 + 16 * 4 * 2         # K^T columns + fp32 mean


def test_bad_arguments():
    with pytest.raises(ValueError, match="gqa"):
        SparQ(gqa="shared")
    with pytest.raises(TypeError, match="k must be an integer"):
        SparQ(k=2.0)
    with pytest.raises(TypeError, match="reallocate"):
        SparQ(reallocate=1)


def test_attend_rejects_a_foreign_selection():
    inp = make_decode_input(2, 1, 20, 8, "gaussian", 0)
    with pytest.raises(ValueError, match="selection must be the one SparQ.select returns"):
        SparQ(k=3).attend(inp.q, inp.k, inp.v, Selection(([0, 1, 2], [0, 1, 2]), 20))
