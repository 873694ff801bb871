"""Replay speed: 10,000 decode steps of an access trace against an LRU GPU cache (issue 12 floor: <= 5 s),
for every prefetch policy (a prefetch pass re-walks a layer's predicted reads, so it is timed too).

The trace: one layer, 8 KV heads, each step reads 512 of 4,096 tokens per head (a drifting hot set
plus random reads), so hits and misses both occur. Run: python benchmarks/bench_replay.py
"""
import argparse
import time

import numpy as np

from kvsparse.sim.replay import PREFETCH, replay
from kvsparse.traces.access import AccessTrace


def synthetic_trace(steps: int, h_kv: int, n: int, per_step: int, seed: int = 0) -> AccessTrace:
    rng = np.random.default_rng(seed)
    ids = np.empty(steps * h_kv * per_step, np.int32)
    offsets = np.zeros((steps, 1, h_kv + 1), np.int64)
    pos = 0
    for s in range(steps):
        hot = (np.arange(per_step // 2) + s // 10) % n                      # slowly drifting hot set
        for h in range(h_kv):
            cold = rng.choice(n, per_step, replace=False)
            row = np.unique(np.concatenate([hot, cold]))[:per_step]
            ids[pos:pos + row.size] = row
            offsets[s, 0, h] = pos
            pos += row.size
            offsets[s, 0, h + 1] = pos
    return AccessTrace("token", 2 * 128 * 2, n, (0,), h_kv, ids[:pos], offsets)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    args = ap.parse_args()
    trace = synthetic_trace(args.steps, 8, 4096, 512)
    replay(synthetic_trace(2, 8, 4096, 512), 1 << 20, link_gbps=25.0)      # compile
    accesses = trace.ids.size
    worst = 0.0
    for prefetch in PREFETCH:
        for frac in (0.25, 0.5, 1.0):
            cap = int(frac * 8 * 4096 * trace.unit_bytes)
            t0 = time.perf_counter()
            res = replay(trace, cap, link_gbps=25.0, link_latency_s=10e-6, prefetch=prefetch,
                         layer_compute_seconds=20e-6)
            dt = time.perf_counter() - t0
            worst = max(worst, dt)
            print(f"steps={trace.steps} accesses={accesses} prefetch={prefetch} cache={frac:.0%} of the KV: "
                  f"{dt:.2f} s ({accesses / dt / 1e6:.0f} M accesses/s), hit rate {res.hit_rate:.3f}, "
                  f"demand hit rate {res.demand_hit_rate:.3f}")
    print(f"slowest replay: {worst:.2f} s (floor: <= 5 s for 10,000 steps)")

if __name__ == "__main__":
    main()
