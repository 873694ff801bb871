"""StreamingLLM in Numba (stateful): sinks + the rolling recent window, over a growing cache.

Supported: ``schedule="every_step"`` with ``rope="as_given"`` (the canonical oracle); other modes
raise ``NotImplementedError``. Under that rule a token's membership only depends on the current
length, so the state is just the K/V history (original positions), its length, and the softmax scale
given to ``prefill`` (``None``: ``1/sqrt(d)``) that every decode step uses; ``decode``'s ``scale``
must be None or equal to it (the oracle's rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...oracle.method import decode_scale, prefill_scale
from ...registry import register_kernel
from .attention import check_float_arrays, sparse_attention, sparse_attention_prefix


@dataclass
class StreamingState:
    k: np.ndarray      # [H_kv, capacity, d]; rows [0, n) are tokens 0..n-1
    v: np.ndarray
    n: int
    scale: float | None = None   # the softmax scale prefill was given


def _check_supported(method):
    if method.schedule != "every_step" or method.rope != "as_given":
        raise NotImplementedError("the Numba StreamingLLM kernel supports schedule='every_step', rope='as_given'")


def _kept(method, n: int) -> np.ndarray:
    """Sorted positions kept at length n: the first ``sinks`` and those within ``recent_span`` of n - 1."""
    # two ascending ranges: joined directly (a sort-based union1d costs more than the attention's setup)
    sinks = min(method.sinks, n)
    start = max(0, n - method.recent_span)
    if start <= sinks:
        return np.arange(n)
    return np.concatenate([np.arange(sinks), np.arange(start, n)])


class StreamingLLMKernel:
    """Kernel-step contract, stateful form (docs/kernels.md): ``prefill`` then ``decode`` per token."""

    def prefill(self, method, q_prompt, k_prompt, v_prompt, *, scale=None) -> StreamingState:
        _check_supported(method)
        t, h_kv, d = k_prompt.shape
        scale = prefill_scale(scale, d)
        cap = max(16, 2 * t)
        k = np.zeros((h_kv, cap, d), k_prompt.dtype)
        v = np.zeros((h_kv, cap, d), v_prompt.dtype)
        k[:, :t] = k_prompt.transpose(1, 0, 2)
        v[:, :t] = v_prompt.transpose(1, 0, 2)
        return StreamingState(k, v, t, scale)

    def decode(self, method, state: StreamingState, q, k_new, v_new, *, scale=None):
        _check_supported(method)
        scale = decode_scale(state.scale, scale)
        if state.n == state.k.shape[1]:   # amortised growth: the copy happens log(T) times
            grow = lambda x: np.concatenate([x, np.zeros_like(x)], axis=1)
            state = StreamingState(grow(state.k), grow(state.v), state.n, state.scale)
        state.k[:, state.n] = k_new
        state.v[:, state.n] = v_new
        state = StreamingState(state.k, state.v, state.n + 1, state.scale)
        keep = _kept(method, state.n)
        lists = np.broadcast_to(keep, (state.k.shape[0], keep.size))
        out, _ = sparse_attention_prefix(q, state.k, state.v, state.n, lists, scale=scale, check=False)
        return state, (out, np.broadcast_to(keep, (q.shape[0], keep.size)))

    def __call__(self, method, q, k, v, *, positions=None, scale=None):
        """Stateless view (one step over a given cache, positions 0..n-1)."""
        _check_supported(method)
        if positions is not None:
            raise NotImplementedError("explicit positions: use prefill/decode")
        q, k, v = check_float_arrays(q, k, v)
        keep = _kept(method, k.shape[1])
        out, _ = sparse_attention(q, k, v, np.broadcast_to(keep, (k.shape[0], keep.size)), scale=scale, check=False)
        return out, np.broadcast_to(keep, (q.shape[0], keep.size))


streaming_llm = register_kernel("streaming_llm", "numba")(StreamingLLMKernel())
