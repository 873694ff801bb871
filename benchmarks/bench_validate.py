"""Wall time of `kvsparse validate` with the default example count, per method, on NumPy-speed kernels.

    python benchmarks/bench_validate.py

Floor (issue 10): <= 60 s per kernel on 2 cores. Each run is derandomized (as the CLI without --seed).
"""
import time
from pathlib import Path

from kvsparse.property_tests import adapters, validate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "user_kernels.py"
RUNS = [  # (method, kernel spec, preset, params)
    ("dense", f"{EXAMPLES}:dense_ok", None, None),
    ("quest", f"{EXAMPLES}:quest_ok", None, None),
    ("streaming_llm", f"{EXAMPLES}:streaming_ok", None, None),
    ("vattention", f"{EXAMPLES}:vattention_ok", None, None),
    ("streaming_llm", "kvsparse.property_tests.adapters:kvpress_streaming_llm", None,
     {"sinks": 2, "compression_ratio": 0.25}),
]


def main():
    print(f"kvsparse validate, default {validate.DEFAULT_EXAMPLES} examples "
          f"(vattention: {validate.DEFAULT_CALLS} calls per input)")
    for method, spec, preset, params in RUNS:
        if "kvpress" in spec and adapters.kvpress_unavailable():
            print(f"{method:14s} {spec.rsplit(':')[1]:28s} skipped: {adapters.kvpress_unavailable()}")
            continue
        kernel = validate.load_callable(spec)
        t0 = time.perf_counter()
        report, _ = validate.validate(method, kernel, preset=preset, params=params)
        dt = time.perf_counter() - t0
        print(f"{method:14s} {spec.rsplit(':')[1]:28s} {'PASS' if report.ok else 'FAIL'} "
              f"{report.examples:4d} examples  {dt:6.1f} s")


if __name__ == "__main__":
    main()
