"""LoRC (Zhang et al., arXiv 2410.03111): low-rank KV cache by truncated SVD of the K and V projection
weights, with a per-layer rank schedule that is progressive in layer sensitivity.

Per layer, ``W_k [hidden, H_kv * d] = U S V^T``; keep the top ``r`` singular triplets,
``A_k = U_r S_r [hidden, r]`` and ``B_k = V_r^T [r, H_kv * d]``. The cache stores the latent
``x A_k [n, r]`` per token (shared by every KV head) instead of ``x W_k``; keys are rebuilt as
``(x A_k) B_k`` and RoPE is applied *after* the rebuild (``rope=True``; so ``B_k`` cannot be absorbed
into the query). Values likewise with ``W_v`` (``B_v`` could be folded into ``W_o``; the oracle rebuilds
them, which is the same arithmetic). Rank ``min(hidden, H_kv * d)`` is exact (up to rounding).

Error against the full-rank cache (Eckart-Young): ``||x W - x A_r B_r||_F <= ||x||_2 * sqrt(sum_{i>r} s_i^2)``
and ``||W - A_r B_r||_2 = s_{r+1}``; both fall monotonically with ``r`` (``cache_error`` measures it).

Progressive schedule (``progressive_ranks``). The paper sets each layer's compressed dimension from the
*cumulative condition number* of the KV weights from that layer to the last one, so shallow layers,
whose errors are amplified by every later layer, are compressed less. The exact formula is not in the
sources we could read [unverified]; our assumptions, all explicit parameters:
``c_l = sum_{j >= l} log kappa(W_j)`` (log of the cumulative product of condition numbers
``kappa = s_max / s_min``), normalised ``t_l = (c_l - min c) / (max c - min c)`` (0 if all equal), and
``ratio_l = min_ratio + (max_ratio - min_ratio) * t_l``, ``rank_l = max(1, ceil(ratio_l * full_rank))``;
K and V get separate schedules. Since ``kappa >= 1``, ``c_l`` never increases with ``l``: ranks never
increase with depth.

Method view (``LoRC.step`` on generic decode inputs): ``k``/``v`` are the *rebuilt* cache; every token
is attended densely. Ranks: ``key_rank``/``value_rank`` when given, else
``budget_from_ratio(H_kv * d, key_ratio / value_ratio, minimum=1)``.

Traffic (exact, HBM): the latent rows, read once per step (shared by all heads):
``keys = n * key_rank * bits / 8``, ``values = n * value_rank * bits / 8`` (the full rank
``H_kv * d`` gives dense attention's bytes with ``share_kv_heads``). The rebuild matrices are weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .types import Layout, Selection, StepResult, Traffic


def truncated_svd(w, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``A = U_r S_r [in, r]`` and ``B = V_r^T [r, out]``: the best rank-``r`` ``A @ B``."""
    w = core.as_float64(w, "w", ndim=2)
    rank = core.check_positive_int(rank, "rank")
    if rank > min(w.shape):
        raise ValueError(f"rank must be <= min(w.shape) = {min(w.shape)}, got {rank}")
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * s[:rank], vt[:rank]


def condition_number(w) -> float:
    """``s_max / s_min`` over the ``min(w.shape)`` singular values (``inf`` if singular)."""
    s = np.linalg.svd(core.as_float64(w, "w", ndim=2), compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def cache_error(x, w, rank: int) -> float:
    """Frobenius error ``||x W - (x A_r) B_r||_F`` of the rank-``r`` cache against the full one."""
    x = core.as_float64(x, "x", ndim=2)
    a, b = truncated_svd(w, rank)
    return float(np.linalg.norm(x @ core.as_float64(w, "w") - (x @ a) @ b))


def progressive_ranks(weights: Sequence, *, min_ratio: float = 0.25, max_ratio: float = 0.75) -> list[int]:
    """Per-layer ranks for the projection ``weights[l] [hidden, out]`` (see module doc for the formula)."""
    if not 0 < min_ratio <= max_ratio <= 1:
        raise ValueError(f"need 0 < min_ratio <= max_ratio <= 1, got {min_ratio}, {max_ratio}")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one layer")
    log_kappa = np.array([math.log(condition_number(w)) for w in weights])
    if not np.isfinite(log_kappa).all():
        raise ValueError("a layer's weight is singular (infinite condition number)")
    cumulative = np.cumsum(log_kappa[::-1])[::-1]
    span = cumulative.max() - cumulative.min()
    t = (cumulative - cumulative.min()) / span if span > 0 else np.zeros_like(cumulative)
    ranks = []
    for w, tl in zip(weights, t):
        full = min(np.shape(w))
        ranks.append(int(min(full, max(1, math.ceil((min_ratio + (max_ratio - min_ratio) * tl) * full)))))
    return ranks


@dataclass(frozen=True)
class LowRankKV:
    """One layer's factors: keys ``x @ a_k @ b_k``, values ``x @ a_v @ b_v`` (``[n, H_kv * d]``)."""

    a_k: np.ndarray
    b_k: np.ndarray
    a_v: np.ndarray
    b_v: np.ndarray
    h_kv: int

    @classmethod
    def compress(cls, w_k, w_v, key_rank: int, value_rank: int, h_kv: int) -> "LowRankKV":
        w_k = core.as_float64(w_k, "w_k", ndim=2)
        w_v = core.as_float64(w_v, "w_v", ndim=2)
        if w_k.shape != w_v.shape:
            raise ValueError(f"w_k {w_k.shape} and w_v {w_v.shape} must have the same shape")
        if w_k.shape[1] % core.check_positive_int(h_kv, "h_kv"):
            raise ValueError(f"w_k's output width {w_k.shape[1]} must be H_kv={h_kv} heads of d channels")
        return cls(*truncated_svd(w_k, key_rank), *truncated_svd(w_v, value_rank), h_kv)

    @property
    def d(self) -> int:
        return self.b_k.shape[1] // self.h_kv

    def rebuild(self, x, positions=None, *, rope_base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
        """The cache ``[H_kv, n, d]`` as attention reads it; keys rotated at ``positions`` if given."""
        x = core.as_float64(x, "x", ndim=2)
        if x.shape[1] != self.a_k.shape[0]:
            raise ValueError(f"x must be [n, hidden={self.a_k.shape[0]}] to match the factors, got {x.shape}")
        n = x.shape[0]
        k = ((x @ self.a_k) @ self.b_k).reshape(n, self.h_kv, self.d).transpose(1, 0, 2)
        v = ((x @ self.a_v) @ self.b_v).reshape(n, self.h_kv, self.d).transpose(1, 0, 2)
        if positions is not None:
            k = core.rope_apply(k, positions, base=rope_base)
        return np.ascontiguousarray(k), np.ascontiguousarray(v)


@register_method
@dataclass(frozen=True)
class LoRC(Method):
    name: ClassVar[str] = "lorc"
    family: ClassVar[str] = "structural"
    summary: ClassVar[str] = "cache x·U_rS_r of truncated-SVD K/V weights; rebuild, then RoPE; per-layer progressive rank"

    key_ratio: float = 0.5
    value_ratio: float = 0.5
    key_rank: int | None = None
    value_rank: int | None = None
    rope_base: float = 10000.0

    def __post_init__(self):
        for f in ("key_ratio", "value_ratio"):
            if core.exact_ratio(getattr(self, f)) == 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)!r}")
        for f in ("key_rank", "value_rank"):
            if getattr(self, f) is not None:
                core.check_positive_int(getattr(self, f), f)

    def ranks(self, full_rank: int) -> tuple[int, int]:
        """``(key_rank, value_rank)`` for a cache whose full rank is ``full_rank`` (``H_kv * d``)."""
        def one(rank, ratio, name):
            r = core.budget_from_ratio(full_rank, ratio, minimum=1) if rank is None else rank
            if r > full_rank:
                raise ValueError(f"{name} {r} exceeds the full rank {full_rank} (H_kv * d)")
            return r
        return one(self.key_rank, self.key_ratio, "key_rank"), one(self.value_rank, self.value_ratio, "value_rank")

    def latent_traffic(self, n: int, key_rank: int, value_rank: int, layout: Layout) -> Traffic:
        bits = layout.element_bits
        for r in (key_rank, value_rank):
            if (r * bits) % 8:
                raise ValueError(f"a rank-{r} latent at {bits} bits is not a whole number of bytes")
        return Traffic({("hbm", "keys"): n * key_rank * bits // 8, ("hbm", "values"): n * value_rank * bits // 8}, layout)

    def decode(self, factors: LowRankKV, q, x, positions, *, scale: float | None = None,
               layout: Layout = Layout()) -> StepResult:
        """One step from the latent of hidden states ``x [n, hidden]`` (``q`` already rotated)."""
        if not isinstance(factors, LowRankKV):
            raise TypeError(f"factors must be LowRankKV, got {type(factors).__name__}")
        k, v = factors.rebuild(x, positions, rope_base=self.rope_base)
        out = core.attend_dense(q, k, v, scale=scale)
        n = k.shape[1]
        return StepResult(Selection.full(np.shape(q)[0], n), out,
                          self.latent_traffic(n, factors.a_k.shape[1], factors.a_v.shape[1], layout))

    def select(self, q, k, v, *, positions=None) -> Selection:
        return Selection.full(q.shape[0], k.shape[1])

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        return core.attend_dense(q, k, v, scale=scale)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        return self.latent_traffic(selection.n, *self.ranks(h_kv * d), layout)

    @classmethod
    def presets(cls) -> dict[str, "LoRC"]:
        return {"canonical": cls(), "full-rank": cls(key_ratio=1, value_ratio=1),
                "keys-only": cls(key_ratio=0.5, value_ratio=1)}


def progressive_schedule(w_k_layers: Sequence, w_v_layers: Sequence, *, min_ratio: float = 0.25,
                         max_ratio: float = 0.75) -> list[LoRC]:
    """One ``LoRC`` per layer with explicit ranks from ``progressive_ranks`` (K and V separately)."""
    if len(w_k_layers) != len(w_v_layers):
        raise ValueError(f"need one W_v per W_k, got {len(w_k_layers)} and {len(w_v_layers)}")
    rk = progressive_ranks(w_k_layers, min_ratio=min_ratio, max_ratio=max_ratio)
    rv = progressive_ranks(w_v_layers, min_ratio=min_ratio, max_ratio=max_ratio)
    return [LoRC(key_rank=a, value_rank=b) for a, b in zip(rk, rv)]
