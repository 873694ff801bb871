"""Access traces: the record of what a method read at each decode step.

For every decode step, layer and KV head, the ids of the units read: tokens, pages or clusters.
What is recorded is what a GQA-aware kernel loads: the union of the group's selections (so one
entry per *KV* head), rounded to pages when the unit is a page. Stored compactly (CSR: one int32 id
array and an offsets array ``[steps, layers, h_kv + 1]``) in a ``.npz`` file.

``unit_bytes`` is the size of one unit of one KV head (K and V together) in bytes; for clusters,
whose sizes differ, ``unit_sizes [layers, h_kv, n_units]`` gives each cluster's size in tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..oracle import Layout, core, run_decode
from ..oracle.types import Selection

UNITS = ("token", "page", "cluster")


@dataclass(frozen=True)
class AccessTrace:
    unit: str
    unit_bytes: int
    n_units: int                     # id space per (layer, KV head): ids lie in [0, n_units)
    layers: tuple[int, ...]
    h_kv: int
    ids: np.ndarray                  # int32, concatenated
    offsets: np.ndarray              # int64 [steps, len(layers), h_kv + 1]
    unit_sizes: np.ndarray | None = None   # int64 [len(layers), h_kv, n_units] tokens per unit (clusters)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        core.check_positive_int(self.unit_bytes, "unit_bytes")
        core.check_positive_int(self.n_units, "n_units", allow_zero=True)
        core.check_positive_int(self.h_kv, "h_kv")
        off = np.asarray(self.offsets, dtype=np.int64)
        if off.ndim != 3 or off.shape[1:] != (len(self.layers), self.h_kv + 1):
            raise ValueError(f"offsets must be [steps, {len(self.layers)}, {self.h_kv + 1}], got {off.shape}")
        ids = np.asarray(self.ids, dtype=np.int32)
        flat_start = off[:, :, 0].ravel()
        flat_stop = off[:, :, -1].ravel()
        if off.size and (np.any(np.diff(off, axis=2) < 0) or off[0, 0, 0] != 0 or off[-1, -1, -1] != ids.size
                         or np.any(flat_start[1:] != flat_stop[:-1])):
            raise ValueError("offsets must be non-decreasing, start at 0, be contiguous and end at len(ids)")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_units):
            raise ValueError(f"ids must lie in [0, {self.n_units}), got [{ids.min()}, {ids.max()}]")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "offsets", off)
        if self.unit_sizes is not None:
            sizes = np.asarray(self.unit_sizes, dtype=np.int64)
            if sizes.shape != (len(self.layers), self.h_kv, self.n_units):
                raise ValueError(f"unit_sizes must be [{len(self.layers)}, {self.h_kv}, {self.n_units}], got {sizes.shape}")
            object.__setattr__(self, "unit_sizes", sizes)

    @property
    def steps(self) -> int:
        return self.offsets.shape[0]

    def reads(self, step: int, layer_index: int, kv_head: int) -> np.ndarray:
        a, b = self.offsets[step, layer_index, kv_head], self.offsets[step, layer_index, kv_head + 1]
        return self.ids[a:b]

    def bytes_of(self, layer_index: int, kv_head: int, ids: np.ndarray) -> int:
        if self.unit_sizes is None:
            return int(ids.size) * self.unit_bytes
        return int(self.unit_sizes[layer_index, kv_head, ids].sum()) * self.unit_bytes

    def step_bytes(self) -> np.ndarray:
        """Bytes read per step (all layers and KV heads)."""
        out = np.zeros(self.steps, dtype=np.int64)
        for s in range(self.steps):
            for li in range(len(self.layers)):
                for h in range(self.h_kv):
                    out[s] += self.bytes_of(li, h, self.reads(s, li, h))
        return out

    # storage ---------------------------------------------------------------------------------
    def save(self, path) -> None:
        meta = {"unit": self.unit, "unit_bytes": self.unit_bytes, "n_units": self.n_units,
                "layers": list(self.layers), "h_kv": self.h_kv, "metadata": self.metadata}
        arrays = {"ids": self.ids, "offsets": self.offsets, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        if self.unit_sizes is not None:
            arrays["unit_sizes"] = self.unit_sizes
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path) -> "AccessTrace":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                return cls(meta["unit"], meta["unit_bytes"], meta["n_units"], tuple(meta["layers"]), meta["h_kv"],
                           z["ids"], z["offsets"], z["unit_sizes"] if "unit_sizes" in z else None, meta["metadata"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a valid access trace ({exc})") from exc


def kv_reads(selection: Selection, h_kv: int, page_size: int = 1) -> list[np.ndarray]:
    """Per KV head, the unit ids a GQA-aware kernel loads for ``selection`` (pages if page_size > 1)."""
    union = selection.kv_union(h_kv)
    return [np.unique(ix // page_size) if page_size > 1 else ix for ix in union]


def from_selections(selections: Sequence[Sequence[Selection]], layers: Sequence[int], h_kv: int, d: int,
                    layout: Layout = Layout(), metadata: dict | None = None) -> AccessTrace:
    """Build an access trace from ``selections[step][layer_index]``."""
    steps = len(selections)
    if steps == 0:
        raise ValueError("selections must hold at least one step")
    unit = "page" if layout.page_size > 1 else "token"
    n_max = max(sel.n for per_step in selections for sel in per_step)
    n_units = -(-n_max // layout.page_size)
    chunks, offsets, pos = [], np.zeros((steps, len(layers), h_kv + 1), np.int64), 0
    for s, per_step in enumerate(selections):
        if len(per_step) != len(layers):
            raise ValueError(f"selections[{s}] must have one Selection per layer ({len(layers)}), got {len(per_step)}")
        for li, sel in enumerate(per_step):
            offsets[s, li, 0] = pos
            for h, ids in enumerate(kv_reads(sel, h_kv, layout.page_size)):
                chunks.append(ids.astype(np.int32))
                pos += ids.size
                offsets[s, li, h + 1] = pos
    ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    unit_bytes = 2 * layout.row_bytes(d) * layout.page_size
    return AccessTrace(unit, unit_bytes, n_units, tuple(layers), h_kv, ids, offsets, None, dict(metadata or {}))


def record_access(method, layers: dict[int, tuple], *, prefill_len: int, layout: Layout = Layout()) -> AccessTrace:
    """Run ``method``'s oracle over an attention trace and record what it read.

    ``layers`` maps a layer index to ``(q_seq [T, H_q, d], k_seq [T, H_kv, d], v_seq)``; ``method`` is one
    method for every layer, or a mapping layer index -> method (a method calibrated per layer, such
    as Double Sparsity's channels).
    """
    if not layers:
        raise ValueError("layers must hold at least one layer")
    order = sorted(layers)
    per_layer = method if isinstance(method, Mapping) else {li: method for li in order}
    if set(per_layer) != set(order):
        raise ValueError(f"method must map every layer {order} to a method, got layers {sorted(per_layer)}")
    method = per_layer[order[0]]
    runs = [run_decode(per_layer[li], *layers[li], prefill_len=prefill_len, layout=layout) for li in order]
    q0, k0, _ = layers[order[0]]
    h_kv, d = np.shape(k0)[1], np.shape(k0)[2]
    per_step = [[run.steps[s].selection for run in runs] for s in range(len(runs[0].steps))]
    meta = {"method": getattr(method, "name", type(method).__name__), "params": repr(method), "prefill_len": prefill_len}
    return from_selections(per_step, order, h_kv, d, layout, meta)


def record_cluster_access(method, layers: dict[int, tuple], *, prefill_len: int, layout: Layout = Layout()) -> AccessTrace:
    """ClusterKV over an attention trace, recorded at cluster granularity (its offloaded GPU cache).

    Units are the clusters of each (layer, KV head); a step reads every cluster that holds a selected
    prompt token (the union over the group); ``unit_sizes`` are the clusters' member counts, so a
    cluster's bytes are its tokens' K and V rows. Sinks and generated tokens stay on the GPU and are
    not in the trace.
    """
    if getattr(method, "name", None) != "clusterkv":
        raise ValueError(f"method must be a ClusterKV oracle, got {getattr(method, 'name', type(method).__name__)!r}")
    if not layers:
        raise ValueError("layers must hold at least one layer")
    order = sorted(layers)
    runs = [run_decode(method, *layers[li], prefill_len=prefill_len, layout=layout) for li in order]
    h_kv, d = np.shape(layers[order[0]][1])[1], np.shape(layers[order[0]][1])[2]
    states = [run.final_state for run in runs]
    n_units = max(int(st.centroids.shape[1]) for st in states)
    sizes = np.zeros((len(order), h_kv, n_units), np.int64)
    for li, st in enumerate(states):
        for h in range(h_kv):
            sizes[li, h] = np.bincount(st.labels[h], minlength=n_units)[:n_units]
    steps = len(runs[0].steps)
    chunks, offsets, pos = [], np.zeros((steps, len(order), h_kv + 1), np.int64), 0
    for s in range(steps):
        for li, (run, st) in enumerate(zip(runs, states)):
            offsets[s, li, 0] = pos
            for h, tok in enumerate(run.steps[s].selection.kv_union(h_kv)):
                tok = tok[(tok >= st.first) & (tok < st.prompt_len)]
                ids = np.unique(st.labels[h, tok - st.first]).astype(np.int32)
                chunks.append(ids)
                pos += ids.size
                offsets[s, li, h + 1] = pos
    ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    meta = {"method": "clusterkv", "params": repr(method), "prefill_len": prefill_len}
    return AccessTrace("cluster", 2 * layout.row_bytes(d), n_units, tuple(order), h_kv, ids, offsets, sizes, meta)
