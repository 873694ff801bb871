"""KV quantization composed with Quest (bytes of one step), and the CLA / LoRC Numba kernels against
the dense kernel (time of one step). H_q=32, H_kv=8, d=128, float32 kernels, best of --repeats.

Run: python benchmarks/bench_composition.py [--repeats 5]
"""
import argparse
import time

import numpy as np

from kvsparse.kernels.numba.attention import dense_attention
from kvsparse.kernels.numba.cla import cla_decode_layers
from kvsparse.kernels.numba.lorc import lorc_attention
from kvsparse.oracle.cla import CLA
from kvsparse.oracle.kv_quant import KVQuant
from kvsparse.oracle.quest import Quest


def best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    h_q, h_kv, d = 32, 8, 128
    rng = np.random.default_rng(0)
    n = 4096
    q = rng.standard_normal((h_q, d))
    k, v = (rng.standard_normal((h_kv, n, d)) for _ in range(2))
    print(f"Oracle Traffic of one step, n={n}, H_q={h_q}, H_kv={h_kv}, d={d}, Quest budget 1024, 16-token pages")
    print("| method | keys B | values B | metadata B | total vs fp16 Quest |\n|---|---|---|---|---|")
    base = Quest().step(q, k, v).traffic
    for name, m in (("quest (fp16)", Quest()), ("quest-int4", KVQuant.presets()["quest-int4"])):
        t = m.step(q, k, v).traffic
        print(f"| {name} | {t.by_tensor('keys')} | {t.by_tensor('values')} | {t.by_tensor('metadata')} "
              f"| {t.total / base.total:.3f} |")
    print("\n| kernel | shape | ms |\n|---|---|---|")
    for n in (1024, 4096):
        q32 = rng.standard_normal((h_q, d)).astype(np.float32)
        k32, v32 = (rng.standard_normal((h_kv, n, d)).astype(np.float32) for _ in range(2))
        t_dense = best(lambda: dense_attention(q32, k32, v32), args.repeats)
        rank = h_kv * d // 2
        lat_k, lat_v = (rng.standard_normal((n, rank)).astype(np.float32) for _ in range(2))
        b_k, b_v = ((rng.standard_normal((rank, h_kv * d)) / np.sqrt(rank)).astype(np.float32) for _ in range(2))
        t_lorc = best(lambda: lorc_attention(q32, lat_k, lat_v, b_k, b_v), args.repeats)
        ql = np.stack([q32, q32])
        kl, vl = np.stack([k32, k32]), np.stack([v32, v32])
        t_cla = best(lambda: cla_decode_layers(CLA(sharing_factor=2), ql, kl, vl), args.repeats)
        print(f"| dense (reference) | n={n} | {t_dense * 1e3:.2f} |")
        print(f"| lorc rebuild + RoPE + dense, ranks {rank}/{rank} | n={n} | {t_lorc * 1e3:.2f} |")
        print(f"| cla, 2 layers over one shared cache | n={n} | {t_cla * 1e3:.2f} |")


if __name__ == "__main__":
    main()
