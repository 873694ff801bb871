"""MLA oracle: absorbed ≡ naive, an independent per-head reference, the generic view, bytes by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse.oracle import core
from kvsparse.oracle.mla import (MLA, MLAWeights, absorb_query, absorbed_view, decode_absorbed,
                                 decode_absorbed_latent, decode_naive, random_weights)
from kvsparse.oracle.types import Layout


def draw_case(seed, heads, r, dr, dn, dv, n):
    rng = np.random.default_rng(seed)
    w = random_weights(rng, heads, r, dn, dv)
    q_nope, q_rope = rng.standard_normal((heads, dn)), rng.standard_normal((heads, dr))
    latent = rng.standard_normal((n, r))
    k_rope = core.rope_apply(rng.standard_normal((n, dr)), np.arange(n)) if dr else np.zeros((n, 0))
    return w, q_nope, q_rope, latent, k_rope


cases = st.builds(draw_case, st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 24),
                  st.sampled_from([0, 2, 4, 8]), st.integers(1, 12), st.integers(1, 12), st.integers(0, 40))


@given(case=cases)
@example(case=draw_case(0, 1, 1, 0, 1, 1, 0))   # empty cache, no RoPE part: output 0, lse -inf in both forms
def test_absorbed_equals_naive(case):
    naive, absorbed = decode_naive(*case), decode_absorbed(*case)
    # re-association only: agreement to a few ulps of the magnitudes involved
    mag = np.abs(case[0].w_uv).sum(axis=2).max() * max(1.0, np.abs(case[3]).max(initial=0.0))
    assert np.max(np.abs(naive.out - absorbed.out), initial=0.0) <= 1e-12 * mag
    assert np.allclose(naive.lse, absorbed.lse, rtol=0, atol=1e-11)


def test_naive_matches_an_independent_per_head_loop():
    w, qn, qr, c, kr = draw_case(7, 3, 10, 4, 6, 5, 9)
    scale = 1 / math.sqrt(6 + 4)
    want = np.zeros((3, 5))
    for h in range(3):
        logits = np.array([(qn[h] @ (w.w_uk[h] @ c[t]) + qr[h] @ kr[t]) * scale for t in range(9)])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        want[h] = sum(p[t] * (w.w_uv[h] @ c[t]) for t in range(9))
    np.testing.assert_allclose(decode_naive(w, qn, qr, c, kr).out, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(decode_absorbed(w, qn, qr, c, kr).out, want, rtol=1e-12, atol=1e-13)


def test_agreement_check_can_fail():
    """Planted bug: absorbing w_uk without the RoPE part of the logits is caught."""
    w, qn, qr, c, kr = draw_case(1, 4, 16, 8, 8, 8, 30)
    wrong = decode_absorbed(w, qn, np.zeros_like(qr), c, kr)
    assert np.max(np.abs(wrong.out - decode_naive(w, qn, qr, c, kr).out)) > 1e-3


@given(case=cases)
def test_generic_step_on_the_absorbed_view(case):
    w, qn, qr, c, kr = case
    m = MLA(heads=w.heads, latent_dim=w.latent_dim, rope_dim=qr.shape[1], nope_dim=qn.shape[1], v_dim=w.w_uv.shape[1])
    q, k, v = absorbed_view(*case)
    step = m.step(q, k, v)
    r = w.latent_dim
    np.testing.assert_allclose(step.output[:, :r], decode_absorbed_latent(*case).out, rtol=1e-12, atol=1e-13)
    assert not step.output[:, r:].any()
    np.testing.assert_allclose(m.decode(*case).output, decode_naive(*case).out, rtol=1e-10, atol=1e-12)
    assert step.traffic == m.decode(*case).traffic


def test_traffic_hand_count_deepseek_v2_lite():
    """Per token and layer (sim.md §6): latent 512 + rope 64 = 576 fp16 = 1152 B; naive 16 x (192 + 128) x 2 B."""
    m = MLA.presets()["canonical"]
    assert m.cache_traffic(1000, Layout()).bytes == {("hbm", "keys"): 1000 * 1152}
    naive = MLA.presets()["deepseek-v2-lite-naive"]
    t = naive.cache_traffic(1000, Layout())
    assert t.get("hbm", "keys") == 1000 * 16 * 192 * 2 and t.get("hbm", "values") == 1000 * 16 * 128 * 2
    assert m.cache_traffic(10, Layout(8)).total == 10 * 576
    assert m.default_scale == 1 / math.sqrt(192)


def test_bad_inputs():
    w, qn, qr, c, kr = draw_case(0, 2, 8, 4, 4, 4, 5)
    with pytest.raises(ValueError, match="latent"):
        decode_naive(w, qn, qr, c[:, :7], kr)
    with pytest.raises(ValueError, match="k_rope"):
        decode_absorbed(w, qn, qr, c, kr[:4])
    with pytest.raises(ValueError, match="w_uk"):
        MLA().decode(w, qn, qr, c, kr)
    with pytest.raises(ValueError, match="form"):
        MLA(form="fused")
    with pytest.raises(TypeError, match="weights"):
        decode_naive((w.w_uk, w.w_uv), qn, qr, c, kr)
    with pytest.raises(ValueError, match="w_uk"):
        MLAWeights(np.zeros((2, 4, 8)), np.zeros((3, 4, 8)))
    assert absorb_query(w, qn).shape == (2, 8)
