"""PyramidKV (Cai et al., 2024): SnapKV's scoring with a per-layer budget that falls linearly with depth.

Budget of layer ``l`` of ``L`` (``pyramid_budget``; ``C`` the *mean* capacity per layer including the
window ``w``, ``B = C - w``, ``beta`` the steepness):

* ``arithmetic="integer"`` (KVCache-Factory ``PyramidKVCluster``, canonical):
  ``min = B // beta``, ``max = 2B - min``; if ``max >= T - w``: ``max = T - w``, ``min = 2B - max``;
  ``steps = (max - min) // (L - 1)``; then ``T < C``: no compression; ``T < 2B``: plain SnapKV
  (``C`` tokens); else ``max - l * steps`` prefix tokens + the window. The floored ``steps`` makes the
  realised mean exceed ``B`` (T=8000, C=128, w=8, L=32: 133.5). ``L = 1`` divides by zero in the
  reference; here ``steps = 0`` (as kvpress).
* ``arithmetic="float"`` (kvpress ``PyramidKVPress``, with ``compression_ratio``): ``C = w + T(1-r)``
  in floats, the same min/max/clamp, ``steps = (max - min) / (L - 1)``, and ``round(max - l * steps)``
  tokens *including* the window; if not ``T >= max >= min >= w`` it falls back to
  ``max(1, round(T (1 - r)))``. Python's ``round`` (half to even) is reproduced.

Everything else (window scores, pooling, GQA, the kept window, no decode eviction) is ``SnapKV``'s,
positions included: q and the keys are used as given, i.e. post-RoPE at their original positions (or
no RoPE). Kept keys are never re-rotated, decode queries keep their true position ``t``, and
Selections index original positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import register_method
from . import core
from .sliding_window import check_choice
from .snapkv import SnapKV

ARITHMETICS = ("integer", "float")


def pyramid_budget(t: int, *, capacity: int | None, window: int, beta: int, layer: int, num_layers: int,
                   arithmetic: str = "integer", compression_ratio: float | None = None) -> int | None:
    """Tokens layer ``layer`` keeps after a ``t``-token prompt, window included; ``None``: no compression."""
    if arithmetic == "float":
        keep = t * (1 - float(compression_ratio))
        cap = window + keep
        lo = (cap - window) / beta
        hi = (cap - window) * 2 - lo
        if hi >= t - window:
            hi = t - window
            lo = (cap - window) * 2 - hi
        if not (t >= hi >= lo >= window):
            return max(1, round(keep))
        steps = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return round(hi - layer * steps)
    b = capacity - window
    lo = b // beta
    hi = 2 * b - lo
    if hi >= t - window:
        hi = t - window
        lo = 2 * b - hi
    steps = (hi - lo) // (num_layers - 1) if num_layers > 1 else 0
    if t < capacity:
        return None
    if t < 2 * b:
        return capacity
    return hi - layer * steps + window


@register_method
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    name: ClassVar[str] = "pyramidkv"
    family: ClassVar[str] = "eviction"
    summary: ClassVar[str] = "SnapKV scoring with a per-layer budget falling linearly from bottom to top layers"

    window: int = 8
    beta: int = 20
    layer: int = 0
    num_layers: int = 32
    arithmetic: str = "integer"

    def __post_init__(self):
        super().__post_init__()
        core.check_positive_int(self.beta, "beta")
        core.check_positive_int(self.num_layers, "num_layers")
        core.check_positive_int(self.layer, "layer", allow_zero=True)
        if self.layer >= self.num_layers:
            raise ValueError(f"layer must be < num_layers={self.num_layers}, got {self.layer}")
        check_choice(self.arithmetic, ARITHMETICS, "arithmetic")
        if (self.arithmetic == "float") != (self.compression_ratio is not None):
            raise ValueError("arithmetic='float' (kvpress) goes with a compression_ratio, 'integer' with capacity")

    def budget_total(self, t: int) -> int | None:
        return pyramid_budget(t, capacity=self.capacity, window=self.window, beta=self.beta, layer=self.layer,
                              num_layers=self.num_layers, arithmetic=self.arithmetic,
                              compression_ratio=self.compression_ratio)

    @classmethod
    def presets(cls) -> dict[str, "PyramidKV"]:
        return {
            "canonical": cls(),
            # KVCache-Factory run_longbench.py: window 8, kernel 7, maxpool, per query head, floored steps
            "pyramidkv-repo": cls(window=8, capacity=2048, kernel=7, pool="max", beta=20),
            # kvpress PyramidKVPress: w=64, k=5, avg pool, mean over the group, float budget; ratio 0.5
            "kvpress": cls(window=64, kernel=5, pool="avg", window_score="mean", gqa="mean",
                           compression_ratio=0.5, ratio_rounding="float", arithmetic="float"),
        }
