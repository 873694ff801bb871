"""The one place where attention math lives, in float64.

Every oracle, kernel check, cost model and test uses these functions; nothing else re-implements
softmax, the log-sum-exp merge, the top-k tie rule, budget arithmetic, RoPE or pooling.

Conventions (all explicit, all tested):

* Shapes of one decode step of one sequence: ``q`` is ``[H_q, d]``; the cache ``k``, ``v`` is
  ``[H_kv, n, d]``. ``H_q % H_kv == 0`` and ``G = H_q // H_kv``.
* GQA grouping is *consecutive*: query head ``h`` reads KV head ``h // G`` (what HF's
  ``repeat_kv`` does). MHA is ``G = 1``, MQA is ``H_kv = 1``.
* Logits are ``q . k * scale`` with ``scale = 1/sqrt(d)`` unless given.
* An empty set of keys has output 0 and log-sum-exp ``-inf``: it carries weight 0 in a merge, never NaN.
* Top-k tie rule: higher score first; among equal scores the lower token index wins.
* Budgets from ratios are ``floor(n * ratio)`` computed exactly on rationals.
* RoPE is the rotate-half ("NeoX"/HF Llama) layout by default; the interleaved ("GPT-J") layout
  is a parameter. Positions are always passed explicitly.
* Pooling is centred with padding ``kernel // 2`` on each side: average pooling divides by the
  kernel size (zero padding counts, as ``avg_pool1d(count_include_pad=True)``); max pooling pads
  with ``-inf``. The kernel size must be odd; kernel 1 is the identity.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import Sequence

import numpy as np

FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------

def as_float64(x, name: str, *, ndim: int | None = None, allow_nonfinite: bool = False,
               cast: bool = True) -> np.ndarray:
    """Return ``x`` as a float64 NumPy array, or raise naming ``name``.

    Accepts NumPy arrays of float16 / bfloat16 (ml_dtypes) / float32 / float64 and torch tensors of
    those dtypes (converted at the boundary). ``cast=False`` validates a NumPy array and returns it in
    its own dtype (for code that converts to float64 piece by piece). Integer, boolean, complex and object inputs are a
    ``TypeError``; a wrong number of dimensions or a NaN/inf value is a ``ValueError``.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, converted at the boundary
        dtype_name = str(x.dtype).replace("torch.", "")
        if dtype_name not in FLOAT_DTYPE_NAMES:
            raise TypeError(f"{name} must be a floating-point tensor ({', '.join(FLOAT_DTYPE_NAMES)}), got {x.dtype}")
        x = x.detach().cpu().double().numpy()
    elif not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple)) or (np.isscalar(x) and not isinstance(x, (str, bytes))):
            x = np.asarray(x)
            if x.dtype.kind in "iu":
                x = x.astype(np.float64)
        else:
            raise TypeError(f"{name} must be a NumPy array or torch tensor, got {type(x).__name__}")
    if x.dtype.name not in FLOAT_DTYPE_NAMES:
        raise TypeError(f"{name} must be a floating-point array ({', '.join(FLOAT_DTYPE_NAMES)}), got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    out = np.asarray(x, dtype=np.float64) if cast else x     # cast=False: validate only (no float64 copy)
    if not allow_nonfinite and not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        raise ValueError(f"{name} contains a non-finite value (NaN or inf) at index {tuple(int(i) for i in bad)}")
    return out


def check_positive_int(value, name: str, *, allow_zero: bool = False) -> int:
    """An integer ``> 0`` (or ``>= 0`` with ``allow_zero``); bools and floats are a ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


@dataclass(frozen=True)
class DecodeShapes:
    h_q: int
    h_kv: int
    n: int
    d: int

    @property
    def group(self) -> int:
        return self.h_q // self.h_kv


def check_decode_inputs(q, k, v, *, scale: float | None = None, cast: bool = True):
    """Validate one decode step's ``q [H_q, d]``, ``k [H_kv, n, d]``, ``v [H_kv, n, d]``.

    Returns ``(q, k, v, shapes)`` with float64 arrays (``cast=False``: in their own dtypes, validated).
    ``n = 0`` is allowed (an empty cache).
    """
    q = as_float64(q, "q", ndim=2, cast=cast)
    k = as_float64(k, "k", ndim=3, cast=cast)
    v = as_float64(v, "v", ndim=3, cast=cast)
    h_q, d = q.shape
    h_kv, n, dk = k.shape
    if h_q == 0 or d == 0:
        raise ValueError(f"q must have at least one head and one channel, got shape {q.shape}")
    if h_kv == 0:
        raise ValueError(f"k must have at least one KV head, got shape {k.shape}")
    if dk != d:
        raise ValueError(f"k's head dim {dk} must equal q's head dim {d} (k shape {k.shape}, q shape {q.shape})")
    if v.shape != k.shape:
        raise ValueError(f"v must have the same shape as k {k.shape}, got {v.shape}")
    if h_q % h_kv:
        raise ValueError(f"H_q={h_q} (q.shape[0]) must be divisible by H_kv={h_kv} (k.shape[0])")
    check_scale(scale)
    return q, k, v, DecodeShapes(h_q, h_kv, n, d)


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------

def group_size(h_q: int, h_kv: int) -> int:
    """``G = H_q / H_kv``; raises if it is not an integer."""
    check_positive_int(h_q, "h_q")
    check_positive_int(h_kv, "h_kv")
    if h_q % h_kv:
        raise ValueError(f"h_q={h_q} must be divisible by h_kv={h_kv}")
    return h_q // h_kv


def kv_head_of(h_q: int, h_kv: int) -> np.ndarray:
    """For each query head, the KV head it reads (consecutive grouping: ``h // G``)."""
    return np.arange(h_q) // group_size(h_q, h_kv)


def expand_kv(x: np.ndarray, h_q: int) -> np.ndarray:
    """``[H_kv, ...] -> [H_q, ...]``: each KV head repeated for the G query heads of its group."""
    return np.repeat(x, group_size(h_q, x.shape[0]), axis=0)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def logits(q: np.ndarray, k: np.ndarray, scale: float | None = None) -> np.ndarray:
    """``[H_q, n]`` scaled dot products of every query head with every key of its KV head."""
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    g = group_size(h_q, h_kv)
    s = default_scale(d) if scale is None else scale
    grouped = np.einsum("hgd,hnd->hgn", q.reshape(h_kv, g, d), k)
    return grouped.reshape(h_q, n) * s


def log_sum_exp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log(sum(exp(x)))`` along ``axis``; ``-inf`` for an empty or all ``-inf`` slice."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[axis] == 0:
        return np.full(np.delete(np.array(x.shape), axis if axis >= 0 else x.ndim + axis), -np.inf)
    m = np.max(x, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m_safe), axis=axis, keepdims=True)) + m_safe
    return np.squeeze(out, axis=axis)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis``; an all ``-inf`` (fully masked) slice gives zeros, not NaN."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True) if x.shape[axis] else np.zeros_like(x)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m_safe)
    total = np.sum(e, axis=axis, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


@dataclass(frozen=True)
class Partial:
    """Attention over a part of the keys: normalised output ``[H_q, d]`` and its log-sum-exp ``[H_q]``.

    ``lse`` is ``log sum_i w_i exp(logit_i)`` over the part (``w_i = 1`` unless weighted); an empty
    part has ``out = 0`` and ``lse = -inf``.
    """

    out: np.ndarray
    lse: np.ndarray


def attend_weighted_logits(s: np.ndarray, v_rows: np.ndarray, weights: np.ndarray | None = None) -> Partial:
    """Attention of ONE head given its logits ``s [m]`` and value rows ``v_rows [m, d]``.

    With ``weights`` (e.g. Horvitz-Thompson factors) each term ``exp(s_i)`` is multiplied by ``w_i``.
    Returns a Partial with ``out [d]`` and scalar ``lse``.
    """
    d = v_rows.shape[-1]
    if s.shape[0] == 0:
        return Partial(np.zeros(d), np.array(-np.inf))
    if weights is None:
        log_w = s
    else:
        with np.errstate(divide="ignore"):
            log_w = s + np.log(weights)
    lse = log_sum_exp(log_w)
    if not np.isfinite(lse):
        return Partial(np.zeros(d), np.array(-np.inf))
    p = np.exp(log_w - lse)
    return Partial(p @ v_rows, np.array(lse))


def attend_dense(q, k, v, *, scale: float | None = None) -> np.ndarray:
    """Exact decode attention over all ``n`` tokens: ``softmax(q K^T * scale) V`` per query head."""
    return attend_dense_partial(q, k, v, scale=scale).out


def attend_dense_partial(q, k, v, *, scale: float | None = None) -> Partial:
    # one KV head at a time: low-precision caches are converted to float64 one head at a time, so the
    # working memory is 1/H_kv of a float64 copy of the cache
    q, k, v, sh = check_decode_inputs(q, k, v, scale=scale, cast=False)
    q = np.asarray(q, dtype=np.float64)
    g = sh.group
    out = np.empty((sh.h_q, sh.d))
    lse = np.empty(sh.h_q)
    convert = k.dtype != np.float64
    kbuf = np.empty((1, sh.n, sh.d)) if convert else None
    vbuf = np.empty((sh.n, sh.d)) if convert else None
    for j in range(sh.h_kv):
        kj = np.copyto(kbuf[0], k[j]) or kbuf if convert else k[j:j + 1]
        vj = np.copyto(vbuf, v[j]) or vbuf if convert else v[j]
        s = logits(q[j * g:(j + 1) * g], kj, scale if scale is not None else default_scale(sh.d))
        lse[j * g:(j + 1) * g] = log_sum_exp(s, axis=-1)
        out[j * g:(j + 1) * g] = np.einsum("gn,nd->gd", softmax(s, axis=-1), vj)   # einsum: no BLAS threads
    return Partial(out, lse)


def attend_mask(q, k, v, mask, *, scale: float | None = None) -> np.ndarray:
    """Attention where query head ``h`` sees token ``i`` iff ``mask[h, i]`` (``[H_q, n]`` bool)."""
    return attend_mask_partial(q, k, v, mask, scale=scale).out


def attend_mask_partial(q, k, v, mask, *, scale: float | None = None) -> Partial:
    q, k, v, sh = check_decode_inputs(q, k, v, scale=scale)
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    if mask.shape != (sh.h_q, sh.n):
        raise ValueError(f"mask must have shape (H_q, n) = {(sh.h_q, sh.n)}, got {mask.shape}")
    s = np.where(mask, logits(q, k, scale), -np.inf)
    lse = log_sum_exp(s, axis=-1)
    p = softmax(s, axis=-1)
    out = np.einsum("hgn,hnd->hgd", p.reshape(sh.h_kv, sh.group, sh.n), v).reshape(sh.h_q, sh.d)
    return Partial(out, lse)


def attend_indices(q, k, v, indices: Sequence, weights: Sequence | None = None, *,
                   scale: float | None = None) -> np.ndarray:
    """Attention of query head ``h`` over the tokens ``indices[h]`` only (optionally weighted)."""
    return attend_indices_partial(q, k, v, indices, weights, scale=scale).out


def attend_indices_partial(q, k, v, indices: Sequence, weights: Sequence | None = None, *,
                           scale: float | None = None) -> Partial:
    """Gather-then-attend per query head. ``indices[h]`` must be unique ints in ``[0, n)``.

    ``weights[h]`` (same length as ``indices[h]``, non-negative) multiplies each ``exp(logit)``: this is
    how estimators (vAttention's Horvitz-Thompson factors) are expressed.
    """
    q, k, v, sh = check_decode_inputs(q, k, v, scale=scale)
    if weights is not None:
        # indices may come in any order: carry each weight with its index before they are sorted
        if len(weights) != len(indices):
            raise ValueError(f"weights must have one array per head ({len(indices)}), got {len(weights)}")
        orders = [np.argsort(np.asarray(ix), kind="stable") for ix in indices]
        indices = [np.asarray(ix)[o] for ix, o in zip(indices, orders)]
        weights = [np.asarray(w)[o] if np.asarray(w).shape == o.shape else w for w, o in zip(weights, orders)]
    idx = check_index_sets(indices, sh.h_q, sh.n, "indices")
    w = None if weights is None else check_weights(weights, idx, "weights")
    s_scale = default_scale(sh.d) if scale is None else scale
    kv = kv_head_of(sh.h_q, sh.h_kv)
    outs = np.zeros((sh.h_q, sh.d))
    lses = np.full(sh.h_q, -np.inf)
    for h in range(sh.h_q):
        rows = idx[h]
        s = (k[kv[h], rows] @ q[h]) * s_scale
        part = attend_weighted_logits(s, v[kv[h], rows], None if w is None else w[h])
        outs[h], lses[h] = part.out, part.lse
    return Partial(outs, lses)


def merge_partials(parts: Iterable[Partial]) -> Partial:
    """Log-sum-exp merge of attentions over DISJOINT parts of the keys.

    ``out = sum_j exp(lse_j - lse) out_j`` with ``lse = logsumexp_j lse_j``. An empty part
    (``lse = -inf``) has weight exactly 0; if every part is empty the result is empty (0, -inf).
    The merge equals attention over the union only when the parts are disjoint: that is the caller's
    contract (see ``check_disjoint``).
    """
    parts = check_partials(parts)
    lses = np.stack([p.lse for p in parts])   # [P, ...]
    outs = np.stack([p.out for p in parts])   # [P, ..., d]
    total = log_sum_exp(lses, axis=0)
    safe_total = np.where(np.isfinite(total), total, 0.0)
    with np.errstate(invalid="ignore"):
        w = np.where(np.isfinite(lses), np.exp(lses - safe_total), 0.0)
    out = np.sum(w[..., None] * outs, axis=0)
    return Partial(out, total)


def check_partials(parts, name: str = "parts") -> list[Partial]:
    """Validate partial attentions for a merge: float64 copies, or an error naming ``parts[j]``.

    Every part needs an ``out [..., d]`` (finite) and an ``lse [...]`` (``-inf`` allowed: an empty part;
    NaN and ``+inf`` are not), with the same shapes in every part.
    """
    if isinstance(parts, Partial) or not isinstance(parts, Iterable) or isinstance(parts, (str, bytes)):
        raise TypeError(f"{name} must be an iterable of Partial, got {type(parts).__name__}")
    parts = list(parts)
    if not parts:
        raise ValueError(f"{name} must contain at least one Partial")
    checked = []
    for j, p in enumerate(parts):
        if not (hasattr(p, "out") and hasattr(p, "lse")):
            raise TypeError(f"{name}[{j}] must be a Partial (with .out and .lse), got {type(p).__name__}")
        out = as_float64(p.out, f"{name}[{j}].out")
        lse = as_float64(p.lse, f"{name}[{j}].lse", allow_nonfinite=True)
        if np.isnan(lse).any() or (lse == np.inf).any():
            raise ValueError(f"{name}[{j}].lse must be finite or -inf (an empty part), got NaN or +inf")
        if out.ndim < 1 or out.shape[:-1] != lse.shape:
            raise ValueError(f"{name}[{j}].out must have shape lse.shape + (d,) = {lse.shape} + (d,), "
                             f"got out {out.shape}")
        if j and (out.shape != checked[0].out.shape):
            raise ValueError(f"{name}[{j}].out must have the shape of {name}[0].out {checked[0].out.shape}, "
                             f"got {out.shape}")
        checked.append(Partial(out, lse))
    return checked


def check_disjoint(index_sets: Sequence[Sequence[int]], name: str = "index sets") -> None:
    """Raise ``ValueError`` if two of the given index sets share a token."""
    seen: set[int] = set()
    for j, s in enumerate(index_sets):
        s = set(int(i) for i in np.asarray(s).ravel())
        both = seen & s
        if both:
            raise ValueError(f"{name} must be disjoint for an exact log-sum-exp merge; part {j} repeats tokens {sorted(both)[:5]}")
        seen |= s


# --------------------------------------------------------------------------------------------
# index sets
# --------------------------------------------------------------------------------------------

def check_index_set(ix, n: int, name: str) -> np.ndarray:
    """One head's index set as a sorted, unique int64 array in ``[0, n)``, or a clear error."""
    arr = np.asarray(ix)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"{name} must lie in [0, {n}), got values in [{arr.min()}, {arr.max()}]")
    out = np.unique(arr)
    if out.size != arr.size:
        raise ValueError(f"{name} contains duplicate indices")
    return out


def check_index_sets(indices: Sequence, h: int, n: int, name: str = "indices") -> list[np.ndarray]:
    if isinstance(indices, np.ndarray) and indices.ndim == 2:
        indices = list(indices)
    if len(indices) != h:
        raise ValueError(f"{name} must have one index set per query head ({h}), got {len(indices)}")
    return [check_index_set(ix, n, f"{name}[{i}]") for i, ix in enumerate(indices)]


def check_weights(weights: Sequence, idx: Sequence[np.ndarray], name: str = "weights") -> list[np.ndarray]:
    if len(weights) != len(idx):
        raise ValueError(f"{name} must have one array per head ({len(idx)}), got {len(weights)}")
    out = []
    for h, (w, ix) in enumerate(zip(weights, idx)):
        w = as_float64(np.asarray(w, dtype=np.float64) if not hasattr(w, "dtype") else w, f"{name}[{h}]", ndim=1)
        if w.shape[0] != ix.shape[0]:
            raise ValueError(f"{name}[{h}] must have one weight per index ({ix.shape[0]}), got {w.shape[0]}")
        if (w < 0).any():
            raise ValueError(f"{name}[{h}] must be non-negative")
        out.append(w)
    return out


def topk_indices(scores, k: int, *, axis: int = -1) -> np.ndarray:
    """THE tie rule: the ``k`` highest scores, higher first, the lower index winning ties.

    Returns the chosen indices in that rank order (``[..., k]``); sort them for a Selection.
    ``k`` is clipped to the length of ``axis``. NaN scores are an error; ``-inf`` ranks last.
    """
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("scores must not contain NaN")
    k = check_positive_int(k, "k", allow_zero=True)
    s = np.moveaxis(s, axis, -1)
    n = s.shape[-1]
    k = min(k, n)
    # a stable sort of -score keeps index order among equal scores: lower index first
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    return np.moveaxis(order, -1, axis)


def topk_mask(scores, k: int) -> np.ndarray:
    """Boolean mask (same shape as ``scores``, last axis) of ``topk_indices``."""
    s = np.asarray(scores, dtype=np.float64)
    idx = topk_indices(s, k)
    mask = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


# --------------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------------

def exact_ratio(ratio) -> Fraction:
    """A ratio as an exact rational: floats are read by their shortest decimal repr (0.1 -> 1/10)."""
    if isinstance(ratio, bool):
        raise TypeError("ratio must be a number, got bool")
    if isinstance(ratio, Fraction):
        r = ratio
    elif isinstance(ratio, Integral):
        r = Fraction(int(ratio))
    elif isinstance(ratio, Real):
        if not math.isfinite(ratio):
            raise ValueError(f"ratio must be finite, got {ratio!r}")
        r = Fraction(repr(float(ratio)))
    elif isinstance(ratio, str):
        try:
            r = Fraction(ratio)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"ratio must be a number, Fraction or decimal string such as '0.25' or '1/4', "
                             f"got {ratio!r} ({exc})") from None
    else:
        raise TypeError(f"ratio must be a number, Fraction or decimal string, got {type(ratio).__name__}")
    if r < 0 or r > 1:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    return r


def budget_from_ratio(n: int, ratio, *, minimum: int = 0) -> int:
    """Token budget ``max(minimum, floor(n * ratio))``, exact: no float floor surprises.

    ``ratio`` may be a float (read as its decimal repr, so ``0.1`` is exactly 1/10), a ``Fraction``
    or a decimal string. ``budget_from_ratio(1000, 0.07) == 70`` although ``1000 * 0.07 = 70.00000000000001``
    and ``int(0.29 * 100) == 28``.
    """
    n = check_positive_int(n, "n", allow_zero=True)
    minimum = check_positive_int(minimum, "minimum", allow_zero=True)
    r = exact_ratio(ratio)
    return min(n, max(minimum, (n * r.numerator) // r.denominator))


def budget_from_basis_points(n: int, bp: int) -> int:
    """``floor(n * bp / 10000)`` for an integer number of basis points."""
    bp = check_positive_int(bp, "bp", allow_zero=True)
    if bp > 10_000:
        raise ValueError(f"bp must be <= 10000, got {bp}")
    return budget_from_ratio(n, Fraction(bp, 10_000))


def check_budget(budget, name: str = "budget") -> int:
    """A token budget: a positive integer."""
    return check_positive_int(budget, name)


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------

def check_rope_positions(positions, name: str = "positions") -> np.ndarray:
    """RoPE positions as float64: integers or finite reals; bool/str/complex are a ``TypeError``."""
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be integers or real numbers, got dtype {pos.dtype}")
    pos = pos.astype(np.float64)
    if not np.isfinite(pos).all():
        raise ValueError(f"{name} must be finite, got a NaN or inf at index "
                         f"{tuple(int(i) for i in np.argwhere(~np.isfinite(pos))[0])}")
    return pos


def check_rope_base(base) -> float:
    """The RoPE base: a finite number ``> 0``."""
    if isinstance(base, bool) or not isinstance(base, Real):
        raise TypeError(f"base must be a real number, got {type(base).__name__} {base!r}")
    if not math.isfinite(base) or base <= 0:
        raise ValueError(f"base must be a finite number > 0, got {base!r}")
    return float(base)


def rope_angles(positions, d: int, base: float = 10000.0) -> np.ndarray:
    """``[len(positions), d/2]`` angles ``pos * base^(-2i/d)``."""
    d = check_positive_int(d, "d")
    if d % 2:
        raise ValueError(f"RoPE needs an even head dim, got d={d}")
    pos = check_rope_positions(positions)
    if pos.ndim != 1:
        raise ValueError(f"positions must be 1-D, got shape {pos.shape}")
    base = check_rope_base(base)
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    return pos[:, None] * inv_freq[None, :]


def rope_apply(x, positions, *, base: float = 10000.0, layout: str = "half") -> np.ndarray:
    """Rotate ``x [..., n, d]`` by RoPE at the given ``positions [n]``.

    ``layout="half"``: channel ``i`` pairs with ``i + d/2`` (HF Llama ``rotate_half``).
    ``layout="interleaved"``: channel ``2i`` pairs with ``2i + 1`` (GPT-J, Meta's original Llama).
    """
    x = as_float64(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must be [..., n, d], got shape {x.shape}")
    if layout not in ("half", "interleaved"):
        raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
    n, d = x.shape[-2:]
    pos = check_rope_positions(positions)
    if pos.shape != (n,):
        raise ValueError(f"positions must have shape ({n},) to match x, got {pos.shape}")
    ang = rope_angles(pos, d, base)
    cos, sin = np.cos(ang), np.sin(ang)
    if layout == "half":
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")


def rope_rerotate(x_rotated, old_positions, new_positions, *, base: float = 10000.0,
                  layout: str = "half") -> np.ndarray:
    """Move keys rotated at ``old_positions`` to ``new_positions`` (rotation by the difference)."""
    old = check_rope_positions(old_positions, "old_positions")
    new = check_rope_positions(new_positions, "new_positions")
    if old.shape != new.shape:
        raise ValueError(f"old_positions {old.shape} and new_positions {new.shape} must have the same shape")
    return rope_apply(x_rotated, new - old, base=base, layout=layout)


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------

def pool1d(x, kernel: int, mode: str = "max") -> np.ndarray:
    """Centred 1-D pooling along the last axis with stride 1 and padding ``kernel // 2``.

    ``mode="avg"`` divides each window sum by ``kernel`` (zero padding counts);
    ``mode="max"`` pads with ``-inf``. ``kernel`` must be odd; ``kernel == 1`` returns ``x``.
    """
    x = as_float64(x, "x")
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (pooled along the last), got shape {x.shape}")
    kernel = check_positive_int(kernel, "kernel")
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (centred pooling), got {kernel}")
    if mode not in ("avg", "max"):
        raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
    if kernel == 1:
        return x.copy()
    pad = kernel // 2
    widths = [(0, 0)] * (x.ndim - 1) + [(pad, pad)]
    if mode == "avg":
        padded = np.pad(x, widths, constant_values=0.0)
        windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
        return windows.sum(axis=-1) / kernel
    if mode == "max":
        padded = np.pad(x, widths, constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
        return windows.max(axis=-1)
    raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
