"""Structural methods: bytes per token (measured from the oracles' Traffic), quantization / low-rank
error, and the Numba decode kernels' time. Short by design (2-core CPU shared with others).

    python benchmarks/bench_structural.py
"""
from __future__ import annotations

import time

import numpy as np

from kvsparse.kernels.numba.deja_vu import head_masked_attention
from kvsparse.kernels.numba.kv_quant import quantized_attention, stored_parts
from kvsparse.kernels.numba.attention import dense_attention
from kvsparse.kernels.numba.mla import mla_decode
from kvsparse.oracle import core
from kvsparse.oracle.kv_quant import KVQuant
from kvsparse.oracle.lorc import cache_error
from kvsparse.oracle.mla import MLA
from kvsparse.oracle.types import Layout, Selection


def best_of(fn, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bytes_table():
    print("## KV bytes read per token per layer (oracle Traffic, n=4096, Llama-3-8B-like layer H_q=32, H_kv=8, d=128)")
    n, h_q, h_kv, d = 4096, 32, 8, 128
    sel = Selection.full(h_q, n)
    dense = 2 * h_kv * d * 2
    print(f"| format | keys+values B/token | scales B/token | total vs fp16 |")
    print(f"|---|---|---|---|")
    print(f"| fp16 | {dense} | 0 | 1.000 |")
    for name, m in KVQuant.presets().items():
        t = m.quantized_kv_traffic(sel, h_kv=h_kv, d=d, layout=Layout())
        kv = (t.get("hbm", "keys") + t.get("hbm", "values")) / n
        meta = t.get("hbm", "metadata") / n
        print(f"| kv_quant {name} | {kv:.2f} | {meta:.2f} | {(kv + meta) / dense:.3f} |")
    print()
    print("## MLA, DeepSeek-V2-Lite layer: bytes per token (fp16)")
    for name, m in MLA.presets().items():
        t = m.cache_traffic(1, Layout())
        print(f"| mla {name} | keys {t.get('hbm', 'keys')} | values {t.get('hbm', 'values')} |")
    print()


def error_table():
    rng = np.random.default_rng(0)
    print("## Quantization: max |x - x_hat| / half-step bound and attention output error (n=1024, d=128, H_kv=8, G=4)")
    q = rng.standard_normal((32, 128))
    k = rng.standard_normal((8, 1024, 128))
    k[:, :, :4] *= 20                     # outlier channels, as in real keys
    v = rng.standard_normal((8, 1024, 128))
    ref = core.attend_dense(q, k, v)
    print("| preset | max rel output error |")
    print("|---|---|")
    for name, m in KVQuant.presets().items():
        out = m.step(q, k, v).output
        print(f"| {name} | {np.abs(out - ref).max() / np.abs(ref).max():.3e} |")
    print()
    print("## LoRC: relative cache error ||xW - xW_r||_F / ||xW||_F vs rank (W 512 x 256 with decaying spectrum)")
    u, _ = np.linalg.qr(rng.standard_normal((512, 256)))
    vv, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    w = (u * np.exp(-np.arange(256) / 64)) @ vv.T
    x = rng.standard_normal((256, 512))
    base = np.linalg.norm(x @ w)
    print("| rank | rel error |")
    print("|---|---|")
    for r in (32, 64, 128, 192, 256):
        print(f"| {r} | {cache_error(x, w, r) / base:.3e} |")
    print()


def kernel_table():
    rng = np.random.default_rng(1)
    print("## Numba decode kernels, float32, best of 5 (2-core CPU)")
    print("| kernel | shape | ms |")
    print("|---|---|---|")
    for n in (1024, 4096):
        ql, qr = rng.standard_normal((16, 512)).astype(np.float32), rng.standard_normal((16, 64)).astype(np.float32)
        c, kr = rng.standard_normal((n, 512)).astype(np.float32), rng.standard_normal((n, 64)).astype(np.float32)
        t = best_of(lambda: mla_decode(ql, qr, c, kr, scale=192 ** -0.5))
        print(f"| mla absorbed (DeepSeek-V2-Lite) | H=16, r=512, d_R=64, n={n} | {t * 1e3:.2f} |")
        q = rng.standard_normal((32, 128)).astype(np.float32)
        k = rng.standard_normal((8, n, 128)).astype(np.float32)
        v = rng.standard_normal((8, n, 128)).astype(np.float32)
        t = best_of(lambda: dense_attention(q, k, v))
        print(f"| dense (reference) | H_q=32, H_kv=8, d=128, n={n} | {t * 1e3:.2f} |")
        m = KVQuant(scale_dtype="float32")
        cache = m.quantize_cache(k, v)
        parts = stored_parts(cache.keys, cache.k_full, np.float32), stored_parts(cache.values, cache.v_full, np.float32)
        t = best_of(lambda: quantized_attention(q, *parts))
        print(f"| dequantize-on-read int4 (KIVI groups) | H_q=32, H_kv=8, d=128, n={n} | {t * 1e3:.2f} |")
        keep = np.zeros(32, bool)
        keep[:8] = True
        t = best_of(lambda: head_masked_attention(q, k, v, keep))
        print(f"| head-masked, 8 of 32 heads (2 KV heads) | H_q=32, H_kv=8, d=128, n={n} | {t * 1e3:.2f} |")


if __name__ == "__main__":
    bytes_table()
    error_table()
    kernel_table()
