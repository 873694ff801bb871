"""Decode-step inputs drawn from attention traces, for the property suites.

A decode step of a trace is query ``t`` of one layer against the cache of tokens ``0..t`` (its own
token included), returned as a ``strategies.DecodeInput`` whose ``family`` names the trace and layer
(``"trace:<name>:L<layer>"``) and whose ``seed`` is ``t``: a failing example is reproduced exactly by
``trace_decode_input(trace, layer, t)``.

* ``trace_decode_inputs(trace)``      steps of a trace file (default: the shipped SmolLM2 trace).
* ``synthetic_decode_inputs(...)``    steps of seeded synthetic traces (``traces.synthetic`` presets).
* ``mixed_decode_inputs(...)``        one of the above or ``strategies.decode_inputs``.

Only NumPy is needed (the shipped trace loads without torch / transformers).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from ..oracle import core
from ..traces import format as fmt
from .strategies import DecodeInput, decode_inputs


@functools.lru_cache(maxsize=4)
def _load(path: str) -> fmt.AttentionTrace:
    return fmt.load_trace(path)


def shipped_trace() -> fmt.AttentionTrace:
    """The shipped SmolLM2-135M trace (memory-mapped, loaded once)."""
    from ..traces.capture import DATA_DIR, SHIPPED
    return _load(str(DATA_DIR / next(iter(SHIPPED))))


def _name(trace: fmt.AttentionTrace) -> str:
    return Path(trace.source).stem if trace.source != "<memory>" else trace.metadata["model"].get("name", "trace")


def trace_decode_input(trace: fmt.AttentionTrace, layer: int, t: int) -> DecodeInput:
    """Decode step ``t`` of ``layer``: ``q [H_q, d]``, cache ``[H_kv, t+1, d]`` in float64."""
    q, k, v = trace.layer(layer).decode_step(t)
    return DecodeInput(q, k, v, f"trace:{_name(trace)}:L{layer}", int(t))


def _check_range(trace, min_n, max_n):
    core.check_positive_int(min_n, "min_n")
    hi = trace.n_tokens if max_n is None else min(core.check_positive_int(max_n, "max_n"), trace.n_tokens)
    if min_n > hi:
        raise ValueError(f"min_n={min_n} must be <= min(max_n, T={trace.n_tokens}) = {hi}")
    return hi


def trace_decode_inputs(trace: fmt.AttentionTrace | str | Path | None = None, *, layers=None,
                        min_n: int = 1, max_n: int | None = 512) -> st.SearchStrategy[DecodeInput]:
    """Decode steps of a trace with a cache of ``n = t + 1`` tokens, ``min_n <= n <= max_n``.

    ``max_n`` bounds the cost of a property test (``None``: up to the whole trace); hypothesis
    shrinks towards short caches and the first listed layer.
    """
    if trace is None:
        trace = shipped_trace()
    elif not isinstance(trace, fmt.AttentionTrace):
        trace = _load(str(trace))
    layers = list(trace.layers if layers is None else layers)
    for i in layers:
        if i not in trace.layers:
            raise ValueError(f"layer {i} is not in the trace (layers {list(trace.layers)})")
    hi = _check_range(trace, min_n, max_n)

    @st.composite
    def draw(draw_):
        layer = draw_(st.sampled_from(layers))
        n = draw_(st.integers(min_n, hi))
        return trace_decode_input(trace, layer, n - 1)
    return draw()


@functools.lru_cache(maxsize=16)
def _synthetic(preset_name: str, seed: int, n_tokens: int) -> fmt.AttentionTrace:
    from ..traces.synthetic import preset, synthetic_trace
    return synthetic_trace(preset(preset_name, n_tokens=n_tokens, seed=seed))


def synthetic_decode_inputs(presets=("smollm2-early", "smollm2-late"), *, seeds: int = 4, n_tokens: int = 512,
                            min_n: int = 1) -> st.SearchStrategy[DecodeInput]:
    """Decode steps of seeded synthetic traces (a few seeds, cached: each trace is built once)."""
    core.check_positive_int(seeds, "seeds")
    core.check_positive_int(n_tokens, "n_tokens")
    if not 1 <= min_n <= n_tokens:
        raise ValueError(f"min_n must be in [1, n_tokens={n_tokens}], got {min_n}")

    @st.composite
    def draw(draw_):
        name = draw_(st.sampled_from(list(presets)))
        seed = draw_(st.integers(0, seeds - 1))
        trace = _synthetic(name, seed, n_tokens)
        n = draw_(st.integers(min_n, n_tokens))
        q, k, v = trace.layer(0).decode_step(n - 1)
        return DecodeInput(q, k, v, f"synthetic:{name}:seed{seed}", n - 1)
    return draw()


def mixed_decode_inputs(*, trace=None, min_n: int = 1, max_n: int = 300, **strategy_kwargs) -> st.SearchStrategy[DecodeInput]:
    """Inputs from ``strategies.decode_inputs``, a real trace, or a synthetic one."""
    return st.one_of(decode_inputs(min_n=min_n, max_n=max_n, **strategy_kwargs),
                     trace_decode_inputs(trace, min_n=min_n, max_n=max_n),
                     synthetic_decode_inputs(n_tokens=max(max_n, min_n), min_n=min_n))
