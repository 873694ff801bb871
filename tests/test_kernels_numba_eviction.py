"""The Numba kernels of H2O, SnapKV and PyramidKV implement their methods (the property suites of
``kvsparse.property_tests.suites_eviction``, step by step over hypothesis-drawn decodes), and the
suites catch planted bugs (a kernel that evicts the wrong tokens, one whose output is off)."""
import numpy as np
import pytest

from kvsparse import registry
from kvsparse.kernels.numba.h2o import H2OKernel
from kvsparse.kernels.numba.snapkv import SnapKVKernel
from kvsparse.oracle.h2o import H2O
from kvsparse.oracle.pyramidkv import PyramidKV
from kvsparse.oracle.snapkv import SnapKV
from kvsparse.property_tests import suites, suites_eviction
from kvsparse.property_tests.sequences import make_decode_sequence

registry.load_all()
NAMES = ["h2o", "snapkv", "pyramidkv"]


def numba_kernel(name):
    return registry.get(name).kernels["numba"]


def decode(method, kernel, seq, *, scores=True):
    suites_eviction.remember(seq.q_seq, seq.k_seq)
    band = suites.suite_for(method.name).scores if scores else None
    return suites.check_decode(method, kernel, seq.q_seq, seq.k_seq, seq.v_seq, prefill_len=seq.prefill_len,
                               scores=band)


@pytest.mark.parametrize("name", NAMES)
def test_numba_kernel_implements_its_method(name):
    report = suites.run_suite(name, numba_kernel(name))
    assert report.ok, str(report)


@pytest.mark.parametrize("name", NAMES)
def test_triton_kernel_passes_the_same_suite(name):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    from hypothesis import HealthCheck, settings
    kernel = registry.get(name).kernels["triton"]
    report = suites.run_suite(name, kernel, settings=settings(max_examples=10, deadline=None,
                                                              suppress_health_check=list(HealthCheck)))
    assert report.ok, str(report)


def test_fp32_underflow_tie_is_accepted_by_the_band_only():
    """Found by hypothesis: a float64 score of ~1e-30 is 0 in float32 and ties with a true 0, so the
    kernel evicts the other token (lower index wins the tie). Exact matching rejects it; the band accepts."""
    seq = make_decode_sequence(7, 1, 1, 4, prefill_len=1, family="huge_logits", seed=5)
    method = H2O(heavy=2, recent=1, timing="after_attention")
    without = decode(method, numba_kernel("h2o"), seq, scores=False)
    assert not without[-1].ok and without[-1].failures[0].name == "selection", str(without[-1])
    assert all(v.ok for v in decode(method, numba_kernel("h2o"), seq)), "the band must accept this difference"


class EvictsTheWrongToken(H2OKernel):
    """Planted bug: keeps the LOWEST accumulated scores as heavy hitters."""

    @staticmethod
    def evict(kept, scores, heavy, recent, protect_leaving):
        return H2OKernel.evict(kept, -scores, heavy, recent, protect_leaving)


class PoolsTheWrongWay(SnapKVKernel):
    """Planted bug: keeps the prefix tokens with the LOWEST window votes."""

    def unit_scores(self, method, q_prompt, k_prompt, *, scale=None):
        s = super().unit_scores(method, q_prompt, k_prompt, scale=scale)
        return np.where(np.isfinite(s), -s, s)


@pytest.mark.parametrize("method,planted", [
    (H2O(heavy=3, recent=2), EvictsTheWrongToken()),
    (H2O(heavy=3, recent=2, timing="after_attention", gqa="mean"), EvictsTheWrongToken()),
    (SnapKV(window=3, capacity=8, kernel=3), PoolsTheWrongWay()),
    (PyramidKV(window=2, capacity=6, beta=2, layer=1, num_layers=3, kernel=3, pool="avg"), PoolsTheWrongWay()),
])
def test_the_suite_catches_a_planted_eviction_bug(method, planted):
    seq = make_decode_sequence(16, 4, 2, 8, prefill_len=10, seed=7)
    assert all(v.ok for v in decode(method, numba_kernel(method.name), seq))      # the real kernel passes here
    verdicts = decode(method, planted, seq)
    assert not verdicts[-1].ok and verdicts[-1].failures[0].name == "selection", str(verdicts[-1])


def test_the_suite_catches_a_planted_output_bug():
    real = numba_kernel("snapkv")

    class OffByOnePercent(SnapKVKernel):
        def decode(self, method, state, q, k_new, v_new, *, scale=None):
            state, (out, rows) = real.decode(method, state, q, k_new, v_new, scale=scale)
            return state, (out * np.float32(1.01), rows)

    seq = make_decode_sequence(12, 2, 1, 8, prefill_len=8, seed=3)
    verdicts = decode(SnapKV(window=2, capacity=5), OffByOnePercent(), seq)
    assert not verdicts[-1].ok and verdicts[-1].failures[0].name == "output", str(verdicts[-1])


def test_unsupported_and_stateless_uses_are_refused_clearly():
    x = np.zeros((3, 1, 4), np.float32)
    with pytest.raises(ValueError, match="execution='drop'"):
        numba_kernel("h2o").prefill(H2O(execution="mask_sim"), x, x, x)
    with pytest.raises(ValueError, match="k_prompt"):
        numba_kernel("snapkv").prefill(SnapKV(window=1, capacity=2), x, x[:2], x)
    for method in (H2O(), SnapKV(), PyramidKV()):
        with pytest.raises(TypeError, match="stateful"):
            numba_kernel(method.name)(method, x[0], x, x)


@pytest.mark.parametrize("name,planted", [("h2o", EvictsTheWrongToken()), ("snapkv", PoolsTheWrongWay()),
                                          ("pyramidkv", PoolsTheWrongWay())])
def test_the_hypothesis_search_finds_the_planted_bug(name, planted):
    report = suites.run_suite(name, planted)
    assert not report.ok and report.failure.failures[0].name == "selection", str(report)
