"""Subcommands of this subpackage; ``register`` adds them to the ``kvsparse`` parser."""
from __future__ import annotations

import time


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _size(text: str, name: str) -> int | float:
    """An int (tokens) or, with a decimal point, a float (fraction of n)."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ValueError(f"{name} must be an int (tokens) or a float (fraction of n), got {text!r}") from None


def cmd_vattention_audit(args) -> int:
    """Realized failure rate against delta for each vAttention variant over input families."""
    from ..cli import format_table
    from . import vattention as va

    families = tuple(f for f in args.families.split(",") if f)
    variants = tuple(f for f in args.variants.split(",") if f)
    heavy = _size(args.heavy, "--heavy")
    t0 = time.perf_counter()
    rows = va.audit(variants=variants, families=families, epsilons=_floats(args.eps, "--eps"),
                    deltas=_floats(args.delta, "--delta"),
                    n=args.n, d=args.d, trials=args.trials, sinks=args.sinks, local=args.local, heavy=heavy,
                    share=args.share, alpha=args.alpha, seed=args.seed)
    print(f"vAttention audit: {args.trials} trials per cell, n={args.n}, d={args.d}, sinks={args.sinks}, "
          f"local={args.local}, heavy={heavy}, one_dominant share={args.share}; a verdict EXCEEDS means an exact "
          f"binomial test rejects 'failure rate <= claimed delta' for some claimed target (false alarm "
          f"<= {args.alpha:g} per cell). 'read' = mean fraction of the n tokens attended.\n")
    print(format_table(rows))
    exceeded = sum(r["verdict"] == "EXCEEDS" for r in rows)
    print(f"\n{len(rows)} cells, {exceeded} exceed their claim; {time.perf_counter() - t0:.1f} s")
    if args.plot:
        if va.plot_audit(rows, args.plot):
            print(f"plot written to {args.plot}")
        else:
            print("matplotlib is not installed (the 'plot' extra): no plot")
    return 0


def register(subparsers) -> None:
    """Add this subpackage's subcommands."""
    from .vattention import AUDIT_VARIANTS, FAMILIES

    p = subparsers.add_parser("vattention-audit",
                              help="vAttention: realized failure rate vs delta per variant and input family")
    p.add_argument("--variants", default=",".join(AUDIT_VARIANTS), help="comma-separated presets")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated input families")
    p.add_argument("--eps", default="0.1,0.2", help="comma-separated epsilons")
    p.add_argument("--delta", default="0.05,0.1", help="comma-separated deltas")
    p.add_argument("--n", type=int, default=1024, help="context length (large_ns uses 4n)")
    p.add_argument("--d", type=int, default=16, help="head dim")
    p.add_argument("--trials", type=int, default=1000, help="independent trials per cell")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--local", type=int, default=16)
    p.add_argument("--heavy", default="0", help="top-k size: an int (tokens) or a float (fraction of n)")
    p.add_argument("--share", type=float, default=0.05, help="mass share of the one_dominant token")
    p.add_argument("--alpha", type=float, default=1e-6, help="false-alarm probability per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write a PNG of failure rate vs delta here")
    p.set_defaults(func=cmd_vattention_audit)
