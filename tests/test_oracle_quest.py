"""Quest oracle: page metadata, the upper bound, page selection rules, presets and exact traffic."""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import Layout, Selection, core, kv_traffic
from kvsparse.oracle.quest import Quest, page_metadata, page_scores
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input

PAGE_SIZES = st.sampled_from([1, 2, 3, 4, 5, 8, 16])


def brute_metadata(k, page_size):
    """Per page min/max by a plain loop over the filled tokens."""
    h_kv, n, d = k.shape
    pages = -(-n // page_size)
    lo, hi = np.empty((h_kv, pages, d)), np.empty((h_kv, pages, d))
    for h in range(h_kv):
        for p in range(pages):
            rows = k[h, p * page_size:min(n, (p + 1) * page_size)]
            lo[h, p], hi[h, p] = rows.min(axis=0), rows.max(axis=0)
    return lo, hi


def assert_upper_bound(q, k, page_size, metadata=page_metadata):
    """Every q.k_j in page P is <= U_P(q), up to the rounding of two d-term float64 dot products.

    Rounding bound: each side is a sum of d products, off by at most d * u * sum|terms| (u = 2^-53);
    both sides are bounded by sum_i |q_i| max(|min_i|, |max_i|) =: A, so a slack of 2 d u A suffices.
    """
    kmin, kmax = metadata(k, page_size)
    bound = page_scores(q, kmin, kmax)
    h_q, d = q.shape
    kv = core.kv_head_of(h_q, k.shape[0])
    u = np.finfo(float).eps / 2
    for h in range(h_q):
        exact = k[kv[h]] @ q[h]
        for j, s in enumerate(exact):
            p = j // page_size
            a = np.abs(q[h]) @ np.maximum(np.abs(kmin[kv[h], p]), np.abs(kmax[kv[h], p]))
            assert s <= bound[h, p] + 2 * d * u * a, (h, j, s, bound[h, p])


def exact_topk_selection(q, k, budget):
    top = core.topk_indices(core.logits(q, k), budget)
    return Selection(tuple(np.sort(r) for r in top), k.shape[1])


def test_registered_dynamic():
    registry.load_all()
    assert registry.get("quest").oracle is Quest and Quest.family == "dynamic"
    assert set(Quest.presets()) == {"canonical", "quest-accuracy", "quest-kernel", "twilight-quest"}


@pytest.mark.parametrize("n", [16, 17, 31, 5])  # n mod P in {0, 1, P-1} and n < P
def test_metadata_covers_only_filled_tokens(n):
    rng = np.random.default_rng(n)
    k = -np.abs(rng.standard_normal((2, n, 4))) - 1.0     # all negative: a zero pad would win the max
    lo, hi = page_metadata(k, 16)
    blo, bhi = brute_metadata(k, 16)
    np.testing.assert_array_equal(lo, blo)
    np.testing.assert_array_equal(hi, bhi)
    assert (hi < 0).all()


@given(inp=decode_inputs(max_n=70, max_h_kv=2, max_group=2, head_dims=(1, 2, 4, 8, 16)), page_size=PAGE_SIZES)
def test_page_score_is_an_upper_bound(inp, page_size):
    assert_upper_bound(inp.q, inp.k, page_size)


def test_planted_bug_is_caught():
    """Metadata whose max is taken over each page's first token only is caught by the bound check."""
    def first_token_max(k, page_size):
        lo, _ = page_metadata(k, page_size)
        return lo, k[:, ::page_size]
    k = np.array([[[0.0], [1.0], [3.0]]])
    q = np.array([[1.0]])
    assert_upper_bound(q, k, 4)
    with pytest.raises(AssertionError):
        assert_upper_bound(q, k, 4, metadata=first_token_max)


def test_zero_padding_only_loosens_the_bound():
    """A zero-padded partial page keeps a valid bound but a wrong (too high) score: pad with +-inf."""
    k = -np.ones((1, 3, 1))
    padded_max = np.concatenate([k, np.zeros((1, 1, 1))], axis=1).max(axis=1, keepdims=True)
    assert page_scores(np.array([[1.0]]), page_metadata(k, 4)[0], padded_max)[0, 0] == 0.0
    assert page_scores(np.array([[1.0]]), *page_metadata(k, 4))[0, 0] == -1.0


@given(inp=decode_inputs(max_n=60, max_h_kv=2, max_group=3), data=st.data())
@example(inp=make_decode_input(2, 1, 9, 4, "near_ties", 3), data=None)
def test_page_size_one_is_exact_topk(inp, data):
    n = inp.k.shape[1]
    budget = data.draw(st.integers(1, max(1, n - 1))) if data is not None else 4
    sel = Quest(token_budget=budget, page_size=1).select(inp.q, inp.k, inp.v)
    assert sel == exact_topk_selection(inp.q, inp.k, min(budget, n))


@given(inp=decode_inputs(max_n=60, max_h_kv=2, max_group=2), page_size=PAGE_SIZES, data=st.data())
def test_budget_covering_context_is_dense(inp, page_size, data):
    n = inp.k.shape[1]
    budget = data.draw(st.integers(n, 2 * n + 1))
    res = Quest(token_budget=budget, page_size=page_size).step(inp.q, inp.k, inp.v)
    assert res.selection == Selection.full(inp.q.shape[0], n)
    np.testing.assert_allclose(res.output, core.attend_dense(inp.q, inp.k, inp.v), rtol=1e-12, atol=1e-12)
    assert res.traffic.get("hbm", "metadata") == 0
    # the kernel path is dense once its page budget covers every page
    pages = -(-n // page_size)
    kernel = Quest(token_budget=pages * page_size, page_size=page_size, last_page="always",
                   dense_if_budget_covers=False)
    assert kernel.select(inp.q, inp.k, inp.v) == Selection.full(inp.q.shape[0], n)


def page_edges(page_size, below):
    """Values around the page size P, 1 <= x < below: 1, 2, P-1, P, P+1, 2P-1, 2P, 2P+1."""
    p = page_size
    return sorted({x for x in (1, 2, p - 1, p, p + 1, 2 * p - 1, 2 * p, 2 * p + 1) if 1 <= x < below})


# n and budget by regime, so each is reached in every profile (the ci profile's 30 derandomized
# examples of one mixed strategy need not reach n < P): n < P; budget < P < n; both drawn from the
# edges around P (partial last page, a budget of exactly one page); anywhere (budget < n throughout).
QUEST_REGIMES = ("n<P", "B<P<n", "edges", "any")


@pytest.mark.parametrize("regime", QUEST_REGIMES)
@given(page_size=st.sampled_from([3, 4, 8, 16]), data=st.data())
def test_page_counts_and_last_page_rules(regime, page_size, data):
    """Budget < page size, partial last page and n < page size included."""
    p_ = page_size
    if regime == "n<P":
        n = data.draw(st.integers(2, p_ - 1), label="n")
        budget = data.draw(st.integers(1, n - 1), label="budget")
    elif regime == "B<P<n":
        n = data.draw(st.one_of(st.sampled_from(page_edges(p_, 81)[-4:]), st.integers(p_ + 1, 80)), label="n")
        budget = data.draw(st.one_of(st.sampled_from(page_edges(p_, p_)), st.integers(1, p_ - 1)), label="budget")
    elif regime == "edges":
        n = data.draw(st.sampled_from(page_edges(p_, 81)[1:]), label="n")
        budget = data.draw(st.sampled_from(page_edges(p_, n)), label="budget")
    else:
        n = data.draw(st.integers(2, 80), label="n")
        budget = data.draw(st.integers(1, n - 1), label="budget")
    inp = data.draw(decode_inputs(n=n, max_h_kv=2, max_group=2), label="inp")
    assert budget < n
    pages = -(-n // page_size)
    floor_pages = max(1, budget // page_size)
    lo, hi = brute_metadata(inp.k, page_size)
    kv = core.kv_head_of(inp.q.shape[0], inp.k.shape[0])
    for h, ix in enumerate(Quest(token_budget=budget, page_size=page_size).select(inp.q, inp.k, inp.v).indices):
        chosen = np.unique(ix // page_size)
        assert chosen.size == min(floor_pages, pages)
        bound = np.maximum(inp.q[h] * lo[kv[h]], inp.q[h] * hi[kv[h]]).sum(axis=1)
        others = np.setdiff1d(np.arange(pages), chosen)
        if others.size:   # chosen pages score at least as high as every other (up to rounding of d terms)
            assert bound[chosen].min() >= bound[others].max() - 1e-9 * (1 + np.abs(bound).max())
        np.testing.assert_array_equal(ix, [t for p in chosen for t in range(p * page_size, min(n, (p + 1) * page_size))])
    kernel = Quest(token_budget=budget, page_size=page_size, last_page="always", dense_if_budget_covers=False)
    sel = kernel.select(inp.q, inp.k, inp.v)
    for ix in sel.indices:
        chosen = np.unique(ix // page_size)
        if pages <= floor_pages:
            assert chosen.size == pages
        else:
            assert chosen.size == floor_pages and chosen[-1] == pages - 1
            # the others are the best of the first pages - 1 by their bound
    acc = Quest(token_budget=budget, page_size=page_size, min_pages=3, dense_if_budget_covers=False,
                cap_budget_at_n=True)
    for ix in acc.select(inp.q, inp.k, inp.v).indices:
        assert np.unique(ix // page_size).size == min(max(3, min(n, budget) // page_size), pages)


def test_kernel_path_picks_the_best_earlier_pages_plus_the_last():
    # 4 pages of 2 tokens, d = 1, q = 1: page bounds are the page maxima 5, 1, 9, 0 (last page partial)
    k = np.array([[[5.0], [0.0], [1.0], [1.0], [9.0], [2.0], [0.0]]])
    q, v = np.array([[1.0]]), np.zeros_like(k)
    sel = Quest(token_budget=4, page_size=2, last_page="always", dense_if_budget_covers=False).select(q, k, v)
    assert list(sel.indices[0]) == [4, 5, 6]        # page budget 2 = best of pages 0..2 (page 2) + last page 3
    sel = Quest(token_budget=4, page_size=2).select(q, k, v)
    assert list(sel.indices[0]) == [0, 1, 4, 5]     # canonical: pages 2 and 0, the last page competes


def test_ties_between_pages_lower_page_wins():
    k = np.array([[[1.0], [1.0], [1.0], [1.0], [1.0], [1.0]]])   # three identical pages of 2
    sel = Quest(token_budget=2, page_size=2).select(np.array([[1.0]]), k, np.zeros_like(k))
    assert list(sel.indices[0]) == [0, 1]


def test_accuracy_preset_drops_a_page_when_budget_covers_context():
    """evaluation/quest_attention.py: pages = min(max(3, min(n, B)//P), ceil(n/P)) -> 6 of 7 pages at n = 100."""
    inp = make_decode_input(2, 1, 100, 8, "gaussian", 0)
    sel = Quest.presets()["quest-accuracy"].select(inp.q, inp.k, inp.v)
    assert all(np.unique(ix // 16).size == 6 for ix in sel.indices)
    assert Quest().select(inp.q, inp.k, inp.v) == Selection.full(2, 100)


def test_dense_first_layers():
    inp = make_decode_input(4, 2, 50, 8, "gaussian", 1)
    for layer, dense in [(0, True), (1, True), (2, False), (None, False)]:
        res = Quest(token_budget=16, page_size=4, layer=layer).step(inp.q, inp.k, inp.v)
        assert (res.selection == Selection.full(4, 50)) == dense
        assert (res.traffic.get("hbm", "metadata") == 0) == dense


def test_traffic_hand_count():
    # H_q = 4, H_kv = 2, n = 40, P = 16 -> 3 pages (last holds 8), d = 8, fp16: a metadata row is 16 B
    inp = make_decode_input(4, 2, 40, 8, "gaussian", 2)
    res = Quest(token_budget=16, page_size=16).step(inp.q, inp.k, inp.v)
    assert res.traffic.get("hbm", "metadata") == 2 * 3 * 16 * 2          # min+max, 3 pages, 16 B, 2 KV heads
    assert res.traffic.get("hbm", "keys") == kv_traffic(res.selection, 2, 8, Layout()).get("hbm", "keys")
    per_query = Layout(share_kv_heads=False)
    res = Quest(token_budget=16, page_size=16).step(inp.q, inp.k, inp.v, layout=per_query)
    assert res.traffic.get("hbm", "metadata") == 2 * 3 * 16 * 4          # once per query head
    assert res.traffic.get("hbm", "keys") == sum(ix.size for ix in res.selection.indices) * 16
    res = Quest(token_budget=16, page_size=16, last_page="always", dense_if_budget_covers=False).step(
        inp.q, inp.k, inp.v)
    assert res.traffic.get("hbm", "metadata") == 2 * 2 * 16 * 2          # the last page is not scored


def test_bad_arguments():
    with pytest.raises(ValueError, match="last_page"):
        Quest(last_page="first")
    with pytest.raises(ValueError, match="budget_rounding"):
        Quest(budget_rounding="nearest")
    with pytest.raises(TypeError, match="token_budget"):
        Quest(token_budget=1.5)
    with pytest.raises(ValueError, match="page_size"):
        page_metadata(np.zeros((1, 4, 2)), 0)
