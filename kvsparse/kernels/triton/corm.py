"""CORM in Triton (stateful): attention over each unit's kept rows, then the "recent message" rule
(``kvsparse.oracle.corm``, our definition of the method): every kept key whose probability in this
step is ``>= threshold / m`` (m: keys the head attended) gets the stamp ``t``; a key whose stamp is
``window`` or more steps old, outside the protected ``recent`` span, is evicted.

Kernels: the split-K attention over the kept rows (one list per unit: U = H_kv under
``gqa="union"``, so a group reads each row once; U = H_q per query head) gives the output. The
importance test needs this step's probabilities of the kept rows, compared with ``threshold / m``:
they are computed in float64 (torch on the device, a second read of the kept keys, as H2O's
``step_probs`` is), because the decision is a comparison and the oracle makes it in float64: with
fp32 probabilities a key within float32's rounding of the threshold was judged the other way (found
by the suite: ``window=1, threshold=2``, about one sequence in 250). The prompt's causal softmax
(prefill) is float64 torch too, in chunks of query rows. Stamps and eviction are elementwise torch.

State: ``KernelCacheState`` with ``kept [U, n]`` bool and ``extra``: ``last [U, n]`` int64 stamps and
the prefill ``scale`` (``None``: ``1/sqrt(d)``), used by every decode step.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...oracle.method import decode_scale, prefill_scale
from ...registry import register_kernel
from .attention import decode_attention_indices, mask_to_indices, rows_per_query_head, to_numpy, to_torch
from .snapkv import KernelCacheState, append

PROMPT_CHUNK = 256


def _important(method, probs, attended, h_kv: int):
    """``[U, ..., n]`` bool: ``probs [H_q, ..., n] >= threshold / attended`` (any head of a group under union)."""
    imp = probs >= (method.threshold / attended.to(probs.dtype))
    if method.gqa == "union":
        imp = imp.reshape((h_kv, -1) + tuple(imp.shape[1:])).any(dim=1)
    return imp


def _evict(method, kept, last, t: int):
    import torch
    pos = torch.arange(kept.shape[1], device=kept.device)[None, :]
    stale = (t - last >= method.window) & (pos < t + 1 - method.recent_span)
    return kept & ~stale


def kept_probs64(q, k, kept, scale: float):
    """``[H_q, n]`` float64 softmax of each query head over its unit's kept rows (0 elsewhere)."""
    import torch
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    logits = torch.einsum("kgd,knd->kgn", q.double().reshape(h_kv, h_q // h_kv, d), k.double()).reshape(h_q, n)
    mask = kept.repeat_interleave(h_q // kept.shape[0], dim=0)
    return torch.softmax(torch.where(mask, logits * scale, float("-inf")), dim=-1).nan_to_num(0.0)


def prefill(method, q_prompt, k_prompt, v_prompt, *, scale=None):
    import torch
    qp, kp, vp = to_torch(q_prompt, "q_prompt"), to_torch(k_prompt, "k_prompt"), to_torch(v_prompt, "v_prompt")
    if qp.dim() != 3 or kp.dim() != 3 or kp.shape != vp.shape or qp.shape[0] != kp.shape[0] or qp.shape[0] < 1:
        raise ValueError(f"prompt must be q [T>=1, H_q, d], k/v [T, H_kv, d], got {tuple(qp.shape)}, {tuple(kp.shape)}")
    t, h_kv, d = kp.shape
    h_q = qp.shape[1]
    scale = prefill_scale(scale, d)
    k = kp.transpose(0, 1).double()                                  # [H_kv, t, d]
    units = h_kv if method.gqa == "union" else h_q
    last = torch.arange(t, device=qp.device)[None, :].repeat(units, 1)   # a key judges itself
    keys = torch.arange(t, device=qp.device)
    for s in range(0, t, PROMPT_CHUNK):
        rows = torch.arange(s, min(t, s + PROMPT_CHUNK), device=qp.device)
        q = qp[rows].double().reshape(rows.numel(), h_kv, h_q // h_kv, d)       # [c, H_kv, G, d]
        logits = torch.einsum("ckgd,knd->kgcn", q, k).reshape(h_q, rows.numel(), t) * scale
        causal = keys[None, None, :] <= rows[None, :, None]
        probs = torch.softmax(torch.where(causal, logits, float("-inf")), dim=-1)
        imp = _important(method, probs, (rows + 1)[None, :, None], h_kv) & causal
        stamp = torch.where(imp, rows[None, :, None], -1).amax(dim=1)           # last important query
        last = torch.maximum(last, stamp)
    kept = _evict(method, torch.ones((units, t), dtype=torch.bool, device=qp.device), last, t - 1)
    return KernelCacheState(kp.transpose(0, 1).contiguous(), vp.transpose(0, 1).contiguous(), kept,
                            {"last": last, "scale": scale})


def decode(method, state: KernelCacheState, q, k_new, v_new, *, scale=None):
    import torch
    scale = decode_scale(state.extra.get("scale"), scale)
    t = state.n
    state = append(state, k_new, v_new)
    last = torch.cat([state.extra["last"], torch.full((state.kept.shape[0], 1), t, device=state.kept.device)], 1)
    qt = to_torch(q, "q")
    h_q, h_kv = qt.shape[0], state.k.shape[0]
    idx, lengths = mask_to_indices(state.kept)
    out, _ = decode_attention_indices(qt, state.k, state.v, idx, lengths, scale=scale)
    probs = kept_probs64(qt, state.k, state.kept, scale)                      # [H_q, n], 0 where not kept
    attended = lengths.repeat_interleave(h_q // idx.shape[0])[:, None]
    imp = _important(method, probs, attended, h_kv) & state.kept
    last = torch.where(imp, t, last)
    idx_np, len_np = idx.cpu().numpy(), lengths.cpu().numpy()
    rows = rows_per_query_head([idx_np[r, : len_np[r]].astype(np.int64) for r in range(idx_np.shape[0])], h_q)
    state = replace(state, kept=_evict(method, state.kept, last, t), extra=dict(state.extra, last=last))
    return state, (to_numpy(out), rows)


@register_kernel("corm", "triton")
def corm(method, q, k, v, *, positions=None, scale=None):
    """CORM is stateful: use ``corm.prefill`` / ``corm.decode`` (the stateful kernel contract)."""
    raise TypeError("the CORM kernel is stateful: call corm.prefill(method, q_prompt, k_prompt, v_prompt, scale=...) "
                    "then corm.decode(method, state, q, k_new, v_new, scale=...)")


corm.prefill = prefill
corm.decode = decode
