"""Twilight oracle: top-p definitions (sort vs threshold search), minimality, the pipeline, traffic."""
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import Layout, Selection, core, kv_traffic
from kvsparse.oracle.double_sparsity import DoubleSparsity
from kvsparse.oracle.quest import Quest
from kvsparse.oracle.twilight import Twilight, top_p_search, top_p_sort
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input

P_VALUES = st.one_of(st.sampled_from([0.5, 0.85, 0.9, 0.99, 1.0]), st.floats(0.01, 1.0))


@st.composite
def probability_rows(draw):
    """Probability vectors with ties, zeros and peaks: softmax of small integers or of normal logits."""
    m = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["integers", "normal", "peaked"]))
    if kind == "integers":          # many exact ties
        logits = rng.integers(-3, 3, size=m).astype(float)
    elif kind == "normal":
        logits = rng.standard_normal(m)
    else:
        logits = rng.standard_normal(m) * 30
    return core.softmax(logits)


def rank_order(probs):
    """The core tie rule: higher probability first, lower index first among equals."""
    return sorted(range(len(probs)), key=lambda i: (-probs[i], i))


def check_smallest_set(probs, kept_mask, p):
    """Kept mass >= p; the kept set is a prefix of the tie-rule order; dropping its last token goes below p."""
    order = rank_order(probs)
    kept = [i for i in order if kept_mask[i]]
    assert kept == order[:len(kept)], "not a prefix of the tie-rule order"
    total = math.fsum(probs)
    if p >= 1 or total < p:
        assert len(kept) == len(probs) or math.fsum(probs[kept]) >= p
        return
    assert math.fsum(probs[kept]) >= p
    assert math.fsum(probs[kept[:-1]]) < p


def test_registered():
    registry.load_all()
    assert registry.get("twilight").oracle is Twilight and Twilight.family == "dynamic"


@given(probs=probability_rows(), p=P_VALUES)
@example(probs=np.array([0.25, 0.25, 0.25, 0.25]), p=0.5)
def test_sort_top_p_is_the_smallest_set(probs, p):
    check_smallest_set(probs, top_p_sort(probs, p), p)


def test_planted_bug_keep_one_more_is_caught():
    probs = core.softmax(np.array([3.0, 1.0, 2.0, 0.0]))
    p = 0.8
    good = top_p_sort(probs, p)
    check_smallest_set(probs, good, p)
    order = rank_order(probs)
    bad = good.copy()
    bad[order[int(good.sum())]] = True      # an off-by-one that keeps the next token too
    with pytest.raises(AssertionError):
        check_smallest_set(probs, bad, p)


@given(probs=probability_rows(), p=P_VALUES)
def test_search_equals_sort_without_a_tie_at_the_threshold(probs, p):
    sort_mask = top_p_sort(probs, p)
    v = probs[sort_mask].min()
    assume(np.count_nonzero(probs == v) == 1)          # the threshold value is not tied
    np.testing.assert_array_equal(top_p_search(probs, p), sort_mask)


@given(probs=probability_rows(), p=P_VALUES)
def test_search_keeps_every_tie_at_the_threshold(probs, p):
    mask = top_p_search(probs, p)
    v = probs[top_p_sort(probs, p)].min()
    np.testing.assert_array_equal(mask, probs >= v)    # {p_i >= v}: the sort set plus every token tied with v
    assert math.fsum(probs[mask]) >= p or p >= math.fsum(probs)


def test_ties_at_the_threshold_by_hand():
    probs = np.array([0.4, 0.2, 0.2, 0.2])
    assert top_p_sort(probs, 0.55).tolist() == [True, True, False, False]      # lower index wins the tie
    assert top_p_search(probs, 0.55).tolist() == [True, True, True, True]      # the threshold keeps all ties


def test_reference_bracket_and_epsilon():
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    # bracket at p_0 = 0.05 < max: (0, 0.05] holds one value, so the first iteration stops with
    # low = 0.025 and keeps {p_i > 0.025}: everything, although {0.5, 0.3} already has mass 0.8
    assert top_p_search(probs, 0.6, high=probs[0], epsilon=1e-5).tolist() == [True, True, True, True]
    assert top_p_search(probs, 0.6).tolist() == [False, True, True, False]
    # values closer than epsilon at the threshold are all kept
    close = np.array([0.6, 0.200001, 0.199999])
    assert top_p_search(close, 0.7, epsilon=1e-5).tolist() == [True, True, True]
    assert top_p_search(close, 0.7).tolist() == [True, True, False]


def check_twilight_minimality(m, inp):
    """Per query head: kept within the candidates, and the smallest set of the estimate ``p_hat``.
    Exact keys: ``p_hat`` is the softmax of the true logits over the candidates (computed here); 4-bit
    keys: ``p_hat`` is the method's own estimate (its values are checked by hand in
    ``test_four_bit_estimate_by_hand``)."""
    cand, kept = m.select_with_candidates(inp.q, inp.k, inp.v)
    if m.quant_bits is None:
        s = core.logits(inp.q, inp.k)
        estimate = [core.softmax(s[h, c]) for h, c in enumerate(cand.indices)]
    else:
        estimate = m.estimated_probabilities(inp.q, inp.k, cand)
    for c, kp, probs in zip(cand.indices, kept.indices, estimate):
        assert set(kp) <= set(c)
        check_smallest_set(probs, np.isin(c, kp), m.p)


@given(inp=decode_inputs(max_n=60, max_h_kv=2, max_group=2, head_dims=(2, 4, 8, 16)), p=P_VALUES,
       budget=st.integers(1, 70), page=st.sampled_from([1, 4, 16]), use_ds=st.booleans(),
       quant_bits=st.sampled_from([None, 4]))
def test_twilight_keeps_the_smallest_set_of_its_estimate(inp, p, budget, page, use_ds, quant_bits):
    base = DoubleSparsity(token_budget=budget, label_bits=4) if use_ds else Quest(token_budget=budget, page_size=page)
    check_twilight_minimality(Twilight(base=base, p=p, quant_bits=quant_bits), inp)


def test_planted_bug_pruning_on_exact_probabilities_is_caught():
    """A Twilight that prunes on the exact probabilities although its keys are 4-bit (its estimate
    itself is right) passes the exact-key check and is caught by the 4-bit one."""
    class PrunesOnExact(Twilight):
        def select_with_candidates(self, q, k, v):
            return Twilight.select_with_candidates(replace(self, quant_bits=None), q, k, v)
    inp = make_decode_input(2, 1, 48, 8, "gaussian", 5)
    base = Quest(token_budget=48, page_size=1, dense_if_budget_covers=False)
    check_twilight_minimality(Twilight(base=base, p=0.85, quant_bits=4), inp)
    check_twilight_minimality(PrunesOnExact(base=base, p=0.85, quant_bits=None), inp)
    with pytest.raises(AssertionError):
        check_twilight_minimality(PrunesOnExact(base=base, p=0.85, quant_bits=4), inp)


@given(inp=decode_inputs(max_n=60, max_h_kv=2, max_group=2, head_dims=(2, 4, 8, 16)),
       base=st.sampled_from(["quest", "ds"]), preset=st.sampled_from(["canonical", "search", "twilight-quest"]))
def test_p_one_and_covering_budget_is_dense(inp, base, preset):
    n = inp.k.shape[1]
    selector = Quest(token_budget=n) if base == "quest" else DoubleSparsity(token_budget=n)
    m = replace(Twilight.presets()[preset], base=selector, p=1.0)
    res = m.step(inp.q, inp.k, inp.v)
    assert res.selection == Selection.full(inp.q.shape[0], n)
    np.testing.assert_allclose(res.output, core.attend_dense(inp.q, inp.k, inp.v), rtol=1e-12, atol=1e-12)


def test_four_bit_estimate_by_hand():
    # one key per token, d = 2; 4-bit per-token min-max keeps (0, 15) and (1, 2) exactly; q = (1, 1)
    k = np.array([[[0.0, 15.0], [1.0, 2.0], [3.0, 3.0]]])
    q = np.array([[1.0, 1.0]])
    m = Twilight(base=Quest(token_budget=3, page_size=1), p=0.5)
    probs = m.estimated_probabilities(q, k, Selection.full(1, 3))[0]
    np.testing.assert_allclose(probs, core.softmax(np.array([15.0, 3.0, 6.0]) / math.sqrt(2)), rtol=1e-15)
    assert list(m.select(q, k, np.zeros_like(k)).indices[0]) == [0]


def test_dense_first_layers():
    inp = make_decode_input(4, 2, 40, 8, "gaussian", 0)
    res = Twilight(layer=1).step(inp.q, inp.k, inp.v)
    assert res.selection == Selection.full(4, 40)
    assert res.traffic == kv_traffic(res.selection, 2, 8, Layout())


def test_traffic_hand_count():
    # H_q = 4, H_kv = 2, n = 64, d = 16, Quest base budget 32 at page 16: metadata of 4 pages per KV head
    inp = make_decode_input(4, 2, 64, 16, "sink_and_local", 1)
    m = Twilight(base=Quest(token_budget=32, page_size=16), p=0.85)
    res = m.step(inp.q, inp.k, inp.v)
    cand = m.candidates(inp.q, inp.k, inp.v)
    union_rows = sum(u.size for u in cand.kv_union(2))
    assert res.traffic.get("hbm", "metadata") == 2 * 4 * 32 * 2                  # min+max, 4 pages, 32 B, 2 heads
    assert res.traffic.get("hbm", "auxiliary") == union_rows * (16 * 4 // 8 + 4)  # int4 row + fp16 scale, zero
    assert res.traffic.get("hbm", "keys") == kv_traffic(res.selection, 2, 16, Layout()).get("hbm", "keys")
    exact = replace(m, quant_bits=None).step(inp.q, inp.k, inp.v)
    assert exact.traffic.get("hbm", "keys") == (kv_traffic(exact.selection, 2, 16, Layout()).get("hbm", "keys")
                                                 + union_rows * 32)
    with pytest.raises(ValueError, match="candidates"):
        m.traffic(res.selection, h_kv=2, d=16, layout=Layout())


def test_bad_arguments():
    with pytest.raises(TypeError, match="base"):
        Twilight(base=Twilight())
    with pytest.raises(ValueError, match="p must be"):
        Twilight(p=0.0)
    with pytest.raises(ValueError, match="p must be"):
        top_p_sort([0.5, 0.5], 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        top_p_search([-0.1, 1.1], 0.5)


@pytest.mark.parametrize("cls_name", ["quest", "sparq", "double_sparsity", "twilight"])
def test_every_preset_runs_on_a_small_gqa_input(cls_name):
    registry.load_all()
    inp = make_decode_input(8, 2, 70, 16, "sink_and_local", 7)
    for preset, method in registry.get(cls_name).oracle.presets().items():
        res = method.step(inp.q, inp.k, inp.v)
        assert res.output.shape == (8, 16) and np.isfinite(res.output).all(), preset
        assert (res.selection.sizes >= 1).all() and res.selection.n == 70, preset
        assert res.traffic.get("hbm", "keys") + res.traffic.get("pcie", "keys") > 0, preset
