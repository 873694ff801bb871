"""Double Sparsity oracle: calibration, labels, quantization, all channels = exact top-k, traffic."""
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import Layout, Selection, core, kv_traffic
from kvsparse.oracle.double_sparsity import (DoubleSparsity, calibrate_channels, fake_quantize_per_token,
                                             interleaved_channels)
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input

INPUTS = decode_inputs(max_n=60, max_h_kv=2, max_group=3, head_dims=(1, 2, 4, 8, 16, 32))


def check_all_channels_is_exact_topk(method, q, k, v, budget):
    """With every channel in the label the selection is the exact top-k (core tie rule)."""
    sel = replace(method, r=q.shape[1], token_budget=budget).select(q, k, v)
    top = core.topk_indices(core.logits(q, k), budget)
    assert sel == Selection(tuple(np.sort(r) for r in top), k.shape[1])


def test_registered():
    registry.load_all()
    assert registry.get("double_sparsity").oracle is DoubleSparsity
    assert DoubleSparsity.family == "dynamic"


@given(inp=INPUTS, data=st.data())
@example(inp=make_decode_input(2, 1, 10, 4, "near_ties", 1), data=None)
def test_all_channels_is_exact_topk(inp, data):
    h_q, d = inp.q.shape
    n = inp.k.shape[1]
    if data is None:
        seed, budget = 0, 3
    else:
        seed, budget = data.draw(st.integers(0, 2**16)), data.draw(st.integers(1, max(1, n)))
    ranking = np.argsort(np.random.default_rng(seed).random((h_q, d)), axis=1)   # any ranking, per query head
    check_all_channels_is_exact_topk(DoubleSparsity(channels=ranking), inp.q, inp.k, inp.v, budget)


def test_planted_bug_query_label_ignores_the_ranking_is_caught():
    class Buggy(DoubleSparsity):
        def label_scores(self, q, k):
            ch = self.channels_per_query_head(q.shape[0], k.shape[0], q.shape[1])
            kv = core.kv_head_of(q.shape[0], k.shape[0])
            r = ch.shape[1]
            return np.stack([k[kv[h]][:, ch[h]] @ q[h, :r] for h in range(q.shape[0])])   # q not permuted
    inp = make_decode_input(2, 1, 30, 4, "gaussian", 0)
    ranking = np.array([[3, 1, 0, 2], [2, 0, 3, 1]])
    check_all_channels_is_exact_topk(DoubleSparsity(channels=ranking), inp.q, inp.k, inp.v, 5)
    with pytest.raises(AssertionError):
        check_all_channels_is_exact_topk(Buggy(channels=ranking), inp.q, inp.k, inp.v, 5)


@given(inp=INPUTS, data=st.data())
def test_budget_covering_context_is_dense(inp, data):
    n = inp.k.shape[1]
    m = DoubleSparsity(token_budget=data.draw(st.integers(n, 2 * n)), label_bits=data.draw(st.sampled_from([None, 4])))
    res = m.step(inp.q, inp.k, inp.v)
    assert res.selection == Selection.full(inp.q.shape[0], n)
    np.testing.assert_allclose(res.output, core.attend_dense(inp.q, inp.k, inp.v), rtol=1e-12, atol=1e-12)
    assert res.traffic.get("hbm", "metadata") == 0


def test_labels_use_the_top_r_channels_of_each_head():
    # d = 4, r = 1; head 0 ranks channel 2 first, head 1 channel 0; keys make the two choices disagree
    k = np.array([[[0.0, 0.0, 5.0, 0.0], [9.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]])
    q = np.ones((2, 4))
    m = DoubleSparsity(channels=[[2, 0, 1, 3], [0, 1, 2, 3]], r=1, token_budget=1)
    assert [list(ix) for ix in m.select(q, k, np.zeros_like(k)).indices] == [[0], [1]]
    np.testing.assert_array_equal(m.label_scores(q, k), [[5.0, 0.0, 1.0], [0.0, 9.0, 1.0]])
    # a ranking per KV head is shared by its query heads
    shared = DoubleSparsity(channels=[[2, 0, 1, 3]], r=1, token_budget=1)
    assert [list(ix) for ix in shared.select(q, k, np.zeros_like(k)).indices] == [[0], [0]]


def test_calibration_statistics_by_hand():
    # T = 2 tokens, H_q = 2, H_kv = 1, d = 3
    q = np.array([[[1.0, -4.0, 0.0], [0.0, 1.0, 2.0]],
                  [[3.0, 0.0, 0.0], [0.0, -1.0, 2.0]]])
    k = np.array([[[0.0, 1.0, 1.0]], [[2.0, 1.0, -3.0]]])
    # |q| means: head 0 (2, 2, 0) -> tie 0 before 1; head 1 (0, 1, 2)
    assert calibrate_channels(q, None, "q").tolist() == [[0, 1, 2], [2, 1, 0]]
    # |k| means per KV head: (1, 1, 2)
    assert calibrate_channels(None, k, "k").tolist() == [[2, 0, 1]]
    # |q k| means, each token with its own key: head 0 (3, 2, 0), head 1 (0, 1, 4)
    assert calibrate_channels(q, k, "qk").tolist() == [[0, 1, 2], [2, 1, 0]]
    # only the last token (the repo's qk file keeps its last block): head 0 (6, 0, 0), head 1 (0, 1, 6)
    assert calibrate_channels(q, k, "qk", last_tokens=1).tolist() == [[0, 1, 2], [2, 1, 0]]
    assert calibrate_channels(q, None, "q", last_tokens=1).tolist() == [[0, 1, 2], [2, 1, 0]]
    with pytest.raises(ValueError, match="needs k_calib"):
        calibrate_channels(q, None, "qk")
    with pytest.raises(ValueError, match="statistic"):
        calibrate_channels(q, k, "v")


def test_fake_quantize_by_hand():
    np.testing.assert_array_equal(fake_quantize_per_token([0.0, 1.0, 2.0, 3.0], 2), [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(fake_quantize_per_token([0.0, 0.4, 1.0], 1), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(fake_quantize_per_token([0.0, 0.5, 1.0], 1), [0.0, 0.0, 1.0])   # half to even
    np.testing.assert_array_equal(fake_quantize_per_token([0.0, 2.0, 3.0], 1), [0.0, 3.0, 3.0])
    np.testing.assert_array_equal(fake_quantize_per_token([[2.5, 2.5]], 4), [[2.5, 2.5]])         # constant row
    np.testing.assert_array_equal(fake_quantize_per_token([-1.0, 0.0, 14.0], 4), [-1.0, 0.0, 14.0])  # on the grid


def test_interleaved_channel_map():
    assert interleaved_channels(np.arange(8), 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_quantized_labels_select_the_budget():
    inp = make_decode_input(4, 2, 50, 16, "outlier_channels", 4)
    for m in DoubleSparsity.presets().values():
        sel = replace(m, token_budget=7).select(inp.q, inp.k, inp.v)
        assert (sel.sizes == 7).all()


def test_traffic_hand_count():
    # H_q = 4, H_kv = 2, n = 64, d = 16, r = 2, fp16 labels: 4 B per token
    inp = make_decode_input(4, 2, 64, 16, "gaussian", 5)
    res = DoubleSparsity(token_budget=8).step(inp.q, inp.k, inp.v)
    assert res.traffic.get("hbm", "metadata") == 64 * 4 * 2                        # per KV head (shared ranking)
    assert res.traffic.get("hbm", "keys") == kv_traffic(res.selection, 2, 16, Layout()).get("hbm", "keys")
    per_query = DoubleSparsity(channels=np.tile(np.arange(16), (4, 1)), token_budget=8)
    assert per_query.step(inp.q, inp.k, inp.v).traffic.get("hbm", "metadata") == 64 * 4 * 4
    # 4-bit labels: r = 2 channels -> 1 B, plus fp16 scale and zero -> 5 B per token
    res = DoubleSparsity(token_budget=8, label_bits=4).step(inp.q, inp.k, inp.v)
    assert res.traffic.get("hbm", "metadata") == 64 * 5 * 2
    res = DoubleSparsity(token_budget=8, kv_memory="pcie").step(inp.q, inp.k, inp.v)
    assert res.traffic.get("pcie", "values") == res.traffic.get("pcie", "keys") > 0
    assert res.traffic.get("hbm", "keys") == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels must have 1, H_kv=2 or H_q=4 rows"):
        inp = make_decode_input(4, 2, 20, 16)
        DoubleSparsity(channels=np.tile(np.arange(16), (3, 1)), token_budget=5).select(inp.q, inp.k, inp.v)
    with pytest.raises(ValueError, match="distinct"):
        DoubleSparsity(channels=[[0, 0, 1]])
    with pytest.raises(ValueError, match="label_bits"):
        DoubleSparsity(label_bits=3)
