"""``kvsparse sim`` (one configuration, per-kernel table) and ``kvsparse sweep`` (CSV, plot)."""
from __future__ import annotations

import ast
import json
import time

import numpy as np


def parse_tokens(text: str) -> int:
    """``32k`` -> 32768 (k = 1024, m = 1024**2), ``4096`` -> 4096."""
    t = str(text).strip().lower()
    mult = {"k": 1024, "m": 1024 ** 2}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    try:
        value = float(digits) * mult
    except ValueError:
        raise ValueError(f"token count must look like 4096, 32k or 1m, got {text!r}") from None
    if value != int(value) or value < 1:
        raise ValueError(f"token count must be a positive whole number, got {text!r}")
    return int(value)


def parse_list(text: str) -> list[int]:
    """``1k,2k,4k`` or ``geom:64:8192:8`` (8 geometric steps, rounded, unique)."""
    if text.startswith("geom:"):
        _, lo, hi, steps = text.split(":")
        vals = np.geomspace(parse_tokens(lo), parse_tokens(hi), int(steps))
        return sorted({int(round(v)) for v in vals})
    return [parse_tokens(p) for p in text.split(",") if p.strip()]


def parse_params(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--param must be NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _common(p) -> None:
    p.add_argument("--model", default="llama-3-8b", help="built-in model key or path to a config.json")
    p.add_argument("--kv", default="fp16", help="KV dtype: fp16, bf16, fp8, int8, int4")
    p.add_argument("--weights", default="fp16", help="weight dtype: fp16, bf16, fp8, int8, int4")
    p.add_argument("--page-size", type=int, default=1, help="KV page size in tokens (reads are page-granular)")
    p.add_argument("--no-share-kv-heads", action="store_true",
                   help="each query head reads its own KV rows (no GQA-aware loading)")
    p.add_argument("--cuda-graphs", action="store_true", help="no CPU launch cost")
    p.add_argument("--gpu-file", default=None, help="user TOML file adding or overriding GPUs")
    p.add_argument("--param", action="append", help="method hyper-parameter NAME=VALUE (repeatable)")


def _gpu(key, gpu_file):
    from . import hardware
    return hardware.gpu(key, gpu_file) if gpu_file else hardware.gpu(key)


def cmd_sim(args) -> int:
    from ..cli import format_table
    from . import latency
    from .models import model as get_model

    contexts = parse_list(args.context)
    g = _gpu(args.gpu, args.gpu_file)
    spec = get_model(args.model)
    kw = dict(kv=args.kv, weights=args.weights, page_size=args.page_size,
              share_kv_heads=not args.no_share_kv_heads, params=parse_params(args.param),
              dense_layers=args.dense_layers, cuda_graphs=args.cuda_graphs)
    fn = latency.method_cost(args.method)
    budget = parse_tokens(args.budget) if args.budget else None
    t = latency.simulate(spec, g, args.method, budget, contexts, **kw)
    dense = latency.simulate(spec, g, "dense", 0, contexts, **{**kw, "params": None, "dense_layers": 0})
    sk = t.kernels
    rows = latency.kernel_table(t)
    by_tensor = {ten: float(sk.hbm_read_bytes((ten,))) for ten in
                 ("weights", "keys", "values", "metadata", "auxiliary", "activations")}
    summary = {
        "model": spec.key, "gpu": g.key, "method": args.method,
        "budget": int(budget) if budget is not None else fn.defaults.get(fn.budget_param or "", None),
        "contexts": contexts,
        "kv": args.kv, "weights": args.weights, "page_size": args.page_size,
        "step_us": float(t.step_seconds) * 1e6, "tokens_per_s": len(contexts) / float(t.step_seconds),
        "attention_us": float(t.attention_seconds) * 1e6,
        "hbm_read_GB": float(sk.hbm_read_bytes()) / 1e9,
        "hbm_read_GB_by_tensor": {k: v / 1e9 for k, v in by_tensor.items() if v},
        "pcie_GB": float(sk.total(lambda k: k.read("pcie"))) / 1e9,
        "host_GB": float(sk.total(lambda k: k.read("host"))) / 1e9,
        "dense_step_us": float(dense.step_seconds) * 1e6,
        "speedup_vs_dense": float(dense.step_seconds / t.step_seconds),
    }
    if args.generate:
        summary["generation_s"] = latency.generation_seconds(
            spec, g, args.method, budget, prompt=max(contexts) - 1, new_tokens=args.generate, **kw)
    if args.json:
        print(json.dumps({"summary": summary, "kernels": rows}, indent=2))
        return 0
    print(f"{spec.key} on {g.name} ({g.key}), method {args.method}, budget {summary['budget']}, "
          f"context {', '.join(map(str, contexts))} (batch {len(contexts)}), KV {args.kv}, "
          f"weights {args.weights}{', CUDA graphs' if args.cuda_graphs else ''}\n")
    print(format_table(rows))
    print()
    lines = [("time per step (= per token per request)", f"{summary['step_us']:.1f} us"),
             ("  of which attention kernels", f"{summary['attention_us']:.1f} us"),
             ("tokens/s (all requests)", f"{summary['tokens_per_s']:.1f}"),
             ("HBM read per step", f"{summary['hbm_read_GB']:.4f} GB (GB = 1e9 B)"),
             *((f"  {k}", f"{v:.4f} GB") for k, v in summary["hbm_read_GB_by_tensor"].items()),
             ("PCIe / host read per step", f"{summary['pcie_GB']:.4f} / {summary['host_GB']:.4f} GB"),
             ("dense attention, same setup", f"{summary['dense_step_us']:.1f} us per step"),
             ("speed-up over dense", f"{summary['speedup_vs_dense']:.3f}x")]
    if "generation_s" in summary:
        lines.append((f"decode {args.generate} tokens after the context", f"{summary['generation_s']:.3f} s"))
    width = max(len(a) for a, _ in lines)
    print("\n".join(f"{a.ljust(width)}  {b}" for a, b in lines))
    return 0


def cmd_sweep(args) -> int:
    from ..cli import format_table
    from .sweep import plot, sweep

    gpus = [_gpu(k, args.gpu_file) for k in args.gpus.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    params = parse_params(args.param)
    t0 = time.perf_counter()
    res = sweep(args.model, gpus, methods, parse_list(args.budgets), parse_list(args.contexts), kv=args.kv,
                weights=args.weights, page_size=args.page_size, share_kv_heads=not args.no_share_kv_heads,
                batch=args.batch, params={m: params for m in methods} if params else None,
                cuda_graphs=args.cuda_graphs)
    dt = time.perf_counter() - t0
    res.write_csv(args.out)
    print(f"{res.n_configs} configurations in {dt:.3f} s ({res.n_configs / dt:,.0f}/s); wrote {args.out}")
    if args.plot:
        try:
            plot(res, args.plot)
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'kvsparse[plot]')")
        else:
            print(f"wrote {args.plot} (a row of panels per GPU: {', '.join(res.gpus)})")
    if "dense" in methods:
        be = res.break_even()
        rows = []
        for m, name in enumerate(methods):
            if name == "dense":
                continue
            for g, gk in enumerate(res.gpus):
                for b, budget in enumerate(res.budgets):
                    rows.append({"method": name, "gpu": gk, "budget": int(budget),
                                 "faster than dense from context": int(be[m, g, b]) or "never (in sweep)"})
        print(format_table(rows))
    return 0


def cmd_budget(args) -> int:
    from .sweep import budget_for_target
    b = budget_for_target(args.model, _gpu(args.gpu, args.gpu_file), args.method, parse_tokens(args.context),
                          args.target_us * 1e-6, kv=args.kv, weights=args.weights, page_size=args.page_size,
                          share_kv_heads=not args.no_share_kv_heads, params=parse_params(args.param),
                          cuda_graphs=args.cuda_graphs)
    print("no budget meets the target" if b is None else f"largest budget meeting {args.target_us} us/token: {b}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sim", help="simulate one decode step: per-kernel bytes, FLOPs and time")
    _common(p)
    p.add_argument("--gpu", default="h100-sxm")
    p.add_argument("--method", default="dense")
    p.add_argument("--budget", default=None, help="token budget per head (default: the method's)")
    p.add_argument("--context", default="32k", help="context length, or a comma list: one request each")
    p.add_argument("--dense-layers", type=int, default=None, help="dense first layers (default: the method's)")
    p.add_argument("--generate", type=int, default=0, help="also time decoding this many tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sim)

    p = subparsers.add_parser("sweep", help="sweep budgets x contexts x methods x GPUs into a CSV")
    _common(p)
    p.add_argument("--gpus", default="h100-sxm")
    p.add_argument("--methods", default="dense")
    p.add_argument("--budgets", default="geom:64:8k:8")
    p.add_argument("--contexts", default="geom:1k:128k:8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default="sweep.csv")
    p.add_argument("--plot", default=None, help="also write a PNG plot, a row of panels per GPU (needs matplotlib)")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("budget", help="largest budget meeting a target time per token")
    _common(p)
    p.add_argument("--gpu", default="h100-sxm")
    p.add_argument("--method", required=True)
    p.add_argument("--context", default="32k")
    p.add_argument("--target-us", type=float, required=True)
    p.set_defaults(func=cmd_budget)
