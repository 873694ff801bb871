"""Numba kernels of the structural methods against their oracles, by the FlashAttention tolerance rule
(``property_tests/tolerances.py``): absorbed MLA decode, dequantize-on-read attention, head-masked attention."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvsparse import registry
from kvsparse.kernels.numba.deja_vu import deja_vu, head_masked_attention
from kvsparse.kernels.numba.kv_quant import kv_quant
from kvsparse.kernels.numba.mla import mla, mla_decode
from kvsparse.oracle.deja_vu import DejaVu
from kvsparse.oracle.kv_quant import KVQuant
from kvsparse.oracle.mla import MLA, absorbed_view, random_weights
from kvsparse.property_tests.strategies import decode_inputs
from kvsparse.property_tests.tolerances import check_attention_output, round_to

DTYPES = ["float32", "float64"]


def mla_case(seed, heads, r, dr, n, dtype):
    """The absorbed view of a random MLA layer, rounded to ``dtype`` (the kernel's inputs)."""
    rng = np.random.default_rng(seed)
    w = random_weights(rng, heads, r, 8, 8)
    q, k, v = absorbed_view(w, rng.standard_normal((heads, 8)), rng.standard_normal((heads, dr)),
                            rng.standard_normal((n, r)), rng.standard_normal((n, dr)))
    q, k = round_to(q, dtype), round_to(k, dtype)
    v = np.concatenate([k[..., :r], np.zeros_like(k[..., r:])], axis=-1)
    return MLA(heads=heads, latent_dim=r, rope_dim=dr, nope_dim=8, v_dim=8), q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**32 - 1), heads=st.integers(1, 8), r=st.integers(1, 40),
       dr=st.sampled_from([0, 2, 8]), n=st.integers(1, 120))
def test_mla_kernel_matches_oracle(dtype, seed, heads, r, dr, n):
    m, q, k, v = mla_case(seed, heads, r, dr, n, dtype)
    got, idx = mla(m, q.astype(dtype), k.astype(dtype), v.astype(dtype))
    check = check_attention_output(got, q, k, v, dtype, scale=m.default_scale)
    assert check.ok, check
    assert np.array_equal(np.asarray(idx)[0], np.arange(n))


def test_mla_tolerance_catches_a_planted_bug():
    """Dropping the RoPE half of the logits exceeds the tolerance."""
    m, q, k, v = mla_case(5, 4, 16, 8, 64, "float32")
    r = 16
    bad, _ = mla_decode(q[:, :r].astype(np.float32), np.zeros((4, 8), np.float32), k[0, :, :r].astype(np.float32),
                        k[0, :, r:].astype(np.float32), scale=m.default_scale)
    got = np.concatenate([bad, np.zeros((4, 8), np.float32)], axis=1)
    assert not check_attention_output(got, q, k, v, "float32", scale=m.default_scale).ok


def test_mla_up_projection_and_empty_cache():
    rng = np.random.default_rng(0)
    w = random_weights(rng, 2, 6, 4, 3)
    o, o_lat, _ = mla_decode(rng.standard_normal((2, 6)), rng.standard_normal((2, 2)), rng.standard_normal((5, 6)),
                             rng.standard_normal((5, 2)), scale=0.5, w_uv=w.w_uv)
    np.testing.assert_allclose(o, np.einsum("hdr,hr->hd", w.w_uv, o_lat), rtol=1e-13)
    out, lse = mla_decode(np.ones((2, 6)), np.ones((2, 2)), np.zeros((0, 6)), np.zeros((0, 2)), scale=0.5)
    assert not out.any() and np.all(lse == -np.inf)


def quant_bases():
    bases = [None, dataclasses.replace(registry.oracle("quest"), token_budget=24, page_size=4)]
    if "sliding_window" in registry.entries() and registry.get("sliding_window").oracle is not None:
        bases.append(registry.oracle("sliding_window"))
    return bases


@pytest.mark.parametrize("base", quant_bases(), ids=lambda b: "dense" if b is None else b.name)
@pytest.mark.parametrize("dtype", DTYPES)
@given(inp=decode_inputs(max_n=80, head_dims=(4, 8, 16)), preset=st.sampled_from(sorted(KVQuant.presets())),
       residual=st.integers(0, 12))
def test_dequantize_on_read_kernel_matches_oracle(base, dtype, inp, preset, residual):
    m = KVQuant.presets()[preset]
    residual = max(32, residual * 32) if m.residual_rule == "kivi" else residual
    m = dataclasses.replace(m, base=base, residual=residual, scale_dtype="float32" if dtype == "float32" else m.scale_dtype)
    q, k, v = (round_to(x, dtype) for x in (inp.q, inp.k, inp.v))
    step = m.step(q, k, v, positions=np.arange(k.shape[1]))
    kh, vh = m.dequantized(k, v)
    got, idx = kv_quant(m, q.astype(dtype), k.astype(dtype), v.astype(dtype), positions=np.arange(k.shape[1]))
    assert [list(a) for a in idx] == [list(a) for a in step.selection.indices]
    check = check_attention_output(got, q, kh, vh, dtype, mask=step.selection.mask())
    assert check.ok, check


def test_quant_tolerance_catches_a_planted_bug():
    """Attending over the unquantized cache instead of the dequantized one exceeds the tolerance (int2)."""
    from kvsparse.property_tests.strategies import make_decode_input
    inp = make_decode_input(4, 2, 60, 8, seed=2)
    m = KVQuant(key_bits=2, value_bits=2, scale_dtype="float32")
    q, k, v = (round_to(x, "float32") for x in (inp.q, inp.k, inp.v))
    kh, vh = m.dequantized(k, v)
    from kvsparse.kernels.numba.attention import dense_attention
    wrong, _ = dense_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert not check_attention_output(wrong, q, kh, vh, "float32").ok
    assert check_attention_output(kv_quant(m, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))[0],
                                  q, kh, vh, "float32").ok


@pytest.mark.parametrize("dtype", DTYPES)
@given(inp=decode_inputs(max_n=100), data=st.data())
def test_head_masked_kernel_matches_oracle(dtype, inp, data):
    h_q = inp.q.shape[0]
    mask = tuple(data.draw(st.lists(st.booleans(), min_size=h_q, max_size=h_q)))
    q, k, v = (round_to(x, dtype) for x in (inp.q, inp.k, inp.v))
    m = DejaVu(head_mask=mask)
    step = m.step(q, k, v)
    got, idx = deja_vu(m, q.astype(dtype), k.astype(dtype), v.astype(dtype))
    assert [len(a) for a in idx] == list(step.selection.sizes)
    check = check_attention_output(got, q, k, v, dtype, mask=step.selection.mask())
    assert check.ok, check
    assert not np.asarray(got)[~np.array(mask, dtype=bool)].any()


@given(inp=decode_inputs(max_n=60, families=("gaussian", "heavy_tails")))
def test_head_masked_kernel_oracle_predictor(inp):
    """float64: the kernel's own oracle predictor keeps the same heads (no near-ties in these families)."""
    m = DejaVu()
    got, idx = deja_vu(m, inp.q, inp.k, inp.v)
    assert [len(a) for a in idx] == list(m.step(inp.q, inp.k, inp.v).selection.sizes)
    np.testing.assert_allclose(got, m.step(inp.q, inp.k, inp.v).output, rtol=1e-12, atol=1e-12)


def test_head_masked_tolerance_catches_a_planted_bug():
    """Computing a skipped head (dense output everywhere) is caught."""
    from kvsparse.property_tests.strategies import make_decode_input
    inp = make_decode_input(4, 2, 30, 8, seed=1)
    keep = np.array([True, False, True, False])
    wrong, _ = head_masked_attention(inp.q, inp.k, inp.v, np.ones(4, bool))
    assert not check_attention_output(wrong, inp.q, inp.k, inp.v, "float64",
                                      mask=np.repeat(keep[:, None], 30, axis=1)).ok
