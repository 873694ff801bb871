"""Property suites of the structural methods (``property_tests/suites_structural.py``): every registered
Numba kernel of deja_vu, cla, mla, lorc and kv_quant passes its suite (and ``kvsparse validate``); each
suite catches planted bugs (wrong head ranking, off-by-one layer sharing, a wrong MLA split or scale,
a wrong LoRC rank or RoPE base, wrong quantization rounding or groups); a failing input replays; Deja
Vu's band accepts a different choice only within the band of a tie."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

from kvsparse import cli, registry
from kvsparse.kernels.numba.attention import dense_attention
from kvsparse.kernels.numba.deja_vu import head_masked_attention
from kvsparse.kernels.numba.kv_quant import stored_parts
from kvsparse.kernels.numba.lorc import lorc_attention
from kvsparse.kernels.numba.mla import mla_decode
from kvsparse.oracle import core
from kvsparse.oracle.deja_vu import DejaVu
from kvsparse.oracle.kv_quant import quantize
from kvsparse.property_tests import suites, tolerances, validate
from kvsparse.property_tests import suites_structural as ss
from kvsparse.property_tests.strategies import DecodeInput, make_decode_input

STRUCTURAL = ["cla", "deja_vu", "kv_quant", "lorc", "mla"]
# planted bugs only need to be found, not shrunk: a derandomized search that stops at the first failure
FIND_ONLY = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                     phases=(Phase.explicit, Phase.generate),
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def numba(name):
    return registry.get(name).kernels["numba"]


def caught(name, kernel, prop, dtype="float32"):
    """The suite finds the bug and names the broken property (one of ``prop``, a str or a tuple)."""
    report = suites.run_suite(name, kernel, dtype=dtype, settings=FIND_ONLY)
    assert not report.ok, f"{name}: planted bug not caught"
    broken = {r.name for r in report.failure.failures}
    assert broken & ({prop} if isinstance(prop, str) else set(prop)), str(report.failure)
    return report


# --- the registered kernels pass -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", STRUCTURAL)
def test_numba_kernel_implements_method(name, dtype):
    report = suites.run_suite(name, numba(name), dtype=dtype)
    assert report.ok, str(report)
    assert report.examples >= 30


@pytest.mark.parametrize("name", STRUCTURAL)
def test_kvsparse_validate_passes_the_numba_kernel(name, capsys):
    code = cli.main(["validate", name, f"kvsparse.kernels.numba.{name}:{name}", "--examples", "15"])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out, out


def test_every_method_has_a_suite_now():
    missing = sorted(n for n, e in registry.entries().items() if e.oracle is not None and e.suite is None)
    assert missing == []
    assert all(isinstance(registry.get(n).suite, suites.MethodSuite) and registry.get(n).suite.check is not None
               for n in STRUCTURAL)


def test_extended_contracts_are_checked_and_noted_when_absent():
    """CLA's layers and LoRC's latents are checked on the Numba kernels; a kernel with only the step
    contract passes with a note that they were not checked."""
    inp = make_decode_input(4, 2, 30, 8, seed=1)
    from kvsparse.oracle.cla import CLA
    from kvsparse.oracle.lorc import LoRC
    for method, prop in ((CLA(sharing_factor=3, layer=4), "layers"), (LoRC(key_rank=5, value_rank=3), "latent")):
        full = suites.suite_for(method.name).check(method, numba(method.name), inp, dtype="float32")
        assert full.ok and full.results[-1].name == prop and full.results[-1].tolerance > 0, str(full)
        step = numba(method.name)
        step_only = suites.suite_for(method.name).check(method, lambda *a, _step=step, **kw: _step(*a, **kw), inp)
        assert step_only.ok and "not checked" in step_only.results[-1].detail


# --- deja_vu: the head rule and its band ----------------------------------------------------------

def deja_vu_kernel(bug):
    """The registered kernel with the predictor broken; a given head_mask is still followed."""
    def kernel(method, q, k, v, *, positions=None, scale=None):
        if method.head_mask is not None:
            return numba("deja_vu")(method, q, k, v, scale=scale)
        h_q, n = q.shape[0], k.shape[1]
        budget = method.heads_to_keep(h_q)
        norms = np.linalg.norm(dense_attention(q, k, v, scale=scale if bug == "step_scale" else None)[0]
                               .astype(np.float64), axis=-1)
        if bug == "lowest":                   # ranks the wrong way: the smallest outputs kept
            keep = core.topk_mask(-norms, budget)
        elif bug == "one_more":               # budget off by one
            keep = core.topk_mask(norms, min(h_q, budget + 1))
        else:                                 # step_scale: ranked at the step's scale, not 1/sqrt(d)
            keep = core.topk_mask(norms, budget)
        out, _ = head_masked_attention(q, k, v, keep, scale=scale)
        if bug == "skipped_computed":         # skipped heads output their dense rows, not 0
            out, _ = dense_attention(q, k, v, scale=scale)
        return out, [np.arange(n) if kept else np.zeros(0, np.int64) for kept in keep]
    return kernel


@pytest.mark.parametrize("bug, prop", [("lowest", "selection"), ("one_more", "selection"),
                                       ("step_scale", "selection"), ("skipped_computed", "output")])
def test_deja_vu_suite_catches_planted_bugs(bug, prop):
    report = caught("deja_vu", deja_vu_kernel(bug), prop)
    if bug == "step_scale":      # the bug the suite found in the Numba kernel: only an explicit scale shows it
        assert "scale=" in report.failure.input


def test_regression_numba_deja_vu_ranks_at_the_default_scale():
    """Found by the suite: the Numba kernel ranked heads by their output at the step's scale; the oracle
    predictor ranks at 1/sqrt(d) whatever the step's scale (oracle/deja_vu.py)."""
    method, inp = DejaVu(head_budget=1), make_decode_input(2, 1, 79, 4, "near_ties", seed=1302)
    check = suites.suite_for("deja_vu").check
    assert check(method, numba("deja_vu"), inp, dtype="float32", scale=1.3).ok
    bad = check(method, deja_vu_kernel("step_scale"), inp, dtype="float32", scale=1.3)
    assert not bad.ok and bad.failures[0].name == "selection", str(bad)


def test_head_choice_rule_by_hand():
    s = np.array([3.0, 2.0, 2.0, 1.0])
    b = np.full(4, 1e-6)
    assert ss.head_choice(np.array([1, 1, 0, 0], bool), s, b, 2)[0]        # the oracle's (lower index wins)
    assert ss.head_choice(np.array([1, 0, 1, 0], bool), s, b, 2)[0]        # the other side of the tie
    assert not ss.head_choice(np.array([1, 0, 0, 1], bool), s, b, 2)[0]    # 1.0 kept over 2.0
    assert ss.head_choice(np.array([1, 0, 0, 1], bool), s, np.array([0, 0.5, 0.5, 0.5]), 2)[0]  # unless bands touch
    assert not ss.head_choice(np.array([1, 1, 1, 0], bool), s, b, 2)[0]    # wrong number of heads


def swapped_heads(a, b):
    """A kernel keeping head ``b`` where the oracle keeps head ``a`` (else the oracle's choice)."""
    def kernel(method, q, k, v, *, positions=None, scale=None):
        keep = method.kept_heads(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
        keep[a], keep[b] = keep[b], keep[a]
        wide = (x.astype(np.float32) if x.dtype == np.float16 else x for x in (q, k, v))   # fp16: fp32 inside
        out, _ = head_masked_attention(*wide, keep, scale=scale)
        return out.astype(q.dtype), [np.arange(k.shape[1]) if kept else np.zeros(0, np.int64) for kept in keep]
    return kernel


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_deja_vu_band_accepts_only_a_tie(dtype):
    """Heads 1 and 2 read the same KV head with the same query: a tie, either may be kept. Moved apart
    by more than the band, keeping the smaller one fails; the band is a few roundings, not a margin."""
    x = make_decode_input(4, 1, 24, 8, seed=3)
    q = x.q.copy()
    q[2] = q[1]
    norms = ss.head_norm_band(tolerances.round_to(q, dtype), tolerances.round_to(x.k, dtype),
                              tolerances.round_to(x.v, dtype), dtype)[0]
    rank = int(np.sum(norms > norms[1]))          # heads strictly above the tied pair
    method = DejaVu(head_budget=rank + 1)         # the cut falls between the tied heads 1 and 2
    tie = DecodeInput(q, x.k, x.v, "tie", 0)
    verdict = suites.suite_for("deja_vu").check(method, swapped_heads(1, 2), tie, dtype=dtype)
    assert verdict.ok and "within the band" in verdict.results[1].detail, str(verdict)
    apart = q.copy()
    apart[2] = q[1] * 0.5                          # head 2's logits halved: its norm moves far past the band
    s2, band = ss.head_norm_band(*(tolerances.round_to(a, dtype) for a in (apart, x.k, x.v)), dtype)
    assert abs(s2[1] - s2[2]) > band[1] + band[2]
    assert (band / s2).max() < (2e-2 if dtype == "float16" else 1e-5)
    kept_first = 1 if s2[1] >= s2[2] else 2
    method = DejaVu(head_budget=int(np.sum(s2 > s2[kept_first])) + 1)
    verdict = suites.suite_for("deja_vu").check(method, swapped_heads(kept_first, 3 - kept_first),
                                                DecodeInput(apart, x.k, x.v, "apart", 0), dtype=dtype)
    assert not verdict.ok and verdict.failures[0].name == "selection", str(verdict)


# --- cla: layer sharing ----------------------------------------------------------------------------

def cla_kernel(read=None, zero_consumers=False):
    """The registered step; ``decode_layers`` attends layer l over layer ``read(method, l, L)``'s cache."""
    def kernel(method, q, k, v, *, positions=None, scale=None):
        out, idx = numba("cla")(method, q, k, v, scale=scale)
        if zero_consumers and method.consumer_reads == "reuse" and not method.is_producer():
            out = np.zeros_like(out)          # "reads nothing" taken for "computes nothing"
        return out, idx

    def decode_layers(method, ql, kl, vl, *, scale=None):
        return np.stack([dense_attention(ql[i], kl[read(method, i, len(ql))], vl[read(method, i, len(ql))],
                                         scale=scale)[0] for i in range(len(ql))])
    if read is not None:
        kernel.decode_layers = decode_layers
    return kernel


@pytest.mark.parametrize("read", [
    lambda m, i, L: i // m.sharing_factor,                      # the cache index taken for a layer index
    lambda m, i, L: i,                                          # no sharing: every layer its own K/V
    lambda m, i, L: min(L - 1, m.producer(i) + (i % m.sharing_factor > 0)),   # the producer's next layer
], ids=["cache_index", "unshared", "producer_plus_one"])
def test_cla_suite_catches_wrong_layer_sharing(read):
    report = caught("cla", cla_kernel(read), "layers")
    assert "must attend over producer layer" in report.failure.failures[0].detail


def test_cla_right_sharing_passes_and_zeroed_consumer_is_caught():
    assert suites.run_suite("cla", cla_kernel(lambda m, i, L: m.producer(i))).ok      # the active profile
    caught("cla", cla_kernel(zero_consumers=True), "output")


# --- mla: the absorbed view -------------------------------------------------------------------------

def mla_kernel(bug):
    def kernel(method, q, k, v, *, positions=None, scale=None):
        d = k.shape[2]
        if bug == "view_scale":               # 1/sqrt(r + d_R) instead of 1/sqrt(d_N + d_R)
            return numba("mla")(method, q, k, v, scale=1 / np.sqrt(d) if scale is None else scale)
        if bug == "split_off_by_one" and method.latent_dim > 1:
            method = dataclasses.replace(method, latent_dim=method.latent_dim - 1, rope_dim=method.rope_dim + 1)
        if bug == "no_rope":                  # the shared RoPE key left out of the logits
            r = method.latent_dim
            s = method.default_scale if scale is None else scale
            o, _ = mla_decode(q[:, :r], np.zeros_like(q[:, r:]), k[0, :, :r], k[0, :, r:], scale=s)
            return np.concatenate([o, np.zeros_like(q[:, r:])], axis=1), [np.arange(k.shape[1])] * q.shape[0]
        return numba("mla")(method, q, k, v, scale=scale)
    return kernel


@pytest.mark.parametrize("bug", ["view_scale", "split_off_by_one", "no_rope"])
def test_mla_suite_catches_planted_bugs(bug):
    caught("mla", mla_kernel(bug), "output")


# --- lorc: decode from the latents ------------------------------------------------------------------

def lorc_kernel(bug):
    def decode_latent(method, q, lk, lv, bk, bv, positions=None, *, scale=None):
        base = method.rope_base
        if bug == "rope_base_ignored":
            base = 10000.0
        elif bug == "no_rope":
            positions = None
        elif bug == "key_rank_minus_one" and lk.shape[1] > 1:      # the last latent channel dropped
            lk, bk = np.ascontiguousarray(lk[:, :-1]), np.ascontiguousarray(bk[:-1])
        elif bug == "value_rank_for_keys" and lv.shape[1] < lk.shape[1]:   # the value rank used for keys
            lk, bk = np.ascontiguousarray(lk[:, :lv.shape[1]]), np.ascontiguousarray(bk[:lv.shape[1]])
        return lorc_attention(q, lk, lv, bk, bv, positions, rope_base=base, scale=scale)

    def kernel(method, q, k, v, *, positions=None, scale=None):
        return numba("lorc")(method, q, k, v, scale=scale)
    kernel.decode_latent = decode_latent
    return kernel


@pytest.mark.parametrize("bug", ["rope_base_ignored", "no_rope", "key_rank_minus_one", "value_rank_for_keys"])
def test_lorc_suite_catches_planted_bugs(bug):
    caught("lorc", lorc_kernel(bug), "latent")


# --- kv_quant: the quantizer and its groups ---------------------------------------------------------

def floor_quantized(method, k, v, dtype):
    """The stored cache with codes rounded down (floor) instead of to nearest-even."""
    n, d = k.shape[1:]
    nk, nv = method.quantized_lengths(n, d)
    out = []
    for x, n_q, bits, axis in ((k, nk, method.key_bits, method.key_axis),
                               (v, nv, method.value_bits, method.value_axis)):
        x = x.astype(np.float64)
        qt = quantize(x[:, :n_q], bits, *method.blocks(axis, n_q, d), scale_dtype=method.scale_dtype)
        s, z = qt.expand(qt.scale), qt.expand(qt.zero)
        steps = np.divide(x[:, :n_q] - z, s, out=np.zeros_like(x[:, :n_q]), where=s > 0)
        codes = np.clip(np.floor(steps), 0, 2 ** bits - 1).astype(np.int64)
        out.append(stored_parts(dataclasses.replace(qt, codes=codes), x[:, n_q:], dtype))
    return tuple(out)


def kv_quant_kernel(bug):
    def kernel(method, q, k, v, *, positions=None, scale=None):
        if bug == "floor":
            return numba("kv_quant")(method, q, k, v, scale=scale, cache=floor_quantized(method, k, v, q.dtype))
        if bug == "key_groups_per_token":     # the key groups along the other axis
            method = dataclasses.replace(method, key_axis="token" if method.key_axis == "channel" else "channel")
        if bug == "residual_off_by_one" and method.residual_rule == "window" and method.residual:
            method = dataclasses.replace(method, residual=method.residual - 1)
        return numba("kv_quant")(method, q, k, v, scale=scale)
    return kernel


@pytest.mark.parametrize("bug", ["floor", "key_groups_per_token", "residual_off_by_one"])
def test_kv_quant_suite_catches_planted_bugs(bug):
    caught("kv_quant", kv_quant_kernel(bug), ("output", "selection"))


def test_kv_quant_scales_follow_the_kernel_dtype_and_packing():
    """Exact scales are a float64 kernel's convention: a float32 kernel is compared with float32 scales.
    A fixed format whose rows do not pack at the drawn d gets the input's channels widened."""
    m = registry.oracle("kv_quant", "kivi-2")
    assert ss.stored_scales(registry.oracle("kv_quant"), "float32").scale_dtype == "float32"
    assert ss.stored_scales(registry.oracle("kv_quant"), "float64").scale_dtype == "float64"
    assert ss.stored_scales(m, "float32").scale_dtype == "float16"
    assert ss.packable(m, make_decode_input(2, 1, 5, 3)).q.shape[1] == 4
    report, path = validate.validate("kv_quant", numba("kv_quant"), preset="canonical", examples=10)
    assert report.ok and path is None, str(report)


def naive_kv_quant(method, q, k, v, *, positions=None, scale=None):
    """A correct kernel written the GPU way: dequantize ``code * scale + zero`` in the input dtype (two
    roundings), then plain attention in that dtype (dense base only)."""
    n, d = k.shape[1:]
    cache = method.quantize_cache(k, v)
    kh, vh = ((x.codes.astype(q.dtype) * x.expand(x.scale).astype(q.dtype) + x.expand(x.zero).astype(q.dtype))
              for x in (cache.keys, cache.values))
    kh = np.concatenate([kh, cache.k_full.astype(q.dtype)], axis=1)
    vh = np.concatenate([vh, cache.v_full.astype(q.dtype)], axis=1)
    s = (kh[0] @ q[0]) * q.dtype.type(1 / np.sqrt(d) if scale is None else scale)
    p = np.exp(s - s.max())
    return ((p @ vh[0]) / p.sum())[None], [np.arange(n)]


def test_regression_dequantizing_in_float32_is_within_the_derived_cache_tolerance():
    """Found by hypothesis: a kernel dequantizing in float32 arithmetic exceeded the tolerance of attention
    over the (once-rounded) dequantized cache (1.583e-08 > 1.462e-08); the naive computation dequantizes
    in the dtype too (``tolerances.derived_cache_tolerance``: 3.49e-08)."""
    from kvsparse.oracle.kv_quant import KVQuant
    m = KVQuant(key_bits=8, value_bits=8, key_axis="token", value_axis="channel", group_size=0, scale_dtype="float32")
    inp = make_decode_input(1, 1, 3, 1, "huge_logits", seed=10000)
    verdict = suites.suite_for("kv_quant").check(m, naive_kv_quant, inp, dtype="float32")
    assert verdict.ok, str(verdict)
    q, k, v = (tolerances.round_to(x, "float32") for x in (inp.q, inp.k, inp.v))
    kh, vh, kn, vn = ss.dequantized_cache(m, k, v, "float32")
    assert verdict.results[-1].error > tolerances.attention_tolerance(q, kh, vh, "float32")
    assert verdict.results[-1].tolerance == tolerances.derived_cache_tolerance(q, kh, vh, kn, vn, "float32")


# --- failing inputs replay through each suite's own check ------------------------------------------

PLANTED = {"deja_vu": deja_vu_kernel("lowest"), "cla": cla_kernel(lambda m, i, L: i), "mla": mla_kernel("no_rope"),
           "lorc": lorc_kernel("rope_base_ignored"), "kv_quant": kv_quant_kernel("floor")}


@pytest.mark.parametrize("name", STRUCTURAL)
def test_a_failure_found_by_validate_replays(name, tmp_path):
    report, path = validate.validate(name, PLANTED[name], examples=40, save=tmp_path / "fail.npz")
    assert not report.ok and path is not None, str(report)
    broken = report.failure.failures[0].name
    again = validate.replay(path, PLANTED[name], name)
    assert not again.ok and again.failures[0].name == broken, str(again)
    assert validate.replay(path, numba(name), name).ok


# --- usage errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params, field", [("deja_vu", '{"head_mask": [true, false, true]}', "head_mask"),
                                                 ("lorc", '{"key_rank": 100000}', "key_rank")])
def test_impossible_fixed_params_are_usage_errors(name, params, field, capsys):
    code = cli.main(["validate", name, f"kvsparse.kernels.numba.{name}:{name}", "--params", params,
                     "--examples", "20"])
    err = capsys.readouterr().err
    assert code == 2 and field in err, err


def test_bad_arguments_name_themselves():
    from kvsparse.oracle.dense import Dense
    x = make_decode_input(2, 1, 5, 4)
    for name in STRUCTURAL:
        with pytest.raises(TypeError, match="method must be a"):
            suites.suite_for(name).check(Dense(), numba(name), x)
    with pytest.raises(ValueError, match="k_naive"):
        tolerances.derived_cache_tolerance(x.q, x.k, x.v, x.k[:, :-1], x.v, "float32")
    with pytest.raises(ValueError, match="dtype"):
        tolerances.derived_cache_tolerance(x.q, x.k, x.v, x.k, x.v, "float8")
