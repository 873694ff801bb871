"""Deja Vu head sparsity: all heads ≡ dense, skipped heads output 0, the oracle predictor, bytes by hand."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse.oracle import core
from kvsparse.oracle.deja_vu import DejaVu, head_output_norms
from kvsparse.oracle.types import Layout, Selection, kv_traffic
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input


@given(inp=decode_inputs(max_n=80), page=st.integers(1, 4), share=st.booleans())
@example(inp=make_decode_input(1, 1, 2, 2, seed=0), page=1, share=False)   # gather-then-attend rounded differently
def test_all_heads_kept_is_dense(inp, page, share):
    layout = Layout(16, page, share)
    for m in (DejaVu.presets()["all-heads"], DejaVu(head_mask=(True,) * inp.q.shape[0])):
        got = m.step(inp.q, inp.k, inp.v, layout=layout)
        np.testing.assert_array_equal(got.output, core.attend_dense(inp.q, inp.k, inp.v))
        assert got.traffic == kv_traffic(Selection.full(inp.q.shape[0], inp.k.shape[1]), inp.k.shape[0],
                                         inp.k.shape[2], layout)


@given(inp=decode_inputs(max_n=60), data=st.data())
def test_kept_heads_are_exact_and_skipped_heads_are_zero(inp, data):
    h_q = inp.q.shape[0]
    mask = tuple(data.draw(st.lists(st.booleans(), min_size=h_q, max_size=h_q)))
    out = DejaVu(head_mask=mask).step(inp.q, inp.k, inp.v).output
    dense = core.attend_dense(inp.q, inp.k, inp.v)
    keep = np.array(mask)
    np.testing.assert_array_equal(out[keep], dense[keep])
    assert not out[~keep].any()


@given(inp=decode_inputs(max_n=60), budget=st.integers(0, 12))
def test_oracle_predictor_keeps_the_largest_outputs(inp, budget):
    keep = DejaVu(head_budget=budget).kept_heads(inp.q, inp.k, inp.v)
    norms = head_output_norms(inp.q, inp.k, inp.v)
    assert keep.sum() == min(budget, inp.q.shape[0])
    if keep.any() and (~keep).any():
        assert norms[keep].min() >= norms[~keep].max()


def test_ties_go_to_the_lower_head_and_ratio_budget():
    inp = make_decode_input(4, 1, 10, 4, seed=0)
    q = np.repeat(inp.q[:1], 4, axis=0)             # four identical heads: identical norms
    assert DejaVu(head_budget=2).kept_heads(q, inp.k, inp.v).tolist() == [True, True, False, False]
    assert DejaVu().heads_to_keep(7) == 3 and DejaVu(head_ratio=0.1).heads_to_keep(7) == 1


def test_traffic_by_hand():
    """H_q=4, H_kv=2 (G=2), n=10, d=8 fp16: keeping heads 0 and 1 (group 0) reads KV head 0 only."""
    inp = make_decode_input(4, 2, 10, 8, seed=0)
    t = DejaVu(head_mask=(True, True, False, False)).step(inp.q, inp.k, inp.v).traffic
    assert t.bytes == {("hbm", "keys"): 10 * 16, ("hbm", "values"): 10 * 16}
    t = DejaVu(head_mask=(True, False, True, False)).step(inp.q, inp.k, inp.v).traffic
    assert t.get("hbm", "keys") == 2 * 10 * 16
    t = DejaVu(head_mask=(True, True, False, False)).step(inp.q, inp.k, inp.v, layout=Layout(16, 1, False)).traffic
    assert t.get("hbm", "keys") == 2 * 10 * 16       # per query head without sharing
    assert DejaVu(head_mask=(False,) * 4).step(inp.q, inp.k, inp.v).traffic.total == 0


def test_bad_inputs():
    inp = make_decode_input(4, 2, 10, 8, seed=0)
    with pytest.raises(ValueError, match="head_mask"):
        DejaVu(head_mask=(True, False)).step(inp.q, inp.k, inp.v)
    with pytest.raises(TypeError, match="head_mask"):
        DejaVu(head_mask=(1, 0, 1, 0))
    with pytest.raises(ValueError, match="ratio"):
        DejaVu(head_ratio=1.5)
