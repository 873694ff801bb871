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

Composition: ``KVQuant(base=...)`` runs any stateless ``Method`` (``registry.oracle(name)``; ``None``
is dense attention) on the *dequantized* cache: its selection, its output, and its own metadata reads
(e.g. Quest's min/max pages, kept at ``layout.element_bits``).

Traffic (exact, per decode step; the cost model must match it):

* ``keys`` / ``values`` (HBM): for every row the base method reads (its Selection; per KV head as the
  union of the group under ``layout.share_kv_heads``, else per query head; rounded out to
  ``layout.page_size`` pages), ``d * bits / 8`` bytes if the row is quantized, ``layout.row_bytes(d)``
  if it is in the full-precision residual.
* ``metadata`` (HBM): ``2 * scale_bits / 8`` bytes (scale and zero) for every group a read quantized
  row belongs to, counted once per reader: per-token groups ``rows * ceil(d / G)``; per-channel
  groups ``(distinct token blocks touched) * d``. Plus the base method's own metadata / auxiliary reads.
* A base method must read its selected K/V rows from HBM in the plain way (its keys/values Traffic
  equals ``kv_traffic``); otherwise ``traffic`` raises ``ValueError``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import Method, check_positions
from .types import Layout, Selection, StepResult, Traffic, kv_traffic

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
            if self.base.stateful:
                raise ValueError(f"base must be a stateless method, got the stateful {self.base.name!r}")
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
        kh, vh = self.dequantized(k, v)   # quantize once for select and attend
        base = self._base()
        selection = base.select(q, kh, vh, positions=positions)
        output = base.attend(q, kh, vh, selection, scale=scale)
        return StepResult(selection, output, self.traffic(selection, h_kv=sh.h_kv, d=sh.d, layout=layout))

    def quantized_kv_traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        """Bytes of the packed K/V rows, full-precision residual rows and scales (see module doc)."""
        n = selection.n
        nk, nv = self.quantized_lengths(n, d)
        readers = selection.kv_union(h_kv) if layout.share_kv_heads else selection.indices
        full_row = layout.row_bytes(d)
        pair = 2 * self.scale_bits // 8
        out = {"keys": 0, "values": 0, "metadata": 0}
        for ix in readers:
            rows = rows_touched(ix, n, layout.page_size)
            for tensor, n_q, bits, axis in (("keys", nk, self.key_bits, self.key_axis),
                                            ("values", nv, self.value_bits, self.value_axis)):
                quant = rows[rows < n_q]
                out[tensor] += quant.size * packed_row_bytes(d, bits) + (rows.size - quant.size) * full_row
                tb, cb = self.blocks(axis, n_q, d)
                groups = quant.size * -(-d // cb) if axis == "token" else np.unique(quant // tb).size * d
                out["metadata"] += groups * pair
        return Traffic({("hbm", t): b for t, b in out.items()}, layout)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        base_traffic = self._base().traffic(selection, h_kv=h_kv, d=d, layout=layout)
        plain = kv_traffic(selection, h_kv, d, layout)
        kv_keys = [key for key in base_traffic.bytes if key[1] in ("keys", "values")]
        if {key: base_traffic.get(*key) for key in kv_keys} != dict(plain.bytes):
            raise ValueError(f"base method {self._base().name!r} does not read its selected K/V rows plainly "
                             f"from HBM; KVQuant cannot re-price its reads")
        rest = Traffic({key: b for key, b in base_traffic.bytes.items() if key[1] not in ("keys", "values")}, layout)
        return rest + self.quantized_kv_traffic(selection, h_kv=h_kv, d=d, layout=layout)

    @classmethod
    def presets(cls) -> dict[str, "KVQuant"]:
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
        }
