"""Cross-layer attention (CLA, Brandon et al. 2024): groups of ``sharing_factor`` adjacent layers share
one KV cache.

Conventions:

* Layer ``l`` reads the cache produced by layer ``producer(l) = (l // f) * f``, the first layer of its
  group; only producer layers compute and store K/V. With ``L`` layers, ``ceil(L / f)`` caches exist
  (the last group may be smaller), so the stored KV bytes are ``ceil(L / f) / L`` of the unshared model.
* Attention itself is unchanged: every layer attends densely over the (shared) cache.
* Traffic of one layer's step (``consumer_reads``):
  ``"hbm"`` (canonical): every layer reads its cache from HBM, the consumer layers too, so the bytes
  *read* per step equal the unshared model's; CLA saves capacity (and the K/V writes, which Traffic
  does not count). ``"reuse"``: an idealised schedule where a consumer layer finds the shared cache
  on chip and reads nothing: per-step reads then also scale by ``ceil(L / f) / L`` (a lower bound).
* ``sharing_factor = 1`` is the unshared model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .types import Layout, Selection, StepResult, Traffic, kv_traffic

CONSUMER_READS = ("hbm", "reuse")


@register_method
@dataclass(frozen=True)
class CLA(Method):
    """One layer of a cross-layer-attention model (``layer`` says which)."""

    name: ClassVar[str] = "cla"
    family: ClassVar[str] = "structural"
    summary: ClassVar[str] = "adjacent layers share one KV cache (sharing factor f): KV bytes / f"

    sharing_factor: int = 2
    layer: int = 0
    consumer_reads: str = "hbm"

    def __post_init__(self):
        core.check_positive_int(self.sharing_factor, "sharing_factor")
        core.check_positive_int(self.layer, "layer", allow_zero=True)
        if self.consumer_reads not in CONSUMER_READS:
            raise ValueError(f"consumer_reads must be one of {CONSUMER_READS}, got {self.consumer_reads!r}")

    def producer(self, layer: int | None = None) -> int:
        layer = self.layer if layer is None else core.check_positive_int(layer, "layer", allow_zero=True)
        return (layer // self.sharing_factor) * self.sharing_factor

    def is_producer(self, layer: int | None = None) -> bool:
        return self.producer(layer) == (self.layer if layer is None else layer)

    def cache_layers(self, n_layers: int) -> int:
        """How many KV caches a model of ``n_layers`` layers stores."""
        return -(-core.check_positive_int(n_layers, "n_layers") // self.sharing_factor)

    def cache_bytes(self, n: int, n_layers: int, h_kv: int, d: int, layout: Layout = Layout()) -> int:
        """Stored K and V bytes for ``n`` tokens: ``ceil(L / f) * 2 * n * H_kv * row_bytes(d)``."""
        return self.cache_layers(n_layers) * 2 * n * h_kv * layout.row_bytes(d)

    def select(self, q, k, v, *, positions=None) -> Selection:
        return Selection.full(q.shape[0], k.shape[1])

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        return core.attend_dense(q, k, v, scale=scale)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        if self.consumer_reads == "reuse" and not self.is_producer():
            return Traffic({}, layout)
        return kv_traffic(selection, h_kv, d, layout)

    @classmethod
    def presets(cls) -> dict[str, "CLA"]:
        return {"canonical": cls(), "cla3": cls(sharing_factor=3), "cla2-reuse": cls(consumer_reads="reuse")}


def decode_layers(method: CLA, q_layers, k_layers, v_layers, *, scale: float | None = None,
                  layout: Layout = Layout()) -> list[StepResult]:
    """One decode step through every layer: ``q_layers [L, H_q, d]``, ``k_layers``/``v_layers``
    ``[L, H_kv, n, d]`` (what each layer *would* compute; only producer layers' entries are read)."""
    if not isinstance(method, CLA):
        raise TypeError(f"method must be a CLA instance, got {type(method).__name__}")
    q_layers = core.as_float64(q_layers, "q_layers", ndim=3)
    k_layers = core.as_float64(k_layers, "k_layers", ndim=4)
    v_layers = core.as_float64(v_layers, "v_layers", ndim=4)
    if not (q_layers.shape[0] == k_layers.shape[0] == v_layers.shape[0]):
        raise ValueError(f"q_layers, k_layers, v_layers must have the same number of layers, got "
                         f"{q_layers.shape[0]}, {k_layers.shape[0]}, {v_layers.shape[0]}")
    steps = []
    for layer in range(q_layers.shape[0]):
        m = dataclasses.replace(method, layer=layer)
        p = m.producer()
        steps.append(m.step(q_layers[layer], k_layers[p], v_layers[p], scale=scale, layout=layout))
    return steps
