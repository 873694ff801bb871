"""LoRC decode on the CPU in Numba (see ``oracle/lorc.py``): rebuild K and V from the cached low-rank
latents, rotate the keys, then the shared dense kernel.

Inputs (one dtype, float32 or float64): ``q [H_q, d]`` (already rotated), the cache's latents
``latent_k [n, r_k]`` and ``latent_v [n, r_v]`` (one row per token, shared by every KV head), the
up-projections ``b_k [r_k, H_kv * d]`` and ``b_v [r_v, H_kv * d]`` (weights), and the keys' RoPE
``positions [n]``. Keys are ``rope(latent_k @ b_k)``, values ``latent_v @ b_v``, reshaped to
``[H_kv, n, d]``; the rebuild is done in float64 and rounded once to q's dtype (the values a GPU kernel
rebuilding into registers of that dtype would hold), then attended by ``attention.dense_attention``.

No absorbed form: RoPE is applied after the key rebuild, so ``b_k`` cannot be folded into the query
(the oracle's convention); ``b_v`` could be folded into the output projection, which changes where
the arithmetic happens, not the bytes read (the latents). RoPE is ``core.rope_apply`` (rotate-half),
the one implementation the oracle uses.
"""
from __future__ import annotations

import numpy as np

from ...oracle import core
from ...oracle.lorc import LoRC
from ...registry import register_kernel
from .attention import FLOAT_DTYPES, dense_attention


def _check(name, x, ndim, dtype):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES or (dtype is not None and x.dtype != dtype):
        raise TypeError(f"{name} must be float32 or float64 like q ({dtype}), got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x


def rebuild(latent_k, latent_v, b_k, b_v, h_kv: int, positions=None, *, rope_base: float = 10000.0,
            dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """``(k, v)`` ``[H_kv, n, d]`` rebuilt in float64 (keys rotated at ``positions`` if given), rounded to ``dtype``."""
    n = latent_k.shape[0]
    d = b_k.shape[1] // h_kv
    k = (latent_k.astype(np.float64) @ b_k.astype(np.float64)).reshape(n, h_kv, d).transpose(1, 0, 2)
    v = (latent_v.astype(np.float64) @ b_v.astype(np.float64)).reshape(n, h_kv, d).transpose(1, 0, 2)
    if positions is not None:
        k = core.rope_apply(k, positions, base=rope_base)
    return np.ascontiguousarray(k, dtype), np.ascontiguousarray(v, dtype)


def lorc_attention(q, latent_k, latent_v, b_k, b_v, positions=None, *, rope_base: float = 10000.0, scale=None):
    """Decode attention over a LoRC cache (module doc); returns ``(out [H_q, d], lse [H_q])`` in q's dtype."""
    q = _check("q", q, 2, None)
    dt = q.dtype
    latent_k = _check("latent_k", latent_k, 2, dt)
    latent_v = _check("latent_v", latent_v, 2, dt)
    b_k = _check("b_k", b_k, 2, dt)
    b_v = _check("b_v", b_v, 2, dt)
    h_q, d = q.shape
    n = latent_k.shape[0]
    if latent_v.shape[0] != n or b_k.shape[0] != latent_k.shape[1] or b_v.shape[0] != latent_v.shape[1]:
        raise ValueError(f"need latent_k [n, r_k], latent_v [n, r_v], b_k [r_k, H_kv*d], b_v [r_v, H_kv*d]; got "
                         f"{latent_k.shape}, {latent_v.shape}, {b_k.shape}, {b_v.shape}")
    if b_k.shape[1] != b_v.shape[1] or b_k.shape[1] % d or not b_k.shape[1] or h_q % (b_k.shape[1] // d):
        raise ValueError(f"b_k and b_v must have H_kv * d columns (d={d}, H_q={h_q} divisible by H_kv), got "
                         f"{b_k.shape[1]} and {b_v.shape[1]}")
    if positions is not None:
        positions = core.check_rope_positions(positions)
        if positions.shape != (n,):
            raise ValueError(f"positions must have shape ({n},), got {positions.shape}")
    k, v = rebuild(latent_k, latent_v, b_k, b_v, b_k.shape[1] // d, positions, rope_base=rope_base, dtype=dt)
    return dense_attention(q, k, v, scale=scale)


@register_kernel("lorc", "numba")
def lorc(method: LoRC, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract on LoRC's Method view (``LoRC.step``: ``k``/``v`` are the rebuilt cache):
    dense attention over it. Returns ``(out, indices)`` (every token). ``lorc_attention`` is the
    decode from the latents."""
    if not isinstance(method, LoRC):
        raise TypeError(f"method must be a LoRC instance, got {type(method).__name__}")
    out, _ = dense_attention(q, k, v, scale=scale)
    return out, np.broadcast_to(np.arange(k.shape[1]), (q.shape[0], k.shape[1]))


def lorc_decode_latent(method: LoRC, q, latent_k, latent_v, b_k, b_v, positions=None, *, scale=None):
    """The latent contract the LoRC suite checks beside the step (``property_tests/suites_structural.py``):
    ``lorc_attention`` with the method's ``rope_base``; returns ``(out, lse)``."""
    if not isinstance(method, LoRC):
        raise TypeError(f"method must be a LoRC instance, got {type(method).__name__}")
    return lorc_attention(q, latent_k, latent_v, b_k, b_v, positions, rope_base=method.rope_base, scale=scale)


lorc.decode_latent = lorc_decode_latent
