"""vAttention (Desai et al., arXiv 2510.05688): exact attention on a deterministic set, a uniform sample
of the rest, Horvitz-Thompson scaling, and a sample size chosen from (epsilon, delta).

One decode step, query head ``h`` (logits ``s_j = q . k_j * scale``, ``x_j = exp(s_j - max_i s_i)``;
every quantity below is invariant to the common factor ``exp(max s)``):

1. Deterministic set ``F`` = sinks (cache slots ``[0, sinks)``) U local window (the last ``local``
   slots) U top-k of the other slots, ranked by exact logits or by a pluggable approximate
   ``selector(q, k) -> scores [H_q, n]``, with the core tie rule (higher first, lower index wins).
   Sizes are ints (tokens) or floats (fractions of ``n``, ``core.budget_from_ratio``: exact floor).
   ``positions`` are not used: sinks and window are cache slots.
2. Residual ``R = [n] \\ F``, ``n_s = |R|``; the sample ``I`` = ``b`` indices drawn uniformly from R
   (``sampling="without_replacement"``, canonical).
3. Estimators ``N^ = sum_F x_j v_j + (n_s/b) sum_I x_j v_j``, ``D^ = sum_F x_j + (n_s/b) sum_I x_j``,
   ``o^ = N^/D^``. This is ``Selection`` weights (1 on F, ``n_s/b`` on I) and
   ``core.attend_indices`` (``Method.attend``): no softmax of our own.

Budget rules (``budget_rule``), all computed from the exact residual statistics the oracle has
(the paper's Lemma 4.1 is stated with the population covariance; a deployable method must estimate
it, which is what the reference preset does for D only).

* ``"clt"`` (the paper). For the HT total ``t^`` of terms ``y_j`` (``x_j`` for D, the d-vectors
  ``x_j v_j`` for N) with population covariance ``Sigma`` (divisor ``n_s``) the CLT gives
  ``Pr(||t^ - t|| > tau) <~ delta_i`` once ``b >= (z n_s sqrt(tr Sigma) / tau)^2`` with
  ``z = Phi^-1(1 - delta_i/2)`` (two-sided; for a vector ``||Z||^2/tr Sigma`` of a Gaussian ``Z`` has
  its largest upper tail at rank one for thresholds ``z^2 >= ~1.54``, Szekely & Bakirov 2003, so the
  scalar quantile is the worst case there). Sampling without replacement has the smaller variance
  ``(1 - (b-1)/(n_s-1))`` times that, so the rule is conservative in that factor.
  ``targets="output"`` (canonical): composition. Write ``o^ - o = [(N^ - N) - o (D^ - D)] / D^``. If
  ``||N^ - N|| <= e1 ||N||`` and ``|D^ - D| <= e2 D`` then, with ``||N|| = ||o|| D`` and
  ``D^ >= (1 - e2) D``,
      ``||o^ - o|| <= (e1 ||o|| D + ||o|| e2 D) / ((1 - e2) D) = (e1 + e2)/(1 - e2) ||o||``.
  With ``e1 = e2 = eps/(2 + eps)`` the right side is exactly ``eps ||o||``; a union bound over the two
  events, each given ``delta/2``, gives ``Pr(||o^ - o|| > eps ||o||) <= delta`` (as far as the CLT is
  exact). ``b = max(b_N, b_D)``, ``ceil``, clamped to ``[1, n_s]``.
  ``targets="denominator"``: the paper's practical relaxation, ``b = b_D`` at ``(eps, delta)``; it
  claims nothing about N or the output.
* ``"chebyshev"`` (conservative, finite-sample, holds for every input). Let ``W = N^ - o D^``. Since
  ``N = o D``, ``W`` is the HT estimation error of the residual total of ``y_j = x_j (v_j - o)``, whose
  total over all tokens is 0; its exact mean square under sampling without replacement is
  ``E||W||^2 = n_s^2 (1/b - 1/n_s) S_y^2`` (``S_y^2`` the trace of the residual covariance with divisor
  ``n_s - 1``). ``o^ - o = W / D^``, so failure needs ``||W|| > eps (1 - e2) ||o|| D`` or
  ``D^ < (1 - e2) D``. Chebyshev bounds the first by ``delta/2``, Cantelli (one-sided) the second by
  ``delta/2``: ``Var D^ <= (e2 D)^2 (delta/2) / (1 - delta/2)``. ``b`` is the smallest integer meeting
  both, minimised over ``e2`` on a fixed grid (64 points in (0, 1)). No asymptotics: the bound holds
  for every ``n_s >= 1`` and every score distribution; the price is ``1/delta`` instead of ``z^2``.
  With ``sampling="with_replacement"`` (Hansen-Hurwitz) the exact mean square has no finite-population
  factor: ``E||W||^2 = n_s^2 sigma_y^2 / b = n_s (n_s - 1) S_y^2 / b`` (``sigma_y^2`` with divisor
  ``n_s``), and likewise ``Var D^``; the rule then uses these.
* ``"reference"`` (xAlg-ai/sparse-attention-hub ``AdaptiveSamplingMasker``, see
  ``research/recall.md`` §7.3): denominator only, one-sided ``z = Phi^-1(1 - delta)``. Window
  ``[sinks, n - local)`` (it contains the top-k slots), ``n_w`` its length; ``n_w < 2`` attends
  everything. Base sample: ``b0 = max(2, int(base_rate n_w))`` (an int rate is a count) indices
  uniformly WITH replacement from the window; ``sigma^`` their Bessel std, clamped at 1e-8;
  ``D^0 = sum_F x_j/(1 + g) + sum_{distinct base j} x_j / (b0/n_w + g)`` (``g = weight_guard``; the
  top-k slots hit by the base sample are counted twice; with an empty F the code's
  ``apply_inv_mask_sum`` returns the full sum, reproduced). ``b = floor(clip((z sigma^ n_w /
  max(eps D^0, 1e-8))^2, 1, n_w))``, then clipped to ``[b0, n_w]``. The base sample is not attended.
  ``base_rate = 0`` attends F only.

Both rules: ``b`` is at most ``n_s``. Without replacement ``b = n_s`` reads the whole domain (exact).
With ``sampling="with_replacement"`` ``n_s`` draws are not exact, so a rule asking for ``b >= n_s``
(its bound may need more draws than there are slots, or infinitely many) gets the domain attended
exactly instead: the head's plan moves the domain into F with no sample (zero error, the claims
hold). ``"with_replacement_dedup"`` keeps ``b = n_s`` draws (and uses the with-replacement
variances); it claims nothing (below).

Domain. ``domain="residual"`` (canonical) samples ``R``. ``domain="window"`` samples
``[sinks, n - local)``, which contains the top-k slots of F; a drawn slot of F adds nothing to the
sample estimate (below), so both rules compute their statistics over the window with those slots
set to 0 (``exclude``): the estimators are then HT/HH estimators of the window population
``{y_j for j outside F, 0 on F}``, whose total is the residual total, and every derivation above
holds with ``n_s = n_w`` (the window's length).

Claims (``claims()``): ``"clt"`` and ``"chebyshev"`` claim their targets only where their derivation
applies: sampling without replacement or with replacement (Hansen-Hurwitz), either domain, and
``weight_guard = 0``. With ``sampling="with_replacement_dedup"`` (biased, below) or a nonzero
``weight_guard`` (biased HT factors) there is no derivation and ``claims()`` is empty: such a
configuration promises nothing, and the verifier tests nothing for it. The ``"reference"`` rule
claims what the reference code is meant to deliver (D at ``(eps, delta)``); the docs measure where
it does not.

Sampling (``sampling``): ``"without_replacement"`` (weight ``n_s/b``); ``"with_replacement"``
(Hansen-Hurwitz: an index drawn ``c`` times gets ``c n_s/b``; unbiased); ``"with_replacement_dedup"``
(the reference: duplicates collapse to one entry of weight ``1/(b/n_s + g)``, so ``E[residual
estimate] = (1 - (1 - 1/n_s)^b) n_s/b`` times the truth: -37% at ``b = n_s``). A sampled index that
lies in F (possible only with ``domain="window"``) keeps its weight from F (the reference's merge
adds mask values and clamps them at 1). Weights on F are ``1/(1 + g)``. ``g = 0`` (canonical)
keeps HT factors exact; the reference stores ``p`` in the query dtype (bf16 in practice), which is
not modelled here (float64).

Randomness: ``rng`` (a ``numpy.random.Generator``) or ``default_rng(seed)`` when none is given, so
``step`` is reproducible; or pass the drawn indices (``samples``, and ``base_samples`` for the
reference rule) to compare a kernel exactly. ``plan(..., trials=M)`` gives the budgets of M
independent trials at once (random for the reference rule), which is what the verifier
(``kvsparse.property_tests.vattention``) uses.

Traffic: the K/V rows of the selection (``kv_traffic``). Not charged: the scores the top-k selector
reads (exact top-k reads every key), the statistics behind the budget (the oracle's population
statistics; the reference's base-sample key rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from statistics import NormalDist
from typing import Callable, ClassVar, Sequence

import numpy as np

from ..registry import register_method
from . import core
from .method import Method, check_positions
from .types import Layout, Selection, StepResult

SAMPLINGS = ("without_replacement", "with_replacement", "with_replacement_dedup")
DOMAINS = ("residual", "window")
BUDGET_RULES = ("clt", "chebyshev", "reference")
TARGETS = ("output", "denominator")
CHEBYSHEV_E2_GRID = np.linspace(0.0, 1.0, 66)[1:-1]   # 64 points strictly inside (0, 1)
REFERENCE_FLOOR = 1e-8                                # the reference's clamps on sigma^ and eps D^


def normal_quantile(p: float) -> float:
    """``Phi^-1(p)`` of the standard normal."""
    return NormalDist().inv_cdf(p)


def output_split(epsilon: float) -> float:
    """``e1 = e2 = eps / (2 + eps)``: the per-target relative errors whose composition is ``eps``."""
    return epsilon / (2.0 + epsilon)


def _size(spec, n: int, name: str) -> int:
    """Tokens from a size spec: an int is a count (capped at ``n``), a float a fraction of ``n``."""
    if isinstance(spec, bool):
        raise TypeError(f"{name} must be an int (tokens) or a float (fraction of n), got bool")
    if isinstance(spec, Integral):
        return min(int(spec), n)
    return core.budget_from_ratio(n, spec)


def _check_size(spec, name: str) -> None:
    if isinstance(spec, bool) or not isinstance(spec, Real):
        raise TypeError(f"{name} must be an int (tokens) or a float (fraction of n), got {spec!r}")
    if isinstance(spec, Integral):
        core.check_positive_int(spec, name, allow_zero=True)
    elif not 0.0 <= spec <= 1.0:
        raise ValueError(f"{name} as a fraction of n must lie in [0, 1], got {spec!r}")


def _check_open_unit(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class HeadPlan:
    """Everything about one query head's step except the random draw.

    ``fixed``: slots attended with weight ``fixed_weight``; ``domain``: the sampling population
    (sorted; empty, with budgets 0, where the rule attends it exactly, e.g. a with-replacement budget
    ``>= n_s``); ``budgets[t]``: the sample size of trial ``t``; a drawn slot ``j`` gets weight
    ``1 / (b / population + guard)`` per draw (or once, for ``with_replacement_dedup``) unless it is in
    ``fixed``. ``full``: the step attends every slot exactly (reference rule, ``n_w < 2``).
    """

    fixed: np.ndarray
    domain: np.ndarray
    budgets: np.ndarray
    sampling: str
    population: float
    fixed_weight: float = 1.0
    guard: float = 0.0
    full: bool = False
    base: np.ndarray | None = None      # reference rule: the base samples [trials, b0] behind budgets

    def sample_weight(self, b):
        """HT factor of one draw when the sample has size ``b`` (array or scalar)."""
        b = np.asarray(b, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):      # an empty domain: no draw to weight
            return 1.0 / (b / self.population + self.guard)


@dataclass(frozen=True)
class Plan:
    """Per query head plans of one step, and the logits they were made from (``[H_q, n]``)."""

    heads: tuple[HeadPlan, ...]
    logits: np.ndarray


@register_method
@dataclass(frozen=True)
class VAttention(Method):
    """vAttention; see the module docstring for every convention and the budget derivations."""

    name: ClassVar[str] = "vattention"
    family: ClassVar[str] = "dynamic"
    summary: ClassVar[str] = "sinks + local + top-k exact; uniform sample of the rest, HT-scaled, b from (eps, delta)"

    sinks: int | float = 128
    local: int | float = 128
    heavy: int | float = 0.05
    selector: Callable | None = field(default=None, compare=False)
    epsilon: float = 0.05
    delta: float = 0.05
    budget_rule: str = "clt"
    targets: str = "output"
    sampling: str = "without_replacement"
    domain: str = "residual"
    base_rate: int | float = 0.05
    weight_guard: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for nm in ("sinks", "local", "heavy"):
            _check_size(getattr(self, nm), nm)
        _check_open_unit(self.epsilon, "epsilon")
        _check_open_unit(self.delta, "delta")
        for nm, allowed in (("budget_rule", BUDGET_RULES), ("targets", TARGETS), ("sampling", SAMPLINGS),
                            ("domain", DOMAINS)):
            if getattr(self, nm) not in allowed:
                raise ValueError(f"{nm} must be one of {allowed}, got {getattr(self, nm)!r}")
        if self.budget_rule == "reference" and self.domain != "window":
            raise ValueError("budget_rule='reference' samples the window [sinks, n - local): use domain='window'")
        if isinstance(self.base_rate, bool) or not isinstance(self.base_rate, Real):
            raise TypeError(f"base_rate must be an int (count) or a float in [0, 1), got {self.base_rate!r}")
        if isinstance(self.base_rate, Integral):
            core.check_positive_int(self.base_rate, "base_rate", allow_zero=True)
        elif not 0.0 <= self.base_rate < 1.0:
            raise ValueError(f"base_rate as a float must lie in [0, 1), got {self.base_rate!r}")
        if isinstance(self.weight_guard, bool) or not isinstance(self.weight_guard, Real) or not (
                math.isfinite(self.weight_guard) and self.weight_guard >= 0):
            raise ValueError(f"weight_guard must be a finite number >= 0, got {self.weight_guard!r}")
        if self.selector is not None and not callable(self.selector):
            raise TypeError(f"selector must be None or a callable (q, k) -> scores [H_q, n], got {self.selector!r}")
        core.check_positive_int(self.seed, "seed", allow_zero=True)

    # --- claims ---------------------------------------------------------------------------------
    def claims(self) -> dict[str, tuple[float, float]]:
        """What the configuration promises, per target: ``{target: (relative error, probability)}``.

        Targets are ``"numerator"`` (``||N^ - N|| > e ||N||``), ``"denominator"`` (``|D^ - D| > e D``)
        and ``"output"`` (``||o^ - o|| > e ||o||``); each event must have probability at most the stated one.
        Empty where no derivation covers the configuration (module docstring, "Claims").
        """
        eps, dlt = self.epsilon, self.delta
        if self.budget_rule == "reference":
            return {"denominator": (eps, dlt)}
        if self.sampling == "with_replacement_dedup" or self.weight_guard != 0:
            return {}
        if self.budget_rule == "chebyshev":
            return {"output": (eps, dlt)}
        if self.targets == "denominator":
            return {"denominator": (eps, dlt)}
        e = output_split(eps)
        return {"numerator": (e, dlt / 2), "denominator": (e, dlt / 2), "output": (eps, dlt)}

    # --- the deterministic part -------------------------------------------------------------------
    def fixed_sets(self, q, k) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query head ``(F, others)``: the deterministic set and the slots outside it (sorted)."""
        h_q, n = q.shape[0], k.shape[1]
        sink = np.arange(_size(self.sinks, n, "sinks"))
        local = np.arange(n - _size(self.local, n, "local"), n)
        base = np.union1d(sink, local)
        rest = np.setdiff1d(np.arange(n), base)
        heavy = _size(self.heavy, n, "heavy")
        if heavy == 0 or rest.size == 0:
            return [base] * h_q, [rest] * h_q
        scores = core.logits(q, k) if self.selector is None else np.asarray(self.selector(q, k), dtype=np.float64)
        if scores.shape != (h_q, n):
            raise ValueError(f"selector must return scores of shape (H_q, n) = {(h_q, n)}, got {scores.shape}")
        fixed, others = [], []
        for h in range(h_q):
            top = rest[core.topk_indices(scores[h, rest], heavy)]
            fixed.append(np.union1d(base, top))
            others.append(np.setdiff1d(rest, top))
        return fixed, others

    # --- the plan ---------------------------------------------------------------------------------
    def plan(self, q, k, v, *, scale: float | None = None, trials: int = 1,
             rng: np.random.Generator | None = None, base_samples: Sequence | None = None) -> Plan:
        """Deterministic sets, sampling domains and the budgets of ``trials`` independent trials.

        Only the reference rule uses ``rng`` here (its base sample); ``base_samples[h]`` (``[trials, b0]``
        or ``[b0]`` window slots) replaces that draw.
        """
        q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
        trials = core.check_positive_int(trials, "trials")
        s = core.logits(q, k, scale)
        x = np.exp(s - s.max(axis=1, keepdims=True)) if sh.n else s
        kv = core.kv_head_of(sh.h_q, sh.h_kv)
        fixed, others = self.fixed_sets(q, k)
        if base_samples is not None and len(base_samples) != sh.h_q:
            raise ValueError(f"base_samples must hold one array per query head ({sh.h_q}), got {len(base_samples)}")
        heads = []
        for h in range(sh.h_q):
            if self.budget_rule == "reference":
                rng = rng if rng is not None or base_samples is not None else np.random.default_rng(self.seed)
                heads.append(self._reference_head(x[h], fixed[h], sh.n, trials, rng,
                                                  None if base_samples is None else base_samples[h]))
                continue
            domain = others[h] if self.domain == "residual" else self._window(sh.n)
            b = self._budget(x[h], v[kv[h]], fixed[h], domain)
            fx = fixed[h]
            if self.sampling == "with_replacement" and domain.size and b >= domain.size:
                fx, domain, b = np.union1d(fx, domain), domain[:0], 0     # attend the domain exactly
            heads.append(self._head(fx, domain, np.full(trials, b, dtype=np.int64)))
        return Plan(tuple(heads), s)

    def _window(self, n: int) -> np.ndarray:
        return np.arange(_size(self.sinks, n, "sinks"), n - _size(self.local, n, "local"))

    def _head(self, fixed, domain, budgets, **kw) -> HeadPlan:
        return HeadPlan(fixed=fixed, domain=domain, budgets=budgets, sampling=self.sampling,
                        population=float(domain.size), fixed_weight=1.0 / (1.0 + self.weight_guard),
                        guard=float(self.weight_guard), **kw)

    def _budget(self, x, v, fixed, domain) -> int:
        n_s = domain.size
        if n_s == 0:
            return 0
        exclude = fixed if self.domain == "window" else None
        if self.budget_rule == "clt":
            return clt_budget(x, v, domain, self.epsilon, self.delta, self.targets, exclude=exclude)
        return chebyshev_budget(x, v, domain, self.epsilon, self.delta, exclude=exclude,
                                replacement=self.sampling != "without_replacement")

    def _reference_head(self, x, fixed, n, trials, rng, base) -> HeadPlan:
        window = self._window(n)
        n_w = window.size
        if n_w < 2:
            return HeadPlan(np.arange(n), np.zeros(0, np.int64), np.zeros(trials, np.int64), self.sampling,
                            0.0, 1.0, 0.0, full=True)
        if self.base_rate == 0:
            return self._head(fixed, window, np.zeros(trials, np.int64))
        b0 = reference_base_count(self.base_rate, n_w)
        if base is None:
            base = rng.integers(window[0], window[-1] + 1, size=(trials, b0))
        else:
            base = np.asarray(base)
            if base.dtype.kind not in "iu":
                raise TypeError(f"base_samples must hold integers, got dtype {base.dtype}")
            base = base.reshape(-1, base.shape[-1]) if base.ndim else base.reshape(1, 1)
            if base.shape != (trials, b0) or base.min() < window[0] or base.max() > window[-1]:
                raise ValueError(f"base_samples for a head must be {trials} x {b0} slots in the window "
                                 f"[{window[0]}, {window[-1] + 1}), got shape {base.shape}")
        budgets = reference_budgets(x, fixed, window, base, self.epsilon, self.delta, self.weight_guard)
        return self._head(fixed, window, budgets, base=base)

    # --- the draw and the estimator ---------------------------------------------------------------
    def draw(self, plan: Plan, rng: np.random.Generator) -> list[np.ndarray]:
        """One trial's sampled slots per query head (with multiplicity when drawn with replacement)."""
        out = []
        for hp in plan.heads:
            b = int(hp.budgets[0])
            if hp.sampling == "without_replacement":
                out.append(np.sort(rng.choice(hp.domain, size=b, replace=False)))
            else:
                out.append(np.sort(hp.domain[rng.integers(0, hp.domain.size, size=b)]) if b else
                           np.zeros(0, np.int64))
        return out

    def selection_from_samples(self, plan: Plan, samples: Sequence, n: int) -> Selection:
        """The Selection (indices, HT weights) of trial 0 of ``plan`` with the given draws."""
        if len(samples) != len(plan.heads):
            raise ValueError(f"samples must hold one array per query head ({len(plan.heads)}), got {len(samples)}")
        indices, weights = [], []
        for h, (hp, smp) in enumerate(zip(plan.heads, samples)):
            ix, w = head_weights(hp, smp, name=f"samples[{h}]")
            indices.append(ix)
            weights.append(w)
        return Selection(tuple(indices), n, tuple(weights))

    def select(self, q, k, v, *, positions=None, scale: float | None = None,
               rng: np.random.Generator | None = None, samples: Sequence | None = None,
               base_samples: Sequence | None = None) -> Selection:
        """Plan, draw (or take ``samples``), and weight. ``rng`` defaults to ``default_rng(self.seed)``."""
        rng = np.random.default_rng(self.seed) if rng is None else rng
        plan = self.plan(q, k, v, scale=scale, rng=rng, base_samples=base_samples)
        if samples is None:
            samples = self.draw(plan, rng)
        return self.selection_from_samples(plan, samples, k.shape[1])

    def step(self, q, k, v, *, positions=None, scale: float | None = None, layout: Layout = Layout(),
             rng: np.random.Generator | None = None, samples: Sequence | None = None,
             base_samples: Sequence | None = None) -> StepResult:
        q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
        if positions is not None:
            check_positions(positions, sh.n)
        selection = self.select(q, k, v, scale=scale, rng=rng, samples=samples, base_samples=base_samples)
        output = self.attend(q, k, v, selection, scale=scale)
        return StepResult(selection, output, self.traffic(selection, h_kv=sh.h_kv, d=sh.d, layout=layout))

    @classmethod
    def presets(cls) -> dict[str, "VAttention"]:
        return {
            "canonical": cls(),
            # the paper's experiments: denominator budget only (no claim about N or the output)
            "paper-denominator": cls(targets="denominator"),
            # finite-sample guarantee for the output on every input
            "conservative": cls(budget_rule="chebyshev"),
            # xAlg-ai/sparse-attention-hub AdaptiveSamplingMasker behind Sink(128) + Local(128) + OracleTopK
            "sparse-attention-hub": cls(budget_rule="reference", sampling="with_replacement_dedup",
                                        domain="window", weight_guard=1e-6),
        }


# ------------------------------------------------------------------------------------------------
# budgets
# ------------------------------------------------------------------------------------------------

def _ceil_budget(value: float, n_s: int) -> int:
    if not math.isfinite(value) or value >= n_s:
        return n_s
    return max(1, min(n_s, math.ceil(value)))


def _domain_terms(x, domain, exclude) -> np.ndarray:
    """``x`` over ``domain``, 0 on the slots of ``exclude`` (they lie in F: a draw of one adds nothing)."""
    xr = x[domain]
    if exclude is not None and len(exclude):
        xr = np.where(np.isin(domain, exclude), 0.0, xr)
    return xr


def clt_budget(x, v, domain, epsilon: float, delta: float, targets: str = "output", *, exclude=None) -> int:
    """The paper's CLT sample size (module docstring) from the exact statistics of ``domain``.

    ``x [n]`` are the shifted exponentials of all slots, ``v [n, d]`` the values; slots of ``exclude``
    inside ``domain`` count as 0 (``domain="window"``: the deterministic set).
    """
    n_s = domain.size
    if n_s == 0:
        return 0
    xr = _domain_terms(x, domain, exclude)
    denom_total = x.sum()
    if targets == "denominator":
        z = normal_quantile(1 - delta / 2)
        return _ceil_budget((z * n_s * xr.std() / (epsilon * denom_total)) ** 2, n_s)
    e = output_split(epsilon)
    z = normal_quantile(1 - delta / 4)
    b_d = (z * n_s * xr.std() / (e * denom_total)) ** 2
    terms = xr[:, None] * v[domain]
    numer_norm = np.linalg.norm(x @ v)
    trace = terms.var(axis=0).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        b_n = (z * n_s * math.sqrt(trace) / (e * numer_norm)) ** 2 if numer_norm > 0 else (
            math.inf if trace > 0 else 0.0)
    return _ceil_budget(max(b_d, b_n), n_s)


def _smallest_b(n_s: int, s2: float, allowed_var: float, replacement: bool = False) -> np.ndarray | int:
    """Smallest ``b`` in ``[1, n_s]`` with ``n_s^2 (1/b - 1/n_s) s2 <= allowed_var`` (SRSWOR variance), or
    with ``n_s (n_s - 1) s2 / b <= allowed_var`` (``replacement``: Hansen-Hurwitz); ``n_s`` if none."""
    s2 = np.asarray(s2, dtype=np.float64)
    allowed = np.asarray(allowed_var, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if replacement:
            need = n_s * (n_s - 1) * s2 / allowed
        else:
            need = n_s / (1.0 + allowed / (n_s * s2))   # = 1 / (1/n_s + allowed / (n_s^2 s2))
    need = np.where(s2 > 0, need, 1.0)
    b = np.clip(np.nan_to_num(np.ceil(need), nan=n_s, posinf=n_s), 1, n_s)
    # guard the float ceiling: step up while the exact inequality fails
    if replacement:
        var = lambda bb: n_s * (n_s - 1) * s2 / bb
    else:
        var = lambda bb: n_s * n_s * (1.0 / bb - 1.0 / n_s) * s2
    for _ in range(3):
        b = np.where((var(b) > allowed) & (b < n_s), b + 1, b)
    return b


def chebyshev_budget(x, v, domain, epsilon: float, delta: float, *, exclude=None,
                     replacement: bool = False) -> int:
    """The conservative (Chebyshev + Cantelli) sample size of the module docstring.

    ``replacement``: the variances of sampling with replacement (no finite-population factor); a
    result of ``n_s`` then means "attend the domain exactly". ``exclude``: as in ``clt_budget``.
    """
    n_s = domain.size
    if n_s <= 1:
        return n_s
    denom_total = x.sum()
    o = (x @ v) / denom_total
    xr = _domain_terms(x, domain, exclude)
    y = xr[:, None] * (v[domain] - o)
    s2_y = y.var(axis=0, ddof=1).sum()
    s2_x = xr.var(ddof=1)
    o_norm = float(np.linalg.norm(o))
    half = delta / 2
    e2 = CHEBYSHEV_E2_GRID
    allowed_w = half * (epsilon * (1 - e2) * o_norm * denom_total) ** 2
    allowed_d = (e2 * denom_total) ** 2 * half / (1 - half)
    b = np.maximum(_smallest_b(n_s, s2_y, allowed_w, replacement), _smallest_b(n_s, s2_x, allowed_d, replacement))
    return int(b.min())


def reference_base_count(base_rate, n_w: int) -> int:
    """``b0``: ``max(2, base_rate)`` for an int rate, ``max(2, int(base_rate * n_w))`` for a float one."""
    if isinstance(base_rate, Integral):
        return max(2, int(base_rate))
    return max(2, int(base_rate * n_w))


def reference_budgets(x, fixed, window, base, epsilon: float, delta: float, guard: float) -> np.ndarray:
    """The reference masker's budget for each row of base samples ``base [trials, b0]`` (§7.3 steps 4-7)."""
    n_w = window.size
    trials, b0 = base.shape
    static = x.sum() if fixed.size == 0 else x[fixed].sum() / (1.0 + guard)
    vals = x[base]
    sigma = np.maximum(vals.std(axis=1, ddof=1), REFERENCE_FLOOR)
    # duplicates of the base sample collapse (the mask is densified)
    srt = np.sort(base, axis=1)
    distinct = np.ones_like(srt, dtype=bool)
    distinct[:, 1:] = srt[:, 1:] != srt[:, :-1]
    sampled = np.where(distinct, x[srt], 0.0).sum(axis=1) / (b0 / n_w + guard)
    d_hat = static + sampled
    z = normal_quantile(1 - delta)
    raw = (z * sigma * n_w / np.maximum(epsilon * d_hat, REFERENCE_FLOOR)) ** 2
    b = np.floor(np.clip(raw, 1.0, float(n_w))).astype(np.int64)
    return np.minimum(np.maximum(b, b0), n_w)


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------

def head_weights(hp: HeadPlan, sample, *, name: str = "sample", trial: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted slots and weights of one head for one trial's draw ``sample`` (slots, with multiplicity)."""
    if hp.full:
        return hp.fixed, np.ones(hp.fixed.size)
    smp = np.asarray(sample)
    if smp.size and smp.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {smp.dtype}")
    smp = smp.astype(np.int64).ravel()
    b = int(hp.budgets[trial])
    if smp.size != b:
        raise ValueError(f"{name} must hold the plan's budget of {b} draws, got {smp.size}")
    uniq, counts = np.unique(smp, return_counts=True)
    if uniq.size and not np.isin(uniq, hp.domain).all():
        raise ValueError(f"{name} must lie in the sampling domain (slots {hp.domain[:3]}...), got {uniq[~np.isin(uniq, hp.domain)][:5]}")
    if hp.sampling == "without_replacement" and uniq.size != smp.size:
        raise ValueError(f"{name} must not repeat a slot when sampling without replacement")
    if hp.sampling == "with_replacement_dedup":
        counts = np.ones_like(counts)
    keep = ~np.isin(uniq, hp.fixed)
    uniq, counts = uniq[keep], counts[keep]
    w_sample = counts * (hp.sample_weight(b) if b else 0.0)
    ix = np.concatenate([hp.fixed, uniq])
    w = np.concatenate([np.full(hp.fixed.size, hp.fixed_weight), w_sample])
    order = np.argsort(ix, kind="stable")
    return ix[order], w[order]
