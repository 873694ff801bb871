"""Triton split-K sparse decode attention against the float64 oracle, under the FlashAttention
tolerance rule. On a machine without a GPU the kernels run under TRITON_INTERPRET=1."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")   # tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU

from kvsparse.kernels.triton.attention import decode_attention_indices, decode_attention_pages, dense_decode  # noqa: E402
from kvsparse.oracle import core  # noqa: E402
from kvsparse.property_tests import tolerances  # noqa: E402
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def as_torch(x, dtype):
    return torch.tensor(np.asarray(x), dtype=TORCH_DTYPES[dtype], device=DEVICE)


@settings(max_examples=15)
@given(decode_inputs(max_n=120, max_h_kv=2, max_group=4, head_dims=(4, 16, 64),
                     families=("gaussian", "huge_logits", "sink_and_local", "outlier_channels")),
       st.sampled_from(list(TORCH_DTYPES)), st.integers(1, 5))
def test_dense_decode_within_flash_attention_tolerance(x, dtype, splits):
    out, _ = dense_decode(as_torch(x.q, dtype), as_torch(x.k, dtype), as_torch(x.v, dtype), num_splits=splits)
    check = tolerances.check_attention_output(out.float().cpu().numpy(), x.q, x.k, x.v, dtype)
    assert check.ok, check


@settings(max_examples=15)
@given(decode_inputs(max_n=100, max_h_kv=2, max_group=3, head_dims=(8, 32)), st.booleans(), st.booleans(),
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
