"""KV quantization oracle: the half-step bound, exactness on the grid, composition, Traffic by hand."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, example, given, strategies as st

from kvsparse import registry
from kvsparse.oracle import core
from kvsparse.oracle.kv_quant import KVQuant, pack_codes, quantize, unpack_codes
from kvsparse.oracle.types import Layout, kv_traffic
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input

EPS = np.finfo(np.float64).eps


def block_ranges(x, tb, cb):
    """Independent per-element (min, max) of its block, by explicit loops."""
    h, n, d = x.shape
    lo, hi = np.empty_like(x), np.empty_like(x)
    for a in range(h):
        for i0 in range(0, n, tb):
            for c0 in range(0, d, cb):
                blk = x[a, i0:i0 + tb, c0:c0 + cb]
                lo[a, i0:i0 + tb, c0:c0 + cb] = blk.min()
                hi[a, i0:i0 + tb, c0:c0 + cb] = blk.max()
    return lo, hi


def half_step_violations(x, x_hat, bits, tb, cb) -> int:
    """Elements whose error exceeds half a quantization step (plus float64 rounding of the arithmetic)."""
    lo, hi = block_ranges(x, tb, cb)
    step = (hi - lo) / (2 ** bits - 1)
    slack = 8 * EPS * (np.abs(x) + np.abs(lo) + np.abs(hi))
    return int(np.sum(np.abs(x - x_hat) > step / 2 + slack))


@given(inp=decode_inputs(max_n=80, head_dims=(2, 4, 8, 16)), bits=st.sampled_from([2, 4, 8]),
       tb=st.integers(1, 40), cb=st.integers(1, 16))
@example(inp=make_decode_input(1, 1, 1, 2, seed=0), bits=2, tb=1, cb=1)   # one-element blocks: zero scale
def test_dequantize_error_within_half_step(inp, bits, tb, cb):
    q = quantize(inp.k, bits, tb, cb)
    assert q.codes.min() >= 0 and q.codes.max() <= 2 ** bits - 1
    assert half_step_violations(inp.k, q.dequantize(), bits, tb, cb) == 0


def test_half_step_check_catches_truncation():
    """Planted bug: floor instead of round-to-nearest errs by up to a whole step and is caught."""
    x = make_decode_input(2, 2, 40, 8, seed=3).k
    q = quantize(x, 4, 1, 8)
    s, z = q.expand(q.scale), q.expand(q.zero)
    floored = np.floor(np.divide(x - z, s, out=np.zeros_like(x), where=s > 0)) * s + z
    assert half_step_violations(x, floored, 4, 1, 8) > 0


def test_pack_unpack_roundtrip_and_layout():
    codes = np.array([[1, 2, 3, 15, 0, 7]])
    packed = pack_codes(codes, 4)
    assert packed.tolist() == [[0x21, 0xF3, 0x70]]          # low nibble first
    for bits in (2, 4, 8):
        c = np.random.default_rng(bits).integers(0, 2 ** bits, size=(2, 5, 8))
        assert np.array_equal(unpack_codes(pack_codes(c, bits), bits, 8), c)


@given(inp=decode_inputs(max_n=60, head_dims=(4, 8, 16)), bits=st.sampled_from([2, 4, 8]))
def test_cache_on_the_grid_is_exact(inp, bits):
    """A cache whose every block already lies on its quantization grid dequantizes exactly: KVQuant ≡ dense."""
    levels = 2 ** bits - 1
    rng = np.random.default_rng(inp.seed % 2**32)
    h_kv, n, d = inp.k.shape
    # per-token groups of the whole row: each row spans codes 0..levels on the grid 0.25 * code - 1
    k = rng.integers(0, levels + 1, size=(h_kv, n, d)) * 0.25 - 1.0
    v = rng.integers(0, levels + 1, size=(h_kv, n, d)) * 0.5 + 2.0
    k[..., 0], k[..., 1] = -1.0, 0.25 * levels - 1.0
    v[..., 0], v[..., 1] = 2.0, 0.5 * levels + 2.0
    m = KVQuant(key_bits=bits, value_bits=bits, key_axis="token", value_axis="token", group_size=0)
    kh, vh = m.dequantized(k, v)
    assert np.array_equal(kh, k) and np.array_equal(vh, v)
    np.testing.assert_array_equal(m.step(inp.q, k, v).output, core.attend_dense(inp.q, k, v))


SMALL = {   # small budgets so that every base really selects (and reads all its sites) at n <= 70
    "quest": dict(token_budget=24, page_size=4), "sliding_window": dict(window=12), "bigbird": dict(block_size=4),
    "longformer": dict(window=8), "double_sparsity": dict(r=2, token_budget=10), "sparq": dict(k=6),
    "retrieval_attention": dict(sinks=2, window=8, top_k=5), "vattention": dict(sinks=2, local=4, heavy=4),
    "cla": dict(layer=1), "deja_vu": dict(), "dense": dict(),
}


def selection_bases():
    """``None`` and every stateless base a quantized cache composes with, with small budgets; also the
    variants with other read sites (Double Sparsity over PCIe, SparQ's K^T twin, Twilight without its
    key copy)."""
    from kvsparse.oracle.twilight import Twilight
    bases = [None] + [dataclasses.replace(registry.oracle(name), **kw) for name, kw in SMALL.items()]
    quest = bases[1]
    return bases + [
        dataclasses.replace(registry.oracle("double_sparsity"), r=2, token_budget=10, kv_memory="pcie"),
        dataclasses.replace(registry.oracle("sparq"), k=6, gqa="group", transposed_keys=True),
        Twilight(base=quest), Twilight(base=quest, quant_bits=None),
    ]


def base_id(b):
    return "dense" if b is None else f"{b.name}-{sum(map(ord, repr(b))) % 1000}"


@pytest.mark.parametrize("base", selection_bases(), ids=base_id)
@given(inp=decode_inputs(min_n=2, max_n=70, head_dims=(4, 8, 16)), residual=st.integers(0, 20),
       preset=st.sampled_from(sorted(KVQuant.presets())))
def test_composition_runs_base_on_the_dequantized_cache(base, inp, residual, preset):
    m = KVQuant.presets()[preset]
    if m.residual_rule == "kivi":
        residual = max(32, residual - residual % 32)
    m = dataclasses.replace(m, base=base, residual=residual)
    kh, vh = m.dequantized(inp.k, inp.v)
    b = base if base is not None else registry.oracle("dense")
    pos = np.arange(inp.k.shape[1])
    try:
        got = m.step(inp.q, inp.k, inp.v, positions=pos)
    except ValueError as e:     # SparQ reading r channels of n keys at < 8 bits: not whole bytes (refused)
        assert "whole number of bytes" in str(e)
        assume(False)
    want = b.step(inp.q, kh, vh, positions=pos)
    assert got.selection == want.selection
    np.testing.assert_array_equal(got.output, want.output)
    # the base's own non-KV reads (Quest's page metadata, DS labels) are kept on top of the quantized rows and scales
    for key, b in want.traffic.bytes.items():
        if key[1] == "metadata":
            assert got.traffic.get(*key) >= b, key


@pytest.mark.parametrize("base", selection_bases(), ids=base_id)
@given(inp=decode_inputs(max_n=50, head_dims=(4, 8)), page=st.integers(1, 5), share=st.booleans())
def test_residual_covering_the_cache_is_the_base_method(base, inp, page, share):
    """Nothing quantized (residual >= n): output, selection and Traffic are the base method's."""
    m = KVQuant(base=base, key_axis="token", residual=inp.k.shape[1])
    b = base if base is not None else registry.oracle("dense")
    layout = Layout(16, page, share)
    pos = np.arange(inp.k.shape[1])
    got, want = m.step(inp.q, inp.k, inp.v, positions=pos, layout=layout), b.step(inp.q, inp.k, inp.v, positions=pos, layout=layout)
    assert got.selection == want.selection and got.traffic == want.traffic
    np.testing.assert_array_equal(got.output, want.output)


def test_traffic_hand_count_canonical():
    """n=50, d=8, H_kv=2, 4-bit, keys per channel in 32-token blocks, values per token (one 8-channel group)."""
    inp = make_decode_input(4, 2, 50, 8, seed=0)
    t = KVQuant().step(inp.q, inp.k, inp.v).traffic
    # keys: tokens 0..31 quantized (one full block; 32..49 wait for a full block): 32*4 B + 18*16 B per head
    assert t.get("hbm", "keys") == 2 * (32 * 4 + 18 * 16)
    # values: all 50 rows at 4 B
    assert t.get("hbm", "values") == 2 * 50 * 4
    # scales: keys 1 block x 8 channels, values 50 rows x 1 group; (scale, zero) fp16 = 4 B each
    assert t.get("hbm", "metadata") == 2 * (8 + 50) * 4
    assert t.total == t.by_memory("hbm")


def test_traffic_hand_count_kivi_and_pages():
    """KIVI at n=200 (R=128, G=32): keys 0..127 quantized (flushed in blocks of R), values 0..70 (last R+1 full)."""
    m = KVQuant.presets()["kivi-2"]
    assert m.quantized_lengths(200, 8) == (128, 71)
    assert m.quantized_lengths(129, 8) == (128, 0)
    assert m.quantized_lengths(128, 8) == (0, 0)
    inp = make_decode_input(2, 1, 200, 8, seed=0)
    t = m.step(inp.q, inp.k, inp.v).traffic
    assert t.get("hbm", "keys") == 128 * 2 + 72 * 16
    assert t.get("hbm", "values") == 71 * 2 + 129 * 16
    assert t.get("hbm", "metadata") == (4 * 8 + 71 * 1) * 4
    # per-token int8 (one fp16 scale + zero per row) under a page-granular layout, page 16, tokens 40..49
    # of n = 50: page 2 (tokens 32..47) is read whole, page 3 holds only its filled tokens 48, 49
    from kvsparse.oracle.types import Selection
    m8 = KVQuant(key_bits=8, value_bits=8, key_axis="token", value_axis="token", group_size=0)
    sel = Selection((np.arange(40, 50), np.arange(40, 50)), 50)
    t = m8.traffic(sel, h_kv=1, d=8, layout=Layout(16, 16, True))
    rows = 16 + 2
    assert t.get("hbm", "keys") == rows * 8 and t.get("hbm", "values") == rows * 8
    assert t.get("hbm", "metadata") == 2 * rows * 4
    # without KV-head sharing each of the 2 query heads reads its own rows
    assert m8.traffic(sel, h_kv=1, d=8, layout=Layout(16, 16, False)).get("hbm", "keys") == 2 * rows * 8


def test_composition_hand_count_sparq():
    """SparQ (r=2, k=4 per head) over per-token int4 groups of 4 channels, residual 8, n=40, d=8, H_q=2,
    H_kv=1: head 0 reads channels {0, 1} (one scale group), head 1 channels {2, 5} (two groups)."""
    from kvsparse.oracle.sparq import SparQ
    inp = make_decode_input(2, 1, 40, 8, seed=4)
    q = np.full((2, 8), 0.01)
    q[0, [0, 1]] = [3.0, -2.0]
    q[1, [2, 5]] = [2.5, 4.0]
    m = KVQuant(base=SparQ(r=2, k=4), key_axis="token", value_axis="token", group_size=4, residual=8)
    assert m.quantized_lengths(40, 8) == (32, 32)
    res = m.step(q, inp.k, inp.v)
    rows = res.selection.kv_union(1)[0]
    u, uq = rows.size, int((rows < 32).sum())
    # approximate pass, per query head: 2 channels x (32 rows at 4 bits + 8 rows at 16 bits) = 64 B
    assert res.traffic.get("hbm", "keys") == 2 * 64 + uq * 4 + (u - uq) * 16
    assert res.traffic.get("hbm", "values") == uq * 4 + (u - uq) * 16
    # scales: the pass touches 1 + 2 groups in each of the 32 quantized rows; the read rows 2 groups per tensor
    assert res.traffic.get("hbm", "metadata") == 32 * 3 * 4 + 2 * uq * 2 * 4
    assert res.traffic.get("hbm", "auxiliary") == 8 * 2                     # the running mean of V, fp16
    assert m.read_stats(m.cache_reads(res.selection, h_kv=1, d=8, layout=Layout(), inputs=(q, *m.dequantized(
        inp.k, inp.v))), 40, 8)["channels"] == 3


def test_quest_int4_preset_keeps_page_metadata_at_full_width():
    """quest-int4: Quest's min/max pages cost 2 * d * 16 bits per page and KV head, beside 4-bit rows."""
    from kvsparse.oracle.quest import Quest
    m = dataclasses.replace(KVQuant.presets()["quest-int4"], base=Quest(token_budget=64))
    inp = make_decode_input(4, 2, 256, 64, seed=0)
    res = m.step(inp.q, inp.k, inp.v)
    rows = sum(ix.size for ix in res.selection.kv_union(2))
    assert res.traffic.get("hbm", "metadata") == 2 * (2 * 16 * 64 * 2) + rows * 2 * 2 * 4
    assert res.traffic.get("hbm", "keys") == rows * 32


@pytest.mark.parametrize("name, preset, why", [
    ("h2o", "canonical", "stateful"), ("streaming_llm", "canonical", "stateful"), ("snapkv", "canonical", "stateful"),
    ("mla", "canonical", "latent"), ("lorc", "canonical", "latents"), ("kv_quant", "canonical", "already"),
    ("retrieval_attention", "approximate", "scan_ratio")])
def test_refused_bases_say_why(name, preset, why):
    with pytest.raises(ValueError, match=why):
        KVQuant(base=registry.oracle(name, preset))


def test_undescribed_reads_are_refused():
    """Planted: a base that reads its keys twice is not silently re-priced as one read."""
    from kvsparse.oracle.dense import Dense
    from kvsparse.oracle.types import Traffic

    @dataclasses.dataclass(frozen=True)
    class DoubleKeys(Dense):
        def traffic(self, selection, *, h_kv, d, layout):
            t = kv_traffic(selection, h_kv, d, layout)
            return t + Traffic({("hbm", "keys"): t.get("hbm", "keys")}, layout)

    inp = make_decode_input(2, 1, 12, 8, seed=0)
    with pytest.raises(ValueError, match="does not read the cache as KVQuant describes"):
        KVQuant(base=DoubleKeys()).step(inp.q, inp.k, inp.v)
    KVQuant(base=Dense()).step(inp.q, inp.k, inp.v)


def test_bad_inputs():
    with pytest.raises(ValueError, match="key_bits"):
        KVQuant(key_bits=3)
    with pytest.raises(ValueError, match="key_axis"):
        KVQuant(key_axis="head")
    with pytest.raises(ValueError, match="residual"):
        KVQuant(residual_rule="kivi", residual=40, group_size=32)
    with pytest.raises(TypeError, match="base"):
        KVQuant(base="quest")
    with pytest.raises(ValueError, match="bits"):
        quantize(np.zeros((1, 2, 2)), 5, 1, 1)
    inp = make_decode_input(2, 1, 10, 3, seed=0)
    with pytest.raises(ValueError, match="whole number of bytes"):
        KVQuant(key_axis="token").step(inp.q, inp.k, inp.v)
