"""vAttention in Numba: the deterministic set (sinks, local window, top-k), the sample size from the
residual's statistics, the uniform draw, and the Horvitz-Thompson weighted estimator.

Every convention is the oracle's (``kvsparse.oracle.vattention.VAttention``: see its docstring for the
budget rules); the kernel reads the method's fields. Layout: ``q [H_q, d]``, ``k``/``v`` ``[H_kv, n, d]``
(float32 or float64), one task per query head (``prange``).

Precision: the plan (logits for ranking, ``x_j = exp(s_j - max s)``, the residual statistics behind
the budget) accumulates in float64 from the input dtype, because the budget is an integer and the
draws that follow it must be the oracle's: a budget one off would change every sampled index. The
estimator itself (the weighted sparse attention) runs in the input dtype with float64 sums
(``attention.sparse_attention``), judged by the FlashAttention rule with the HT weights.

Randomness: the draws are made with ``rng`` (default ``numpy.random.default_rng(method.seed)``) by the
very calls the oracle makes, in the same order (reference rule: every head's base sample first, then
every head's sample), so the same generator gives the same indices; or pass ``samples`` (and
``base_samples``) to fix them.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ...oracle.vattention import (CHEBYSHEV_E2_GRID, VAttention, _size, normal_quantile, output_split,
                                  reference_base_count, reference_budgets)
from ...registry import register_kernel
from ._select import channel_logits, masks_to_lists, topk_set
from .attention import FASTMATH, _scale, check_float_arrays, sparse_attention

RULE_CLT, RULE_CHEBYSHEV, RULE_REFERENCE = 0, 1, 2


@numba.njit(cache=True)
def _ceil_budget(value, n_s):
    if not math.isfinite(value) or value >= n_s:
        return n_s
    return max(1, min(n_s, int(math.ceil(value))))


@numba.njit(cache=True)
def _smallest_b(n_s, s2, allowed, replacement):
    """Smallest ``b`` in ``[1, n_s]`` with ``n_s^2 (1/b - 1/n_s) s2 <= allowed`` (without replacement) or
    ``n_s (n_s - 1) s2 / b <= allowed`` (with replacement); ``n_s`` if none (the oracle's ``_smallest_b``)."""
    if s2 <= 0:
        need = 1.0
    elif replacement:
        need = n_s * (n_s - 1) * s2 / allowed if allowed > 0 else math.inf
    else:
        need = n_s / (1.0 + allowed / (n_s * s2))
    need = math.ceil(need) if math.isfinite(need) else float(n_s)
    b = min(max(need, 1.0), float(n_s))
    for _ in range(3):
        var = n_s * (n_s - 1) * s2 / b if replacement else n_s * n_s * (1.0 / b - 1.0 / n_s) * s2
        if var > allowed and b < n_s:
            b += 1.0
    return int(b)


@numba.njit(cache=True, fastmath=FASTMATH)
def _group_moments(x, vk, domain, excluded, h0, g, n_s, total, centred, ddof):
    """The residual statistics of the G query heads ``h0..h0+g-1`` of one KV head, each V row read once
    per pass for the whole group (three passes: the numerator over all rows, then the two-pass moments
    over each head's domain). Per head, with ``t_j = x_j`` on its domain (0 where ``excluded``) and
    ``o`` = the exact output if ``centred`` else 0: ``(numerator [g, d], var(t) [g],
    sum_c var_c(t_j (v_jc - o_c)) [g])``, variances with divisor ``n_s - ddof``."""
    n, d = vk.shape
    numer = np.zeros((g, d))
    for j in range(n):
        for gi in range(g):
            xj = x[h0 + gi, j]
            for c in range(d):
                numer[gi, c] += xj * vk[j, c]
    o = np.zeros((g, d))
    if centred:
        for gi in range(g):
            o[gi] = numer[gi] / total[h0 + gi]
    t_sum = np.zeros(g)
    mean = np.zeros((g, d))
    for j in range(n):
        for gi in range(g):
            h = h0 + gi
            if domain[h, j]:
                t = 0.0 if excluded[h, j] else x[h, j]
                t_sum[gi] += t
                for c in range(d):
                    mean[gi, c] += t * (vk[j, c] - o[gi, c])
    var_x = np.zeros(g)
    var_y = np.zeros(g)
    for gi in range(g):
        m = max(n_s[h0 + gi], 1)
        t_sum[gi] /= m
        mean[gi] /= m
    for j in range(n):
        for gi in range(g):
            h = h0 + gi
            if domain[h, j]:
                t = 0.0 if excluded[h, j] else x[h, j]
                var_x[gi] += (t - t_sum[gi]) ** 2
                acc = 0.0
                for c in range(d):
                    acc += (t * (vk[j, c] - o[gi, c]) - mean[gi, c]) ** 2
                var_y[gi] += acc
    for gi in range(g):
        m = max(n_s[h0 + gi] - ddof, 1)
        var_x[gi] /= m
        var_y[gi] /= m
    return numer, var_x, var_y


@numba.njit(cache=True, parallel=True)
def plan_heads(s, rank, v, n_sink, n_local, heavy, window_domain, rule, z, e_num, e_den, both,
               epsilon, half_delta, grid, replacement):
    """Per query head: ``fixed [H_q, n]`` and ``domain [H_q, n]`` masks, ``x [H_q, n]`` and the budget.

    ``rank`` orders the top-k (the logits, or a selector's scores). Budgets: ``rule`` 0 = CLT (``z``,
    the per-target relative errors ``e_num``/``e_den``, ``both``: the numerator counts too), 1 =
    Chebyshev + Cantelli over the ``grid`` of ``e2`` (``replacement``: Hansen-Hurwitz variances),
    2 = none here (the reference rule's budgets need the base sample: computed by the caller). A
    window domain counts its slots of the fixed set as 0 (a draw of one adds nothing).
    """
    h_q, n = s.shape
    h_kv = v.shape[0]
    g = h_q // h_kv
    d = v.shape[2]
    fixed = np.zeros((h_q, n), np.bool_)
    domain = np.zeros((h_q, n), np.bool_)
    x = np.empty((h_q, n), np.float64)
    budget = np.zeros(h_q, np.int64)
    total = np.zeros(h_q)
    n_s_all = np.zeros(h_q, np.int64)
    for h in numba.prange(h_q):
        for j in range(n):
            fixed[h, j] = j < n_sink or j >= n - n_local
        n_rest = 0
        for j in range(n):
            n_rest += not fixed[h, j]
        if heavy > 0 and n_rest > 0:
            rest = np.empty(n_rest, np.int64)
            r = 0
            for j in range(n):
                if not fixed[h, j]:
                    rest[r] = j
                    r += 1
            for p in topk_set(rank[h][rest], heavy):
                fixed[h, rest[p]] = True
        for j in range(n):
            domain[h, j] = (n_sink <= j < n - n_local) if window_domain else not fixed[h, j]
        mx = -np.inf
        for j in range(n):
            mx = max(mx, s[h, j])
        tot = 0.0
        for j in range(n):
            x[h, j] = math.exp(s[h, j] - mx)
            tot += x[h, j]
        total[h] = tot
        cnt = 0
        for j in range(n):
            cnt += domain[h, j]
        n_s_all[h] = cnt
    if rule == RULE_REFERENCE:
        return fixed, domain, x, budget
    excluded = fixed if window_domain else np.zeros((h_q, n), np.bool_)
    for kvh in numba.prange(h_kv):
        h0 = kvh * g
        numer, var_x, var_y = _group_moments(x, v[kvh], domain, excluded, h0, g, n_s_all, total,
                                             rule != RULE_CLT, 0 if rule == RULE_CLT else 1)
        for gi in range(g):
            h = h0 + gi
            n_s = n_s_all[h]
            if n_s == 0:
                continue
            if rule == RULE_CLT:
                b = (z * n_s * math.sqrt(var_x[gi]) / (e_den * total[h])) ** 2
                if both:
                    norm = math.sqrt((numer[gi] ** 2).sum())
                    if norm > 0:
                        b = max(b, (z * n_s * math.sqrt(var_y[gi]) / (e_num * norm)) ** 2)
                    elif var_y[gi] > 0:
                        b = math.inf
                budget[h] = _ceil_budget(b, n_s)
            elif n_s <= 1:
                budget[h] = n_s
            else:
                o_norm = math.sqrt(((numer[gi] / total[h]) ** 2).sum())
                best = n_s
                for e2 in grid:
                    allowed_w = half_delta * (epsilon * (1 - e2) * o_norm * total[h]) ** 2
                    allowed_d = (e2 * total[h]) ** 2 * half_delta / (1 - half_delta)
                    best = min(best, max(_smallest_b(n_s, var_y[gi], allowed_w, replacement),
                                         _smallest_b(n_s, var_x[gi], allowed_d, replacement)))
                budget[h] = best
    return fixed, domain, x, budget


@numba.njit(cache=True)
def head_weights(fixed, sample, b, population, guard, dedup):
    """Sorted slots and HT weights of one head: ``1/(1+guard)`` on the fixed set, ``count / (b/N + guard)``
    on the other drawn slots (``count`` = 1 when duplicates collapse)."""
    n = fixed.shape[0]
    counts = np.zeros(n, np.int64)
    for j in sample:
        counts[j] += 1
    size = 0
    for j in range(n):
        size += fixed[j] or counts[j] > 0
    ix = np.empty(size, np.int64)
    w = np.empty(size, np.float64)
    per_draw = 1.0 / (b / population + guard) if b > 0 else 0.0
    r = 0
    for j in range(n):
        if fixed[j]:
            ix[r], w[r] = j, 1.0 / (1.0 + guard)
            r += 1
        elif counts[j] > 0:
            ix[r], w[r] = j, (1 if dedup else counts[j]) * per_draw
            r += 1
    return ix, w


def _draw(method: VAttention, rng, domain: np.ndarray, b: int) -> np.ndarray:
    # the oracle's VAttention.draw, call for call
    if method.sampling == "without_replacement":
        return np.sort(rng.choice(domain, size=b, replace=False))
    return np.sort(domain[rng.integers(0, domain.size, size=b)]) if b else np.zeros(0, np.int64)


@register_kernel("vattention", "numba")
def vattention(method: VAttention, q, k, v, *, positions=None, scale=None, rng=None, samples=None,
               base_samples=None):
    """Kernel-step contract for an estimator: ``(out [H_q, d], indices per query head, HT weights)``."""
    q, k, v = check_float_arrays(q, k, v)
    indices, weights = select(method, q, k, v, scale=scale, rng=rng, samples=samples, base_samples=base_samples)
    dense_w = np.zeros((q.shape[0], k.shape[1]), q.dtype)
    for h, (ix, w) in enumerate(zip(indices, weights)):
        dense_w[h, ix] = w
    lists, lengths, w_lists, _ = masks_to_lists(dense_w, k.shape[0], np.ones(1, q.dtype))
    out, _ = sparse_attention(q, k, v, lists, lengths, w_lists, scale=scale, check=False)
    return out, indices, weights


def select(method: VAttention, q, k, v, *, scale=None, rng=None, samples=None, base_samples=None):
    """The plan and the draws: ``(indices per query head, HT weights)``, equal to the oracle's for the same
    generator. ``q, k, v`` float32 or float64 NumPy (the Triton kernel calls this too: the plan decides
    an integer budget and must be the oracle's, so it never runs in a low precision)."""
    if not isinstance(method, VAttention):
        raise TypeError(f"method must be a VAttention, got {type(method).__name__}")
    q, k, v = check_float_arrays(q, k, v)
    h_q, d = q.shape
    n = k.shape[1]
    s_scale = _scale(scale, d)
    rng = np.random.default_rng(method.seed) if rng is None else rng
    s, _ = channel_logits(q, k, np.tile(np.arange(d), (h_q, 1)), np.full(h_q, s_scale))
    if method.selector is not None:
        rank = np.asarray(method.selector(q.astype(np.float64), k.astype(np.float64)), dtype=np.float64)
        if rank.shape != (h_q, n):
            raise ValueError(f"selector must return scores of shape (H_q, n) = {(h_q, n)}, got {rank.shape}")
    else:
        rank = s
    n_sink, n_local = _size(method.sinks, n, "sinks"), _size(method.local, n, "local")
    rule = {"clt": RULE_CLT, "chebyshev": RULE_CHEBYSHEV, "reference": RULE_REFERENCE}[method.budget_rule]
    both = method.targets == "output"
    e = output_split(method.epsilon) if both else method.epsilon
    z = normal_quantile(1 - method.delta / 4) if both else normal_quantile(1 - method.delta / 2)
    fixed, domain, x, budget = plan_heads(
        s, rank, np.ascontiguousarray(v), n_sink, n_local, _size(method.heavy, n, "heavy"),
        method.domain == "window", rule, z, e, e, both, method.epsilon, method.delta / 2, CHEBYSHEV_E2_GRID,
        method.sampling != "without_replacement")
    domains = [np.flatnonzero(row) for row in domain]
    if method.sampling == "with_replacement" and rule != RULE_REFERENCE:
        for h in range(h_q):     # a budget of the whole domain drawn with replacement: attend it exactly
            if domains[h].size and budget[h] >= domains[h].size:
                fixed[h] |= domain[h]
                domain[h] = False
                domains[h], budget[h] = domains[h][:0], 0
    full = np.zeros(h_q, bool)
    if rule == RULE_REFERENCE:
        for h in range(h_q):
            n_w = domains[h].size
            if n_w < 2:
                full[h] = True
            elif method.base_rate == 0:
                budget[h] = 0
            else:
                b0 = reference_base_count(method.base_rate, n_w)
                base = (rng.integers(domains[h][0], domains[h][-1] + 1, size=(1, b0)) if base_samples is None
                        else np.asarray(base_samples[h]).reshape(1, b0))
                budget[h] = reference_budgets(x[h], np.flatnonzero(fixed[h]), domains[h], base, method.epsilon,
                                              method.delta, method.weight_guard)[0]
    if samples is not None and len(samples) != h_q:
        raise ValueError(f"samples must hold one array per query head ({h_q}), got {len(samples)}")
    indices, weights = [], []
    for h in range(h_q):
        if full[h]:
            ix, w = np.arange(n), np.ones(n)
        else:
            smp = _draw(method, rng, domains[h], int(budget[h])) if samples is None else np.asarray(samples[h], np.int64)
            if smp.size != budget[h] or (smp.size and not domain[h][smp].all()):
                raise ValueError(f"samples[{h}] must hold {budget[h]} slots of the sampling domain")
            ix, w = head_weights(fixed[h], smp, int(budget[h]), float(domains[h].size), float(method.weight_guard),
                                 method.sampling == "with_replacement_dedup")
        indices.append(ix)
        weights.append(w)
    return indices, weights
