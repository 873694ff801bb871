"""Hypothesis strategies for multi-step decode sequences (public API).

A sequence is what ``kvsparse.oracle.run_decode`` takes: ``q_seq [T, H_q, d]``, ``k_seq``/``v_seq``
``[T, H_kv, d]`` (float64) and a ``prefill_len``. Keys and values come from
``strategies.make_decode_input`` (same families: ties, huge logits, outlier channels, heavy tails,
sinks and locality); the queries of successive steps are the family's query plus a fresh Gaussian
perturbation of relative size ``query_drift`` (adjacent queries are similar, as in real decoding).

Edge values (research notes, pitfall 1 and 8): ``edge_lengths(C, w)`` gives
``{C-1, C, C+1, w, w+1, 2(C-w)-1, 2(C-w)}``; ``sizes(...)`` always reaches 0 (``r = 0``, ``hh = 0``,
``S = 0``) and values ``>= T`` (``S >= T``, budgets covering the context).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from ..oracle import core
from .strategies import FAMILIES, make_decode_input


@dataclass(frozen=True)
class DecodeSequence:
    """``q_seq [T, H_q, d]``, ``k_seq``/``v_seq`` ``[T, H_kv, d]``, the prefill length, and how they were made."""

    q_seq: np.ndarray
    k_seq: np.ndarray
    v_seq: np.ndarray
    prefill_len: int
    family: str
    seed: int

    @property
    def length(self) -> int:
        return self.q_seq.shape[0]

    def __repr__(self) -> str:
        t, h_q, d = self.q_seq.shape
        return (f"DecodeSequence(T={t}, h_q={h_q}, h_kv={self.k_seq.shape[1]}, d={d}, "
                f"prefill_len={self.prefill_len}, family={self.family!r}, seed={self.seed})")

    def _repr_pretty_(self, printer, cycle):
        printer.text(repr(self))   # not the arrays field by field (see DecodeInput._repr_pretty_)


def make_decode_sequence(length: int, h_q: int, h_kv: int, d: int, *, prefill_len: int,
                         family: str = "gaussian", seed: int = 0, query_drift: float = 0.5) -> DecodeSequence:
    """Deterministic construction behind ``decode_sequences``: same arguments, same arrays."""
    core.check_positive_int(length, "length")
    prefill_len = core.check_positive_int(prefill_len, "prefill_len", allow_zero=True)
    if prefill_len >= length:
        raise ValueError(f"prefill_len must be < length={length}, got {prefill_len}")
    base = make_decode_input(h_q, h_kv, length, d, family, seed)
    rng = np.random.default_rng([seed, 1])
    rms = np.sqrt(np.mean(base.q ** 2, axis=-1, keepdims=True)) + 1e-300
    q_seq = base.q[None] + query_drift * rms[None] * rng.standard_normal((length, h_q, d))
    return DecodeSequence(q_seq, np.ascontiguousarray(base.k.transpose(1, 0, 2)),
                          np.ascontiguousarray(base.v.transpose(1, 0, 2)), prefill_len, family, seed)


def edge_lengths(capacity: int, window: int) -> list[int]:
    """Prompt lengths at the boundaries of a capacity ``C`` and a window ``w`` (positive ones)."""
    c, w = capacity, window
    return sorted({x for x in (c - 1, c, c + 1, w, w + 1, 2 * (c - w) - 1, 2 * (c - w)) if x >= 1})


def size_edges(max_size: int, *, context: int | None = None) -> list[int]:
    """The sizes ``sizes`` always keeps in reach: 0, 1, ``max_size`` and ``context - 1 .. context + 1``."""
    edges = {0, 1, max_size}
    if context is not None:
        edges |= {max(context - 1, 0), context, context + 1}
    return sorted(edges)


def sizes(max_size: int, *, context: int | None = None) -> st.SearchStrategy[int]:
    """Window / sink / heavy-hitter sizes: 0 and 1 always in reach, and ``>= context`` when given."""
    return st.one_of(st.sampled_from(size_edges(max_size, context=context)), st.integers(0, max(max_size, 1)))


@st.composite
def decode_sequences(draw, *, length=None, prefill_len=None, h_kv=None, group=None, d=None,
                     families=FAMILIES, min_length: int = 2, max_length: int = 40, max_h_kv: int = 2,
                     max_group: int = 3, head_dims=(2, 4, 8, 16), edge_capacity: int | None = None,
                     edge_window: int | None = None) -> DecodeSequence:
    """Decode sequences; any of ``length``, ``prefill_len``, ``h_kv``, ``group``, ``d`` may be fixed (an int)
    or a strategy. With ``edge_capacity``/``edge_window`` the prefill length is drawn from
    ``edge_lengths`` half of the time."""
    def pick(fixed, default):
        if fixed is None:
            return draw(default)
        return draw(fixed) if isinstance(fixed, st.SearchStrategy) else fixed
    h_kv_ = pick(h_kv, st.integers(1, max_h_kv))
    g_ = pick(group, st.integers(1, max_group))
    d_ = pick(d, st.sampled_from(head_dims))
    if prefill_len is None and edge_capacity is not None:
        edges = [x for x in edge_lengths(edge_capacity, edge_window or 1) if x < max_length]
        prefill = st.one_of(st.sampled_from(edges), st.integers(1, max_length - 1)) if edges \
            else st.integers(1, max_length - 1)
    else:
        prefill = st.integers(1, max_length - 1) if prefill_len is None else prefill_len
    p = pick(prefill, st.integers(1, max_length - 1))
    t = pick(length, st.integers(max(p + 1, min_length), max(p + 1, min_length, max_length)))
    family = draw(st.sampled_from(families))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_decode_sequence(t, h_kv_ * g_, h_kv_, d_, prefill_len=p, family=family, seed=seed)
