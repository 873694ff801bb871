"""Triton split-K sparse decode attention against the float64 oracle, under the FlashAttention
tolerance rule. On a machine without a GPU the kernels run under TRITON_INTERPRET=1."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")   # tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU

from kvsparse.kernels.triton.attention import (decode_attention_indices, decode_attention_page_list,  # noqa: E402
                                              decode_attention_pages, dense_decode)
from kvsparse.oracle import core  # noqa: E402
from kvsparse.property_tests import tolerances  # noqa: E402
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU the same tests run natively on larger shapes (issue 9); the interpreter keeps them small.
BIG = 16 if DEVICE == "cuda" else 1
GPU_DIMS = (128,) if DEVICE == "cuda" else ()
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def as_torch(x, dtype):
    return torch.tensor(np.asarray(x), dtype=TORCH_DTYPES[dtype], device=DEVICE)


@settings(max_examples=15 * min(BIG, 4))
@given(decode_inputs(max_n=120 * BIG, max_h_kv=2 * min(BIG, 4), max_group=4, head_dims=(4, 16, 64) + GPU_DIMS,
                     families=("gaussian", "huge_logits", "sink_and_local", "outlier_channels")),
       st.sampled_from(list(TORCH_DTYPES)), st.integers(1, 5))
def test_dense_decode_within_flash_attention_tolerance(x, dtype, splits):
    out, _ = dense_decode(as_torch(x.q, dtype), as_torch(x.k, dtype), as_torch(x.v, dtype), num_splits=splits)
    check = tolerances.check_attention_output(out.float().cpu().numpy(), x.q, x.k, x.v, dtype)
    assert check.ok, check


@settings(max_examples=15 * min(BIG, 4))
@given(decode_inputs(max_n=100 * BIG, max_h_kv=2, max_group=3, head_dims=(8, 32) + GPU_DIMS), st.booleans(), st.booleans(),
       st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_index_lists_with_lengths_and_weights_match_the_oracle(x, per_kv_head, weighted, splits, seed):
    rng = np.random.default_rng(seed)
    h_q, n = x.q.shape[0], x.k.shape[1]
    rows = x.k.shape[0] if per_kv_head else h_q
    width = rng.integers(1, n + 1)
    idx = np.stack([rng.permutation(n)[:width] for _ in range(rows)])
    lengths = rng.integers(0, width + 1, size=rows)
    w = rng.uniform(0.1, 5.0, size=idx.shape)
    out, lse = decode_attention_indices(as_torch(x.q, "float32"), as_torch(x.k, "float32"), as_torch(x.v, "float32"),
                                        torch.tensor(idx), torch.tensor(lengths),
                                        torch.tensor(w) if weighted else None, num_splits=splits)
    g = h_q // x.k.shape[0]
    row_of = (lambda h: h // g) if per_kv_head else (lambda h: h)
    sets = [idx[row_of(h), : lengths[row_of(h)]] for h in range(h_q)]
    weights = [w[row_of(h), : lengths[row_of(h)]] for h in range(h_q)] if weighted else None
    ref = core.attend_indices_partial(x.q, x.k, x.v, sets, weights)
    mask = np.zeros((h_q, n), bool)
    for h, s in enumerate(sets):
        mask[h, s] = True
    if not weighted:
        check = tolerances.check_attention_output(out.cpu().numpy(), x.q, x.k, x.v, "float32", mask=mask)
        assert check.ok, check
    else:
        assert np.allclose(out.cpu().numpy(), ref.out, atol=1e-4, rtol=1e-4)
    assert np.array_equal(np.isfinite(lse.cpu().numpy()), np.isfinite(ref.lse))
    fin = np.isfinite(ref.lse)
    assert np.allclose(lse.cpu().numpy()[fin], ref.lse[fin], atol=1e-4)
    assert np.array_equal(out.cpu().numpy()[~fin], np.zeros(((~fin).sum(), x.q.shape[1])))


@pytest.mark.parametrize("n,page", [(37, 16), (64, 16), (5, 16), (100, 32)])
def test_paged_layout_reads_whole_pages_but_never_the_unfilled_tail(n, page):
    x = make_decode_input(4, 2, n, 16, "gaussian", seed=n)
    rng = np.random.default_rng(n)
    n_pages = -(-n // page)
    perm = rng.permutation(n_pages + 2)[:n_pages]            # scattered physical pages
    kp = np.full((n_pages + 2, page, 2, 16), 1e3)           # garbage in unfilled slots must never be read
    vp = np.full_like(kp, 1e3)
    for lp in range(n_pages):
        m = min(n, (lp + 1) * page) - lp * page
        kp[perm[lp], :m] = x.k[:, lp * page: lp * page + m].transpose(1, 0, 2)
        vp[perm[lp], :m] = x.v[:, lp * page: lp * page + m].transpose(1, 0, 2)
    width = max(1, n_pages // 2)
    pages = np.stack([np.sort(rng.permutation(n_pages)[:width]) for _ in range(2)])
    if n_pages - 1 not in pages[0]:
        pages[0, 0] = n_pages - 1                             # the partial last page is selected
    out, _ = decode_attention_pages(as_torch(x.q, "float32"), as_torch(kp, "float32"), as_torch(vp, "float32"),
                                    torch.tensor(perm), torch.tensor(pages), None, n)
    sets = [np.unique(np.concatenate([np.arange(p * page, min(n, (p + 1) * page)) for p in pages[h // 2]]))
            for h in range(4)]
    ref = core.attend_indices(x.q, x.k, x.v, sets)
    assert np.allclose(out.cpu().numpy(), ref, atol=1e-5)


def test_planted_bug_is_caught_by_the_tolerance_rule():
    x = make_decode_input(4, 2, 64, 16, "sink_and_local", seed=1)
    out, _ = dense_decode(as_torch(x.q, "float16"), as_torch(x.k, "float16"), as_torch(x.v, "float16"), scale=1.0)
    assert not tolerances.check_attention_output(out.float().cpu().numpy(), x.q, x.k, x.v, "float16").ok


def test_bad_inputs_raise_named_errors():
    x = make_decode_input(4, 2, 8, 4)
    q, k, v = (as_torch(a, "float32") for a in (x.q, x.k, x.v))
    with pytest.raises(TypeError, match="q must be float16"):
        dense_decode(q.double(), k, v)
    with pytest.raises(ValueError, match="indices must be"):
        decode_attention_indices(q, k, v, torch.zeros((3, 2), dtype=torch.int32))
    with pytest.raises(ValueError, match="lengths must lie"):
        decode_attention_indices(q, k, v, torch.zeros((2, 2), dtype=torch.int32), torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="divisible"):
        dense_decode(q[:3], k, v)


# --- group unions (one list per KV head, a bit per query head), page lists, checked launches -----------

def _union_with_bits(sets, h_kv):
    """Per-query-head index sets as one ascending list per KV head and its head bits (NumPy, by hand)."""
    g = len(sets) // h_kv
    width = max(1, max(len(np.unique(np.concatenate([sets[r * g + j] for j in range(g)]))) for r in range(h_kv)))
    idx = np.zeros((h_kv, width), np.int64)
    bits = np.zeros((h_kv, width), np.int64)
    lengths = np.zeros(h_kv, np.int64)
    for r in range(h_kv):
        union = np.unique(np.concatenate([sets[r * g + j] for j in range(g)]))
        lengths[r] = len(union)
        idx[r, : len(union)] = union
        for j in range(g):
            bits[r, : len(union)] |= np.isin(union, sets[r * g + j]).astype(np.int64) << j
    return idx, lengths, bits


@settings(max_examples=12 * min(BIG, 4))
@given(decode_inputs(max_n=90 * BIG, max_h_kv=2, max_group=4, head_dims=(8, 16, 32) + GPU_DIMS,
                     families=("gaussian", "huge_logits", "sink_and_local")),
       st.sampled_from(list(TORCH_DTYPES)), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_group_union_with_head_bits_is_attention_over_each_heads_own_set(x, dtype, splits, seed):
    rng = np.random.default_rng(seed)
    h_q, h_kv, n = x.q.shape[0], x.k.shape[0], x.k.shape[1]
    sets = [np.sort(rng.permutation(n)[: rng.integers(0, n + 1)]) for _ in range(h_q)]
    idx, lengths, bits = _union_with_bits(sets, h_kv)
    out, lse = decode_attention_indices(as_torch(x.q, dtype), as_torch(x.k, dtype), as_torch(x.v, dtype),
                                        torch.tensor(idx), torch.tensor(lengths), heads=torch.tensor(bits),
                                        num_splits=splits)
    mask = np.zeros((h_q, n), bool)
    for h, s in enumerate(sets):
        mask[h, s] = True
    empty = ~mask.any(axis=1)
    got = out.float().cpu().numpy()
    assert np.array_equal(got[empty], np.zeros((empty.sum(), x.q.shape[1])))   # no token: 0, not NaN
    assert np.array_equal(np.isinf(lse.cpu().numpy()), empty)
    # the rule on every row with a set; an empty row (checked above) is given the reference's value
    full = np.where(empty[:, None], True, mask)
    ref = tolerances.reference_on_rounded(x.q, x.k, x.v, dtype, mask=full)
    check = tolerances.check_attention_output(np.where(empty[:, None], ref, got), x.q, x.k, x.v, dtype, mask=full)
    assert check.ok, check


def test_head_bits_of_the_wrong_head_are_caught():
    """Planted bug: every list attended by the group's first head only (bits shifted away)."""
    x = make_decode_input(4, 1, 64, 16, "sink_and_local", seed=3)
    rng = np.random.default_rng(3)
    sets = [np.sort(rng.permutation(64)[:20]) for _ in range(4)]
    idx, lengths, bits = _union_with_bits(sets, 1)
    mask = np.zeros((4, 64), bool)
    for h, s in enumerate(sets):
        mask[h, s] = True
    args = (as_torch(x.q, "float16"), as_torch(x.k, "float16"), as_torch(x.v, "float16"), torch.tensor(idx),
            torch.tensor(lengths))
    good, _ = decode_attention_indices(*args, heads=torch.tensor(bits))
    assert tolerances.check_attention_output(good.float().numpy(), x.q, x.k, x.v, "float16", mask=mask).ok
    wrong, _ = decode_attention_indices(*args, heads=torch.tensor(np.where(bits & 1, 15, 0)))
    assert not tolerances.check_attention_output(wrong.float().numpy(), x.q, x.k, x.v, "float16", mask=mask).ok


@pytest.mark.parametrize("n,page,per_kv_head", [(37, 16, True), (37, 16, False), (64, 16, True), (5, 16, False),
                                                (100, 32, True), (50, 10, True)])
def test_page_lists_on_a_contiguous_cache_cut_the_last_page_at_n(n, page, per_kv_head):
    x = make_decode_input(4, 2, n, 16, "gaussian", seed=n + page)
    rng = np.random.default_rng(n)
    n_pages = -(-n // page)
    rows = 2 if per_kv_head else 4
    width = max(1, (n_pages + 1) // 2)
    pages = np.stack([np.sort(rng.permutation(n_pages)[:width]) for _ in range(rows)])
    pages[0, -1] = n_pages - 1 if n_pages - 1 not in pages[0] else pages[0, -1]   # the partial last page
    counts = rng.integers(0, width + 1, size=rows)
    out, _ = decode_attention_page_list(as_torch(x.q, "float32"), as_torch(x.k, "float32"), as_torch(x.v, "float32"),
                                        torch.tensor(pages), torch.tensor(counts), page_size=page)
    g_row = (lambda h: h // 2) if per_kv_head else (lambda h: h)
    sets = [np.concatenate([np.arange(p * page, min(n, (p + 1) * page)) for p in pages[g_row(h), : counts[g_row(h)]]]
                           + [np.zeros(0, np.int64)]) for h in range(4)]
    ref = core.attend_indices_partial(x.q, x.k, x.v, sets)
    assert np.allclose(out.numpy(), ref.out, atol=1e-5)


def test_checked_launches_refuse_bad_lists_by_name():
    x = make_decode_input(4, 2, 8, 16)
    q, k, v = (as_torch(a, "float32") for a in (x.q, x.k, x.v))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\)"):
        decode_attention_indices(q, k, v, torch.tensor([[0, 8], [1, 2]]))
    with pytest.raises(ValueError, match="unique"):
        decode_attention_indices(q, k, v, torch.tensor([[3, 3], [1, 2]]))
    # a repeat past lengths[r] is padding, not a duplicate
    decode_attention_indices(q, k, v, torch.tensor([[3, 3], [1, 2]]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="bits 0..1"):
        decode_attention_indices(q, k, v, torch.tensor([[0, 1], [1, 2]]), heads=torch.tensor([[1, 4], [3, 3]]))
    with pytest.raises(ValueError, match="one list per KV head"):
        decode_attention_indices(q, k, v, torch.zeros((4, 2), dtype=torch.int32), heads=torch.ones((4, 2)))
    with pytest.raises(ValueError, match=r"pages must lie in \[0, 1\)"):
        decode_attention_page_list(q, k, v, torch.tensor([[0], [1]]), page_size=8)
    with pytest.raises(TypeError, match="share one dtype"):
        dense_decode(q, k.half(), v)


def test_fp16_logits_beyond_the_dtype_range_still_get_a_finite_tolerance():
    """Outlier channels at d = 128 and scale 2: q.k * scale exceeds float16's 65504, so PyTorch's naive
    float16 attention is NaN there. The rule keeps those logits in float32 and stays finite: the split-K
    kernel (fp32 logits) passes and a kernel with a wrong scale (2 / 1000: nearly uniform weights
    instead of nearly one-hot ones) fails."""
    x = make_decode_input(4, 2, 64, 128, "outlier_channels", seed=0)
    s = np.einsum("hgd,hnd->hgn", x.q.reshape(2, 2, 128), x.k) * 2.0
    assert np.abs(s).max() > 65504
    tol = tolerances.attention_tolerance(x.q, x.k, x.v, "float16", scale=2.0)
    assert np.isfinite(tol)
    args = (as_torch(x.q, "float16"), as_torch(x.k, "float16"), as_torch(x.v, "float16"))
    out, _ = dense_decode(*args, scale=2.0)
    check = tolerances.check_attention_output(out.float().cpu().numpy(), x.q, x.k, x.v, "float16", scale=2.0)
    assert check.ok, check
    wrong, _ = dense_decode(*args, scale=2.0 / 1000)
    assert not tolerances.check_attention_output(wrong.float().cpu().numpy(), x.q, x.k, x.v, "float16", scale=2.0).ok
