"""Access traces (what a method read) and their replay against an LRU GPU cache over PCIe."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvsparse.oracle import Layout, Selection
from kvsparse.oracle.dense import Dense
from kvsparse.sim.replay import replay
from kvsparse.traces.access import AccessTrace, from_selections, kv_reads, record_access


def trace_of(per_step_ids, n_units, h_kv=1, unit_bytes=10, unit_sizes=None):
    """One layer; per_step_ids[s][h] lists the ids read by KV head h at step s."""
    ids, offsets, pos = [], np.zeros((len(per_step_ids), 1, h_kv + 1), np.int64), 0
    for s, heads in enumerate(per_step_ids):
        offsets[s, 0, 0] = pos
        for h, r in enumerate(heads):
            ids.extend(r)
            pos += len(r)
            offsets[s, 0, h + 1] = pos
    return AccessTrace("token", unit_bytes, n_units, (0,), h_kv, np.array(ids, np.int32), offsets, unit_sizes)


def test_lru_by_hand():
    # capacity 2 units of 10 bytes; reads: [0,1] [0,2] [1] -> step0: 2 misses; step1: 0 hits, 2 misses (evicts 1)
    # step2: 1 was evicted -> miss
    t = trace_of([[[0, 1]], [[0, 2]], [[1]]], 3)
    r = replay(t, 20, link_gbps=1.0)
    assert list(r.hits) == [0, 1, 0] and list(r.misses) == [2, 1, 1]
    assert list(r.pcie_bytes) == [20, 10, 10]
    assert r.hit_rate == pytest.approx(1 / 5)


@given(st.integers(1, 30), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_trace_that_fits_costs_nothing_after_warm_up(steps, h_kv, seed):
    rng = np.random.default_rng(seed)
    n_units = 20
    per_step = [[sorted(rng.choice(n_units, rng.integers(0, 8), replace=False)) for _ in range(h_kv)]
                for _ in range(steps)]
    t = trace_of(per_step, n_units, h_kv)
    r = replay(t, n_units * h_kv * t.unit_bytes, link_gbps=10.0)
    seen = set()
    for s in range(steps):
        new = {(h, u) for h in range(h_kv) for u in per_step[s][h]} - seen
        assert r.pcie_bytes[s] == len(new) * t.unit_bytes      # only first touches cross PCIe
        seen |= new


@given(st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_cache_of_size_zero_sends_every_selected_byte(steps, seed):
    rng = np.random.default_rng(seed)
    per_step = [[sorted(rng.choice(50, rng.integers(0, 10), replace=False)) for _ in range(2)] for _ in range(steps)]
    t = trace_of(per_step, 50, 2)
    r = replay(t, 0, link_gbps=5.0, link_latency_s=1e-6)
    assert np.array_equal(r.pcie_bytes, t.step_bytes())
    assert r.hits.sum() == 0
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


def test_prefetch_hides_transfers_behind_compute_but_not_at_step_0():
    t = trace_of([[[0, 1]], [[2, 3]], [[4]]], 5)
    r = replay(t, 0, link_gbps=1e-8, prefetch="perfect", compute_seconds=1.0)   # 10 bytes take 1 s
    assert r.seconds[0] == pytest.approx(2.0) and r.seconds[1] == pytest.approx(1.0) and r.seconds[2] == 0.0


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
    assert "hit rate" in out and "unit: token" in out
    assert cli.main(["replay", "--cache-fractions", "2"]) == 2
