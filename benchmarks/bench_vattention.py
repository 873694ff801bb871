"""vAttention verifier: time to verify one input (floor: M = 2000 trials at n = 8192, d = 128 in <= 10 s
on 2 cores), detection rates of the planted faults, and measured failure rates of the documented regimes.

    python benchmarks/bench_vattention.py [--repeats 100]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvsparse.cli import format_table  # noqa: E402
from kvsparse.oracle.vattention import VAttention  # noqa: E402
from kvsparse.property_tests import vattention as va  # noqa: E402

FAULT_CASES = {   # the same cases as tests/test_vattention_guarantee.py
    "quarter_budget": ("paper-denominator", "gaussian", 4096, 4, 16, 0, 0.1, 0.1),
    "with_replacement_uncorrected": ("canonical", "equal_scores", 1024, 4, 16, 0, 0.1, 0.1),
    "wrong_scaling": ("paper-denominator", "gaussian", 1024, 64, 64, 0, 0.05, 0.1),
    "dropped_sinks": ("canonical", "gaussian", 1024, 64, 16, 0, 0.05, 0.1),
}
REGIMES = [  # (preset, family, n, share, eps, delta)
    ("paper-denominator", "one_dominant", 8192, 0.05, 0.2, 0.1),
    ("paper-denominator", "one_dominant", 8192, 0.01, 0.05, 0.05),
    ("paper-denominator", "one_dominant", 8192, 0.08, 0.2, 0.2),
    ("canonical", "one_dominant", 8192, 0.01, 0.2, 0.2),
    ("sparse-attention-hub", "one_dominant", 8192, 0.05, 0.05, 0.05),
    ("sparse-attention-hub", "one_dominant", 8192, 0.01, 0.05, 0.05),
    ("sparse-attention-hub", "gaussian", 4096, 0.05, 0.1, 0.05),
    ("sparse-attention-hub", "heavy_tailed", 2048, 0.05, 0.1, 0.1),
    ("conservative", "one_dominant", 8192, 0.05, 0.2, 0.1),
    ("conservative", "one_dominant", 8192, 0.01, 0.05, 0.05),
]


def timing(rows, preset, h_kv, group, trials=2000, n=8192, d=128):
    q, k, v = va.make_input("gaussian", n, d, h_kv, group, seed=0)
    m = replace(VAttention.presets()[preset], epsilon=0.1, delta=0.1)
    va.verify(m, q, k, v, trials=50)  # warm-up
    best = float("inf")
    for rep in range(3):
        t0 = time.perf_counter()
        r = va.verify(m, q, k, v, trials=trials, seed=rep)
        best = min(best, time.perf_counter() - t0)
    rows.append({"preset": preset, "H_q": h_kv * group, "n": n, "d": d, "trials": trials,
                 "mean budget": r.heads[0].budget, "best of 3 (s)": best, "floor (s)": 10.0})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=100, help="verifications per fault for detection rates")
    args = ap.parse_args(argv)

    rows = []
    for preset in ("canonical", "sparse-attention-hub", "conservative"):
        timing(rows, preset, 1, 1)
    timing(rows, "canonical", 1, 4)
    print("Verifying one input (gaussian family, eps = delta = 0.1, sinks 128, local 128, top-k 5%):\n")
    print(format_table(rows))

    print(f"\nPlanted faults: fraction of {args.repeats} independent verifications (M = 2000, alpha = 1e-9) "
          f"that flag a violation; the correct sampler on the same input for comparison:\n")
    rows = []
    for fault, (preset, family, n, sinks, local, heavy, eps, dlt) in FAULT_CASES.items():
        m = replace(VAttention.presets()[preset], sinks=sinks, local=local, heavy=heavy, epsilon=eps, delta=dlt)
        q, k, v = va.make_input(family, n, 16, 1, 1, seed=11)
        caught = sum(va.verify(m, q, k, v, trials=2000, alpha=1e-9, seed=100 + r, fault=fault).violated
                     for r in range(args.repeats))
        correct = sum(va.verify(m, q, k, v, trials=2000, alpha=1e-9, seed=100 + r).violated
                      for r in range(min(args.repeats, 20)))
        rows.append({"fault": fault, "preset": preset, "family": family, "n": n, "eps": eps, "delta": dlt,
                     "detected": f"{caught}/{args.repeats}", "correct flagged": f"{correct}/{min(args.repeats, 20)}"})
    print(format_table(rows))

    print("\nRegimes (sinks 4, local 16, no top-k; d = 16; M = 2000): realized failure rates with 95% "
          "Clopper-Pearson intervals:\n")
    rows = []
    for preset, family, n, share, eps, dlt in REGIMES:
        m = replace(VAttention.presets()[preset], sinks=4, local=16, heavy=0, epsilon=eps, delta=dlt)
        q, k, v = va.make_input(family, n, 16, 1, 1, seed=0, share=share)
        r = va.verify(m, q, k, v, trials=2000, alpha=1e-9, seed=0)
        h = r.heads[0]
        cell = lambda t: f"{h.targets[t].rate:.3f} [{h.targets[t].ci[0]:.3f}, {h.targets[t].ci[1]:.3f}]"
        rows.append({"preset": preset, "family": family, "n": n, "share": share if family == "one_dominant" else "-",
                     "eps": eps, "delta": dlt, "claims": ",".join(t[:3] for t in m.claims()),
                     "D fail": cell("denominator"), "N fail": cell("numerator"), "output fail": cell("output"),
                     "verdict": "EXCEEDS" if r.violated else "ok", "read": h.fraction_read})
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
