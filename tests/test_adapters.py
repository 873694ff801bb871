"""Third-party implementations through the adapters: kvpress presses (CPU) keep what our kvpress
presets keep and attend like our oracle; a press configured with a planted bug is caught; FlashInfer
(GPU only) is skipped here with the reason.

Exact selection is required (no score band for these methods yet), so the explicit inputs are
generic Gaussian sequences whose hyper-parameters avoid exact ties (budget >= sinks / window).
"""
import numpy as np
import pytest

from kvsparse import cli, registry
from kvsparse.property_tests import adapters, suites, validate

pytestmark = pytest.mark.skipif(adapters.kvpress_unavailable() is not None,
                                reason=adapters.kvpress_unavailable() or "")

# (method, preset, params): prompt lengths below keep every budget >= sinks / window (no ties)
CONFIGS = {
    "streaming_llm": ("kvpress", {"sinks": 2, "compression_ratio": 0.25}),
    "snapkv": ("kvpress", {"window": 2, "kernel": 3, "compression_ratio": 0.3}),
    "pyramidkv": ("kvpress", {"window": 2, "kernel": 3, "compression_ratio": 0.3, "num_layers": 3, "layer": 1}),
    "h2o": ("kvpress-observed-attention", {"compression_ratio": 0.3}),
}


def gaussian_sequence(seed, t=24, prefill=16, h_kv=2, group=2, d=16):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, h_kv * group, d)), rng.standard_normal((t, h_kv, d)),
            rng.standard_normal((t, h_kv, d)), prefill)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kvpress_press_matches_our_preset(name):
    preset, params = CONFIGS[name]
    method = validate.fixed_method(name, preset, params)
    kernel = adapters.KVPRESS_ADAPTERS[name]
    for seed in range(3):
        q, k, v, prefill = gaussian_sequence(seed)
        verdicts = suites.check_decode(method, kernel, q, k, v, prefill_len=prefill)
        assert len(verdicts) == q.shape[0] - prefill and all(vd.ok for vd in verdicts), verdicts[-1]
        # the press really compressed: fewer prompt tokens than the prompt in every head's set
        state = kernel.prefill(method, *(x[:prefill].astype(np.float32) for x in (q, k, v)))
        assert all(p.size < prefill for p in state.positions)


def test_a_press_without_sinks_is_caught():
    import kvpress
    method = validate.fixed_method("streaming_llm", "kvpress", {"sinks": 2, "compression_ratio": 0.25})
    buggy = adapters.KvpressKernel("kvpress_no_sinks", lambda m: kvpress.StreamingLLMPress(
        compression_ratio=m.compression_ratio, n_sink=0), "kvpress")
    q, k, v, prefill = gaussian_sequence(0)
    verdict = suites.check_decode(method, buggy, q, k, v, prefill_len=prefill)[0]
    assert not verdict.ok and verdict.failures[0].name == "selection" and "dropped [0, 1]" in verdict.failures[0].detail


def test_cli_runs_the_suite_on_kvpress(capsys):
    spec = "kvsparse.property_tests.adapters:kvpress_streaming_llm"
    # the adapter names its preset (kvsparse_preset): --params override its fields
    code = cli.main(["validate", "streaming_llm", spec, "--params", '{"sinks": 2, "compression_ratio": 0.25}',
                     "--examples", "15"])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out, out
    # a configuration kvpress cannot express is a contract failure naming the field
    code = cli.main(["validate", "streaming_llm", spec, "--preset", "canonical", "--examples", "5"])
    out = capsys.readouterr().out
    assert code == 1 and "kvpress cannot express schedule='every_step'" in out


def test_stateful_method_without_suite_gets_the_generic_check():
    if registry.get("snapkv").suite is not None:
        pytest.skip("snapkv has a registered suite now: the generic fallback is not used")
    method = validate.fixed_method("snapkv", "kvpress")
    suite = validate.suite_for_fixed("snapkv", method)
    assert suite.sequences is not None and validate.min_prompt_len(method) == method.window + 1


def test_flashinfer_adapters_skip_without_gpu():
    reason = adapters.flashinfer_unavailable()
    if reason is None:   # on a GPU machine with flashinfer: the real check
        for name, spec in (("dense", "flashinfer_dense"), ("quest", "flashinfer_quest")):
            report, _ = validate.validate(name, getattr(adapters, spec), examples=20, dtype="float16")
            assert report.ok, str(report)
        return
    with pytest.raises(RuntimeError, match="CUDA|flashinfer|torch"):
        adapters.flashinfer_dense(None, np.zeros((1, 4), np.float16), np.zeros((1, 3, 4), np.float16),
                                  np.zeros((1, 3, 4), np.float16))
    pytest.skip(reason)
