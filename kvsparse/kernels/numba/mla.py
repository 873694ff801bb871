"""Absorbed MLA decode on the CPU in Numba (see ``oracle/mla.py`` for the shapes).

Inputs (one dtype, float32 or float64, C-contiguous): ``q_latent [H, r]`` (``w_uk``-absorbed queries),
``q_rope [H, d_R]``, ``latent [n, r]``, ``k_rope [n, d_R]``. Output ``o^L [H, r]`` and ``lse [H]``.

The latent cache is one KV head shared by all H heads: the absorbed decode is multi-query attention over
``[c; k^R]`` with values ``[c; 0]``, run by the shared dense kernel (``kernels/numba/attention.py``, one
task per KV head, each latent row loaded once for all H heads, float64 accumulation). A hand-written
split-K kernel was 20x slower than this on the 2-core CPU (490 ms vs 25 ms at n = 1024, H = 16,
r = 512, d_R = 64), so it was dropped. ``mla_decode(..., w_uv=...)`` also returns ``o_h = w_uv[h] o^L_h``.
"""
from __future__ import annotations

import math

import numpy as np

from ...registry import register_kernel
from .attention import FLOAT_DTYPES, dense_attention


def _check(name, x, ndim, dtype=None):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like q_latent, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return np.ascontiguousarray(x)


def mla_decode(q_latent, q_rope, latent, k_rope, *, scale: float, w_uv=None):
    """Absorbed MLA decode; returns ``(o_latent [H, r], lse [H])`` or, with ``w_uv [H, d_V, r]``,
    ``(o [H, d_V], o_latent, lse)``."""
    q_latent = _check("q_latent", q_latent, 2)
    dt = q_latent.dtype
    q_rope = _check("q_rope", q_rope, 2, dt)
    latent = _check("latent", latent, 2, dt)
    k_rope = _check("k_rope", k_rope, 2, dt)
    h_n, r = q_latent.shape
    n = latent.shape[0]
    if q_rope.shape[0] != h_n or latent.shape[1] != r or k_rope.shape != (n, q_rope.shape[1]):
        raise ValueError(f"shapes must be q_latent [H, r], q_rope [H, d_R], latent [n, r], k_rope [n, d_R]; got "
                         f"{q_latent.shape}, {q_rope.shape}, {latent.shape}, {k_rope.shape}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    # the absorbed form IS multi-query attention: one KV head [c; k^R] shared by all H heads, whose
    # values are its latent channels; the shared dense kernel loads each latent row once for the group
    q = np.ascontiguousarray(np.concatenate([q_latent, q_rope], axis=1))
    k = np.ascontiguousarray(np.concatenate([latent, k_rope], axis=1)[None])
    v = np.zeros_like(k)
    v[0, :, :r] = latent
    full, lse = dense_attention(q, k, v, scale=float(scale))
    out = np.ascontiguousarray(full[:, :r])
    if w_uv is None:
        return out, lse
    w_uv = np.asarray(w_uv)
    if w_uv.ndim != 3 or w_uv.shape[0] != h_n or w_uv.shape[2] != r:
        raise ValueError(f"w_uv must be [H={h_n}, d_V, r={r}], got {w_uv.shape}")
    return np.einsum("hdr,hr->hd", w_uv.astype(np.float64), out.astype(np.float64)).astype(dt), out, lse


@register_kernel("mla", "numba")
def mla(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract on MLA's absorbed view (``oracle/mla.py``): ``q [H, r + d_R]``,
    ``k = [latent; k_rope] [1, n, r + d_R]``, ``v = [latent; 0]`` (never read: the values are the
    latent rows of ``k``). Returns ``[o^L; 0] [H, r + d_R]`` and the indices (every token)."""
    if k.ndim != 3 or k.shape[0] != 1:
        raise ValueError(f"k must be the single latent head [1, n, r + d_R], got shape {k.shape}")
    d, dr = k.shape[2], method.rope_dim
    if d <= dr:
        raise ValueError(f"the view's width {d} must exceed rope_dim={dr}")
    r = d - dr
    o_lat, _ = mla_decode(q[:, :r], q[:, r:], k[0, :, :r], k[0, :, r:],
                          scale=method.default_scale if scale is None else scale)
    out = np.zeros(q.shape, q.dtype)
    out[:, :r] = o_lat
    return out, np.broadcast_to(np.arange(k.shape[1]), (q.shape[0], k.shape[1]))
