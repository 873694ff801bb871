"""Evaluate 6 methods x 6 budgets on the shipped trace (2,048 tokens, one layer): issue 12 floor <= 60 s.

Run: python benchmarks/bench_evaluate.py
"""
import time

from kvsparse.sim.evaluate import DEFAULT_TRACE, budget_methods, evaluate
from kvsparse.traces.format import load_trace

PREFERRED = ["quest", "sparq", "double_sparsity", "streaming_llm", "h2o", "snapkv", "clusterkv", "twilight"]


def main():
    trace = load_trace(DEFAULT_TRACE)
    have = budget_methods()
    methods = [m for m in PREFERRED if m in have][:6]
    budgets = [64, 128, 256, 512, 1024, 1536]
    t0 = time.perf_counter()
    rows = evaluate(trace, methods, budgets, layers=[trace.layers[0]], steps=4)
    dt = time.perf_counter() - t0
    print(f"{len(methods)} methods ({', '.join(methods)}) x {len(budgets)} budgets, layer {trace.layers[0]}, "
          f"4 decode steps each: {dt:.1f} s ({len(rows)} rows)")


if __name__ == "__main__":
    main()
