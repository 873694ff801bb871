"""Longformer in Triton: the oracle's positional set (``kvsparse.oracle.longformer``: no scores, nothing to
reimplement), attended by the split-K kernel, one list per KV head when the group shares it."""
from ...registry import register_kernel
from .attention import pattern_step


@register_kernel("longformer", "triton")
def longformer(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out [H_q, d], indices per query head)`` as NumPy."""
    return pattern_step(method, q, k, v, positions=positions, scale=scale)
