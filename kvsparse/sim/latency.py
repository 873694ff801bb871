"""From kernels to time: per kernel, per layer, per decode step, and over a generation.

Time of one GPU kernel (seconds):

    count * (launch + fixed) + [count > 0] * max(min_kernel, t_mem, t_compute) + t_zero_copy
    t_mem     = hbm_bytes / (eta(hbm_bytes) * BW_hbm)      hbm_bytes = reads + writes + staged
    t_compute = flops / peak   (tensor-core peak at the kernel's dtype, or FP32 vector peak)

Weight GEMVs use the GPU's constant ``gemv_efficiency`` instead of the curve. Otherwise ``eta`` is
the GPU's measured efficiency curve (FlashInfer's decode-attention curve by default): it
already contains the GPU-side fixed costs of a streaming kernel, so ``fixed`` is 0 unless a cost
model says otherwise. ``launch`` is the CPU-side launch cost, 0 with CUDA graphs.
A host-link copy costs ``transfers * link_latency + bytes / link_bandwidth`` (the contended
bandwidth for a copy flagged bidirectional); a host task ``max(host_bytes / host_BW, flops / host_peak)``.

Overlap rules: kernels of one layer run in phases; within a phase the three engines (GPU stream,
copy engine, host threads) run concurrently and the phase takes the longest engine's sum; phases
and layers run one after another. Memory and compute inside one GPU kernel overlap (the max).
A decode step is the sum of its layers plus the step-level kernels (embedding, final norm, LM head).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .. import registry
from .costmodel import ENGINES, Kernel, Query, kv_format
from .costs.dense import dense_kernels
from .hardware import GB, GPU, TFLOP, US, gpu as get_gpu
from .models import ModelSpec, model as get_model

WEIGHT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
ACT_BYTES = 2  # fp16/bf16 activations


def kernel_seconds(k: Kernel, g: GPU, *, cuda_graphs: bool = False) -> np.ndarray:
    count = np.asarray(k.count, dtype=float)
    launch = 0.0 if cuda_graphs else g.launch_us * US
    if k.engine == "gpu":
        hbm = k.read("hbm") + np.asarray(k.writes) + np.asarray(k.staged)
        eta = g.efficiency(hbm) if k.streaming == "curve" else g.gemv_efficiency
        t_mem = hbm / (eta * g.hbm_gbps * GB)
        peak = g.tensor_flops(k.dtype) if k.compute == "tensor" else g.fp32_tflops * TFLOP
        t = np.maximum(np.maximum(t_mem, np.asarray(k.flops) / peak), g.min_kernel_us * US)
        pcie = k.read("pcie")
        zero_copy = np.where(pcie > 0, g.link_latency_us * US + pcie / (g.link_h2d_gbps * GB), 0.0)
        return count * (launch + k.fixed_us * US) + np.where(count > 0, t, 0.0) + zero_copy
    if k.engine == "pcie":
        bw = g.link_bidir_h2d_gbps if k.bidirectional else g.link_h2d_gbps
        t = np.asarray(k.transfers) * g.link_latency_us * US + k.read("pcie") / (bw * GB)
        return count * (launch + k.fixed_us * US) + t
    t = np.maximum(k.read("host") / (g.host_mem_gbps * GB), np.asarray(k.flops) / (g.host_tflops * TFLOP))
    return count * k.fixed_us * US + t


def combine(kernels: list[Kernel], times: list[np.ndarray]) -> np.ndarray:
    """Time of a sequence of kernels under the overlap rules (phases add, engines in a phase overlap)."""
    total = 0.0
    for phase in sorted({k.phase for k in kernels}):
        per_engine = [sum((t for k, t in zip(kernels, times) if k.phase == phase and k.engine == e), 0.0)
                      for e in ENGINES]
        total = total + np.maximum(np.maximum(per_engine[0], per_engine[1]), per_engine[2])
    return np.asarray(total)


@dataclass
class StepKernels:
    """Kernels of one decode step, before timing. Layer kernels have a leading axis of layer classes
    (``layer_counts[c]`` layers look like class ``c``); the other axes are the configuration grid."""

    layer_counts: np.ndarray
    layer_kernels: list[Kernel]
    step_kernels: list[Kernel]
    attention: list[str]          # names of the attention-method kernels
    grid: tuple                   # configuration axes (the batch axis summed away)

    def hbm_read_bytes(self, tensors=None) -> np.ndarray:
        """HBM bytes read by the whole step, optionally only of ``tensors``."""
        return self.total(lambda k: k.read("hbm", tensors))

    def total(self, amount, kernels=None) -> np.ndarray:
        """``amount(kernel)`` summed over the step's kernels (layer kernels times their layer counts)."""
        shape = (len(self.layer_counts),) + self.grid
        counts = self.layer_counts.reshape((-1,) + (1,) * len(self.grid))
        layer = [k for k in self.layer_kernels if kernels is None or k.name in kernels]
        step = [k for k in self.step_kernels if kernels is None or k.name in kernels]
        per = sum((np.broadcast_to(np.asarray(amount(k), dtype=float), shape) for k in layer), np.zeros(shape))
        return (per * counts).sum(axis=0) + sum((np.broadcast_to(np.asarray(amount(k), dtype=float), self.grid)
                                                 for k in step), np.zeros(self.grid))


def method_cost(name):
    """The registered cost model of method ``name`` (a cost function is passed through)."""
    if callable(name):
        return name
    fn = registry.get(name).cost
    if fn is None:
        raise ValueError(f"method {name!r} has no cost model yet")
    return fn


def method_dense_layers(method, params: Mapping[str, Any] | None = None) -> int:
    """Dense first layers of ``method`` (a name or a cost function) with hyper-parameters ``params``
    (merged over its defaults): its ``dense_layers`` parameter (Quest's 2), or what its cost model's
    ``dense_layers_of`` hook says (``kv_quant``: its base's). ``step_kernels``, ``kvsparse evaluate``
    and ``replay.layer_compute_seconds`` all take it from here."""
    fn = method_cost(method)
    full = {**fn.defaults, **(params or {})}
    hook = getattr(fn, "dense_layers_of", None)
    return int(hook(full)) if hook is not None else int(full.get("dense_layers", 0) or 0)


def layer_classes(spec: ModelSpec, dense_layers: int, layer_dependent: bool) -> tuple[np.ndarray, np.ndarray]:
    """The layers of ``spec`` grouped into classes priced alike: ``(reps, counts)``, where class ``c``
    stands for ``counts[c]`` layers and ``reps[c]`` is its first layer index (in layer order of first
    appearance). A layer-dependent cost model (per-layer budgets) gets one class per layer; otherwise a
    class is (dense first layer?, MoE layer?): layer ``l`` is a dense first layer iff
    ``l < dense_layers``. ``reps >= dense_layers`` marks the classes in which the method runs."""
    keys: dict = {}
    for layer in range(spec.n_layers):
        key = layer if layer_dependent else (layer < dense_layers, spec.is_moe_layer(layer))
        keys.setdefault(key, []).append(layer)
    reps = np.array([v[0] for v in keys.values()], dtype=np.int64)
    counts = np.array([len(v) for v in keys.values()], dtype=np.int64)
    return reps, counts


def append_bytes(fn, q: Query):
    """``(writes, staged)`` per request and KV head of appending the new token's K and V (``kv_append``):
    the cost model's ``append_bytes`` hook where it has one (``kv_quant``: packed codes and scales at the
    quantized width, the full-precision residual), else one K and one V row in the query's KV format
    with their scales (``key_row + value_row + scale_row``), nothing re-read."""
    hook = getattr(fn, "append_bytes", None)
    if hook is not None:
        return hook(q)
    return q.key_row + q.value_row + q.scale_row, 0


def _weight_kernels(spec: ModelSpec, reps: np.ndarray, batch: int, wbits: int, wdtype: str):
    h = spec.hidden
    attn = spec.attention()
    o_params = spec.h_q * (spec.v_head_dim if spec.is_mla else spec.head_dim) * h
    qkv_params = spec.attention_params() - o_params
    kv_row = attn.kv_elements_per_token()

    def gemv(name, params, d_in, d_out, flop_params=None):
        params = np.asarray(params, dtype=float)
        flop_params = params if flop_params is None else np.asarray(flop_params, dtype=float)
        return Kernel(name, reads={("hbm", "weights"): params * wbits / 8,
                                   ("hbm", "activations"): np.asarray(batch * d_in * ACT_BYTES)},
                      writes=np.asarray(batch * d_out * ACT_BYTES), flops=2 * batch * flop_params,
                      dtype=wdtype, streaming="gemv")

    def norm(name):
        return Kernel(name, reads={("hbm", "weights"): np.asarray(h * wbits / 8),
                                   ("hbm", "activations"): np.asarray(batch * h * ACT_BYTES)},
                      writes=np.asarray(batch * h * ACT_BYTES), flops=np.asarray(4.0 * batch * h),
                      compute="vector")

    mlp_read = np.array([spec.mlp_params_read(int(l), batch) for l in reps])
    mlp_used = np.array([spec.mlp_params_used_per_token(int(l)) for l in reps], dtype=float)
    inter = np.array([spec.intermediate if not spec.is_moe_layer(int(l)) else spec.moe_intermediate
                      * (spec.n_shared_experts + spec.experts_per_token) for l in reps], dtype=float)
    before = [norm("input_norm"), gemv("qkv_proj", qkv_params, h, kv_row + spec.h_q * attn.d),
              Kernel("kv_append", compute="vector")]   # its writes depend on the KV format: set by the caller
    after = [gemv("o_proj", o_params, spec.h_q * attn.d_v, h), norm("post_norm"),
             gemv("mlp_gate_up", mlp_read * 2 / 3, h, 2 * inter, mlp_used * 2 / 3),
             gemv("mlp_down", mlp_read / 3, inter, h, mlp_used / 3)]
    step = [Kernel("embed", reads={("hbm", "weights"): np.asarray(batch * h * wbits / 8)},
                   writes=np.asarray(batch * h * ACT_BYTES), compute="vector"),
            norm("final_norm"), gemv("lm_head", spec.vocab * h, h, spec.vocab)]
    return before, after, step


def step_kernels(spec: ModelSpec, method: str, n, budget=None, *, kv="fp16", weights="fp16",
                 page_size: int = 1, share_kv_heads: bool = True, dense_layers: int | None = None,
                 params: Mapping[str, Any] | None = None, kv_format_override=None) -> StepKernels:
    """Every kernel of one decode step. ``n`` has the batch as its last axis (one entry per request:
    its context length, the new token included); ``budget`` broadcasts against ``n``."""
    spec = get_model(spec)
    fn = method_cost(method)
    full_params = {**fn.defaults, **(params or {})}
    if dense_layers is None:
        dense_layers = method_dense_layers(fn, params)
    if not 0 <= dense_layers <= spec.n_layers:
        raise ValueError(f"dense_layers must be in [0, {spec.n_layers}], got {dense_layers}")
    if weights not in WEIGHT_BITS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_BITS)}, got {weights!r}")
    n = np.atleast_1d(np.asarray(n))
    if budget is None:          # the method's own default (None there: derived from ratios, not a budget)
        default = full_params.get(fn.budget_param) if fn.budget_param else None
        budget = default if isinstance(default, (int, np.integer)) and not isinstance(default, bool) else 0
        inject = default is not None and budget != 0
    else:
        inject = True
    budget = np.asarray(budget)
    grid = np.broadcast_shapes(n.shape, budget.shape)
    batch = grid[-1]
    reps, counts = layer_classes(spec, dense_layers, fn.layer_dependent)
    lshape = (len(reps),) + (1,) * len(grid)
    layer = reps.reshape(lshape)
    budget = budget[None] if budget.ndim else budget
    if fn.budget_param and inject:
        full_params[fn.budget_param] = budget
    q = Query(spec.attention(), n=spec.cache_len(n)[None], budget=budget,
              layer=layer, n_layers=spec.n_layers, page_size=page_size, share_kv_heads=share_kv_heads,
              kv=kv_format(kv_format_override or kv), params=full_params)
    full = (len(reps),) + grid
    active = (layer >= dense_layers).astype(np.int64)
    attention = [k.scaled(active) for k in fn(q)]
    if dense_layers and getattr(fn, "method", None) != "dense":
        # a cost model whose dense layers differ from fp16 dense attention (kv_quant: over its quantized cache)
        dense_fn = getattr(fn, "dense_layer_kernels", dense_kernels)
        attention += [k.scaled(1 - active) for k in dense_fn(q, "dense_attention")]
    attention = [k.batched(full) for k in attention]
    before, after, step = _weight_kernels(spec, reps, batch, WEIGHT_BITS[weights], weights)
    gshape = (len(reps),) + (1,) * (len(grid) - 1)

    def per_class(k):
        return k._with(lambda x: np.asarray(x).reshape(gshape) if np.ndim(x) else x, lambda x: x)
    phase0 = before
    shift = 1 + max((k.phase for k in attention), default=0)
    for k in after:
        k.phase = shift
    layer_kernels = [per_class(k) for k in phase0] + attention + [per_class(k) for k in after]
    writes, staged = append_bytes(fn, q)
    for k in layer_kernels:
        if k.name == "kv_append":          # summed over the batch (the last axis), every KV head
            k.writes = q.h_kv * np.broadcast_to(writes, q.n.shape).sum(axis=-1)
            k.staged = q.h_kv * np.broadcast_to(staged, q.n.shape).sum(axis=-1)
    return StepKernels(counts, layer_kernels, step, [k.name for k in attention], grid[:-1])


@dataclass
class StepTiming:
    kernels: StepKernels
    gpu: GPU
    layer_kernel_seconds: list[np.ndarray]
    step_kernel_seconds: list[np.ndarray]
    layer_seconds: np.ndarray            # per layer class
    step_seconds: np.ndarray
    attention_seconds: np.ndarray        # the attention-method kernels' share of the step, summed


def time_step(sk: StepKernels, g, *, cuda_graphs: bool = False) -> StepTiming:
    g = get_gpu(g)
    lt = [kernel_seconds(k, g, cuda_graphs=cuda_graphs) for k in sk.layer_kernels]
    st = [kernel_seconds(k, g, cuda_graphs=cuda_graphs) for k in sk.step_kernels]
    shape = (len(sk.layer_counts),) + sk.grid
    counts = sk.layer_counts.reshape((-1,) + (1,) * len(sk.grid))
    layer = np.broadcast_to(combine(sk.layer_kernels, lt), shape)
    step = (layer * counts).sum(axis=0) + combine(sk.step_kernels, st)
    attn = sum(((np.broadcast_to(t, layer.shape) * counts).sum(axis=0)
                for k, t in zip(sk.layer_kernels, lt) if k.name in sk.attention), 0.0)
    return StepTiming(sk, g, lt, st, layer, step, np.asarray(attn))


def simulate(model, gpu, method: str, budget=None, context=4096, **kw) -> StepTiming:
    """One decode step; ``context`` is a length or a list of per-request lengths (a batch);
    ``budget`` None is the method's default."""
    cuda_graphs = kw.pop("cuda_graphs", False)
    return time_step(step_kernels(get_model(model), method, np.atleast_1d(context), budget, **kw),
                     gpu, cuda_graphs=cuda_graphs)


def generation_seconds(model, gpu, method: str, budget=None, *, prompt: int, new_tokens: int, **kw) -> float:
    """Decode time of ``new_tokens`` tokens after a ``prompt``-token prefill (prefill not included):
    step j attends to ``prompt + j + 1`` tokens and reads all weights again."""
    if new_tokens < 1 or prompt < 0:
        raise ValueError(f"need prompt >= 0 and new_tokens >= 1, got {prompt}, {new_tokens}")
    n = prompt + 1 + np.arange(new_tokens)
    cuda_graphs = kw.pop("cuda_graphs", False)
    sk = step_kernels(get_model(model), method, n[:, None], budget, **kw)
    return float(time_step(sk, gpu, cuda_graphs=cuda_graphs).step_seconds.sum())


def kernel_table(t: StepTiming) -> list[dict]:
    """Per-kernel rows of a scalar simulation (one configuration): layers, bytes and time per step."""
    sk = t.kernels
    rows = []

    def add(k, sec, counts):
        c = np.asarray(counts)
        layers = int((np.asarray(k.count).reshape(-1) > 0).astype(int) @ c) if np.ndim(k.count) else int(c.sum())
        rows.append({
            "kernel": k.name, "layers": layers,
            "HBM read MB": float(np.sum(k.read("hbm") * c)) / 1e6,
            "HBM write MB": float(np.sum(np.asarray(k.writes) * c)) / 1e6,
            "PCIe MB": float(np.sum(k.read("pcie") * c)) / 1e6,
            "host MB": float(np.sum(k.read("host") * c)) / 1e6,
            "GFLOP": float(np.sum(np.asarray(k.flops) * c)) / 1e9,
            "us/step": float(np.sum(np.asarray(sec) * c)) * 1e6,
        })
    for k, sec in zip(sk.layer_kernels, t.layer_kernel_seconds):
        counts = sk.layer_counts
        add(k, np.broadcast_to(sec, counts.shape) if np.ndim(sec) else sec * np.ones(len(counts)), counts)
    for k, sec in zip(sk.step_kernels, t.step_kernel_seconds):
        add(k, sec, np.array([1]))
    return [r for r in rows if r["layers"] > 0]
