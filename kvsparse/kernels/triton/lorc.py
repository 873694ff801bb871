"""LoRC decode in Triton: K and V are rebuilt from the cached low-rank latents inside the attention
loop (``oracle/lorc.py``), so a step reads ``r_k + r_v`` latent elements per token, not ``2 H_kv d``.

Inputs: ``q [H_q, d]`` (already rotated), ``latent_k [n, r_k]``, ``latent_v [n, r_v]`` (shared by every
KV head), the up-projections ``b_k [r_k, H_kv * d]``, ``b_v [r_v, H_kv * d]`` (weights), the keys' RoPE
``positions [n]`` (rotate-half; angles from ``core.rope_angles``, passed as fp32 cos/sin tables
``[n, d / 2]``), or none.

Programs (Flash-Decoding, as ``attention.py``): one per (KV head, split); the head's columns of
``b_k``/``b_v`` stay in registers, the group's G queries are padded to 16 rows. Per block of tokens:
``k = latent_k @ b_k`` as its two RoPE halves (two ``tl.dot``s), rotated, then the logits; ``v =
latent_v @ b_v``; ``P @ v``. The rebuilt rows are fp32 and rounded once to the input dtype before
the attention dots (a naive kernel rounds every step of the rebuild: ``derived_cache_tolerance``).
The registered step is the Method view's (the cache given rebuilt): dense split-K attention.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ...oracle import core
from ...oracle.lorc import LoRC
from ...registry import register_kernel
from .attention import (DOT_ROWS, _f32_dot, _kernels as _attention_kernels, _next_pow2, default_splits, dense_decode,
                        to_numpy, to_torch)


_mm = None
"""``mm(a, b, F32_DOT)``: the jitted dot the kernel calls, bound by ``_kernel()`` (triton is imported lazily)."""


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def mm(a, b, F32_DOT: tl.constexpr):
        if F32_DOT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    # a jitted function calls another through the module's globals (triton is imported lazily here)
    globals()["_mm"] = mm

    @triton.jit
    def split_kernel(q_ptr, lk_ptr, lv_ptr, bk_ptr, bv_ptr, cos_ptr, sin_ptr, part_out_ptr, part_lse_ptr,
                     scale, N, chunk, num_splits, HKVD,
                     G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HALF: tl.constexpr,
                     HP: tl.constexpr, RK: tl.constexpr, RKP: tl.constexpr, RV: tl.constexpr, RVP: tl.constexpr,
                     HAS_ROPE: tl.constexpr, BLOCK: tl.constexpr, F32_DOT: tl.constexpr):
        kvh = tl.program_id(0)
        split = tl.program_id(1)
        g = tl.arange(0, GP)
        g_mask = g < G
        heads = kvh * G + g
        rk = tl.arange(0, RKP)
        rv = tl.arange(0, RVP)
        dd = tl.arange(0, DP)
        hh = tl.arange(0, HP)
        col = kvh * D
        # this KV head's columns of the up-projections (weights: loaded once per program)
        bv = tl.load(bv_ptr + rv[:, None] * HKVD + col + dd[None, :], mask=(rv[:, None] < RV) & (dd[None, :] < D),
                     other=0.0)
        if HAS_ROPE:   # the two rotate-half halves of the keys: channel i pairs with i + d/2
            hm = (rk[:, None] < RK) & (hh[None, :] < HALF)
            bk1 = tl.load(bk_ptr + rk[:, None] * HKVD + col + hh[None, :], mask=hm, other=0.0)
            bk2 = tl.load(bk_ptr + rk[:, None] * HKVD + col + HALF + hh[None, :], mask=hm, other=0.0)
            qm = g_mask[:, None] & (hh[None, :] < HALF)
            q1 = tl.load(q_ptr + heads[:, None] * D + hh[None, :], mask=qm, other=0.0)
            q2 = tl.load(q_ptr + heads[:, None] * D + HALF + hh[None, :], mask=qm, other=0.0)
        else:
            bk = tl.load(bk_ptr + rk[:, None] * HKVD + col + dd[None, :],
                         mask=(rk[:, None] < RK) & (dd[None, :] < D), other=0.0)
            q = tl.load(q_ptr + heads[:, None] * D + dd[None, :], mask=g_mask[:, None] & (dd[None, :] < D), other=0.0)
        start = split * chunk
        stop = tl.minimum(start + chunk, N)
        m = tl.full([GP], -1.0e30, tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for base in range(start, stop, BLOCK):
            t = base + tl.arange(0, BLOCK)
            t_mask = t < stop
            tt = t.to(tl.int64)[:, None]
            lk = tl.load(lk_ptr + tt * RK + rk[None, :], mask=t_mask[:, None] & (rk[None, :] < RK), other=0.0)
            lv = tl.load(lv_ptr + tt * RV + rv[None, :], mask=t_mask[:, None] & (rv[None, :] < RV), other=0.0)
            if HAS_ROPE:
                k1 = _mm(lk, bk1, F32_DOT)
                k2 = _mm(lk, bk2, F32_DOT)
                cm = t_mask[:, None] & (hh[None, :] < HALF)
                c = tl.load(cos_ptr + tt * HALF + hh[None, :], mask=cm, other=1.0)
                sn = tl.load(sin_ptr + tt * HALF + hh[None, :], mask=cm, other=0.0)
                r1 = (k1 * c - k2 * sn).to(q1.dtype)
                r2 = (k1 * sn + k2 * c).to(q1.dtype)
                s = _mm(q1, tl.trans(r1), F32_DOT) + _mm(q2, tl.trans(r2), F32_DOT)
            else:
                kf = _mm(lk, bk, F32_DOT).to(q.dtype)
                s = _mm(q, tl.trans(kf), F32_DOT)
            v = _mm(lv, bv, F32_DOT).to(lv.dtype)
            s = tl.where(t_mask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, F32_DOT)
            m = m_new
        has = l > 0
        out = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        tl.store(part_out_ptr + (heads[:, None] * num_splits + split) * D + dd[None, :], out,
                 mask=g_mask[:, None] & (dd[None, :] < D))
        tl.store(part_lse_ptr + heads * num_splits + split, lse, mask=g_mask)

    return split_kernel


def lorc_attention(q, latent_k, latent_v, b_k, b_v, positions=None, *, rope_base: float = 10000.0, scale=None,
                   num_splits=None, block: int = 32):
    """Decode attention from the latents (torch tensors, one dtype); ``(out [H_q, d], lse [H_q])``."""
    import torch
    for name, x in (("q", q), ("latent_k", latent_k), ("latent_v", latent_v), ("b_k", b_k), ("b_v", b_v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D torch.Tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    h_q, d = q.shape
    n, r_k = latent_k.shape
    r_v = latent_v.shape[1]
    if latent_v.shape[0] != n or b_k.shape[0] != r_k or b_v.shape[0] != r_v or b_k.shape[1] != b_v.shape[1]:
        raise ValueError(f"need latent_k [n, r_k], latent_v [n, r_v], b_k [r_k, H_kv*d], b_v [r_v, H_kv*d]; got "
                         f"{tuple(latent_k.shape)}, {tuple(latent_v.shape)}, {tuple(b_k.shape)}, {tuple(b_v.shape)}")
    if b_k.shape[1] % d or not b_k.shape[1] or h_q % (b_k.shape[1] // d):
        raise ValueError(f"b_k and b_v must have H_kv * d columns (d={d}, H_q={h_q} divisible by H_kv), got {b_k.shape[1]}")
    for name, x in (("latent_k", latent_k), ("latent_v", latent_v), ("b_k", b_k), ("b_v", b_v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    h_kv = b_k.shape[1] // d
    g = h_q // h_kv
    has_rope = positions is not None
    half = d // 2 if has_rope else d
    if has_rope:
        pos = core.check_rope_positions(positions)
        if pos.shape != (n,):
            raise ValueError(f"positions must have shape ({n},), got {pos.shape}")
        ang = core.rope_angles(pos, d, rope_base)           # [n, d/2]; raises for an odd d
        cos = torch.from_numpy(np.cos(ang)).to(device=q.device, dtype=torch.float32).contiguous()
        sin = torch.from_numpy(np.sin(ang)).to(device=q.device, dtype=torch.float32).contiguous()
    else:
        cos = sin = torch.zeros(1, dtype=torch.float32, device=q.device)
    num_splits = max(1, int(num_splits if num_splits is not None else default_splits(h_kv, n, q.device)))
    chunk = max(1, math.ceil(n / num_splits))
    part_out = torch.empty((h_q, num_splits, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((h_q, num_splits), dtype=torch.float32, device=q.device)
    dp = max(16, _next_pow2(d))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    _kernel()[(h_kv, num_splits)](
        q.contiguous(), latent_k.contiguous(), latent_v.contiguous(), b_k.contiguous(), b_v.contiguous(), cos, sin,
        part_out, part_lse, scale, n, chunk, num_splits, b_k.shape[1],
        G=g, GP=max(DOT_ROWS, _next_pow2(g)), D=d, DP=dp, HALF=half, HP=max(16, _next_pow2(half)),
        RK=r_k, RKP=max(16, _next_pow2(r_k)), RV=r_v, RVP=max(16, _next_pow2(r_v)), HAS_ROPE=has_rope,
        BLOCK=max(16, _next_pow2(block)), F32_DOT=_f32_dot(q.dtype))
    out = torch.empty((h_q, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((h_q,), dtype=torch.float32, device=q.device)
    _attention_kernels()[1][(h_q,)](part_out, part_lse, out, lse, D=d, DP=dp, NUM_SPLITS=num_splits,
                                    SP=_next_pow2(num_splits))
    return out, lse


def _check_method(method):
    if not isinstance(method, LoRC):
        raise TypeError(f"method must be a LoRC instance, got {type(method).__name__}")


@register_kernel("lorc", "triton")
def lorc(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract on LoRC's Method view (``k``/``v``: the rebuilt cache): dense attention over
    it. ``decode_latent`` is the decode from the latents."""
    _check_method(method)
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    out, _ = dense_decode(qt, kt, vt, scale=scale)
    return to_numpy(out), [np.arange(kt.shape[1]) for _ in range(qt.shape[0])]


def decode_latent(method, q, latent_k, latent_v, b_k, b_v, positions=None, *, scale=None):
    """The latent contract of the LoRC suite: ``(out, lse)`` as NumPy, with the method's ``rope_base``."""
    _check_method(method)
    out, lse = lorc_attention(*(to_torch(x, name) for x, name in ((q, "q"), (latent_k, "latent_k"),
                                                               (latent_v, "latent_v"), (b_k, "b_k"), (b_v, "b_v"))),
                              positions, rope_base=method.rope_base, scale=scale)
    return to_numpy(out), to_numpy(lse)


lorc.decode_latent = decode_latent
