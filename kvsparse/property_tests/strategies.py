"""Hypothesis strategies for decode-step inputs (public API).

Arrays are generated from a drawn seed with NumPy (fast, and a failing example is reproduced
exactly by its shapes, family and seed); hypothesis shrinks shapes and families. Families:

* ``gaussian``          standard normal q, k, v.
* ``near_ties``         keys drawn from a few prototypes, some identical and some differing by
                        ~1e-12: top-k boundaries full of exact and near ties.
* ``huge_logits``       q scaled so the largest |logit| is up to 1e4 (softmax is one-hot-ish;
                        a kernel without max subtraction overflows).
* ``outlier_channels``  a few channels 30-100x larger in q and k (as in real LLM keys).
* ``heavy_tails``       Student-t (3 dof) values.
* ``sink_and_local``    queries share a direction; token 0 (strongly) and the last 8 tokens align with
                        it (attention sink and locality).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from ..oracle import core

FAMILIES = ("gaussian", "near_ties", "huge_logits", "outlier_channels", "heavy_tails", "sink_and_local")
HEAD_DIMS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class DecodeInput:
    """One decode step: ``q [H_q, d]``, ``k``/``v`` ``[H_kv, n, d]`` (float64), and how it was made."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    family: str
    seed: int

    @property
    def shapes(self) -> core.DecodeShapes:
        return core.DecodeShapes(self.q.shape[0], self.k.shape[0], self.k.shape[1], self.q.shape[1])

    def __repr__(self) -> str:
        s = self.shapes
        return (f"DecodeInput(h_q={s.h_q}, h_kv={s.h_kv}, n={s.n}, d={s.d}, family={self.family!r}, "
                f"seed={self.seed})")

    def _repr_pretty_(self, printer, cycle):
        # Hypothesis prints a falsifying dataclass field by field (arrays in full, tens of kB for a
        # trace input); the short repr names everything needed to rebuild it.
        printer.text(repr(self))


def make_decode_input(h_q: int, h_kv: int, n: int, d: int, family: str = "gaussian", seed: int = 0,
                      *, logit_scale: float | None = None) -> DecodeInput:
    """Deterministic construction behind ``decode_inputs``: same arguments, same arrays."""
    core.group_size(h_q, h_kv)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((h_q, d))
    k = rng.standard_normal((h_kv, n, d))
    v = rng.standard_normal((h_kv, n, d))
    if family == "near_ties" and n:
        protos = rng.standard_normal((h_kv, max(1, min(4, n)), d))
        pick = rng.integers(0, protos.shape[1], size=(h_kv, n))
        k = np.take_along_axis(protos, pick[..., None], axis=1)
        k = k + rng.choice([0.0, 1e-12], size=(h_kv, n, 1))
    elif family == "huge_logits" and n:
        target = logit_scale if logit_scale is not None else float(10 ** rng.uniform(1, 4))
        peak = np.abs(core.logits(q, k)).max()
        q = q * (target / max(peak, 1e-300))
    elif family == "outlier_channels":
        ch = rng.choice(d, size=max(1, d // 16), replace=False)
        boost = rng.uniform(30, 100, size=ch.size)
        q[:, ch] *= boost
        k[:, :, ch] *= boost
    elif family == "heavy_tails":
        q, k, v = (rng.standard_t(3, size=x.shape) for x in (q, k, v))
    elif family == "sink_and_local" and n:
        # a direction every query shares (as real queries do); token 0 and the last tokens align with it
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        q += 2.0 * u
        k[:, 0] += 3.0 * np.sqrt(d) * u
        k[:, n - min(n, 8):] += 1.5 * np.sqrt(d) * u
    return DecodeInput(q, k, v, family, seed)


@st.composite
def decode_inputs(draw, *, h_kv=None, group=None, n=None, d=None, families=FAMILIES,
                  min_n: int = 1, max_n: int = 300, max_h_kv: int = 4, max_group: int = 4,
                  head_dims=HEAD_DIMS) -> DecodeInput:
    """Decode-step inputs. Any of ``h_kv``, ``group``, ``n``, ``d`` may be fixed (an int) or a strategy."""
    def pick(fixed, default):
        if fixed is None:
            return draw(default)
        return draw(fixed) if isinstance(fixed, st.SearchStrategy) else fixed
    h_kv_ = pick(h_kv, st.integers(1, max_h_kv))
    g_ = pick(group, st.integers(1, max_group))
    n_ = pick(n, st.integers(min_n, max_n))
    d_ = pick(d, st.sampled_from(head_dims))
    family = draw(st.sampled_from(families))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_decode_input(h_kv_ * g_, h_kv_, n_, d_, family, seed)


def budgets(n: int, *, extra=()) -> st.SearchStrategy[int]:
    """Token budgets for an ``n``-token cache, with the edge values always in reach."""
    edges = sorted({b for b in (1, 2, n - 1, n, n + 1, 2 * n, *extra) if b >= 1})
    return st.one_of(st.sampled_from(edges), st.integers(1, max(1, 2 * n)))


def index_sets(n: int, h: int) -> st.SearchStrategy[list[np.ndarray]]:
    """One sorted unique index set per head (possibly empty)."""
    one = st.sets(st.integers(0, max(n - 1, 0)), max_size=n).map(lambda s: np.array(sorted(s), dtype=np.int64))
    return st.lists(one, min_size=h, max_size=h) if n else st.just([np.zeros(0, np.int64)] * h)
