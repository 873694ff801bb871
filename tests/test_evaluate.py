"""kvsparse evaluate: exact quality metrics on a trace beside simulated cost."""
import numpy as np
import pytest

from kvsparse import cli
from kvsparse.oracle import core
from kvsparse.oracle.quest import Quest
from kvsparse.sim import latency
from kvsparse.sim.evaluate import (DEFAULT_TRACE, evaluate, gpu_list, group_incidence, group_union_estimate,
                                   method_with_budget, quality_rows)
from kvsparse.traces.format import load_trace


@pytest.fixture(scope="module")
def short_layer():
    trace = load_trace(DEFAULT_TRACE)
    return tuple(np.asarray(a[:400], np.float64) for a in trace.layer(trace.layers[0]).sequences())


def test_budget_covering_the_context_is_exact(short_layer):
    row = quality_rows(*short_layer, Quest(token_budget=4096), steps=3)
    assert row["rel_error"] == 0.0 and row["mass"] == pytest.approx(1.0) and row["topk_overlap"] == 1.0


def test_metrics_against_a_hand_computation(short_layer):
    q, k, v = short_layer
    method = Quest(token_budget=64, page_size=16)
    row = quality_rows(q, k, v, method, steps=1)
    t = q.shape[0] - 1
    kc, vc = k[: t + 1].transpose(1, 0, 2), v[: t + 1].transpose(1, 0, 2)
    res = method.step(q[t], kc, vc)
    p = core.softmax(core.logits(q[t], kc))
    exact = core.attend_dense(q[t], kc, vc)
    errs = [np.linalg.norm(res.output[h] - exact[h]) / np.linalg.norm(exact[h]) for h in range(q.shape[1])]
    mass = [p[h, res.selection.indices[h]].sum() for h in range(q.shape[1])]
    overlap = [len(set(res.selection.indices[h]) & set(np.argsort(-p[h], kind="stable")[: res.selection.sizes[h]]))
               / res.selection.sizes[h] for h in range(q.shape[1])]
    assert row["rel_error"] == pytest.approx(np.mean(errs))
    assert row["mass"] == pytest.approx(np.mean(mass))
    assert row["topk_overlap"] == pytest.approx(np.mean(overlap))
    assert 0 < row["mass"] < 1 and 0 < row["topk_overlap"] <= 1


def test_more_budget_is_never_worse_for_quest_on_the_trace():
    rows = [r for r in evaluate(DEFAULT_TRACE, ["quest"], [64, 256, 1024], steps=2) if r["layer"] == "all"]
    errs = [r["rel_error"] for r in rows]
    times = [r["us_per_token"] for r in rows]
    assert errs[0] > errs[1] > errs[2] and times[0] < times[1] < times[2]


def test_method_with_budget_sets_the_cost_models_parameter():
    assert method_with_budget("quest", 128).token_budget == 128
    with pytest.raises(ValueError, match="no budget hyper-parameter"):
        method_with_budget("dense", 128)
    with pytest.raises(ValueError, match="budget must be > 0"):
        method_with_budget("quest", 0)


def test_cli_writes_table_csv_and_plot(tmp_path, capsys):
    csv_path, png = tmp_path / "e.csv", tmp_path / "e.png"
    assert cli.main(["evaluate", "--methods", "quest,sparq", "--budgets", "64,256", "--steps", "2",
                     "--csv", str(csv_path), "--plot", str(png), "--context", "32k", "--model", "llama-3-8b"]) == 0
    out = capsys.readouterr().out
    assert "rel_error" in out and "context 32768" in out
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * 3          # header + (method, budget) x (2 layers + overall)
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 1000
    assert cli.main(["evaluate", "--layers", "5"]) == 2


def test_oracle_bytes_and_measured_union_against_a_hand_computation(short_layer):
    q, k, v = short_layer
    method = Quest(token_budget=64, page_size=16)
    row = quality_rows(q, k, v, method, steps=2)
    hbm, union, per_head = [], 0, 0.0
    for t in (q.shape[0] - 2, q.shape[0] - 1):
        kc, vc = k[: t + 1].transpose(1, 0, 2), v[: t + 1].transpose(1, 0, 2)
        res = method.step(q[t], kc, vc)
        hbm.append(sum(b for (mem, _), b in res.traffic.bytes.items() if mem == "hbm"))
        g = q.shape[1] // k.shape[1]
        union += sum(len(set().union(*(set(res.selection.indices[h]) for h in range(j * g, (j + 1) * g))))
                     for j in range(k.shape[1]))
        per_head += np.mean([len(ix) for ix in res.selection.indices])
    assert row["oracle_hbm_bytes"] == pytest.approx(np.mean(hbm)) and row["oracle_pcie_bytes"] == 0
    assert row["trace_group_union"] == pytest.approx(union / (k.shape[1] * per_head))
    assert 1 < row["trace_group_union"] < q.shape[1] // k.shape[1]


def test_group_union_estimate_by_hand():
    """One KV group of G_t = 3 heads, A = {0,1,2,3}, B = {2,3,4,5}, C = {3,6,7,8} in a 20-token cache:
    token 3 in all three, token 2 in two, seven tokens in one (Q1 = 7, Q2 = 1, Q3 = 1), mean size 4."""
    import itertools
    sets = [{0, 1, 2, 3}, {2, 3, 4, 5}, {3, 6, 7, 8}]
    inc = group_incidence([np.array(sorted(s)) for s in sets], 20)
    assert list(inc) == [7, 1, 1]
    mean = np.mean([len(s) for s in sets])
    # G = G_t: the measured union; G < G_t: the mean union over every G-head subset (enumerated here)
    assert group_union_estimate([inc], [20], 3) == (pytest.approx(9 / mean), "trace")
    pairs = np.mean([len(a | b) for a, b in itertools.combinations(sets, 2)])          # (6 + 7 + 7) / 3
    assert group_union_estimate([inc], [20], 2) == (pytest.approx(pairs / mean), "subsets")
    assert group_union_estimate([inc], [20], 1) == (pytest.approx(1.0), "subsets")
    # G > G_t: Chao et al. 2014 incidence extrapolation, Q0 = (2/3) * 7^2 / (2 * 1) = 49/3 tokens unseen,
    # one more head adds Q0 * (1 - (1 - 7 / (3 * 49/3 + 7))) = (49/3) / 8 of them
    u4, source = group_union_estimate([inc], [20], 4)
    assert source == "extrapolated" and u4 == pytest.approx((9 + 49 / 3 / 8) / mean)
    # identical sets stay identical at any G; disjoint ones stay (nearly) disjoint; the cache caps the union
    same = group_incidence([np.arange(50)] * 3, 1000)
    assert group_union_estimate([same], [1000], 4)[0] == 1.0 and group_union_estimate([same], [1000], 8)[0] == 1.0
    apart = group_incidence([np.arange(50), np.arange(50, 100), np.arange(100, 150)], 1000)
    # Q1 = 150, Q2 = 0: Q0 = (2/3) * 150 * 149 / 2 = 7450; one more head adds 7450 * 150 / (3 * 7450 + 150)
    assert group_union_estimate([apart], [1000], 4)[0] == pytest.approx((150 + 7450 * 150 / 22500) / 50)
    assert group_union_estimate([apart], [160], 4)[0] == pytest.approx(160 / 50)
    # groups add up (sum of unions over sum of mean sizes); nothing to say for an MHA trace or empty selections
    assert group_union_estimate([inc, same], [20, 1000], 3)[0] == pytest.approx((9 + 50) / (mean + 50))
    assert group_union_estimate([[7]], [20], 4) is None and group_union_estimate([[0, 0, 0]], [20], 4) is None


def test_measured_union_prices_the_oracles_bytes_per_layer():
    """SnapKV one step after the prompt: the cost model's kept tokens per head equal the oracle's, so with
    the union measured on the trace the simulated attention bytes of one layer are the oracle's, up to
    rounding the per-KV-head mean union up to whole rows (< h_kv rows); the analytic G is far above."""
    trace = load_trace(DEFAULT_TRACE)
    rows = evaluate(trace, ["snapkv"], [512], steps=1, model="smollm2-135m")
    row_bytes = 2 * trace.d * 2                                    # fp16 key + value row
    per_layer = [r for r in rows if r["layer"] != "all"]
    assert len(per_layer) == len(trace.layers)
    for r in per_layer:
        assert r["group_union_source"] == "trace" and r["group_union"] == r["trace_group_union"]
        assert 0 <= r["layer_attn_hbm_read_bytes"] - r["oracle_hbm_bytes"] < trace.h_kv * row_bytes
        assert r["us_per_token"] is None and r["layer_attention_us"] > 0    # no step cost in layer rows
    assert len({r["layer_attn_hbm_read_bytes"] for r in per_layer}) == len(per_layer)   # layers differ
    analytic = latency.step_kernels("smollm2-135m", "snapkv", [trace.n_tokens], 512)
    top = max(r["layer_attn_hbm_read_bytes"] for r in per_layer)
    assert analytic.total(lambda k: k.read("hbm"), kernels=analytic.attention) / 30 > 1.2 * top
    overall = [r for r in rows if r["layer"] == "all"][0]
    assert overall["oracle_hbm_bytes"] == pytest.approx(sum(r["oracle_hbm_bytes"] for r in per_layer))
    # SnapKV runs in every one of SmolLM2's 30 layers: the step's attention is 30 such layers
    assert overall["sim_attn_hbm_read_bytes"] == pytest.approx(30 * overall["layer_attn_hbm_read_bytes"])
    assert overall["attention_us"] == pytest.approx(30 * overall["layer_attention_us"])


def test_union_is_extrapolated_to_the_models_group_and_said_when_unused():
    """Llama-3-8B has G = 4 query heads per KV head, the trace G_t = 3: the union priced is the trace's
    selections extrapolated to 4 heads (per layer; the mean over layers in the all row), never below the
    measured 3-head union nor above 4."""
    rows = evaluate(DEFAULT_TRACE, ["snapkv", "streaming_llm"], [256], steps=1, model="llama-3-8b", context=32768)
    trace = load_trace(DEFAULT_TRACE)
    per_layer = [r for r in rows if r["method"] == "snapkv" and r["layer"] != "all"]
    for r in per_layer:
        assert r["group_union_source"] == "extrapolated"
        assert r["trace_group_union"] <= r["group_union"] <= 4
        seqs = tuple(core.as_float64(a, "trace") for a in trace.layer(r["layer"]).sequences())
        measured = quality_rows(*seqs, method_with_budget("snapkv", 256), 1)
        assert r["group_union"] == group_union_estimate(measured["incidence"], measured["cache_len"], 4)[0]
    snap, stream = [r for r in rows if r["layer"] == "all"]
    assert snap["group_union_source"] == "extrapolated"
    assert snap["group_union"] == pytest.approx(np.mean([r["group_union"] for r in per_layer]))
    analytic = latency.step_kernels("llama-3-8b", "snapkv", [32768], snap["sim_budget"])
    assert snap["sim_attn_hbm_read_bytes"] < analytic.total(lambda k: k.read("hbm"), kernels=analytic.attention)
    assert stream["group_union_source"] == "unused" and np.isnan(stream["group_union"])


def test_several_gpus_price_the_same_quality():
    rows = evaluate(DEFAULT_TRACE, ["quest"], [256], steps=1, gpu="h100-sxm, rtx-4090", context=32768,
                    model="llama-3-8b")
    h100 = [r for r in rows if r["gpu"] == "h100-sxm"]
    rtx = [r for r in rows if r["gpu"] == "rtx-4090"]
    assert len(h100) == len(rtx) == 3
    for a, b in zip(h100, rtx):
        assert a["rel_error"] == b["rel_error"] and a["oracle_hbm_bytes"] == b["oracle_hbm_bytes"]
        assert a["layer_attn_hbm_read_bytes"] == b["layer_attn_hbm_read_bytes"]
    assert rtx[-1]["us_per_token"] > 1.5 * h100[-1]["us_per_token"]     # 1.0 vs 3.35 TB/s HBM
    with pytest.raises(TypeError, match="gpu"):
        gpu_list(5)
    with pytest.raises(ValueError, match="gpu"):
        gpu_list(" , ")


def test_cli_prices_several_gpus_with_a_panel_each(tmp_path, capsys):
    csv_path, one, two = tmp_path / "e.csv", tmp_path / "one.png", tmp_path / "two.png"
    common = ["evaluate", "--methods", "quest,snapkv", "--budgets", "256", "--steps", "1"]
    assert cli.main(common + ["--gpus", "h100-sxm,rtx-4090", "--csv", str(csv_path), "--plot", str(two)]) == 0
    out = capsys.readouterr().out
    assert "h100-sxm, rtx-4090" in out and "group_union" in out and "attn_hbm_MB" in out
    assert len(csv_path.read_text().splitlines()) == 1 + 2 * 2 * 3     # (method, GPU) x (2 layers + overall)
    assert cli.main(common + ["--gpu", "h100-sxm,rtx-4090"]) == 0
    assert cli.main(common + ["--gpu", "h100-sxm", "--gpus", "rtx-4090"]) == 2
    assert cli.main(common + ["--gpus", "h100-sxm,no-such-gpu"]) == 2
    mpimg = pytest.importorskip("matplotlib.image")
    assert cli.main(common + ["--plot", str(one)]) == 0
    assert mpimg.imread(two).shape[1] >= 1.9 * mpimg.imread(one).shape[1]


def test_layer_cost_is_a_layer_where_the_method_runs():
    """Quest runs dense attention in SmolLM2's first 2 of 30 layers: the one-layer cost is a Quest layer,
    and the step's attention is 28 of them plus 2 dense layers (h_kv x n rows of fp16 K and V each)."""
    trace = load_trace(DEFAULT_TRACE)
    overall = [r for r in evaluate(trace, ["quest"], [256], steps=1, model="smollm2-135m")
               if r["layer"] == "all"][0]
    dense_layer = trace.h_kv * trace.n_tokens * 2 * trace.d * 2
    assert overall["layer_attn_hbm_read_bytes"] < dense_layer / 2
    assert overall["sim_attn_hbm_read_bytes"] == 28 * overall["layer_attn_hbm_read_bytes"] + 2 * dense_layer


def test_pyramidkv_is_evaluated_at_the_traces_layer():
    """PyramidKV's budget depends on the layer: each trace layer is run as that layer of the trace's model."""
    import dataclasses
    from kvsparse.oracle.pyramidkv import PyramidKV
    from kvsparse.sim.evaluate import at_layer, quality_rows
    trace = load_trace(DEFAULT_TRACE)
    n_layers = trace.metadata["config"]["n_layers"]
    base = method_with_budget("pyramidkv", 128)
    assert at_layer(base, 27, trace) == dataclasses.replace(base, layer=27, num_layers=n_layers)
    assert at_layer(method_with_budget("snapkv", 128), 27, trace) == method_with_budget("snapkv", 128)
    rows = {r["layer"]: r for r in evaluate(trace, ["pyramidkv"], [128], steps=2) if r["layer"] != "all"}
    seqs = tuple(core.as_float64(a, "trace") for a in trace.layer(27).sequences())
    expected = quality_rows(*seqs, PyramidKV(**{**dataclasses.asdict(base), "layer": 27, "num_layers": n_layers}), 2)
    at_zero = quality_rows(*seqs, base, 2)
    assert rows[27]["rel_error"] == expected["rel_error"] != at_zero["rel_error"]
