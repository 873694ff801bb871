"""StreamingLLM in Triton (stateful): sinks + the rolling recent window over a growing device cache.

Supported: ``schedule="every_step"`` with ``rope="as_given"`` (the canonical oracle), as the Numba
kernel; other modes raise ``NotImplementedError``. Membership depends only on the current length (the
oracle's ``sink_recent_mask``), so the state is the device K/V and the softmax scale given to
``prefill`` (``None``: ``1/sqrt(d)``) that every decode step uses.
"""
from __future__ import annotations

import numpy as np

from ...oracle.method import decode_scale, prefill_scale
from ...oracle.streaming_llm import sink_recent_mask
from ...registry import register_kernel
from .attention import attend_mask, pattern_step, rows_per_query_head, to_numpy, to_torch
from .snapkv import KernelCacheState, append


def _check_supported(method):
    if method.schedule != "every_step" or method.rope != "as_given":
        raise NotImplementedError("the Triton StreamingLLM kernel supports schedule='every_step', rope='as_given'")


class StreamingLLMKernel:
    """Kernel-step contract, stateful form: ``prefill`` then ``decode`` per token; called directly, one
    stateless step over a given cache."""

    def prefill(self, method, q_prompt, k_prompt, v_prompt, *, scale=None) -> KernelCacheState:
        import torch
        _check_supported(method)
        if np.ndim(k_prompt) != 3 or np.shape(v_prompt) != np.shape(k_prompt):
            raise ValueError(f"k_prompt and v_prompt must be [T, H_kv, d] (T may be 0), got {np.shape(k_prompt)}, "
                             f"{np.shape(v_prompt)}")
        t, h_kv, d = np.shape(k_prompt)
        k = to_torch(k_prompt, "k_prompt").transpose(0, 1).contiguous()
        v = to_torch(v_prompt, "v_prompt").transpose(0, 1).contiguous()
        kept = torch.ones((h_kv, t), dtype=torch.bool, device=k.device)
        return KernelCacheState(k, v, kept, {"scale": prefill_scale(scale, d)})

    def decode(self, method, state: KernelCacheState, q, k_new, v_new, *, scale=None):
        import torch
        _check_supported(method)
        scale = decode_scale(state.extra.get("scale"), scale)
        state = append(state, k_new, v_new)
        keep = sink_recent_mask(np.arange(state.n), method.sinks, method.recent_span)
        mask = torch.from_numpy(np.tile(keep, (state.k.shape[0], 1))).to(state.k.device)
        qt = to_torch(q, "q")
        out, _, rows = attend_mask(qt, state.k, state.v, mask, scale=scale)
        return state, (to_numpy(out), rows_per_query_head(rows, qt.shape[0]))

    def __call__(self, method, q, k, v, *, positions=None, scale=None):
        _check_supported(method)
        return pattern_step(method, q, k, v, positions=positions, scale=scale)


streaming_llm = register_kernel("streaming_llm", "triton")(StreamingLLMKernel())
