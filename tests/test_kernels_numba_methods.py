"""Each Numba method kernel implements its oracle: the reusable property suites bound to our kernels,
plus planted bugs showing the suites can fail for these methods."""
import dataclasses

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from kvsparse import registry
from kvsparse.property_tests import suites

METHODS = ["quest", "sparq", "double_sparsity", "twilight", "sliding_window"]


@pytest.mark.parametrize("name", METHODS)
def test_numba_kernel_implements_method(name):
    entry = registry.get(name)
    report = suites.run_suite(name, entry.kernels["numba"], dtype="float32")
    assert report.ok, str(report)


def _with_method(kernel, **changes):
    """A planted bug: the kernel runs with different hyper-parameters than the oracle it is judged by."""
    def bugged(method, q, k, v, *, positions=None, scale=None):
        return kernel(dataclasses.replace(method, **changes(method)), q, k, v, scale=scale)
    return bugged


@pytest.mark.parametrize("name, changes", [
    ("quest", lambda m: {"token_budget": m.token_budget + m.page_size}),      # one page too many
    ("sparq", lambda m: {"reallocate": not m.reallocate}),                      # forgets the mean-V mix
    ("double_sparsity", lambda m: {"token_budget": m.token_budget + 1}),        # off-by-one budget
    ("twilight", lambda m: {"p": min(1.0, m.p + 0.1)}),                         # wrong mass target
    ("sliding_window", lambda m: {"recent_includes_current": not m.recent_includes_current,
                                  "window": max(1, m.window)}),                 # window off by one
])
def test_suite_catches_wrong_hyper_parameters(name, changes):
    report = suites.run_suite(name, _with_method(registry.get(name).kernels["numba"], changes=changes))
    assert not report.ok


def test_tie_order_is_accepted_but_wrong_pages_are_not():
    # the suite's documented semantics: exact ties may be broken either way (the band rule), but a
    # kernel that keeps pages the scores do not support fails on "selection"
    from kvsparse.kernels.numba import quest as kq
    from kvsparse.oracle.quest import Quest
    from kvsparse.property_tests.strategies import make_decode_input

    def reversed_ties(method, q, k, v, *, positions=None, scale=None):
        n = k.shape[1]     # reverse the token order, select, map back: higher page index wins ties
        out, idx = kq.quest(method, q, np.ascontiguousarray(k[:, ::-1]), np.ascontiguousarray(v[:, ::-1]), scale=scale)
        return out, [np.sort(n - 1 - np.asarray(i)) for i in idx]

    def bottom_pages(method, q, k, v, *, positions=None, scale=None):
        # reports the pages -q would choose (the lowest bounds of q, not its top)
        return kq.quest(method, q, k, v, scale=scale)[0], kq.quest(method, -q, k, v, scale=scale)[1]

    method = Quest(token_budget=4, page_size=2)
    scores = suites.suite_for("quest").scores
    ties = make_decode_input(2, 1, 16, 8, "near_ties", seed=1)
    tie_verdict = suites.check_step(method, reversed_ties, ties, dtype="float32", scores=scores)
    sel = next(r for r in tie_verdict.results if r.name == "selection")
    assert tie_verdict.ok and "within the rounding band" in sel.detail   # it did differ, and was accepted
    verdict = suites.check_step(method, bottom_pages, make_decode_input(2, 1, 16, 8, seed=1), dtype="float32",
                                scores=scores)
    assert not verdict.ok and verdict.failures[0].name == "selection"


@given(weights=st.lists(st.one_of(st.integers(0, 3).map(float), st.floats(0, 1)), min_size=1, max_size=60),
       p=st.sampled_from([0.1, 0.5, 0.85, 0.99, 1.0]), epsilon=st.sampled_from([0.0, 1e-5]))
@example(weights=[1.0, 1.0, 1.0, 1.0], p=0.5, epsilon=0.0)          # the cut falls inside a tie
def test_compiled_top_p_rules_match_the_oracle(weights, p, epsilon):
    from kvsparse.kernels.numba import twilight as kt
    from kvsparse.oracle import twilight as ot
    w = np.array(weights)
    probs = w / w.sum() if w.sum() > 0 else np.full(w.size, 1 / w.size)
    assert np.array_equal(kt.top_p_sort(probs, p), ot.top_p_sort(probs, p))
    assert np.array_equal(kt.top_p_search(probs, p, probs.max(), epsilon), ot.top_p_search(probs, p, epsilon=epsilon))


def test_streaming_llm_kernel_step_by_step():
    report = suites.run_suite("streaming_llm", registry.get("streaming_llm").kernels["numba"])
    assert report.ok, str(report)


def test_decode_suite_reports_the_failing_step():
    # planted: a kernel whose window is one token short; caught at the first step where it matters
    from kvsparse.kernels.numba.streaming_llm import StreamingLLMKernel
    from kvsparse.oracle.streaming_llm import StreamingLLM

    class ShortWindow(StreamingLLMKernel):
        def decode(self, method, state, q, k_new, v_new, *, scale=None):
            return super().decode(dataclasses.replace(method, recent=max(1, method.recent - 1)), state, q,
                                  k_new, v_new, scale=scale)

    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((12, 2, 8)), rng.standard_normal((12, 1, 8)), rng.standard_normal((12, 1, 8))
    verdicts = suites.check_decode(StreamingLLM(sinks=1, recent=4), ShortWindow(), q, k, v, prefill_len=2)
    # the sink and the window cover everything up to n = 4; at n = 5 (step 4) the short window drops token 1
    assert [vd.ok for vd in verdicts] == [True, True, False]
    assert verdicts[-1].step == 4 and verdicts[-1].failures[0].name == "selection"
