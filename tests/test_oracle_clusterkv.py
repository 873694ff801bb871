"""ClusterKV oracle: each property is checked against an independent computation in this file, and
each property check is shown to catch a planted bug."""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import Layout, Selection, core, run_decode
from kvsparse.oracle import clusterkv
from kvsparse.oracle.clusterkv import ClusterKV, ClusterKVState, cluster_select, cluster_traffic, kmeans
from kvsparse.property_tests.strategies import budgets, decode_inputs, make_decode_input

EPS = 2.0 ** -52


def reorder_tolerance(q, k, v) -> float:
    """Bound on |a - b| for two float64 attentions over the same tokens summed in different orders.

    A logit is a d-term dot product: reordering changes it by at most d*eps*|q|*|k|*scale; a weight
    exp(s_i - lse) then moves by at most 2x that relatively, and the normalising and output sums of
    n terms add n*eps each. So |a - b| <= max|v| * (4 * logit_err + 8 * (n + d) * eps).
    """
    d, n = q.shape[1], k.shape[1]
    logit_err = d * EPS * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=2).max() / np.sqrt(d)
    return float(np.abs(v).max() * (4 * logit_err + 8 * (n + d) * EPS)) if n else 0.0


# ----------------------------------------------------------------------------------------------
# cases: a prompt of T tokens, then `gen + 1` decode steps; edge values always in reach
# ----------------------------------------------------------------------------------------------

@st.composite
def clusterkv_cases(draw):
    x = draw(decode_inputs(max_n=70, max_h_kv=2, max_group=3, head_dims=(1, 2, 4, 8, 16)))
    n = x.k.shape[1]
    gen = draw(st.integers(0, min(2, n - 1)))
    sinks = draw(st.sampled_from([0, 1, 4, 16, n, n + 3]))
    budget = draw(st.one_of(budgets(n, extra=(sinks + 1, n - gen - 1)),
                            st.sampled_from(sorted({0, max(sinks - 1, 0), sinks}))))
    method = ClusterKV(n_clusters=draw(st.sampled_from([1, 2, 3, 7, 200])),   # 200 > n: n < clusters
                       sinks=sinks, budget=budget, iterations=draw(st.integers(1, 3)),
                       seed=draw(st.integers(0, 3)), metric=draw(st.sampled_from(clusterkv.METRICS)),
                       init=draw(st.sampled_from(clusterkv.INITS)),
                       gqa=draw(st.sampled_from(clusterkv.GQA_POLICIES)))
    return x, method, n - 1 - gen


def run_case(x, method, prompt_len):
    n = x.k.shape[1]
    q_seq = np.broadcast_to(x.q, (n,) + x.q.shape)
    return run_decode(method, q_seq, x.k.transpose(1, 0, 2), x.v.transpose(1, 0, 2), prefill_len=prompt_len)


def expected_prompt_count(method, prompt_len):
    """Independent statement of the budget rule: sinks + clip(budget - sinks, 0, clusterable)."""
    first = min(method.sinks, prompt_len)
    return first + min(max(method.budget - method.sinks, 0), prompt_len - first)


# property checks: plain functions that raise AssertionError, so a planted bug can be fed to them

def check_exact_budget(method, prompt_len, selection):
    want = expected_prompt_count(method, prompt_len)
    for h, ix in enumerate(selection.indices):
        got = int((ix < prompt_len).sum())
        assert got == want, f"head {h}: {got} prompt tokens selected, expected {want}"
        if method.sinks <= method.budget < prompt_len:
            assert got == method.budget, f"head {h}: {got} prompt tokens, budget {method.budget}"


def check_always_attended(method, prompt_len, selection):
    must = np.concatenate([np.arange(min(method.sinks, prompt_len)), np.arange(prompt_len, selection.n)])
    for h, ix in enumerate(selection.indices):
        missing = np.setdiff1d(must, ix)
        assert missing.size == 0, f"head {h} misses sink/generated tokens {missing[:5]}"


def check_dense_when_budget_covers_prompt(method, prompt_len, q, k, v, result):
    if method.budget < prompt_len:
        return
    assert result.selection == Selection.full(q.shape[0], k.shape[1]), "budget >= prompt but not dense"
    err = np.abs(result.output - core.attend_dense(q, k, v)).max()
    assert err <= reorder_tolerance(q, k, v), f"output differs from dense by {err}"


def check_ranked_prefix(method, state, q, selection):
    """Brute force: clusters sorted by (-q.c, id), members by position, first budget-sinks taken."""
    h_q, h_kv = q.shape[0], state.centroids.shape[0]
    g = h_q // h_kv
    first, prompt_len = state.first, state.prompt_len
    r = min(max(method.budget - method.sinks, 0), prompt_len - first)
    for h in range(h_q):
        j = h // g
        qh = q[h] if method.gqa == "per_query_head" else q[j * g:(j + 1) * g].mean(axis=0)
        scores = [float(c @ qh) for c in state.centroids[j]]
        order = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
        want = [first + i for c in order for i in range(len(state.labels[j])) if state.labels[j][i] == c][:r]
        ix = selection.indices[h]
        got = ix[(ix >= first) & (ix < prompt_len)]
        assert sorted(want) == list(got), f"head {h}: selected {list(got)[:8]}, ranked prefix {sorted(want)[:8]}"


@given(clusterkv_cases())
@example((make_decode_input(2, 1, 5, 4, "gaussian", 0), ClusterKV(n_clusters=400, sinks=16, budget=3), 3))  # n <= sinks
@example((make_decode_input(2, 1, 40, 4, "near_ties", 1), ClusterKV(n_clusters=3, sinks=8, budget=4), 37))  # budget < sinks
def test_clusterkv_properties(case):
    x, method, prompt_len = case
    run = run_case(x, method, prompt_len)
    state = run.final_state
    assert isinstance(state, ClusterKVState) and state.prompt_len == prompt_len
    for j, res in enumerate(run.steps):
        n_t = prompt_len + j + 1
        q, k, v = x.q, x.k[:, :n_t], x.v[:, :n_t]
        assert res.selection.n == n_t
        check_exact_budget(method, prompt_len, res.selection)
        check_always_attended(method, prompt_len, res.selection)
        check_dense_when_budget_covers_prompt(method, prompt_len, q, k, v, res)
        check_ranked_prefix(method, state, q, res.selection)
        # the output is plain attention over the selection, bit for bit
        assert np.array_equal(res.output, core.attend_indices(q, k, v, res.selection.indices))
        if method.gqa == "mean_query":
            g = x.q.shape[0] // x.k.shape[0]
            assert all(np.array_equal(a, res.selection.indices[(h // g) * g]) for h, a in enumerate(res.selection.indices))


# ----------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------

def check_kmeans_deterministic(fit, x, c, seed):
    a, b = fit(x, c, seed=seed), fit(x, c, seed=seed)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.labels, b.labels), "same seed, different k-means"


@given(st.integers(0, 60), st.integers(1, 80), st.sampled_from([1, 3, 8]), st.integers(0, 2**32 - 1),
       st.sampled_from(clusterkv.METRICS), st.sampled_from(clusterkv.INITS), st.integers(1, 4))
def test_kmeans_is_deterministic_and_centroids_are_member_means(m, c, d, seed, metric, init, iters):
    x = np.random.default_rng(seed).standard_normal((m, d))
    fit = lambda x_, c_, seed: kmeans(x_, c_, iterations=iters, seed=seed, metric=metric, init=init)
    check_kmeans_deterministic(fit, x, c, seed)
    res = fit(x, c, seed)
    assert res.centroids.shape == (min(c, m), d) and res.labels.shape == (m,)
    assert ((res.labels >= 0) & (res.labels < max(min(c, m), 1))).all()
    for j in np.unique(res.labels):   # a non-empty cluster's centroid is the mean of its members' keys
        np.testing.assert_allclose(res.centroids[j], x[res.labels == j].mean(axis=0), rtol=1e-12, atol=1e-12)


def test_kmeans_reassign_labels_each_key_with_its_best_centroid():
    x = np.random.default_rng(5).standard_normal((200, 8))
    res = kmeans(x, 7, iterations=3, seed=1, reassign=True)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (res.centroids / np.linalg.norm(res.centroids, axis=1, keepdims=True)).T
    assert np.array_equal(res.labels, cos.argmax(axis=1))


def test_kmeans_recovers_separated_directions():
    rng = np.random.default_rng(0)
    dirs = np.eye(4)[:3] * 10
    truth = np.repeat(np.arange(3), 30)
    x = dirs[truth] + 0.1 * rng.standard_normal((90, 4))
    res = kmeans(x, 3, iterations=10, seed=0, init="kmeans++")
    # the same partition up to renaming the clusters
    assert len({(t, l) for t, l in zip(truth, res.labels)}) == 3 and len(set(res.labels)) == 3


def test_kmeans_empty_cluster_keeps_its_previous_centroid():
    # two identical keys and one far key, 3 clusters: the duplicate's second centroid gets no member
    # (ties go to the lower id) and must stay where it was initialised
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    res = kmeans(x, 3, iterations=2, seed=0, metric="l2")
    assert np.array_equal(np.sort(res.centroids, axis=0), np.sort(x, axis=0))
    assert list(res.sizes) == [2, 0, 1]


def test_planted_bug_unseeded_kmeans_is_caught(monkeypatch):
    x = np.random.default_rng(0).standard_normal((60, 4))
    check_kmeans_deterministic(kmeans, x, 5, 0)
    real = clusterkv._init_centroids
    # the bug: the init ignores the seeded generator (chance of two equal draws of 5 of 60: < 1e-6)
    monkeypatch.setattr(clusterkv, "_init_centroids",
                        lambda x_, c, init, rng, metric: real(x_, c, init, np.random.default_rng(), metric))
    with pytest.raises(AssertionError, match="same seed"):
        check_kmeans_deterministic(kmeans, x, 5, 0)


# ----------------------------------------------------------------------------------------------
# hand-built clustering: ties, truncation, traffic
# ----------------------------------------------------------------------------------------------

def hand_state(n_generated=1):
    """T = 10, sinks 2, clusters: positions 2-5 -> 0 (centroid e1), 6-9 -> 1 (centroid e2); d = 4."""
    rng = np.random.default_rng(0)
    d, t = 4, 10
    k = rng.standard_normal((1, t + n_generated, d))
    v = rng.standard_normal((1, t + n_generated, d))
    return ClusterKVState(prompt_len=t, first=2, centroids=np.eye(d)[None, :2],
                          labels=np.array([[0, 0, 0, 0, 1, 1, 1, 1]]),
                          prompt_k=k[:, :t], prompt_v=v[:, :t], gen_k=k[:, t:], gen_v=v[:, t:])


def test_selection_by_hand_ranking_truncation_and_ties():
    state = hand_state()
    q = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0]])   # e1, e2, a tie between the clusters
    state = ClusterKVState(state.prompt_len, state.first, np.repeat(state.centroids, 3, 0),
                           np.repeat(state.labels, 3, 0), np.repeat(state.prompt_k, 3, 0),
                           np.repeat(state.prompt_v, 3, 0), np.repeat(state.gen_k, 3, 0), np.repeat(state.gen_v, 3, 0))
    sel = cluster_select(q, state, budget=5, sinks=2)
    assert [list(i) for i in sel.indices] == [[0, 1, 2, 3, 4, 10], [0, 1, 6, 7, 8, 10], [0, 1, 2, 3, 4, 10]]
    # budget 8: all of the first cluster, then the EARLIEST two of the second
    sel = cluster_select(q, state, budget=8, sinks=2)
    assert [list(i) for i in sel.indices] == [[0, 1, 2, 3, 4, 5, 6, 7, 10], [0, 1, 2, 3, 6, 7, 8, 9, 10],
                                              [0, 1, 2, 3, 4, 5, 6, 7, 10]]
    assert [list(i) for i in cluster_select(q, state, budget=1, sinks=2).indices] == [[0, 1, 10]] * 3


def test_traffic_by_hand():
    state = hand_state()
    q = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    sel = cluster_select(q, state, budget=5, sinks=2)       # {0,1,2,3,4,10} and {0,1,6,7,8,10}
    shared = cluster_traffic(sel, state, layout=Layout(element_bits=16))
    # K/V: union {0,1,2,3,4,6,7,8,10} = 9 rows x 4 ch x 2 B; metadata: one read of 2 centroids (2x4x2 B)
    # and 2 int32 sizes, plus 6 distinct member indices x 8 B
    assert shared.get("hbm", "keys") == 72 and shared.get("hbm", "values") == 72
    assert shared.get("hbm", "metadata") == 16 + 8 + 48
    per_head = cluster_traffic(sel, state, layout=Layout(element_bits=16, share_kv_heads=False))
    assert per_head.get("hbm", "keys") == 12 * 8 and per_head.get("hbm", "metadata") == 2 * 24 + 6 * 8
    assert per_head.by_memory("host") == 0 and per_head.by_memory("pcie") == 0
    dense = cluster_traffic(cluster_select(q, state, budget=10, sinks=2), state, layout=Layout())
    # nothing ranked: no centroid read; the 8 member indices are still read
    assert dense.get("hbm", "metadata") == 8 * 8 and dense.get("hbm", "keys") == 11 * 8


# ----------------------------------------------------------------------------------------------
# planted bugs in the selection are caught by the property checks
# ----------------------------------------------------------------------------------------------

def planted_case():
    x = make_decode_input(4, 2, 60, 8, "gaussian", 3)
    return x, ClusterKV(n_clusters=5, sinks=4, budget=20, iterations=2), 57


def test_planted_bug_off_by_one_budget_is_caught(monkeypatch):
    x, method, t = planted_case()
    check_exact_budget(method, t, run_case(x, method, t).steps[-1].selection)
    monkeypatch.setattr(clusterkv, "clustered_budget", lambda b, s, m: int(min(max(b - s + 1, 0), m)))
    with pytest.raises(AssertionError, match="prompt tokens"):
        check_exact_budget(method, t, run_case(x, method, t).steps[-1].selection)


def test_planted_bug_dropped_generated_token_is_caught():
    x, method, t = planted_case()
    sel = run_case(x, method, t).steps[-1].selection
    check_always_attended(method, t, sel)
    buggy = Selection(tuple(ix[ix != sel.n - 1] for ix in sel.indices), sel.n)
    with pytest.raises(AssertionError, match="misses"):
        check_always_attended(method, t, buggy)


def test_planted_bug_not_dense_at_full_budget_is_caught(monkeypatch):
    x, _, t = planted_case()
    method = ClusterKV(n_clusters=5, sinks=4, budget=t, iterations=2)
    res = run_case(x, method, t).steps[-1]
    q, k, v = x.q, x.k, x.v          # the last step sees the whole input
    check_dense_when_budget_covers_prompt(method, t, q, k, v, res)
    monkeypatch.setattr(clusterkv, "clustered_budget", lambda b, s, m: int(min(max(b - s - 1, 0), m)))
    with pytest.raises(AssertionError, match="not dense"):
        check_dense_when_budget_covers_prompt(method, t, q, k, v, run_case(x, method, t).steps[-1])


def test_planted_bug_wrong_ranking_is_caught(monkeypatch):
    x, method, t = planted_case()
    run = run_case(x, method, t)
    check_ranked_prefix(method, run.final_state, x.q, run.steps[-1].selection)
    real = core.topk_indices
    monkeypatch.setattr(clusterkv.core, "topk_indices", lambda s, k: real(-np.asarray(s), k))  # ascending: a bug
    run = run_case(x, method, t)
    with pytest.raises(AssertionError, match="ranked prefix"):
        check_ranked_prefix(method, run.final_state, x.q, run.steps[-1].selection)


# ----------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------

def test_registered_with_presets_and_defaults():
    method = registry.oracle("clusterkv")
    assert (method.n_clusters, method.sinks, method.budget, method.iterations) == (400, 16, 1024, 20)
    assert ClusterKV.family == "dynamic" and method.stateful
    assert set(ClusterKV.presets()) == {"canonical", "clusterkv-repo"}


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(n_clusters=0), ValueError, "n_clusters"), (dict(budget=-1), ValueError, "budget"),
    (dict(sinks=1.5), TypeError, "sinks"), (dict(iterations=0), ValueError, "iterations"),
    (dict(metric="dot"), ValueError, "metric"), (dict(init="kmeans"), ValueError, "init"),
    (dict(gqa="qavg"), ValueError, "gqa"), (dict(reassign=1), TypeError, "reassign"),
])
def test_bad_hyper_parameters_are_named(kwargs, err, match):
    with pytest.raises(err, match=match):
        ClusterKV(**kwargs)


def test_bad_decode_inputs_are_named():
    x, method, t = planted_case()
    state = method.prefill(np.zeros((t, 4, 8)), x.k.transpose(1, 0, 2)[:t], x.v.transpose(1, 0, 2)[:t])
    with pytest.raises(ValueError, match="k_new"):
        method.decode(state, x.q, np.zeros((2, 7)), np.zeros((2, 7)))
    with pytest.raises(TypeError, match="state"):
        method.decode({}, x.q, np.zeros((2, 8)), np.zeros((2, 8)))
    with pytest.raises(NotImplementedError, match="prefill"):
        method.step(x.q, x.k, x.v)
    with pytest.raises(TypeError, match="x"):
        kmeans(np.zeros((3, 2), dtype=int), 2)
