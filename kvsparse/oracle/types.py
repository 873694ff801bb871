"""The values every part of kvsparse passes around: Selection, Layout, Traffic, StepResult."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from . import core

MEMORIES = ("hbm", "pcie", "host")
"""Where bytes are read: GPU memory; host memory read by the GPU over PCIe / NVLink-C2C; host memory
read by the host itself (CPU-side retrieval or attention)."""

TENSORS = ("keys", "values", "metadata", "auxiliary")
"""What is read: cached keys, cached values, per-page/per-cluster metadata (Quest min/max, centroids,
labels), and anything else a method reads (scores, 4-bit key copies, query-side statistics)."""


@dataclass(frozen=True)
class Selection:
    """Which cached tokens each query head attends to in one decode step.

    ``indices[h]`` is a sorted array of unique token indices in ``[0, n)`` for query head ``h``
    (always one entry per *query* head, also when a method selects per KV head: the entry is then
    repeated across the group). ``weights[h]``, when present, gives one non-negative factor per index
    (estimators such as vAttention); ``None`` means plain attention over the set.
    """

    indices: tuple[np.ndarray, ...]
    n: int
    weights: tuple[np.ndarray, ...] | None = None

    def __post_init__(self):
        n = core.check_positive_int(self.n, "n", allow_zero=True)
        idx = tuple(core.check_index_sets(list(self.indices), len(self.indices), n, "indices"))
        if not idx:
            raise ValueError("indices must hold one index set per query head, got none")
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "n", n)
        if self.weights is not None:
            w = tuple(core.check_weights(list(self.weights), idx, "weights"))
            object.__setattr__(self, "weights", w)

    # constructors -------------------------------------------------------------------------
    @classmethod
    def full(cls, h_q: int, n: int) -> "Selection":
        return cls(tuple(np.arange(n, dtype=np.int64) for _ in range(h_q)), n)

    @classmethod
    def from_mask(cls, mask) -> "Selection":
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.ndim != 2:
            raise TypeError(f"mask must be a 2-D boolean array [H_q, n], got {mask.dtype} {mask.shape}")
        return cls(tuple(np.flatnonzero(row) for row in mask), mask.shape[1])

    @classmethod
    def per_kv_head(cls, kv_indices: Sequence, h_q: int, n: int) -> "Selection":
        """One index set per KV head, shared by the G query heads of its group."""
        g = core.group_size(h_q, len(kv_indices))
        return cls(tuple(np.asarray(kv_indices[h // g]) for h in range(h_q)), n)

    # views ----------------------------------------------------------------------------------
    @property
    def h_q(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([ix.size for ix in self.indices], dtype=np.int64)

    def mask(self) -> np.ndarray:
        m = np.zeros((self.h_q, self.n), dtype=bool)
        for h, ix in enumerate(self.indices):
            m[h, ix] = True
        return m

    def dense_weights(self) -> np.ndarray | None:
        """``[H_q, n]`` weights (0 outside the sets), or ``None`` for a plain (unweighted) selection."""
        if self.weights is None:
            return None
        w = np.zeros((self.h_q, self.n))
        for h, (ix, wh) in enumerate(zip(self.indices, self.weights)):
            w[h, ix] = wh
        return w

    def kv_union(self, h_kv: int) -> list[np.ndarray]:
        """Per KV head, the union of its query heads' index sets (what a shared-KV kernel loads)."""
        g = core.group_size(self.h_q, h_kv)
        return [np.unique(np.concatenate(self.indices[j * g:(j + 1) * g])) for j in range(h_kv)]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        if self.n != other.n or self.h_q != other.h_q:
            return False
        if any(not np.array_equal(a, b) for a, b in zip(self.indices, other.indices)):
            return False
        if (self.weights is None) != (other.weights is None):
            return False
        return self.weights is None or all(np.array_equal(a, b) for a, b in zip(self.weights, other.weights))

    __hash__ = None


@dataclass(frozen=True)
class Layout:
    """How the KV cache sits in memory, which fixes how many bytes a selection costs.

    element_bits:   bits per stored K/V element (16 for fp16/bf16, 8 for fp8/int8, 4 for int4).
    page_size:      tokens per page; reads are page-granular (a touched page is read whole, except
                    that the last, partially filled page holds only its filled tokens). 1 = token-granular.
    share_kv_heads: True if a kernel loads each KV row once for all G query heads of its group
                    (GQA-aware: the union of the group's selections is read); False if each query
                    head reads its own rows (the per-query-head cost of, e.g., repeat_kv caches).
    """

    element_bits: int = 16
    page_size: int = 1
    share_kv_heads: bool = True

    def __post_init__(self):
        if self.element_bits not in (4, 8, 16, 32, 64):
            raise ValueError(f"element_bits must be one of 4, 8, 16, 32, 64, got {self.element_bits!r}")
        core.check_positive_int(self.page_size, "page_size")
        if not isinstance(self.share_kv_heads, bool):
            raise TypeError(f"share_kv_heads must be a bool, got {type(self.share_kv_heads).__name__}")

    def row_bytes(self, d: int) -> int:
        """Bytes of one token's key (or value) row of one head."""
        bits = d * self.element_bits
        if bits % 8:
            raise ValueError(f"d={d} with {self.element_bits}-bit elements is not a whole number of bytes")
        return bits // 8

    @property
    def element_bytes(self) -> float:
        return self.element_bits / 8


@dataclass(frozen=True)
class Traffic:
    """Exact bytes read in one decode step, by (memory, tensor); see MEMORIES and TENSORS.

    Only reads are counted. ``layout`` records the layout the bytes were counted under.
    """

    bytes: Mapping[tuple[str, str], int] = field(default_factory=dict)
    layout: Layout = field(default_factory=Layout)

    def __post_init__(self):
        clean = {}
        for (mem, ten), b in dict(self.bytes).items():
            if mem not in MEMORIES:
                raise ValueError(f"memory must be one of {MEMORIES}, got {mem!r}")
            if ten not in TENSORS:
                raise ValueError(f"tensor must be one of {TENSORS}, got {ten!r}")
            if isinstance(b, (bool, float)) or int(b) != b or b < 0:
                raise ValueError(f"bytes for ({mem}, {ten}) must be a non-negative integer, got {b!r}")
            if b:
                clean[(mem, ten)] = clean.get((mem, ten), 0) + int(b)
        object.__setattr__(self, "bytes", MappingProxyType(clean))

    def get(self, memory: str, tensor: str) -> int:
        return self.bytes.get((memory, tensor), 0)

    def by_memory(self, memory: str) -> int:
        return sum(b for (m, _), b in self.bytes.items() if m == memory)

    def by_tensor(self, tensor: str) -> int:
        return sum(b for (_, t), b in self.bytes.items() if t == tensor)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def __add__(self, other: "Traffic") -> "Traffic":
        if not isinstance(other, Traffic):
            return NotImplemented
        if other.layout != self.layout:
            raise ValueError(f"cannot add Traffic counted under different layouts: {self.layout} vs {other.layout}")
        merged = dict(self.bytes)
        for key, b in other.bytes.items():
            merged[key] = merged.get(key, 0) + b
        return Traffic(merged, self.layout)

    def to_dict(self) -> dict[str, int]:
        return {f"{m}.{t}": self.get(m, t) for m in MEMORIES for t in TENSORS}

    def __eq__(self, other) -> bool:
        if not isinstance(other, Traffic):
            return NotImplemented
        return dict(self.bytes) == dict(other.bytes) and self.layout == other.layout

    __hash__ = None


def rows_read(indices: np.ndarray, n: int, page_size: int) -> int:
    """Rows a page-granular reader touches to read ``indices`` of an ``n``-token cache."""
    if indices.size == 0:
        return 0
    if page_size == 1:
        return int(indices.size)
    pages = np.unique(indices // page_size)
    starts = pages * page_size
    return int(np.minimum(page_size, n - starts).sum())


def kv_traffic(selection: Selection, h_kv: int, d: int, layout: Layout = Layout(), *,
               memory: str = "hbm", tensors: tuple[str, ...] = ("keys", "values")) -> Traffic:
    """Bytes of the K and V rows a faithful kernel must read for ``selection``.

    Under ``layout.share_kv_heads`` a KV head's rows are read once for the union of its group's
    selections; otherwise once per query head. Reads are rounded up to whole pages.
    """
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    row = layout.row_bytes(d)
    sets = selection.kv_union(h_kv) if layout.share_kv_heads else selection.indices
    rows = sum(rows_read(ix, selection.n, layout.page_size) for ix in sets)
    return Traffic({(memory, t): rows * row for t in tensors}, layout)


@dataclass(frozen=True)
class StepResult:
    """What a method does in one decode step: which tokens, what output, which bytes."""

    selection: Selection
    output: np.ndarray
    traffic: Traffic
