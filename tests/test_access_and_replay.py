"""Access traces (what a method read) and their replay against an LRU GPU cache over PCIe."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvsparse.oracle import Layout, Selection
from kvsparse.oracle.dense import Dense
from kvsparse.sim import replay as replay_module
from kvsparse.sim.replay import PREFETCH, layer_compute_seconds, replay, step_seconds
from kvsparse.traces.access import AccessTrace, from_selections, kv_reads, record_access


def trace_of(per_step_ids, n_units, h_kv=1, unit_bytes=10, unit_sizes=None):
    """One layer; per_step_ids[s][h] lists the ids read by KV head h at step s."""
    return layered_trace([[heads] for heads in per_step_ids], n_units, h_kv, unit_bytes, unit_sizes)


def layered_trace(reads, n_units, h_kv=1, unit_bytes=10, unit_sizes=None):
    """reads[s][l][h] lists the ids read by KV head h of layer l at step s."""
    n_layers = len(reads[0])
    ids, offsets, pos = [], np.zeros((len(reads), n_layers, h_kv + 1), np.int64), 0
    for s, layers in enumerate(reads):
        for li, heads in enumerate(layers):
            offsets[s, li, 0] = pos
            for h, r in enumerate(heads):
                ids.extend(r)
                pos += len(r)
                offsets[s, li, h + 1] = pos
    return AccessTrace("token", unit_bytes, n_units, tuple(range(n_layers)), h_kv, np.array(ids, np.int32), offsets,
                       unit_sizes)


def test_lru_by_hand():
    # capacity 2 units of 10 bytes; reads: [0,1] [0,2] [1] -> step0: 2 misses; step1: 0 hits, 2 misses (evicts 1)
    # step2: 1 was evicted -> miss
    t = trace_of([[[0, 1]], [[0, 2]], [[1]]], 3)
    r = replay(t, 20, link_gbps=1.0)
    assert list(r.hits) == [0, 1, 0] and list(r.misses) == [2, 1, 1]
    assert list(r.pcie_bytes) == [20, 10, 10]
    assert r.hit_rate == pytest.approx(1 / 5)


@given(st.integers(1, 30), st.integers(1, 4), st.integers(0, 2**32 - 1), st.sampled_from(PREFETCH))
def test_trace_that_fits_costs_nothing_after_warm_up(steps, h_kv, seed, prefetch):
    rng = np.random.default_rng(seed)
    n_units = 20
    per_step = [[sorted(rng.choice(n_units, rng.integers(0, 8), replace=False)) for _ in range(h_kv)]
                for _ in range(steps)]
    t = trace_of(per_step, n_units, h_kv)
    r = replay(t, n_units * h_kv * t.unit_bytes, link_gbps=10.0, prefetch=prefetch)
    seen = set()
    for s in range(steps):
        new = {(h, u) for h in range(h_kv) for u in per_step[s][h]} - seen
        assert r.pcie_bytes[s] == len(new) * t.unit_bytes      # only first touches cross PCIe
        seen |= new


@given(st.integers(1, 20), st.integers(0, 2**32 - 1), st.sampled_from(PREFETCH))
def test_cache_of_size_zero_sends_every_selected_byte(steps, seed, prefetch):
    rng = np.random.default_rng(seed)
    per_step = [[sorted(rng.choice(50, rng.integers(0, 10), replace=False)) for _ in range(2)] for _ in range(steps)]
    t = trace_of(per_step, 50, 2)
    r = replay(t, 0, link_gbps=5.0, link_latency_s=1e-6, prefetch=prefetch)
    assert np.array_equal(r.pcie_bytes, t.step_bytes())
    assert r.hits.sum() == 0 and r.prefetch_bytes.sum() == 0      # nowhere to put a prefetch
    assert np.allclose(r.seconds, t.step_bytes() / 5e9 + r.transfers * 1e-6)


def test_cluster_units_have_their_own_sizes():
    sizes = np.array([[[3, 1, 5]]])           # tokens per cluster
    t = trace_of([[[0, 2]], [[1]], [[0]]], 3, unit_sizes=sizes)
    # room for 8 tokens: clusters 0 (3) and 2 (5) fill it; cluster 1 (1) then evicts the LRU one, 0,
    # which step 2 must fetch again
    assert list(replay(t, 8 * 10, link_gbps=1.0).pcie_bytes) == [80, 10, 30]
    # room for 9 tokens: nothing is evicted
    assert list(replay(t, 9 * 10, link_gbps=1.0).pcie_bytes) == [80, 10, 0]
    # a cluster larger than the whole cache bypasses it (fetched every time, evicting nothing)
    big = trace_of([[[0, 2]], [[2]], [[0, 2]]], 3, unit_sizes=sizes)
    assert list(replay(big, 4 * 10, link_gbps=1.0).pcie_bytes) == [80, 50, 50]


# --- prefetch and latency ------------------------------------------------------------------------

def test_prefetch_and_overlap_by_hand():
    # 10 bytes take 1 s on this link; one layer computes for 1 s
    t = trace_of([[[0, 1]], [[2, 3]], [[4]]], 5)
    kw = dict(link_gbps=1e-8, layer_compute_seconds=1.0)
    none = replay(t, 1000, **kw)
    assert list(none.seconds) == pytest.approx([3, 3, 2])         # demand copy, then compute
    nl = replay(t, 1000, prefetch="next_layer", **kw)
    # step 0 is on demand (2 s), and step 1's 2 s prefetch runs during its compute (1 s): 2 + max(1, 2);
    # step 1 hides step 2's 1 s prefetch: 0 + max(1, 1); step 2 has nothing after it: 0 + 1
    assert list(nl.seconds) == pytest.approx([4, 1, 1])
    assert list(nl.demand_bytes) == [20, 0, 0] and list(nl.prefetch_bytes) == [0, 20, 10]
    assert np.array_equal(nl.pcie_bytes, none.pcie_bytes) and list(nl.prefetch_hits) == [0, 2, 1]
    assert list(nl.exposed_seconds) == pytest.approx([3, 0, 0])


def test_previous_step_prefetch_by_hand():
    # two layers whose sets cannot share a 2-unit cache: LRU alone misses everything every step
    t = layered_trace([[[[0, 1]], [[0, 1]]]] * 3, 2)
    none = replay(t, 20, link_gbps=1.0)
    prev = replay(t, 20, link_gbps=1.0, prefetch="previous_step")
    assert list(none.misses) == [4, 4, 4]
    assert list(prev.misses) == [4, 0, 0] and list(prev.prefetch_bytes) == [0, 40, 40]
    # a wrong prediction: step 1 reads something else, so step 1's prefetch is wasted and step 2's too
    wrong = layered_trace([[[[0, 1]], [[0, 1]]], [[[2, 3]], [[2, 3]]], [[[0, 1]], [[0, 1]]]], 4)
    w = replay(wrong, 20, link_gbps=1.0, prefetch="previous_step")
    assert list(w.prefetched) == [0, 4, 4] and list(w.prefetch_hits) == [0, 0, 0] and list(w.misses) == [4, 4, 4]


def reads_strategy(static: bool):
    """Random multi-layer token traces; ``static``: every step reads what the previous one did."""
    @st.composite
    def build(draw):
        steps, layers, h_kv = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
        ids = st.lists(st.integers(0, 11), max_size=6, unique=True).map(sorted)
        first = [[draw(ids) for _ in range(h_kv)] for _ in range(layers)]
        reads = [first if static or s == 0 else [[draw(ids) for _ in range(h_kv)] for _ in range(layers)]
                 for s in range(steps)]
        return layered_trace(reads, 12, h_kv), draw(st.integers(0, 12 * layers * h_kv)) * 10
    return build()


def check_right_prediction(trace, capacity, prefetch):
    """On a trace where ``prefetch``'s prediction is right: it moves the same bytes as demand paging,
    never adds a demand miss, and leaves none in a layer whose reads fit in the cache (step 0, and
    for next_layer only step 0's first layer, have no earlier window to prefetch in)."""
    none = replay(trace, capacity, link_gbps=1.0)
    pf = replay(trace, capacity, link_gbps=1.0, prefetch=prefetch)
    assert np.array_equal(pf.pcie_bytes, none.pcie_bytes), "prefetch changed the bytes moved"
    assert np.all(pf.misses <= none.misses), "prefetch added demand misses"
    assert np.array_equal(pf.hits - pf.prefetch_hits, none.hits), "prefetch changed the cache's reuse"
    fits = all(trace.bytes_of(li, h, trace.reads(s, li, h)) * trace.h_kv <= capacity
               for s in range(trace.steps) for li in range(len(trace.layers)) for h in range(trace.h_kv))
    if fits and trace.steps > 1:
        assert pf.misses[1:].sum() == 0, "a prefetch that fits left demand misses"
    return none, pf


@given(reads_strategy(static=False))
def test_next_layer_prefetch_never_adds_demand_misses(case):
    check_right_prediction(*case, "next_layer")             # its prediction is the read set itself


@given(reads_strategy(static=True))
def test_previous_step_prefetch_never_adds_demand_misses_when_reads_repeat(case):
    check_right_prediction(*case, "previous_step")


def test_a_prefetch_that_counts_no_bytes_is_caught(monkeypatch):
    """Planted bug: the kernel forgets the prefetch's bytes and gathers (free prefetches)."""
    real = replay_module._replay_kernel

    def free_prefetch(*args):
        out = list(real(*args))
        out[6][:] = 0
        out[7][:] = 0
        return tuple(out)
    t = layered_trace([[[[0, 1]], [[2]]], [[[3]], [[0, 4]]], [[[1, 5]], [[6]]]], 7)
    check_right_prediction(t, 1000, "next_layer")
    monkeypatch.setattr(replay_module, "_replay_kernel", free_prefetch)
    with pytest.raises(AssertionError, match="bytes moved"):
        check_right_prediction(t, 1000, "next_layer")


@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**32 - 1), st.floats(0, 1e-3))
def test_step_latency_is_monotone_in_transfer_time(steps, layers, seed, compute):
    rng = np.random.default_rng(seed)
    demand, pf = rng.random((steps, layers)) * 1e-3, rng.random((steps, layers)) * 1e-3
    base = step_seconds(demand, pf, compute)
    s, li = rng.integers(steps), rng.integers(layers)
    for arr in (demand, pf):
        arr[s, li] += rng.random() * 1e-3
        more = step_seconds(demand, pf, compute)
        assert np.all(more >= base) and more.sum() >= base.sum()
        base = more
    # demand time is never hidden: one more demand second is one more second of latency
    demand[s, li] += 1.0
    assert step_seconds(demand, pf, compute).sum() == pytest.approx(base.sum() + 1.0)


@given(st.integers(1, 12), st.integers(1, 3), st.integers(0, 2**32 - 1), st.sampled_from(["none", "next_layer"]))
def test_latency_is_monotone_in_pcie_bytes_across_cache_sizes(steps, h_kv, seed, prefetch):
    """Token units (one size): LRU's stack property makes a smaller cache move at least the bytes of a
    larger one at every step; the latency of the whole replay must follow the bytes. (Not for
    previous_step: a larger cache lets it issue prefetches that a wrong prediction wastes, so its
    bytes, and its latency with them, can grow with the cache.)"""
    rng = np.random.default_rng(seed)
    reads = [[[sorted(rng.choice(16, rng.integers(0, 7), replace=False)) for _ in range(h_kv)] for _ in range(2)]
             for _ in range(steps)]
    t = layered_trace(reads, 16, h_kv)
    runs = [replay(t, cap * 10, link_gbps=1e-8, link_latency_s=0.5, prefetch=prefetch, layer_compute_seconds=0.7)
            for cap in range(0, 2 * 16 * h_kv + 1, 4)]
    for small, large in zip(runs, runs[1:]):
        assert np.all(small.pcie_bytes >= large.pcie_bytes)
        assert small.seconds.sum() >= large.seconds.sum() - 1e-9
        if prefetch == "none":
            assert np.all(small.seconds >= large.seconds - 1e-9)


def test_layer_compute_comes_from_the_simulator():
    from kvsparse.sim import latency
    # Quest runs on the GPU only: its layer is the simulator's layer (layers 2.. of Llama-3-8B)
    t = latency.simulate("llama-3-8b", "h100-sxm", "quest", 2048, [32768])
    layer = layer_compute_seconds("llama-3-8b", "h100-sxm", "quest", 2048, [32768])
    assert layer.shape == (1,) and layer[0] == pytest.approx(float(t.layer_seconds[-1]))
    attn = layer_compute_seconds("llama-3-8b", "h100-sxm", "quest", 2048, [32768], part="attention")
    assert 0 < attn[0] < layer[0]
    grows = layer_compute_seconds("llama-3-8b", "h100-sxm", "quest", 2048, [8192, 32768, 131072])
    assert np.all(np.diff(grows) > 0)
    # Double Sparsity's offload path: its own host-link copy is left out (the replay times the misses)
    pcie = layer_compute_seconds("llama-3-8b", "h100-sxm", "double_sparsity", 2048, [32768],
                                 params={"kv_memory": "pcie"})
    full = latency.simulate("llama-3-8b", "h100-sxm", "double_sparsity", 2048, [32768], params={"kv_memory": "pcie"})
    assert pcie[0] < float(full.layer_seconds[-1])
    with pytest.raises(ValueError, match="part"):
        layer_compute_seconds("llama-3-8b", "h100-sxm", "quest", 2048, [32768], part="mlp")
    with pytest.raises(ValueError, match="contexts"):
        layer_compute_seconds("llama-3-8b", "h100-sxm", "quest", 2048, [0])
    # the replay's compute is layers x one layer, and with no prefetch the latency is compute + demand
    tr = layered_trace([[[[0]], [[1]]]] * 2, 2)
    r = replay(tr, 0, link_gbps=1.0, layer_compute_seconds=layer[0])
    assert r.compute_seconds == pytest.approx([2 * layer[0]] * 2)
    assert r.seconds == pytest.approx(2 * layer[0] + r.demand_bytes / 1e9)


def test_access_trace_from_an_oracle_run_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    T, h_q, h_kv, d = 12, 4, 2, 8
    layers = {li: (rng.standard_normal((T, h_q, d)), rng.standard_normal((T, h_kv, d)), rng.standard_normal((T, h_kv, d)))
              for li in (0, 3)}
    t = record_access(Dense(), layers, prefill_len=8)
    assert t.steps == 4 and t.layers == (0, 3)
    assert list(t.reads(2, 1, 1)) == list(range(11))          # dense reads tokens 0..t at step t = 8 + 2
    assert t.unit_bytes == 2 * d * 2
    path = tmp_path / "a.npz"
    t.save(path)
    u = AccessTrace.load(path)
    assert np.array_equal(u.ids, t.ids) and np.array_equal(u.offsets, t.offsets) and u.metadata == t.metadata
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid access trace"):
        AccessTrace.load(path)


def test_page_units_and_gqa_union():
    sel = Selection(([0, 1, 17], [2], [40], [41]), n=50)
    assert [list(r) for r in kv_reads(sel, 2, page_size=16)] == [[0, 1], [2]]
    t = from_selections([[sel]], [0], 2, 8, Layout(page_size=16))
    assert t.unit == "page" and t.n_units == 4 and t.unit_bytes == 2 * 16 * 16


def test_bad_inputs():
    t = trace_of([[[0]]], 2)
    with pytest.raises(ValueError, match="prefetch"):
        replay(t, 10, link_gbps=1.0, prefetch="magic")
    with pytest.raises(ValueError, match="prefetch"):
        replay(t, 10, link_gbps=1.0, prefetch="perfect")       # the old generic policy is gone
    with pytest.raises(ValueError, match="link_gbps"):
        replay(t, 10, link_gbps=float("nan"))
    with pytest.raises(TypeError, match="link_latency_s"):
        replay(t, 10, link_gbps=1.0, link_latency_s="1us")
    with pytest.raises(ValueError, match="layer_compute_seconds"):
        replay(t, 10, link_gbps=1.0, layer_compute_seconds=-1.0)
    with pytest.raises(ValueError, match="layer_compute_seconds"):
        replay(t, 10, link_gbps=1.0, layer_compute_seconds=[1.0, 2.0])   # one step, two values
    with pytest.raises(TypeError, match="capacity_bytes"):
        replay(t, 10.0, link_gbps=1.0)
    with pytest.raises(ValueError, match="capacity_bytes must be >= 0"):
        replay(t, -1, link_gbps=1.0)
    with pytest.raises(ValueError, match="ids must lie"):
        trace_of([[[5]]], 2)


def test_cluster_access_of_clusterkv_on_the_shipped_trace():
    from kvsparse.oracle.clusterkv import ClusterKV
    from kvsparse.traces.access import record_cluster_access
    from kvsparse.traces.format import load_trace
    from kvsparse.sim.evaluate import DEFAULT_TRACE
    trace = load_trace(DEFAULT_TRACE)
    q, k, v = (np.asarray(a[:300], np.float64) for a in trace.layer(trace.layers[0]).sequences())
    method = ClusterKV(n_clusters=16, budget=64, sinks=4)
    acc = record_cluster_access(method, {trace.layers[0]: (q, k, v)}, prefill_len=296)
    assert acc.unit == "cluster" and acc.steps == 4
    assert acc.unit_sizes.sum() == trace.h_kv * (296 - 4)          # every clustered prompt token in one cluster
    # cache holding the whole clustered prompt: after the first touches nothing crosses PCIe again
    r = replay(acc, int(acc.unit_sizes.sum()) * acc.unit_bytes, link_gbps=10.0)
    seen = set()
    for s in range(acc.steps):
        new = {(h, int(c)) for h in range(acc.h_kv) for c in acc.reads(s, 0, h)} - seen
        assert r.pcie_bytes[s] == sum(acc.unit_sizes[0, h, c] for h, c in new) * acc.unit_bytes
        seen |= new
    with pytest.raises(ValueError, match="ClusterKV"):
        record_cluster_access(Dense(), {0: (q, k, v)}, prefill_len=296)


def test_replay_cli_prints_hit_rates(capsys):
    from kvsparse import cli
    assert cli.main(["replay", "--method", "quest", "--budget", "64", "--steps", "3", "--layers", "3",
                     "--cache-fractions", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "unit: token" in out and "prefetch: none" in out and "latency us/step" in out
    assert cli.main(["replay", "--cache-fractions", "2"]) == 2
    # --prefetch auto picks the method's own policy: Double Sparsity's offload path prefetches a layer ahead
    assert cli.main(["replay", "--method", "double_sparsity", "--budget", "32", "--steps", "2", "--layers", "3",
                     "--cache-fractions", "1"]) == 0
    assert "prefetch: next_layer" in capsys.readouterr().out
    assert cli.main(["replay", "--method", "double_sparsity", "--budget", "32", "--steps", "2", "--layers", "3",
                     "--cache-fractions", "1", "--prefetch", "previous_step", "--compute", "attention"]) == 0
    assert "prefetch: previous_step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["replay", "--prefetch", "magic"])
    assert cli.main(["replay", "--model", "no-such-model", "--steps", "2"]) == 2


def test_per_layer_methods_are_recorded_per_layer_and_replay_calibrates_double_sparsity(tmp_path):
    """A mapping layer -> method runs each layer's own method; the replay CLI saves what an
    uncalibrated Double Sparsity reads after calibration on each layer's own prompt (evaluate's rule),
    which differs from what the uncalibrated method (channels 0..r-1) reads."""
    from kvsparse import cli
    from kvsparse.oracle.double_sparsity import DoubleSparsity
    from kvsparse.sim.evaluate import DEFAULT_TRACE, calibrated
    from kvsparse.traces.format import load_trace
    trace = load_trace(DEFAULT_TRACE)
    steps, layers = 2, (3, 27)
    prefill = trace.n_tokens - steps
    seqs = {li: tuple(np.asarray(a, np.float64) for a in trace.layer(li).sequences()) for li in layers}
    plain = DoubleSparsity(token_budget=32)
    want = record_access({li: calibrated(plain, q, k, prefill) for li, (q, k, _) in seqs.items()}, seqs,
                         prefill_len=prefill)
    uncalibrated = record_access(plain, seqs, prefill_len=prefill)
    path = tmp_path / "ds.npz"
    assert cli.main(["replay", "--method", "double_sparsity", "--budget", "32", "--steps", str(steps),
                     "--layers", "3,27", "--cache-fractions", "1", "--compute", "none", "--save", str(path)]) == 0
    got = AccessTrace.load(path)
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.offsets, want.offsets)
    assert not np.array_equal(uncalibrated.ids, want.ids)
    with pytest.raises(ValueError, match="every layer"):
        record_access({3: plain}, seqs, prefill_len=prefill)
