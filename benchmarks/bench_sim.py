"""Simulator throughput: (method, budget, context, GPU) configurations priced per second.

    python benchmarks/bench_sim.py [--budgets 64] [--contexts 64] [--repeats 3] [--model llama-3-8b]
    python benchmarks/bench_sim.py --per-method        # also each method alone (best of --repeats)

Every registered cost model x every catalog GPU x a geometric grid of budgets and contexts, batch 1.
The first sweep (imports, registry load) is not timed; the best of ``--repeats`` timed sweeps is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, default=64)
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--per-method", action="store_true")
    args = ap.parse_args()
    from kvsparse import registry
    from kvsparse.sim import hardware
    from kvsparse.sim.sweep import sweep

    methods = [n for n, e in registry.entries().items() if e.cost is not None]
    gpus = sorted(hardware.catalog())
    budgets = np.unique(np.geomspace(16, 65536, args.budgets).astype(int))
    contexts = np.unique(np.geomspace(1024, 131072, args.contexts).astype(int))
    sweep(args.model, gpus[:1], methods[:1], budgets[:2], contexts[:2])      # warm-up
    best = np.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = sweep(args.model, gpus, methods, budgets, contexts)
        best = min(best, time.perf_counter() - t0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"numpy {np.__version__}")
    print(f"model {args.model}: {len(methods)} methods x {len(gpus)} GPUs x {budgets.size} budgets x "
          f"{contexts.size} contexts = {res.n_configs:,} configurations")
    print(f"best of {args.repeats}: {best:.3f} s -> {res.n_configs / best:,.0f} configurations/s")
    if args.per_method:
        rates = []
        for m in methods:
            t_m = np.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                one = sweep(args.model, gpus, [m], budgets, contexts)
                t_m = min(t_m, time.perf_counter() - t0)
            rates.append((one.n_configs / t_m, m, float(np.isnan(one.step_seconds).mean())))
        for rate, m, nan in sorted(rates, reverse=True):
            print(f"  {m:20s} {rate:12,.0f} configurations/s" + (f"  ({nan:.0%} refused: NaN)" if nan else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
