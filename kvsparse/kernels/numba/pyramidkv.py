"""PyramidKV in Numba: SnapKV's kernels (window vote, pooling, selection, decode over the kept rows)
with the per-layer budget of ``PyramidKV.budget_total`` (read from the method, so the integer/float
arithmetic of the two references is the oracle's)."""
from __future__ import annotations

from ...registry import register_kernel
from .snapkv import SnapKVKernel

pyramidkv = register_kernel("pyramidkv", "numba")(SnapKVKernel())
