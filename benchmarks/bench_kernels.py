"""Every Numba kernel against its float64 oracle: one decode step at H_q=32, H_kv=8, n=32768, d=128.

    python benchmarks/bench_kernels.py --repeats 5 --stages # the full run recorded in benchmarks/numba.md
    python benchmarks/bench_kernels.py --only twilight,sparq --repeats 5
    python benchmarks/bench_kernels.py --quick              # small n, a smoke test
    python benchmarks/bench_kernels.py --only twilight,sparq,snapkv --stages   # + where the time goes

Methods: every entry of ``kvsparse.registry.entries()`` with an oracle and a "numba" kernel, in their
canonical presets. Inputs are float32 standard normals; the oracle gets the same values as float64, so
both sides see identical numbers (the "max abs dout" column compares their outputs).

* Stateless methods: ``kernel(method, q, k, v)`` against ``method.step(q, k, v)``.
* Stateful methods: ONE decode step from a state of n - 1 tokens (the step then sees n). StreamingLLM,
  SnapKV, PyramidKV: each side's own prefill on the first n - 1 tokens. H2O and CORM (whose prefill is
  a T x T attention): the state is built directly, the same for both sides (H2O: random accumulated
  scores, evicted to the canonical ``heavy + recent`` budgets by the oracle's ``evict``; CORM: every
  token kept, last-important stamps up to 64 positions old), as ``bench_oracle_eviction.py`` does.
  ClusterKV: the oracle's prefill (its k-means) at n - 1, and the kernel's state built from that
  clustering (the kernel's own prefill calls the same k-means on the same values).
  Prefill time is never part of the step; mutable parts of a state are copied before each step, untimed.
* MLA: the registered kernel contract, on MLA's absorbed view at its own canonical shape
  (H=16 heads over one latent head of width r + d_R = 576), not the 32/8/128 shape.
* KV quantization: the canonical preset with ``scale_dtype="float32"`` (a float32 kernel stores float32
  scales); the call quantizes the cache every step on both sides (the kernel in Numba). An extra row
  passes the kernel the cache quantized once (``cache=``, what a decoder maintains) against the same
  oracle time.

Threads: Numba's OpenMP layer spin-waits by default; on a shared 2-core machine a parallel region whose
other thread has lost its core then costs a scheduler tick (measured: a 258-row sparse attention, 0.36
ms on one thread, took 8-12 ms on two while another process ran, 0.37 ms with OMP_WAIT_POLICY=passive).
The script therefore sets OMP_WAIT_POLICY=passive unless told otherwise (``--omp-wait-policy``).

"first call s" is the kernel's first call in a fresh ``NUMBA_CACHE_DIR`` (compile + one run; helpers
that an earlier row already compiled are not compiled again); ``--reuse-cache`` keeps Numba's default
on-disk cache instead. Times: median and min of ``--repeats`` calls after that first one (oracles: of
``--repeats`` calls). Speed-ups: oracle median / kernel median and oracle min / kernel min; the floor
(issue 8) is 10x (">= 10x": "yes" if both ratios reach it, "min only" if only the min ratio does).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time

H_Q, H_KV, D = 32, 8, 128


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="cache length (default 32768; 2048 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3; 2 with --quick)")
    ap.add_argument("--only", default="", help="comma-separated method names (default: every method with a kernel)")
    ap.add_argument("--quick", action="store_true", help="small n and few repeats (a smoke test)")
    ap.add_argument("--reuse-cache", action="store_true",
                    help="use Numba's on-disk cache (first call is then not a compile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omp-wait-policy", choices=("passive", "active", "unset"), default="passive",
                    help="OMP_WAIT_POLICY for Numba's OpenMP threads (default passive: see the module doc); "
                         "unset leaves the environment as it is")
    ap.add_argument("--stages", action="store_true",
                    help="also time the pieces of the slow kernels among the methods run (see STAGES)")
    args = ap.parse_args(argv)
    args.n = args.n or (2048 if args.quick else 32768)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.n < 64 or args.repeats < 1:
        ap.error("--n must be >= 64 and --repeats >= 1")
    return args


def timed(fn, repeats, fresh=None):
    """``(median s, min s, last result)`` of ``repeats`` calls; ``fresh()`` (untimed) makes each call's argument."""
    times, out = [], None
    for _ in range(repeats):
        arg = fresh() if fresh is not None else None
        t0 = time.perf_counter()
        out = fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(rows) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


class Inputs:
    """float32 q/k/v (kernel side), the same values as float64 (oracle side), and float32 K/V buffers
    with room to grow (the layout of the kernels' states; rows < n hold k/v)."""

    def __init__(self, n, seed):
        import numpy as np
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.n = n
        self.q = rng.standard_normal((H_Q, D), dtype=np.float32)
        self.k = rng.standard_normal((H_KV, n, D), dtype=np.float32)
        self.v = rng.standard_normal((H_KV, n, D), dtype=np.float32)
        self.q64, self.k64, self.v64 = (x.astype(np.float64) for x in (self.q, self.k, self.v))
        self._buf = None

    def buffers(self):
        import numpy as np
        if self._buf is None:
            cap = 2 * self.n
            kb = np.zeros((H_KV, cap, D), np.float32)
            vb = np.zeros((H_KV, cap, D), np.float32)
            kb[:, : self.n], vb[:, : self.n] = self.k, self.v
            self._buf = kb, vb
        return self._buf

    def seq(self, x):
        """[H, n, d] -> the trace layout [n, H, d] (a view)."""
        return x.transpose(1, 0, 2)


def fresh_copy(state):
    """A shallow copy of a kernel state whose small mutable arrays (kept masks, stamps, scores) are
    copied too; the K/V buffers are shared (a decode only writes row n - 1, with the same values)."""
    import numpy as np
    new = copy.copy(state)
    for f in dataclasses.fields(state):
        x = getattr(state, f.name)
        if isinstance(x, np.ndarray) and f.name not in ("k", "v"):
            setattr(new, f.name, x.copy())
    return new


def indices_sizes(indices):
    import numpy as np
    if isinstance(indices, np.ndarray) and indices.ndim == 2:
        return np.full(indices.shape[0], indices.shape[1])
    return np.array([np.asarray(ix).size for ix in indices])


# --------------------------------------------------------------------------------------------------
# one case per method: returns (oracle_step(arg) -> StepResult, oracle_fresh, kernel_step(arg) ->
# (out, indices, ...), kernel_fresh, note, extra rows [(label, kernel_step, kernel_fresh)])
# --------------------------------------------------------------------------------------------------

def stateless_case(method, kernel, x: Inputs):
    return (lambda _: method.step(x.q64, x.k64, x.v64), None,
            lambda _: kernel(method, x.q, x.k, x.v), None, "", [])


def kv_quant_case(method, kernel, x: Inputs):
    from kvsparse.kernels.numba.kv_quant import quantize_cache
    method = dataclasses.replace(method, scale_dtype="float32")
    o, o_fresh, k, k_fresh, _, _ = stateless_case(method, kernel, x)
    note = "scale_dtype=float32 (both sides); quantizes the cache every step (the kernel in Numba)"
    cache = quantize_cache(method, x.k, x.v, x.q.dtype)
    extra = [("kv_quant (quantized cache passed, as a decoder keeps it)",
              lambda _: kernel(method, x.q, x.k, x.v, cache=cache), None)]
    return o, o_fresh, k, k_fresh, note, extra


def mla_case(method, kernel, x: Inputs):
    import numpy as np
    width = method.latent_dim + method.rope_dim
    rng = np.random.default_rng(1)
    q = rng.standard_normal((method.heads, width), dtype=np.float32)
    k = rng.standard_normal((1, x.n, width), dtype=np.float32)
    v = np.zeros_like(k)
    v[..., : method.latent_dim] = k[..., : method.latent_dim]
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    note = f"absorbed view: H={method.heads} over one latent head of width {width} (MLA's shape)"
    return (lambda _: method.step(q64, k64, v64), None, lambda _: kernel(method, q, k, v), None, note, [])


def sparq_case(method, kernel, x: Inputs):
    import numpy as np
    case = list(stateless_case(method, kernel, x))
    mean_v = x.v.mean(axis=1, dtype=np.float64)
    case[5] = [("sparq (running mean_v passed, as a decoder keeps it)",
                lambda _: kernel(method, x.q, x.k, x.v, mean_v=mean_v), None)]
    return tuple(case)


def double_sparsity_case(method, kernel, x: Inputs):
    import numpy as np
    from kvsparse.kernels.numba.double_sparsity import label_cache
    case = list(stateless_case(method, kernel, x))
    ch = method.channels_per_query_head(H_Q, H_KV, D)
    rows = ch[:: H_Q // H_KV] if method.shared_by_group(H_Q, H_KV) else ch
    labels = label_cache(x.k, np.ascontiguousarray(rows), method.label_bits or 0)
    case[5] = [("double_sparsity (label cache passed, as a decoder keeps it)",
                lambda _: kernel(method, x.q, x.k, x.v, labels=labels), None)]
    return tuple(case)


def quest_case(method, kernel, x: Inputs):
    from kvsparse.kernels.numba.quest import page_metadata
    case = list(stateless_case(method, kernel, x))
    kmin, kmax = page_metadata(x.k, method.page_size)
    case[5] = [("quest (page min/max passed, as a decoder keeps them)",
                lambda _: kernel(method, x.q, x.k, x.v, kmin=kmin, kmax=kmax), None)]
    return tuple(case)


def twilight_case(method, kernel, x: Inputs):
    from kvsparse.kernels.numba.quest import page_metadata
    from kvsparse.oracle.quest import Quest
    case = list(stateless_case(method, kernel, x))
    if isinstance(method.base, Quest):
        kmin, kmax = page_metadata(x.k, method.base.page_size)
        case[5] = [("twilight (Quest page min/max passed, as a decoder keeps them)",
                    lambda _: kernel(method, x.q, x.k, x.v, kmin=kmin, kmax=kmax), None)]
    return tuple(case)


def history_fresh(state, x: Inputs):
    """The oracle's state with a new history (a second decode from one history would branch and copy it)."""
    from kvsparse.oracle.sliding_window import KVHistory
    n1 = x.n - 1
    return lambda: dataclasses.replace(state, history=KVHistory(x.k64[:, :n1], x.v64[:, :n1]))


def decode_fns(method, kernel, x: Inputs, o_state, k_state):
    n1 = x.n - 1
    o_step = lambda s: method.decode(s, x.q64, x.k64[:, n1], x.v64[:, n1])[1]          # noqa: E731
    k_step = lambda s: kernel.decode(method, s, x.q, x.k[:, n1], x.v[:, n1])[1]         # noqa: E731
    o_fresh = history_fresh(o_state, x) if hasattr(o_state, "history") else (lambda: o_state)
    return o_step, o_fresh, k_step, lambda: fresh_copy(k_state)


def prefill_case(method, kernel, x: Inputs):
    """StreamingLLM, SnapKV, PyramidKV: each side's own prefill at n - 1 (they need no T x T attention)."""
    import numpy as np
    n1 = x.n - 1
    t0 = time.perf_counter()
    o_state = method.prefill(np.broadcast_to(x.q64, (n1, H_Q, D)), x.seq(x.k64)[:n1], x.seq(x.v64)[:n1])
    t_o = time.perf_counter() - t0
    t0 = time.perf_counter()
    k_state = kernel.prefill(method, np.broadcast_to(x.q, (n1, H_Q, D)), x.seq(x.k)[:n1], x.seq(x.v)[:n1])
    t_k = time.perf_counter() - t0
    note = f"decode from own prefill at n-1 (prefill: oracle {t_o:.1f} s, kernel {t_k:.1f} s incl. compile)"
    return (*decode_fns(method, kernel, x, o_state, k_state), note, [])


def h2o_case(method, kernel, x: Inputs):
    import numpy as np
    from kvsparse.kernels.numba.snapkv import EvictionState
    from kvsparse.oracle.h2o import H2OState, evict
    from kvsparse.oracle.sliding_window import KVHistory
    n1 = x.n - 1
    units = H_Q if method.gqa == "per_query_head" else H_KV
    heavy, recent = method.budgets(n1)
    scores = x.rng.random((units, n1)).astype(np.float32).astype(np.float64)
    kept = evict(np.ones((units, n1), bool), scores, n1, heavy, recent)
    o_state = H2OState(KVHistory(x.k64[:, :n1], x.v64[:, :n1]), n1, n1, kept, scores, heavy, recent)
    kb, vb = x.buffers()
    k_state = EvictionState(kb, vb, n1, kept.copy(), scores.astype(np.float32), heavy, recent)
    note = (f"state built directly: random scores, kept = heavy {heavy} + recent {recent} of n-1 "
            f"(oracle's evict)")
    return (*decode_fns(method, kernel, x, o_state, k_state), note, [])


def corm_case(method, kernel, x: Inputs):
    import numpy as np
    from kvsparse.kernels.numba.corm import CORMKernelState
    from kvsparse.oracle.corm import CORMState
    from kvsparse.oracle.sliding_window import KVHistory
    n1 = x.n - 1
    units = H_KV if method.gqa == "union" else H_Q
    stamps = np.maximum(np.arange(n1) - x.rng.integers(0, 64, n1), 0)[None].repeat(units, 0)
    kept = np.ones((units, n1), bool)
    o_state = CORMState(KVHistory(x.k64[:, :n1], x.v64[:, :n1]), n1, n1, kept, stamps)
    kb, vb = x.buffers()
    cap = kb.shape[1]
    k_kept = np.zeros((units, cap), bool)
    k_kept[:, :n1] = True
    k_last = np.broadcast_to(np.arange(cap, dtype=np.int64), (units, cap)).copy()
    k_last[:, :n1] = stamps
    k_state = CORMKernelState(kb, vb, k_kept, k_last, n1)
    note = "state built directly: every token kept, stamps <= 64 positions old"
    return (*decode_fns(method, kernel, x, o_state, k_state), note, [])


def clusterkv_case(method, kernel, x: Inputs):
    import numpy as np
    from kvsparse.kernels.numba.clusterkv import ClusterKVKernelState
    n1 = x.n - 1
    t0 = time.perf_counter()
    o_state = method.prefill(np.zeros((n1, H_Q, D)), x.seq(x.k64)[:n1], x.seq(x.v64)[:n1])
    t_o = time.perf_counter() - t0
    members = [o_state.members(j) for j in range(H_KV)]
    kb, vb = x.buffers()
    k_state = ClusterKVKernelState(
        kb, vb, n1, n1, o_state.first, np.ascontiguousarray(o_state.centroids),
        np.ascontiguousarray(np.stack([m for m, _ in members]), dtype=np.int64),
        np.stack([off for _, off in members]).astype(np.int64))
    note = f"oracle prefill (k-means) at n-1 took {t_o:.1f} s; kernel state from the same clustering"
    return (*decode_fns(method, kernel, x, o_state, k_state), note, [])


CASES = {"kv_quant": kv_quant_case, "mla": mla_case, "sparq": sparq_case,
         "double_sparsity": double_sparsity_case, "quest": quest_case, "twilight": twilight_case,
         "streaming_llm": prefill_case, "snapkv": prefill_case, "pyramidkv": prefill_case,
         "h2o": h2o_case, "corm": corm_case, "clusterkv": clusterkv_case}


def run_method(name, entry, x: Inputs, repeats):
    import numpy as np
    from kvsparse import registry
    method = registry.oracle(name)
    kernel = entry.kernels["numba"]
    if name in CASES:
        make = CASES[name]
    elif entry.oracle.stateful:
        raise NotImplementedError(f"{name}: stateful, no state recipe in this benchmark")
    else:
        make = stateless_case
    o_step, o_fresh, k_step, k_fresh, note, extra = make(method, kernel, x)

    t0 = time.perf_counter()
    k_step(k_fresh() if k_fresh else None)
    first = time.perf_counter() - t0
    k_med, k_min, k_res = timed(k_step, repeats, k_fresh)
    o_med, o_min, o_res = timed(o_step, repeats, o_fresh)

    sizes = o_res.selection.sizes
    n_step = o_res.selection.n
    if sizes.min() == n_step:
        note = ("DENSE STEP (every head attends all n tokens); " + note).rstrip("; ")
    diff = float(np.abs(np.asarray(k_res[0], np.float64) - o_res.output).max())
    rows = [row(name, f"{sizes.mean():.0f} / {indices_sizes(k_res[1]).mean():.0f}", (o_med, o_min), (k_med, k_min),
                f"{first:.2f}", f"{diff:.1e}", note)]
    for label, fn, fresh in extra:
        fn(fresh() if fresh else None)
        e_med, e_min, _ = timed(fn, repeats, fresh)
        rows.append(row(label, "", (o_med, o_min), (e_med, e_min), "", "", "same oracle time"))
    return rows


def verdict(o, k):
    """'yes' when both the median and the min ratio reach 10x, 'min only' when only the min does (the
    machine is shared: a min is the less disturbed measurement), 'NO' otherwise."""
    med, low = o[0] / k[0] >= 10, o[1] / k[1] >= 10
    return "yes" if med and low else ("min only" if low else "NO")


COLUMNS = ("method", "tokens/head oracle / kernel", "oracle ms med / min", "kernel ms med / min", "speed-up med",
           "speed-up min", ">= 10x", "first call s", "max abs dout", "note")


def row(name, tokens, o, k, first, diff, note):
    cells = (name, tokens, f"{o[0] * 1e3:.1f} / {o[1] * 1e3:.1f}", f"{k[0] * 1e3:.2f} / {k[1] * 1e3:.2f}",
             f"{o[0] / k[0]:.1f}x", f"{o[1] / k[1]:.1f}x", verdict(o, k), first, diff, note)
    return dict(zip(COLUMNS, cells))


# --------------------------------------------------------------------------------------------------
# --stages: where a kernel's time goes (the pieces its call runs, each timed on its own, same inputs)
# --------------------------------------------------------------------------------------------------

def twilight_stages(x: Inputs):
    import math
    import numpy as np
    from kvsparse import registry
    from kvsparse.kernels.numba import twilight as tw
    from kvsparse.kernels.numba._select import attend_token_mask
    from kvsparse.kernels.numba.quest import page_metadata
    m = registry.oracle("twilight")
    kernel = registry.get("twilight").kernels["numba"]
    cand = tw.candidates(m, x.q, x.k)
    probs = tw.estimated_probabilities(x.q, x.k, cand, m.quant_bits or 0, 1.0 / math.sqrt(D))
    kept = tw.prune(probs, cand, float(m.p), m.top_p == "search", m.bracket == "first", float(m.epsilon))
    union = cand.reshape(H_KV, H_Q // H_KV, -1).any(axis=1).sum(axis=1).mean()
    kept_union = kept.reshape(H_KV, H_Q // H_KV, -1).any(axis=1).sum(axis=1).mean()
    return [
        ("whole kernel call", lambda: kernel(m, x.q, x.k, x.v)),
        ("base: Quest page min/max (reads every key)", lambda: page_metadata(x.k, m.base.page_size)),
        (f"base: Quest candidates, total ({cand.sum(1).mean():.0f}/head, {union:.0f} per KV group)",
         lambda: tw.candidates(m, x.q, x.k)),
        (f"estimated_probabilities ({m.quant_bits}-bit keys, group union rows)",
         lambda: tw.estimated_probabilities(x.q, x.k, cand, m.quant_bits or 0, 1.0 / math.sqrt(D))),
        ("  same without the fake quantization (bits=0)",
         lambda: tw.estimated_probabilities(x.q, x.k, cand, 0, 1.0 / math.sqrt(D))),
        (f"prune: top-p = {m.p} per head", lambda: tw.prune(probs, cand, float(m.p), m.top_p == "search",
                                                          m.bracket == "first", float(m.epsilon))),
        (f"attend_token_mask ({kept.sum(1).mean():.0f}/head, {kept_union:.0f} per KV group)",
         lambda: attend_token_mask(x.q, x.k, x.v, kept)),
    ]


def sparq_stages(x: Inputs):
    import numpy as np
    from kvsparse import registry
    from kvsparse.kernels.numba import sparq as sq
    from kvsparse.kernels.numba._select import attend_token_mask
    m = registry.oracle("sparq")
    kernel = registry.get("sparq").kernels["numba"]
    s, _, mask, _ = sq.approximate(m, x.q, x.k)

    def alpha():
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return np.where(mask, e, 0.0).sum(axis=1) / e.sum(axis=1)
    return [
        ("whole kernel call", lambda: kernel(m, x.q, x.k, x.v)),
        (f"approximate: r={m.rank(D)} channel logits + top-{m.tokens(x.n)}", lambda: sq.approximate(m, x.q, x.k)),
        ("approximate with mean of V in its pass (what the call runs without mean_v)",
         lambda: sq.approximate(m, x.q, x.k, x.v)),
        ("attend_token_mask", lambda: attend_token_mask(x.q, x.k, x.v, mask)),
        ("alpha: NumPy exp/sum over [H_q, n]", alpha),
        ("mean of V over n, NumPy (for comparison; the call no longer runs it)", lambda: x.v.mean(axis=1, dtype=np.float64)),
    ]


def state_view_stages(x: Inputs):
    """What a stateful decode pays for slicing its capacity buffers: ``k[:, :n]`` of a ``[H_kv, 2n, d]``
    buffer is not contiguous, and the kernels' entry check makes it so (a copy of the whole cache)."""
    from kvsparse.kernels.numba.attention import check_float_arrays
    kb, vb = x.buffers()
    n = x.n
    return [
        ("check_float_arrays(q, k_buf[:, :n], v_buf[:, :n]) (cap 2n buffers)",
         lambda: check_float_arrays(x.q, kb[:, :n], vb[:, :n])),
        ("check_float_arrays(q, k, v) (contiguous)", lambda: check_float_arrays(x.q, x.k, x.v)),
    ]


def mla_stages(x: Inputs):
    import numpy as np
    from kvsparse import registry
    from kvsparse.kernels.numba.attention import dense_attention
    m = registry.oracle("mla")
    w, r = m.latent_dim + m.rope_dim, m.latent_dim
    rng = np.random.default_rng(1)
    q = rng.standard_normal((m.heads, w), dtype=np.float32)
    k = rng.standard_normal((1, x.n, w), dtype=np.float32)
    v = np.zeros_like(k)
    v[..., :r] = k[..., :r]
    return [
        ("whole kernel call", lambda: registry.get("mla").kernels["numba"](m, q, k, v)),
        ("dense_attention on the view (one KV head: one prange task)",
         lambda: dense_attention(q, k, v, scale=m.default_scale)),
        ("the copies mla_decode makes per call ([c; k^R] and [c; 0])",
         lambda: (np.concatenate([k[0, :, :r], k[0, :, r:]], axis=1)[None], np.zeros_like(k))),
    ]


def retrieval_stages(x: Inputs):
    from kvsparse import registry
    from kvsparse.kernels.numba import retrieval_attention as ra
    m = registry.oracle("retrieval_attention")
    pool = ra.candidates(x.n, m.sinks, m.window)
    return [
        ("whole kernel call", lambda: registry.get("retrieval_attention").kernels["numba"](m, x.q, x.k, x.v)),
        (f"mips_topk: q . k of {pool.size} pool keys per query head", lambda: ra.mips_topk(x.q, x.k, pool, m.top_k)),
    ]


def deja_vu_stages(x: Inputs):
    from kvsparse import registry
    from kvsparse.kernels.numba.attention import dense_attention
    m = registry.oracle("deja_vu")
    return [
        ("whole kernel call (a dense pass for the predictor, then the kept heads again)",
         lambda: registry.get("deja_vu").kernels["numba"](m, x.q, x.k, x.v)),
        ("dense_attention alone", lambda: dense_attention(x.q, x.k, x.v)),
    ]


def kv_quant_stages(x: Inputs):
    from kvsparse import registry
    from kvsparse.kernels.numba.attention import dense_attention
    from kvsparse.kernels.numba.kv_quant import quantize_cache, quantized_attention
    m = dataclasses.replace(registry.oracle("kv_quant"), scale_dtype="float32")
    parts = quantize_cache(m, x.k, x.v, x.q.dtype)
    return [
        ("quantize_cache (Numba; the kernel call runs it unless a cache is passed)",
         lambda: quantize_cache(m, x.k, x.v, x.q.dtype)),
        ("quantized_attention (dequantize-on-read, 4-bit K and V)", lambda: quantized_attention(x.q, *parts)),
        ("dense_attention on the float32 cache, for comparison", lambda: dense_attention(x.q, x.k, x.v)),
    ]


STAGES = {"twilight": twilight_stages, "sparq": sparq_stages, "snapkv": state_view_stages,
          "pyramidkv": state_view_stages, "h2o": state_view_stages, "clusterkv": state_view_stages,
          "mla": mla_stages, "retrieval_attention": retrieval_stages, "deja_vu": deja_vu_stages,
          "kv_quant": kv_quant_stages}


def stage_rows(names, x: Inputs, repeats):
    rows, done = [], set()
    for name in names:
        make = STAGES.get(name)
        if make is None or make in done:
            continue
        done.add(make)
        label = "stateful decode (snapkv, pyramidkv, h2o, clusterkv)" if make is state_view_stages else name
        try:
            for stage, fn in make(x):
                fn()
                med, low, _ = timed(lambda _: fn(), repeats)
                rows.append({"kernel": label, "stage": stage, "ms med / min": f"{med * 1e3:.2f} / {low * 1e3:.2f}"})
        except Exception as exc:   # internals move: report, do not hide the kernel table
            rows.append({"kernel": label, "stage": f"FAILED: {type(exc).__name__}: {exc}"[:200], "ms med / min": ""})
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    if not args.reuse_cache:
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvsparse-bench-kernels-")
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    import numba
    import numpy as np
    from kvsparse import registry

    entries = {n: e for n, e in registry.entries().items() if e.oracle is not None and "numba" in e.kernels}
    skipped = [n for n, e in registry.entries().items() if n not in entries]
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in entries]
        if unknown:
            print(f"error: no oracle + numba kernel for {', '.join(unknown)}; have: {', '.join(entries)}",
                  file=sys.stderr)
            return 2
        entries = {w: entries[w] for w in wanted}

    print(f"# kernels vs oracles: H_q={H_Q} H_kv={H_KV} n={args.n} d={D}; float32 kernels, float64 oracles; "
          f"median / min of {args.repeats}")
    print(f"# {os.cpu_count()} CPUs ({cpu_model()}), load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"at start; numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}; "
          f"Numba cache: {'on-disk (reused)' if args.reuse_cache else 'fresh (first call compiles)'}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    if skipped:
        print(f"# no numba kernel (not measured): {', '.join(skipped)}")
    x = Inputs(args.n, args.seed)
    rows, failed = [], []
    t_all = time.perf_counter()
    for name, entry in entries.items():
        t0 = time.perf_counter()
        try:
            rows += run_method(name, entry, x, args.repeats)
        except Exception as exc:   # one method's failure must not hide the others' rows
            failed.append(name)
            rows.append(dict(zip(COLUMNS, (name,) + ("",) * (len(COLUMNS) - 2)
                                 + (f"FAILED: {type(exc).__name__}: {exc}"[:200],))))
        print(f"#   {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print()
    print(table(rows))
    if args.stages:
        stages = stage_rows(list(entries), x, args.repeats)
        if stages:
            print(f"\nWhere the time goes (each piece alone, median / min of {args.repeats})\n" + table(stages))
    try:
        layer = numba.threading_layer()
    except ValueError:   # no parallel region ran
        layer = "none used"
    print(f"\n# load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())} at end; Numba threading layer: "
          f"{layer}; total {time.perf_counter() - t_all:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
