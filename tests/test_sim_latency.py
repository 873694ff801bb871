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
