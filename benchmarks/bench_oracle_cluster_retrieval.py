"""Wall time of the ClusterKV and RetrievalAttention float64 oracles at the floor's shape.

Floors (issue 4): one decode step for H_q=32, H_kv=8, n=32768, d=128 in <= 1 s on 2 cores; ClusterKV's
k-means at prefill (all KV heads of one layer) in <= 30 s, and excluded from its decode step.

    python benchmarks/bench_oracle_cluster_retrieval.py [--n 32768] [--repeats 3] [--seed 0]

Inputs are the spine's ``gaussian`` family (make_decode_input). A decode step is timed from the call
to its return (validation, selection, attention and traffic included); the median of ``--repeats``
runs is reported next to the slowest.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from kvsparse.cli import format_table
from kvsparse.oracle.clusterkv import ClusterKV
from kvsparse.oracle.retrieval_attention import RetrievalAttention
from kvsparse.property_tests.strategies import make_decode_input


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--h-q", type=int, default=32)
    ap.add_argument("--h-kv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    x = make_decode_input(args.h_q, args.h_kv, args.n, args.d, "gaussian", args.seed)
    print(f"H_q={args.h_q}, H_kv={args.h_kv}, n={args.n}, d={args.d}, gaussian seed {args.seed}; "
          f"{os.cpu_count()} CPUs visible, median/max of {args.repeats} runs\n")
    rows = []
    load0 = os.getloadavg()[0]

    # ClusterKV: prefill (k-means of every KV head) on the first n - 1 tokens, then decode the last
    method = ClusterKV()
    k_seq, v_seq = x.k.transpose(1, 0, 2), x.v.transpose(1, 0, 2)
    q_prompt = np.zeros((args.n - 1, args.h_q, args.d))        # prefill does not read the queries
    t0, c0 = time.perf_counter(), time.process_time()
    state = method.prefill(q_prompt, k_seq[:-1], v_seq[:-1])
    t_prefill, cpu_prefill = time.perf_counter() - t0, time.process_time() - c0
    rows.append({"oracle": "clusterkv prefill (k-means, all KV heads)", "median s": t_prefill,
                 "max s": t_prefill, "CPU s": cpu_prefill, "floor s": 30.0, "tokens/head": "",
                 "note": f"{method.n_clusters} clusters, {method.iterations} iterations, {method.metric}"})
    med, worst, (_, res) = timed(lambda: method.decode(state, x.q, x.k[:, -1], x.v[:, -1]), args.repeats)
    rows.append({"oracle": "clusterkv decode step", "median s": med, "max s": worst, "CPU s": "", "floor s": 1.0,
                 "tokens/head": float(res.selection.sizes.mean()), "note": f"budget {method.budget}, sinks {method.sinks}"})

    for preset, m in RetrievalAttention.presets().items():
        med, worst, res = timed(lambda: m.step(x.q, x.k, x.v), args.repeats)
        rows.append({"oracle": f"retrieval_attention[{preset}] step", "median s": med, "max s": worst,
                     "CPU s": "", "floor s": 1.0, "tokens/head": float(res.selection.sizes.mean()),
                     "note": f"recall {m.recall}, top_k {m.top_k}, static {m.sinks}+{m.window}"})
    print(format_table(rows))
    print(f"\nload average (1 min) before/after: {load0:.2f} / {os.getloadavg()[0]:.2f} "
          "(other processes on the machine slow the wall times down)")
    # the process's CPU seconds bound its wall time on 2 idle cores (it never waits on I/O), so a
    # machine shared with other jobs is judged on them; wall times are printed as measured
    ok = all((r["CPU s"] if r["CPU s"] != "" else r["max s"]) <= r["floor s"] for r in rows)
    print("\nall floors met (prefill judged on CPU seconds, decode steps on wall time)" if ok
          else "\nA FLOOR IS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
