"""vAttention oracle: deterministic set, HT weights, presets, the reference's budget and bias, and the
verifier's vectorized trials against the oracle. Exact tests only (expectations by enumeration): no
statistical false alarms in this module."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvsparse import registry
from kvsparse.oracle import core
from kvsparse.oracle.types import Layout, kv_traffic
from kvsparse.oracle.vattention import VAttention, chebyshev_budget, clt_budget, normal_quantile
from kvsparse.property_tests import vattention as va


def small(n=40, d=4, h_kv=1, group=1, seed=0, family="gaussian"):
    return va.make_input(family, n, d, h_kv, group, seed)


def test_presets_are_registered():
    for name in ("canonical", "paper-denominator", "conservative", "sparse-attention-hub"):
        assert isinstance(registry.oracle("vattention", name), VAttention)
    assert registry.oracle("vattention").budget_rule == "clt"


def test_deterministic_set_sinks_local_topk_with_tie_rule():
    q, k, v = small(n=20, family="equal_scores")          # every score equal: ties everywhere
    m = VAttention(sinks=2, local=3, heavy=4)
    fixed, others = m.fixed_sets(q, k)
    # sinks 0,1; window 17,18,19; top-4 of the rest by the tie rule: the lowest indices 2..5
    assert fixed[0].tolist() == [0, 1, 2, 3, 4, 5, 17, 18, 19]
    assert others[0].tolist() == list(range(6, 17))


def test_pluggable_selector_picks_the_top_k():
    q, k, v = small(n=30)
    prefer = np.zeros((1, 30))
    prefer[0, [7, 11, 23]] = 1.0
    m = VAttention(sinks=1, local=1, heavy=3, selector=lambda q_, k_: prefer)
    assert m.fixed_sets(q, k)[0][0].tolist() == [0, 7, 11, 23, 29]
    bad = VAttention(sinks=1, local=1, heavy=3, selector=lambda q_, k_: np.zeros((2, 30)))
    with pytest.raises(ValueError, match="selector"):
        bad.fixed_sets(q, k)


def test_estimator_is_the_horvitz_thompson_ratio():
    q, k, v = small(n=50, d=3)
    m = VAttention(sinks=2, local=4, heavy=3, epsilon=0.3, delta=0.3, targets="denominator")
    plan = m.plan(q, k, v)
    hp = plan.heads[0]
    b = int(hp.budgets[0])
    assert 1 <= b < hp.domain.size
    sample = hp.domain[::max(1, hp.domain.size // b)][:b]
    res = m.step(q, k, v, samples=[sample])
    e = np.exp(plan.logits[0])
    n_s = hp.domain.size
    num = e[hp.fixed] @ v[0, hp.fixed] + n_s / b * (e[sample] @ v[0, sample])
    den = e[hp.fixed].sum() + n_s / b * e[sample].sum()
    np.testing.assert_allclose(res.output[0], num / den, rtol=1e-12)
    assert res.selection.indices[0].tolist() == sorted(np.concatenate([hp.fixed, sample]).tolist())
    assert res.traffic == kv_traffic(res.selection, 1, 3, Layout())


def test_full_sample_without_replacement_is_exact():
    q, k, v = small(n=64, d=8, h_kv=2, group=2)
    m = VAttention(sinks=2, local=4, heavy=0.1, epsilon=0.01, delta=0.01)   # budget saturates at n_s
    plan = m.plan(q, k, v)
    assert all(int(hp.budgets[0]) == hp.domain.size for hp in plan.heads)
    np.testing.assert_allclose(m.step(q, k, v).output, core.attend_dense(q, k, v), rtol=1e-12, atol=1e-14)


def _enumerate_mean(m, q, k, v, draws):
    outs = [m.plan(q, k, v)]
    hp = outs[0].heads[0]
    e = np.exp(outs[0].logits[0])
    num, den = [], []
    for smp in draws(hp):
        sel = m.select(q, k, v, samples=[np.array(smp, dtype=np.int64)])
        w = sel.weights[0]
        num.append((w * e[sel.indices[0]]) @ v[0, sel.indices[0]])
        den.append((w * e[sel.indices[0]]).sum())
    return np.mean(num, axis=0), np.mean(den), e, hp


@pytest.mark.parametrize("sampling", ["without_replacement", "with_replacement"])
def test_numerator_and_denominator_are_unbiased_by_enumeration(sampling):
    q, k, v = small(n=12, d=3)
    m = VAttention(sinks=2, local=3, heavy=2, epsilon=0.9, delta=0.9, sampling=sampling, targets="denominator")
    if sampling == "without_replacement":
        draws = lambda hp: itertools.combinations(hp.domain.tolist(), int(hp.budgets[0]))
    else:
        draws = lambda hp: itertools.product(hp.domain.tolist(), repeat=int(hp.budgets[0]))
    mean_num, mean_den, e, hp = _enumerate_mean(m, q, k, v, draws)
    assert 1 <= int(hp.budgets[0]) < hp.domain.size
    np.testing.assert_allclose(mean_num, e @ v[0], rtol=1e-12)
    np.testing.assert_allclose(mean_den, e.sum(), rtol=1e-12)


def test_dedup_bias_is_the_inclusion_probability_ratio():
    """With replacement, duplicates collapsed, weight n_s/b: E = (1 - (1 - 1/n_s)^b) n_s/b x truth."""
    q, k, v = small(n=8, d=2, family="equal_scores")
    m = VAttention(sinks=1, local=2, heavy=0, epsilon=0.01, delta=0.01, sampling="with_replacement_dedup")
    draws = lambda hp: itertools.product(hp.domain.tolist(), repeat=int(hp.budgets[0]))
    _, mean_den, e, hp = _enumerate_mean(m, q, k, v, draws)
    n_s, b = hp.domain.size, int(hp.budgets[0])
    assert b == n_s == 5
    residual = e[hp.domain].sum()
    expected = e[hp.fixed].sum() + (1 - (1 - 1 / n_s) ** b) * n_s / b * residual
    np.testing.assert_allclose(mean_den, expected, rtol=1e-12)
    assert (1 - (1 - 1 / n_s) ** b) == pytest.approx(0.67232)   # a third of the residual mass is lost


def test_reference_budget_matches_the_written_formula():
    q, k, v = small(n=60, d=4)
    m = VAttention(sinks=3, local=5, heavy=4, epsilon=0.2, delta=0.1, budget_rule="reference",
                   sampling="with_replacement_dedup", domain="window", base_rate=0.1, weight_guard=1e-6)
    base = np.array([3, 10, 10, 40, 54])                 # b0 = max(2, int(0.1 * 52)) = 5; a duplicate
    plan = m.plan(q, k, v, base_samples=[base])
    hp = plan.heads[0]
    x = np.exp(plan.logits[0] - plan.logits[0].max())
    n_w = 52
    d_hat = x[hp.fixed].sum() / (1 + 1e-6) + x[[3, 10, 40, 54]].sum() / (5 / n_w + 1e-6)
    sigma = max(np.std(x[base], ddof=1), 1e-8)
    raw = (normal_quantile(0.9) * sigma * n_w / max(0.2 * d_hat, 1e-8)) ** 2
    expected = min(max(math.floor(min(max(raw, 1.0), n_w)), 5), n_w)
    assert int(hp.budgets[0]) == expected
    assert hp.domain.tolist() == list(range(3, 55))


def test_reference_merge_weights():
    q, k, v = small(n=40, d=2)
    m = VAttention.presets()["sparse-attention-hub"]
    m = VAttention(**{**m.__dict__, "sinks": 2, "local": 4, "heavy": 3, "epsilon": 0.5, "delta": 0.5})
    base = [np.array([5, 6])]
    hp = m.plan(q, k, v, base_samples=base).heads[0]
    b = int(hp.budgets[0])
    top = np.setdiff1d(hp.fixed, [0, 1, 36, 37, 38, 39])
    outside = np.setdiff1d(hp.domain, hp.fixed)
    smp = np.array([top[0]] + [outside[0]] * (b - 1))     # one draw on a top-k slot, the rest duplicates
    sel = m.select(q, k, v, samples=[smp], base_samples=base)
    w = dict(zip(sel.indices[0].tolist(), sel.weights[0].tolist()))
    assert w[int(top[0])] == pytest.approx(1 / (1 + 1e-6), rel=1e-15)
    assert w[int(outside[0])] == pytest.approx(1 / (b / 34 + 1e-6), rel=1e-15)
    assert len(w) == hp.fixed.size + 1


def test_reference_degenerate_windows():
    q, k, v = small(n=10, d=2)
    full = VAttention(sinks=5, local=4, budget_rule="reference", domain="window",
                      sampling="with_replacement_dedup").step(q, k, v)
    assert full.selection.sizes.tolist() == [10]
    np.testing.assert_allclose(full.output, core.attend_dense(q, k, v), rtol=1e-12)
    det = VAttention(sinks=2, local=2, heavy=0, base_rate=0, budget_rule="reference", domain="window",
                     sampling="with_replacement_dedup").step(q, k, v)
    assert det.selection.indices[0].tolist() == [0, 1, 8, 9]


def test_seeded_and_injected_randomness():
    q, k, v = small(n=200, d=4, h_kv=2, group=2)
    m = VAttention(sinks=2, local=4, heavy=0, epsilon=0.3, delta=0.3, targets="denominator")
    assert m.select(q, k, v) == m.select(q, k, v)
    a = m.select(q, k, v, rng=np.random.default_rng(1))
    b = m.select(q, k, v, rng=np.random.default_rng(2))
    assert a != b


@pytest.mark.parametrize("preset", ["canonical", "conservative", "sparse-attention-hub"])
def test_verifier_trials_equal_the_oracle(preset):
    """The verifier's vectorized estimate of a trial is the oracle's output for the same draws."""
    q, k, v = small(n=120, d=4, h_kv=1, group=2)
    base = VAttention.presets()[preset]
    m = VAttention(**{**base.__dict__, "sinks": 2, "local": 6, "heavy": 5, "epsilon": 0.4, "delta": 0.4})
    rng = np.random.default_rng(3)
    plan = m.plan(q, k, v, trials=4, rng=rng)
    trials = [va.head_trials(hp, plan.logits[h], v[0], rng, keep_counts=True) for h, hp in enumerate(plan.heads)]
    for t in range(4):
        samples = []
        for hp, ht in zip(plan.heads, trials):
            smp = np.repeat(hp.domain, ht.counts[t].astype(np.int64))
            if hp.sampling == "with_replacement_dedup":   # the counts are 0/1: pad with repeats of a kept draw
                smp = np.concatenate([smp, np.full(int(hp.budgets[t]) - smp.size, smp[0])])
            samples.append(smp)
        bases = None if plan.heads[0].base is None else [hp.base[t] for hp in plan.heads]
        out = m.step(q, k, v, samples=samples, base_samples=bases).output
        expected = np.stack([ht.num[t] / ht.den[t] for ht in trials])
        np.testing.assert_allclose(out, expected, rtol=1e-10)


@settings(max_examples=20)
@given(st.sampled_from(["gaussian", "heavy_tailed", "bimodal", "one_dominant"]), st.integers(0, 1000),
       st.sampled_from([0.05, 0.1, 0.3]), st.sampled_from([0.05, 0.1, 0.3]))
def test_budgets_never_decrease_when_eps_or_delta_shrink(family, seed, eps, dlt):
    q, k, v = va.make_input(family, 300, 4, 1, 1, seed)
    s = core.logits(q, k)[0]
    x = np.exp(s - s.max())
    dom = np.arange(4, 290)
    for rule in (lambda e, d: clt_budget(x, v[0], dom, e, d), lambda e, d: clt_budget(x, v[0], dom, e, d, "denominator"),
                 lambda e, d: chebyshev_budget(x, v[0], dom, e, d)):
        assert rule(eps / 2, dlt) >= rule(eps, dlt)
        assert rule(eps, dlt / 2) >= rule(eps, dlt)


def test_bad_inputs_are_named():
    q, k, v = small(n=40)
    with pytest.raises(ValueError, match="epsilon"):
        VAttention(epsilon=0.0)
    with pytest.raises(ValueError, match="budget_rule"):
        VAttention(budget_rule="hoeffding")
    with pytest.raises(ValueError, match="domain='window'"):
        VAttention(budget_rule="reference")
    with pytest.raises(TypeError, match="sinks"):
        VAttention(sinks=True)
    m = VAttention(sinks=2, local=2, heavy=0, epsilon=0.5, delta=0.5, targets="denominator")
    hp = m.plan(q, k, v).heads[0]
    b = int(hp.budgets[0])
    with pytest.raises(ValueError, match="budget"):
        m.select(q, k, v, samples=[hp.domain[: b + 1]])
    with pytest.raises(ValueError, match="domain"):
        m.select(q, k, v, samples=[np.r_[0, hp.domain[: b - 1]]])
    with pytest.raises(ValueError, match="repeat"):
        m.select(q, k, v, samples=[np.full(b, hp.domain[0])])
