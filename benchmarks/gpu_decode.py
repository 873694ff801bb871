"""GPU decode-attention benchmark: dense and sparse decode, Quest's whole step, against torch SDPA.

What it measures (issue 9 floors), per context length n:
  * sdpa_flash     torch scaled_dot_product_attention, flash backend, fp16, dense over n (GQA); the
                   backend that actually ran is recorded (another one only if flash refuses)
  * triton_dense   our split-K kernel over all n tokens
  * triton_sparse  our kernel over B random tokens per KV head (index lists); achieved bandwidth on
                   the bytes it must read (2 * H_kv * B * d * 2 bytes + indices) against HBM peak
  * triton_paged   the same over B/P random pages of a paged (vLLM-layout) cache with a block table
  * quest_step     page scores + top-k + attention at page P, token budget B per query head, the
                   group's pages read once (union with a bit per head); metadata kept across steps,
                   as in decoding. Its speed-up over sdpa_flash is printed beside the floor as the
                   issue states it (0.8 n/B) and beside the memory-traffic bound (dense bytes / the
                   bytes Quest must read), which is below n/B: the metadata alone is 2/P of the keys
  * quest_step_per_head  the same with one list per query head (each head reads its own pages)
  * triton_mla     absorbed MLA decode at DeepSeek-V2-Lite's shape (16 heads over one latent head of
                   512 + 64 channels, read once as keys and values); no floor, priced by the
                   simulator's MLA model of that model
Context lengths below --sparse-from run the dense kernels only: they give the simulator's
efficiency curve its small sizes. Each timing is do_bench's median; with --cuda-graph (default on a
GPU) the step is also replayed from a CUDA graph (``seconds_graph``: launch overhead removed).
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
    ap.add_argument("--contexts", type=parse_sizes, default=parse_sizes("1k,4k,16k,32k,64k,128k"))
    ap.add_argument("--sparse-from", type=parse_sizes, default=parse_sizes("32k"),
                    help="contexts below this run the dense kernels only (calibration sizes)")
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
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                    help="do not also time each step replayed from a CUDA graph")
    return ap


KERNELS = ("sdpa_flash", "triton_dense", "triton_sparse", "triton_paged", "quest_step", "quest_step_per_head")
MLA_SHAPE = dict(heads=16, latent=512, rope=64, model="deepseek-v2-lite")


def plan(args) -> list[dict]:
    rows = []
    for n in args.contexts:
        rows.append({"kernel": "sdpa_flash", "n": n, "budget": n})
        rows.append({"kernel": "triton_dense", "n": n, "budget": n})
        if n < args.sparse_from[0]:
            continue
        rows.append({"kernel": "triton_mla", "n": n, "budget": n})
        for b in args.budgets:
            if b <= n:
                rows += [{"kernel": k, "n": n, "budget": b} for k in KERNELS[2:]]
    return rows


def bytes_needed(kernel: str, n: int, budget: int, args, rows_read: int | None = None) -> int:
    """Bytes a faithful kernel must read: fp16 K and V rows, int32 lists, fp16 Quest metadata (two
    rows per page and KV head). ``rows_read`` (K/V rows per KV head) overrides the budget where the
    kernel reads another count: the group's union for quest_step, G * B for quest_step_per_head."""
    elem = 2
    row = args.head_dim * elem
    if kernel in ("sdpa_flash", "triton_dense"):
        return 2 * args.h_kv * n * row
    if kernel == "triton_mla":
        return n * (MLA_SHAPE["latent"] + MLA_SHAPE["rope"]) * elem
    if kernel == "triton_sparse":
        return 2 * args.h_kv * budget * row + args.h_kv * budget * 4
    if kernel == "triton_paged":
        pages = budget // args.page_size
        return 2 * args.h_kv * pages * args.page_size * row + args.h_kv * pages * 4 + -(-n // args.page_size) * 4
    n_pages = -(-n // args.page_size)
    meta = 2 * args.h_kv * n_pages * args.head_dim * elem
    g = args.h_q // args.h_kv
    if rows_read is None:
        rows_read = budget * (g if kernel == "quest_step_per_head" else 1)
    return meta + 2 * args.h_kv * rows_read * row


def traffic_bound_speedup(n: int, budget: int, args) -> float:
    """Dense bytes over the least bytes Quest can read (metadata + B rows per KV head, full sharing)."""
    return bytes_needed("sdpa_flash", n, n, args) / bytes_needed("quest_step", n, budget, args)


SIM_METHOD = {"sdpa_flash": "dense", "triton_dense": "dense", "triton_sparse": "sliding_window",
              "triton_paged": "sliding_window", "quest_step": "quest", "quest_step_per_head": "quest",
              "triton_mla": "mla"}


def sim_seconds(kernel: str, n: int, budget: int, args, gpu_key: str) -> float:
    """The simulator's prediction for one layer's attention kernels of this shape (Llama-3-8B has the
    benchmark's H_q=32, H_kv=8, d=128): the step's attention time divided by its 32 layers. An
    index-set sparse attention over B tokens is priced as a B-token window (same rows read); Quest
    is priced with one list per query head (the simulator's convention)."""
    from kvsparse.sim import latency, models
    if kernel == "triton_mla":
        model = MLA_SHAPE["model"]
        t = latency.simulate(model, gpu_key, "mla", 0, n, dense_layers=0)
        return float(t.attention_seconds.ravel()[0]) / models.model(model).n_layers
    method = SIM_METHOD[kernel]
    params = {"page_size": args.page_size} if method == "quest" else None
    t = latency.simulate("llama-3-8b", gpu_key, method, budget if method != "dense" else 0, n,
                         dense_layers=0, params=params)
    return float(t.attention_seconds.ravel()[0]) / 32


def timer(fn, cuda: bool, graph: bool = False) -> float:
    """Median seconds per call (do_bench; do_bench_cudagraph replays a captured graph)."""
    if cuda:
        from triton.testing import do_bench, do_bench_cudagraph
        if graph:
            return do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def sdpa_call(torch, q, k, v, cuda: bool):
    """SDPA over the whole cache, flash backend where it accepts the shape; returns (fn, backend)."""
    qq, kk, vv = q[None, :, None, :], k[None], v[None]
    F = torch.nn.functional
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            def fn(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
            try:
                fn()
                torch.cuda.synchronize()
                return fn, backend.name.lower()
            except RuntimeError as exc:
                print(f"sdpa {backend.name} refused: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
    return (lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)), "default"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.contexts, args.budgets, args.h_q, args.h_kv, args.head_dim = [96], [32], 4, 2, 16
        args.sparse_from = [1]
    rows = plan(args)
    if args.dry_run:
        key = args.sim_gpu or "h100-sxm"
        for r in rows:
            pred = sim_seconds(r["kernel"], r["n"], r["budget"], args, key)
            print(f"{r['kernel']:20s} n={r['n']:>7d} budget={r['budget']:>7d} "
                  f"bytes={bytes_needed(r['kernel'], r['n'], r['budget'], args)} sim_{key}_us={pred * 1e6:.1f}")
        return 0
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("no GPU: run with --smoke (interpreter) or --dry-run", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kvsparse.kernels.triton.attention import decode_attention_indices, decode_attention_pages, dense_decode
    from kvsparse.kernels.triton.mla import mla_decode
    from kvsparse.kernels.triton.quest import page_metadata, quest_step, union_of_group

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
    out_path = None
    if cuda or args.out:
        safe = "".join(c if c.isalnum() else "_" for c in gpu)
        out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                            f"gpu_decode_{safe}.jsonl")
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        open(out_path, "w").close()
    env = {"torch": torch.__version__, "triton": __import__("triton").__version__,
           "cuda": torch.version.cuda if cuda else None}
    records, failures = [], 0
    g = torch.Generator(device="cpu").manual_seed(0)
    p = args.page_size
    for n in sorted({r["n"] for r in rows}):
        q = torch.randn((args.h_q, args.head_dim), generator=g).to(dev, dtype)
        k = torch.randn((args.h_kv, n, args.head_dim), generator=g).to(dev, dtype)
        v = torch.randn((args.h_kv, n, args.head_dim), generator=g).to(dev, dtype)
        kmin = kmax = k_pages = v_pages = None
        for r in [r for r in rows if r["n"] == n]:
            kernel, b = r["kernel"], r["budget"]
            rows_read, backend = None, "triton"
            try:
                if kernel == "sdpa_flash":
                    fn, backend = sdpa_call(torch, q, k, v, cuda)
                elif kernel == "triton_dense":
                    def fn():
                        return dense_decode(q, k, v)
                elif kernel == "triton_mla":
                    w = MLA_SHAPE["latent"] + MLA_SHAPE["rope"]
                    q_mla = torch.randn((MLA_SHAPE["heads"], w), generator=g).to(dev, dtype)
                    kv_mla = torch.randn((n, w), generator=g).to(dev, dtype)

                    def fn(q_mla=q_mla, kv_mla=kv_mla):
                        return mla_decode(q_mla, kv_mla, MLA_SHAPE["rope"], scale=1 / (128 + 64) ** 0.5)
                elif kernel == "triton_sparse":
                    idx = torch.stack([torch.randperm(n, generator=g)[:b] for _ in range(args.h_kv)])
                    idx = idx.sort(dim=1).values.to(dev, torch.int32)

                    def fn(idx=idx):
                        return decode_attention_indices(q, k, v, idx, check_inputs=False)
                elif kernel == "triton_paged":
                    if k_pages is None:     # the cache as a pool of pages in a shuffled physical order
                        n_pages = -(-n // p)
                        table = torch.randperm(n_pages, generator=g).to(dev, torch.int32)
                        pad = n_pages * p - n
                        k_pages = torch.empty((n_pages, p, args.h_kv, args.head_dim), dtype=dtype, device=dev)
                        v_pages = torch.empty_like(k_pages)
                        k_pages[table.long()] = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(
                            args.h_kv, n_pages, p, args.head_dim).permute(1, 2, 0, 3)
                        v_pages[table.long()] = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(
                            args.h_kv, n_pages, p, args.head_dim).permute(1, 2, 0, 3)
                    sel = torch.stack([torch.randperm(-(-n // p), generator=g)[: max(1, b // p)]
                                       for _ in range(args.h_kv)]).sort(dim=1).values.to(dev, torch.int32)

                    def fn(sel=sel):
                        return decode_attention_pages(q, k_pages, v_pages, table, sel, None, n, check_inputs=False)
                else:
                    if kmin is None:
                        kmin, kmax = page_metadata(k, p)
                    share = kernel == "quest_step"

                    def fn(b=b, share=share):
                        return quest_step(q, k, v, page_size=p, token_budget=b, kmin=kmin, kmax=kmax,
                                          share_group=share)
                    if share:               # the rows the union makes the step read, per KV head (mean)
                        pages = fn()[2]
                        _, counts, _ = union_of_group(pages, args.h_kv, -(-n // p))
                        rows_read = int(round(float(counts.float().mean()) * p))
                seconds = timer(fn, cuda)
                graph_seconds = None
                if cuda and args.cuda_graph:
                    try:
                        graph_seconds = timer(fn, cuda, graph=True)
                    except Exception as exc:   # noqa: BLE001 - reported; the plain timing stands
                        print(f"{kernel} n={n}: CUDA graph capture failed: {exc}", file=sys.stderr)
            except Exception as exc:   # noqa: BLE001 - one kernel failing must not lose the others' records
                failures += 1
                print(f"FAILED {kernel} n={n} budget={b}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            need = bytes_needed(kernel, n, b, args, rows_read)
            rec = {"gpu": gpu, "kernel": kernel, "backend": backend, "h_q": args.h_q, "h_kv": args.h_kv,
                   "d": args.head_dim, "page_size": p, "n": n, "budget": b, "dtype": args.dtype,
                   "rows_read_per_kv_head": rows_read, "bytes": need, "seconds": seconds,
                   "seconds_graph": graph_seconds, "achieved_gbps": need / seconds / 1e9, "peak_gbps": peak,
                   "fraction_of_peak": (need / seconds / 1e9 / peak) if peak else None,
                   "sim_gpu": sim_key,
                   "sim_seconds": sim_seconds(kernel, n, b, args, sim_key) if sim_key else None, **env}
            if rec["sim_seconds"]:
                rec["sim_error"] = rec["sim_seconds"] / seconds - 1
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if out_path:
                with open(out_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
    summarize(records, args)
    if out_path:
        print(f"wrote {out_path}")
    return 1 if failures else 0


def summarize(records: list[dict], args) -> None:
    """The issue's floors, each beside what was measured."""
    best = {}
    for r in records:
        t = min(x for x in (r["seconds"], r.get("seconds_graph")) if x)
        best[(r["kernel"], r["n"], r["budget"])] = (t, r)
    for (kernel, n, b), (t, r) in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if kernel in ("triton_sparse", "triton_paged", "triton_dense") and r["peak_gbps"]:
            frac = r["bytes"] / t / 1e9 / r["peak_gbps"]
            floor = "floor 0.80 (n >= 32K)" if kernel != "triton_dense" else "no floor"
            print(f"{kernel:14s} n={n} budget={b}: {frac:.2f} of HBM peak on the bytes it must read; {floor}")
        if kernel.startswith("quest_step") and ("sdpa_flash", n, n) in best:
            speedup = best[("sdpa_flash", n, n)][0] / t
            print(f"{kernel:14s} n={n} budget={b}: {speedup:.2f}x faster than sdpa_flash; floor as stated "
                  f"0.8 * n/B = {0.8 * n / b:.2f}x; memory-traffic bound {traffic_bound_speedup(n, b, args):.2f}x")


if __name__ == "__main__":
    if __package__ is None:   # run as a script from a checkout: find kvsparse beside benchmarks/
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
