"""Example third-party kernels for `kvsparse validate` and the pytest plugin: one correct kernel per
method and deliberately buggy ones, each with the bug a real kernel might have.

    kvsparse validate dense examples/user_kernels.py:dense_ok              # PASS
    kvsparse validate dense examples/user_kernels.py:dense_wrong_scale     # FAIL: output
    kvsparse validate quest examples/user_kernels.py:quest_ok              # PASS
    kvsparse validate quest examples/user_kernels.py:quest_partial_page_off_by_one   # FAIL
    kvsparse validate quest examples/user_kernels.py:quest_per_group       # FAIL: selection
    kvsparse validate streaming_llm examples/user_kernels.py:streaming_ok             # PASS
    kvsparse validate streaming_llm examples/user_kernels.py:streaming_dropped_sink   # FAIL: selection
    kvsparse validate vattention examples/user_kernels.py:vattention_ok               # PASS (statistical)
    kvsparse validate vattention examples/user_kernels.py:vattention_quarter_budget   # FAIL: guarantee

The contract (kvsparse/property_tests/suites.py): ``kernel(method, q, k, v, *, positions=None,
scale=None) -> (output [H_q, d], indices per query head)``, NumPy arrays in the kernel's dtype;
``method`` is the oracle's instance, whose fields are the hyper-parameters.
"""
import numpy as np


def _attend(q, k, v, sets, scale):
    """float32 softmax attention of each query head over its token set (GQA: head h reads KV head h // G)."""
    h_q, d = q.shape
    g = h_q // k.shape[0]
    s = np.float32(1 / np.sqrt(d) if scale is None else scale)
    out = np.zeros((h_q, d), np.float32)
    for h, idx in enumerate(sets):
        if len(idx) == 0:
            continue
        x = (k[h // g, idx].astype(np.float32) @ q[h].astype(np.float32)) * s
        p = np.exp(x - x.max())
        out[h] = (p @ v[h // g, idx].astype(np.float32)) / p.sum()
    return out


# ---- dense -----------------------------------------------------------------------------------

def dense_ok(method, q, k, v, *, positions=None, scale=None):
    sets = [np.arange(k.shape[1])] * q.shape[0]
    return _attend(q, k, v, sets, scale), sets


def dense_wrong_scale(method, q, k, v, *, positions=None, scale=None):
    """Bug: softmax scale 1/d instead of 1/sqrt(d)."""
    sets = [np.arange(k.shape[1])] * q.shape[0]
    return _attend(q, k, v, sets, 1.0 / q.shape[1] if scale is None else scale), sets


# ---- Quest -----------------------------------------------------------------------------------

def _quest_pages(method, q, k, *, n_pages_fn, per_group=False):
    h_q, n = q.shape[0], k.shape[1]
    g = h_q // k.shape[0]
    p = method.page_size
    n_pages = n_pages_fn(n, p)
    if method.is_dense(n):
        return [np.arange(-(-n // p))] * h_q
    kmin = np.stack([[k[j, i * p:(i + 1) * p].min(axis=0) for i in range(n_pages)] for j in range(k.shape[0])])
    kmax = np.stack([[k[j, i * p:(i + 1) * p].max(axis=0) for i in range(n_pages)] for j in range(k.shape[0])])
    scores = np.stack([np.maximum(q[h] * kmin[h // g], q[h] * kmax[h // g]).sum(axis=1) for h in range(h_q)])
    if per_group:
        scores = np.repeat(scores.reshape(k.shape[0], g, -1).mean(axis=1), g, axis=0)
    budget = method.page_budget(n)
    out = []
    for h in range(h_q):
        if method.last_page == "always":
            order = np.argsort(-scores[h, : n_pages - 1], kind="stable")[: budget - 1]
            out.append(np.append(order, n_pages - 1))
        else:
            out.append(np.argsort(-scores[h], kind="stable")[: min(budget, n_pages)])
    return out


def _tokens(pages, p, n):
    return [np.array([t for pg in sorted(row) for t in range(pg * p, min(n, (pg + 1) * p))], dtype=np.int64)
            for row in pages]


def quest_ok(method, q, k, v, *, positions=None, scale=None):
    pages = _quest_pages(method, q, k, n_pages_fn=lambda n, p: -(-n // p))
    sets = _tokens(pages, method.page_size, k.shape[1])
    return _attend(q, k, v, sets, scale), sets


def quest_partial_page_off_by_one(method, q, k, v, *, positions=None, scale=None):
    """Bug: ``n // P`` pages, so the partial last page is never scored or attended."""
    pages = _quest_pages(method, q, k, n_pages_fn=lambda n, p: max(1, n // p))
    sets = _tokens(pages, method.page_size, k.shape[1])
    return _attend(q, k, v, sets, scale), sets


def quest_per_group(method, q, k, v, *, positions=None, scale=None):
    """Bug: one page selection per GQA group (mean score) instead of per query head."""
    pages = _quest_pages(method, q, k, n_pages_fn=lambda n, p: -(-n // p), per_group=True)
    sets = _tokens(pages, method.page_size, k.shape[1])
    return _attend(q, k, v, sets, scale), sets


# ---- StreamingLLM (stateful: prefill/decode) ---------------------------------------------------

class StreamingKernel:
    """Attention sinks + a rolling window, re-applied every step (``schedule="every_step"``).

    ``keep_sinks=False`` plants the bug: the kernel forgets the sink tokens and keeps only the window.
    """

    def __init__(self, keep_sinks=True):
        self.keep_sinks = keep_sinks

    def __call__(self, method, q, k, v, *, positions=None, scale=None):
        sets = [self._kept(method, k.shape[1])] * q.shape[0]
        return _attend(q, k, v, sets, scale), sets

    def _kept(self, method, n):
        span = method.recent if method.recent_includes_current else method.recent + 1
        sinks = np.arange(min(method.sinks, n)) if self.keep_sinks else np.zeros(0, np.int64)
        return np.union1d(sinks, np.arange(max(0, n - span), n)).astype(np.int64)

    def prefill(self, method, q_prompt, k_prompt, v_prompt):
        if method.schedule != "every_step":
            raise ValueError("this kernel implements schedule='every_step' only")
        return [k_prompt.transpose(1, 0, 2), v_prompt.transpose(1, 0, 2)]     # [H_kv, T, d]; all kept

    def decode(self, method, state, q, k_new, v_new, *, scale=None):
        k = np.concatenate([state[0], k_new[:, None]], axis=1)
        v = np.concatenate([state[1], v_new[:, None]], axis=1)
        kept = self._kept(method, k.shape[1])
        # a real cache would drop the evicted rows; keeping them lets positions stay original
        sets = [kept] * q.shape[0]
        return [k, v], (_attend(q, k, v, sets, scale), sets)


streaming_ok = StreamingKernel()
streaming_dropped_sink = StreamingKernel(keep_sinks=False)


# ---- vAttention (randomized: rng= keyword, returns (output, indices, weights)) -----------------

def _vattention(method, q, k, v, *, scale, rng, budget_fraction):
    """sinks + local + top-k exact, a uniform sample without replacement of the rest, HT weights n_s/b.

    The sample size is the paper's CLT rule (``budget_rule="clt"``, both targets) computed here in
    float32 from the residual's statistics; ``budget_fraction`` < 1 plants an undersized sample.
    """
    from statistics import NormalDist
    if method.budget_rule != "clt" or method.sampling != "without_replacement" or method.domain != "residual":
        raise ValueError("this kernel implements budget_rule='clt', sampling without replacement of the residual")
    h_q, d = q.shape
    n = k.shape[1]
    g = h_q // k.shape[0]
    size = lambda spec: min(int(spec), n) if isinstance(spec, (int, np.integer)) else int(np.floor(spec * n))
    s_ = np.float32(1 / np.sqrt(d) if scale is None else scale)
    eps, dlt = method.epsilon, method.delta
    out = np.zeros((h_q, d), np.float32)
    indices, weights = [], []
    for h in range(h_q):
        kh, vh = k[h // g].astype(np.float32), v[h // g].astype(np.float32)
        s = (kh @ q[h].astype(np.float32)) * s_
        x = np.exp(s - s.max())
        base = np.union1d(np.arange(size(method.sinks)), np.arange(n - size(method.local), n))
        rest = np.setdiff1d(np.arange(n), base)
        heavy = min(size(method.heavy), rest.size)
        top = rest[np.argsort(-s[rest], kind="stable")[:heavy]]
        fixed = np.union1d(base, top)
        residual = np.setdiff1d(rest, top)
        n_s = residual.size
        b = 0
        if n_s:
            xr = x[residual]
            if method.targets == "denominator":
                z, e = NormalDist().inv_cdf(1 - dlt / 2), eps
                need = (z * n_s * xr.std() / (e * x.sum())) ** 2
            else:
                z, e = NormalDist().inv_cdf(1 - dlt / 4), eps / (2 + eps)
                trace = (xr[:, None] * vh[residual]).var(axis=0).sum()
                need = max((z * n_s * xr.std() / (e * x.sum())) ** 2,
                           (z * n_s * np.sqrt(trace) / (e * np.linalg.norm(x @ vh))) ** 2)
            b = n_s if not np.isfinite(need) or need >= n_s else max(1, int(np.ceil(need)))
            b = max(1, int(b * budget_fraction))
        sample = np.sort(rng.choice(residual, size=b, replace=False)) if b else np.zeros(0, np.int64)
        ix = np.concatenate([fixed, sample]).astype(np.int64)
        w = np.concatenate([np.ones(fixed.size), np.full(sample.size, n_s / b if b else 0.0)]).astype(np.float32)
        wx = w * x[ix]
        out[h] = (wx @ vh[ix]) / wx.sum()
        indices.append(ix)
        weights.append(w)
    return out, indices, weights


def vattention_ok(method, q, k, v, *, positions=None, scale=None, rng):
    return _vattention(method, q, k, v, scale=scale, rng=rng, budget_fraction=1.0)


def vattention_quarter_budget(method, q, k, v, *, positions=None, scale=None, rng):
    """Bug: samples a quarter of the budget (HT weights still n_s/b, so unbiased but too noisy)."""
    return _vattention(method, q, k, v, scale=scale, rng=rng, budget_fraction=0.25)
