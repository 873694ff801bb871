"""``kvsparse`` command line. Subcommands of the subpackages register themselves through a
``register(subparsers)`` function in the modules listed in ``EXTENSIONS``."""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from typing import Sequence

import numpy as np

EXTENSIONS = ("kvsparse.sim.cli", "kvsparse.sim.evaluate", "kvsparse.traces.cli", "kvsparse.property_tests.cli",
              "kvsparse.property_tests.validate", "kvsparse.sim.replay")


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of dicts (shared by every subcommand)."""
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


def _fmt(v) -> str:
    """A table cell: floats to 4 significant digits below 10,000 (``0.0123``, ``1629``), whole numbers
    with thousands separators from there up (``20,990``, never ``2.099e+04``; from 9,999.5, which
    rounds to 10,000), scientific notation only below 0.001 (and inf/nan as Python spells them)."""
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 9999.5:          # 9999.5 would round to 1e+04 at 4 digits
            return f"{v:.4g}"
        if abs(v) >= 9999.5 and math.isfinite(v):
            return f"{v:,.0f}"
        return f"{v:.3e}"
    return str(v)


def cmd_methods(args) -> int:
    from . import registry
    rows = registry.coverage_rows()
    print(format_table(rows))
    cols = ["oracle", "numba", "triton", "sim cost", "suite"]
    have = {c: sum(1 for r in rows if r[c]) for c in cols}
    print(f"\n{len(rows)} methods; " + ", ".join(f"{c}: {have[c]}/{len(rows)}" for c in cols))
    return 0


def demo_inputs(seed: int = 0, h_q: int = 8, h_kv: int = 2, n: int = 4096, d: int = 64):
    """Seeded decode-step inputs with a little structure (a sink, a few heavy hitters)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((h_q, d))
    k = rng.standard_normal((h_kv, n, d))
    v = rng.standard_normal((h_kv, n, d))
    k[:, 0] += 3.0 * q.reshape(h_kv, -1, d).mean(axis=1)       # an attention sink at token 0
    hitters = rng.choice(n, size=16, replace=False)
    k[:, hitters] += 1.5 * q.reshape(h_kv, -1, d).mean(axis=1)[:, None, :]
    return q, k, v


def cmd_demo(args) -> int:
    """Dense oracle against a naive low-precision computation, and every oracle at its defaults."""
    from . import registry
    from .oracle import core, run_decode
    from .property_tests import tolerances

    if args.n < 16:
        raise ValueError(f"--n must be at least 16 (the demo plants 16 heavy hitters), got {args.n}")
    q, k, v = demo_inputs(args.seed, n=args.n)
    t0 = time.perf_counter()
    exact = core.attend_dense(q, k, v)
    t_oracle = time.perf_counter() - t0
    print(f"Dense decode step: H_q={q.shape[0]}, H_kv={k.shape[0]}, n={k.shape[1]}, d={q.shape[1]} "
          f"(seed {args.seed}); float64 oracle in {t_oracle * 1e3:.1f} ms\n")
    rows = []
    for dtype in ("float16", "bfloat16", "float32"):
        if not tolerances.dtype_available(dtype):
            continue
        naive = tolerances.naive_attention(q, k, v, dtype)
        err = float(np.max(np.abs(naive - exact)))
        rows.append({"computation": f"naive {dtype}", "max |error| vs float64 oracle": err,
                     "allowed for a kernel in this dtype": tolerances.attention_tolerance(q, k, v, dtype)})
    print(format_table(rows))
    print("\nEvery registered oracle at its canonical defaults on the same inputs "
          "(stateful methods: prefill on all but the last token, then one decode step):\n")
    rows = []
    q_seq = np.broadcast_to(q, (k.shape[1],) + q.shape)
    k_seq, v_seq = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    for name, entry in registry.entries().items():
        if entry.oracle is None:
            continue
        try:
            method = entry.oracle.presets()["canonical"]
            if method.stateful:
                res = run_decode(method, q_seq, k_seq, v_seq, prefill_len=k.shape[1] - 1).steps[-1]
            else:
                res = method.step(q, k, v, positions=np.arange(k.shape[1]))
        except Exception as exc:  # a demo row, not a test: show what failed and go on
            rows.append({"method": name, "tokens kept (mean/head)": f"error: {exc}"})
            continue
        rel = np.linalg.norm(res.output - exact, axis=1) / np.linalg.norm(exact, axis=1)
        rows.append({"method": name, "tokens kept (mean/head)": float(res.selection.sizes.mean()),
                     "rel. l2 error vs dense (max over heads)": float(rel.max()),
                     "bytes read": res.traffic.total})
    print(format_table(rows))
    return 0


def cmd_report(args) -> int:
    """The main job on built-in defaults: coverage, then quality x cost of the main methods on the
    shipped real trace, with the cost projected onto a deployment-sized model and context."""
    from .sim.evaluate import DEFAULT_TRACE, budget_methods, evaluate, table_note, table_rows
    from .sim.models import model as get_model
    from .traces.format import load_trace

    print("kvsparse: what exists for each method (computed from the registry)\n")
    cmd_methods(args)
    trace = load_trace(DEFAULT_TRACE)
    methods = [m for m in ("quest", "sparq", "double_sparsity", "streaming_llm", "h2o", "snapkv") if m in budget_methods()]
    budgets = (128, 512)
    t0 = time.perf_counter()
    rows = evaluate(trace, methods, budgets, steps=args.steps, model=args.model, gpu=args.gpu, context=args.context)
    overall = table_rows(rows)
    print(f"\nQuality on a real trace: {trace}")
    print(f"layers {list(trace.layers)}, the last {args.steps} decode positions; error and attention mass are exact "
          f"(float64 oracle vs dense). Cost: one decode step of {args.model} on {args.gpu} at context {args.context}, "
          f"with the budget scaled to the same fraction of the context (simulated).\n")
    columns = ["method", "budget", "rel_error", "mass", "topk_overlap", "oracle_hbm_MB", "sim_budget",
               "group_union", "us_per_token", "attention_us", "attn_hbm_MB", "pcie_MB"]
    print(format_table(overall, columns))
    shape = get_model(args.model).attention()
    print("\n" + table_note(columns, trace.h_q // trace.h_kv, shape.h_q // shape.h_kv))
    dense_us = evaluate_dense_cost(args.model, args.gpu, args.context)
    print(f"\ndense attention, same model/GPU/context: {dense_us:.0f} us per token"
          f"   ({time.perf_counter() - t0:.1f} s)")
    print("\nMore: kvsparse evaluate --help | kvsparse sim --help | kvsparse validate --help | kvsparse demo")
    return 0


def evaluate_dense_cost(model: str, gpu: str, context: int) -> float:
    from .sim import latency
    return float(np.asarray(latency.simulate(model, gpu, "dense", 0, context).step_seconds).ravel()[0]) * 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsparse", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("methods", help="table of registered methods and what exists for each")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("demo", help="dense oracle vs naive low precision, and every oracle at its defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4096, help="context length of the demo inputs")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="the main job on built-in defaults: coverage, then quality x cost on a real trace")
    p.add_argument("--model", default="llama-3-8b", help="model whose decode step is costed")
    p.add_argument("--gpu", default="h100-sxm")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=4, help="decode positions evaluated at the end of the trace")
    p.set_defaults(func=cmd_report)
    for mod_name in EXTENSIONS:
        importlib.import_module(mod_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as exc:
        print(f"kvsparse {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
