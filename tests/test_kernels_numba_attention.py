"""Numba decode attention (dense, index sets, weights, merge) and the suite machinery itself."""
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.kernels.numba import attention as A
from kvsparse.kernels.numba.dense import dense
from kvsparse.oracle import core
from kvsparse.oracle.method import Method
from kvsparse.oracle.types import Selection
from kvsparse.property_tests import suites
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input


@dataclass(frozen=True)
class FixedSelection(Method):
    """A 'method' that attends to given per-head index sets (optionally weighted): drives the sparse kernel."""

    indices: tuple = ()
    weights: tuple | None = None

    def select(self, q, k, v, *, positions=None):
        return Selection(self.indices, k.shape[1], self.weights)


def sparse_kernel(method, q, k, v, *, positions=None, scale=None):
    out, _ = A.attend_selection(q, k, v, method.indices, method.weights, scale=scale)
    return out, method.indices, method.weights


@st.composite
def fixed_selections(draw, weighted):
    inp = draw(decode_inputs(max_n=120))
    n, h_q = inp.shapes.n, inp.shapes.h_q
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sizes = draw(st.lists(st.integers(0, n), min_size=h_q, max_size=h_q))
    idx = tuple(np.sort(rng.choice(n, size=s, replace=False)) for s in sizes)
    w = tuple(rng.uniform(0, 3, size=s) * (rng.random(s) > 0.2) for s in sizes) if weighted else None
    return FixedSelection(idx, w), inp


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weighted", [False, True])
@given(data=st.data())
def test_sparse_attention_matches_oracle_within_fa_tolerance(dtype, weighted, data):
    method, inp = data.draw(fixed_selections(weighted))
    verdict = suites.check_step(method, sparse_kernel, inp, dtype=dtype)
    assert verdict.ok, str(verdict)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_kernel_implements_dense(dtype):
    report = suites.run_suite("dense", dense, dtype=dtype)
    assert report.ok, str(report)


def test_sparse_lse_and_empty_sets():
    inp = make_decode_input(4, 2, 50, 16, "huge_logits", seed=3)
    idx = [np.array([], np.int64), np.arange(0, 50, 3), np.array([7]), np.arange(50)]
    out, lse = A.attend_selection(inp.q, inp.k, inp.v, idx)
    ref = core.attend_indices_partial(inp.q, inp.k, inp.v, idx)
    assert lse[0] == -np.inf and np.all(out[0] == 0)
    np.testing.assert_allclose(lse[1:], ref.lse[1:], rtol=1e-13)
    np.testing.assert_allclose(out, ref.out, rtol=1e-12, atol=1e-12)
    # all-zero weights is an empty set too, never NaN
    out, lse = A.attend_selection(inp.q, inp.k, inp.v, idx, [np.zeros(len(i)) for i in idx])
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_shared_lists_read_each_row_once_per_group():
    # the union lists of a GQA group hold every token once, whichever heads want it
    lists, lengths, w = A.union_with_weights([np.array([1, 5]), np.array([5, 9]), np.array([2])], 1, np.float64)
    assert lists[0, :lengths[0]].tolist() == [1, 2, 5, 9]
    assert w.tolist() == [[1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]


@given(inp=decode_inputs(max_n=60), parts=st.integers(1, 4), empty=st.integers(0, 3))
def test_merge_matches_core_merge(inp, parts, empty):
    cuts = np.linspace(0, inp.shapes.n, parts + 1).astype(int)
    pieces = [core.attend_indices_partial(inp.q, inp.k, inp.v, [np.arange(a, b)] * inp.shapes.h_q)
              for a, b in zip(cuts[:-1], cuts[1:])]
    pieces += [core.Partial(np.zeros_like(inp.q), np.full(inp.shapes.h_q, -np.inf))] * empty
    out, lse = A.merge_partials(np.stack([p.out for p in pieces]), np.stack([p.lse for p in pieces]))
    dense_ref = core.attend_dense_partial(inp.q, inp.k, inp.v)
    np.testing.assert_allclose(out, dense_ref.out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, dense_ref.lse, rtol=1e-12)


def test_bad_inputs_name_the_argument():
    inp = make_decode_input(4, 2, 10, 8, seed=0)
    q, k, v = inp.q, inp.k, inp.v
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):
        A.dense_attention(q.astype(np.float32), k, v)
    with pytest.raises(ValueError, match=r"indices\[1\] must hold unique rows"):
        A.sparse_attention(q, k, v, np.array([[0, 1], [3, 3]]))
    with pytest.raises(ValueError, match=r"indices\[0\] must hold unique rows in \[0, 10\)"):
        A.sparse_attention(q, k, v, np.array([[0, 10], [3, 4]]))
    with pytest.raises(ValueError, match="weights must be finite and non-negative"):
        A.sparse_attention(q, k, v, np.array([[0, 1], [3, 4]]), weights=-np.ones((4, 2)))
    with pytest.raises(ValueError, match="lengths"):
        A.sparse_attention(q, k, v, np.array([[0, 1], [3, 4]]), lengths=np.array([3, 0]))


# --- the suite machinery can fail -------------------------------------------------------------

def test_valid_topk_rule_by_hand():
    s = np.array([5.0, 3.0, 3.0, 1.0, np.inf, -np.inf])
    assert suites.valid_topk([0, 1, 4], s, 3, 0.0)[0]        # the exact top-3 (lower index wins the tie)
    assert suites.valid_topk([0, 2, 4], s, 3, 0.0)[0]        # the other side of an exact tie: accepted
    assert not suites.valid_topk([0, 3, 4], s, 3, 0.0)[0]    # 1.0 kept over 3.0: not a top-3 ...
    assert suites.valid_topk([0, 3, 4], s, 3, 1.0)[0]        # ... unless rounding can move scores by 1
    assert not suites.valid_topk([0, 1, 2], s, 3, 10.0)[0]   # dropped an always-kept token (+inf)
    assert not suites.valid_topk([0, 1, 5, 4], s, 4, 10.0)[0]  # kept a never-kept token (-inf)
    assert not suites.valid_topk([0, 4], s, 3, 10.0)[0]      # wrong size


def planted(bug):
    def kernel(method, q, k, v, *, positions=None, scale=None):
        out, idx = dense(method, q, k, v, scale=scale)
        if bug == "gqa":     # query head h reads KV head h % H_kv instead of h // G
            wrong = np.arange(q.shape[0]) % k.shape[0]
            out = A.dense_attention(q, k[wrong], v[wrong], scale=scale)[0]
        elif bug == "drop_last":   # forgets the newest token
            out = A.dense_attention(q, k[:, :-1].copy(), v[:, :-1].copy(), scale=scale)[0] if k.shape[1] > 1 else out
        elif bug == "half_precision":
            out = out.astype(np.float16).astype(out.dtype)
        elif bug == "crash":
            raise RuntimeError("boom")
        return out, idx
    return kernel


@pytest.mark.parametrize("bug", ["gqa", "drop_last", "half_precision", "crash"])
def test_suite_catches_planted_bugs(bug):
    report = suites.run_suite("dense", planted(bug), dtype="float32")
    assert not report.ok
    assert report.failure.failures[0].name == ("contract" if bug == "crash" else "output")


def test_kernels_are_registered():
    assert registry.get("dense").kernels["numba"] is dense
    assert isinstance(registry.get("dense").suite, suites.MethodSuite)


def test_regression_float32_accumulation_in_sink_and_local():
    # found by hypothesis: float32 dot-product accumulation exceeded the FA tolerance (5.04e-7 > 4.67e-7)
    # on strongly aligned keys; fixed by accumulating logits and sums in float64
    inp = make_decode_input(3, 1, 16, 32, "sink_and_local", seed=42169)
    method = FixedSelection((np.array([], np.int64), np.array([], np.int64), np.array([1, 2, 3, 5, 7, 8, 12])))
    verdict = suites.check_step(method, sparse_kernel, inp, dtype="float32")
    assert verdict.ok, str(verdict)


@given(scores=st.lists(st.one_of(st.integers(-3, 3).map(float), st.floats(-5, 5), st.just(-np.inf), st.just(np.inf)),
                       min_size=1, max_size=80), k=st.integers(0, 90))
@example(scores=[1.0, 1.0, 1.0, 0.0], k=2)                         # ties at the cut-off: lower indices win
def test_compiled_topk_follows_the_core_tie_rule(scores, k):
    from kvsparse.kernels.numba._select import topk_set
    s = np.array(scores)
    assert np.array_equal(topk_set(s, k), np.sort(core.topk_indices(s, k)))
