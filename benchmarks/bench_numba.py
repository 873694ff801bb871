"""Numba CPU kernels: compile time, speed-up over the float64 oracles, sparse attention's scaling in n
at fixed B, its memory bandwidth against a plain NumPy copy, and dense decode against torch's SDPA.

    python benchmarks/bench_numba.py            # the full run recorded in benchmarks/numba.md
    python benchmarks/bench_numba.py --quick    # small sizes (a smoke test)

Numba compiles into a fresh cache directory, so "compile" is a true first-call cost. Times are the
minimum over repeats (the machine is shared); kernels run in float32, oracles in float64.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvsparse-numba-bench-")

import numpy as np  # noqa: E402


MINE = ("dense", "quest", "sparq", "double_sparsity", "twilight")   # kernels of this benchmark's area


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gather_copy_kernel():
    import numba

    @numba.njit
    def gather_copy(src, idx, dst):
        """The rows a sparse step must read, copied out: its bytes at pure-copy speed (one thread)."""
        for h in range(src.shape[0]):
            for j in range(idx.shape[1]):
                r = idx[h, j]
                for c in range(src.shape[2]):
                    dst[h, j, c] = src[h, r, c]
    return gather_copy


def table(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def filled(shape, rng):
    """float32 uniform(-0.5, 0.5), every page touched (untouched pages would read as free zeros)."""
    out = np.empty(shape, np.float32)
    rng.random(out=out.reshape(-1), dtype=np.float32)
    out -= 0.5
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import numba
    import torch

    from kvsparse import registry
    from kvsparse.kernels.numba import attention as A
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    h_q, h_kv, d = 32, 8, 128
    n_main = 4096 if args.quick else 32768
    ns = [2048, 8192] if args.quick else [8192, 32768, 131072, 262144]
    budget = 512 if args.quick else 2048
    print(f"# numba {numba.__version__}, {numba.get_num_threads()} threads; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; H_q={h_q} H_kv={h_kv} d={d}")

    # --- 1. NumPy copy bandwidth ------------------------------------------------------------
    src = filled((64 * 2**20 // 4,) if not args.quick else (8 * 2**20 // 4,), rng)
    dst = np.empty_like(src)
    t = best(lambda: np.copyto(dst, src), 10)
    copy_read = src.nbytes / t / 1e9
    print(f"\nNumPy copy of {src.nbytes / 2**20:.0f} MiB: {t * 1e3:.2f} ms = {copy_read:.2f} GB/s read "
          f"({2 * copy_read:.2f} GB/s read + written)")

    # --- 2. sparse attention at fixed B over growing n ---------------------------------------
    q = filled((h_q, d), rng)
    gather_copy = gather_copy_kernel()
    rows = []
    for n in ns:
        k = filled((h_kv, n, d), rng)
        v = filled((h_kv, n, d), rng)
        idx = np.stack([np.sort(rng.choice(n, budget, replace=False)) for _ in range(h_kv)])
        A.sparse_attention(q, k, v, idx)
        t = best(lambda: A.sparse_attention(q, k, v, idx, check=False), 20)
        numba.set_num_threads(1)
        t1 = best(lambda: A.sparse_attention(q, k, v, idx, check=False), 20)
        numba.set_num_threads(threads)
        buf = np.empty((h_kv, budget, d), np.float32)
        gather_copy(k, idx, buf)
        t_g = best(lambda: (gather_copy(k, idx, buf), gather_copy(v, idx, buf)), 20)
        read = 2 * h_kv * budget * d * 4 + idx.nbytes
        rows.append({"n": n, "B": budget, "time ms": f"{t * 1e3:.3f}", "bytes read MB": f"{read / 1e6:.1f}",
                     "GB/s": f"{read / t / 1e9:.2f}", "% of copy (read)": f"{100 * read / t / 1e9 / copy_read:.0f}",
                     "% of copy (r+w)": f"{100 * read / t / 1e9 / (2 * copy_read):.0f}",
                     "1-thread ms": f"{t1 * 1e3:.3f}", "1-thread % of copy (read)": f"{100 * read / t1 / 1e9 / copy_read:.0f}",
                     "gather-copy of the rows ms": f"{t_g * 1e3:.3f}", "1-thread % of gather-copy": f"{100 * t_g / t1:.0f}"})
        del k, v
    print("\nSparse decode attention over B tokens per KV head (shared by the group), float32\n" + table(rows))

    # --- 3. dense vs torch SDPA -----------------------------------------------------------------
    k = filled((h_kv, n_main, d), rng)
    v = filled((h_kv, n_main, d), rng)
    A.dense_attention(q, k, v)
    t_nb = best(lambda: A.dense_attention(q, k, v), 10)
    qt, kt, vt = (torch.from_numpy(x)[None] for x in (q[:, None, :], k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        sdpa(qt, kt, vt, enable_gqa=True)
        t_sdpa = best(lambda: sdpa(qt, kt, vt, enable_gqa=True), 10)
        t_rep = best(lambda: sdpa(qt, kt.repeat_interleave(h_q // h_kv, 1), vt.repeat_interleave(h_q // h_kv, 1)), 5)
    dense_bytes = k.nbytes + v.nbytes
    print(f"\nDense decode n={n_main}: numba {t_nb * 1e3:.2f} ms ({dense_bytes / t_nb / 1e9:.2f} GB/s); torch SDPA "
          f"(enable_gqa) {t_sdpa * 1e3:.2f} ms; SDPA after repeat_interleave {t_rep * 1e3:.2f} ms; "
          f"numba / SDPA time ratio {t_nb / t_sdpa:.2f}")

    # --- 4. every kernel vs its oracle --------------------------------------------------------
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    rows = []
    for name in MINE:
        entry = registry.get(name)
        kernel = entry.kernels.get("numba")
        if kernel is None or entry.oracle is None or entry.oracle.stateful:
            continue
        method = registry.oracle(name)
        t0 = time.perf_counter()
        kernel(method, q, k, v)
        first = time.perf_counter() - t0
        t_k = best(lambda: kernel(method, q, k, v), 5)
        t_o = best(lambda: method.step(q64, k64, v64), 1 if not args.quick else 2)
        rows.append({"method": name, "config": repr(method)[:60], "oracle ms": f"{t_o * 1e3:.1f}",
                     "numba ms": f"{t_k * 1e3:.2f}", "speed-up": f"{t_o / t_k:.1f}x",
                     "first call (compile) s": f"{first:.2f}"})
        if name == "sparq":   # a decoder keeps the running mean of V; the oracle's traffic counts it so
            mean_v = v.mean(axis=1, dtype=np.float64)
            t_m = best(lambda: kernel(method, q, k, v, mean_v=mean_v), 5)
            rows.append({"method": "sparq (running mean_v passed)", "config": "", "oracle ms": f"{t_o * 1e3:.1f}",
                         "numba ms": f"{t_m * 1e3:.2f}", "speed-up": f"{t_o / t_m:.1f}x", "first call (compile) s": ""})
        if name == "double_sparsity":   # the label cache is maintained by a decoder, not rebuilt per step
            from kvsparse.kernels.numba.double_sparsity import label_cache
            ch = method.channels_per_query_head(h_q, h_kv, d)[:: h_q // h_kv]
            labels = label_cache(k, np.ascontiguousarray(ch), method.label_bits or 0)
            t_m = best(lambda: kernel(method, q, k, v, labels=labels), 5)
            rows.append({"method": "double_sparsity (label cache passed)", "config": "", "oracle ms": f"{t_o * 1e3:.1f}",
                         "numba ms": f"{t_m * 1e3:.2f}", "speed-up": f"{t_o / t_m:.1f}x", "first call (compile) s": ""})
    print(f"\nKernels vs oracles, canonical presets, n={n_main} (float32 kernel, float64 oracle)\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
