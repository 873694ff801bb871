"""The method protocol: a frozen dataclass of hyper-parameters with one method to override.

Stateless methods (Quest, SparQ, ...) override ``select``; methods whose output is not plain
softmax attention over the selection (SparQ's mean-value mix, vAttention's estimator,
RetrievalAttention's merge) also override ``attend``; methods that read more than the selected
K/V rows (metadata, labels, scores) override ``traffic`` and add to ``kv_traffic``.

Stateful methods (StreamingLLM, H2O, CORM, SnapKV/PyramidKV after prefill) subclass
``StatefulMethod``: ``prefill`` builds an explicit state object from the prompt, ``decode``
takes the state and one new token and returns the new state and the step's result. Nothing is
hidden in the instance, so an oracle and a kernel can be run side by side step by step.

Softmax scale of a stateful method: ``prefill(..., scale=None)`` forms every logit (its prompt scores
and, later, every decode step's) with ``scale`` (``None``: ``1/sqrt(d)``, as everywhere) and stores the
resolved value in the state (``prefill_scale``). ``decode(..., scale=None)`` then uses the state's
scale; an explicit ``scale`` must equal it (``decode_scale``: ``ValueError`` otherwise), so the prompt
scores and the decode steps of one sequence can never use two different scales.

Decode-step convention used everywhere: at step ``t`` the new token's key and value are appended
to the cache *before* attention, so the query at position ``t`` attends to tokens ``0..t``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import core
from .types import Layout, Selection, StepResult, Traffic, kv_traffic


@dataclass(frozen=True)
class Method:
    """Base class of every method's hyper-parameter dataclass."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""          # static | eviction | dynamic | structural | baseline
    summary: ClassVar[str] = ""
    stateful: ClassVar[bool] = False

    def select(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
               positions: np.ndarray | None = None) -> Selection:
        """Which tokens each query head attends to. Inputs are validated float64 arrays."""
        raise NotImplementedError

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, selection: Selection, *,
               scale: float | None = None) -> np.ndarray:
        """The step's output ``[H_q, d]``; plain softmax attention over the selection by default."""
        return core.attend_indices(q, k, v, selection.indices, selection.weights, scale=scale)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        """Exact bytes read; the selected K/V rows by default."""
        return kv_traffic(selection, h_kv, d, layout)

    def step(self, q, k, v, *, positions=None, scale: float | None = None,
             layout: Layout = Layout()) -> StepResult:
        """One decode step: validate, select, attend, count bytes."""
        q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
        if positions is not None:
            positions = check_positions(positions, sh.n)
        selection = self.select(q, k, v, positions=positions)
        output = self.attend(q, k, v, selection, scale=scale)
        return StepResult(selection, output, self.traffic(selection, h_kv=sh.h_kv, d=sh.d, layout=layout))

    @classmethod
    def presets(cls) -> dict[str, "Method"]:
        """Named configurations; ``canonical`` is the clean version, others reproduce reference repos."""
        return {"canonical": cls()}


@dataclass(frozen=True)
class StatefulMethod(Method):
    """A method that carries explicit state across decode steps."""

    stateful: ClassVar[bool] = True

    def prefill(self, q_prompt: np.ndarray, k_prompt: np.ndarray, v_prompt: np.ndarray, *,
                scale: float | None = None) -> Any:
        """State after the prompt. ``q_prompt [T, H_q, d]``, ``k_prompt``/``v_prompt`` ``[T, H_kv, d]``;
        ``scale`` the softmax scale of every logit (``None``: ``1/sqrt(d)``), stored in the state."""
        raise NotImplementedError

    def decode(self, state: Any, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, *,
               scale: float | None = None, layout: Layout = Layout()) -> tuple[Any, StepResult]:
        """Append one token (``q [H_q, d]``, ``k_new``/``v_new`` ``[H_kv, d]``) and attend.

        The returned Selection indexes original token positions ``0..t`` (``n = t + 1``). ``scale``:
        ``None`` uses the state's (``decode_scale``); an explicit one must equal it.
        """
        raise NotImplementedError


def prefill_scale(scale, d: int) -> float:
    """The softmax scale a prefill uses and stores in its state: ``scale``, or ``1/sqrt(d)`` for None."""
    core.check_scale(scale)
    return core.default_scale(d) if scale is None else float(scale)


def decode_scale(state_scale, scale) -> float | None:
    """The softmax scale of a decode step from a state prefilled with ``state_scale``.

    ``scale=None``: the state's. An explicit ``scale`` must equal the state's (``ValueError`` naming
    ``scale`` otherwise); a state built by hand without a scale (``None``) accepts any valid one.
    """
    core.check_scale(scale)
    if scale is None:
        return state_scale
    if state_scale is not None and float(scale) != float(state_scale):
        raise ValueError(f"scale={scale!r} differs from the scale the state was prefilled with ({state_scale!r}): "
                         "prefill and decode of one sequence must use one softmax scale")
    return float(scale)


def check_positions(positions, n: int, name: str = "positions") -> np.ndarray:
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {pos.dtype}")
    if pos.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {pos.shape}")
    return pos.astype(np.int64)


def check_sequence(q_seq, k_seq, v_seq):
    """Validate a whole sequence in trace layout: ``q [T, H_q, d]``, ``k``/``v`` ``[T, H_kv, d]``."""
    q_seq = core.as_float64(q_seq, "q_seq", ndim=3)
    k_seq = core.as_float64(k_seq, "k_seq", ndim=3)
    v_seq = core.as_float64(v_seq, "v_seq", ndim=3)
    if k_seq.shape != v_seq.shape:
        raise ValueError(f"v_seq must have the shape of k_seq {k_seq.shape}, got {v_seq.shape}")
    if q_seq.shape[0] != k_seq.shape[0] or q_seq.shape[2] != k_seq.shape[2]:
        raise ValueError(f"q_seq {q_seq.shape} and k_seq {k_seq.shape} must agree on T (axis 0) and d (axis 2)")
    core.group_size(q_seq.shape[1], k_seq.shape[1])
    return q_seq, k_seq, v_seq


@dataclass(frozen=True)
class DecodeRun:
    """Per-step results of a prefill + decode run; ``steps[j]`` is the query at position ``prefill_len + j``."""

    steps: list[StepResult]
    final_state: Any = None


def run_decode(method: Method, q_seq, k_seq, v_seq, *, prefill_len: int,
               layout: Layout = Layout(), scale: float | None = None) -> DecodeRun:
    """Prefill on tokens ``[0, prefill_len)`` then decode every later token one at a time.

    Works for stateless and stateful methods alike: a stateless method sees the full cache of tokens
    ``0..t`` at step ``t``; a stateful one gets ``prefill`` then ``decode`` per token. ``scale`` is the
    softmax scale (``None``: ``1/sqrt(d)``); it is passed on only when given, so a method written
    before stateful methods took a scale still runs at the default.
    """
    q_seq, k_seq, v_seq = check_sequence(q_seq, k_seq, v_seq)
    T = q_seq.shape[0]
    prefill_len = core.check_positive_int(prefill_len, "prefill_len", allow_zero=True)
    core.check_scale(scale)
    kw = {} if scale is None else {"scale": scale}
    if prefill_len >= T:
        raise ValueError(f"prefill_len must be < T={T} so at least one token is decoded, got {prefill_len}")
    steps: list[StepResult] = []
    if not method.stateful:
        for t in range(prefill_len, T):
            k = np.ascontiguousarray(k_seq[: t + 1].transpose(1, 0, 2))
            v = np.ascontiguousarray(v_seq[: t + 1].transpose(1, 0, 2))
            steps.append(method.step(q_seq[t], k, v, positions=np.arange(t + 1), layout=layout, **kw))
        return DecodeRun(steps)
    state = method.prefill(q_seq[:prefill_len], k_seq[:prefill_len], v_seq[:prefill_len], **kw)
    for t in range(prefill_len, T):
        state, result = method.decode(state, q_seq[t], k_seq[t], v_seq[t], layout=layout, **kw)
        steps.append(result)
    return DecodeRun(steps, state)
