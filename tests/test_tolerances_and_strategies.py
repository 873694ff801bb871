"""The FlashAttention tolerance rule and the strategies: they accept good kernels, reject planted bugs,
and generate the structure they claim."""
import numpy as np
import pytest
from hypothesis import given

from kvsparse.oracle import core
from kvsparse.property_tests import tolerances
from kvsparse.property_tests.strategies import FAMILIES, decode_inputs, make_decode_input


def float32_kernel(q, k, v, scale=None, drop_last=False, scale_bug=False):
    """A straightforward float32 decode kernel (different summation order from the naive one)."""
    q32, k32, v32 = (np.asarray(a, np.float32) for a in (q, k, v))
    h_q, d = q32.shape
    g = h_q // k32.shape[0]
    s = np.float32(1.0 if scale_bug else 1 / np.sqrt(d))
    out = np.zeros((h_q, d), np.float32)
    for h in range(h_q):
        kk, vv = k32[h // g], v32[h // g]
        if drop_last:
            kk, vv = kk[:-1], vv[:-1]
        x = (kk @ q32[h]) * s
        p = np.exp(x - x.max())
        out[h] = (p[:, None] * vv).sum(axis=0) / p.sum()
    return out


@given(decode_inputs(min_n=2, max_n=200, families=("gaussian", "heavy_tails", "sink_and_local", "near_ties")))
def test_a_correct_float32_kernel_is_within_tolerance(x):
    check = tolerances.check_attention_output(float32_kernel(x.q, x.k, x.v), x.q, x.k, x.v, "float32")
    assert check.ok, check


@pytest.mark.parametrize("bug", ["drop_last", "scale_bug"])
def test_planted_kernel_bugs_exceed_tolerance(bug):
    caught = 0
    for seed in range(10):
        x = make_decode_input(4, 2, 64, 16, "sink_and_local", seed)
        got = float32_kernel(x.q, x.k, x.v, **{bug: True})
        caught += not tolerances.check_attention_output(got, x.q, x.k, x.v, "float32").ok
    assert caught == 10


def test_tolerance_is_a_multiple_of_the_naive_error_and_not_looser():
    x = make_decode_input(8, 2, 512, 64, "gaussian", 0)
    ref = tolerances.reference_on_rounded(x.q, x.k, x.v, "float16")
    naive = tolerances.naive_attention(x.q, x.k, x.v, "float16")
    err = np.abs(naive - ref).max()
    assert err > 0
    tol = tolerances.attention_tolerance(x.q, x.k, x.v, "float16")
    first = tolerances.first_order_error(x.q, x.k, x.v, "float16", ref)
    assert tol == pytest.approx(2 * max(err, first) + 2.0 ** -11 * np.abs(ref).max())
    assert first < err                # float16: the accumulation scale is far below the realized error...
    assert tol < 4 * err              # ...so the rule is FlashAttention's 2x, not a blanket tolerance
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        tolerances.attention_tolerance(x.q, x.k, x.v, "float16", multiple=0.5)


def test_non_finite_kernel_output_fails():
    x = make_decode_input(2, 1, 8, 4)
    got = np.full((2, 4), np.nan)
    assert not tolerances.check_attention_output(got, x.q, x.k, x.v, "float32").ok


def test_masked_tolerance_uses_the_masked_reference():
    x = make_decode_input(2, 1, 30, 8, seed=9)
    mask = np.zeros((2, 30), bool)
    mask[:, :10] = True
    good = core.attend_mask(x.q, x.k, x.v, mask).astype(np.float32)
    assert tolerances.check_attention_output(good, x.q, x.k, x.v, "float32", mask=mask).ok
    assert not tolerances.check_attention_output(core.attend_dense(x.q, x.k, x.v), x.q, x.k, x.v, "float32", mask=mask).ok


def test_families_have_the_structure_they_claim():
    huge = make_decode_input(4, 2, 100, 16, "huge_logits", 1, logit_scale=1e4)
    assert np.abs(core.logits(huge.q, huge.k)).max() == pytest.approx(1e4)
    ties = make_decode_input(2, 1, 50, 8, "near_ties", 2)
    rows = {tuple(r) for r in np.round(ties.k[0], 9)}
    assert len(rows) <= 4                       # only a few distinct keys up to 1e-12
    out = make_decode_input(2, 1, 50, 32, "outlier_channels", 3)
    col = np.abs(out.k[0]).mean(axis=0)
    assert col.max() > 20 * np.median(col)
    sink = make_decode_input(4, 1, 200, 16, "sink_and_local", 4)
    p = core.softmax(core.logits(sink.q, sink.k))
    assert (p[:, 0] > 10 / 200).all()           # token 0 draws far more than a uniform share
    assert set(FAMILIES) == {"gaussian", "near_ties", "huge_logits", "outlier_channels", "heavy_tails", "sink_and_local"}


@given(decode_inputs())
def test_strategy_inputs_are_valid_decode_steps(x):
    q, k, v, sh = core.check_decode_inputs(x.q, x.k, x.v)
    assert sh.n >= 1 and sh.h_q % sh.h_kv == 0
    again = make_decode_input(sh.h_q, sh.h_kv, sh.n, sh.d, x.family, x.seed)
    assert np.array_equal(again.k, x.k)          # reproducible from its repr


def test_hypothesis_prints_inputs_by_their_short_repr():
    """A falsifying example is printed by Hypothesis's pretty printer, which spells a dataclass out
    field by field (whole arrays); inputs print as their one-line repr instead."""
    from hypothesis.vendor.pretty import pretty
    from kvsparse.property_tests.sequences import make_decode_sequence
    from kvsparse.property_tests.strategies import make_decode_input
    x = make_decode_input(4, 2, 500, 64, "gaussian", seed=3)
    seq = make_decode_sequence(40, 4, 2, 16, prefill_len=20, family="gaussian", seed=3)
    assert pretty(x) == repr(x) and len(pretty(x)) < 120
    assert pretty(seq) == repr(seq) and len(pretty(seq)) < 120
