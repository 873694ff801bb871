"""The Numba vAttention kernel implements its oracle: same deterministic set, same draws from the same
generator, same Horvitz-Thompson weights, output within the FlashAttention rule with those weights
(``property_tests/suites_vattention.py``); every preset; planted bugs caught; and the statistical
sampler check (``check_sampler``) passes it."""
import dataclasses

import numpy as np
import pytest
from hypothesis import Phase, settings

from kvsparse import registry
from kvsparse.oracle.vattention import VAttention
from kvsparse.property_tests import suites
from kvsparse.property_tests.strategies import make_decode_input
from kvsparse.property_tests.vattention import check_sampler

FIND_ONLY = settings(max_examples=40, derandomize=True, deadline=None,
                     phases=(Phase.explicit, Phase.reuse, Phase.generate))
KERNEL = registry.get("vattention").kernels["numba"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_kernel_implements_vattention(dtype):
    report = suites.run_suite("vattention", KERNEL, dtype=dtype)
    assert report.ok, str(report)


@pytest.mark.parametrize("preset", list(VAttention.presets()))
def test_presets_match_the_oracle(preset):
    """At the presets' own sizes (128 sinks, 128 local, 5 % top-k): n large enough that all three parts
    and a real sample exist."""
    method = VAttention.presets()[preset]
    inp = make_decode_input(4, 2, 1200, 16, "heavy_tails", seed=2)
    verdict = suites.check_step(method, KERNEL, inp, dtype="float32")
    assert verdict.ok, str(verdict)
    _, ix, w = KERNEL(method, *(x.astype(np.float32) for x in (inp.q, inp.k, inp.v)))
    sampled = any((wh > 1.0).any() for wh in w)          # an HT factor n_s / b > 1: a real sample was drawn
    assert sampled, [np.unique(wh)[:4] for wh in w]


def test_same_generator_same_draws_and_explicit_samples():
    inp = make_decode_input(2, 1, 500, 8, seed=4)
    method = VAttention(sinks=8, local=8, heavy=10, epsilon=0.3, delta=0.2, targets="denominator")
    q, k, v = (x.astype(np.float32) for x in (inp.q, inp.k, inp.v))
    _, ix1, w1 = KERNEL(method, q, k, v, rng=np.random.default_rng(11))
    expected = method.select(inp.q.astype(np.float32).astype(np.float64), k.astype(np.float64),
                             v.astype(np.float64), rng=np.random.default_rng(11))
    assert all(np.array_equal(a, b) for a, b in zip(ix1, expected.indices))
    # samples passed in are used as given
    plan = method.plan(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    samples = method.draw(plan, np.random.default_rng(5))
    _, ix2, _ = KERNEL(method, q, k, v, samples=samples)
    oracle = method.select(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), samples=samples)
    assert all(np.array_equal(a, b) for a, b in zip(ix2, oracle.indices))
    with pytest.raises(ValueError, match="samples"):
        KERNEL(method, q, k, v, samples=[s[:-1] for s in samples])


def _bugged(changes=None, weights=None):
    def kern(method, q, k, v, *, positions=None, scale=None):
        m = dataclasses.replace(method, **changes(method)) if changes else method
        out, ix, w = KERNEL(m, q, k, v, scale=scale)
        if weights is not None:
            w = [weights(wh) for wh in w]
            from kvsparse.kernels.numba.attention import attend_selection
            out, _ = attend_selection(q, k, v, ix, [wh.astype(q.dtype) for wh in w], scale=scale)
        return out, ix, w
    return kern


@pytest.mark.parametrize("bug, expect", [
    (_bugged(changes=lambda m: {"seed": m.seed + 1}), "selection"),                  # another draw
    (_bugged(changes=lambda m: {"sinks": m.sinks + 1} if isinstance(m.sinks, int) else {"sinks": 1}),
     "selection"),                                                                   # sink count off by one
    (_bugged(weights=lambda w: np.where(w > 1, w * 1.5, w)), "selection"),          # wrong HT scaling
])
def test_suite_catches_planted_bugs(bug, expect):
    report = suites.run_suite("vattention", bug, settings=FIND_ONLY)
    assert not report.ok and report.failure.failures[0].name == expect, str(report)


def test_suite_catches_a_wrong_output_with_the_right_weights():
    """Right indices and weights reported, but the output ignores the weights (plain attention)."""
    from kvsparse.kernels.numba.attention import attend_selection

    def unweighted(method, q, k, v, *, positions=None, scale=None):
        _, ix, w = KERNEL(method, q, k, v, scale=scale)
        out, _ = attend_selection(q, k, v, ix, scale=scale)
        return out, ix, w

    report = suites.run_suite("vattention", unweighted, settings=FIND_ONLY)
    assert not report.ok and report.failure.failures[0].name == "output", str(report)


def test_statistical_check_passes_the_kernel():
    """The sampler check used for third-party kernels (false alarm <= alpha = 1e-9 on this input)."""
    inp = make_decode_input(2, 1, 600, 16, "heavy_tails", seed=1)
    method = VAttention(sinks=16, local=16, heavy=8, epsilon=0.2, delta=0.1)
    verdict = check_sampler(method, KERNEL, inp.q, inp.k, inp.v, calls=100, alpha=1e-9, seed=3)
    assert verdict.ok, str(verdict)
