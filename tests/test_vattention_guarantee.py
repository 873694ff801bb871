"""Does vAttention keep Pr(||o^ - o|| > eps ||o||) <= delta? Exact binomial tests over many trials.

False alarms. Every ``verify`` call whose test asserts "no violation" runs at ``ALPHA = 1e-9`` for the
whole call (Bonferroni over its heads and claimed targets), so it fails a correct method with
probability at most 1e-9. In the CI profile (30 hypothesis examples) this module makes at most
30 (property test) + 4 (correct samplers of the fault cases) + 2 (explicit passes) = 36 such calls:
family-wise false-alarm probability per CI run <= 36e-9 < 1e-6 (dev profile, 150 examples: <= 1.6e-7).
The tests that assert a violation (planted faults, documented regimes) can only fail by missing it;
their power is computed, not assumed: an independent pilot's exact lower confidence bound
(one-sided level 1e-9) on the failure rate gives a detection probability >= 0.99.
"""
import math
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given

from kvsparse.oracle.vattention import VAttention
from kvsparse.property_tests import vattention as va

ALPHA = 1e-9
TRIALS = 2000


# --- exact binomial machinery ------------------------------------------------------------------

def exact_sf(c, n, p):
    p = Fraction(p)
    return float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(c, n + 1)))


@pytest.mark.parametrize("n,p", [(1, 0.3), (10, 0.05), (37, 0.5), (60, 0.01)])
def test_binomial_tail_is_exact(n, p):
    for c in range(n + 2):
        assert va.binom_sf(c, n, p) == pytest.approx(exact_sf(c, n, p), rel=1e-9, abs=1e-300)


def test_critical_count_is_the_smallest_level_alpha_cut():
    for n, p0, a in [(50, 0.1, 0.01), (2000, 0.05, 1e-9), (200, 0.2, 1e-6)]:
        c = va.critical_count(n, p0, a)
        assert va.binom_sf(c, n, p0) <= a < va.binom_sf(c - 1, n, p0)


def test_clopper_pearson():
    n = 40
    assert va.clopper_pearson(0, n, 0.95) == pytest.approx((0.0, 1 - 0.025 ** (1 / n)), rel=1e-9)
    assert va.clopper_pearson(n, n, 0.95) == pytest.approx((0.025 ** (1 / n), 1.0), rel=1e-9)
    lo, hi = va.clopper_pearson(7, n, 0.9)
    assert va.binom_sf(7, n, lo) == pytest.approx(0.05, rel=1e-6)
    assert 1 - va.binom_sf(8, n, hi) == pytest.approx(0.05, rel=1e-6)


# --- the conservative variant holds on every generated input ------------------------------------

@given(va.cases())
@example(va.Case("one_dominant", 400, 2, 1, 1, 0, 0.05, 1, 0, 0, 0.2, 0.1))
@example(va.Case("heavy_tailed", 300, 16, 2, 1, 1, 0.1, 1, 8, 4, 0.05, 0.05))
def test_conservative_variant_failure_rate_is_at_most_delta(case):
    q, k, v = case.inputs()
    rep = va.verify(case.method(budget_rule="chebyshev"), q, k, v, trials=TRIALS, alpha=ALPHA, seed=case.seed)
    assert not rep.violated, va.VerificationReport.rows(rep)


# --- power: planted faults are caught where the correct sampler passes --------------------------
FAULT_CASES = {
    # fault: (preset, family, n, sinks, local, heavy, eps, delta)
    "quarter_budget": ("paper-denominator", "gaussian", 4096, 4, 16, 0, 0.1, 0.1),
    "with_replacement_uncorrected": ("canonical", "equal_scores", 1024, 4, 16, 0, 0.1, 0.1),
    "wrong_scaling": ("paper-denominator", "gaussian", 1024, 64, 64, 0, 0.05, 0.1),
    "dropped_sinks": ("canonical", "gaussian", 1024, 64, 16, 0, 0.05, 0.1),
}


def fault_setup(fault):
    preset, family, n, sinks, local, heavy, eps, dlt = FAULT_CASES[fault]
    m = replace(VAttention.presets()[preset], sinks=sinks, local=local, heavy=heavy, epsilon=eps, delta=dlt)
    return m, va.make_input(family, n, 16, 1, 1, seed=11)


@pytest.mark.parametrize("fault", sorted(FAULT_CASES))
def test_planted_fault_is_caught_with_probability_at_least_099(fault):
    m, (q, k, v) = fault_setup(fault)
    assert not va.verify(m, q, k, v, trials=TRIALS, alpha=ALPHA, seed=1).violated     # correct sampler passes
    caught = va.verify(m, q, k, v, trials=TRIALS, alpha=ALPHA, seed=2, fault=fault)
    assert caught.violated
    # power from an independent pilot: a lower confidence bound on the faulty failure rate
    pilot = va.verify(m, q, k, v, trials=TRIALS, alpha=ALPHA, seed=3, fault=fault)
    power = max(va.detection_probability(va.clopper_pearson(t.failures, TRIALS, 1 - 2e-9)[0], TRIALS, t.level,
                                         caught.alpha_per_test)
                for h in pilot.heads for t in h.targets.values() if t.level is not None)
    assert power >= 0.99


# --- honesty: regimes where the paper's CLT rule and the reference preset exceed delta -----------

@pytest.mark.parametrize("preset,n,share,eps,dlt", [
    ("paper-denominator", 8192, 0.05, 0.2, 0.1),      # one token with 5% of the mass over a flat row
    ("sparse-attention-hub", 8192, 0.05, 0.05, 0.05),  # base sample misses it: sigma^ = 1e-8, b = b0
])
def test_documented_regimes_exceed_delta(preset, n, share, eps, dlt):
    m = replace(VAttention.presets()[preset], sinks=4, local=16, heavy=0, epsilon=eps, delta=dlt)
    q, k, v = va.make_input("one_dominant", n, 16, 1, 1, seed=0, share=share)
    rep = va.verify(m, q, k, v, trials=TRIALS, alpha=ALPHA, seed=0)
    assert rep.heads[0].targets["denominator"].violated


def test_clt_rule_passes_where_the_clt_is_accurate():
    for preset in ("canonical", "paper-denominator"):
        m = replace(VAttention.presets()[preset], sinks=4, local=16, heavy=0.05, epsilon=0.1, delta=0.1)
        q, k, v = va.make_input("gaussian", 8192, 16, 1, 1, seed=5)
        assert not va.verify(m, q, k, v, trials=TRIALS, alpha=ALPHA, seed=4).violated
