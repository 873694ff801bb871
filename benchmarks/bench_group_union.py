"""Hold-out check of ``kvsparse evaluate``'s GQA union extrapolation on the shipped trace.

The trace has G_t = 3 query heads per KV head; a costed model may have more (Llama-3-8B: 4), so evaluate
extrapolates the union to G heads (``group_union_estimate``: Chao et al. 2014, one more head for G = 4).
Nothing on the trace has 4 heads in a group, so the same one-head step is checked one size down: from
every 2-head subset of each group, predict the 3-head union and compare with the measured one (sums over
layers, the last 4 decode steps, KV heads and subsets). Printed beside it: the linear map
``1 + (u - 1)(G - 1)/(G_t - 1)`` that evaluate used before. Deterministic.

Run: python benchmarks/bench_group_union.py
"""
import itertools

from kvsparse.oracle import core, run_decode
from kvsparse.sim.evaluate import (DEFAULT_TRACE, calibrated, group_incidence, group_union_estimate,
                                   method_with_budget)
from kvsparse.traces.format import load_trace

METHODS = ("quest", "sparq", "double_sparsity", "h2o", "snapkv")
BUDGETS = (128, 512)
STEPS = 4


def main():
    trace = load_trace(DEFAULT_TRACE)
    g_t = trace.h_q // trace.h_kv
    print(f"{DEFAULT_TRACE.name}: layers {list(trace.layers)}, "
          f"G_t = {g_t}, last {STEPS} decode steps; predicted {g_t}-head union from {g_t - 1}-head subsets, "
          f"relative to the measured one\n")
    print(f"{'method':16s} {'budget':>6s}  {'chao 2014':>9s}  {'linear':>7s}")
    for name in METHODS:
        for budget in BUDGETS:
            chao = linear = measured = 0.0
            for li in trace.layers:
                q, k, v = (core.as_float64(a, "trace") for a in trace.layer(li).sequences())
                method = calibrated(method_with_budget(name, budget), q, k, q.shape[0] - STEPS)
                for res in run_decode(method, q, k, v, prefill_len=q.shape[0] - STEPS).steps:
                    n = res.selection.n
                    for g in range(trace.h_kv):
                        heads = res.selection.indices[g * g_t:(g + 1) * g_t]
                        measured += len(set().union(*(set(ix.tolist()) for ix in heads)))
                        for sub in itertools.combinations(heads, g_t - 1):
                            inc = group_incidence(sub, n)
                            mean = sum((j + 1) * c for j, c in enumerate(inc)) / (g_t - 1)
                            chao += group_union_estimate([inc], [n], g_t)[0] * mean / g_t
                            linear += (1 + (inc.sum() / mean - 1) * (g_t - 1) / (g_t - 2)) * mean / g_t
            print(f"{name:16s} {budget:6d}  {chao / measured - 1:+9.3f}  {linear / measured - 1:+7.3f}")


if __name__ == "__main__":
    main()
