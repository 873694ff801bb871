"""Statistical verification of vAttention's (epsilon, delta) guarantee.

The claim, per query head and decode step, for every input: ``Pr(||o^ - o|| > eps ||o||) <= delta``
over the method's own randomness (and, per configuration, the analogous claims for N and D:
``VAttention.claims``). ``verify`` runs ``trials`` independent trials of the method on one input
(vectorized: one count matrix of draws times one ``[n_s, d + 1]`` matrix), counts failures of N, D
and the output, and decides per claimed target with an exact one-sided binomial test of
``H0: p <= delta_i``: reject iff ``failures >= c`` where ``c`` is the smallest count with
``Pr(Bin(trials, delta_i) >= c) <= alpha_i``. Under H0 (any ``p <= delta_i``) a false alarm has
probability at most ``alpha_i``; ``alpha`` of one call is split equally (Bonferroni) over its heads
and claimed targets, so one call raises a false alarm with probability at most ``alpha``.
The report gives each failure rate with its exact Clopper-Pearson interval.

Binomial tails are computed exactly in log space from a table of ``log k!`` (no scipy).

Input families (``make_input``, strategy ``cases``) plant logits directly: ``q_h = sqrt(d) (a_h e_0
+ b_h e_1)`` and ``k_j = (l_j, l'_j, noise)``, so ``s_hj = a_h l_j + b_h l'_j`` exactly; values are
``mu + xi_j`` (``mu`` a per-KV-head mean of norm ~ ``value_mean * sqrt(d)``: real values share a
mean direction; zero-mean values make ``||o||`` tiny and the relative output error ill-posed).

Planted faults (``FAULTS``) are transforms of a correct plan, used to show the verifier's power.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from hypothesis import strategies as st

from ..oracle import core
from ..oracle.vattention import HeadPlan, Plan, VAttention

FAMILIES = ("gaussian", "one_dominant", "equal_scores", "heavy_tailed", "bimodal", "near_zero_variance",
            "tiny_residual", "large_ns", "gqa")
TARGET_NAMES = ("numerator", "denominator", "output")


# ------------------------------------------------------------------------------------------------
# exact binomial tails
# ------------------------------------------------------------------------------------------------

def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def binom_logpmf(k, n: int, p: float) -> np.ndarray:
    """``log Pr(Bin(n, p) = k)`` for an array of ``k`` (exact up to float64 rounding)."""
    k = np.asarray(k, dtype=np.int64)
    lf = _log_factorials(n)
    if p <= 0.0:
        return np.where(k == 0, 0.0, -np.inf)
    if p >= 1.0:
        return np.where(k == n, 0.0, -np.inf)
    return lf[n] - lf[k] - lf[n - k] + k * math.log(p) + (n - k) * math.log1p(-p)


def binom_sf(c: int, n: int, p: float) -> float:
    """``Pr(Bin(n, p) >= c)``."""
    if c <= 0:
        return 1.0
    if c > n:
        return 0.0
    lp = binom_logpmf(np.arange(c, n + 1), n, p)
    return float(min(1.0, math.exp(core.log_sum_exp(lp))))


def binom_cdf(c: int, n: int, p: float) -> float:
    """``Pr(Bin(n, p) <= c)``."""
    if c < 0:
        return 0.0
    if c >= n:
        return 1.0
    lp = binom_logpmf(np.arange(0, c + 1), n, p)
    return float(min(1.0, math.exp(core.log_sum_exp(lp))))


def critical_count(n: int, p0: float, alpha: float) -> int:
    """Smallest ``c`` with ``Pr(Bin(n, p0) >= c) <= alpha`` (``n + 1`` if none: the test never rejects)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    lp = binom_logpmf(np.arange(n + 1), n, p0)
    # upper tails from the right, in log space: tail[c] = log Pr(X >= c)
    tail = np.logaddexp.accumulate(lp[::-1])[::-1]
    ok = np.flatnonzero(tail <= math.log(alpha))
    return int(ok[0]) if ok.size else n + 1


def detection_probability(p: float, n: int, p0: float, alpha: float) -> float:
    """Power of the test: ``Pr(Bin(n, p) >= critical_count(n, p0, alpha))``."""
    return binom_sf(critical_count(n, p0, alpha), n, p)


def clopper_pearson(x: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval for a binomial proportion (bisection on exact tails)."""
    if not 0 <= x <= n or n < 1:
        raise ValueError(f"need 0 <= x <= n and n >= 1, got x={x}, n={n}")
    tail = (1.0 - confidence) / 2

    def solve(f) -> float:        # f increasing in p; the p in [0, 1] where f crosses tail
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            if f(mid) < tail:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-15:
                break
        return (lo + hi) / 2

    lower = 0.0 if x == 0 else solve(lambda p: binom_sf(x, n, p))
    upper = 1.0 if x == n else 1.0 - solve(lambda r: binom_cdf(x, n, 1.0 - r))
    return lower, upper


# ------------------------------------------------------------------------------------------------
# input families
# ------------------------------------------------------------------------------------------------

def _planted_logits(family: str, n: int, rng: np.random.Generator, share: float) -> np.ndarray:
    if family in ("gaussian", "tiny_residual", "large_ns", "gqa"):
        return rng.standard_normal(n)
    if family == "one_dominant":     # one token holding ``share`` of the mass over a flat row
        l = np.zeros(n)
        if n > 1:
            l[rng.integers(n)] = math.log(share / (1 - share) * (n - 1))
        return l
    if family == "equal_scores":
        return np.zeros(n)
    if family == "heavy_tailed":
        return np.clip(rng.standard_t(3, size=n), -60, 60)
    if family == "bimodal":
        return 3.0 * (rng.random(n) < 0.1) + 0.1 * rng.standard_normal(n)
    if family == "near_zero_variance":
        return 1e-4 * rng.standard_normal(n)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def make_input(family: str, n: int, d: int = 16, h_kv: int = 1, group: int = 1, seed: int = 0, *,
               value_mean: float = 1.0, share: float = 0.1):
    """``(q [H_q, d], k, v [H_kv, n, d])`` of a family (module docstring); deterministic in ``seed``.

    ``share``: the dominant token's share of the total softmax mass (``one_dominant``).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for nm, val in (("n", n), ("d", d), ("h_kv", h_kv), ("group", group)):
        core.check_positive_int(val, nm)
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must lie in (0, 1), got {share!r}")
    rng = np.random.default_rng(seed)
    h_q = h_kv * group
    k = 0.1 * rng.standard_normal((h_kv, n, d))
    v = np.empty((h_kv, n, d))
    for j in range(h_kv):
        k[j, :, 0] = _planted_logits(family, n, rng, share)
        if d > 1:
            k[j, :, 1] = 0.5 * rng.standard_normal(n) if family != "equal_scores" else 0.0
        noise = 1e-4 if family == "near_zero_variance" else 1.0
        v[j] = value_mean * rng.standard_normal(d) + noise * rng.standard_normal((n, d))
    q = np.zeros((h_q, d))
    q[:, 0] = 1.0
    if group > 1:   # the other heads of a group see the same keys at other temperatures and mixes
        q[:, 0] = np.where(np.arange(h_q) % group == 0, 1.0, rng.uniform(0.5, 1.5, h_q))
        if d > 1:
            q[:, 1] = np.where(np.arange(h_q) % group == 0, 0.0, rng.uniform(-1.0, 1.0, h_q))
    return q * math.sqrt(d), k, v


# ------------------------------------------------------------------------------------------------
# planted faults
# ------------------------------------------------------------------------------------------------

def _quarter_budget(hp: HeadPlan, n: int, sinks: int) -> HeadPlan:
    return replace(hp, budgets=np.where(hp.budgets > 0, np.maximum(hp.budgets // 4, 1), 0))


def _uncorrected_replacement(hp: HeadPlan, n: int, sinks: int) -> HeadPlan:
    return replace(hp, sampling="with_replacement_dedup", guard=0.0)


def _wrong_scaling(hp: HeadPlan, n: int, sinks: int) -> HeadPlan:
    return replace(hp, population=float(n))          # n/b instead of n_s/b


def _dropped_sinks(hp: HeadPlan, n: int, sinks: int) -> HeadPlan:
    return replace(hp, fixed=np.setdiff1d(hp.fixed, np.arange(sinks)))


FAULTS: dict[str, Callable[[HeadPlan, int, int], HeadPlan]] = {
    "quarter_budget": _quarter_budget,
    "with_replacement_uncorrected": _uncorrected_replacement,
    "wrong_scaling": _wrong_scaling,
    "dropped_sinks": _dropped_sinks,
}


def apply_fault(plan: Plan, fault: str | None, n: int, sinks: int) -> Plan:
    if fault is None:
        return plan
    if fault not in FAULTS:
        raise ValueError(f"fault must be None or one of {tuple(FAULTS)}, got {fault!r}")
    return replace(plan, heads=tuple(FAULTS[fault](hp, n, sinks) for hp in plan.heads))


# ------------------------------------------------------------------------------------------------
# trials
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadTrials:
    """``trials`` estimates of one head: ``num [T, d]``, ``den [T]``, slots read ``[T]``, and exact N, D."""

    num: np.ndarray
    den: np.ndarray
    read: np.ndarray
    exact_num: np.ndarray
    exact_den: float
    counts: np.ndarray | None = None   # [T, |domain|] draws per domain slot (only when asked)


def _draw_counts(hp: HeadPlan, budgets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[len(budgets), |domain|]`` number of draws of each domain slot in each trial."""
    t, size = budgets.size, hp.domain.size
    if size == 0 or budgets.max(initial=0) == 0:
        return np.zeros((t, size))
    if hp.sampling == "without_replacement":
        keys = rng.random((t, size))
        if (budgets == budgets[0]).all():
            b = int(budgets[0])
            if b >= size:
                return np.ones((t, size))
            kth = np.partition(keys, b - 1, axis=1)[:, b - 1:b]
            return (keys <= kth).astype(np.float64)
        ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
        return (ranks < budgets[:, None]).astype(np.float64)
    b_max = int(budgets.max())
    idx = rng.integers(0, size, size=(t, b_max))
    valid = np.arange(b_max)[None, :] < budgets[:, None]
    flat = (np.arange(t)[:, None] * size + idx)[valid]
    counts = np.bincount(flat, minlength=t * size).reshape(t, size).astype(np.float64)
    if hp.sampling == "with_replacement_dedup":
        counts = (counts > 0).astype(np.float64)
    return counts


def head_trials(hp: HeadPlan, logits: np.ndarray, v: np.ndarray, rng: np.random.Generator, *,
                keep_counts: bool = False, chunk_elements: int = 4_000_000) -> HeadTrials:
    """Run the plan's ``len(hp.budgets)`` trials of one head (``logits [n]``, ``v [n, d]``)."""
    x = np.exp(logits - logits.max())
    exact_num, exact_den = x @ v, float(x.sum())
    t = hp.budgets.size
    if hp.full:
        return HeadTrials(np.tile(exact_num, (t, 1)), np.full(t, exact_den), np.full(t, float(x.size)),
                          exact_num, exact_den, np.zeros((t, 0)) if keep_counts else None)
    fixed_num = hp.fixed_weight * (x[hp.fixed] @ v[hp.fixed])
    fixed_den = hp.fixed_weight * float(x[hp.fixed].sum())
    outside = ~np.isin(hp.domain, hp.fixed)            # a drawn slot of F keeps its weight from F
    xd = x[hp.domain] * outside
    terms = np.concatenate([xd[:, None] * v[hp.domain], xd[:, None]], axis=1)     # [L, d + 1]
    weights = np.where(hp.budgets > 0, hp.sample_weight(hp.budgets), 0.0)
    d = v.shape[1]
    num, den, read = np.empty((t, d)), np.empty(t), np.empty(t)
    kept = [] if keep_counts else None
    step = max(1, chunk_elements // max(1, hp.domain.size))
    for lo in range(0, t, step):
        sl = slice(lo, min(t, lo + step))
        counts = _draw_counts(hp, hp.budgets[sl], rng)
        est = (counts @ terms) * weights[sl, None]
        num[sl] = fixed_num + est[:, :d]
        den[sl] = fixed_den + est[:, d]
        read[sl] = hp.fixed.size + ((counts > 0) & outside).sum(axis=1)
        if keep_counts:
            kept.append(counts)
    return HeadTrials(num, den, read, exact_num, exact_den,
                      np.concatenate(kept) if keep_counts else None)


def failures(ht: HeadTrials, thresholds: dict[str, float]) -> dict[str, np.ndarray]:
    """Boolean failure per trial for each target in ``thresholds`` (relative error strictly above it)."""
    out = {}
    if "numerator" in thresholds:
        err = np.linalg.norm(ht.num - ht.exact_num, axis=1)
        out["numerator"] = ~(err <= thresholds["numerator"] * np.linalg.norm(ht.exact_num))
    if "denominator" in thresholds:
        out["denominator"] = ~(np.abs(ht.den - ht.exact_den) <= thresholds["denominator"] * ht.exact_den)
    if "output" in thresholds:
        o = ht.exact_num / ht.exact_den
        with np.errstate(divide="ignore", invalid="ignore"):
            est = ht.num / ht.den[:, None]
        err = np.linalg.norm(est - o, axis=1)
        out["output"] = ~(err <= thresholds["output"] * np.linalg.norm(o))    # NaN counts as a failure
    return out


# ------------------------------------------------------------------------------------------------
# the verifier
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetResult:
    target: str
    threshold: float          # relative error that counts as a failure
    level: float | None       # claimed probability (None: reported, not claimed)
    failures: int
    trials: int
    ci: tuple[float, float]   # Clopper-Pearson interval of the failure rate
    critical: int | None      # reject iff failures >= critical
    p_value: float | None     # Pr(Bin(trials, level) >= failures)

    @property
    def rate(self) -> float:
        return self.failures / self.trials

    @property
    def violated(self) -> bool:
        return self.critical is not None and self.failures >= self.critical


@dataclass(frozen=True)
class HeadReport:
    head: int
    budget: float             # mean sample size b
    fraction_read: float      # mean (|F| + distinct drawn slots outside F) / n
    targets: dict[str, TargetResult]

    @property
    def violated(self) -> bool:
        return any(t.violated for t in self.targets.values())


@dataclass(frozen=True)
class VerificationReport:
    method: VAttention
    fault: str | None
    trials: int
    alpha: float              # family-wise false-alarm probability of this call
    alpha_per_test: float
    heads: tuple[HeadReport, ...]

    @property
    def violated(self) -> bool:
        return any(h.violated for h in self.heads)

    def worst(self, target: str = "output") -> TargetResult:
        """The head with the most failures of ``target``."""
        return max((h.targets[target] for h in self.heads), key=lambda r: r.failures)

    @property
    def fraction_read(self) -> float:
        return float(np.mean([h.fraction_read for h in self.heads]))

    def rows(self) -> list[dict]:
        rows = []
        for h in self.heads:
            for t in h.targets.values():
                rows.append({"head": h.head, "target": t.target, "eps": t.threshold,
                             "claimed delta": "-" if t.level is None else t.level,
                             "failures": f"{t.failures}/{t.trials}", "rate": t.rate,
                             "95% CI": f"[{t.ci[0]:.4f}, {t.ci[1]:.4f}]",
                             "verdict": "-" if t.level is None else ("VIOLATED" if t.violated else "ok"),
                             "budget": h.budget, "read": h.fraction_read})
        return rows


def verify(method: VAttention, q, k, v, *, trials: int = 2000, alpha: float = 1e-9,
           rng: np.random.Generator | None = None, seed: int = 0, fault: str | None = None,
           confidence: float = 0.95, scale: float | None = None) -> VerificationReport:
    """Run ``trials`` independent trials of ``method`` on one input and test its claims (module doc).

    ``alpha`` is the false-alarm probability of the whole call (split over heads x claimed targets).
    ``fault`` plants one of ``FAULTS`` into the method's plan (to measure power). A configuration that
    claims nothing (``method.claims() == {}``) is reported, never flagged.
    """
    if not isinstance(method, VAttention):
        raise TypeError(f"method must be a VAttention, got {type(method).__name__}")
    trials = core.check_positive_int(trials, "trials")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
    rng = np.random.default_rng(seed) if rng is None else rng
    plan = method.plan(q, k, v, scale=scale, trials=trials, rng=rng)
    sinks = min(method.sinks, sh.n) if isinstance(method.sinks, int) else core.budget_from_ratio(sh.n, method.sinks)
    plan = apply_fault(plan, fault, sh.n, sinks)
    claims = method.claims()
    alpha_each = alpha / (sh.h_q * max(1, len(claims)))
    thresholds = {t: claims.get(t, (method.epsilon, None))[0] for t in TARGET_NAMES}
    criticals = {t: critical_count(trials, lvl, alpha_each) for t, (_, lvl) in claims.items()}
    kv = core.kv_head_of(sh.h_q, sh.h_kv)
    heads = []
    for h, hp in enumerate(plan.heads):
        ht = head_trials(hp, plan.logits[h], v[kv[h]], rng)
        fails = failures(ht, thresholds)
        results = {}
        for t in TARGET_NAMES:
            f = int(fails[t].sum())
            level = claims[t][1] if t in claims else None
            results[t] = TargetResult(
                t, thresholds[t], level, f, trials, clopper_pearson(f, trials, confidence),
                criticals.get(t), None if level is None else binom_sf(f, trials, level))
        heads.append(HeadReport(h, float(hp.budgets.mean()), float(ht.read.mean() / sh.n), results))
    return VerificationReport(method, fault, trials, alpha, alpha_each, tuple(heads))


# ------------------------------------------------------------------------------------------------
# hypothesis strategy
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One generated verification case: method hyper-parameters and an input of a family."""

    family: str
    n: int
    d: int
    h_kv: int
    group: int
    seed: int
    share: float
    sinks: int
    local: int
    heavy: int
    epsilon: float
    delta: float

    def method(self, **kw) -> VAttention:
        return VAttention(sinks=self.sinks, local=self.local, heavy=self.heavy, epsilon=self.epsilon,
                          delta=self.delta, **kw)

    def inputs(self):
        return make_input(self.family, self.n, self.d, self.h_kv, self.group, self.seed, share=self.share)


@st.composite
def cases(draw, families=FAMILIES, epsilons=(0.05, 0.1, 0.2, 0.3), deltas=(0.05, 0.1, 0.2),
          max_n: int = 400, large_n: int = 4096) -> Case:
    """Verification cases over the input families (module docstring). ``tiny_residual`` gets
    ``n_s < 10`` residual slots, ``large_ns`` ``n = large_n``, ``gqa`` a group of 2 or 4."""
    family = draw(st.sampled_from(families))
    sinks = draw(st.sampled_from((1, 4)))
    local = draw(st.sampled_from((0, 8)))
    heavy = draw(st.sampled_from((0, 4)))
    if family == "tiny_residual":
        n = sinks + local + heavy + draw(st.integers(1, 9))
    elif family == "large_ns":
        n = large_n
    else:
        n = draw(st.integers(sinks + local + heavy + 10, max_n))
    group = draw(st.sampled_from((2, 4))) if family == "gqa" else 1
    return Case(family=family, n=n, d=draw(st.sampled_from((2, 8, 16))),
                h_kv=draw(st.integers(1, 2)) if family != "large_ns" else 1, group=group,
                seed=draw(st.integers(0, 2**32 - 1)), share=draw(st.sampled_from((0.01, 0.03, 0.1, 0.3))),
                sinks=sinks, local=local, heavy=heavy,
                epsilon=draw(st.sampled_from(epsilons)), delta=draw(st.sampled_from(deltas)))


# ------------------------------------------------------------------------------------------------
# audit: realized failure rates over a grid (``kvsparse vattention-audit``)
# ------------------------------------------------------------------------------------------------

AUDIT_VARIANTS = ("canonical", "paper-denominator", "conservative", "sparse-attention-hub")


def audit(*, variants=AUDIT_VARIANTS, families=FAMILIES, epsilons=(0.1, 0.2), deltas=(0.05, 0.1),
          n: int = 1024, d: int = 16, trials: int = 1000, sinks: int = 4, local: int = 16,
          heavy: int | float = 0, share: float = 0.05, alpha: float = 1e-6, seed: int = 0) -> list[dict]:
    """One row per (variant, family, eps, delta): realized failure rates, the verdict on the variant's
    claims, and the mean fraction of tokens read. ``tiny_residual`` uses ``n = sinks + local + 5``
    (plus the top-k), ``large_ns`` ``4 n``, ``gqa`` a group of 4."""
    presets = VAttention.presets()
    for nm, vals, allowed in (("variant", variants, tuple(presets)), ("family", families, FAMILIES)):
        if not len(vals):
            raise ValueError(f"{nm} list must name at least one of {allowed}")
        for val in vals:
            if val not in allowed:
                raise ValueError(f"{nm} must be one of {allowed}, got {val!r}")
    for nm, vals in (("eps", epsilons), ("delta", deltas)):
        if not len(vals) or not all(isinstance(x, (int, float, np.integer, np.floating)) and 0 < x < 1 for x in vals):
            raise ValueError(f"{nm} must be one or more numbers in (0, 1), got {tuple(vals)!r}")
    for nm, val in (("n", n), ("d", d), ("trials", trials)):
        core.check_positive_int(val, nm)
    for nm, val in (("sinks", sinks), ("local", local)):
        core.check_positive_int(val, nm, allow_zero=True)
    rows = []
    for fi, family in enumerate(families):
        fam_n = {"tiny_residual": sinks + local + 5 + (heavy if isinstance(heavy, int) else 0),
                 "large_ns": 4 * n}.get(family, n)
        group = 4 if family == "gqa" else 1
        q, k, v = make_input(family, fam_n, d, 1, group, seed + fi, share=share)
        for name in variants:
            for eps in epsilons:
                for dlt in deltas:
                    m = replace(presets[name], sinks=sinks, local=local, heavy=heavy, epsilon=eps, delta=dlt)
                    rep = verify(m, q, k, v, trials=trials, alpha=alpha, seed=seed)
                    out, den = rep.worst("output"), rep.worst("denominator")
                    claimed = [t for h in rep.heads for t in h.targets.values() if t.level is not None]
                    worst = max(claimed, key=lambda t: t.rate / t.level) if claimed else None
                    rows.append({"variant": name, "family": family, "n": fam_n, "eps": eps, "delta": dlt,
                                 "output fail": out.rate, "output 95% CI": f"[{out.ci[0]:.3f}, {out.ci[1]:.3f}]",
                                 "denominator fail": den.rate,
                                 "worst claim": "-" if worst is None else
                                 f"{worst.target[:3]} {worst.rate:.3f}/{worst.level:.3f}",
                                 "verdict": "no claim" if worst is None else "EXCEEDS" if rep.violated else "ok",
                                 "read": rep.fraction_read})
    return rows


def plot_audit(rows: list[dict], path: str) -> bool:
    """Realized output failure rate against delta, one marker per variant; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for i, name in enumerate(variants):
        sel = [r for r in rows if r["variant"] == name]
        jitter = 1 + 0.04 * (i - len(variants) / 2)
        ax.scatter([r["delta"] * jitter for r in sel], [max(r["output fail"], 1e-4) for r in sel],
                   label=name, s=14, alpha=0.7)
    ds = sorted({r["delta"] for r in rows})
    ax.plot([ds[0] * 0.8, ds[-1] * 1.2], [ds[0] * 0.8, ds[-1] * 1.2], "k--", lw=1, label="failure = delta")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("delta")
    ax.set_ylabel("realized Pr(||o^ - o|| > eps ||o||)  (0 drawn at 1e-4)")
    ax.set_title("vAttention: realized output failure rate vs delta")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
# a third-party sampler: statistical validation (``kvsparse validate vattention``)
# ------------------------------------------------------------------------------------------------

def check_sampler(method: VAttention, kernel, q, k, v, *, calls: int = 200, alpha: float = 1e-6, seed: int = 0,
                  dtype: str = "float32", reference_trials: int = 2000, scale: float | None = None,
                  label: str = ""):
    """Does a randomized kernel keep ``method``'s claims on one input? Returns a ``suites.Verdict``.

    The kernel is called ``calls`` times, each with an independent ``rng=`` Generator (children of
    ``default_rng(seed)``), and returns ``(output, indices, weights)``. Properties:

    * ``contract``: it ran, returned finite ``[H_q, d]`` output and integer indices in ``[0, n)`` with
      one weight each.
    * ``selection``: every call's indices contain the deterministic set of the oracle (sinks and
      local window exactly; a top-k token may be missing only if its logit is within the kernel's
      rounding band, ``suites.dot_band``, of the first token left out).
    * ``guarantee``: per query head and claimed target ``t`` (``method.claims()``: output from the
      returned output, numerator/denominator from the returned weights, ``N^ = sum w_j x_j v_j``,
      ``D^ = sum w_j x_j``), count the calls with relative error above ``eps_t`` and reject with the
      exact binomial test of ``H0: p <= p0`` where ``p0 = max(delta_t, u)`` and ``u`` is the exact
      one-sided Clopper-Pearson upper bound of the *oracle's own* failure rate on this input
      (``reference_trials`` trials of ``verify``): a correct sampler is not blamed where the
      method's CLT budget itself misses its claim. False alarm: each of the ``H_q x claims`` tests
      and each reference bound gets ``alpha / (2 H_q |claims|)``, so a correct kernel fails this
      input with probability at most ``alpha``. A configuration that claims nothing
      (``method.claims() == {}``) passes ``guarantee`` untested.
    """
    from . import suites, tolerances
    from ..oracle.vattention import _size
    calls = core.check_positive_int(calls, "calls")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    q, k, v = (tolerances.round_to(np.asarray(x, dtype=np.float64), dtype) for x in (q, k, v))
    q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
    label = label or f"input H_q={sh.h_q}, H_kv={sh.h_kv}, n={sh.n}, d={sh.d}, seed {seed}"
    s = core.logits(q, k, scale)
    x = np.exp(s - s.max(axis=1, keepdims=True))
    kv = core.kv_head_of(sh.h_q, sh.h_kv)
    exact_num = np.stack([x[h] @ v[kv[h]] for h in range(sh.h_q)])
    exact_den = x.sum(axis=1)
    exact_out = exact_num / exact_den[:, None]
    claims = method.claims()
    a_each = alpha / (2 * sh.h_q * max(1, len(claims)))
    ref = verify(method, q, k, v, trials=reference_trials, alpha=0.5, seed=seed, scale=scale) if claims else None
    level = {(h, t): max(lvl, clopper_pearson(ref.heads[h].targets[t].failures, reference_trials,
                                              1 - 2 * a_each)[1])
             for h in range(sh.h_q) for t, (_, lvl) in claims.items()}
    fixed, others = method.fixed_sets(q, k)
    n_sink, n_local = _size(method.sinks, sh.n, "sinks"), _size(method.local, sh.n, "local")
    positional = np.union1d(np.arange(n_sink), np.arange(sh.n - n_local, sh.n))
    band = suites.dot_band(q, k, dtype, scale=core.default_scale(sh.d) if scale is None else scale)
    np_dtype = tolerances.numpy_dtype(dtype)
    qk = [a.astype(np_dtype) for a in (q, k, v)]
    fails = {t: np.zeros(sh.h_q, np.int64) for t in claims}
    name = repr(method)
    for i, rng in enumerate(np.random.default_rng(seed).spawn(calls)):
        try:
            step = suites.as_kernel_step(kernel(method, *qk, positions=None, scale=scale, rng=rng), sh.h_q)
            if step.weights is None:
                raise TypeError("a randomized kernel returns (output, indices, weights)")
            out = np.asarray(step.output, dtype=np.float64)
            if out.shape != (sh.h_q, sh.d) or not np.isfinite(out).all():
                raise ValueError(f"output must be finite [H_q={sh.h_q}, d={sh.d}], got shape {out.shape}")
            for h, (ix, w) in enumerate(zip(step.indices, step.weights)):
                if ix.size and (ix.dtype.kind not in "iu" or ix.min() < 0 or ix.max() >= sh.n or w.shape != ix.shape):
                    raise ValueError(f"indices[{h}] must be integers in [0, {sh.n}) with one weight each")
        except Exception as exc:  # the kernel's crash is a verdict
            return suites.Verdict(name, label, (suites._contract_failure(exc),))
        for h in range(sh.h_q):
            ix, w = step.indices[h].astype(np.int64), step.weights[h]
            missing = np.setdiff1d(fixed[h], ix)
            if missing.size:
                lost = np.intersect1d(missing, positional)
                cut = s[h, others[h]].max() if others[h].size else -np.inf
                late = missing[s[h, missing] > cut + 2 * band[h]]
                bad = lost if lost.size else late
                if bad.size:
                    what = "sink/local" if lost.size else "top-k"
                    return suites.Verdict(name, label, (
                        suites.PropertyResult("contract", True),
                        suites.PropertyResult("selection", False, f"call {i}, head {h}: the deterministic set is not "
                                              f"contained in the kernel's indices: dropped {what} tokens "
                                              f"{bad[:8].tolist()}")))
            num, den = (w * x[h, ix]) @ v[kv[h], ix], float(w @ x[h, ix])
            err = {"numerator": np.linalg.norm(num - exact_num[h]) / np.linalg.norm(exact_num[h]),
                   "denominator": abs(den - exact_den[h]) / exact_den[h],
                   "output": np.linalg.norm(out[h] - exact_out[h]) / np.linalg.norm(exact_out[h])}
            for t, (eps, _) in claims.items():
                fails[t][h] += not (err[t] <= eps)          # NaN counts as a failure
    worst, verdict_ok = None, True
    for h in range(sh.h_q):
        for t, (eps, lvl) in claims.items():
            f, p0 = int(fails[t][h]), level[(h, t)]
            crit = critical_count(calls, p0, a_each)
            lo, hi = clopper_pearson(f, calls, 0.95)
            score = (f >= crit, f / calls - p0)
            if worst is None or score > worst[0]:
                ref_note = "" if p0 == lvl else f"; the oracle itself fails up to {p0:.4f} here: tested against that"
                worst = (score, f"head {h} {t}: Pr(relative error > {eps:.4g}) measured {f}/{calls} = {f / calls:.4f}, "
                                f"95% CI [{lo:.4f}, {hi:.4f}] vs delta {lvl:.4g}{ref_note}; exact binomial test "
                                f"at false alarm {a_each:.1e} rejects iff failures >= {crit}")
            verdict_ok &= f < crit
    return suites.Verdict(name, label, (suites.PropertyResult("contract", True),
                                        suites.PropertyResult("selection", True, "deterministic set contained"),
                                        suites.PropertyResult("guarantee", verdict_ok, worst[1] if worst else
                                                              "the configuration claims nothing "
                                                              "(VAttention.claims() is empty): not tested")))
