"""LoRC oracle: full rank ≡ exact, error vs rank (Eckart-Young), the progressive schedule, bytes by hand."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvsparse.oracle import core
from kvsparse.oracle.lorc import (LoRC, LowRankKV, cache_error, condition_number, progressive_ranks,
                                  progressive_schedule, truncated_svd)
from kvsparse.oracle.types import Layout, Selection, kv_traffic


def model(seed, hidden, h_kv, d, n):
    rng = np.random.default_rng(seed)
    w_k, w_v = rng.standard_normal((hidden, h_kv * d)), rng.standard_normal((hidden, h_kv * d))
    return rng, w_k, w_v, rng.standard_normal((n, hidden))


shapes = st.tuples(st.integers(0, 2**32 - 1), st.integers(2, 24), st.integers(1, 3), st.sampled_from([2, 4, 8]),
                   st.integers(1, 30))


@given(shape=shapes)
def test_full_rank_is_exact(shape):
    seed, hidden, h_kv, d, n = shape
    rng, w_k, w_v, x = model(seed, hidden, h_kv, d, n)
    full = min(hidden, h_kv * d)
    f = LowRankKV.compress(w_k, w_v, full, full, h_kv)
    k, v = f.rebuild(x, np.arange(n))
    k_exact = core.rope_apply((x @ w_k).reshape(n, h_kv, d).transpose(1, 0, 2), np.arange(n))
    v_exact = (x @ w_v).reshape(n, h_kv, d).transpose(1, 0, 2)
    tol = 1e-12 * max(1.0, np.abs(x).max() * np.abs(w_k).sum(axis=0).max())
    assert np.abs(k - k_exact).max() <= tol and np.abs(v - v_exact).max() <= tol
    q = rng.standard_normal((h_kv * 2, d))
    out = LoRC().decode(f, q, x, np.arange(n)).output
    np.testing.assert_allclose(out, core.attend_dense(q, k_exact, v_exact), rtol=1e-9, atol=1e-10)


@given(shape=shapes)
def test_error_falls_with_rank_within_eckart_young(shape):
    seed, hidden, h_kv, d, n = shape
    _, w_k, _, x = model(seed, hidden, h_kv, d, n)
    s = np.linalg.svd(w_k, compute_uv=False)
    x_norm = np.linalg.norm(x, 2)
    errors = []
    for r in range(1, min(w_k.shape) + 1):
        a, b = truncated_svd(w_k, r)
        tail = s[r] if r < s.size else 0.0
        assert np.linalg.norm(w_k - a @ b, 2) == pytest.approx(tail, abs=1e-9 * s[0])
        e = cache_error(x, w_k, r)
        assert e <= x_norm * np.sqrt(np.sum(s[r:] ** 2)) * (1 + 1e-9) + 1e-9 * s[0] * x_norm
        errors.append(e)
    assert all(b <= a * (1 + 1e-9) + 1e-9 for a, b in zip(errors, errors[1:]))
    assert errors[-1] <= 1e-9 * s[0] * max(1.0, x_norm)


def test_error_bound_check_can_fail():
    """Planted bug: keeping the *smallest* singular triplets violates both bounds (x = I makes the
    cache bound tight: the cache error is then exactly ``||W - W_r||_F``)."""
    _, w_k, _, _ = model(3, 16, 2, 4, 20)
    x = np.eye(16)
    u, s, vt = np.linalg.svd(w_k, full_matrices=False)
    worst = (u[:, -2:] * s[-2:]) @ vt[-2:]
    assert np.linalg.norm(w_k - worst, 2) > s[2] * (1 + 1e-3)
    assert np.linalg.norm(x @ w_k - x @ worst) > np.sqrt(np.sum(s[2:] ** 2)) * (1 + 1e-3)
    assert cache_error(x, w_k, 2) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-12)


def test_progressive_schedule():
    rng = np.random.default_rng(0)
    # layer l's weight has condition number 2 + l: cumulative log condition numbers fall with depth
    ws = []
    for layer in range(5):
        u, _ = np.linalg.qr(rng.standard_normal((32, 16)))
        v, _ = np.linalg.qr(rng.standard_normal((16, 16)))
        ws.append((u * np.linspace(1, 2 + layer, 16)) @ v.T)
    assert [round(condition_number(w), 9) for w in ws] == [2, 3, 4, 5, 6]
    ranks = progressive_ranks(ws, min_ratio=0.25, max_ratio=0.75)
    assert ranks[0] == 12 and ranks[-1] == 4            # ceil(0.75 * 16) for the first, 0.25 * 16 for the last
    assert all(a >= b for a, b in zip(ranks, ranks[1:]))
    # orthogonal weights (kappa = 1 everywhere): no layer is more sensitive, all at min_ratio
    assert progressive_ranks([np.eye(8)] * 3, min_ratio=0.5, max_ratio=1.0) == [4, 4, 4]
    sched = progressive_schedule(ws, ws)
    assert [m.key_rank for m in sched] == ranks == [m.value_rank for m in sched]


def test_traffic_by_hand():
    """Latent rows are read once per step for all heads: n * (r_k + r_v) elements."""
    _, w_k, w_v, x = model(1, 32, 2, 8, 50)
    f = LowRankKV.compress(w_k, w_v, 6, 10, 2)
    t = LoRC().decode(f, np.zeros((4, 8)), x, np.arange(50)).traffic
    assert t.get("hbm", "keys") == 50 * 6 * 2 and t.get("hbm", "values") == 50 * 10 * 2
    # generic view: canonical ratio 1/2 of H_kv * d = 16 -> rank 8; full rank = dense attention's bytes
    sel = Selection.full(4, 50)
    assert LoRC().traffic(sel, h_kv=2, d=8, layout=Layout()).get("hbm", "keys") == 50 * 8 * 2
    assert LoRC.presets()["full-rank"].traffic(sel, h_kv=2, d=8, layout=Layout()) == kv_traffic(sel, 2, 8)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(np.eye(4), 5)
    with pytest.raises(ValueError, match="key_ratio"):
        LoRC(key_ratio=0)
    with pytest.raises(ValueError, match="exceeds"):
        LoRC(key_rank=20).traffic(Selection.full(2, 3), h_kv=2, d=8, layout=Layout())
    with pytest.raises(ValueError, match="min_ratio"):
        progressive_ranks([np.eye(2)], min_ratio=0.8, max_ratio=0.5)
    with pytest.raises(ValueError, match="H_kv"):
        LowRankKV.compress(np.eye(6), np.eye(6), 2, 2, 4)
