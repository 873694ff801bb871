"""What a cost model is: from one layer's decode attention (a ``Query``) to the kernels it runs.

A cost model is a function ``cost(q: Query) -> list[Kernel]`` registered with ``@cost_model(name)``
in ``kvsparse/sim/costs/<name>.py`` (the file name of the method's oracle). Every number in a
``Query`` may be a NumPy array (context lengths, budgets, layer indices, batch entries broadcast
against each other), so one call prices a whole grid of configurations; every byte count it returns
is an integer array.

Byte-count contract (the exactness link): for one request and one layer, the sum over a method's
kernels of ``reads[(memory, tensor)]`` for the tensors keys/values/metadata/auxiliary equals the
oracle's ``Traffic`` on the same inputs. Bytes a real implementation moves on top of that (writes,
re-reading rows it staged into HBM after a PCIe copy, intermediates) are in ``writes`` and ``staged``:
they are timed but are not part of ``Traffic``.

Width of a method's own stores (``Query.side_row``, ``KVFormat.side_bits``): page min/max (Quest),
label caches (Double Sparsity), running means of V (SparQ) and cluster centroids (ClusterKV) are values
*derived from* the keys and values, not cache rows (and RetrievalAttention's query/partial messages are
activations). With a plain element format (fp16, bf16, fp8, or an unscaled width such as the oracle's
``Layout.element_bits``) they are stored at the element width, as the oracles count them. With a
scaled integer format (``int8``, ``int4``: codes plus a scale and zero per group) they stay at full
width, 16 bits (fp16): a minimum over tokens with different scales, a mean or a centroid is not a code
of any one group, and a faithful kernel keeps such stores in the model dtype. This is the convention of
``kv_quant`` with a base (preset ``quest-int4``: Quest's min/max at fp16 beside an int4 cache), so
``--kv int4 --method quest`` prices exactly what ``kv_quant`` over Quest with per-token 32-channel int4
groups prices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..oracle.types import MEMORIES, TENSORS
from ..registry import register_cost
from .models import AttentionShape

ENGINES = ("gpu", "pcie", "host")
"""Where a kernel's time is spent: a GPU kernel (HBM and tensor/vector cores), a copy over the host
link (copy engine), or host-side compute (CPU threads reading host memory)."""

READ_TENSORS = TENSORS + ("weights", "activations")


@dataclass(frozen=True)
class KVFormat:
    """How a KV element is stored. ``group``: elements of a row per scale group (0 = one group per
    row of one head, i.e. per token and head); ``scale_bytes``: bytes per group (scale and zero point)."""

    name: str
    element_bits: int
    group: int = 0
    scale_bytes: int = 0

    def row_bytes(self, d: int) -> int:
        bits = d * self.element_bits
        if bits % 8:
            raise ValueError(f"d={d} with {self.element_bits}-bit elements is not a whole number of bytes")
        return bits // 8

    def scale_bytes_per_row(self, d: int) -> int:
        if not self.scale_bytes:
            return 0
        groups = 1 if self.group == 0 else -(-d // self.group)
        return groups * self.scale_bytes


    @property
    def side_bits(self) -> int:
        """Bits per element of a method's own derived stores (module doc): the element width of a plain
        format, 16 (fp16) beside a scaled integer format."""
        return 16 if self.scale_bytes else self.element_bits

    def side_row_bytes(self, d: int) -> int:
        """Bytes of ``d`` elements of a derived store (a page minimum, a label, a centroid, a query)."""
        bits = d * self.side_bits
        if bits % 8:
            raise ValueError(f"d={d} with {self.side_bits}-bit elements is not a whole number of bytes")
        return bits // 8


KV_FORMATS = {
    "fp16": KVFormat("fp16", 16),
    "bf16": KVFormat("bf16", 16),
    "fp8": KVFormat("fp8", 8),                                  # per-tensor scale: negligible
    "int8": KVFormat("int8", 8, group=0, scale_bytes=4),        # fp16 scale + fp16 zero per token and head
    "int4": KVFormat("int4", 4, group=32, scale_bytes=4),       # fp16 scale + zero per 32 channels (KIVI-like)
}


def kv_format(spec) -> KVFormat:
    if isinstance(spec, KVFormat):
        return spec
    if spec not in KV_FORMATS:
        raise ValueError(f"kv dtype must be one of {', '.join(KV_FORMATS)}, got {spec!r}")
    return KV_FORMATS[spec]


def _int_array(x, name: str, minimum: int = 0) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.floor(a)):
            raise TypeError(f"{name} must hold whole numbers, got {x!r}")
    elif a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if np.any(a < minimum):
        raise ValueError(f"{name} must be >= {minimum}, got min {a.min()}")
    return a


@dataclass(frozen=True)
class Query:
    """One layer's decode attention as a cost model sees it.

    n:        tokens in the cache, the new token included (array).
    budget:   the method's token budget per head (array; methods without one ignore it).
    layer:    layer index (array), n_layers: layers of the model (per-layer budgets).
    params:   the method's hyper-parameters (defaults filled in from the cost model's ``defaults``).
    observed: data-dependent sizes taken from an oracle's ``Selection`` (e.g. the union sizes of a
              group's per-head selections); a cost model uses them when given, its analytic
              estimate otherwise.
    """

    shape: AttentionShape
    n: Any
    budget: Any = 0
    layer: Any = 0
    n_layers: int = 1
    page_size: int = 1
    share_kv_heads: bool = True
    kv: KVFormat = KV_FORMATS["fp16"]
    params: Mapping[str, Any] = field(default_factory=dict)
    observed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "n", _int_array(self.n, "n", 1))
        object.__setattr__(self, "budget", _int_array(self.budget, "budget", 0))
        object.__setattr__(self, "layer", _int_array(self.layer, "layer", 0))
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, (int, np.integer)) or self.page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {self.page_size!r}")
        if not isinstance(self.share_kv_heads, bool):
            raise TypeError("share_kv_heads must be a bool")
        object.__setattr__(self, "kv", kv_format(self.kv))

    # sizes --------------------------------------------------------------------------------------
    @property
    def h_q(self) -> int:
        return self.shape.h_q

    @property
    def h_kv(self) -> int:
        return self.shape.h_kv

    @property
    def group(self) -> int:
        return self.shape.h_q // self.shape.h_kv

    @property
    def readers(self) -> int:
        """Index sets whose rows are read: one per KV head when a kernel shares KV across its group."""
        return self.h_kv if self.share_kv_heads else self.h_q

    @property
    def key_row(self) -> int:
        return self.kv.row_bytes(self.shape.d)

    @property
    def value_row(self) -> int:
        return 0 if self.shape.values_in_keys else self.kv.row_bytes(self.shape.d_v)

    @property
    def side_row(self) -> int:
        """Bytes of one ``d``-element row of a method's own derived store (page min or max, centroid,
        label of all d channels, query message): ``KVFormat.side_row_bytes`` (module doc)."""
        return self.kv.side_row_bytes(self.shape.d)

    @property
    def scale_row(self) -> int:
        """Scale bytes of one token's key and value rows of one head."""
        k = self.kv.scale_bytes_per_row(self.shape.d)
        return k + (0 if self.shape.values_in_keys else self.kv.scale_bytes_per_row(self.shape.d_v))

    def param(self, name: str):
        if name not in self.params:
            raise ValueError(f"cost model needs parameter {name!r}; given {sorted(self.params)}")
        return self.params[name]


def kv_reads(q: Query, rows, memory: str = "hbm") -> dict:
    """Reads of ``rows`` K and V rows (summed over heads) with the query's KV format."""
    rows = np.asarray(rows, dtype=np.int64)
    out = {(memory, "keys"): rows * q.key_row, (memory, "values"): rows * q.value_row}
    if q.scale_row:
        out[(memory, "metadata")] = rows * q.scale_row
    return out


def range_rows(start, stop, n, page_size: int) -> np.ndarray:
    """Rows read for the token range ``[start, stop)`` clipped to ``[0, n)``, rounded out to whole pages
    (the last, partially filled page holds only its filled tokens)."""
    n = np.asarray(n, dtype=np.int64)
    start = np.clip(np.asarray(start, dtype=np.int64), 0, n)
    stop = np.clip(np.asarray(stop, dtype=np.int64), 0, n)
    lo = (start // page_size) * page_size
    hi = np.minimum(n, -(-stop // page_size) * page_size)
    return np.where(stop > start, hi - lo, 0)


def sink_window_rows(n, sinks: int, window: int, page_size: int) -> np.ndarray:
    """Rows of ``[0, sinks) u [n - window, n)`` rounded out to pages (a shared page counted once)."""
    n = np.asarray(n, dtype=np.int64)
    lo_stop = np.minimum(sinks, n)
    hi_start = np.maximum(n - window, 0)
    merged = hi_start <= lo_stop
    both = range_rows(0, lo_stop, n, page_size) + range_rows(hi_start, n, n, page_size)
    p_lo = (lo_stop - 1) // page_size
    p_hi = hi_start // page_size
    shared_page = (lo_stop > 0) & (hi_start < n) & (p_lo == p_hi)
    overlap = np.where(shared_page, np.minimum(page_size, n - p_lo * page_size), 0)
    return np.where(merged, range_rows(0, n, n, page_size), both - overlap)


def attention_flops(q: Query, rows_per_query_head) -> np.ndarray:
    """FLOPs of scores and weighted sum over ``rows_per_query_head`` rows summed over query heads:
    2 FLOPs per multiply-add, ``2*d`` per score and ``2*d_v`` per value row."""
    return 2 * np.asarray(rows_per_query_head, dtype=np.int64) * (q.shape.d + q.shape.d_v)


@dataclass
class Kernel:
    """One kernel (or copy, or host task) of a decode step, for one layer.

    reads:     bytes read by (memory, tensor); memory in hbm/pcie/host, tensor in READ_TENSORS.
    writes:    HBM bytes written. staged: HBM bytes re-read that are not in the oracle's Traffic.
    flops:     FLOPs (2 per multiply-add) on the kernel's engine; ``compute`` picks the roof:
               "tensor" (tensor cores at the KV/weight dtype) or "vector" (FP32 CUDA cores).
    count:     launches (0 where the kernel does not run, e.g. in dense first layers).
    transfers: separate host-link transfers (each pays the link latency).
    phase:     kernels of one phase on different engines overlap; phases run one after another.
    fixed_us:  extra fixed time per launch beyond the GPU's launch cost and efficiency curve.
    bidirectional: a copy that runs while copies in the other direction do (contended bandwidth).
    dtype:     input dtype of the tensor-core roof (fp16, bf16, fp8, int8, int4).
    streaming: "curve" (the GPU's size-dependent efficiency curve, measured on decode attention) or
               "gemv" (the GPU's constant efficiency of large weight-streaming GEMVs).
    """

    name: str
    engine: str = "gpu"
    reads: dict = field(default_factory=dict)
    writes: Any = 0
    staged: Any = 0
    flops: Any = 0
    compute: str = "tensor"
    count: Any = 1
    transfers: Any = 0
    phase: int = 0
    fixed_us: float = 0.0
    bidirectional: bool = False
    dtype: str = "fp16"
    streaming: str = "curve"

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.streaming not in ("curve", "gemv"):
            raise ValueError(f"streaming must be 'curve' or 'gemv', got {self.streaming!r}")
        if self.compute not in ("tensor", "vector"):
            raise ValueError(f"compute must be 'tensor' or 'vector', got {self.compute!r}")
        for (mem, ten) in self.reads:
            if mem not in MEMORIES or ten not in READ_TENSORS:
                raise ValueError(f"kernel {self.name}: read key ({mem!r}, {ten!r}) is not (memory, tensor)")

    def read(self, memory: str | None = None, tensors=None) -> np.ndarray:
        total = 0
        for (mem, ten), b in self.reads.items():
            if (memory is None or mem == memory) and (tensors is None or ten in tensors):
                total = total + b
        return np.asarray(total)

    def _with(self, amount, launches) -> "Kernel":
        return Kernel(self.name, self.engine, {k: amount(v) for k, v in self.reads.items()},
                      amount(self.writes), amount(self.staged), amount(self.flops), self.compute,
                      launches(self.count), launches(self.transfers), self.phase, self.fixed_us,
                      self.bidirectional, self.dtype, self.streaming)

    def scaled(self, factor) -> "Kernel":
        """This kernel with amounts and launches multiplied by ``factor`` (a 0/1 mask)."""
        f = np.asarray(factor)
        return self._with(lambda x: np.asarray(x) * f, lambda x: np.asarray(x) * f)

    def batched(self, shape: tuple) -> "Kernel":
        """One launch serving every request along the last axis of ``shape``: amounts add up,
        launches and transfers do not (a request that needs the kernel makes it run)."""
        return self._with(lambda x: np.broadcast_to(np.asarray(x), shape).sum(axis=-1),
                          lambda x: np.broadcast_to(np.asarray(x), shape).max(axis=-1))


CostFn = Callable[[Query], list]


def cost_model(name: str, *, defaults: Mapping[str, Any] | None = None, layer_dependent: bool = False,
               uses_budget: bool = True, budget_param: str | None = None, notes: str = ""):
    """Register ``fn(q: Query) -> list[Kernel]`` as the cost model of method ``name``.

    defaults:        hyper-parameters used when the caller gives none (the oracle's canonical ones).
    layer_dependent: the kernels depend on the layer index (per-layer budgets); otherwise the
                     simulator prices one layer of each kind and multiplies.
    uses_budget:     False for methods without a token budget (dense, quantization, MLA, ...).
    budget_param:    the oracle's hyper-parameter that the simulator's ``budget`` sets, if any.
    """
    def deco(fn):
        fn.method = name
        fn.defaults = dict(defaults or {})
        fn.layer_dependent = layer_dependent
        fn.uses_budget = uses_budget
        fn.budget_param = budget_param
        fn.notes = notes
        return register_cost(name)(fn)
    return deco


def kv_tensors_of(kernels, memory: str | None = None) -> dict:
    """Sum of the Traffic tensors over ``kernels`` by (memory, tensor), as Python ints (nonzero only)."""
    out: dict = {}
    for k in kernels:
        for (mem, ten), b in k.reads.items():
            if ten in TENSORS and (memory is None or mem == memory):
                total = int(np.asarray(b).sum())
                if total:
                    out[(mem, ten)] = out.get((mem, ten), 0) + total
    return out


def selection_rows(selection, h_kv: int, page_size: int, share_kv_heads: bool) -> int:
    """K (or V) rows a faithful kernel reads for ``selection`` (what ``kv_traffic`` counts, in rows):
    per KV head the union of its group's sets when KV heads are shared, else per query head; rounded
    out to pages. This is the data-dependent size an exactness test passes as ``observed["rows"]``."""
    from ..oracle.types import rows_read
    sets = selection.kv_union(h_kv) if share_kv_heads else selection.indices
    return int(sum(rows_read(ix, selection.n, page_size) for ix in sets))


def observed_or(q: Query, key: str, estimate):
    """``q.observed[key]`` when the caller measured it on an oracle's selection, else ``estimate``."""
    return np.asarray(q.observed[key], dtype=np.int64) if key in q.observed else estimate


def scattered_rows(tokens, n, page_size: int) -> np.ndarray:
    """Expected rows a page-granular reader touches for ``tokens`` of ``n`` tokens scattered uniformly:
    ``pages * (1 - (1 - tokens/n)^P)`` pages of ``P`` rows, at most ``n``; exactly ``tokens`` for P = 1."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if page_size == 1:
        return tokens
    n = np.asarray(n, dtype=np.int64)
    frac = np.clip(tokens / np.maximum(n, 1), 0.0, 1.0)
    pages = np.ceil(n / page_size) * (1.0 - (1.0 - frac) ** page_size)
    return np.where(tokens >= n, n, np.minimum(n, np.ceil(pages * page_size).astype(np.int64)))


def union_rows(q: Query, per_head_rows, *, per_kv_head: bool = False, cap=None,
               scattered: bool = True) -> np.ndarray:
    """Analytic rows read for sets of ``per_head_rows`` tokens chosen by each query head.

    ``per_kv_head``: the group shares one set. Otherwise, under KV sharing, a KV head reads the union
    of its G query heads' sets: ``min(cap, group_union * per_head_rows)`` with ``group_union`` a
    parameter in [1, G] (default G, i.e. disjoint sets: the upper bound; 1 = identical sets).
    ``scattered``: with KV pages larger than a token the selected tokens are assumed uniformly
    scattered (``scattered_rows``); pass False when the sets are already whole pages.
    """
    per_head = np.asarray(per_head_rows, dtype=np.int64)
    cap = q.n if cap is None else cap
    if per_kv_head or not q.share_kv_heads:
        sets = q.readers if per_kv_head else q.h_q
        rows = per_head
    else:
        u = float(q.params.get("group_union", q.group))
        if not 1 <= u <= q.group:
            raise ValueError(f"group_union must lie in [1, G={q.group}], got {u}")
        sets = q.h_kv
        rows = np.minimum(np.asarray(cap, dtype=np.int64), np.ceil(u * per_head).astype(np.int64))
    if scattered:
        rows = scattered_rows(rows, q.n, q.page_size)
    return sets * rows
