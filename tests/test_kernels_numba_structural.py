"""Numba kernels of the structural methods against their oracles, by the FlashAttention tolerance rule
(``property_tests/tolerances.py``): absorbed MLA decode, dequantize-on-read attention (over every
composable base), head-masked attention, CLA over the producer's cache, LoRC from its latents."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvsparse import registry
from kvsparse.oracle import core
from kvsparse.kernels.numba.cla import cla, cla_decode_layers
from kvsparse.kernels.numba.deja_vu import deja_vu, head_masked_attention
from kvsparse.kernels.numba.kv_quant import kv_quant
from kvsparse.kernels.numba.lorc import lorc, lorc_attention
from kvsparse.kernels.numba.mla import mla, mla_decode
from kvsparse.oracle.cla import CLA, decode_layers
from kvsparse.oracle.deja_vu import DejaVu
from kvsparse.oracle.kv_quant import KVQuant
from kvsparse.oracle.lorc import LoRC, LowRankKV
from kvsparse.oracle.mla import MLA, absorbed_view, random_weights
from kvsparse.property_tests.strategies import decode_inputs
from kvsparse.property_tests.tolerances import (ToleranceCheck, attention_tolerance, check_attention_output, dtype_eps,
                                                reference_on_rounded, round_to)

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
    """Dense and every stateless base a quantized cache composes with, at small budgets."""
    from kvsparse.oracle.twilight import Twilight
    small = {"quest": dict(token_budget=24, page_size=4), "sliding_window": dict(window=12),
             "bigbird": dict(block_size=4), "longformer": dict(window=8), "double_sparsity": dict(r=2, token_budget=10),
             "sparq": dict(k=6), "retrieval_attention": dict(sinks=2, window=8, top_k=5),
             "vattention": dict(sinks=2, local=4, heavy=4), "deja_vu": dict(), "cla": dict(layer=1)}
    bases = [None] + [dataclasses.replace(registry.oracle(name), **kw) for name, kw in small.items()]
    return bases + [Twilight(base=bases[1])]


def check_quantized_step(got, m, q, k, v, dtype):
    """The kernel's output against the composed oracle on the dequantized cache, by the tolerance rule:
    attention over the selection (with the estimator's weights, if any); for SparQ the mix
    ``alpha * y + (1 - alpha) * mean(V)``, whose error is alpha times y's plus its own roundings."""
    sel = m.select(q, k, v, positions=np.arange(k.shape[1]))   # the base's choice on the dequantized cache
    kh, vh = m.dequantized(k, v)
    weights = None
    if sel.weights is not None:
        weights = np.zeros((sel.h_q, sel.n))
        for h, (ix, w) in enumerate(zip(sel.indices, sel.weights)):
            weights[h, ix] = w
    mask = sel.mask() if weights is None else None
    ref = reference_on_rounded(q, kh, vh, dtype, mask=mask, weights=weights)
    tol = attention_tolerance(q, kh, vh, dtype, mask=mask, weights=weights)
    if m.base is not None and m.base.name == "sparq" and m.base.reallocate:
        approx = m.base.approximate(q, kh)
        if not approx.dense:
            alpha = m.base.alpha(approx)[:, None]
            mean_v = core.expand_kv(vh.mean(axis=1), q.shape[0])
            y_max = max(float(np.abs(ref).max(initial=0.0)), float(np.abs(mean_v).max(initial=0.0)))
            ref = alpha * ref + (1 - alpha) * mean_v
            tol = float(alpha.max()) * tol + dtype_eps(dtype) * float(np.abs(ref).max()) + 4 * dtype_eps("float64") * y_max
    return sel, ToleranceCheck(float(np.max(np.abs(np.asarray(got, np.float64) - ref), initial=0.0)), tol)


def quant_case(base, dtype, inp, preset, residual):
    m = KVQuant.presets()[preset]
    residual = max(32, residual * 32) if m.residual_rule == "kivi" else residual
    m = dataclasses.replace(m, base=base, residual=residual, scale_dtype="float32" if dtype == "float32" else m.scale_dtype)
    return m, *(round_to(x, dtype) for x in (inp.q, inp.k, inp.v))


@pytest.mark.parametrize("base", quant_bases(), ids=lambda b: "dense" if b is None else b.name)
@pytest.mark.parametrize("dtype", DTYPES)
@given(inp=decode_inputs(max_n=80, head_dims=(4, 8, 16)), preset=st.sampled_from(sorted(KVQuant.presets())),
       residual=st.integers(0, 12))
def test_dequantize_on_read_kernel_matches_oracle(base, dtype, inp, preset, residual):
    m, q, k, v = quant_case(base, dtype, inp, preset, residual)
    got, idx = kv_quant(m, q.astype(dtype), k.astype(dtype), v.astype(dtype), positions=np.arange(k.shape[1]))
    sel, check = check_quantized_step(got, m, q, k, v, dtype)
    assert [list(a) for a in idx] == [list(a) for a in sel.indices]
    assert check.ok, check


def test_quant_sparq_mix_planted_bug_is_caught():
    """A kernel that forgets SparQ's mean-V mix over the quantized cache exceeds the tolerance."""
    from kvsparse.kernels.numba.kv_quant import quantized_attention, stored_parts
    from kvsparse.property_tests.strategies import make_decode_input
    inp = make_decode_input(4, 2, 64, 8, seed=3)
    m, q, k, v = quant_case(dataclasses.replace(registry.oracle("sparq"), k=6), "float32", inp, "canonical", 0)
    good, idx = kv_quant(m, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert check_quantized_step(good, m, q, k, v, "float32")[1].ok
    cache = m.quantize_cache(k, v)
    from kvsparse.kernels.numba.attention import union_with_weights
    lists, lengths, w = union_with_weights(idx, 2, np.float32)
    bad, _ = quantized_attention(q.astype(np.float32), stored_parts(cache.keys, cache.k_full, np.float32),
                                 stored_parts(cache.values, cache.v_full, np.float32), lists, lengths, w)
    assert not check_quantized_step(bad, m, q, k, v, "float32")[1].ok


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


@st.composite
def quant_layouts(draw, dtype):
    """Any KVQuant layout (bits, axes, group sizes that split or do not split a byte's codes, residual
    rules), with a scale dtype a ``dtype`` kernel can store; plus a magnitude for the inputs (tiny and
    huge values reach float16's subnormals and overflow)."""
    bits = st.sampled_from([2, 4, 8])
    residual_rule = draw(st.sampled_from(["window", "kivi"]))
    group = draw(st.sampled_from([0, 1, 2, 3, 4, 8, 32]))
    residual = draw(st.integers(0, 12))
    if residual_rule == "kivi":
        residual = max(1, group) * max(1, residual // 4)
    scale_dtype = "float32" if dtype == "float32" else draw(st.sampled_from(["float64", "float32", "float16"]))
    m = KVQuant(key_bits=draw(bits), value_bits=draw(bits), key_axis=draw(st.sampled_from(["token", "channel"])),
                value_axis=draw(st.sampled_from(["token", "channel"])), group_size=group, residual=residual,
                residual_rule=residual_rule, scale_dtype=scale_dtype)
    return m, draw(st.sampled_from([1e-6, 1.0, 3e4]))


def given_case(dtype, inp, magnitude):
    q, k, v = (round_to(x, dtype) for x in (inp.q, inp.k * magnitude, inp.v * magnitude))
    return q, k, v, tuple(x.astype(dtype) for x in (q, k, v))


QUANT_HEAD_DIMS = (4, 8, 16, 128)
"""128: several channel groups per row with whole 8-byte chunks each (the kernel's broadcast fill)."""


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")   # the oracle's float16 scales
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")      # past 65504, by design
@pytest.mark.parametrize("dtype", DTYPES)
@given(inp=decode_inputs(max_n=80, head_dims=QUANT_HEAD_DIMS), data=st.data())
def test_quantize_cache_is_the_oracles_and_a_given_cache_is_the_same_step(dtype, inp, data):
    """The Numba quantizer's codes, scales and zero points are the oracle's to the bit; the kernel
    given that cache returns exactly what it returns quantizing inside, within the tolerance of the oracle."""
    from kvsparse.kernels.numba.kv_quant import quantize_cache, stored_parts
    m, magnitude = data.draw(quant_layouts(dtype))
    q, k, v, (q_, k_, v_) = given_case(dtype, inp, magnitude)
    oracle = m.quantize_cache(k, v)
    want = (stored_parts(oracle.keys, oracle.k_full, dtype), stored_parts(oracle.values, oracle.v_full, dtype))
    got = quantize_cache(m, k_, v_, dtype)
    for w_parts, g_parts in zip(want, got):
        for w_x, g_x in zip(w_parts, g_parts):
            if isinstance(w_x, np.ndarray):
                assert g_x.dtype == w_x.dtype and g_x.shape == w_x.shape and np.array_equal(g_x, w_x)
            else:
                assert g_x == w_x
    inside, _ = kv_quant(m, q_, k_, v_)
    given_out, _ = kv_quant(m, q_, k_, v_, cache=got)
    assert np.array_equal(inside, given_out, equal_nan=True)
    kh, vh = m.dequantized(k, v)
    if np.isfinite(kh).all() and np.isfinite(vh).all():    # float16 scales past 65504 are inf: no oracle step
        assert check_quantized_step(given_out, m, q, k, v, dtype)[1].ok


def test_quant_given_cache_planted_bugs_are_caught():
    """A wrong zero point in the given cache exceeds the tolerance; a cache of another layout is refused."""
    from kvsparse.kernels.numba.kv_quant import quantize_cache
    from kvsparse.property_tests.strategies import make_decode_input
    inp = make_decode_input(4, 2, 64, 8, seed=4)
    m = KVQuant(key_bits=4, value_bits=4, scale_dtype="float32")
    q, k, v, (q_, k_, v_) = given_case("float32", inp, 1.0)
    keys, values = quantize_cache(m, k_, v_)
    assert check_quantized_step(kv_quant(m, q_, k_, v_, cache=(keys, values))[0], m, q, k, v, "float32")[1].ok
    for tensor in (0, 1):
        parts = [list(keys), list(values)]
        zero = parts[tensor][2].copy()
        zero[0, 0] += parts[tensor][1][0, 0]           # token block 0's zero points one step off
        parts[tensor][2] = zero
        bad, _ = kv_quant(m, q_, k_, v_, cache=(tuple(parts[0]), tuple(parts[1])))
        assert not check_quantized_step(bad, m, q, k, v, "float32")[1].ok
    other = quantize_cache(dataclasses.replace(m, residual=8), k_, v_)
    with pytest.raises(ValueError, match="layout"):
        kv_quant(m, q_, k_, v_, cache=other)
    with pytest.raises(TypeError, match="float32"):
        kv_quant(m, q_, k_, v_, cache=(keys, (values[0], values[1].astype(np.float64)) + values[2:]))
    with pytest.raises(ValueError, match="finite"):
        kv_quant(m, q_, np.where(np.arange(64)[None, :, None] == 5, np.nan, k_).astype(np.float32), v_)


@pytest.mark.parametrize("dtype", DTYPES)
@given(inp=decode_inputs(max_n=80, head_dims=QUANT_HEAD_DIMS), data=st.data(), parts=st.integers(1, 5))
def test_quantized_attention_split_into_slices_matches_oracle(dtype, inp, data, parts):
    """Each KV head's list cut into ``parts`` slices merged by log-sum-exp (what more threads than KV
    heads get), over per-query-head token sets (0/1 weights of the group's union), within the tolerance."""
    from kvsparse.kernels.numba.attention import union_with_weights
    from kvsparse.kernels.numba.kv_quant import quantize_cache, quantized_attention
    m, _ = data.draw(quant_layouts(dtype))
    q, k, v, (q_, k_, v_) = given_case(dtype, inp, 1.0)
    n = k.shape[1]
    sets = [np.sort(np.asarray(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))))
            for _ in range(q.shape[0])]
    lists, lengths, w = union_with_weights(sets, k.shape[0], q_.dtype)
    got, lse = quantized_attention(q_, *quantize_cache(m, k_, v_), lists, lengths, w, parts=parts)
    kh, vh = m.dequantized(k, v)
    mask = np.zeros((q.shape[0], n), bool)
    for h, ix in enumerate(sets):
        mask[h, ix] = True
    ref = reference_on_rounded(q, kh, vh, dtype, mask=mask)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= attention_tolerance(q, kh, vh, dtype, mask=mask), (err, parts)
    want_lse = core.attend_mask_partial(q, round_to(kh, dtype), round_to(vh, dtype), mask).lse
    # lse: float64 logits of the same rounded values, then one rounding to the dtype
    np.testing.assert_allclose(lse.astype(np.float64), want_lse, rtol=0,
                               atol=64 * dtype_eps(dtype) * (1 + np.abs(want_lse).max()))


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


# --- CLA: every layer attends over its producer layer's cache -----------------------------------

def cla_case(seed, layers, f, h_kv, g, n, d, dtype):
    rng = np.random.default_rng(seed)
    q = round_to(rng.standard_normal((layers, h_kv * g, d)), dtype)
    k = round_to(rng.standard_normal((layers, h_kv, n, d)), dtype)
    v = round_to(rng.standard_normal((layers, h_kv, n, d)), dtype)
    return CLA(sharing_factor=f), q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 5), f=st.integers(1, 3), h_kv=st.integers(1, 3),
       g=st.integers(1, 3), n=st.integers(1, 60), d=st.sampled_from([1, 4, 8, 16]))
def test_cla_kernel_matches_oracle(dtype, seed, layers, f, h_kv, g, n, d):
    m, q, k, v = cla_case(seed, layers, f, h_kv, g, n, d, dtype)
    out, lse = cla_decode_layers(m, q.astype(dtype), k.astype(dtype), v.astype(dtype))
    assert out.shape == q.shape and out.dtype == np.dtype(dtype) and lse.shape == q.shape[:2]
    steps = decode_layers(m, q, k, v)
    for layer in range(layers):
        p = m.producer(layer)
        check = check_attention_output(out[layer], q[layer], k[p], v[p], dtype)
        assert check.ok, (layer, check)
        if dtype == "float64":
            np.testing.assert_allclose(out[layer], steps[layer].output, rtol=1e-12, atol=1e-12)
        got, idx = cla(dataclasses.replace(m, layer=layer), q[layer].astype(dtype), k[p].astype(dtype),
                       v[p].astype(dtype))
        assert check_attention_output(got, q[layer], k[p], v[p], dtype).ok and np.asarray(idx).shape == (h_kv * g, n)


def test_cla_planted_bug_is_caught():
    """A consumer layer attending over its own (never stored) K/V instead of the producer's is caught."""
    m, q, k, v = cla_case(7, 2, 2, 2, 2, 40, 8, "float32")
    wrong, _ = cla_decode_layers(CLA(sharing_factor=1), q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert check_attention_output(wrong[0], q[0], k[0], v[0], "float32").ok       # the producer layer agrees
    assert not check_attention_output(wrong[1], q[1], k[0], v[0], "float32").ok   # the consumer does not
    with pytest.raises(TypeError, match="method"):
        cla_decode_layers(MLA(), q, k, v)


# --- LoRC: rebuild K/V from the latents, RoPE the keys, dense attention ---------------------------

def lorc_case(seed, h_kv, g, n, d, rk, rv, rope, dtype):
    """Rounded latents and up-projections, and the oracle's cache: ``LowRankKV.rebuild`` with the latents
    as hidden states and identity down-projections (``x A`` is then the latent exactly)."""
    rng = np.random.default_rng(seed)
    full = h_kv * d
    rk, rv = min(rk, full), min(rv, full)
    lat_k, lat_v = round_to(rng.standard_normal((n, rk)), dtype), round_to(rng.standard_normal((n, rv)), dtype)
    b_k = round_to(rng.standard_normal((rk, full)) / np.sqrt(rk), dtype)
    b_v = round_to(rng.standard_normal((rv, full)) / np.sqrt(rv), dtype)
    q = round_to(rng.standard_normal((h_kv * g, d)), dtype)
    positions = np.arange(n) + int(rng.integers(0, 500)) if rope else None
    x = np.concatenate([lat_k, lat_v], axis=1)
    factors = LowRankKV(np.vstack([np.eye(rk), np.zeros((rv, rk))]), b_k, np.vstack([np.zeros((rk, rv)), np.eye(rv)]),
                        b_v, h_kv)
    k, v = factors.rebuild(x, positions)
    return dict(q=q, lat_k=lat_k, lat_v=lat_v, b_k=b_k, b_v=b_v, positions=positions, x=x, factors=factors, k=k, v=v)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**32 - 1), h_kv=st.integers(1, 3), g=st.integers(1, 3), n=st.integers(1, 60),
       d=st.sampled_from([2, 4, 8, 16]), rk=st.integers(1, 48), rv=st.integers(1, 48), rope=st.booleans())
def test_lorc_kernel_matches_oracle(dtype, seed, h_kv, g, n, d, rk, rv, rope):
    c = lorc_case(seed, h_kv, g, n, d, rk, rv, rope, dtype)
    dt = np.dtype(dtype)
    got, lse = lorc_attention(c["q"].astype(dt), c["lat_k"].astype(dt), c["lat_v"].astype(dt), c["b_k"].astype(dt),
                              c["b_v"].astype(dt), c["positions"])
    assert got.dtype == dt and lse.shape == (h_kv * g,)
    check = check_attention_output(got, c["q"], c["k"], c["v"], dtype)
    assert check.ok, check
    if dtype == "float64":
        m = LoRC(key_rank=c["lat_k"].shape[1], value_rank=c["lat_v"].shape[1])
        want = m.decode(c["factors"], c["q"], c["x"], c["positions"]).output
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    out, idx = lorc(LoRC(), c["q"].astype(dt), c["k"].astype(dt), c["v"].astype(dt))      # the Method view
    assert check_attention_output(out, c["q"], c["k"], c["v"], dtype).ok and np.asarray(idx).shape == (h_kv * g, n)


def test_lorc_planted_bugs_are_caught():
    """Forgetting the keys' RoPE, or swapping the key and value latents, exceeds the tolerance."""
    c = lorc_case(11, 2, 2, 48, 8, 6, 6, True, "float32")
    f32 = {name: c[name].astype(np.float32) for name in ("q", "lat_k", "lat_v", "b_k", "b_v")}
    good, _ = lorc_attention(f32["q"], f32["lat_k"], f32["lat_v"], f32["b_k"], f32["b_v"], c["positions"])
    assert check_attention_output(good, c["q"], c["k"], c["v"], "float32").ok
    no_rope, _ = lorc_attention(f32["q"], f32["lat_k"], f32["lat_v"], f32["b_k"], f32["b_v"])
    assert not check_attention_output(no_rope, c["q"], c["k"], c["v"], "float32").ok
    swapped, _ = lorc_attention(f32["q"], f32["lat_v"], f32["lat_k"], f32["b_v"], f32["b_k"], c["positions"])
    assert not check_attention_output(swapped, c["q"], c["k"], c["v"], "float32").ok
    with pytest.raises(TypeError, match="b_k"):
        lorc_attention(f32["q"], f32["lat_k"], f32["lat_v"], c["b_k"], f32["b_v"])
    with pytest.raises(ValueError, match="positions"):
        lorc_attention(f32["q"], f32["lat_k"], f32["lat_v"], f32["b_k"], f32["b_v"], np.arange(3))


def test_cla_and_lorc_kernels_are_registered():
    assert registry.get("cla").kernels["numba"] is cla
    assert registry.get("lorc").kernels["numba"] is lorc
