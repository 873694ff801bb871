"""Trace floors: capture 2,048 tokens of all 30 layers of SmolLM2-135M (<= 2 min on 2 cores) and load
one layer of a shipped trace (<= 50 ms). Prints measured numbers.

    python benchmarks/bench_traces.py [--threads 2] [--skip-capture]
"""
import argparse
import time

import numpy as np

from kvsparse.traces.capture import DATA_DIR, SHIPPED
from kvsparse.traces.format import load_trace


def bench_load(repeats: int = 20) -> None:
    path = DATA_DIR / next(iter(SHIPPED))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trace = load_trace(path)                         # header read and checked
        layer = trace.layer(trace.layers[-1])            # memory map + NaN/inf check of the layer
        q, k, v = (np.array(x, dtype=np.float64) for x in (layer.q, layer.k, layer.v))   # into RAM as float64
        times.append(time.perf_counter() - t0)
    print(f"load one layer of {path.name} (open + check + copy to float64 [{q.shape}, {k.shape}, {v.shape}]): "
          f"median {np.median(times) * 1e3:.1f} ms, max {np.max(times) * 1e3:.1f} ms over {repeats} runs (floor 50 ms)")


def bench_capture(threads: int) -> None:
    from kvsparse.traces import capture as C
    t0 = time.perf_counter()
    loaded = C.load_model(C.smollm2_gguf())
    t_load = time.perf_counter() - t0
    ids = C.tokenize_prompt(loaded[1], C.PROMPT_FILE, 2048)
    t1 = time.perf_counter()
    cap = C.capture_model(loaded[0], ids, None, threads=threads)
    t_cap = time.perf_counter() - t1
    trace = C.to_trace(cap, model_info={"name": "SmolLM2-135M-Instruct"}, prompt={"source": "GPL-3", "licence": "verbatim"},
                       made={"by": "bench"})
    t_total = time.perf_counter() - t0
    print(f"capture 2048 tokens, all {len(cap.layers)} layers, {threads} torch thread(s): load+tokenizer {t_load:.1f} s, "
          f"forward+record {t_cap:.1f} s, total incl. float16 trace {t_total:.1f} s (floor 120 s); "
          f"trace {sum(x.nbytes for x in trace._tensors.values()) / 1e6:.0f} MB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-capture", action="store_true")
    args = ap.parse_args()
    bench_load()
    if not args.skip_capture:
        bench_capture(args.threads)
