"""GPU decode-attention benchmark: dense and sparse decode, Quest's whole step, against torch SDPA.

What it measures (issue 9 floors), per context length n:
  * sdpa_flash     torch scaled_dot_product_attention, flash backend, fp16, dense over n (GQA)
  * triton_dense   our split-K kernel over all n tokens
  * triton_sparse  our kernel over B random tokens per KV head; achieved bandwidth on the bytes it
                   must read (2 * H_kv * B * d * 2 bytes + indices) against the GPU's HBM peak
  * quest_step     page scores + top-k + attention at page 16, token budget B (metadata kept across
                   steps, as in decoding), and its speed-up over sdpa_flash vs the ideal n / B
Results are written as JSON lines (one record per kernel and shape) in the format the simulator
reads for calibration (`kvsparse.sim.hardware.calibrated`), with the GPU named and the simulator's
prediction for the same shape beside each measurement (`sim_seconds`, `sim_error`).

  python benchmarks/gpu_decode.py                       # on a GPU machine
  python benchmarks/gpu_decode.py --dry-run             # anywhere: checks arguments, prints the plan
  python benchmarks/gpu_decode.py --smoke               # anywhere: tiny shapes through every code path
                                                        # (TRITON_INTERPRET=1 on a CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        value = int(part[:-1] if part.endswith("k") else part) * mult
        if value <= 0:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {part!r}")
        out.append(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=parse_sizes, default=parse_sizes("32k,64k,128k"))
    ap.add_argument("--budgets", type=parse_sizes, default=parse_sizes("1k,4k"))
    ap.add_argument("--h-q", type=int, default=32)
    ap.add_argument("--h-kv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="HBM peak in GB/s (default: the simulator catalog's figure for the detected GPU)")
    ap.add_argument("--out", default=None, help="JSON-lines output (default benchmarks/results/gpu_decode_<gpu>.jsonl)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (with the simulator's prediction) and exit")
    ap.add_argument("--sim-gpu", default=None,
                    help="simulator catalog key for the predictions (default: the detected GPU; h100-sxm in --dry-run)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device (interpreter on CPU)")
    return ap


def plan(args) -> list[dict]:
    rows = []
    for n in args.contexts:
        rows.append({"kernel": "sdpa_flash", "n": n, "budget": n})
        rows.append({"kernel": "triton_dense", "n": n, "budget": n})
        for b in args.budgets:
            if b <= n:
                rows.append({"kernel": "triton_sparse", "n": n, "budget": b})
                rows.append({"kernel": "quest_step", "n": n, "budget": b})
    return rows


def bytes_needed(kernel: str, n: int, budget: int, args) -> int:
    """Bytes a faithful kernel must read (fp16 K and V rows, int32 indices, fp32 Quest metadata)."""
    elem = 2
    row = args.head_dim * elem
    if kernel in ("sdpa_flash", "triton_dense"):
        return 2 * args.h_kv * n * row
    if kernel == "triton_sparse":
        return 2 * args.h_kv * budget * row + args.h_kv * budget * 4
    n_pages = -(-n // args.page_size)
    meta = 2 * args.h_kv * n_pages * args.head_dim * 4
    return meta + 2 * args.h_kv * budget * row


SIM_METHOD = {"sdpa_flash": "dense", "triton_dense": "dense", "triton_sparse": "sliding_window", "quest_step": "quest"}


def sim_seconds(kernel: str, n: int, budget: int, args, gpu_key: str) -> float:
    """The simulator's prediction for one layer's attention kernels of this shape (Llama-3-8B has the
    benchmark's H_q=32, H_kv=8, d=128): the step's attention time divided by its 32 layers. An
    index-set sparse attention over B tokens is priced as a B-token window (same rows read)."""
    from kvsparse.sim import latency
    method = SIM_METHOD[kernel]
    params = {"page_size": args.page_size} if method == "quest" else None
    t = latency.simulate("llama-3-8b", gpu_key, method, budget if method != "dense" else 0, n,
                         dense_layers=0, params=params)
    return float(t.attention_seconds.ravel()[0]) / 32


def timer(torch, fn, cuda: bool) -> float:
    """Median seconds per call."""
    if cuda:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.contexts, args.budgets, args.h_q, args.h_kv, args.head_dim = [96], [32], 4, 2, 16
    rows = plan(args)
    if args.dry_run:
        key = args.sim_gpu or "h100-sxm"
        for r in rows:
            pred = sim_seconds(r["kernel"], r["n"], r["budget"], args, key)
            print(f"{r['kernel']:14s} n={r['n']:>7d} budget={r['budget']:>7d} "
                  f"bytes={bytes_needed(r['kernel'], r['n'], r['budget'], args)} sim_{key}_us={pred * 1e6:.1f}")
        return 0
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("no GPU: run with --smoke (interpreter) or --dry-run", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kvsparse.kernels.triton.attention import decode_attention_indices, dense_decode
    from kvsparse.kernels.triton.quest import page_metadata, quest_step

    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name() if cuda else f"cpu-interpreter ({platform.processor() or 'cpu'})"
    peak = args.peak_gbps
    sim_key = args.sim_gpu
    if cuda:
        from kvsparse.sim import hardware
        try:
            found = hardware.for_device_name(gpu)
            peak = peak or found.hbm_gbps
            sim_key = sim_key or found.key
        except ValueError:  # the catalog does not know this GPU: no fraction of peak, no prediction
            pass
    records = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for n in sorted({r["n"] for r in rows}):
        q = torch.randn((args.h_q, args.head_dim), generator=g).to(dev, dtype)
        k = torch.randn((args.h_kv, n, args.head_dim), generator=g).to(dev, dtype)
        v = torch.randn((args.h_kv, n, args.head_dim), generator=g).to(dev, dtype)
        kmin, kmax = page_metadata(k, args.page_size)
        for r in [r for r in rows if r["n"] == n]:
            kernel, b = r["kernel"], r["budget"]
            if kernel == "sdpa_flash":
                qq, kk, vv = q[None, :, None, :], k[None], v[None]

                def fn():
                    if cuda:
                        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
                    return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
            elif kernel == "triton_dense":
                def fn():
                    return dense_decode(q, k, v)
            elif kernel == "triton_sparse":
                idx = torch.stack([torch.randperm(n, generator=g)[:b] for _ in range(args.h_kv)]).sort(dim=1).values
                idx = idx.to(dev, torch.int32)

                def fn(idx=idx):
                    return decode_attention_indices(q, k, v, idx)
            else:
                def fn(b=b):
                    return quest_step(q, k, v, page_size=args.page_size, token_budget=b, kmin=kmin, kmax=kmax)
            seconds = timer(torch, fn, cuda)
            need = bytes_needed(kernel, n, b, args)
            rec = {"gpu": gpu, "kernel": kernel, "h_q": args.h_q, "h_kv": args.h_kv, "d": args.head_dim,
                   "n": n, "budget": b, "dtype": args.dtype, "bytes": need, "seconds": seconds,
                   "achieved_gbps": need / seconds / 1e9, "peak_gbps": peak,
                   "fraction_of_peak": (need / seconds / 1e9 / peak) if peak else None,
                   "sim_gpu": sim_key,
                   "sim_seconds": sim_seconds(kernel, n, b, args, sim_key) if sim_key else None}
            if rec["sim_seconds"]:
                rec["sim_error"] = rec["sim_seconds"] / seconds - 1
            records.append(rec)
            print(json.dumps(rec))
    for n in sorted({r["n"] for r in rows}):
        sdpa = next(r for r in records if r["n"] == n and r["kernel"] == "sdpa_flash")
        for r in records:
            if r["n"] == n and r["kernel"] == "quest_step":
                speedup = sdpa["seconds"] / r["seconds"]
                print(f"n={n} budget={r['budget']}: quest step {speedup:.2f}x faster than sdpa_flash; "
                      f"floor 0.8 * n/B = {0.8 * n / r['budget']:.2f}x")
    if cuda or args.out:
        safe = "".join(c if c.isalnum() else "_" for c in gpu)
        out = args.out or os.path.join(os.path.dirname(__file__), "results", f"gpu_decode_{safe}.jsonl")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
