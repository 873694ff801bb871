"""Step-level checks: hand counts, units, FLOPs, monotonicity, budget >= context, batches, dtypes."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvsparse import registry
from kvsparse.oracle.types import rows_read
from kvsparse.sim import hardware, latency, sweep
from kvsparse.sim.costmodel import Kernel, range_rows

BUDGETED = sorted(n for n, e in registry.entries().items() if e.cost is not None and e.cost.uses_budget)


def test_dense_llama2_7b_decode_bytes_equal_hand_count():
    """weights + 2 * L * H_kv * d * n * bytes, from the published Llama-2-7B config (fp16)."""
    n = 4096
    L, h, inter, vocab, heads, d = 32, 4096, 11008, 32000, 32, 128
    per_layer = 4 * h * h + 3 * h * inter + 2 * h          # q, k, v, o; gate, up, down; two RMSNorms
    weights = L * per_layer + h + vocab * h + h             # final norm, LM head, one embedding row
    kv = 2 * L * heads * d * n * 2
    sk = latency.step_kernels("llama-2-7b", "dense", [n])
    assert float(sk.hbm_read_bytes(("weights",))) == weights * 2
    assert float(sk.hbm_read_bytes(("keys", "values"))) == kv
    # the only other reads: one fp16 input vector per norm and GEMV (2 norms + 4 GEMVs per layer,
    # the MLP down projection's input is intermediate-sized; final norm and LM head once)
    activations = (L * (5 * h + inter) + 2 * h) * 2
    assert float(sk.hbm_read_bytes()) == weights * 2 + kv + activations


def test_no_gqa_or_mla_double_counting():
    n = 1000
    sk = latency.step_kernels("llama-3-8b", "dense", [n])
    assert float(sk.hbm_read_bytes(("keys", "values"))) == 2 * 32 * 8 * 128 * n * 2        # H_kv = 8, not 32
    sk = latency.step_kernels("deepseek-v2-lite", "dense", [n])
    assert float(sk.hbm_read_bytes(("keys",))) == 27 * (512 + 64) * n * 2                   # one latent row
    assert float(sk.hbm_read_bytes(("values",))) == 0                                        # no factor 2


def test_gigabyte_is_1e9_bytes():
    g = hardware.gpu("h100-sxm")
    k = Kernel("stream", reads={("hbm", "weights"): np.asarray(1e9)}, streaming="gemv")
    t = latency.kernel_seconds(k, g, cuda_graphs=True)
    assert t == pytest.approx(1e9 / (0.85 * 3352e9), rel=1e-12)        # not 2**30 bytes per GB
    k = Kernel("copy", engine="pcie", reads={("pcie", "keys"): np.asarray(55.63e9)}, transfers=1, count=0)
    assert latency.kernel_seconds(k, g) == pytest.approx(1.0 + 10e-6, rel=1e-12)


def test_flops_are_not_macs():
    n = 2048
    t = latency.simulate("llama-2-7b", "h100-sxm", "dense", 0, [n])
    flops = {k.name: float(np.sum(np.asarray(k.flops) * t.kernels.layer_counts)) for k in t.kernels.layer_kernels}
    assert flops["attention"] == 32 * (2 * 32 * n * 128 + 2 * 32 * n * 128)     # QK^T and PV, 2 per MAC
    assert flops["o_proj"] == 32 * 2 * 4096 * 4096
    lm = next(k for k in t.kernels.step_kernels if k.name == "lm_head")
    assert float(lm.flops) == 2 * 4096 * 32000


# PyramidKV's floored per-layer steps make the kept total fall as the mean capacity grows (below)
NOT_MONOTONE_IN_BUDGET = {"pyramidkv"}


def test_pyramidkv_kept_tokens_can_fall_when_capacity_grows():
    """KVCache-Factory's integer arithmetic, T = 5000, w = 8, beta = 20, 32 layers: capacity 54 keeps
    32 * 98 - 2 * 496 = 2144 tokens over the layers, capacity 61 keeps 32 * 112 - 3 * 496 = 2096."""
    from kvsparse.sim.costs.pyramidkv import pyramid_budget
    kept = [pyramid_budget(5000, capacity=c, window=8, beta=20, layer=np.arange(32), num_layers=32,
                           arithmetic="integer").sum() for c in (54, 61)]
    assert kept == [2144, 2096]


@pytest.mark.parametrize("name", BUDGETED)
def test_time_monotone_in_context_and_budget(name):
    contexts = np.unique(np.geomspace(64, 131072, 24).astype(int))
    budgets = np.unique(np.geomspace(64, 65536, 24).astype(int))    # above SnapKV's window (32)
    res = sweep.sweep("llama-3-8b", ["h100-sxm", "rtx-4090"], [name], budgets, contexts)
    t = res.step_seconds[0]                                   # [gpu, budget, context]
    assert np.all(np.diff(t, axis=-1) >= -1e-15), "time falls with context"
    if name in NOT_MONOTONE_IN_BUDGET:
        return
    sparse = budgets[:, None] < contexts[None, :]              # at budget >= context a method may go dense
    d = np.diff(t, axis=1)
    both_sparse = sparse[1:] & sparse[:-1]
    assert np.all(d[:, both_sparse] >= -1e-15), "time falls with budget"


# budget >= context: dense K/V reads (all memories together) plus the method's own overhead
BUDGET_COVERS = {"twilight": {"p": 1.0}}     # Twilight's top-p prunes even a full candidate set


@pytest.mark.parametrize("name", BUDGETED)
def test_budget_covering_context_gives_dense_plus_overhead(name):
    n = 3000
    kw = dict(params=BUDGET_COVERS.get(name), dense_layers=0)
    dense = latency.simulate("llama-3-8b", "h100-sxm", "dense", 0, [n])
    for budget in (n, 2 * n):
        t = latency.simulate("llama-3-8b", "h100-sxm", name, budget, [n], **kw)
        # the kernels that attend (not estimates or searches, whose reads are the method's overhead)
        attending = [k for k in t.kernels.attention if "attention" in k]
        kv = t.kernels.total(lambda k: k.read(None, ("keys", "values")), attending)
        kv_dense = dense.kernels.total(lambda k: k.read(None, ("keys", "values")), dense.kernels.attention)
        assert float(kv) == float(kv_dense)
        assert float(t.step_seconds) >= float(dense.step_seconds) - 1e-12


def test_budget_covering_context_quest_is_exactly_dense():
    """Quest's canonical rule: a budget covering the context is dense attention, no estimate."""
    a = latency.simulate("llama-3-8b", "h100-sxm", "quest", 5000, [5000], dense_layers=0)
    b = latency.simulate("llama-3-8b", "h100-sxm", "dense", 0, [5000])
    assert float(a.step_seconds) == pytest.approx(float(b.step_seconds), rel=1e-12)


def test_dense_first_layers_and_sparse_layers():
    n, budget = 32768, 2048
    t = latency.simulate("llama-3-8b", "h100-sxm", "quest", budget, [n], params={"group_union": 1})
    rows = {r["kernel"]: r for r in latency.kernel_table(t)}
    assert rows["dense_attention"]["layers"] == 2 and rows["sparse_attention"]["layers"] == 30
    row = 8 * 128 * 2                                       # one token, K or V, all 8 KV heads
    assert rows["dense_attention"]["HBM read MB"] * 1e6 == pytest.approx(2 * 2 * n * row)
    assert rows["sparse_attention"]["HBM read MB"] * 1e6 == pytest.approx(30 * 2 * budget * row)
    assert rows["quest_estimate"]["HBM read MB"] * 1e6 == pytest.approx(30 * 2 * (n // 16) * row)


def test_batch_with_different_lengths():
    lens = [1000, 5000, 30000]
    t = latency.simulate("llama-3-8b", "h100-sxm", "dense", 0, lens)
    kv = float(t.kernels.hbm_read_bytes(("keys", "values")))
    assert kv == 2 * 32 * 8 * 128 * 2 * sum(lens)            # not 3 x the mean rounded (Vidur's shortcut)
    att = next(r for r in latency.kernel_table(t) if r["kernel"] == "attention")
    one = latency.simulate("llama-3-8b", "h100-sxm", "dense", 0, [sum(lens)])
    # one launch for the batch: the K/V reads of one long request, the same kernel time up to the
    # three output rows written instead of one
    att1 = next(r for r in latency.kernel_table(one) if r["kernel"] == "attention")
    assert att["HBM read MB"] == att1["HBM read MB"]
    assert att["us/step"] == pytest.approx(att1["us/step"], rel=1e-3)
    # weights are read once per step, not per request
    assert float(t.kernels.hbm_read_bytes(("weights",))) < 1.01 * float(one.kernels.hbm_read_bytes(("weights",)))


def test_kv_dtypes_and_scales():
    n = 1000
    by = {}
    for kv in ("fp16", "fp8", "int8", "int4"):
        sk = latency.step_kernels("llama-2-7b", "dense", [n], kv=kv)
        by[kv] = (float(sk.hbm_read_bytes(("keys", "values"))), float(sk.hbm_read_bytes(("metadata",))))
    rows = 2 * 32 * 32 * n                                    # K and V rows over layers and heads
    assert by["fp16"] == (rows * 256, 0) and by["fp8"] == (rows * 128, 0)
    assert by["int8"] == (rows * 128, rows * 4)              # fp16 scale + zero per token and head
    assert by["int4"] == (rows * 64, rows * 4 * 4)           # 128 channels / 32 per group, 4 bytes each


def test_weights_dtype_and_generation():
    fp16 = latency.step_kernels("llama-3-8b", "dense", [100], weights="fp16").hbm_read_bytes(("weights",))
    int4 = latency.step_kernels("llama-3-8b", "dense", [100], weights="int4").hbm_read_bytes(("weights",))
    assert float(int4) == float(fp16) / 4
    total = latency.generation_seconds("llama-3-8b", "h100-sxm", "dense", prompt=1000, new_tokens=8)
    steps = [float(latency.simulate("llama-3-8b", "h100-sxm", "dense", 0, [1000 + j + 1]).step_seconds)
             for j in range(8)]
    assert total == pytest.approx(sum(steps), rel=1e-12)


def test_overlap_rules():
    g = hardware.gpu("h100-sxm")
    gpu = Kernel("a", reads={("hbm", "keys"): np.asarray(1e8)}, phase=0)
    host = Kernel("b", engine="host", reads={("host", "keys"): np.asarray(1e8)}, phase=0)
    after = Kernel("c", reads={("hbm", "keys"): np.asarray(1e6)}, phase=1)
    ts = [latency.kernel_seconds(k, g) for k in (gpu, host, after)]
    assert float(latency.combine([gpu, host, after], ts)) == pytest.approx(max(ts[0], ts[1]) + ts[2])


@given(st.integers(0, 200), st.integers(0, 200), st.integers(1, 200), st.integers(1, 9))
def test_range_rows_equals_rows_read_of_the_range(start, stop, n, page):
    ix = np.arange(max(0, min(start, n)), max(0, min(stop, n)))
    assert int(range_rows(start, stop, n, page)) == rows_read(ix, n, page)


def test_break_even_and_budget_for_target():
    res = sweep.sweep("llama-3-8b", ["h100-sxm"], ["dense", "quest"], [1024], [1024, 4096, 16384, 65536])
    be = res.break_even()
    faster = res.step_seconds[1, 0, 0] < res.step_seconds[0, 0, 0]
    assert be[1, 0, 0] == res.contexts[np.argmax(faster)] and faster[-1]
    assert be[0, 0, 0] == 0                                   # dense is never faster than itself
    target = float(latency.simulate("llama-3-8b", "h100-sxm", "quest", 3000, [65536]).step_seconds)
    b = sweep.budget_for_target("llama-3-8b", "h100-sxm", "quest", 65536, target)
    assert b is not None and b >= 3000
    slower = float(latency.simulate("llama-3-8b", "h100-sxm", "quest", b + 16, [65536]).step_seconds)
    assert slower > target
    assert sweep.budget_for_target("llama-3-8b", "h100-sxm", "quest", 65536, 1e-6) is None


def test_layer_dependent_cost_models_are_priced_per_layer():
    """A PyramidKV-like budget falling linearly with depth: each layer priced with its own budget."""
    from kvsparse.sim.costmodel import Query, kv_reads

    def pyramid(q: Query):
        budget = np.maximum(1, q.budget * (q.n_layers - q.layer) // q.n_layers)
        return [Kernel("pyramid_attention", reads=kv_reads(q, q.readers * np.minimum(q.n, budget)))]
    pyramid.method, pyramid.defaults, pyramid.layer_dependent = "pyramid-test", {}, True
    pyramid.uses_budget, pyramid.budget_param = True, None
    n, budget = 100_000, 3200
    sk = latency.step_kernels("llama-3-8b", pyramid, [n], budget)
    assert list(sk.layer_counts) == [1] * 32
    expected_rows = sum(8 * max(1, budget * (32 - layer) // 32) for layer in range(32))
    assert float(sk.hbm_read_bytes(("keys",))) == expected_rows * 256
    pyramid.layer_dependent = False            # priced as layer 0 everywhere: a different (wrong) answer
    sk = latency.step_kernels("llama-3-8b", pyramid, [n], budget)
    assert float(sk.hbm_read_bytes(("keys",))) == 32 * 8 * budget * 256


@given(st.integers(1, 5000), st.integers(1, 64), st.data())
def test_scattered_rows_bounds(n, page, data):
    """Expected rows of uniformly scattered tokens: at least the tokens, at most one page per token
    (and n), non-decreasing in the number of tokens, exact for token pages."""
    from kvsparse.sim.costmodel import scattered_rows
    k = data.draw(st.integers(0, n))
    r = int(scattered_rows(k, n, page))
    assert k <= r <= min(n, k * page)
    assert int(scattered_rows(k, n, 1)) == k
    if k < n:
        assert int(scattered_rows(k + 1, n, page)) >= r


def test_sweep_marks_refused_budgets_nan():
    """SnapKV refuses capacity <= window (as its oracle): that budget is NaN, the others are priced."""
    res = sweep.sweep("llama-3-8b", ["h100-sxm"], ["snapkv"], [16, 64], [4096, 8192])
    assert np.isnan(res.step_seconds[0, 0, 0]).all() and np.isfinite(res.step_seconds[0, 0, 1]).all()
    with pytest.raises(ValueError, match="capacity"):
        latency.simulate("llama-3-8b", "h100-sxm", "snapkv", 16, [4096])


# --- quantized caches: the --kv path and kv_quant agree; kv_quant's dense layers and appends -----------

INT4_G32 = dict(key_bits=4, value_bits=4, key_axis="token", value_axis="token", group_size=32, residual=0,
                scale_bits=16)
"""kv_quant's parameters equal to ``--kv int4`` (the preset ``int4-per-token-g32``; ``quest-int4`` with a base)."""


def test_kv_int4_quest_prices_page_metadata_at_fp16(capsys):
    """``kvsparse sim --kv int4 --method quest``: the min/max pages stay fp16 beside the int4 cache. Llama-3-8B
    (32 layers, H_kv = 8, d = 128), budget 2048 at 32K, Quest's 16-token pages and 2 dense first layers."""
    import json
    from kvsparse.cli import main
    n, budget, h_kv, d = 32768, 2048, 8, 128
    assert main(["sim", "--model", "llama-3-8b", "--method", "quest", "--budget", str(budget), "--context", "32k",
                 "--kv", "int4", "--param", "group_union=1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["kernel"]: r for r in data["kernels"]}
    min_max = 30 * 2 * (n // 16) * h_kv * d * 16 // 8          # (min, max) per page, fp16, 30 Quest layers
    assert rows["quest_estimate"]["HBM read MB"] * 1e6 == pytest.approx(min_max)
    scales = h_kv * (d // 32) * 4                             # fp16 scale + zero per 32 channels, per token
    attended = 2 * n * h_kv + 30 * budget * h_kv              # K (or V) rows: 2 dense layers, 30 sparse
    assert data["summary"]["hbm_read_GB_by_tensor"]["metadata"] * 1e9 == pytest.approx(
        min_max + 2 * attended * (d // 32) * 4)
    assert data["summary"]["hbm_read_GB_by_tensor"]["keys"] * 1e9 == pytest.approx(attended * d * 4 // 8)
    # the new token's K and V at 4 bits with their scales, every layer
    assert rows["kv_append"]["HBM write MB"] * 1e6 == pytest.approx(32 * 2 * (h_kv * d * 4 // 8 + scales))


COMPOSABLE = [n for n in ("dense", "quest", "double_sparsity", "sparq", "twilight", "retrieval_attention",
                          "vattention", "bigbird", "longformer", "sliding_window", "deja_vu", "cla")
              if n in registry.entries()]


@pytest.mark.parametrize("name", COMPOSABLE)
@pytest.mark.parametrize("kv, group", [("int4", 32), ("int8", 0)])
def test_kv_format_equals_kv_quant_over_the_method(name, kv, group):
    """A whole decode step at ``--kv int4|int8`` on a method equals ``kv_quant`` with per-token groups of that
    format over the same method at fp16: every read by (memory, tensor), the writes and the staged bytes,
    dense first layers and the K/V append included (one pricing convention for quantized caches)."""
    params = {**INT4_G32, "key_bits": int(kv[3:]), "value_bits": int(kv[3:]), "group_size": group, "base": name}
    for n in ([4096], [32768, 1000]):
        a = latency.step_kernels("llama-3-8b", name, n, None, kv=kv)
        b = latency.step_kernels("llama-3-8b", "kv_quant", n, None, kv="fp16", params=params)
        for mem in ("hbm", "pcie", "host"):
            for ten in ("keys", "values", "metadata", "auxiliary", "weights", "activations"):
                got = [float(sk.total(lambda k: k.reads.get((mem, ten), 0))) for sk in (a, b)]
                assert got[0] == got[1], (mem, ten, n)
        for amount in (lambda k: k.writes, lambda k: k.staged):
            assert float(a.total(amount)) == float(b.total(amount))


def test_kv_quant_over_quest_keeps_quests_dense_layers_over_the_quantized_cache():
    """kv_quant over Quest runs Quest's 2 dense first layers, as dense attention over the int4 cache:
    packed rows (64 B per K or V row of d = 128) plus 4 scale groups of 4 B, for every token and KV head."""
    n, h_kv, d = 32768, 8, 128
    assert latency.method_dense_layers("kv_quant", {"base": "quest"}) == 2
    assert latency.method_dense_layers("kv_quant", {"base": "quest", "dense_layers": 0}) == 0
    assert latency.method_dense_layers("kv_quant", {"base": None}) == 0
    t = latency.simulate("llama-3-8b", "h100-sxm", "kv_quant", 2048, [n], params={**INT4_G32, "base": "quest"})
    rows = {r["kernel"]: r for r in latency.kernel_table(t)}
    assert rows["dense_attention"]["layers"] == 2 and rows["sparse_attention"]["layers"] == 30
    assert rows["quest_estimate"]["layers"] == 30
    per_row = d * 4 // 8 + (d // 32) * 4
    assert rows["dense_attention"]["HBM read MB"] * 1e6 == pytest.approx(2 * 2 * n * h_kv * per_row)


def test_kv_quant_appends_at_the_quantized_width():
    """The K/V append of kv_quant: int4 per-token groups write packed codes and scales (not fp16 rows);
    KIVI-4 (keys per channel in 32-token blocks flushed 128 at a time, values per token, R = 128) writes the
    new token at fp16 into the residual and quantizes what leaves it."""
    h_kv, d, layers, fp16 = 8, 128, 32, 128 * 2

    def append(n, **params):
        sk = latency.step_kernels("llama-3-8b", "kv_quant", [n], None, params=params)
        return (float(sk.total(lambda k: k.writes, kernels=["kv_append"])),
                float(sk.total(lambda k: k.staged, kernels=["kv_append"])))
    # int4, 32-channel groups, no residual: each step writes 64 B of codes + 4 x 4 B of scales per K and V row
    assert append(5000, **INT4_G32) == (layers * h_kv * 2 * (d // 2 + 4 * 4), 0)
    fp16_append = latency.step_kernels("llama-3-8b", "dense", [5000])
    assert float(fp16_append.total(lambda k: k.writes, kernels=["kv_append"])) == layers * h_kv * 2 * fp16
    kivi = dict(key_bits=4, value_bits=4, key_axis="channel", value_axis="token", group_size=32, residual=128,
                residual_rule="kivi", scale_bits=16)
    # n = 1000: keys quantized 128 * floor(999 / 128) = 896 before and after (no flush); values
    # n - 129 = 871 after, 870 before: one value row leaves the residual (64 B + 4 scale pairs of 4 B) and is
    # re-read at fp16; the new K and V rows go in at fp16
    assert append(1000, **kivi) == (layers * h_kv * (2 * fp16 + 64 + 16), layers * h_kv * fp16)
    # n = 1025: a key flush, 128 * floor(1024 / 128) = 1024 keys quantized after, 896 before: 128 packed key
    # rows and 4 new 32-token blocks of 128 channel scale pairs, the 128 fp16 rows re-read
    keys = 128 * 64 + 4 * 128 * 4
    assert append(1025, **kivi) == (layers * h_kv * (2 * fp16 + keys + 64 + 16), layers * h_kv * 129 * fp16)


def test_layer_classes_is_public_and_used_by_evaluate_and_replay():
    import inspect
    from kvsparse.sim import evaluate, replay
    reps, counts = latency.layer_classes(latency.get_model("llama-3-8b"), 2, False)
    assert list(reps) == [0, 2] and list(counts) == [2, 30]
    reps, counts = latency.layer_classes(latency.get_model("llama-3-8b"), 2, True)
    assert list(reps) == list(range(32)) and list(counts) == [1] * 32
    assert latency.layer_classes.__doc__
    assert not hasattr(latency, "_layer_classes")
    for module in (evaluate, replay, latency):
        assert "_layer_classes" not in inspect.getsource(module)


def test_mla_and_lorc_latents_carry_their_scales_at_int8_and_int4():
    """Llama-3-8B shape (32 layers, 8 KV heads, d = 128), n = 1000. MLA read as 8 rows of 128 per token and
    layer; LoRC's latents of rank 0.5 * 8 * 128 = 512 for K and for V. int8: one 4-byte scale per row;
    int4: 4 bytes per 32 elements."""
    n, layers = 1000, 32
    want = {("mla", "int8"): 8 * n * layers * 4, ("mla", "int4"): 8 * n * layers * (128 // 32) * 4,
            ("lorc", "int8"): 2 * n * layers * 4, ("lorc", "int4"): 2 * n * layers * (512 // 32) * 4}
    for (method, kv), scales in want.items():
        sk = latency.step_kernels("llama-3-8b", method, [n], kv=kv)
        assert float(sk.hbm_read_bytes(("metadata",))) == scales, (method, kv)
    for method in ("mla", "lorc"):
        assert float(latency.step_kernels("llama-3-8b", method, [n], kv="fp16").hbm_read_bytes(("metadata",))) == 0
