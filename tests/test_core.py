"""The attention core: every property here is stated against an independent computation."""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse.oracle import core
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input


def naive_loop_attention(q, k, v, scale=None):
    """Independent reference: plain Python loops and math.exp, no shared code with core."""
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    g = h_q // h_kv
    s = 1 / math.sqrt(d) if scale is None else scale
    out = np.zeros((h_q, d))
    for h in range(h_q):
        kh = h // g
        ls = [sum(float(q[h, c]) * float(k[kh, i, c]) for c in range(d)) * s for i in range(n)]
        m = max(ls)
        w = [math.exp(x - m) for x in ls]
        z = math.fsum(w)
        for c in range(d):
            out[h, c] = math.fsum(w[i] * float(v[kh, i, c]) for i in range(n)) / z
    return out


@given(decode_inputs(max_n=40, head_dims=(1, 2, 4, 8), max_h_kv=2, max_group=3))
def test_dense_matches_independent_loop(x):
    got = core.attend_dense(x.q, x.k, x.v)
    want = naive_loop_attention(x.q, x.k, x.v)
    assert np.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_dense_loop_reference_detects_wrong_scale():
    x = make_decode_input(4, 2, 30, 8, "gaussian", 1)
    assert not np.allclose(core.attend_dense(x.q, x.k, x.v, scale=1.0), naive_loop_attention(x.q, x.k, x.v), atol=1e-6)


@st.composite
def split_inputs(draw):
    x = draw(decode_inputs(max_n=80))
    parts = draw(st.integers(1, 5))
    # each token goes to one part, per head; parts may be empty
    labels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, parts, size=(x.q.shape[0], x.k.shape[1]))
    return x, parts, labels


@given(split_inputs())
def test_lse_merge_of_any_split_equals_attention_over_union(arg):
    x, parts, labels = arg
    pieces = [core.attend_indices_partial(x.q, x.k, x.v, [np.flatnonzero(row == j) for row in labels])
              for j in range(parts)]
    merged = core.merge_partials(pieces)
    whole = core.attend_dense_partial(x.q, x.k, x.v)
    assert np.allclose(merged.out, whole.out, rtol=1e-9, atol=1e-12)
    assert np.allclose(merged.lse, whole.lse, rtol=1e-12, atol=1e-9)
    assert np.isfinite(merged.out).all()


def test_merge_with_all_parts_empty_is_empty_not_nan():
    x = make_decode_input(2, 1, 5, 4)
    empty = core.attend_indices_partial(x.q, x.k, x.v, [np.array([], int)] * 2)
    merged = core.merge_partials([empty, empty])
    assert np.array_equal(merged.out, np.zeros((2, 4)))
    assert np.all(merged.lse == -np.inf)


def test_merge_of_overlapping_parts_is_not_the_union():
    """The disjointness contract is real: merging overlapping parts double-counts."""
    x = make_decode_input(2, 1, 10, 4, seed=3)
    a = core.attend_indices_partial(x.q, x.k, x.v, [np.arange(6)] * 2)
    b = core.attend_indices_partial(x.q, x.k, x.v, [np.arange(4, 10)] * 2)
    assert not np.allclose(core.merge_partials([a, b]).out, core.attend_dense(x.q, x.k, x.v))
    with pytest.raises(ValueError, match="disjoint"):
        core.check_disjoint([np.arange(6), np.arange(4, 10)])


@given(decode_inputs(max_n=60))
def test_gqa_equals_mha_with_repeated_kv_heads(x):
    h_q = x.q.shape[0]
    mha = core.attend_dense(x.q, core.expand_kv(x.k, h_q), core.expand_kv(x.v, h_q))
    assert np.allclose(core.attend_dense(x.q, x.k, x.v), mha, rtol=1e-12, atol=1e-14)


def test_gqa_grouping_is_consecutive():
    assert list(core.kv_head_of(8, 2)) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert list(core.kv_head_of(4, 4)) == [0, 1, 2, 3]      # MHA
    assert list(core.kv_head_of(4, 1)) == [0, 0, 0, 0]      # MQA


@given(decode_inputs(max_n=60, families=("gaussian", "heavy_tails", "outlier_channels")), st.floats(-50, 50))
def test_invariant_to_a_constant_added_to_all_logits(x, c):
    # shifting every key by u adds q_h.u*scale to all of head h's logits: a per-head constant
    u = np.random.default_rng(0).standard_normal(x.q.shape[1]) * c
    assert np.allclose(core.attend_dense(x.q, x.k + u, x.v), core.attend_dense(x.q, x.k, x.v), rtol=1e-8, atol=1e-10)


@given(decode_inputs(max_n=60), st.integers(0, 2**32 - 1))
def test_index_set_attention_equals_mask_attention(x, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((x.q.shape[0], x.k.shape[1])) < rng.random()
    mask[:, 0] |= rng.random() < 0.5
    by_idx = core.attend_indices_partial(x.q, x.k, x.v, [np.flatnonzero(r) for r in mask])
    by_mask = core.attend_mask_partial(x.q, x.k, x.v, mask)
    assert np.allclose(by_idx.out, by_mask.out, rtol=1e-10, atol=1e-12)
    assert np.array_equal(np.isfinite(by_idx.lse), np.isfinite(by_mask.lse))
    fin = np.isfinite(by_idx.lse)
    assert np.allclose(by_idx.lse[fin], by_mask.lse[fin])


def test_fully_masked_row_gives_zero_output_not_nan():
    x = make_decode_input(2, 1, 6, 4)
    mask = np.zeros((2, 6), bool)
    mask[1, 2] = True
    out = core.attend_mask(x.q, x.k, x.v, mask)
    assert np.array_equal(out[0], np.zeros(4))
    assert np.allclose(out[1], x.v[0, 2])


def test_huge_logits_do_not_overflow():
    x = make_decode_input(4, 2, 50, 16, "huge_logits", seed=5, logit_scale=1e4)
    out = core.attend_dense(x.q, x.k, x.v)
    s = core.logits(x.q, x.k)
    assert np.isfinite(out).all()
    assert np.allclose(out, core.expand_kv(x.v, 4)[np.arange(4), np.argmax(s, axis=1)], atol=1e-6)


def test_weights_follow_their_indices_in_any_order():
    """Found by the Triton kernel test: weights of unsorted index lists were once misaligned."""
    x = make_decode_input(1, 1, 9, 8, seed=0)
    a = core.attend_indices(x.q, x.k, x.v, [np.array([3, 1, 5, 7])], [np.array([1.0, 2.0, 3.0, 0.5])])
    b = core.attend_indices(x.q, x.k, x.v, [np.array([1, 3, 5, 7])], [np.array([2.0, 1.0, 3.0, 0.5])])
    assert np.allclose(a, b, rtol=1e-14)


def test_weighted_attention_is_the_weighted_softmax():
    x = make_decode_input(2, 1, 7, 3, seed=2)
    idx = [np.array([0, 3, 6])] * 2
    w = [np.array([1.0, 2.0, 0.5])] * 2
    s = core.logits(x.q, x.k)
    for h in range(2):
        e = w[h] * np.exp(s[h, idx[h]] - s[h, idx[h]].max())
        want = (e / e.sum()) @ x.v[0, idx[h]]
        assert np.allclose(core.attend_indices(x.q, x.k, x.v, idx, w)[h], want)


# ---------------------------------------------------------------------------------------------
# tie rule
# ---------------------------------------------------------------------------------------------

def test_topk_tie_rule_lower_index_wins():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, -np.inf])
    assert list(core.topk_indices(scores, 2)) == [1, 2]
    assert list(core.topk_indices(scores, 4)) == [1, 2, 4, 3]
    assert list(core.topk_indices(scores, 10)) == [1, 2, 4, 3, 0, 5]
    assert core.topk_indices(scores, 0).size == 0


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.integers(0, 45))
def test_topk_is_a_valid_topk_under_the_tie_rule(vals, k):
    s = np.array(vals, dtype=float)
    chosen = core.topk_indices(s, k)
    assert len(chosen) == min(k, len(s))
    rest = np.setdiff1d(np.arange(len(s)), chosen)
    for i in chosen:
        for j in rest:
            assert s[i] > s[j] or (s[i] == s[j] and i < j)


def test_topk_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        core.topk_indices(np.array([1.0, np.nan]), 1)


# ---------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------

def test_every_basis_point_ratio_is_read_exactly():
    for bp in range(10_001):
        assert core.exact_ratio(bp / 10_000) == Fraction(bp, 10_000), bp


def test_budget_exact_for_all_n_up_to_4096_on_the_exact_integer_cases():
    """Where n*bp/10000 is a whole number a float floor can land one below; check every such case."""
    float_floor_wrong = 0
    for bp in range(10_001):
        step = 10_000 // math.gcd(bp, 10_000)
        for n in range(0, 4097, step):
            want = n * bp // 10_000
            assert core.budget_from_ratio(n, bp / 10_000) == want, (n, bp)
            assert core.budget_from_basis_points(n, bp) == want
            float_floor_wrong += int(n * (bp / 10_000)) != want
    assert float_floor_wrong > 0   # the hazard is real: naive int(n * r) gets some of these wrong


@given(st.integers(0, 4096), st.integers(0, 10_000))
def test_budget_exact_for_any_n_and_basis_points(n, bp):
    assert core.budget_from_ratio(n, bp / 10_000) == n * bp // 10_000
    assert core.budget_from_ratio(n, Fraction(bp, 10_000)) == n * bp // 10_000


def test_budget_examples_and_errors():
    assert core.budget_from_ratio(1000, 0.07) == 70
    assert core.budget_from_ratio(100, 0.29) == 29
    assert core.budget_from_ratio(10, 0.01, minimum=1) == 1
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            core.budget_from_ratio(10, bad)
    with pytest.raises(TypeError, match="n must be an integer"):
        core.budget_from_ratio(10.0, 0.5)
    with pytest.raises(ValueError, match="budget must be > 0"):
        core.check_budget(0)
    with pytest.raises(ValueError, match="budget must be > 0"):
        core.check_budget(-3)


# ---------------------------------------------------------------------------------------------
# RoPE and pooling
# ---------------------------------------------------------------------------------------------

@given(st.integers(1, 20), st.sampled_from([2, 4, 8, 16]), st.sampled_from(["half", "interleaved"]),
       st.integers(0, 2**32 - 1))
def test_rope_rerotation_equals_rotation_at_new_positions(n, d, layout, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, n, d))
    old = rng.integers(0, 5000, size=n)
    new = rng.integers(0, 5000, size=n)
    moved = core.rope_rerotate(core.rope_apply(x, old, layout=layout), old, new, layout=layout)
    assert np.allclose(moved, core.rope_apply(x, new, layout=layout), atol=1e-9)


def test_rope_preserves_relative_position_dot_products():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 8)), rng.standard_normal((1, 8))
    a = core.rope_apply(q, [10]) @ core.rope_apply(k, [3]).T
    b = core.rope_apply(q, [107]) @ core.rope_apply(k, [100]).T
    assert np.allclose(a, b)
    assert not np.allclose(a, core.rope_apply(q, [11]) @ core.rope_apply(k, [3]).T)


def test_rope_half_layout_matches_hand_rotation():
    x = np.zeros((1, 4))
    x[0, 0] = 1.0                      # channel 0 pairs with channel 2 in the half layout
    out = core.rope_apply(x, [1], base=10000.0)
    assert np.allclose(out[0], [math.cos(1), 0, math.sin(1), 0])


def naive_pool(x, kernel, mode):
    pad = kernel // 2
    out = []
    for i in range(len(x)):
        window = [x[j] if 0 <= j < len(x) else (0.0 if mode == "avg" else -math.inf)
                  for j in range(i - pad, i + pad + 1)]
        out.append(sum(window) / kernel if mode == "avg" else max(window))
    return np.array(out)


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=30), st.sampled_from([1, 3, 5, 7, 9]),
       st.sampled_from(["avg", "max"]))
def test_pool1d_matches_naive_window(vals, kernel, mode):
    x = np.array(vals)
    assert np.allclose(core.pool1d(x, kernel, mode), naive_pool(x, kernel, mode))


def test_pool1d_conventions():
    x = np.array([3.0, 0.0, 0.0])
    assert np.allclose(core.pool1d(x, 3, "avg"), [1.0, 1.0, 0.0])     # zero padding counts: 3/3 at the edge
    assert np.allclose(core.pool1d(-x - 1, 3, "max"), [-1, -1, -1])    # -inf padding never wins
    assert np.array_equal(core.pool1d(x, 1, "max"), x)
    with pytest.raises(ValueError, match="odd"):
        core.pool1d(x, 4)
    with pytest.raises(ValueError, match="mode"):
        core.pool1d(x, 3, "sum")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_named_errors():
    x = make_decode_input(4, 2, 10, 8)
    with pytest.raises(ValueError, match="divisible"):
        core.attend_dense(x.q[:3], x.k, x.v)
    with pytest.raises(ValueError, match="head dim"):
        core.attend_dense(x.q[:, :4], x.k, x.v)
    with pytest.raises(ValueError, match="v must have the same shape"):
        core.attend_dense(x.q, x.k, x.v[:, :5])
    with pytest.raises(ValueError, match="k must have 3 dimensions"):
        core.attend_dense(x.q, x.k[0], x.v)
    bad = x.k.copy()
    bad[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match=r"k contains a non-finite value .* \(1, 3, 2\)"):
        core.attend_dense(x.q, bad, x.v)
    with pytest.raises(TypeError, match="q must be a floating-point"):
        core.attend_dense(x.q.astype(np.int32), x.k, x.v)
    with pytest.raises(TypeError, match="v must be a NumPy array"):
        core.attend_dense(x.q, x.k, "values")
    with pytest.raises(ValueError, match="scale"):
        core.attend_dense(x.q, x.k, x.v, scale=-1.0)
    with pytest.raises(ValueError, match=r"indices\[1\] must lie in \[0, 10\)"):
        core.attend_indices(x.q, x.k, x.v, [[0], [10], [1], [2]])
    with pytest.raises(ValueError, match="duplicate"):
        core.attend_indices(x.q, x.k, x.v, [[0, 0], [1], [1], [2]])
    with pytest.raises(ValueError, match="one index set per query head"):
        core.attend_indices(x.q, x.k, x.v, [[0]])
    with pytest.raises(TypeError, match="mask must be a boolean"):
        core.attend_mask(x.q, x.k, x.v, np.ones((4, 10)))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_low_precision_inputs_are_accepted_and_computed_in_float64(dtype):
    x = make_decode_input(4, 2, 10, 8)
    q, k, v = (a.astype(dtype) for a in (x.q, x.k, x.v))
    out = core.attend_dense(q, k, v)
    assert out.dtype == np.float64
    assert np.allclose(out, core.attend_dense(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)))


def test_bfloat16_and_torch_inputs_are_accepted():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = make_decode_input(2, 1, 5, 4)
    q = x.q.astype(ml_dtypes.bfloat16)
    assert np.allclose(core.attend_dense(q, x.k, x.v), core.attend_dense(q.astype(np.float64), x.k, x.v))
    torch = pytest.importorskip("torch")
    tq = torch.tensor(x.q, dtype=torch.bfloat16)
    assert np.allclose(core.attend_dense(tq, x.k, x.v), core.attend_dense(tq.float().numpy(), x.k, x.v))


@example(n=0)
@given(st.integers(0, 3))
def test_empty_cache_gives_zero_output(n):
    x = make_decode_input(2, 1, n, 4)
    out = core.attend_dense_partial(x.q, x.k, x.v)
    assert np.isfinite(out.out).all()
    if n == 0:
        assert np.array_equal(out.out, np.zeros((2, 4))) and np.all(out.lse == -np.inf)


# ---------------------------------------------------------------------------------------------
# bad input at the smaller entry points: RoPE, pooling, budgets, the merge
# ---------------------------------------------------------------------------------------------

def test_rope_rejects_non_finite_positions_and_bad_base():
    x = np.ones((3, 4))
    for bad in ([0, np.nan, 2], [0, 1, np.inf]):
        with pytest.raises(ValueError, match=r"positions must be finite.*index \(\d,\)"):
            core.rope_apply(x, bad)
    for base in (0, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="base must be a finite number > 0"):
            core.rope_apply(x, [0, 1, 2], base=base)
    with pytest.raises(TypeError, match="base must be a real number"):
        core.rope_apply(x, [0, 1, 2], base="10000")
    with pytest.raises(TypeError, match="positions must be integers or real numbers"):
        core.rope_apply(x, ["a", "b", "c"])
    with pytest.raises(TypeError, match="positions must be integers or real numbers"):
        core.rope_apply(x, [True, False, True])
    with pytest.raises(ValueError, match="layout must be"):
        core.rope_apply(x, [0, 1, 2], layout="gptj")
    with pytest.raises(ValueError, match="new_positions must be finite"):
        core.rope_rerotate(x, [0, 1, 2], [0, np.nan, 2])
    with pytest.raises(TypeError, match="old_positions must be integers"):
        core.rope_rerotate(x, "abc", [0, 1, 2])
    with pytest.raises(ValueError, match="base must be"):
        core.rope_angles([0, 1], 4, base=-2.0)
    with pytest.raises(TypeError, match="d must be an integer"):
        core.rope_angles([0, 1], 4.0)
    # valid input still works, unchanged: float positions (re-rotation by a difference) included
    assert np.allclose(core.rope_apply(x, np.array([0.0, 1.0, 2.0])), core.rope_apply(x, [0, 1, 2]))


def test_pool1d_rejects_nan_integer_and_string_input():
    with pytest.raises(ValueError, match=r"x contains a non-finite value .* \(1,\)"):
        core.pool1d([1.0, np.nan, 2.0], 3)
    with pytest.raises(ValueError, match="x contains a non-finite"):
        core.pool1d(np.array([1.0, np.inf, 2.0]), 1)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        core.pool1d(np.arange(5), 3)
    with pytest.raises(TypeError, match="x must be a NumPy array"):
        core.pool1d("abc", 3)
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        core.pool1d(np.float64(2.0), 3)
    with pytest.raises(ValueError, match="mode"):
        core.pool1d(np.ones(3), 1, "sum")          # checked even where kernel 1 is the identity


def test_budget_from_ratio_names_the_ratio_for_a_bad_string():
    for bad in ("abc", "1/0", "", "nan"):
        with pytest.raises(ValueError, match=r"ratio must be a number, Fraction or decimal string"):
            core.budget_from_ratio(10, bad)
    with pytest.raises(TypeError, match="ratio must be a number"):
        core.budget_from_ratio(10, [0.5])
    assert core.budget_from_ratio(10, "0.25") == 2 and core.budget_from_ratio(10, "1/4") == 2


def test_merge_partials_names_the_bad_part():
    x = make_decode_input(2, 1, 6, 4)
    a = core.attend_indices_partial(x.q, x.k, x.v, [np.arange(3)] * 2)
    b = core.attend_indices_partial(x.q, x.k, x.v, [np.arange(3, 6)] * 2)
    with pytest.raises(ValueError, match=r"parts\[1\]\.out must have the shape of parts\[0\]\.out"):
        core.merge_partials([a, core.Partial(np.zeros((3, 4)), np.zeros(3))])
    with pytest.raises(ValueError, match=r"parts\[1\]\.out must have shape lse\.shape"):
        core.merge_partials([a, core.Partial(b.out, np.zeros(3))])
    with pytest.raises(ValueError, match=r"parts\[0\]\.lse must be finite or -inf"):
        core.merge_partials([core.Partial(a.out, np.array([np.nan, 0.0])), b])
    with pytest.raises(ValueError, match=r"parts\[1\]\.out contains a non-finite"):
        core.merge_partials([a, core.Partial(np.full((2, 4), np.nan), b.lse)])
    with pytest.raises(TypeError, match=r"parts\[1\] must be a Partial"):
        core.merge_partials([a, (b.out, b.lse)])
    with pytest.raises(TypeError, match="parts must be an iterable of Partial"):
        core.merge_partials(a)
    with pytest.raises(ValueError, match="at least one Partial"):
        core.merge_partials([])
    # valid input: the merge is unchanged (an empty part, lse = -inf, carries weight 0)
    empty = core.attend_indices_partial(x.q, x.k, x.v, [np.array([], int)] * 2)
    merged = core.merge_partials([a, empty, b])
    assert np.allclose(merged.out, core.attend_dense(x.q, x.k, x.v), rtol=1e-12, atol=1e-14)
