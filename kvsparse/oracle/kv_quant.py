"""KV-cache quantization (KIVI-style, Liu et al. 2024): int8 / int4 / int2 keys and values with
asymmetric min-max scales per group, dequantized on read, composable with any selection method.

Quantization of one group ``x`` (a block of ``token_block x channel_block`` elements of one KV head):

    zero  = min(x),  scale = (max(x) - min(x)) / (2^bits - 1)
    code  = clip(round_half_even((x - zero) / scale), 0, 2^bits - 1)      (code 0 where scale == 0)
    x_hat = code * scale + zero

so ``|x - x_hat| <= scale / 2`` (the half-step bound) when the scale and zero are exact.

Groups (``axis`` and ``group_size``; KIVI: keys per channel, values per token):

* ``axis="token"``:   a group is ``group_size`` consecutive channels of one token (``1 x G`` block);
  ``group_size=0`` means the whole row of ``d`` channels (one scale per token and head).
* ``axis="channel"``: a group is ``group_size`` consecutive tokens of one channel (``G x 1`` block),
  blocks aligned at token 0; ``group_size=0`` means every quantized token of the channel.

Full-precision residual (``residual`` R and ``residual_rule``): the most recent tokens stay
unquantized, stored at ``layout.element_bits`` (the layout's element width is the *full* precision):

* ``"window"`` (canonical): the quantized prefix is the largest multiple of the token block not above
  ``n - R``, so a block is quantized once all its tokens are older than the window, and a stateless
  recomputation equals a streaming cache (per-token groups: block 1, prefix ``n - R``).
* ``"kivi"`` (KIVI's ``LlamaAttention_KIVI`` at a decode step over ``n`` tokens, the new one included):
  keys are flushed in blocks of R, so ``R * floor((n - 1) / R)`` keys are quantized; values keep the
  last ``R + 1`` tokens (the new token is appended before the oldest is quantized): ``max(0, n - R - 1)``.

``scale_dtype``: ``"float64"`` (canonical: scales and zeros exact) or ``"float32"`` / ``"float16"``
(stored rounded, as real caches do; codes are computed from the rounded scale and zero, like KIVI's
fp16 kernels). Rounding is ``numpy``'s round-half-to-even, as ``torch.round``.

Composition: ``KVQuant(base=...)`` runs a stateless ``Method`` (``registry.oracle(name)``; ``None``
is dense attention) on the *dequantized* cache: its selection, its output, and its own reads. What
each base reads of the cache is described explicitly (``cache_reads``) and re-priced; everything
else it reads is a separate store and keeps the base's own price:

* K/V rows (every base): the rows of its Selection at the memory it reads them from (HBM; the host
  link for Double Sparsity's ``kv_memory="pcie"``; host memory for RetrievalAttention's CPU side).
* SparQ's approximate pass: ``r`` channels of every key (of the ``K^T`` twin with
  ``transposed_keys``), so ``r * key_bits`` bits per quantized row, ``r * layout.element_bits`` per
  residual row (counted in bits, as SparQ's own Traffic is; the total must be whole bytes), plus the
  scale and zero of every group holding a read channel.
* Twilight with ``quant_bits=None``: the candidates' full key rows (not page-rounded, as Twilight counts).
* RetrievalAttention: the static rows (HBM), the retrieved rows and the flat scan's keys (host).
* Kept at the base's own width (``layout.element_bits`` unless the base says otherwise), computed
  from the dequantized keys: Quest's page min/max, Double Sparsity's label cache, SparQ's running
  mean of V, Twilight's own quantized key copy, query/partial messages. Our choice for a faithful
  kernel: such metadata is its own tensor in the model dtype (the usual design: page min/max stay
  fp16 beside an int4 cache), so Quest over an int4 cache reads its min/max at 16 bits, not 4;
  ``sim/costs/kv_quant.py`` prices the same.

Not composable (``ValueError`` saying why, ``composition_refusal``): stateful methods (StreamingLLM,
H2O, SnapKV, PyramidKV, CORM, ClusterKV: they evict or re-cluster tokens and carry state across steps,
while this oracle re-quantizes an append-only cache at every step); MLA and LoRC (they cache latents,
not K/V rows); ``kv_quant`` itself; RetrievalAttention with ``scan_ratio`` (a graph index visits an
unspecified subset of the keys, so which quantized rows and scale groups it reads is undefined).

Traffic (exact, per decode step; the cost model must match it): the base's Traffic with every cache
read above replaced by its quantized price:

* ``keys`` / ``values``: for every row read (per reader: KV head under ``layout.share_kv_heads`` with
  the group's union, else query head; rounded out to ``layout.page_size`` pages where the base rounds),
  ``d * bits / 8`` bytes if the row is quantized, ``layout.row_bytes(d)`` if it is in the
  full-precision residual.
* ``metadata`` (at the memory of the read): ``2 * scale_bits / 8`` bytes (scale and zero) for every
  group a read quantized row belongs to, counted once per reader: per-token groups
  ``rows * ceil(d / G)``; per-channel groups ``(distinct token blocks touched) * d``.
* A base's K/V Traffic must equal the plain price of the reads described for it, else ``traffic``
  raises ``ValueError`` (a base whose reads are not described is never silently mis-priced).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import Method, check_positions
from .types import Layout, Selection, StepResult, Traffic

AXES = ("token", "channel")
RESIDUAL_RULES = ("window", "kivi")
SCALE_DTYPES = ("float64", "float32", "float16")
BITS = (2, 4, 8)


# --------------------------------------------------------------------------------------------
# quantize / dequantize one tensor [H, n, d] in blocks
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quantized:
    """A quantized ``[H, n, d]`` tensor: integer codes and one (scale, zero) per block.

    ``scale`` / ``zero`` are ``[H, ceil(n / token_block), ceil(d / channel_block)]``; element
    ``(h, i, c)`` belongs to block ``(h, i // token_block, c // channel_block)``.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    token_block: int
    channel_block: int

    def expand(self, x: np.ndarray) -> np.ndarray:
        """Block values ``[H, nb, cb]`` broadcast to every element ``[H, n, d]``."""
        n, d = self.codes.shape[1:]
        return np.repeat(np.repeat(x, self.token_block, axis=1), self.channel_block, axis=2)[:, :n, :d]

    def dequantize(self) -> np.ndarray:
        return self.codes * self.expand(self.scale) + self.expand(self.zero)


def round_scale(x: np.ndarray, scale_dtype: str) -> np.ndarray:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    return np.asarray(x, dtype=np.float64).astype(scale_dtype).astype(np.float64)


def quantize(x, bits: int, token_block: int, channel_block: int, *, scale_dtype: str = "float64") -> Quantized:
    """Asymmetric min-max quantization of ``x [H, n, d]`` in ``token_block x channel_block`` blocks."""
    x = core.as_float64(x, "x", ndim=3)
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    tb = core.check_positive_int(token_block, "token_block")
    cb = core.check_positive_int(channel_block, "channel_block")
    h, n, d = x.shape
    nb, db = -(-n // tb), -(-d // cb)
    if n == 0:
        empty = np.zeros((h, 0, db))
        return Quantized(np.zeros(x.shape, np.int64), empty, empty, bits, tb, cb)
    # edge padding repeats a block's own values, so it never changes a block's min or max
    padded = np.pad(x, ((0, 0), (0, nb * tb - n), (0, db * cb - d)), mode="edge")
    blocks = padded.reshape(h, nb, tb, db, cb)
    lo, hi = blocks.min(axis=(2, 4)), blocks.max(axis=(2, 4))
    levels = 2 ** bits - 1
    scale = round_scale((hi - lo) / levels, scale_dtype)
    zero = round_scale(lo, scale_dtype)
    q = Quantized(np.zeros(x.shape, np.int64), scale, zero, bits, tb, cb)
    s, z = q.expand(scale), q.expand(zero)
    steps = np.divide(x - z, s, out=np.zeros_like(x), where=s > 0)
    codes = np.clip(np.rint(steps), 0, levels).astype(np.int64)
    return Quantized(codes, scale, zero, bits, tb, cb)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[..., d]`` packed along the last axis into ``uint8 [..., d * bits / 8]``; code ``j`` of a
    byte sits in bits ``[j * bits, (j + 1) * bits)`` (lowest first)."""
    codes = np.asarray(codes)
    d = codes.shape[-1]
    if (d * bits) % 8:
        raise ValueError(f"d={d} codes of {bits} bits do not fill whole bytes")
    per = 8 // bits
    grouped = codes.astype(np.uint8).reshape(codes.shape[:-1] + (d // per, per))
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, d: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    codes = (np.asarray(packed, np.uint8)[..., None] >> shifts) & np.uint8(2 ** bits - 1)
    return codes.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))[..., :d].astype(np.int64)


def packed_row_bytes(d: int, bits: int) -> int:
    if (d * bits) % 8:
        raise ValueError(f"d={d} with {bits}-bit codes is not a whole number of bytes")
    return d * bits // 8


def rows_touched(indices: np.ndarray, n: int, page_size: int) -> np.ndarray:
    """The rows a page-granular reader loads to read ``indices`` (what ``types.rows_read`` counts)."""
    indices = np.asarray(indices, dtype=np.int64)
    if page_size == 1 or indices.size == 0:
        return indices
    pages = np.unique(indices // page_size)
    rows = (pages[:, None] * page_size + np.arange(page_size)[None, :]).ravel()
    return rows[rows < n]


# --------------------------------------------------------------------------------------------
# composition: which base methods, and how each reads the cache
# --------------------------------------------------------------------------------------------

NOT_COMPOSABLE = {
    "kv_quant": "it already is a quantized cache (set key_bits / value_bits instead of nesting)",
    "mla": "MLA caches one latent vector and one RoPE key per token, not per-head K/V rows "
           "(quantizing the latent is a different method)",
    "lorc": "LoRC caches low-rank latents, not K/V rows (quantizing the latents is a different method)",
}


def composition_refusal(name: str, stateful: bool, params) -> str | None:
    """Why the method ``name`` (hyper-parameters ``params``, a mapping) cannot run over a quantized
    cache, or ``None`` if it can. Shared by the oracle and ``sim/costs/kv_quant.py``."""
    if stateful:
        return (f"base {name!r} is stateful: it evicts or merges tokens and carries state across decode steps, "
                f"while KVQuant re-quantizes an append-only cache at every step; composing the two needs a "
                f"stateful wrapper that quantizes the kept tokens, which does not exist")
    if name in NOT_COMPOSABLE:
        return f"base {name!r} cannot run over a quantized K/V cache: {NOT_COMPOSABLE[name]}"
    if name == "retrieval_attention" and params.get("scan_ratio") is not None:
        return ("base 'retrieval_attention' with scan_ratio models a graph index that visits an unspecified "
                "subset of the keys, so which quantized rows and scale groups it reads is undefined; use "
                "scan_ratio=None (a flat scan)")
    return None


@dataclass(frozen=True)
class RowRead:
    """A base method's read of whole cache rows: ``sets[j]`` are the tokens reader ``j`` reads."""

    site: str                          # the name the cost model and ``read_stats`` use
    sets: tuple
    memory: str = "hbm"
    tensors: tuple = ("keys", "values")
    page_size: int = 1                 # 1: exact rows (not page-rounded)


@dataclass(frozen=True)
class ChannelRead:
    """SparQ's approximate pass: reader ``j`` reads channels ``channels[j]`` of every one of the n keys."""

    channels: tuple
    tensor: str = "keys"               # "auxiliary": the transposed copy


def reader_sets(selection: Selection, h_kv: int, layout: Layout) -> tuple:
    """The index sets whose rows are read: the group's union per KV head under sharing, else per query head."""
    return tuple(selection.kv_union(h_kv) if layout.share_kv_heads else selection.indices)


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizedKV:
    """The stored cache of one step: quantized prefixes plus the full-precision residual."""

    keys: Quantized          # the first n_keys tokens
    values: Quantized        # the first n_values tokens
    k_full: np.ndarray       # [H_kv, n - n_keys, d]
    v_full: np.ndarray

    def dequantize(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([self.keys.dequantize(), self.k_full], axis=1),
                np.concatenate([self.values.dequantize(), self.v_full], axis=1))


@register_method
@dataclass(frozen=True)
class KVQuant(Method):
    """Quantized KV cache under any stateless selection method; see the module docstring."""

    name: ClassVar[str] = "kv_quant"
    family: ClassVar[str] = "structural"
    summary: ClassVar[str] = "int8/int4/int2 K and V with per-group min-max scales, dequantized on read; wraps a base method"

    base: Method | None = None
    key_bits: int = 4
    value_bits: int = 4
    key_axis: str = "channel"
    value_axis: str = "token"
    group_size: int = 32
    residual: int = 0
    residual_rule: str = "window"
    scale_bits: int = 16
    scale_dtype: str = "float64"

    def __post_init__(self):
        if self.base is not None:
            if not isinstance(self.base, Method):
                raise TypeError(f"base must be a Method instance or None, got {type(self.base).__name__}")
            why = composition_refusal(self.base.name, self.base.stateful, vars(self.base))
            if why is not None:
                raise ValueError(why)
        for f in ("key_bits", "value_bits"):
            if getattr(self, f) not in BITS:
                raise ValueError(f"{f} must be one of {BITS}, got {getattr(self, f)!r}")
        for f in ("key_axis", "value_axis"):
            if getattr(self, f) not in AXES:
                raise ValueError(f"{f} must be one of {AXES}, got {getattr(self, f)!r}")
        core.check_positive_int(self.group_size, "group_size", allow_zero=True)
        core.check_positive_int(self.residual, "residual", allow_zero=True)
        core.check_positive_int(self.scale_bits, "scale_bits")
        if self.scale_bits % 8:
            raise ValueError(f"scale_bits must be a multiple of 8, got {self.scale_bits}")
        if self.residual_rule not in RESIDUAL_RULES:
            raise ValueError(f"residual_rule must be one of {RESIDUAL_RULES}, got {self.residual_rule!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.residual_rule == "kivi" and (self.residual == 0 or (self.group_size and self.residual % self.group_size)):
            raise ValueError(f"residual_rule='kivi' needs residual > 0 and a multiple of group_size={self.group_size}, "
                             f"got residual={self.residual}")

    # --- the layout of the stored cache ---------------------------------------------------------
    def blocks(self, axis: str, n_quantized: int, d: int) -> tuple[int, int]:
        """``(token_block, channel_block)`` of a group on ``axis`` for a prefix of ``n_quantized`` tokens."""
        g = self.group_size
        if axis == "token":
            return 1, (d if g == 0 else min(g, d))
        return (max(n_quantized, 1) if g == 0 else g), 1

    def quantized_lengths(self, n: int, d: int) -> tuple[int, int]:
        """How many of the ``n`` oldest tokens are quantized: ``(keys, values)``."""
        r, g = self.residual, self.group_size

        def prefix(axis):
            if self.residual_rule == "kivi":   # per-channel tensors flush in blocks of R; per-token keep R + 1
                return r * ((n - 1) // r) if axis == "channel" else max(0, n - r - 1)
            m = max(0, n - r)
            return (m // g) * g if (axis == "channel" and g) else m
        return prefix(self.key_axis), prefix(self.value_axis)

    def quantize_cache(self, k, v) -> QuantizedKV:
        k = core.as_float64(k, "k", ndim=3)
        v = core.as_float64(v, "v", ndim=3)
        n, d = k.shape[1:]
        nk, nv = self.quantized_lengths(n, d)
        kq = quantize(k[:, :nk], self.key_bits, *self.blocks(self.key_axis, nk, d), scale_dtype=self.scale_dtype)
        vq = quantize(v[:, :nv], self.value_bits, *self.blocks(self.value_axis, nv, d), scale_dtype=self.scale_dtype)
        return QuantizedKV(kq, vq, k[:, nk:], v[:, nv:])

    def dequantized(self, k, v) -> tuple[np.ndarray, np.ndarray]:
        """The cache every read sees: ``(k_hat, v_hat)``, both ``[H_kv, n, d]``."""
        return self.quantize_cache(k, v).dequantize()

    # --- Method protocol --------------------------------------------------------------------------
    def _base(self) -> Method:
        if self.base is not None:
            return self.base
        from .dense import Dense
        return Dense()

    def select(self, q, k, v, *, positions=None) -> Selection:
        kh, vh = self.dequantized(k, v)
        return self._base().select(q, kh, vh, positions=positions)

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        kh, vh = self.dequantized(k, v)
        return self._base().attend(q, kh, vh, selection, scale=scale)

    def step(self, q, k, v, *, positions=None, scale=None, layout: Layout = Layout()) -> StepResult:
        q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
        if positions is not None:
            positions = check_positions(positions, sh.n)
        kh, vh = self.dequantized(k, v)   # quantize once; the base selects and attends on the dequantized cache
        result = self._base().step(q, kh, vh, positions=positions, scale=scale, layout=layout)
        traffic = self.traffic(result.selection, h_kv=sh.h_kv, d=sh.d, layout=layout, inputs=(q, kh, vh))
        return StepResult(result.selection, result.output, traffic)

    # --- what the base reads of the cache ---------------------------------------------------------
    def cache_reads(self, selection: Selection, *, h_kv: int, d: int, layout: Layout, inputs=None) -> list:
        """The base's reads of the cache (``RowRead`` / ``ChannelRead``; see the module doc).

        ``inputs = (q, k_hat, v_hat)``, the step's query and dequantized cache, is needed where the base's
        reads depend on them (SparQ's channels, Twilight's candidates); ``step`` passes it.
        """
        base, n = self._base(), selection.n

        def rows(sel, memory="hbm", site="rows"):
            return RowRead(site, reader_sets(sel, h_kv, layout), memory, ("keys", "values"), layout.page_size)

        def need_inputs():
            if inputs is None:
                raise ValueError(f"the reads of base {base.name!r} depend on the query and cache: pass "
                                 f"inputs=(q, k_hat, v_hat) (step() does)")
            return inputs

        name = base.name
        if name == "cla" and base.consumer_reads == "reuse" and not base.is_producer():
            return []
        if name == "double_sparsity":
            return [rows(selection, base.kv_memory)]
        if name == "retrieval_attention":
            from .retrieval_attention import candidates
            static, retrieved = base.split(selection)
            out = [rows(Selection(tuple(static), n), site="static"),
                   rows(Selection(tuple(retrieved), n), "host", "retrieved")]
            pool = candidates(n, base.sinks, base.window)
            if min(base.top_k, pool.size) > 0:      # the flat scan: every candidate key per searcher
                searches = h_kv if layout.share_kv_heads else selection.h_q
                out.append(RowRead("scan", (pool,) * searches, "host", ("keys",), 1))
            return out
        if name == "sparq":
            out = [rows(selection)]
            if base.tokens(n) < n:                  # not a dense step: the approximate pass runs
                q, kh, _ = need_inputs()
                channels = base.approximate(q, kh).channels
                g = selection.h_q // h_kv
                heads = range(0, selection.h_q, g) if (base.gqa == "group" and layout.share_kv_heads) \
                    else range(selection.h_q)
                out.append(ChannelRead(tuple(channels[h] for h in heads),
                                       "auxiliary" if base.transposed_keys else "keys"))
            return out
        if name == "twilight":
            out = [rows(selection)]
            if base.quant_bits is None and base.p < 1 and not base.dense_layer:
                q, kh, vh = need_inputs()
                out.append(RowRead("candidates", reader_sets(base.candidates(q, kh, vh), h_kv, layout),
                                   "hbm", ("keys",), 1))
            return out
        return [rows(selection)]

    def _tensor(self, tensor: str, n: int, d: int) -> tuple[int, int, str]:
        """``(quantized prefix, bits, axis)`` of ``tensor`` in an ``n``-token cache."""
        nk, nv = self.quantized_lengths(n, d)
        return (nk, self.key_bits, self.key_axis) if tensor == "keys" else (nv, self.value_bits, self.value_axis)

    def read_stats(self, reads: list, n: int, d: int) -> dict:
        """The data-dependent sizes of ``reads`` the cost model needs (``observed["quant"]``):
        ``{site: {tensor: (quantized rows, distinct token blocks touched)}}`` summed over readers, and for
        SparQ's pass ``{"channels": (groups per key row summed over readers)}``."""
        out: dict = {}
        for read in reads:
            if isinstance(read, ChannelRead):
                n_q, _, axis = self._tensor("keys", n, d)
                _, cb = self.blocks(axis, n_q, d)
                out["channels"] = out.get("channels", 0) + sum(np.unique(c // cb).size for c in read.channels)
                continue
            site = out.setdefault(read.site, {})
            for tensor in read.tensors:
                n_q, _, axis = self._tensor(tensor, n, d)
                tb, _ = self.blocks(axis, n_q, d)
                quant = blocks = 0
                for ix in read.sets:
                    rows = rows_touched(ix, n, read.page_size)
                    qr = rows[rows < n_q]
                    quant += qr.size
                    blocks += np.unique(qr // tb).size
                old = site.get(tensor, (0, 0))
                site[tensor] = (old[0] + quant, old[1] + blocks)
        return out

    def _plain_price(self, reads: list, n: int, d: int, layout: Layout) -> dict:
        """What ``reads`` cost on an unquantized cache at ``layout.element_bits`` (the base's own price)."""
        out: dict = {}
        for read in reads:
            if isinstance(read, ChannelRead):
                bits = sum(c.size for c in read.channels) * n * layout.element_bits
                out[("hbm", read.tensor)] = out.get(("hbm", read.tensor), 0) + bits // 8
                continue
            rows = sum(rows_touched(ix, n, read.page_size).size for ix in read.sets)
            for tensor in read.tensors:
                out[(read.memory, tensor)] = out.get((read.memory, tensor), 0) + rows * layout.row_bytes(d)
        return out

    def _quantized_price(self, reads: list, n: int, d: int, layout: Layout) -> dict:
        """What ``reads`` cost on this quantized cache (packed rows, residual rows, scales)."""
        stats = self.read_stats(reads, n, d)
        pair = 2 * self.scale_bits // 8
        full = layout.row_bytes(d)
        out: dict = {}

        def add(key, b):
            out[key] = out.get(key, 0) + b
        for read in reads:
            if isinstance(read, ChannelRead):
                n_q, _, axis = self._tensor("keys", n, d)
                bits = sum(c.size for c in read.channels) * (n_q * self.key_bits + (n - n_q) * layout.element_bits)
                if bits % 8:
                    raise ValueError(f"SparQ's pass over {n} keys ({n_q} at {self.key_bits} bits) is not a whole "
                                     f"number of bytes")
                tb, _ = self.blocks(axis, n_q, d)
                add(("hbm", read.tensor), bits // 8)
                add(("hbm", "metadata"), -(-n_q // tb) * stats["channels"] * pair)
                continue
            rows = sum(rows_touched(ix, n, read.page_size).size for ix in read.sets)
            for tensor in read.tensors:
                n_q, bits, axis = self._tensor(tensor, n, d)
                quant, blocks = stats[read.site][tensor]
                _, cb = self.blocks(axis, n_q, d)
                add((read.memory, tensor), quant * packed_row_bytes(d, bits) + (rows - quant) * full)
                add((read.memory, "metadata"), blocks * -(-d // cb) * pair)
        return out

    def quantized_kv_traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        """Bytes of the packed K/V rows, full-precision residual rows and scales of the selection's rows
        (read plainly from HBM; see module doc)."""
        for bits in (self.key_bits, self.value_bits):
            packed_row_bytes(d, bits)
        read = RowRead("rows", reader_sets(selection, h_kv, layout), "hbm", ("keys", "values"), layout.page_size)
        return Traffic(self._quantized_price([read], selection.n, d, layout), layout)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout, inputs=None) -> Traffic:
        """The base's Traffic with its cache reads re-priced (module doc); ``inputs`` as in ``cache_reads``."""
        for bits in (self.key_bits, self.value_bits):
            packed_row_bytes(d, bits)            # a format the cache cannot hold is refused up front
        base = self._base()
        if base.name == "twilight" and not base.dense_layer:
            if inputs is None:
                raise ValueError("the reads of base 'twilight' depend on its candidates: pass inputs=(q, k_hat, v_hat)")
            base_traffic = base.traffic(selection, h_kv=h_kv, d=d, layout=layout, candidates=base.candidates(*inputs))
        else:
            base_traffic = base.traffic(selection, h_kv=h_kv, d=d, layout=layout)
        reads = self.cache_reads(selection, h_kv=h_kv, d=d, layout=layout, inputs=inputs)
        plain = self._plain_price(reads, selection.n, d, layout)
        rest = {}
        for key in set(base_traffic.bytes) | set(plain):
            have, cache = base_traffic.get(*key), plain.get(key, 0)
            if have < cache or (key[1] in ("keys", "values") and have != cache):
                raise ValueError(f"base method {base.name!r} does not read the cache as KVQuant describes it "
                                 f"({key}: {have} B in its Traffic, {cache} B described); KVQuant cannot re-price "
                                 f"its reads")
            rest[key] = have - cache
        return Traffic(rest, layout) + Traffic(self._quantized_price(reads, selection.n, d, layout), layout)

    @classmethod
    def presets(cls) -> dict[str, "KVQuant"]:
        from .quest import Quest
        return {
            "canonical": cls(),
            # KIVI (jy-yuan/KIVI, models/llama_kivi.py): keys per channel, values per token, G=32, R=128,
            # fp16 scales and zero points
            "kivi-4": cls(key_bits=4, value_bits=4, group_size=32, residual=128, residual_rule="kivi",
                          scale_dtype="float16"),
            "kivi-2": cls(key_bits=2, value_bits=2, group_size=32, residual=128, residual_rule="kivi",
                          scale_dtype="float16"),
            # one fp16 scale and zero per token and head for both K and V (the simulator's "int8" format)
            "int8-per-token": cls(key_bits=8, value_bits=8, key_axis="token", value_axis="token", group_size=0),
            # per token, 32-channel groups for both K and V (the simulator's "int4" format)
            "int4-per-token-g32": cls(key_bits=4, value_bits=4, key_axis="token", value_axis="token", group_size=32),
            # a composition: canonical Quest (budget 1024, 16-token pages) selecting over the int4-per-token-g32
            # cache; its page min/max stay at the layout's (full) element width
            "quest-int4": cls(base=Quest(), key_bits=4, value_bits=4, key_axis="token", value_axis="token",
                              group_size=32),
        }
