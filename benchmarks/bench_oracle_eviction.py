"""Static-pattern and eviction oracles: one decode step at H_q=32, H_kv=8, n=32768, d=128, and a
512-step H2O decode over a 4096-token context.

Floors (issue 3): each oracle's decode step <= 1 s on 2 cores; the 512-step H2O decode <= 30 s.
Stateful methods start from an explicit state of n-1 cached tokens (StreamingLLM, SnapKV, PyramidKV:
their own prefill, which needs no full causal attention; H2O, CORM: a state built directly, with
random accumulated scores / importance stamps, because their prefill is a full T x T attention), then
one token is decoded, so the step sees n tokens. Prefill time is not part of the step.
Run: python benchmarks/bench_oracle_eviction.py
"""
import argparse
import time

import numpy as np

from kvsparse.oracle.bigbird import BigBird
from kvsparse.oracle.corm import CORM, CORMState
from kvsparse.oracle.h2o import H2O, H2OState
from kvsparse.oracle.longformer import Longformer
from kvsparse.oracle.pyramidkv import PyramidKV
from kvsparse.oracle.sliding_window import KVHistory, SlidingWindow
from kvsparse.oracle.snapkv import SnapKV
from kvsparse.oracle.streaming_llm import StreamingLLM


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(min(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--h2o-context", type=int, default=4096)
    ap.add_argument("--h2o-steps", type=int, default=512)
    args = ap.parse_args()
    h_q, h_kv, d, n = 32, 8, 128, args.n
    rng = np.random.default_rng(0)
    q = rng.standard_normal((h_q, d))
    k = rng.standard_normal((h_kv, n, d))
    v = rng.standard_normal((h_kv, n, d))
    k_seq, v_seq = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    print(f"one decode step, H_q={h_q} H_kv={h_kv} n={n} d={d} (median / min of {args.repeats})")
    rows = []
    for m in (SlidingWindow(window=4096), BigBird(), Longformer(window=2048, global_tokens=(0, 1, 2, 3))):
        rows.append((m.name, timed(lambda: m.step(q, k, v), args.repeats)))

    def stateful(m, make_state):
        """Decode one token from a fresh state each time (a second decode from the same state would
        branch the shared history and copy it: the oracle's explicit-state contract, not a step cost)."""
        times = []
        for _ in range(args.repeats):
            state = make_state()
            t0 = time.perf_counter()
            m.decode(state, q, k_seq[n - 1], v_seq[n - 1])
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), float(min(times))
    q_prompt = np.broadcast_to(q, (n - 1, h_q, d))
    for m in (StreamingLLM(), SnapKV(), PyramidKV(layer=16)):
        state = m.prefill(q_prompt, k_seq[: n - 1], v_seq[: n - 1])
        rows.append((m.name, stateful(m, lambda: type(state)(KVHistory(k[:, : n - 1], v[:, : n - 1]), state.n,
                                                             state.prompt_len, state.kept))))
    hist = lambda: KVHistory(k[:, : n - 1], v[:, : n - 1])  # noqa: E731
    kept_h2o = np.zeros((h_q, n - 1), dtype=bool)
    kept_h2o[:, rng.permutation(n - 1)[: n // 2]] = True
    kept_h2o[:, -(n // 4):] = True
    h2o = H2O(heavy=n // 2, recent=n // 4)
    scores = rng.random((h_q, n - 1))
    rows.append(("h2o", stateful(h2o, lambda: H2OState(hist(), n - 1, n - 1, kept_h2o, scores, n // 2, n // 4))))
    kept_corm = np.ones((h_kv, n - 1), dtype=bool)
    stamps = np.maximum(np.arange(n - 1) - rng.integers(0, 64, n - 1), 0)[None].repeat(h_kv, 0)
    rows.append(("corm", stateful(CORM(), lambda: CORMState(hist(), n - 1, n - 1, kept_corm, stamps))))
    for name, (med, best) in rows:
        print(f"  {name:16s} median {med:.3f} s   min {best:.3f} s")

    ctx, steps = args.h2o_context, args.h2o_steps
    start = ctx - steps
    hist = KVHistory(k[:, :start], v[:, :start])
    heavy, recent = 1024, 1024
    kept = np.zeros((h_q, start), dtype=bool)
    kept[:, rng.permutation(start - recent)[:heavy]] = True
    kept[:, -recent:] = True
    state = H2OState(hist, start, start, kept, rng.random((h_q, start)), heavy, recent)
    m = H2O(heavy=heavy, recent=recent)
    t0 = time.perf_counter()
    for t in range(start, ctx):
        state, _ = m.decode(state, q, k_seq[t], v_seq[t])
    total = time.perf_counter() - t0
    print(f"H2O (heavy {heavy}, recent {recent}) {steps} decode steps, context {start} -> {ctx}: "
          f"{total:.2f} s ({total / steps * 1e3:.1f} ms/step)")


if __name__ == "__main__":
    main()
