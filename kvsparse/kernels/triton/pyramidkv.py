"""PyramidKV in Triton: SnapKV's kernels (window vote, pooling, selection, decode over the kept rows)
with the per-layer budget of ``kvsparse.oracle.pyramidkv.PyramidKV.budget_total`` (read from the
method, so the integer/float arithmetic of the two references is the oracle's)."""
from __future__ import annotations

from ...registry import register_kernel
from . import snapkv as _snapkv


@register_kernel("pyramidkv", "triton")
def pyramidkv(method, q, k, v, *, positions=None, scale=None):
    """PyramidKV is stateful: use ``pyramidkv.prefill`` / ``pyramidkv.decode``."""
    raise TypeError("the PyramidKV kernel is stateful: call pyramidkv.prefill(...) then pyramidkv.decode(...)")


pyramidkv.prefill = _snapkv.prefill
pyramidkv.decode = _snapkv.decode
