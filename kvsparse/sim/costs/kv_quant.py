"""KV quantization (KIVI-style): packed int8/int4/int2 K and V, min-max scale and zero per group,
a full-precision residual of recent tokens; any composable base method over the dequantized cache.

Mirrors ``kvsparse/oracle/kv_quant.py``. The query's KV format is the *full* precision (residual rows,
and the base's own metadata); the quantization is this method's parameters, so a format with scale
bytes (``--kv int8|int4``) is refused here. ``base``: ``None`` (dense attention), a method name, a
``Method`` instance or a mapping with ``name`` (like Twilight's ``base``).

Delegation: the base's own cost model prices the step at full precision (its budget, its metadata,
its kernels and FLOPs); then every cache read of its kernels is re-priced, which leaves its separate
stores at their own width: Quest's page min/max stay at the full element width (fp16 beside an int4
cache, the oracle's documented choice), as do Double Sparsity's labels and SparQ's mean of V. Cache
reads, by base: the keys/values reads of every kernel (RetrievalAttention: ``static_attention`` in
HBM, ``host_attention`` and the ``host_search`` scan in host memory); SparQ's ``sparq_approx_scores``
(``r`` channels of every key); Twilight's ``twilight_estimate`` keys when ``quant_bits`` is None.

A row read of ``R`` rows of a tensor (summed over readers) costs ``R * row - Q * (row - d*bits/8)``
plus ``B * groups_per_block * 2 * scale_bits / 8`` of metadata at the same memory, with ``Q`` the
quantized rows and ``B`` the distinct token blocks they touch: ``observed["quant"][site][tensor] =
(Q, B)`` when measured on an oracle's selection, else bounds from the quantized prefix ``n_q``
(``R - readers * (n - n_q) <= Q <= min(R, readers * n_q)``, the end with more bytes, and
``B <= min(R, readers * n_q, readers * blocks(n_q))``: an upper bound, exact when every row is read).
SparQ's pass: ``r * (n_q * key_bits + (n - n_q) * element_bits)`` bits per reader and the groups
holding its channels (``observed["quant"]["channels"]``, else
``min(r, groups per row)`` per reader) for every block of the quantized prefix. vAttention's exact
top-k scan of every key (``staged``: timed, not in Traffic) is re-priced the same way.

Around the attention (``latency.step_kernels`` reads these hooks): the dense first layers are the
base's (``dense_layers_of``: Quest's 2) and run dense attention over the same quantized cache
(``dense_layer_kernels``); the new token's K/V are written at the quantized width (``append_bytes``:
packed codes and new scale groups, the full-precision residual row, see there).

Agreement with ``--kv int8|int4``: a KV format with scale bytes on a composable base prices exactly
what this model prices with per-token groups of the format (``int8``: ``group_size=0``; ``int4``:
``group_size=32``; no residual, 16-bit scales) over that base at fp16, the base's own stores at full
width both ways (``costmodel``'s module doc; ``tests/test_sim_latency.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from ... import registry
from ...oracle.kv_quant import composition_refusal
from ..costmodel import Kernel, Query, cost_model, selection_rows


def quantized_prefix(n, axis: str, residual: int, group: int, rule: str) -> np.ndarray:
    n = np.asarray(n, dtype=np.int64)
    if rule == "kivi":
        return residual * ((n - 1) // residual) if axis == "channel" else np.maximum(0, n - residual - 1)
    m = np.maximum(0, n - residual)
    return (m // group) * group if (axis == "channel" and group) else m


def token_blocks(n_q, axis: str, group: int) -> np.ndarray:
    """Token blocks of a quantized prefix of ``n_q`` tokens (per-token groups: one per token)."""
    if axis == "token":
        return n_q
    return np.where(n_q > 0, 1, 0) if group == 0 else -(-n_q // group)


def groups_per_block(axis: str, group: int, d: int) -> int:
    """Scale groups of one token block: ``ceil(d / G)`` per token, ``d`` (one per channel) per channel block."""
    return -(-d // (d if group == 0 else min(group, d))) if axis == "token" else d


def _base(q: Query):
    """``(name, params, cost function)`` of the base method; refuses what the oracle refuses."""
    return resolve_base(q.params)


def resolve_base(kv_quant_params: Mapping):
    """``(name, params, cost function)`` of the base named by ``kv_quant_params["base"]``, its parameters
    merged over its cost model's defaults; refuses what the oracle refuses."""
    base = kv_quant_params.get("base")
    if base is None:
        name, params = "dense", {}
    elif isinstance(base, str):
        name, params = base, {}
    elif dataclasses.is_dataclass(base):
        name, params = base.name, {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    elif isinstance(base, Mapping) and "name" in base:
        params = dict(base)
        name = params.pop("name")
    else:
        raise TypeError(f"base must be None, a method name, a Method or a mapping with 'name', got {base!r}")
    entry = registry.get(name)
    if entry.cost is None or entry.oracle is None:
        raise ValueError(f"base {name!r} needs an oracle and a cost model")
    why = composition_refusal(name, entry.oracle.stateful, params)
    if why is not None:
        raise ValueError(why)
    return name, {**entry.cost.defaults, **params}, entry.cost


def _sites(name: str, kernel: str) -> str:
    if name == "retrieval_attention":
        return {"static_attention": "static", "host_attention": "retrieved", "host_search": "scan"}.get(kernel, "rows")
    if name == "sparq" and kernel == "sparq_approx_scores":
        return "channels"
    if name == "twilight" and kernel == "twilight_estimate":
        return "candidates"
    return "rows"


@cost_model("kv_quant", uses_budget=False, layer_dependent=True,
            defaults=dict(base=None, key_bits=4, value_bits=4, key_axis="channel", value_axis="token",
                          group_size=32, residual=0, residual_rule="window", scale_bits=16))
def cost(q: Query) -> list[Kernel]:
    if q.kv.scale_bytes:
        raise ValueError(f"kv_quant quantizes with its own parameters; the KV format ({q.kv.name}) must be the full "
                         f"precision of the residual and of the base's metadata (e.g. fp16), not a scaled format")
    d, eb = q.shape.d, q.kv.element_bits
    pair = 2 * int(q.param("scale_bits")) // 8
    group, residual, rule = int(q.param("group_size")), int(q.param("residual")), q.param("residual_rule")
    fmt = {}
    for tensor, bits, axis in (("keys", q.param("key_bits"), q.param("key_axis")),
                               ("values", q.param("value_bits"), q.param("value_axis"))):
        if (d * bits) % 8:
            raise ValueError(f"d={d} with {bits}-bit codes is not a whole number of bytes")
        fmt[tensor] = (quantized_prefix(q.n, axis, residual, group, rule), d * bits // 8, axis, bits)
    name, params, base_cost = _base(q)
    bp = base_cost.budget_param
    own = params.get(bp) if bp else None
    if not (isinstance(own, (int, np.integer)) and not isinstance(own, bool)):
        own = 0          # no token count (None, or a fraction such as vAttention's heavy=0.05): the base's params say
    budget = np.where(q.budget > 0, q.budget, own) if bp else q.budget
    base_q = dataclasses.replace(q, params=params, budget=budget,
                                 observed={k: v for k, v in q.observed.items() if k != "quant"})
    measured = q.observed.get("quant", {})

    def rows_priced(kernel_name, site, ten, b):
        """(bytes, scale bytes) of a read of whole ``ten`` rows worth ``b`` bytes at full width."""
        n_q, packed, axis, _ = fmt[ten]
        row = q.key_row if ten == "keys" else q.value_row
        rows = b // row
        if np.any(rows * row != b):
            raise ValueError(f"kernel {kernel_name} reads {ten} that are not whole rows")
        if site in measured and ten in measured[site]:
            quant, blocks = (np.asarray(x, dtype=np.int64) for x in measured[site][ten])
        else:
            most = np.minimum(rows, q.readers * n_q)       # bounds on the quantized rows among them
            least = np.maximum(0, rows - q.readers * (q.n - n_q))
            quant = least if packed <= row else most       # the larger byte count
            blocks = np.minimum(most, q.readers * token_blocks(n_q, axis, group))
        return rows * row - quant * (row - packed), blocks * groups_per_block(axis, group, d) * pair

    out = []
    for kernel in base_cost(base_q):
        site = _sites(name, kernel.name)
        reads: dict = {}

        def add(key, b):
            reads[key] = reads.get(key, 0) + b
        for (mem, ten), b in kernel.reads.items():
            b = np.asarray(b, dtype=np.int64)
            if site == "channels" and ten in ("keys", "auxiliary"):
                n_q, _, axis, bits = fmt["keys"]
                readers = q.h_kv if (params.get("gqa") == "group" and q.share_kv_heads) else q.h_q
                r_readers = (8 * b) // (q.n * eb)                 # r channels x readers (0 on a dense step)
                total = r_readers * (n_q * bits + (q.n - n_q) * eb)
                if np.any(total % 8):
                    raise ValueError(f"SparQ's pass over the quantized keys at {bits} bits is not a whole "
                                     f"number of bytes")
                per_row = -(-d // (d if group == 0 else min(group, d))) if axis == "token" else d
                groups = measured.get("channels", np.minimum(r_readers, readers * per_row))
                add((mem, ten), total // 8)
                add((mem, "metadata"), token_blocks(n_q, axis, group) * np.asarray(groups, dtype=np.int64) * pair)
            elif ten in ("keys", "values"):
                if (q.key_row if ten == "keys" else q.value_row) == 0:   # values stored in the keys (MLA shapes)
                    add((mem, ten), b)
                    continue
                data, scales = rows_priced(kernel.name, site, ten, b)
                add((mem, ten), data)
                add((mem, "metadata"), scales)
            else:
                add((mem, ten), b)
        k = dataclasses.replace(kernel, reads=reads)
        if name == "vattention" and kernel.name == "vatt_topk_scores":
            # the exact top-k selector scans every key of the cache: timed (staged), not in Traffic
            data, scales = rows_priced(kernel.name, "topk_scan", "keys", np.asarray(kernel.staged, dtype=np.int64))
            k = dataclasses.replace(k, staged=data + scales)
        if q.params.get("base") is None and kernel.name == "attention":
            k = dataclasses.replace(k, name="quantized_attention")
        out.append(k)
    return out


def observe(method, result, inp, *, h_kv, layout):
    """The base's own measured sizes (on the dequantized cache) plus the quantized rows and blocks of
    every cache read (``KVQuant.read_stats``)."""
    base = method._base()
    kh, vh = method.dequantized(inp.k, inp.v)
    base_cost = registry.get(base.name).cost
    if hasattr(base_cost, "observe"):
        obs = dict(base_cost.observe(base, result, dataclasses.replace(inp, k=kh, v=vh), h_kv=h_kv, layout=layout))
    else:
        obs = {"rows": selection_rows(result.selection, h_kv, layout.page_size, layout.share_kv_heads)}
    d = inp.k.shape[2]
    reads = method.cache_reads(result.selection, h_kv=h_kv, d=d, layout=layout, inputs=(inp.q, kh, vh))
    obs["quant"] = method.read_stats(reads, result.selection.n, d)
    return obs


cost.observe = observe


def dense_layers_of(params: Mapping) -> int:
    """Dense first layers of ``kv_quant`` with these parameters: its own ``dense_layers`` if given, else
    its base's (Quest's 2: the quantized model runs dense attention there, over the quantized cache)."""
    if params.get("dense_layers") is not None:
        return int(params["dense_layers"])
    _, base_params, _ = resolve_base(params)
    return int(base_params.get("dense_layers", 0) or 0)


def dense_layer_kernels(q: Query, name: str = "dense_attention") -> list[Kernel]:
    """The kernels of a dense first layer: dense attention over the same quantized cache (``base=None``)."""
    out = cost(dataclasses.replace(q, params={**q.params, "base": None}, observed={}))
    return [dataclasses.replace(k, name=name) for k in out]


def append_bytes(q: Query):
    """``(writes, staged)``: HBM bytes one decode step writes to (and re-reads from) the cache of one KV
    head for the token it appends, per request (arrays over ``q.n``), for keys and values each:

    * the new token's row at full width (``q.kv``) unless it is quantized on arrival (it lies in the
      quantized prefix ``n_q(n)``: no residual, per-token groups or 1-token blocks);
    * ``d * bits / 8`` packed bytes for every row quantized at this step, ``n_q(n) - n_q(n - 1)`` (0 or 1
      per step for per-token groups beyond the residual, a whole block when a channel block completes,
      ``R`` keys at a KIVI flush), and ``2 * scale_bits / 8`` per new scale group (``ceil(d / G)`` per
      quantized token, ``d`` per completed channel block);
    * staged (re-read, not in Traffic): the full-width rows quantized at this step that had been
      stored at full width.

    Channel groups with ``group_size=0`` cover every quantized token, so their scales change at every
    step: the whole prefix is re-written (``n_q`` packed rows and ``d`` scale pairs) and re-read."""
    p = {**cost.defaults, **q.params}
    group, residual, rule = int(p["group_size"]), int(p["residual"]), p["residual_rule"]
    pair = 2 * int(p["scale_bits"]) // 8
    n = q.n
    writes = staged = 0
    for dim, row, bits, axis in ((q.shape.d, q.key_row, p["key_bits"], p["key_axis"]),
                                 (q.shape.d_v, q.value_row, p["value_bits"], p["value_axis"])):
        if row == 0:                                  # values stored in the keys (MLA shapes)
            continue
        packed = dim * int(bits) // 8
        now = np.maximum(0, quantized_prefix(n, axis, residual, group, rule))
        before = np.maximum(0, quantized_prefix(n - 1, axis, residual, group, rule))
        arrives_quantized = (now >= n).astype(np.int64)
        quantized = now - before
        whole = axis == "channel" and group == 0
        rewritten = now if whole else quantized
        new_groups = (token_blocks(now, axis, group) if whole
                      else token_blocks(now, axis, group) - token_blocks(before, axis, group))
        writes = writes + (1 - arrives_quantized) * row + rewritten * packed + \
            new_groups * groups_per_block(axis, group, dim) * pair
        staged = staged + (quantized - arrives_quantized) * row + (rewritten - quantized) * packed
    return writes, staged


cost.dense_layers_of = dense_layers_of
cost.dense_layer_kernels = dense_layer_kernels
cost.append_bytes = append_bytes
