"""Replay an access trace against a GPU-resident cache of offloaded KV.

The whole KV cache lives in host memory; a GPU cache of ``capacity_bytes`` holds recently used
units (tokens, pages, or ClusterKV's clusters). Each decode step reads the units its access trace
lists; a unit not in the GPU cache crosses PCIe. This is the temporal reuse an analytic model cannot
see.

Rules (explicit, tested):
* Policy LRU over units keyed by (layer, KV head, unit id); a hit refreshes recency.
* Within a step, units are visited layer by layer, KV head by KV head, in ascending id order.
* A miss transfers the unit (its bytes count as PCIe bytes) and inserts it as most recent, evicting
  least-recent units until it fits; a unit larger than the whole cache bypasses it.
* Latency of a step's transfers = ``missed_bytes / link_bandwidth + transfers * link_latency``
  (one transfer per (layer, KV head) with any miss: a gather of that head's missing units).
  With ``prefetch="perfect"`` the transfers of step t >= 1 are issued during step t-1, so only the
  part exceeding ``compute_seconds`` (the step's GPU time) remains exposed; step 0 is fully exposed.
  ``prefetch="none"``: every transfer is exposed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ..oracle import core
from ..traces.access import AccessTrace

PREFETCH = ("none", "perfect")


@numba.njit(cache=True)
def _lru_replay(ids, offsets, unit_sizes, unit_bytes, n_units, capacity):
    steps, n_layers, hp1 = offsets.shape
    h_kv = hp1 - 1
    n_keys = n_layers * h_kv * n_units
    # doubly linked list over keys; node n_keys is the sentinel (next = most recent, prev = least recent)
    nxt = np.full(n_keys + 1, -1, np.int64)
    prv = np.full(n_keys + 1, -1, np.int64)
    resident = np.zeros(n_keys, np.bool_)
    head = n_keys
    nxt[head] = head
    prv[head] = head
    used = 0
    hits = np.zeros(steps, np.int64)
    misses = np.zeros(steps, np.int64)
    miss_bytes = np.zeros(steps, np.int64)
    transfers = np.zeros(steps, np.int64)
    for s in range(steps):
        for li in range(n_layers):
            for h in range(h_kv):
                any_miss = False
                for j in range(offsets[s, li, h], offsets[s, li, h + 1]):
                    u = ids[j]
                    key = (li * h_kv + h) * n_units + u
                    size = unit_bytes * (unit_sizes[li, h, u] if unit_sizes.shape[0] > 0 else 1)
                    if resident[key]:
                        hits[s] += 1
                        nxt[prv[key]] = nxt[key]            # unlink
                        prv[nxt[key]] = prv[key]
                    else:
                        misses[s] += 1
                        miss_bytes[s] += size
                        any_miss = True
                        if size > capacity:
                            continue
                        while used + size > capacity:        # evict least recent
                            lru = prv[head]
                            nxt[prv[lru]] = head
                            prv[head] = prv[lru]
                            resident[lru] = False
                            lu = lru % n_units
                            lh = (lru // n_units) % h_kv
                            ll = lru // (n_units * h_kv)
                            used -= unit_bytes * (unit_sizes[ll, lh, lu] if unit_sizes.shape[0] > 0 else 1)
                        resident[key] = True
                        used += size
                    first = nxt[head]                         # insert as most recent
                    nxt[key] = first
                    prv[key] = head
                    prv[first] = key
                    nxt[head] = key
                if any_miss:
                    transfers[s] += 1
    return hits, misses, miss_bytes, transfers


@dataclass(frozen=True)
class ReplayResult:
    hits: np.ndarray            # [steps] units found in the GPU cache
    misses: np.ndarray          # [steps] units fetched over PCIe
    pcie_bytes: np.ndarray      # [steps]
    transfers: np.ndarray       # [steps] gathers issued
    seconds: np.ndarray         # [steps] exposed transfer latency

    @property
    def hit_rate(self) -> float:
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum()) / total if total else 1.0

    def summary(self) -> dict:
        return {"steps": int(self.hits.size), "hit_rate": self.hit_rate, "pcie_bytes": int(self.pcie_bytes.sum()),
                "mean_seconds_per_step": float(self.seconds.mean()) if self.seconds.size else 0.0}


def replay(trace: AccessTrace, capacity_bytes: int, *, link_gbps: float, link_latency_s: float = 0.0,
           prefetch: str = "none", compute_seconds: float = 0.0) -> ReplayResult:
    """Replay ``trace`` against an LRU GPU cache of ``capacity_bytes`` (see module doc)."""
    if not isinstance(trace, AccessTrace):
        raise TypeError(f"trace must be an AccessTrace, got {type(trace).__name__}")
    capacity = core.check_positive_int(capacity_bytes, "capacity_bytes", allow_zero=True)
    if not (link_gbps > 0):
        raise ValueError(f"link_gbps must be > 0, got {link_gbps!r}")
    if link_latency_s < 0 or compute_seconds < 0:
        raise ValueError("link_latency_s and compute_seconds must be >= 0")
    if prefetch not in PREFETCH:
        raise ValueError(f"prefetch must be one of {PREFETCH}, got {prefetch!r}")
    sizes = trace.unit_sizes if trace.unit_sizes is not None else np.zeros((0, 0, 0), np.int64)
    hits, misses, miss_bytes, transfers = _lru_replay(trace.ids, trace.offsets, sizes, trace.unit_bytes,
                                                      max(trace.n_units, 1), capacity)
    seconds = miss_bytes / (link_gbps * 1e9) + transfers * link_latency_s
    if prefetch == "perfect":   # step 0 has no previous step to hide behind
        seconds[1:] = np.maximum(seconds[1:] - compute_seconds, 0.0)
    return ReplayResult(hits, misses, miss_bytes, transfers, seconds)


def cmd_replay(args) -> int:
    from ..cli import format_table
    from ..oracle import Layout
    from ..traces.access import record_access, record_cluster_access
    from ..traces.format import load_trace
    from . import hardware
    from .evaluate import DEFAULT_TRACE, method_with_budget

    trace = load_trace(args.trace or DEFAULT_TRACE)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(trace.layers)
    steps = core.check_positive_int(args.steps, "--steps")
    if steps >= trace.n_tokens:
        raise ValueError(f"--steps must be < the trace's {trace.n_tokens} tokens, got {steps}")
    method = method_with_budget(args.method, args.budget)
    seqs = {li: tuple(core.as_float64(a, "trace") for a in trace.layer(li).sequences()) for li in layers}
    layout = Layout(page_size=args.page_size)
    if args.method == "clusterkv":
        access = record_cluster_access(method, seqs, prefill_len=trace.n_tokens - steps, layout=layout)
    else:
        access = record_access(method, seqs, prefill_len=trace.n_tokens - steps, layout=layout)
    if args.save:
        access.save(args.save)
    gpu = hardware.gpu(args.gpu)
    total_units = (access.unit_sizes.sum() if access.unit_sizes is not None
                   else len(layers) * access.h_kv * access.n_units)
    rows = []
    for frac in (float(x) for x in args.cache_fractions.split(",")):
        if not 0 <= frac <= 1:
            raise ValueError(f"--cache-fractions must lie in [0, 1], got {frac}")
        cap = int(frac * total_units * access.unit_bytes)
        res = replay(access, cap, link_gbps=gpu.link_h2d_gbps, link_latency_s=gpu.link_latency_us * 1e-6)
        after = slice(1, None) if access.steps > 1 else slice(None)
        rows.append({"cache (fraction of KV)": frac, "cache MB": cap / 1e6, "hit rate": res.hit_rate,
                     "PCIe MB/step (after step 0)": float(res.pcie_bytes[after].mean()) / 1e6,
                     "transfer us/step": float(res.seconds[after].mean()) * 1e6})
    print(f"{args.method} (budget {args.budget}) over {len(layers)} layer(s) x {steps} decode steps of {trace}; "
          f"unit: {access.unit}; link: {gpu.name} {gpu.link} at {gpu.link_h2d_gbps} GB/s, {gpu.link_latency_us} us\n")
    print(format_table(rows))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="record what a method reads on a trace and replay it against an LRU GPU cache over PCIe")
    p.add_argument("--trace", default=None, help="attention trace (default: the shipped SmolLM2 trace)")
    p.add_argument("--method", default="quest")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--layers", default=None)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--page-size", type=int, default=1, help="record pages of this many tokens (1: tokens)")
    p.add_argument("--cache-fractions", default="0,0.1,0.25,0.5,1")
    p.add_argument("--gpu", default="h100-pcie")
    p.add_argument("--save", default=None, help="write the access trace (.npz)")
    p.set_defaults(func=cmd_replay)
