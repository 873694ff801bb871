"""The tolerance rule for kernels (FlashAttention's): a kernel in a low precision may differ from the
float64 oracle by at most a small multiple of the error that the *same computation done naively
in that precision* has against the oracle.

The naive computation mirrors what PyTorch does on a GPU for ``softmax(q K^T * scale) V`` in a
low-precision dtype: inputs rounded to the dtype; each matmul accumulated in float32 and its
result rounded to the dtype; the softmax computed in float32 and rounded to the dtype.
The oracle it is compared with runs in float64 on the *rounded* inputs (the kernel sees those too),
so input rounding is not counted against anyone.

    tolerance = multiple * max|naive - oracle| + eps(dtype) * max|v|

The second term is one rounding of the output: it keeps the bound meaningful when the naive error
happens to be 0 (n = 1, or float64).
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


def naive_attention(q, k, v, dtype: str, *, mask=None, scale: float | None = None) -> np.ndarray:
    """Attention done naively in ``dtype`` (see module doc); ``mask [H_q, n]`` limits the keys."""
    q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
    qr, kr, vr = (round_to(x, dtype) for x in (q, k, v))
    s32 = core.logits(qr.astype(np.float32).astype(np.float64), kr, scale).astype(np.float32)
    s = round_to(s32, dtype)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    p = round_to(core.softmax(s.astype(np.float32).astype(np.float64)).astype(np.float32), dtype)
    out32 = np.einsum("hgn,hnd->hgd", p.reshape(sh.h_kv, sh.group, sh.n).astype(np.float32),
                      vr.astype(np.float32)).reshape(sh.h_q, sh.d)
    return round_to(out32, dtype)


def reference_on_rounded(q, k, v, dtype: str, *, mask=None, scale: float | None = None) -> np.ndarray:
    """The float64 oracle on inputs rounded to ``dtype``."""
    qr, kr, vr = (round_to(core.as_float64(x, name), dtype) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    if mask is None:
        return core.attend_dense(qr, kr, vr, scale=scale)
    return core.attend_mask(qr, kr, vr, np.asarray(mask, dtype=bool), scale=scale)


def attention_tolerance(q, k, v, dtype: str, *, mask=None, scale: float | None = None,
                        multiple: float = DEFAULT_MULTIPLE) -> float:
    """Largest max-abs error allowed for a ``dtype`` kernel computing this attention."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1 (a kernel may not be held to better than naive), got {multiple}")
    ref = reference_on_rounded(q, k, v, dtype, mask=mask, scale=scale)
    naive = naive_attention(q, k, v, dtype, mask=mask, scale=scale)
    vmax = float(np.max(np.abs(round_to(core.as_float64(v, "v"), dtype)), initial=0.0))
    return multiple * float(np.max(np.abs(naive - ref), initial=0.0)) + dtype_eps(dtype) * vmax


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
