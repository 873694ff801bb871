"""The tolerance rule for kernels (FlashAttention's): a kernel in a low precision may differ from the
float64 oracle by at most a small multiple of the error that the *same computation done naively
in that precision* has against the oracle.

The naive computation mirrors what PyTorch does on a GPU for ``softmax(q K^T * scale) V`` in a
low-precision dtype: inputs rounded to the dtype; each matmul accumulated in float32 and its
result rounded to the dtype; the softmax computed in float32 and rounded to the dtype. A logit
that overflows the dtype (float16 beyond 65504: outlier channels, a large scale) stays float32:
the naive computation would give NaN there, and a kernel that keeps logits in float32, as
FlashAttention's do, must still be held to the rounding of everything else.
The oracle it is compared with runs in float64 on the *rounded* inputs (the kernel sees those too),
so input rounding is not counted against anyone.

    tolerance = multiple * max|naive - oracle| + eps(dtype) * max|oracle|

The second term is one rounding of the output (what even a correctly rounded result may be off): it
keeps the bound meaningful when the naive error happens to be 0 (n = 1, or float64).

On small inputs the realized naive error is one noisy sample of the *accumulation* error: a kernel
that sums in another (equally valid) order gets another sample, which can be several times larger
(seen with float32 kernels on large logits and on real traces with outlier channels). So the naive
error is taken as the larger of the realized error and the first-order scale of accumulation in the
accumulation precision ``u_acc`` (float32's; float64's for float64), per query head h and channel c:

    u_acc * ( sum_i p_i |v_ic - o_hc| (sqrt(d) a_hi + 1)  +  sqrt(n) sum_i p_i |v_ic| ),
    a_hi = scale * sum_c' |q_hc' k_ic'|

the typical (Higham & Mary's probabilistic, lambda = 1) rounding error of float32 attention: each
logit is a sum of d products (error ~ sqrt(d) u_acc a_hi), each probability is rounded once, and the
softmax denominator and the weighted sum of values are sums of n terms (relative error ~ sqrt(n) u_acc).
For float16/bfloat16 it is far below the realized error, so the rule stays FlashAttention's; it matters
for float32 kernels. Evidence that the realized error alone is too tight in float32: PyTorch's own eager
float32 attention of a tiny Llama exceeded 2x the realized naive error (tests/test_traces_capture.py),
as did a one-split Triton kernel on a 5-token input (tests/test_kernels_triton_methods.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..oracle import core

DEFAULT_MULTIPLE = 2.0
"""FlashAttention's tests allow 2x the naive same-precision error; we use the same."""


def dtype_available(name: str) -> bool:
    if name == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            return False
    return name in core.FLOAT_DTYPE_NAMES


def numpy_dtype(name: str):
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise ImportError("bfloat16 needs the ml_dtypes package (pip install ml-dtypes)") from exc
        return np.dtype(ml_dtypes.bfloat16)
    if name not in core.FLOAT_DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {core.FLOAT_DTYPE_NAMES}, got {name!r}")
    return np.dtype(name)


def dtype_eps(name: str) -> float:
    """Unit roundoff (half the spacing of 1.0) of the dtype."""
    return {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}[name]


def round_to(x, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and returned as float64."""
    return np.asarray(x, dtype=np.float64).astype(numpy_dtype(dtype)).astype(np.float64)


def _weights_and_mask(weights, mask, h_q: int, n: int):
    """``weights [H_q, n]`` (estimators: each ``exp(logit)`` is multiplied by its weight; 0 = not attended)
    checked, and the mask they imply; or ``(None, mask)``."""
    if weights is None:
        return None, mask
    w = core.as_float64(weights, "weights")
    if w.shape != (h_q, n) or (w < 0).any():
        raise ValueError(f"weights must be non-negative [H_q={h_q}, n={n}], got shape {w.shape}")
    implied = w > 0
    if mask is not None and (np.asarray(mask, dtype=bool) != implied).any():
        raise ValueError("mask must be where weights > 0 when both are given")
    return w, implied


def naive_attention(q, k, v, dtype: str, *, mask=None, scale: float | None = None, weights=None) -> np.ndarray:
    """Attention done naively in ``dtype`` (see module doc); ``mask [H_q, n]`` limits the keys.

    ``weights [H_q, n]`` (rounded to ``dtype``) multiply the float32 exponentials before normalising,
    as an estimator's kernel written naively would.
    """
    q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
    weights, mask = _weights_and_mask(weights, mask, sh.h_q, sh.n)
    qr, kr, vr = (round_to(x, dtype) for x in (q, k, v))
    s_scale = np.float32(core.default_scale(sh.d) if scale is None else scale)
    s32 = np.einsum("hgd,hnd->hgn", qr.reshape(sh.h_kv, sh.group, sh.d).astype(np.float32),
                    kr.astype(np.float32)).reshape(sh.h_q, sh.n) * s_scale    # float32 accumulation
    with np.errstate(over="ignore"):
        s = round_to(s32, dtype)
    # a logit beyond the dtype's range: the naive computation has no value there (inf - inf = NaN in
    # its softmax); keep the float32 logit so the rule measures the naive rounding everywhere else
    s = np.where(np.isfinite(s) | ~np.isfinite(s32), s, s32)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    if weights is None:
        p = round_to(core.softmax(s.astype(np.float32).astype(np.float64)).astype(np.float32), dtype)
    else:
        s32 = s.astype(np.float32)
        top = np.max(s32, axis=1, keepdims=True, initial=-np.inf)
        with np.errstate(invalid="ignore"):
            e = np.exp(s32 - np.where(np.isfinite(top), top, 0)) * round_to(weights, dtype).astype(np.float32)
        tot = e.sum(axis=1, keepdims=True, dtype=np.float32)
        p = round_to(np.divide(e, tot, out=np.zeros_like(e), where=tot > 0), dtype)
    out32 = np.einsum("hgn,hnd->hgd", p.reshape(sh.h_kv, sh.group, sh.n).astype(np.float32),
                      vr.astype(np.float32)).reshape(sh.h_q, sh.d)
    return round_to(out32, dtype)


def reference_on_rounded(q, k, v, dtype: str, *, mask=None, scale: float | None = None, weights=None) -> np.ndarray:
    """The float64 oracle on inputs rounded to ``dtype`` (weights, if any, as given)."""
    qr, kr, vr = (round_to(core.as_float64(x, name), dtype) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    if weights is not None:
        w, _ = _weights_and_mask(weights, mask, qr.shape[0], kr.shape[1])
        rows = [np.flatnonzero(wh > 0) for wh in w]
        return core.attend_indices(qr, kr, vr, rows, [wh[r] for wh, r in zip(w, rows)], scale=scale)
    if mask is None:
        return core.attend_dense(qr, kr, vr, scale=scale)
    return core.attend_mask(qr, kr, vr, np.asarray(mask, dtype=bool), scale=scale)


def attention_tolerance(q, k, v, dtype: str, *, mask=None, scale: float | None = None,
                        multiple: float = DEFAULT_MULTIPLE, weights=None) -> float:
    """Largest max-abs error allowed for a ``dtype`` kernel computing this attention.

    ``weights [H_q, n]``: an estimator's attention (``sum w_j e^{s_j} v_j / sum w_j e^{s_j}``); the rule
    is the same with the weighted probabilities.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1 (a kernel may not be held to better than naive), got {multiple}")
    ref = reference_on_rounded(q, k, v, dtype, mask=mask, scale=scale, weights=weights)
    naive = naive_attention(q, k, v, dtype, mask=mask, scale=scale, weights=weights)
    realized = float(np.max(np.abs(naive - ref), initial=0.0))
    accumulation = first_order_error(q, k, v, dtype, ref, mask=mask, scale=scale, weights=weights)
    return multiple * max(realized, accumulation) + dtype_eps(dtype) * float(np.max(np.abs(ref), initial=0.0))


def derived_cache_tolerance(q, k, v, k_naive, v_naive, dtype: str, *, mask=None, scale: float | None = None,
                            multiple: float = DEFAULT_MULTIPLE, weights=None) -> float:
    """Largest max-abs error allowed for a ``dtype`` kernel that attends over a cache it *derives* from
    its inputs: KV quantization's dequantized rows (``code * scale + zero``), LoRC's keys and values
    rebuilt from latents. ``k``/``v`` are that cache as the float64 oracle derives it (what its output
    is computed over), ``k_naive``/``v_naive`` the same cache derived naively in ``dtype`` (each
    product and sum rounded to the dtype, matmuls accumulated as ``naive_attention``'s are).

    The naive same-precision computation derives the cache in the dtype and then attends naively, so
    the rule is unchanged, with the derivation's rounding in the naive error:

        max( attention_tolerance(q, k, v),
             multiple * max|naive_attention(q, k_naive, v_naive) - oracle(q, k, v)| + eps(dtype) * max|oracle| )

    where ``oracle`` attends in float64 over the unrounded derived cache (``q`` rounded). The first
    term is the rule for a kernel that derives the cache exactly and rounds it once (its first-order
    accumulation scale covers one rounding of every logit's key and of every value); the second the
    realized error of deriving it in the dtype, as a GPU kernel dequantizing or rebuilding into registers does.
    """
    base = attention_tolerance(q, k, v, dtype, mask=mask, scale=scale, multiple=multiple, weights=weights)
    qr = round_to(core.as_float64(q, "q"), dtype)
    k = core.as_float64(k, "k")
    v = core.as_float64(v, "v")
    for name, naive_x, x in (("k_naive", k_naive, k), ("v_naive", v_naive, v)):
        if np.shape(naive_x) != x.shape:
            raise ValueError(f"{name} must have the shape of the derived cache {x.shape}, got {np.shape(naive_x)}")
    if weights is not None:
        w, _ = _weights_and_mask(weights, mask, qr.shape[0], k.shape[1])
        rows = [np.flatnonzero(wh > 0) for wh in w]
        ref = core.attend_indices(qr, k, v, rows, [wh[r] for wh, r in zip(w, rows)], scale=scale)
    elif mask is None:
        ref = core.attend_dense(qr, k, v, scale=scale)
    else:
        ref = core.attend_mask(qr, k, v, np.asarray(mask, dtype=bool), scale=scale)
    naive = naive_attention(qr, k_naive, v_naive, dtype, mask=mask, scale=scale, weights=weights)
    if not (np.isfinite(naive).all() and np.isfinite(ref).all()):
        return base
    realized = float(np.max(np.abs(naive - ref), initial=0.0))
    return max(base, multiple * realized + dtype_eps(dtype) * float(np.max(np.abs(ref), initial=0.0)))


def first_order_error(q, k, v, dtype: str, ref, *, mask=None, scale: float | None = None, weights=None) -> float:
    """Max over heads and channels of the first-order accumulation error scale (see the module doc)."""
    q, k, v, sh = core.check_decode_inputs(*(round_to(x, dtype) for x in (q, k, v)), scale=scale)
    if sh.n == 0:
        return 0.0
    weights, mask = _weights_and_mask(weights, mask, sh.h_q, sh.n)
    s = core.logits(q, k, scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    if weights is not None:      # weighted probabilities: softmax of s + log w
        with np.errstate(divide="ignore"):
            s = np.where(mask, s + np.log(np.where(mask, weights, 1.0)), -np.inf)
    p = core.softmax(s).reshape(sh.h_kv, sh.group, sh.n)
    s_scale = core.default_scale(sh.d) if scale is None else scale
    a = np.einsum("hgd,hnd->hgn", np.abs(q).reshape(sh.h_kv, sh.group, sh.d), np.abs(k)) * s_scale
    u_acc = dtype_eps("float64" if dtype == "float64" else "float32")
    o = ref.reshape(sh.h_kv, sh.group, 1, sh.d)
    spread = np.abs(v[:, None, :, :] - o)                                   # [H_kv, G, n, d]
    err = u_acc * (np.einsum("hgn,hgnd->hgd", p * (np.sqrt(sh.d) * a + 1), spread)
                   + np.sqrt(sh.n) * np.einsum("hgn,hnd->hgd", p, np.abs(v)))
    return float(err.max(initial=0.0))


@dataclass(frozen=True)
class ToleranceCheck:
    max_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "within" if self.ok else "EXCEEDS"
        return f"max |error| {self.max_error:.3e} {verdict} tolerance {self.tolerance:.3e}"


def check_attention_output(got, q, k, v, dtype: str, *, mask=None, scale: float | None = None,
                           multiple: float = DEFAULT_MULTIPLE) -> ToleranceCheck:
    """Compare a kernel's output with the oracle on the rounded inputs under the tolerance rule."""
    got = core.as_float64(got, "got", allow_nonfinite=True)
    ref = reference_on_rounded(q, k, v, dtype, mask=mask, scale=scale)
    if got.shape != ref.shape:
        raise ValueError(f"got must have shape {ref.shape}, got {got.shape}")
    err = float(np.max(np.abs(got - ref), initial=0.0)) if np.isfinite(got).all() else float("inf")
    return ToleranceCheck(err, attention_tolerance(q, k, v, dtype, mask=mask, scale=scale, multiple=multiple))
