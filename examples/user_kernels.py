"""Example third-party kernels for `kvsparse validate` and the pytest plugin: one correct kernel per
method and deliberately buggy ones, each with the bug a real kernel might have.

    kvsparse validate dense examples/user_kernels.py:dense_ok              # PASS
    kvsparse validate dense examples/user_kernels.py:dense_wrong_scale     # FAIL: output
    kvsparse validate quest examples/user_kernels.py:quest_ok              # PASS
    kvsparse validate quest examples/user_kernels.py:quest_partial_page_off_by_one   # FAIL
    kvsparse validate quest examples/user_kernels.py:quest_per_group       # FAIL: selection

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
