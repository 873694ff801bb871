"""Decode-step wall time of the dynamic-selection oracles (Quest, SparQ, Double Sparsity, Twilight).

Floor (issue 4): each oracle's decode step at H_q=32, H_kv=8, n=32768, d=128 in <= 1 s on 2 cores.
Inputs are float64 Gaussian q, k, v from seed 0; every preset of every method is timed.
Run: python benchmarks/bench_oracle_dynamic.py [--repeats 5] [--methods quest,sparq,...]
"""
import argparse
import time

import numpy as np

from kvsparse.oracle.double_sparsity import DoubleSparsity
from kvsparse.oracle.quest import Quest
from kvsparse.oracle.sparq import SparQ
from kvsparse.oracle.twilight import Twilight

METHODS = {m.name: m for m in (Quest, SparQ, DoubleSparsity, Twilight)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    h_q, h_kv, d = 32, 8, 128
    rng = np.random.default_rng(0)
    q = rng.standard_normal((h_q, d))
    k = rng.standard_normal((h_kv, args.n, d))
    v = rng.standard_normal((h_kv, args.n, d))
    print(f"H_q={h_q} H_kv={h_kv} n={args.n} d={d}, float64, {args.repeats} repeats after one warm-up")
    print(f"{'method':16s} {'preset':24s} {'median s':>9s} {'min s':>7s} {'mean kept':>10s} {'bytes read':>12s}")
    for name in args.methods.split(","):
        for preset, method in METHODS[name].presets().items():
            res = method.step(q, k, v)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                method.step(q, k, v)
                times.append(time.perf_counter() - t0)
            print(f"{name:16s} {preset:24s} {np.median(times):9.3f} {min(times):7.3f} "
                  f"{res.selection.sizes.mean():10.1f} {res.traffic.total:12d}")


if __name__ == "__main__":
    main()
