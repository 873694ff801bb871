"""Decode-step inputs drawn from attention traces, for the property suites.

A decode step of a trace is query ``t`` of one layer against the cache of tokens ``0..t`` (its own
token included), returned as a ``strategies.DecodeInput`` whose ``family`` names the trace and layer
(``"trace:<name>:L<layer>"``) and whose ``seed`` is ``t``: a failing example is reproduced exactly by
``trace_decode_input(trace, layer, t)``.

* ``trace_decode_inputs(trace)``      steps of a trace file (default: the shipped SmolLM2 trace).
* ``synthetic_decode_inputs(...)``    steps of seeded synthetic traces (``traces.synthetic`` presets).
* ``mixed_decode_inputs(...)``        one of the above or ``strategies.decode_inputs``.

Stateful methods decode whole sequences: ``trace_decode_sequences(trace)`` and
``synthetic_decode_sequences(...)`` draw ``sequences.DecodeSequence``s made of tokens ``0..T-1`` of
one layer (a prefix: token 0, the sink, is always in it, and every query and key keeps its true
position, so post-RoPE values stay consistent), split into a prefill of ``prefill_len`` tokens and
``T - prefill_len`` decode steps. ``family`` is as above; ``seed`` is 0 for a trace (the family, ``T``
and ``prefill_len`` fix the sequence: ``trace_decode_sequence(trace, layer, T, prefill_len)``) and the
synthetic trace's seed otherwise.

Only NumPy is needed (the shipped trace loads without torch / transformers).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from ..oracle import core
from ..traces import format as fmt
from .sequences import DecodeSequence
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


def _trace_and_layers(trace, layers) -> tuple[fmt.AttentionTrace, list[int]]:
    """The trace (default: the shipped one; a path is loaded) and the layers to draw from, checked."""
    if trace is None:
        trace = shipped_trace()
    elif not isinstance(trace, fmt.AttentionTrace):
        trace = _load(str(trace))
    layers = list(trace.layers if layers is None else layers)
    for i in layers:
        if i not in trace.layers:
            raise ValueError(f"layer {i} is not in the trace (layers {list(trace.layers)})")
    return trace, layers


def trace_decode_inputs(trace: fmt.AttentionTrace | str | Path | None = None, *, layers=None,
                        min_n: int = 1, max_n: int | None = 512) -> st.SearchStrategy[DecodeInput]:
    """Decode steps of a trace with a cache of ``n = t + 1`` tokens, ``min_n <= n <= max_n``.

    ``max_n`` bounds the cost of a property test (``None``: up to the whole trace); hypothesis
    shrinks towards short caches and the first listed layer.
    """
    trace, layers = _trace_and_layers(trace, layers)
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


SYNTHETIC_MIN_TOKENS = 64
"""Fewest tokens of a synthetic trace drawn from (a preset's heavy hitters need room); shorter inputs are
prefixes of it."""


def synthetic_decode_inputs(presets=("smollm2-early", "smollm2-late"), *, seeds: int = 4, n_tokens: int = 512,
                            min_n: int = 1, max_n: int | None = None) -> st.SearchStrategy[DecodeInput]:
    """Decode steps of seeded synthetic traces of ``n_tokens`` tokens (a few seeds, cached: each trace is
    built once), with a cache of ``min_n <= n <= max_n`` tokens (``max_n`` None: ``n_tokens``)."""
    core.check_positive_int(seeds, "seeds")
    core.check_positive_int(n_tokens, "n_tokens")
    if max_n is not None:
        core.check_positive_int(max_n, "max_n")
    hi = n_tokens if max_n is None else min(max_n, n_tokens)
    if not 1 <= min_n <= hi:
        raise ValueError(f"min_n must be in [1, min(max_n, n_tokens={n_tokens})] = [1, {hi}], got {min_n}")

    @st.composite
    def draw(draw_):
        name = draw_(st.sampled_from(list(presets)))
        seed = draw_(st.integers(0, seeds - 1))
        trace = _synthetic(name, seed, n_tokens)
        n = draw_(st.integers(min_n, hi))
        q, k, v = trace.layer(0).decode_step(n - 1)
        return DecodeInput(q, k, v, f"synthetic:{name}:seed{seed}", n - 1)
    return draw()


def mixed_decode_inputs(*, trace=None, min_n: int = 1, max_n: int = 300, **strategy_kwargs) -> st.SearchStrategy[DecodeInput]:
    """Inputs from ``strategies.decode_inputs``, a real trace, or a synthetic one."""
    return st.one_of(decode_inputs(min_n=min_n, max_n=max_n, **strategy_kwargs),
                     trace_decode_inputs(trace, min_n=min_n, max_n=max_n),
                     synthetic_decode_inputs(n_tokens=max(max_n, min_n, SYNTHETIC_MIN_TOKENS), min_n=min_n,
                                             max_n=max(max_n, min_n)))


# --------------------------------------------------------------------------------------------
# decode sequences (stateful methods)
# --------------------------------------------------------------------------------------------

def _prefix(layer: fmt.LayerQKV, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.ascontiguousarray(np.asarray(x[:length], dtype=np.float64)) for x in (layer.q, layer.k, layer.v))


def _check_lengths(length: int, prefill_len: int, n_tokens: int) -> None:
    core.check_positive_int(length, "length")
    core.check_positive_int(prefill_len, "prefill_len", allow_zero=True)
    if length > n_tokens:
        raise ValueError(f"length must be <= the trace's T={n_tokens}, got {length}")
    if prefill_len >= length:
        raise ValueError(f"prefill_len must be < length={length} (at least one decode step), got {prefill_len}")


def trace_decode_sequence(trace: fmt.AttentionTrace, layer: int, length: int, prefill_len: int) -> DecodeSequence:
    """Tokens ``0..length-1`` of ``layer`` (float64), prefill ``prefill_len`` of them, decode the rest.

    The arrays equal ``trace.layer(layer).sequences()`` cut to their first ``length`` tokens.
    """
    if layer not in trace.layers:
        raise ValueError(f"layer {layer} is not in the trace (layers {list(trace.layers)})")
    _check_lengths(length, prefill_len, trace.n_tokens)
    q, k, v = _prefix(trace.layer(layer), length)
    return DecodeSequence(q, k, v, int(prefill_len), f"trace:{_name(trace)}:L{layer}", 0)


def _sequence_bounds(min_prefill: int, max_length: int, n_tokens: int) -> int:
    core.check_positive_int(min_prefill, "min_prefill", allow_zero=True)
    core.check_positive_int(max_length, "max_length")
    if min_prefill + 1 > n_tokens:
        raise ValueError(f"min_prefill={min_prefill} leaves no decode step in a trace of T={n_tokens} tokens")
    return min(max(max_length, min_prefill + 1), n_tokens)


def _draw_split(draw_, min_prefill: int, hi: int) -> tuple[int, int]:
    """``(length, prefill_len)`` with ``min_prefill <= prefill_len < length <= hi``; shrinks to short ones."""
    prefill = draw_(st.integers(min_prefill, hi - 1))
    return draw_(st.integers(prefill + 1, hi)), prefill


def trace_decode_sequences(trace: fmt.AttentionTrace | str | Path | None = None, *, layers=None,
                           min_prefill: int = 1, max_length: int = 48) -> st.SearchStrategy[DecodeSequence]:
    """Decode sequences of a trace (default: the shipped SmolLM2 trace): a layer, a length
    ``T <= max_length`` (raised to ``min_prefill + 1`` if smaller) and ``min_prefill <= prefill_len < T``.

    The cost of a stateful check grows with ``T`` (one oracle and one kernel step per decoded token),
    hence the small default; hypothesis shrinks towards short prompts, one step, the first layer.
    """
    trace, layers = _trace_and_layers(trace, layers)
    hi = _sequence_bounds(min_prefill, max_length, trace.n_tokens)

    @st.composite
    def draw(draw_):
        layer = draw_(st.sampled_from(layers))
        length, prefill = _draw_split(draw_, min_prefill, hi)
        return trace_decode_sequence(trace, layer, length, prefill)
    return draw()


def synthetic_decode_sequences(presets=("smollm2-early", "smollm2-late"), *, seeds: int = 4, min_prefill: int = 1,
                               max_length: int = 48) -> st.SearchStrategy[DecodeSequence]:
    """Decode sequences of seeded synthetic traces (prefixes of ``max(max_length, SYNTHETIC_MIN_TOKENS)``
    tokens; each trace built once, cached)."""
    core.check_positive_int(seeds, "seeds")
    hi = _sequence_bounds(min_prefill, max_length, max(max_length, min_prefill + 1))
    n_tokens = max(hi, SYNTHETIC_MIN_TOKENS)

    @st.composite
    def draw(draw_):
        name = draw_(st.sampled_from(list(presets)))
        seed = draw_(st.integers(0, seeds - 1))
        trace = _synthetic(name, seed, n_tokens)
        length, prefill = _draw_split(draw_, min_prefill, hi)
        q, k, v = _prefix(trace.layer(0), length)
        return DecodeSequence(q, k, v, prefill, f"synthetic:{name}:seed{seed}", seed)
    return draw()
