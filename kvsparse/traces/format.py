"""Attention traces: per layer, post-RoPE ``Q [T, H_q, d]``, ``K``/``V [T, H_kv, d]`` of one sequence.

A trace is a safetensors file (``.safetensors``) that this module reads and writes with NumPy alone
(no ``safetensors`` / torch import): 8 bytes little-endian header length, a JSON header, raw
little-endian bytes. Tensors (names are part of the format):

* ``layer.<i>.q``           ``[T, H_q, d]``  post-RoPE queries of layer ``i``
* ``layer.<i>.k``           ``[T, H_kv, d]`` post-RoPE keys (not repeated for GQA)
* ``layer.<i>.v``           ``[T, H_kv, d]`` values
* ``layer.<i>.k_pre_rope``  ``[T, H_kv, d]`` keys before RoPE (optional, for every layer or none)
* ``positions``             ``[T]`` int32    the RoPE position of each token
* ``token_ids``             ``[T]`` int32    (optional) the token ids the model read

``__metadata__["kvsparse_trace"]`` holds a JSON object (see ``REQUIRED_METADATA``): the model and its
config (layers, heads, KV heads, head dim, RoPE base and layout, attention scale), the dtype, the
number of tokens, the recorded layers, the prompt's source and licence, and how the trace was made.

Loading is lazy: ``load_trace`` reads and checks the header only; ``trace.layer(i)`` returns views of a
memory map (values are checked for NaN/inf when a layer is first read). Anything corrupt, truncated or
inconsistent is a ``TraceFormatError`` (a ``ValueError``) naming the file and what is wrong.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..oracle import core

FORMAT_NAME = "kvsparse-attention-trace"
FORMAT_VERSION = 1
METADATA_KEY = "kvsparse_trace"
MAX_HEADER_BYTES = 100 * 2**20
TRACE_DTYPES = ("float16", "bfloat16", "float32", "float64")

# safetensors dtype codes <-> numpy dtypes (bfloat16 through ml_dtypes, only when used)
_ST_TO_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
               "I32": "int32", "I64": "int64", "U8": "uint8", "I8": "int8", "BOOL": "bool"}
_NAME_TO_ST = {v: k for k, v in _ST_TO_NAME.items()}

REQUIRED_METADATA = {
    "format": str, "version": int, "model": dict, "config": dict, "dtype": str, "n_tokens": int,
    "layers": list, "has_k_pre_rope": bool, "prompt": dict, "made": dict,
}
REQUIRED_CONFIG = {"n_layers": int, "n_heads": int, "n_kv_heads": int, "head_dim": int,
                   "rope_base": (int, float, type(None)), "rope_layout": str, "attention_scale": (int, float)}


class TraceFormatError(ValueError):
    """A trace file (or in-memory trace) that is corrupt, truncated or inconsistent."""


# --------------------------------------------------------------------------------------------
# safetensors on NumPy
# --------------------------------------------------------------------------------------------

def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:  # only bfloat16 traces need it
            raise ImportError("bfloat16 traces need the ml_dtypes package") from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _NAME_TO_ST:
        raise TypeError(f"dtype {name} cannot be stored (supported: {sorted(_NAME_TO_ST)})")
    return name


def write_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> array) as a safetensors file, deterministically.

    Tensors are laid out in name order, the header is JSON with sorted keys and no spaces, padded
    with spaces to a multiple of 8 bytes (as the reference implementation does), so the same
    inputs always give the same bytes.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str (safetensors stores strings only)")
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    arrays, offset = [], 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        a = np.asarray(tensors[name])
        st = _NAME_TO_ST[_dtype_name(a.dtype)]
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype)
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for a in arrays:
            fh.write(a.tobytes())
    os.replace(tmp, path)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # numpy dtype name
    shape: tuple[int, ...]
    begin: int          # byte offsets inside the data buffer
    end: int


def read_safetensors_header(path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Read and check a safetensors header: ``(tensor infos, metadata, byte offset of the data)``."""
    path = Path(path)
    where = f"{path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise TraceFormatError(f"{where}: truncated: {len(head)} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise TraceFormatError(f"{where}: header length {n} bytes exceeds the limit {MAX_HEADER_BYTES} "
                                       "(not a safetensors file?)")
            if 8 + n > size:
                raise TraceFormatError(f"{where}: truncated: header length says {n} bytes, "
                                       f"but only {size - 8} bytes follow the length field")
            raw = fh.read(n)
    except OSError as exc:
        raise TraceFormatError(f"{where}: cannot read ({exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceFormatError(f"{where}: header is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise TraceFormatError(f"{where}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TraceFormatError(f"{where}: __metadata__ must map strings to strings")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(where, name, entry)
    spans = sorted((i.begin, i.end, i.name) for i in infos.values())
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else f"leaves a gap of {begin - expected} bytes"
            raise TraceFormatError(f"{where}: tensor {name!r} starts at data byte {begin}, expected {expected}: it {what}")
        expected = end
    data_start = 8 + n
    if data_start + expected > size:
        raise TraceFormatError(f"{where}: truncated: tensors need {expected} data bytes, "
                               f"the file holds {size - data_start}")
    if data_start + expected < size:
        raise TraceFormatError(f"{where}: {size - data_start - expected} unexpected trailing bytes after the tensors")
    return infos, metadata, data_start


def _tensor_info(where: str, name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise TraceFormatError(f"{where}: tensor {name!r} entry must have exactly dtype, shape, data_offsets; got {entry!r}")
    st = entry["dtype"]
    if st not in _ST_TO_NAME:
        raise TraceFormatError(f"{where}: tensor {name!r} has unsupported dtype {st!r} (supported: {sorted(_ST_TO_NAME)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise TraceFormatError(f"{where}: tensor {name!r} shape must be a list of non-negative ints, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise TraceFormatError(f"{where}: tensor {name!r} data_offsets must be [begin, end] with 0 <= begin <= end, "
                               f"got {offsets!r}")
    name_np = _ST_TO_NAME[st]
    itemsize = 2 if name_np == "bfloat16" else np.dtype(name_np).itemsize
    need = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != need:
        raise TraceFormatError(f"{where}: tensor {name!r} data_offsets span {offsets[1] - offsets[0]} bytes, "
                               f"but dtype {st} shape {shape} needs {need}")
    return TensorInfo(name, name_np, tuple(shape), offsets[0], offsets[1])


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as read-only memory-mapped arrays, and its metadata."""
    infos, metadata, data_start = read_safetensors_header(path)
    return _map_tensors(path, infos, data_start), metadata


def _map_tensors(path, infos: Mapping[str, TensorInfo], data_start: int) -> dict[str, np.ndarray]:
    if os.path.getsize(path) == data_start:      # np.memmap cannot map an empty region
        return {n: np.zeros(i.shape, _np_dtype(i.dtype)) for n, i in infos.items()}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in infos.items():
        dt = _np_dtype(info.dtype).newbyteorder("<") if info.dtype not in ("uint8", "int8", "bool") else _np_dtype(info.dtype)
        out[name] = np.ndarray(info.shape, dtype=dt, buffer=mm, offset=data_start + info.begin)
    return out


# --------------------------------------------------------------------------------------------
# attention traces
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerQKV:
    """One layer of a trace: ``q [T, H_q, d]``, ``k``/``v`` ``[T, H_kv, d]`` (post-RoPE), optional pre-RoPE k."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    k_pre_rope: np.ndarray | None = None

    def decode_step(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The decode step of query ``t``: ``q [H_q, d]`` and the cache ``k``, ``v`` ``[H_kv, t+1, d]`` (float64).

        The step's own token is in the cache (query ``t`` attends to tokens ``0..t``), as in
        ``kvsparse.oracle.run_decode``.
        """
        t = core.check_positive_int(t, "t", allow_zero=True)
        if t >= self.q.shape[0]:
            raise ValueError(f"t must be < T={self.q.shape[0]}, got {t}")
        q = np.asarray(self.q[t], dtype=np.float64)
        k = np.asarray(self.k[: t + 1], dtype=np.float64).transpose(1, 0, 2)
        v = np.asarray(self.v[: t + 1], dtype=np.float64).transpose(1, 0, 2)
        return q, np.ascontiguousarray(k), np.ascontiguousarray(v)

    def sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(q_seq, k_seq, v_seq)`` in float64, the input of ``kvsparse.oracle.run_decode``."""
        return tuple(np.asarray(x, dtype=np.float64) for x in (self.q, self.k, self.v))


class AttentionTrace:
    """A checked attention trace, in memory or memory-mapped from a file (see the module doc)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], metadata: dict, *, source: str = "<memory>"):
        self.source = source
        self.metadata = metadata
        self._tensors = dict(tensors)
        self._checked: set[int] = set()
        _check_trace(self._tensors, metadata, source)

    # shape facts -----------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.metadata["layers"])

    @property
    def config(self) -> dict:
        return self.metadata["config"]

    @property
    def n_tokens(self) -> int:
        return self.metadata["n_tokens"]

    @property
    def h_q(self) -> int:
        return self.config["n_heads"]

    @property
    def h_kv(self) -> int:
        return self.config["n_kv_heads"]

    @property
    def d(self) -> int:
        return self.config["head_dim"]

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]

    @property
    def positions(self) -> np.ndarray:
        return self._tensors["positions"]

    @property
    def token_ids(self) -> np.ndarray | None:
        return self._tensors.get("token_ids")

    def layer(self, index: int) -> LayerQKV:
        """Layer ``index`` (a model layer number, one of ``self.layers``); values checked on first read."""
        if index not in self.layers:
            raise KeyError(f"layer {index} is not in this trace (layers {list(self.layers)})")
        p = f"layer.{index}."
        lay = LayerQKV(self._tensors[p + "q"], self._tensors[p + "k"], self._tensors[p + "v"],
                       self._tensors.get(p + "k_pre_rope"))
        if index not in self._checked:
            for part in ("q", "k", "v", "k_pre_rope"):
                x = getattr(lay, part)
                if x is not None and not np.isfinite(x).all():
                    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
                    raise TraceFormatError(f"{self.source}: tensor '{p}{part}' contains a non-finite value at {bad}")
            self._checked.add(index)
        return lay

    def check_values(self) -> None:
        """Read every layer now (``load_trace`` checks the header only)."""
        for i in self.layers:
            self.layer(i)

    def save(self, path) -> None:
        save_trace(path, self._tensors, self.metadata)

    def __repr__(self) -> str:
        return (f"AttentionTrace({self.metadata['model'].get('name', '?')!r}, T={self.n_tokens}, layers={list(self.layers)}, "
                f"h_q={self.h_q}, h_kv={self.h_kv}, d={self.d}, dtype={self.dtype}, source={self.source!r})")


def make_metadata(*, model: dict, config: dict, dtype: str, n_tokens: int, layers, has_k_pre_rope: bool,
                  prompt: dict, made: dict) -> dict:
    """The metadata object of a trace (checked when the trace is built)."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": dict(model), "config": dict(config),
            "dtype": dtype, "n_tokens": int(n_tokens), "layers": [int(i) for i in layers],
            "has_k_pre_rope": bool(has_k_pre_rope), "prompt": dict(prompt), "made": dict(made)}


def build_trace(layers: Mapping[int, LayerQKV | tuple], *, metadata: dict, positions=None, token_ids=None) -> AttentionTrace:
    """An in-memory trace from per-layer arrays, cast to ``metadata['dtype']`` (round to nearest)."""
    dt = _np_dtype(metadata.get("dtype", "?")) if metadata.get("dtype") in TRACE_DTYPES else None
    if dt is None:
        raise TraceFormatError(f"metadata['dtype'] must be one of {TRACE_DTYPES}, got {metadata.get('dtype')!r}")
    tensors: dict[str, np.ndarray] = {}
    for i, lay in layers.items():
        if not isinstance(lay, LayerQKV):
            lay = LayerQKV(*lay)
        for part in ("q", "k", "v", "k_pre_rope"):
            x = getattr(lay, part)
            if x is not None:
                x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
                tensors[f"layer.{int(i)}.{part}"] = x.astype(dt)
    n = metadata.get("n_tokens")
    tensors["positions"] = np.asarray(np.arange(n) if positions is None else positions).astype(np.int32)
    if token_ids is not None:
        tensors["token_ids"] = np.asarray(token_ids).astype(np.int32)
    return AttentionTrace(tensors, metadata)


def save_trace(path, tensors_or_trace, metadata: dict | None = None) -> None:
    """Write a trace (an ``AttentionTrace``, or its tensors and metadata) to ``path``; checked first."""
    if isinstance(tensors_or_trace, AttentionTrace):
        tensors, metadata = tensors_or_trace._tensors, tensors_or_trace.metadata
    else:
        tensors = dict(tensors_or_trace)
        _check_trace(tensors, metadata, str(path))
    write_safetensors(path, tensors, {METADATA_KEY: json.dumps(metadata, sort_keys=True, separators=(",", ":"))})


def load_trace(path) -> AttentionTrace:
    """Open a trace lazily: the header is read and checked now, layer values when first used."""
    path = Path(path)
    infos, st_meta, data_start = read_safetensors_header(path)
    if METADATA_KEY not in st_meta:
        raise TraceFormatError(f"{path}: not a kvsparse attention trace (no __metadata__[{METADATA_KEY!r}])")
    try:
        metadata = json.loads(st_meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{path}: trace metadata is not valid JSON ({exc})") from exc
    return AttentionTrace(_map_tensors(path, infos, data_start), metadata, source=str(path))


def _check_trace(tensors: Mapping[str, np.ndarray], meta, where: str) -> None:
    def fail(msg):
        raise TraceFormatError(f"{where}: {msg}")
    if not isinstance(meta, dict):
        fail(f"metadata must be a JSON object, got {type(meta).__name__}")
    for key, typ in REQUIRED_METADATA.items():
        if key not in meta:
            fail(f"metadata is missing {key!r}")
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            fail(f"metadata[{key!r}] must be {typ.__name__}, got {type(meta[key]).__name__}")
    if meta["format"] != FORMAT_NAME:
        fail(f"metadata['format'] must be {FORMAT_NAME!r}, got {meta['format']!r}")
    if meta["version"] != FORMAT_VERSION:
        fail(f"unsupported format version {meta['version']} (this reader knows {FORMAT_VERSION})")
    cfg = meta["config"]
    for key, typ in REQUIRED_CONFIG.items():
        if key not in cfg:
            fail(f"metadata['config'] is missing {key!r}")
        if not isinstance(cfg[key], typ) or isinstance(cfg[key], bool):
            fail(f"metadata['config'][{key!r}] has the wrong type {type(cfg[key]).__name__}")
    for key in ("n_layers", "n_heads", "n_kv_heads", "head_dim"):
        if cfg[key] <= 0:
            fail(f"metadata['config'][{key!r}] must be > 0, got {cfg[key]}")
    if cfg["n_heads"] % cfg["n_kv_heads"]:
        fail(f"n_heads={cfg['n_heads']} must be divisible by n_kv_heads={cfg['n_kv_heads']}")
    if cfg["rope_layout"] not in ("half", "interleaved", "none"):
        fail(f"metadata['config']['rope_layout'] must be 'half', 'interleaved' or 'none', got {cfg['rope_layout']!r}")
    if meta["dtype"] not in TRACE_DTYPES:
        fail(f"metadata['dtype'] must be one of {TRACE_DTYPES}, got {meta['dtype']!r}")
    T, layers = meta["n_tokens"], meta["layers"]
    if T <= 0:
        fail(f"metadata['n_tokens'] must be > 0, got {T}")
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        fail(f"metadata['layers'] must be a non-empty list of ints, got {layers!r}")
    if list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= cfg["n_layers"]:
        fail(f"metadata['layers'] must be sorted, unique and in [0, {cfg['n_layers']}), got {layers}")
    h_q, h_kv, d = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    expected = {"positions": ((T,), ("int32",))}
    if "token_ids" in tensors:
        expected["token_ids"] = ((T,), ("int32",))
    parts = [("q", h_q), ("k", h_kv), ("v", h_kv)] + ([("k_pre_rope", h_kv)] if meta["has_k_pre_rope"] else [])
    for i in layers:
        for part, heads in parts:
            expected[f"layer.{i}.{part}"] = ((T, heads, d), (meta["dtype"],))
    for name, (shape, dtypes) in expected.items():
        if name not in tensors:
            fail(f"tensor {name!r} is missing (metadata lists layers {layers}, has_k_pre_rope={meta['has_k_pre_rope']})")
        x = tensors[name]
        if tuple(x.shape) != shape:
            fail(f"tensor {name!r} has shape {tuple(x.shape)}, expected {shape} "
                 f"(T={T}, H_q={h_q}, H_kv={h_kv}, d={d})")
        if np.dtype(x.dtype).name not in dtypes:
            fail(f"tensor {name!r} has dtype {np.dtype(x.dtype).name}, expected {dtypes[0]}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        fail(f"unexpected tensors {extra[:5]} (not listed by the metadata)")
