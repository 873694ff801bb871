"""Replay an access trace against a GPU-resident cache of offloaded KV.

The whole KV cache lives in host memory; a GPU cache of ``capacity_bytes`` holds recently used
units (tokens, pages, or ClusterKV's clusters). Each decode step reads the units its access trace
lists; a unit not in the GPU cache crosses PCIe. This is the temporal reuse an analytic model cannot
see.

Cache rules (explicit, tested):
* Policy LRU over units keyed by (layer, KV head, unit id); a hit refreshes recency. ClusterKV's
  cluster-granularity cache is the same LRU over clusters (an access trace whose unit is "cluster",
  ``unit_sizes`` giving each cluster's tokens).
* Within a step, units are visited layer by layer, KV head by KV head, in ascending id order.
* A demand miss transfers the unit (its bytes count as PCIe bytes) and inserts it as most recent,
  evicting least-recent units until it fits; a unit larger than the whole cache bypasses it.

Prefetch policies (``prefetch``). A prefetch for layer ``l`` of step ``t`` is issued while the
previous layer runs (layer ``l - 1``, or the last replayed layer of step ``t - 1``) and lands in the
cache just before layer ``l`` reads: for each KV head, in ascending id order, a predicted unit already
resident is refreshed, a missing one is transferred (prefetch bytes) and inserted. A prefetch is only
issued when the layer's whole prediction fits in the cache (otherwise it would evict itself before
use, and the layer runs on demand misses alone). Reads then follow; what is still missing is a demand
miss.
* ``"none"``: every transfer is a demand miss.
* ``"next_layer"``: Double Sparsity's offload path. Our research notes say only "top-k tokens are
  fetched over PCIe with double buffering / prefetch"; the policy is taken from the authors' code
  (andy-yang-1/DoubleSparse, ``offloading/model.py``, ``sparse_forward``): while layer i attends, a
  second CUDA stream scores layer i+1's label cache with a query for layer i+1 projected from layer
  i's input, takes its top-k and gathers those rows from pinned host memory into layer i+1's GPU
  buffer; layer i+1 then attends exactly the rows it was given (its unstable layers 0, 1 and 31 select
  on demand instead). The prefetched set is therefore the set read, so the prediction is the trace's
  own reads of (t, l); only the first layer of step 0 has nothing to hide behind and is fetched on
  demand. (DS overwrites its buffer every layer, i.e. a cache of 0 reuse; the LRU here shows what
  keeping rows across steps would save.)
* ``"previous_step"``: the generic policy of a method with temporal locality: the prediction for
  (t, l, KV head) is what that head read at step t - 1; step 0 runs on demand. No method in our
  research notes documents it; it is here because it can be wrong (wasted bytes, evictions), which
  ``next_layer`` by construction cannot.

Time per step (seconds), per replayed layer ``l`` of step ``t``:

    window(t, l) = demand(t, l) + max(compute(t), prefetch(next(t, l)))
    seconds[t]   = sum over l of window(t, l)
    demand       = demand_bytes / link_bw + demand_transfers * link_latency
    prefetch     = prefetch_bytes / link_bw + prefetch_transfers * link_latency

where ``next(t, l)`` is layer ``l + 1`` of step ``t`` (or layer 0 of step ``t + 1``) and ``compute``
is ``layer_compute_seconds``, the GPU work of one layer (from the simulator:
``layer_compute_seconds(...)`` below). Overlap rule: demand copies and prefetch copies share the
host link (one copy engine, FIFO), the layer's kernels wait for its demand copies, and the next
layer's prefetch runs on the link while this layer computes — so demand time adds, and prefetch time
overlaps compute (the longer of the two counts). With ``prefetch="none"`` a step is therefore
``sum(demand) + layers * compute``. A transfer is one gather per (layer, KV head) with any missing
unit (demand and prefetch counted apart). Prefetch bytes are booked to the step they serve; their
time to the window they hide in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numba
import numpy as np

from ..oracle import core
from ..traces.access import AccessTrace

PREFETCH = ("none", "next_layer", "previous_step")
# what ``--prefetch auto`` picks: the methods whose reference implementation prefetches (module doc)
METHOD_PREFETCH = {"double_sparsity": "next_layer"}
COMPUTE_PARTS = ("layer", "attention")


@numba.njit(cache=True, inline="always")
def _size(key, unit_sizes, unit_bytes, n_units, h_kv):
    if unit_sizes.shape[0] == 0:
        return unit_bytes
    u = key % n_units
    h = (key // n_units) % h_kv
    li = key // (n_units * h_kv)
    return unit_bytes * unit_sizes[li, h, u]


@numba.njit(cache=True)
def _replay_kernel(ids, offsets, unit_sizes, unit_bytes, n_units, capacity, mode):
    steps, n_layers, hp1 = offsets.shape
    h_kv = hp1 - 1
    n_keys = n_layers * h_kv * n_units
    # doubly linked list over keys; node n_keys is the sentinel (next = most recent, prev = least recent)
    nxt = np.full(n_keys + 1, -1, np.int64)
    prv = np.full(n_keys + 1, -1, np.int64)
    resident = np.zeros(n_keys, np.bool_)
    prefetched = np.zeros(n_keys, np.bool_)     # brought by a prefetch and not read since
    head = n_keys
    nxt[head] = head
    prv[head] = head
    used = 0
    hits = np.zeros(steps, np.int64)
    misses = np.zeros(steps, np.int64)
    pf_units = np.zeros(steps, np.int64)
    pf_hits = np.zeros(steps, np.int64)
    d_bytes = np.zeros((steps, n_layers), np.int64)
    d_transfers = np.zeros((steps, n_layers), np.int64)
    p_bytes = np.zeros((steps, n_layers), np.int64)
    p_transfers = np.zeros((steps, n_layers), np.int64)
    for s in range(steps):
        for li in range(n_layers):
            src = -1                                  # step whose reads of this layer are the prediction
            if mode == 1 and (s > 0 or li > 0):
                src = s
            elif mode == 2 and s > 0:
                src = s - 1
            if src >= 0:
                want = 0
                for h in range(h_kv):
                    for j in range(offsets[src, li, h], offsets[src, li, h + 1]):
                        want += _size((li * h_kv + h) * n_units + ids[j], unit_sizes, unit_bytes, n_units, h_kv)
                if want > capacity:
                    src = -1
            for phase in range(2):                    # 0: prefetch (if any), 1: demand reads
                if phase == 0 and src < 0:
                    continue
                st = src if phase == 0 else s
                for h in range(h_kv):
                    any_fetch = False
                    for j in range(offsets[st, li, h], offsets[st, li, h + 1]):
                        key = (li * h_kv + h) * n_units + ids[j]
                        size = _size(key, unit_sizes, unit_bytes, n_units, h_kv)
                        if resident[key]:
                            if phase == 1:
                                hits[s] += 1
                                if prefetched[key]:
                                    pf_hits[s] += 1
                                    prefetched[key] = False
                            nxt[prv[key]] = nxt[key]            # unlink
                            prv[nxt[key]] = prv[key]
                        else:
                            any_fetch = True
                            if phase == 0:
                                pf_units[s] += 1
                                p_bytes[s, li] += size
                            else:
                                misses[s] += 1
                                d_bytes[s, li] += size
                            if size > capacity:
                                continue
                            while used + size > capacity:        # evict least recent
                                lru = prv[head]
                                nxt[prv[lru]] = head
                                prv[head] = prv[lru]
                                resident[lru] = False
                                prefetched[lru] = False
                                used -= _size(lru, unit_sizes, unit_bytes, n_units, h_kv)
                            resident[key] = True
                            prefetched[key] = phase == 0
                            used += size
                        first = nxt[head]                         # insert as most recent
                        nxt[key] = first
                        prv[key] = head
                        prv[first] = key
                        nxt[head] = key
                    if any_fetch:
                        if phase == 0:
                            p_transfers[s, li] += 1
                        else:
                            d_transfers[s, li] += 1
    return hits, misses, pf_units, pf_hits, d_bytes, d_transfers, p_bytes, p_transfers


def step_seconds(demand_s: np.ndarray, prefetch_s: np.ndarray, compute_s) -> np.ndarray:
    """The module doc's overlap rule. ``demand_s``, ``prefetch_s``: ``[steps, layers]`` transfer seconds
    (``prefetch_s[t, l]`` serves layer l of step t); ``compute_s``: one layer's GPU seconds, a scalar or
    per step. Returns ``[steps]``."""
    demand_s = np.asarray(demand_s, dtype=float)
    prefetch_s = np.asarray(prefetch_s, dtype=float)
    if demand_s.ndim != 2 or demand_s.shape != prefetch_s.shape:
        raise ValueError(f"demand_s and prefetch_s must both be [steps, layers], got {demand_s.shape} and "
                         f"{prefetch_s.shape}")
    following = np.zeros(prefetch_s.size)
    following[:-1] = prefetch_s.ravel()[1:]               # what the link carries during each window
    compute = np.broadcast_to(np.asarray(compute_s, dtype=float).reshape(-1, 1), demand_s.shape)
    window = demand_s + np.maximum(compute, following.reshape(demand_s.shape))
    return window.sum(axis=1)


@dataclass(frozen=True)
class ReplayResult:
    hits: np.ndarray                # [steps] reads found in the GPU cache (prefetched units included)
    misses: np.ndarray              # [steps] demand misses: reads fetched on the critical path
    demand_bytes: np.ndarray        # [steps]
    transfers: np.ndarray           # [steps] demand gathers issued
    prefetched: np.ndarray          # [steps] units prefetched for this step
    prefetch_bytes: np.ndarray      # [steps]
    prefetch_transfers: np.ndarray  # [steps] prefetch gathers issued
    prefetch_hits: np.ndarray       # [steps] reads served by a unit a prefetch brought in
    compute_seconds: np.ndarray     # [steps] GPU work of the replayed layers (layers x one layer)
    seconds: np.ndarray             # [steps] latency per step under the overlap rule (module doc)

    @property
    def pcie_bytes(self) -> np.ndarray:
        """[steps] every byte over the host link: demand plus prefetch."""
        return self.demand_bytes + self.prefetch_bytes

    @property
    def exposed_seconds(self) -> np.ndarray:
        """[steps] the part of a step's latency that is host-link time not hidden behind compute."""
        return self.seconds - self.compute_seconds

    @property
    def hit_rate(self) -> float:
        """Reuse: the fraction of reads whose unit was in the cache before any transfer made for them
        (a read served by a prefetch is not reuse; it counts in :attr:`demand_hit_rate`)."""
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum() - self.prefetch_hits.sum()) / total if total else 1.0

    @property
    def demand_hit_rate(self) -> float:
        """The fraction of reads that did not wait for a demand copy (reuse or prefetched)."""
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum()) / total if total else 1.0

    def summary(self) -> dict:
        mean = (lambda a: float(a.mean()) if a.size else 0.0)  # noqa: E731
        return {"steps": int(self.hits.size), "hit_rate": self.hit_rate, "demand_hit_rate": self.demand_hit_rate,
                "pcie_bytes": int(self.pcie_bytes.sum()),
                "demand_bytes": int(self.demand_bytes.sum()), "prefetch_bytes": int(self.prefetch_bytes.sum()),
                "mean_seconds_per_step": mean(self.seconds)}


def replay(trace: AccessTrace, capacity_bytes: int, *, link_gbps: float, link_latency_s: float = 0.0,
           prefetch: str = "none", layer_compute_seconds=0.0) -> ReplayResult:
    """Replay ``trace`` against an LRU GPU cache of ``capacity_bytes`` (see the module doc).

    ``layer_compute_seconds``: GPU time of ONE replayed layer, a scalar or one value per step (see
    :func:`layer_compute_seconds` for the simulator's figure); 0 leaves transfer time only."""
    if not isinstance(trace, AccessTrace):
        raise TypeError(f"trace must be an AccessTrace, got {type(trace).__name__}")
    capacity = core.check_positive_int(capacity_bytes, "capacity_bytes", allow_zero=True)
    for name, value in (("link_gbps", link_gbps), ("link_latency_s", link_latency_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (link_gbps > 0) or not np.isfinite(link_gbps):
        raise ValueError(f"link_gbps must be a finite number > 0, got {link_gbps!r}")
    if not (link_latency_s >= 0) or not np.isfinite(link_latency_s):
        raise ValueError(f"link_latency_s must be a finite number >= 0, got {link_latency_s!r}")
    if not isinstance(prefetch, str) or prefetch not in PREFETCH:
        raise ValueError(f"prefetch must be one of {PREFETCH}, got {prefetch!r}")
    try:
        compute = np.asarray(layer_compute_seconds, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"layer_compute_seconds must be a number or an array of numbers, "
                        f"got {type(layer_compute_seconds).__name__}") from None
    if compute.ndim > 1 or (compute.ndim == 1 and compute.size != trace.steps):
        raise ValueError(f"layer_compute_seconds must be a scalar or hold one value per step ({trace.steps}), "
                         f"got shape {compute.shape}")
    if not np.all(np.isfinite(compute)) or np.any(compute < 0):
        raise ValueError(f"layer_compute_seconds must be finite and >= 0, got {layer_compute_seconds!r}")
    sizes = trace.unit_sizes if trace.unit_sizes is not None else np.zeros((0, 0, 0), np.int64)
    hits, misses, pf_units, pf_hits, d_bytes, d_tr, p_bytes, p_tr = _replay_kernel(
        trace.ids, trace.offsets, sizes, trace.unit_bytes, max(trace.n_units, 1), capacity, PREFETCH.index(prefetch))
    bw = link_gbps * 1e9
    compute = np.broadcast_to(compute, (trace.steps,))
    seconds = step_seconds(d_bytes / bw + d_tr * link_latency_s, p_bytes / bw + p_tr * link_latency_s, compute)
    return ReplayResult(hits, misses, d_bytes.sum(axis=1), d_tr.sum(axis=1), pf_units, p_bytes.sum(axis=1),
                        p_tr.sum(axis=1), pf_hits, compute * len(trace.layers), seconds)


def layer_compute_seconds(model, gpu, method: str, budget, contexts, *, part: str = "layer",
                          cuda_graphs: bool = False, params=None) -> np.ndarray:
    """Simulated seconds of one decoder layer in which ``method`` runs (``kvsparse/sim/latency.py``), at
    each context length of ``contexts``, with every host-link copy removed: in a replay the copies are
    the cache's misses, timed by :func:`replay` itself. ``part="layer"``: all kernels of the layer
    (norms, QKV/O projections, MLP and the method's kernels; what a prefetch issued one layer ahead
    can hide behind); ``part="attention"``: the method's kernels only. Layer classes the method skips
    (its dense first layers) are left out of the mean, as in ``kvsparse evaluate``."""
    from . import latency
    from .hardware import gpu as get_gpu
    from .models import model as get_model
    if part not in COMPUTE_PARTS:
        raise ValueError(f"part must be one of {COMPUTE_PARTS}, got {part!r}")
    ctx = np.atleast_1d(np.asarray(contexts))
    if ctx.ndim != 1 or ctx.size == 0 or not np.issubdtype(ctx.dtype, np.integer) or np.any(ctx < 1):
        raise ValueError(f"contexts must be one or more whole token counts >= 1, got {contexts!r}")
    spec, g = get_model(model), get_gpu(gpu)
    fn = latency.method_cost(method)
    sk = latency.step_kernels(spec, method, ctx[:, None], budget, params=params)

    def on_gpu(k):   # zero-copy reads of host memory are link traffic too: the replay's misses stand for them
        return dataclasses.replace(k, reads={key: b for key, b in k.reads.items() if key[0] != "pcie"})
    kept = [on_gpu(k) for k in sk.layer_kernels
            if k.engine != "pcie" and (part == "layer" or k.name in sk.attention)]
    times = [latency.kernel_seconds(k, g, cuda_graphs=cuda_graphs) for k in kept]
    per_class = np.broadcast_to(latency.combine(kept, times), (len(sk.layer_counts),) + sk.grid)
    dense_layers = latency.method_dense_layers(fn, params)
    reps, counts = latency.layer_classes(spec, dense_layers, fn.layer_dependent)
    weight = counts * (reps >= dense_layers)
    if not weight.sum():           # a method dense in every layer: the layer is the dense one
        weight = counts
    return (per_class * weight[:, None]).sum(axis=0) / weight.sum()


def cmd_replay(args) -> int:
    from ..cli import format_table
    from ..oracle import Layout
    from ..traces.access import record_access, record_cluster_access
    from ..traces.format import load_trace
    from . import hardware
    from .evaluate import DEFAULT_TRACE, calibrated, method_with_budget

    trace = load_trace(args.trace or DEFAULT_TRACE)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(trace.layers)
    steps = core.check_positive_int(args.steps, "--steps")
    if steps >= trace.n_tokens:
        raise ValueError(f"--steps must be < the trace's {trace.n_tokens} tokens, got {steps}")
    prefetch = METHOD_PREFETCH.get(args.method, "none") if args.prefetch == "auto" else args.prefetch
    fractions = [float(x) for x in args.cache_fractions.split(",")]
    for frac in fractions:
        if not 0 <= frac <= 1:
            raise ValueError(f"--cache-fractions must lie in [0, 1], got {frac}")
    gpu = hardware.gpu(args.gpu)
    prefill = trace.n_tokens - steps
    # step s attends positions 0..prefill+s; priced before the oracle runs so a bad --model fails fast
    if args.compute == "none":
        compute = np.zeros(steps)
    else:
        compute = layer_compute_seconds(args.model, gpu, args.method, args.budget, prefill + 1 + np.arange(steps),
                                        part=args.compute)
    method = method_with_budget(args.method, args.budget)
    seqs = {li: tuple(core.as_float64(a, "trace") for a in trace.layer(li).sequences()) for li in layers}
    layout = Layout(page_size=args.page_size)
    if args.method == "clusterkv":
        access = record_cluster_access(method, seqs, prefill_len=prefill, layout=layout)
    else:
        # an uncalibrated Double Sparsity is calibrated per layer on that layer's prompt, as evaluate does
        per_layer = {li: calibrated(method, q, k, prefill) for li, (q, k, _) in seqs.items()}
        access = record_access(per_layer, seqs, prefill_len=prefill, layout=layout)
    if args.save:
        access.save(args.save)
    total_units = (access.unit_sizes.sum() if access.unit_sizes is not None
                   else len(layers) * access.h_kv * access.n_units)
    rows = []
    after = slice(1, None) if access.steps > 1 else slice(None)
    mb = lambda a: float(a[after].mean()) / 1e6  # noqa: E731
    us = lambda a: float(a[after].mean()) * 1e6  # noqa: E731
    for frac in fractions:
        cap = int(frac * total_units * access.unit_bytes)
        res = replay(access, cap, link_gbps=gpu.link_h2d_gbps, link_latency_s=gpu.link_latency_us * 1e-6,
                     prefetch=prefetch, layer_compute_seconds=compute)
        rows.append({"cache (fraction of KV)": frac, "cache MB": cap / 1e6, "hit rate (reuse)": res.hit_rate,
                     "demand MB/step": mb(res.demand_bytes), "prefetch MB/step": mb(res.prefetch_bytes),
                     "exposed PCIe us/step": us(res.exposed_seconds), "latency us/step": us(res.seconds)})
    print(f"{args.method} (budget {args.budget}) over {len(layers)} layer(s) x {steps} decode steps of {trace}; "
          f"unit: {access.unit}; link: {gpu.name} {gpu.link} at {gpu.link_h2d_gbps} GB/s, {gpu.link_latency_us} us; "
          f"prefetch: {prefetch}; compute per layer ({args.compute}, {args.model} on {gpu.key}): "
          f"{float(compute.mean()) * 1e6:.2f} us\n")
    print(format_table(rows))
    print("\nper-step columns are means over steps 1.. (step 0 warms the cache); latency per step = the "
          "replayed layers only, demand copies + max(compute, next layer's prefetch) per layer")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="record what a method reads on a trace and replay it against an LRU "
                                             "GPU cache over PCIe: hit rate, PCIe bytes, latency per step")
    p.add_argument("--trace", default=None, help="attention trace (default: the shipped SmolLM2 trace)")
    p.add_argument("--method", default="quest")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--layers", default=None)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--page-size", type=int, default=1, help="record pages of this many tokens (1: tokens)")
    p.add_argument("--cache-fractions", default="0,0.1,0.25,0.5,1")
    p.add_argument("--gpu", default="h100-pcie")
    p.add_argument("--prefetch", default="auto", choices=("auto",) + PREFETCH,
                   help="auto: the method's own policy where it has one (double_sparsity: next_layer), else none")
    p.add_argument("--model", default="smollm2-135m",
                   help="model whose layer compute hides the prefetches (default: the shipped trace's)")
    p.add_argument("--compute", default="layer", choices=COMPUTE_PARTS + ("none",),
                   help="GPU work per replayed layer: the whole layer, the method's attention kernels, or none")
    p.add_argument("--save", default=None, help="write the access trace (.npz)")
    p.set_defaults(func=cmd_replay)
