"""Dense oracle decode step at H_q=32, H_kv=8, n=32768, d=128: wall time and peak extra memory.

Floor (issue 2): <= 1 s on 2 cores; peak memory <= 3x the KV bytes.
Run: python benchmarks/bench_oracle_dense.py
"""
import argparse
import time
import tracemalloc

import numpy as np

from kvsparse.oracle.dense import Dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    h_q, h_kv, d = 32, 8, 128
    rng = np.random.default_rng(0)
    print(f"H_q={h_q} H_kv={h_kv} n={args.n} d={d}")
    for dtype in ("float64", "float32", "float16"):
        q = rng.standard_normal((h_q, d)).astype(dtype)
        k = rng.standard_normal((h_kv, args.n, d)).astype(dtype)
        v = rng.standard_normal((h_kv, args.n, d)).astype(dtype)
        kv_bytes = k.nbytes + v.nbytes
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            Dense().step(q, k, v)
            times.append(time.perf_counter() - t0)
        tracemalloc.start()
        Dense().step(q, k, v)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"inputs {dtype:8s}: median {np.median(times):.3f} s, min {min(times):.3f} s; "
              f"peak extra memory {peak / 1e6:.0f} MB = {peak / kv_bytes:.2f}x the KV bytes ({kv_bytes / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
