"""Building blocks of the stateful Numba kernels, checked directly (the method suites exercise them only
through whole decode steps): attention over a kept mask read from growing buffers, and H2O's eviction by
selection against its sorting reference."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvsparse.kernels.numba.attention import kept_attention, sparse_attention_prefix
from kvsparse.kernels.numba.h2o import evict, evict_reference
from kvsparse.oracle import core
from kvsparse.property_tests import tolerances


@settings(max_examples=40)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 60), group=st.sampled_from([1, 2, 4]),
       per_query_head=st.booleans(), dtype=st.sampled_from(["float32", "float64"]))
def test_kept_attention_on_buffers_matches_the_oracle(seed, n, group, per_query_head, dtype):
    rng = np.random.default_rng(seed)
    h_kv, d, capacity = 2, 8, 2 * n + 3
    h_q = h_kv * group
    q = rng.standard_normal((h_q, d)).astype(dtype)
    kb = rng.standard_normal((h_kv, capacity, d)).astype(dtype)
    vb = rng.standard_normal((h_kv, capacity, d)).astype(dtype)
    kb[:, n:] = np.nan                    # rows past n must never be read
    units = h_q if per_query_head else h_kv
    kept = rng.random((units, n)) < 0.5
    out, lse, probs = kept_attention(q, kb, vb, n, kept, with_probs=True)
    mask = np.repeat(kept, h_q // units, axis=0)
    k64, v64 = kb[:, :n].astype(np.float64), vb[:, :n].astype(np.float64)
    check = tolerances.check_attention_output(out, q.astype(np.float64), k64, v64, dtype, mask=mask)
    assert check.ok, str(check)
    s = np.where(mask, core.logits(q.astype(np.float64), k64), -np.inf)
    np.testing.assert_allclose(probs, core.softmax(s), rtol=0, atol=1e-5 if dtype == "float32" else 1e-12)
    assert np.isfinite(out).all()


def test_kept_attention_catches_a_wrong_mask_row():
    """The check has teeth: attention over another unit's row is outside the tolerance."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 30, 8)).astype(np.float32) for _ in range(2))
    kept = rng.random((4, 30)) < 0.5
    out, _, _ = kept_attention(q, k, v, 30, kept[::-1].copy())
    assert not tolerances.check_attention_output(out, q, k, v, "float32", mask=kept).ok


def test_prefix_attention_equals_attention_over_the_slice():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 8))
    kb, vb = (rng.standard_normal((2, 50, 8)) for _ in range(2))
    idx = np.array([[0, 3, 9, 19], [1, 2, 5, 7]])
    a, la = sparse_attention_prefix(q, kb, vb, 20, idx)
    from kvsparse.kernels.numba.attention import sparse_attention
    b, lb = sparse_attention(q, kb[:, :20], vb[:, :20], idx)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="indices"):
        sparse_attention_prefix(q, kb, vb, 5, idx)          # row 9 is past n = 5


@settings(max_examples=200)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), heavy=st.integers(0, 12), recent=st.integers(0, 12),
       protect=st.booleans(), ties=st.booleans(), special=st.booleans())
def test_evict_by_selection_equals_the_sorting_reference(seed, n, heavy, recent, protect, ties, special):
    rng = np.random.default_rng(seed)
    units = 3
    kept = rng.random((units, n)) < 0.8
    scores = rng.integers(0, 4, (units, n)).astype(float) if ties else rng.random((units, n))
    if special:
        scores[rng.random((units, n)) < 0.2] = rng.choice([np.inf, -np.inf, np.nan])
    expected = evict_reference(kept.copy(), scores.copy(), heavy, recent, protect)
    np.testing.assert_array_equal(evict(kept.copy(), scores.copy(), heavy, recent, protect), expected)
