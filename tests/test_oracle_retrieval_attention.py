"""RetrievalAttention oracle: each property is checked against an independent computation in this file,
and each property check is shown to catch a planted bug."""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import Layout, Selection, core
from kvsparse.oracle import retrieval_attention as ra
from kvsparse.oracle.retrieval_attention import RetrievalAttention, approximate_knn, exact_knn, merge_disjoint
from kvsparse.property_tests.strategies import decode_inputs, index_sets, make_decode_input

EPS = 2.0 ** -52


def reorder_tolerance(q, k, v) -> float:
    """Bound on |a - b| for two float64 attentions over the same tokens summed in different orders
    (or split into disjoint parts and merged): a d-term logit moves by at most d*eps*|q|*|k|*scale,
    a weight by twice that relatively (the LSE of each part is such a sum too), and the sums of n
    terms add n*eps each: |a - b| <= max|v| * (4 * logit_err + 8 * (n + d) * eps)."""
    d, n = q.shape[1], k.shape[1]
    logit_err = d * EPS * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=2).max() / np.sqrt(d)
    return float(np.abs(v).max() * (4 * logit_err + 8 * (n + d) * EPS)) if n else 0.0


def independent_static(n, sinks, window):
    return sorted(set(range(min(sinks, n))) | set(range(max(0, n - window), n)))


def independent_knn(q_head, keys, pool, k):
    """Brute force MIPS: sort by (-q.k, index) in Python."""
    scores = {i: float(np.dot(keys[i], q_head)) for i in pool}
    return sorted(sorted(pool, key=lambda i: (-scores[i], i))[:k])


# ----------------------------------------------------------------------------------------------
# the merge
# ----------------------------------------------------------------------------------------------

@st.composite
def disjoint_parts(draw):
    x = draw(decode_inputs(max_n=80))
    h_q, n = x.q.shape[0], x.k.shape[1]
    union = draw(index_sets(n, h_q))
    to_static = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(n) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    static = [ix[to_static[ix]] for ix in union]
    retrieved = [ix[~to_static[ix]] for ix in union]
    return x, union, static, retrieved


def check_merge_equals_union(x, union, static, retrieved, merge=merge_disjoint):
    got = merge(x.q, x.k, x.v, static, retrieved)
    want = core.attend_indices_partial(x.q, x.k, x.v, union)
    err = np.abs(got.out - want.out).max()
    assert err <= reorder_tolerance(x.q, x.k, x.v), f"merge differs from attention over the union by {err}"
    finite = np.isfinite(want.lse)
    assert np.array_equal(finite, np.isfinite(got.lse))
    assert np.allclose(got.lse[finite], want.lse[finite], rtol=0, atol=64 * EPS * (1 + np.abs(want.lse[finite]).max(initial=0)))


@given(disjoint_parts())
def test_merge_of_disjoint_parts_equals_attention_over_union(case):
    check_merge_equals_union(*case)


@given(disjoint_parts(), st.data())
def test_overlapping_parts_are_rejected(case, data):
    x, union, static, retrieved = case
    heads = [h for h, ix in enumerate(union) if ix.size]
    if not heads:
        return
    h = data.draw(st.sampled_from(heads))
    token = int(data.draw(st.sampled_from(list(union[h]))))
    static = list(static)
    retrieved = list(retrieved)
    static[h] = np.union1d(static[h], [token])
    retrieved[h] = np.union1d(retrieved[h], [token])
    with pytest.raises(ValueError, match="disjoint"):
        merge_disjoint(x.q, x.k, x.v, static, retrieved)


def test_planted_bug_merge_without_disjointness_check(monkeypatch):
    x = make_decode_input(2, 1, 20, 4, "gaussian", 0)
    static, retrieved = [np.arange(0, 12)] * 2, [np.arange(8, 20)] * 2     # 8..11 in both
    monkeypatch.setattr(ra.core, "check_disjoint", lambda sets, name="": None)
    # without the check the overlap is silently double counted, and the merge is no longer the union
    with pytest.raises(AssertionError, match="differs"):
        check_merge_equals_union(x, [np.arange(20)] * 2, static, retrieved)
    with pytest.raises(pytest.fail.Exception):
        with pytest.raises(ValueError, match="disjoint"):
            merge_disjoint(x.q, x.k, x.v, static, retrieved)


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------

@st.composite
def ra_cases(draw):
    x = draw(decode_inputs(max_n=150, max_h_kv=2, max_group=3))
    n = x.k.shape[1]
    method = RetrievalAttention(
        sinks=draw(st.sampled_from([0, 1, 4, n, n + 2])), window=draw(st.sampled_from([0, 1, 3, n, n + 1])),
        top_k=draw(st.sampled_from([0, 1, 5, n, n + 3])),
        recall=draw(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]), st.floats(0, 1))),
        replacement=draw(st.sampled_from(ra.REPLACEMENTS)), seed=draw(st.integers(0, 5)),
        scan_ratio=draw(st.sampled_from([None, 0.03, 1.0])))
    return x, method


def check_static_and_disjoint(method, x, selection):
    n = x.k.shape[1]
    static = independent_static(n, method.sinks, method.window)
    static_part, retrieved = method.split(selection)
    for h, ix in enumerate(selection.indices):
        assert list(static_part[h]) == static, f"head {h}: static set {list(static_part[h])[:8]}, expected {static[:8]}"
        missing = set(static) - set(ix.tolist())
        assert not missing, f"head {h} misses static tokens {sorted(missing)[:5]}"
        assert not set(static) & set(retrieved[h].tolist())


def check_exact_knn(method, x, selection):
    n, g = x.k.shape[1], x.q.shape[0] // x.k.shape[0]
    pool = [i for i in range(n) if i not in set(independent_static(n, method.sinks, method.window))]
    _, retrieved = method.split(selection)
    for h in range(x.q.shape[0]):
        want = independent_knn(x.q[h], x.k[h // g], pool, method.top_k)
        assert want == list(retrieved[h]), f"head {h}: retrieved {list(retrieved[h])[:6]}, exact kNN {want[:6]}"


def check_recall(method, x, selection):
    """k_eff tokens; exactly floor(recall * k_eff) true neighbours unless too few others exist to replace a miss."""
    n, g = x.k.shape[1], x.q.shape[0] // x.k.shape[0]
    pool = [i for i in range(n) if i not in set(independent_static(n, method.sinks, method.window))]
    k_eff = min(method.top_k, len(pool))
    hits = max(math.floor(Fraction(repr(float(method.recall))) * k_eff), 2 * k_eff - len(pool))
    _, retrieved = method.split(selection)
    for h in range(x.q.shape[0]):
        ranked = independent_knn(x.q[h], x.k[h // g], pool, len(pool))
        scores = {i: float(np.dot(x.k[h // g][i], x.q[h])) for i in pool}
        by_rank = sorted(pool, key=lambda i: (-scores[i], i))
        true = set(by_rank[:k_eff])
        got = set(retrieved[h].tolist())
        assert got <= set(ranked)
        assert len(got & true) == hits, f"head {h}: {len(got & true)} true neighbours, expected {hits}"
        assert len(got) == k_eff
        if method.replacement == "next_ranked":
            assert got - true == set(by_rank[k_eff:k_eff + len(got - true)])


@given(ra_cases())
@example((make_decode_input(2, 1, 10, 4, "near_ties", 0), RetrievalAttention(sinks=2, window=2, top_k=3)))
@example((make_decode_input(2, 1, 10, 4, "gaussian", 1), RetrievalAttention(sinks=2, window=2, top_k=3, recall=0.5)))
def test_retrieval_attention_properties(case):
    x, method = case
    res = method.step(x.q, x.k, x.v)
    n = x.k.shape[1]
    check_static_and_disjoint(method, x, res.selection)
    check_recall(method, x, res.selection)
    if Fraction(repr(float(method.recall))) == 1:
        check_exact_knn(method, x, res.selection)
    # the merged output is attention over the union of the two sets
    err = np.abs(res.output - core.attend_indices(x.q, x.k, x.v, res.selection.indices)).max(initial=0)
    assert err <= reorder_tolerance(x.q, x.k, x.v)
    # budget >= context: dense
    if method.sinks + method.window + method.top_k >= n:
        assert res.selection == Selection.full(x.q.shape[0], n)
        assert np.abs(res.output - core.attend_dense(x.q, x.k, x.v)).max() <= reorder_tolerance(x.q, x.k, x.v)
    # seeded: the same call gives the same selection
    assert method.step(x.q, x.k, x.v).selection == res.selection


@given(decode_inputs(max_n=120, max_h_kv=2, max_group=2), st.integers(0, 130), st.integers(0, 2**32 - 1),
       st.sampled_from(ra.REPLACEMENTS))
def test_recall_one_approximate_retrieval_is_exact_knn(x, k, seed, replacement):
    pool = np.arange(x.k.shape[1])
    scores = ra.inner_products(x.q, x.k)
    g = x.q.shape[0] // x.k.shape[0]
    for h in range(x.q.shape[0]):
        approx = approximate_knn(scores[h], pool, k, recall=1.0, replacement=replacement,
                                 rng=np.random.default_rng(seed))
        assert list(approx) == independent_knn(x.q[h], x.k[h // g], list(pool), k)
        assert list(approx) == sorted(exact_knn(scores[h], pool, k))


def test_planted_bug_cosine_search_is_caught(monkeypatch):
    x = make_decode_input(4, 2, 200, 8, "gaussian", 7)
    method = RetrievalAttention(sinks=4, window=8, top_k=10)
    check_exact_knn(method, x, method.step(x.q, x.k, x.v).selection)
    # the bug: searching by cosine similarity instead of inner product (keys' norms differ)
    monkeypatch.setattr(ra, "inner_products", lambda q, k: core.logits(q, k / np.linalg.norm(k, axis=2, keepdims=True), 1.0))
    with pytest.raises(AssertionError, match="exact kNN"):
        check_exact_knn(method, x, method.step(x.q, x.k, x.v).selection)


def test_planted_bug_window_off_by_one_is_caught(monkeypatch):
    x = make_decode_input(2, 1, 50, 4, "gaussian", 2)
    method = RetrievalAttention(sinks=3, window=5, top_k=4)
    check_static_and_disjoint(method, x, method.step(x.q, x.k, x.v).selection)
    real = ra.static_set
    # the bug: the window ends before the current token
    monkeypatch.setattr(ra, "static_set", lambda n, s, w: np.setdiff1d(real(n, s, w), [n - 1]))
    with pytest.raises(AssertionError, match="static"):
        check_static_and_disjoint(method, x, method.step(x.q, x.k, x.v).selection)


def test_planted_bug_wrong_number_of_hits_is_caught(monkeypatch):
    x = make_decode_input(2, 1, 80, 4, "gaussian", 3)
    method = RetrievalAttention(sinks=2, window=2, top_k=10, recall=0.5)
    check_recall(method, x, method.step(x.q, x.k, x.v).selection)
    real = core.budget_from_ratio
    monkeypatch.setattr(ra.core, "budget_from_ratio", lambda n, r, **kw: min(n, real(n, r, **kw) + 1))
    with pytest.raises(AssertionError, match="true neighbours"):
        check_recall(method, x, method.step(x.q, x.k, x.v).selection)


def test_misses_depend_on_seed_and_cache_length():
    x = make_decode_input(1, 1, 300, 8, "gaussian", 0)
    m = RetrievalAttention(sinks=2, window=2, top_k=50, recall=0.5)
    sets = {tuple(m.step(x.q, x.k, x.v).selection.indices[0])}
    sets.add(tuple(RetrievalAttention(sinks=2, window=2, top_k=50, recall=0.5, seed=1).step(x.q, x.k, x.v).selection.indices[0]))
    sets.add(tuple(m.step(x.q, x.k[:, :299], x.v[:, :299]).selection.indices[0]))
    # 25 misses out of 50 drawn three times: equal draws have probability < 3 / C(50, 25) < 1e-13
    assert len(sets) == 3


# ----------------------------------------------------------------------------------------------
# traffic
# ----------------------------------------------------------------------------------------------

def test_traffic_by_hand():
    # H_q = 4, H_kv = 2, n = 20, d = 4, fp16 rows of 8 bytes; static = {0, 1} u {17, 18, 19}
    x = make_decode_input(4, 2, 20, 4, "gaussian", 0)
    method = RetrievalAttention(sinks=2, window=3, top_k=2)
    res = method.step(x.q, x.k, x.v, layout=Layout(element_bits=16))
    _, retrieved = method.split(res.selection)
    union_rows = sum(np.union1d(retrieved[2 * j], retrieved[2 * j + 1]).size for j in range(2))
    t = res.traffic
    assert t.get("hbm", "keys") == t.get("hbm", "values") == 2 * 5 * 8            # per KV head, 5 static rows
    assert t.get("host", "values") == union_rows * 8
    assert t.get("host", "keys") == 2 * 15 * 8 + union_rows * 8                   # flat scan of 15 candidates + attention
    assert t.get("pcie", "auxiliary") == 4 * (8 + 8 + 4)                           # q down; out + fp32 lse up
    assert t.by_memory("hbm") + t.by_memory("host") + t.by_memory("pcie") == t.total
    per_head = method.step(x.q, x.k, x.v, layout=Layout(element_bits=16, share_kv_heads=False)).traffic
    assert per_head.get("hbm", "keys") == 4 * 5 * 8
    assert per_head.get("host", "keys") == 4 * 15 * 8 + 4 * 2 * 8
    indexed = RetrievalAttention(sinks=2, window=3, top_k=2, scan_ratio=0.5).step(x.q, x.k, x.v).traffic
    assert indexed.get("host", "keys") == 4 * 7 * 8 + union_rows * 8               # floor(15 / 2) keys per query head
    nothing = RetrievalAttention(sinks=10, window=10, top_k=5).step(x.q, x.k, x.v).traffic
    assert nothing.by_memory("host") == nothing.by_memory("pcie") == 0 and nothing.get("hbm", "keys") == 2 * 20 * 8


# ----------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------

def test_registered_with_presets():
    method = registry.oracle("retrieval_attention")
    assert (method.sinks, method.window, method.top_k, method.recall) == (128, 512, 100, 1.0)
    assert RetrievalAttention.family == "dynamic" and not method.stateful
    assert set(RetrievalAttention.presets()) == {"canonical", "approximate"}


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(sinks=-1), ValueError, "sinks"), (dict(window=2.0), TypeError, "window"),
    (dict(top_k=-3), ValueError, "top_k"), (dict(recall=1.5), ValueError, "ratio"),
    (dict(recall=None), TypeError, "recall"), (dict(scan_ratio=-0.1), ValueError, "ratio"),
    (dict(replacement="random"), ValueError, "replacement"), (dict(lse_bytes=0), ValueError, "lse_bytes"),
])
def test_bad_hyper_parameters_are_named(kwargs, err, match):
    with pytest.raises(err, match=match):
        RetrievalAttention(**kwargs)


def test_merge_checks_shapes():
    x = make_decode_input(2, 1, 10, 4, "gaussian", 0)
    with pytest.raises(ValueError, match="one set per query head"):
        merge_disjoint(x.q, x.k, x.v, [np.arange(3)] * 2, [np.arange(3, 5)])
