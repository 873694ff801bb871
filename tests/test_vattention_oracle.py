"""vAttention oracle: deterministic set, HT weights, presets, the reference's budget and bias, the
verifier's vectorized trials against the oracle, what each configuration claims, and the budget rules
against the exact moments and failure probabilities of their sampling schemes (every draw enumerated).
Exact tests only: no statistical false alarms in this module."""
import itertools
import math
from dataclasses import replace

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


# --- honest claims: what each combination of rule, sampling, domain and guard promises ------------

@pytest.mark.parametrize("kw,expected", [
    ({}, {"numerator", "denominator", "output"}),
    ({"targets": "denominator"}, {"denominator"}),
    ({"sampling": "with_replacement"}, {"numerator", "denominator", "output"}),
    ({"domain": "window"}, {"numerator", "denominator", "output"}),
    ({"sampling": "with_replacement_dedup"}, set()),                   # biased: no derivation
    ({"weight_guard": 1e-6}, set()),                                   # biased HT factors
    ({"budget_rule": "chebyshev"}, {"output"}),
    ({"budget_rule": "chebyshev", "sampling": "with_replacement"}, {"output"}),
    ({"budget_rule": "chebyshev", "domain": "window"}, {"output"}),
    ({"budget_rule": "chebyshev", "domain": "window", "sampling": "with_replacement"}, {"output"}),
    ({"budget_rule": "chebyshev", "sampling": "with_replacement_dedup"}, set()),
    ({"budget_rule": "chebyshev", "domain": "window", "sampling": "with_replacement_dedup"}, set()),
    ({"budget_rule": "chebyshev", "weight_guard": 1e-6}, set()),
    ({"budget_rule": "reference", "domain": "window", "sampling": "with_replacement_dedup"}, {"denominator"}),
])
def test_claims_only_where_a_derivation_applies(kw, expected):
    m = VAttention(epsilon=0.1, delta=0.2, **kw)
    assert set(m.claims()) == expected
    if "output" in expected:
        assert m.claims()["output"] == (0.1, 0.2)


def test_a_configuration_without_claims_is_never_flagged():
    """Dedup with replacement is biased (-37% at b = n_s): the verifier reports its rates, tests nothing."""
    q, k, v = va.make_input("heavy_tailed", 1024, 16, 1, 1, seed=0)
    m = VAttention(sinks=256, local=256, heavy=0, epsilon=0.05, delta=0.05, budget_rule="chebyshev",
                   sampling="with_replacement_dedup")
    rep = va.verify(m, q, k, v, trials=50, seed=0)
    assert m.claims() == {} and not rep.violated
    assert all(t.level is None and t.critical is None for t in rep.heads[0].targets.values())


def test_with_replacement_budget_of_n_s_attends_the_domain_exactly():
    q, k, v = small(n=64, d=8, h_kv=2, group=2)
    for rule in ("clt", "chebyshev"):
        m = VAttention(sinks=2, local=4, heavy=3, epsilon=0.01, delta=0.01, budget_rule=rule,
                       sampling="with_replacement")
        plan = m.plan(q, k, v)
        assert all(hp.domain.size == 0 and int(hp.budgets[0]) == 0 and hp.fixed.size == 64 for hp in plan.heads)
        res = m.step(q, k, v)
        assert all(w.tolist() == [1.0] * 64 for w in res.selection.weights)
        np.testing.assert_allclose(res.output, core.attend_dense(q, k, v), rtol=1e-12, atol=1e-14)


# --- the budgets against the exact moments of the sampling scheme (enumeration) -------------------

def _all_draws(m, b, replacement):
    """Every draw of ``b`` of ``m`` domain slots: counts ``[K, m]`` and exact probabilities ``[K]``."""
    rows, probs = [], []
    if replacement:
        for c in itertools.combinations_with_replacement(range(m), b):
            cnt = np.bincount(c, minlength=m)
            rows.append(cnt)
            probs.append(math.factorial(b) / math.prod(math.factorial(int(t)) for t in cnt) / m ** b)
    else:
        for c in itertools.combinations(range(m), b):
            rows.append(np.bincount(c, minlength=m))
            probs.append(1 / math.comb(m, b))
    return np.array(rows, dtype=np.float64), np.array(probs)


def _exact_estimates(fixed, domain, x, v, b, replacement):
    """(probabilities, N^ [K, d], D^ [K]) of every draw of size ``b`` from ``domain``: weight 1 on ``fixed``,
    ``|domain|/b`` per draw of a domain slot outside ``fixed`` (a drawn slot of F adds nothing)."""
    counts, probs = _all_draws(domain.size, b, replacement)
    xd = np.where(np.isin(domain, fixed), 0.0, x[domain])
    w = domain.size / b
    num = x[fixed] @ v[fixed] + w * counts @ (xd[:, None] * v[domain])
    den = x[fixed].sum() + w * counts @ xd
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    return probs, num, den


def chebyshev_mismatch(m, q, k, v):
    """None if every head's budget is the smallest ``b`` whose exact moments (enumerated) meet the
    Chebyshev and Cantelli conditions of the module docstring at some ``e2`` of the grid (with
    replacement: the domain is attended exactly when no ``b < n_s`` does); otherwise a message."""
    from kvsparse.oracle.vattention import CHEBYSHEV_E2_GRID as e2
    replacement = m.sampling == "with_replacement"
    plan = m.plan(q, k, v)
    fixed, others = m.fixed_sets(q, k)
    for h, hp in enumerate(plan.heads):
        x = np.exp(plan.logits[h] - plan.logits[h].max())
        vh = v[h * v.shape[0] // q.shape[0]]
        dom = m._window(k.shape[1]) if m.domain == "window" else others[h]
        n_s = dom.size
        d_total, o = x.sum(), (x @ vh) / x.sum()
        allowed_w = m.delta / 2 * (m.epsilon * (1 - e2) * np.linalg.norm(o) * d_total) ** 2
        allowed_d = (e2 * d_total) ** 2 * (m.delta / 2) / (1 - m.delta / 2)

        def feasible(b, slack):
            probs, num, den = _exact_estimates(fixed[h], dom, x, vh, b, replacement)
            mse_w = probs @ (np.linalg.norm(num - o[None, :] * den[:, None], axis=1) ** 2)
            var_d = probs @ (den - d_total) ** 2
            return bool(np.any((mse_w <= allowed_w * slack) & (var_d <= allowed_d * slack)))

        # smallest feasible b; float rounding at the boundary (within 1e-9 relative) must not decide it
        smallest = next((b for b in range(1, n_s + 1) if feasible(b, 1 + 1e-9)), None)
        assert smallest is None or feasible(smallest, 1 - 1e-9), "a budget on the float boundary: pick another input"
        got = int(hp.budgets[0])
        if replacement and (smallest is None or smallest >= n_s):
            ok = hp.domain.size == 0 and got == 0 and hp.fixed.tolist() == np.union1d(fixed[h], dom).tolist()
        else:
            ok = got == smallest and hp.domain.tolist() == dom.tolist() and hp.fixed.tolist() == fixed[h].tolist()
        if not ok:
            return f"head {h}: budget {got} (domain {hp.domain.size}), smallest feasible b {smallest} of n_s = {n_s}"
    return None


BUDGET_CASES = [   # (family, seed, eps, delta) at n = 11, d = 3, sinks 1, local 1, top-2: every budget in (1, n_s)
    ("gaussian", 3, 0.5, 0.5),
    ("heavy_tailed", 2, 0.5, 0.5),
    ("one_dominant", 2, 0.6, 0.6),
    ("equal_scores", 1, 0.5, 0.5),
    ("bimodal", 3, 0.5, 0.5),
]
COMBOS = [("without_replacement", "residual"), ("with_replacement", "residual"),
          ("without_replacement", "window"), ("with_replacement", "window")]


def budget_case(case, sampling, domain, rule="chebyshev"):
    family, seed, eps, dlt = case
    m = VAttention(sinks=1, local=1, heavy=2, epsilon=eps, delta=dlt, budget_rule=rule, sampling=sampling,
                   domain=domain)
    return m, va.make_input(family, 11, 3, 1, 1, seed, share=0.3)


@pytest.mark.parametrize("sampling,domain", COMBOS)
@pytest.mark.parametrize("case", BUDGET_CASES, ids=[c[0] for c in BUDGET_CASES])
def test_chebyshev_budget_is_the_smallest_the_exact_moments_allow(case, sampling, domain):
    m, (q, k, v) = budget_case(case, sampling, domain)
    hp = m.plan(q, k, v).heads[0]
    assert 1 < int(hp.budgets[0]) < hp.domain.size          # the check is not vacuous
    assert chebyshev_mismatch(m, q, k, v) is None


def test_the_budget_check_catches_planted_bugs(monkeypatch):
    """The budget check fails on the two bugs this module once had: window statistics that count the
    top-k slots (which a draw never adds), and the finite-population factor used when drawing with
    replacement."""
    import kvsparse.oracle.vattention as ov
    real_smallest_b = ov._smallest_b
    window = [budget_case(c, s, "window") for c in BUDGET_CASES for s in ("without_replacement", "with_replacement")]
    replacement = [budget_case(c, "with_replacement", d) for c in BUDGET_CASES for d in ("residual", "window")]
    with monkeypatch.context() as mp:
        mp.setattr(ov, "_domain_terms", lambda x, domain, exclude: x[domain])
        assert all(chebyshev_mismatch(m, *inp) is not None for m, inp in window)
    with monkeypatch.context() as mp:
        mp.setattr(ov, "_smallest_b", lambda n_s, s2, allowed, replacement=False: real_smallest_b(n_s, s2, allowed))
        assert all(chebyshev_mismatch(m, *inp) is not None for m, inp in replacement)


def exact_output_failure(hp, logits, v, eps):
    """``Pr(||o^ - o|| > eps ||o||)`` of one head's plan, exactly (every draw enumerated)."""
    x = np.exp(logits - logits.max())
    o = (x @ v) / x.sum()
    if not hp.budgets[0]:
        probs, num, den = np.ones(1), (x[hp.fixed] @ v[hp.fixed])[None], x[hp.fixed].sum()[None]
    else:
        probs, num, den = _exact_estimates(hp.fixed, hp.domain, x, v, int(hp.budgets[0]),
                                           hp.sampling == "with_replacement")
    err = np.linalg.norm(num / den[:, None] - o, axis=1)
    return float(probs[~(err <= eps * np.linalg.norm(o))].sum())


@pytest.mark.parametrize("sampling,domain", COMBOS)
def test_conservative_rule_keeps_delta_exactly_on_small_inputs(sampling, domain):
    for case in BUDGET_CASES:
        m, (q, k, v) = budget_case(case, sampling, domain)
        plan = m.plan(q, k, v)
        assert exact_output_failure(plan.heads[0], plan.logits[0], v[0], m.epsilon) <= m.delta


def test_with_replacement_on_the_without_replacement_budget_exceeds_delta():
    """The bug the audit found (Chebyshev's finite-population budget, then drawn with replacement, so
    b = n_s is not exact) fails far more often than delta; the fixed rule attends exactly here."""
    q, k, v = va.make_input("heavy_tailed", 11, 4, 1, 1, seed=3)
    kw = dict(sinks=1, local=2, heavy=0, epsilon=0.3, delta=0.3, budget_rule="chebyshev")
    wor, wr = VAttention(**kw).plan(q, k, v), VAttention(**kw, sampling="with_replacement").plan(q, k, v)
    old = replace(wor.heads[0], sampling="with_replacement")
    assert int(old.budgets[0]) == old.domain.size == 8
    assert exact_output_failure(old, wor.logits[0], v[0], 0.3) == pytest.approx(0.8003, abs=5e-5)
    assert exact_output_failure(wor.heads[0], wor.logits[0], v[0], 0.3) == 0.0
    assert wr.heads[0].domain.size == 0 and exact_output_failure(wr.heads[0], wr.logits[0], v[0], 0.3) == 0.0


def clt_mismatch(m, q, k, v):
    """None if every head's CLT budget is ``ceil(z^2 V_1 / tau^2)`` per target (the larger of N and D for
    ``targets="output"``), clamped to ``[1, n_s]``, where ``V_1`` is the exact mean square error of the
    one-draw Hansen-Hurwitz estimate (enumerated; zero-weight slots of F included), ``tau = e * total``;
    with replacement a budget ``>= n_s`` attends the domain exactly. Otherwise a message."""
    from kvsparse.oracle.vattention import normal_quantile, output_split
    plan = m.plan(q, k, v)
    fixed, others = m.fixed_sets(q, k)
    for h, hp in enumerate(plan.heads):
        x = np.exp(plan.logits[h] - plan.logits[h].max())
        vh = v[h * v.shape[0] // q.shape[0]]
        dom = m._window(k.shape[1]) if m.domain == "window" else others[h]
        probs, num, den = _exact_estimates(fixed[h], dom, x, vh, 1, True)
        mse_d = probs @ (den - x.sum()) ** 2
        mse_n = probs @ np.linalg.norm(num - x @ vh, axis=1) ** 2
        if m.targets == "denominator":
            z, e = normal_quantile(1 - m.delta / 2), m.epsilon
            need = z * z * mse_d / (e * x.sum()) ** 2
        else:
            z, e = normal_quantile(1 - m.delta / 4), output_split(m.epsilon)
            need = max(z * z * mse_d / (e * x.sum()) ** 2, z * z * mse_n / (e * np.linalg.norm(x @ vh)) ** 2)
        want = min(dom.size, max(1, math.ceil(need)))
        got = int(hp.budgets[0])
        if m.sampling == "with_replacement" and want >= dom.size:
            ok = got == 0 and hp.domain.size == 0
        else:
            ok = got == want and hp.domain.tolist() == dom.tolist()
        if not ok:
            return f"head {h}: budget {got} (domain {hp.domain.size}), the exact one-draw moments give {want}"
    return None


CLT_CASES = [(("gaussian", 0, 0.3, 0.3), "denominator"), (("gaussian", 1, 0.5, 0.5), "output")]


@pytest.mark.parametrize("sampling,domain", COMBOS)
@pytest.mark.parametrize("case,targets", CLT_CASES, ids=[t for _, t in CLT_CASES])
def test_clt_budget_matches_the_exact_one_draw_moments(case, targets, sampling, domain, monkeypatch):
    m, (q, k, v) = budget_case(case, sampling, domain, rule="clt")
    m = replace(m, targets=targets)
    hp = m.plan(q, k, v).heads[0]
    assert 1 < int(hp.budgets[0]) < hp.domain.size
    assert clt_mismatch(m, q, k, v) is None
    if domain == "window":   # planted bug: statistics that count the top-k slots of the window
        import kvsparse.oracle.vattention as ov
        monkeypatch.setattr(ov, "_domain_terms", lambda x, domain, exclude: x[domain])
        assert clt_mismatch(m, q, k, v) is not None


def test_check_sampler_tests_no_guarantee_where_nothing_is_claimed():
    """A kernel of a claimless configuration is still held to the contract and the deterministic set."""
    def oracle_kernel(method, q, k, v, *, positions=None, scale=None, rng):
        res = method.step(q, k, v, scale=scale, rng=rng)
        return res.output, list(res.selection.indices), list(res.selection.weights)

    def dropped_sink(method, q, k, v, *, positions=None, scale=None, rng):
        out, ix, w = oracle_kernel(method, q, k, v, scale=scale, rng=rng)
        return out, [i[1:] for i in ix], [x[1:] for x in w]

    q, k, v = small(n=60, d=4)
    m = VAttention(sinks=2, local=4, heavy=3, epsilon=0.3, delta=0.3, sampling="with_replacement_dedup")
    ok = va.check_sampler(m, oracle_kernel, q, k, v, calls=5)
    assert ok.ok and [r.name for r in ok.results] == ["contract", "selection", "guarantee"]
    assert "claims nothing" in ok.results[-1].detail
    bad = va.check_sampler(m, dropped_sink, q, k, v, calls=5)
    assert not bad.ok and "sink/local" in str(bad)
