"""The property suites draw their inputs from attention traces as well as from strategies
(``run_suite(..., inputs=)``, ``kvsparse validate --inputs``, ``pytest --kvsparse-inputs``): our Numba
kernels pass on the shipped SmolLM2 trace (stateless steps, and stateful decodes of a prefix of one
layer), a planted bug is caught on trace inputs, and the command line runs end to end."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from kvsparse import cli, registry
from kvsparse.property_tests import plugin, suites, trace_inputs, validate
from kvsparse.property_tests.sequences import DecodeSequence

registry.load_all()
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "user_kernels.py"
FEW = settings(max_examples=12, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))
FIND = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
TRACE = trace_inputs.shipped_trace()


def numba_kernel(name):
    return registry.get(name).kernels["numba"]


# --- our kernels pass their suites on trace inputs ------------------------------------------------

@pytest.mark.parametrize("name,max_n", [("dense", 96), ("quest", 96), ("sparq", 96), ("h2o", 16), ("snapkv", 16),
                                        ("corm", 12)])
def test_numba_kernels_pass_their_suites_on_the_shipped_trace(name, max_n):
    report = suites.run_suite(name, numba_kernel(name), settings=FEW, inputs="trace", max_n=max_n)
    assert report.ok, str(report)
    assert report.examples >= 12 and "inputs: trace" in report.notes


@pytest.mark.parametrize("inputs", ["synthetic", "mixed"])
@pytest.mark.parametrize("name", ["quest", "h2o"])
def test_synthetic_and_mixed_inputs(name, inputs):
    report = suites.run_suite(name, numba_kernel(name), settings=FEW, inputs=inputs, max_n=16)
    assert report.ok, str(report)


def test_trace_inputs_are_what_the_kernel_sees():
    """Stateless: steps of the trace (n <= max_n). Stateful: tokens 0..T-1 of one layer, prefill then decode."""
    seen_steps, seen_prompts = [], []
    dense, h2o = numba_kernel("dense"), numba_kernel("h2o")

    def spy_dense(method, q, k, v, **kw):
        seen_steps.append((q, k))
        return dense(method, q, k, v, **kw)

    class SpyH2O:
        def prefill(self, method, q, k, v, **kw):
            seen_prompts.append(k)
            return h2o.prefill(method, q, k, v, **kw)

        def decode(self, method, state, *a, **kw):
            return h2o.decode(method, state, *a, **kw)

    assert suites.run_suite("dense", spy_dense, settings=FEW, inputs="trace", max_n=40).ok
    assert suites.run_suite("h2o", SpyH2O(), settings=FEW, inputs="trace", max_n=10).ok
    assert seen_steps and seen_prompts
    for q, k in seen_steps:
        n = k.shape[1]
        assert q.shape == (TRACE.h_q, TRACE.d) and 1 <= n <= 40
        assert any(np.array_equal(q, TRACE.layer(L).q[n - 1].astype(np.float32)) for L in TRACE.layers)
    for k in seen_prompts:
        p = k.shape[0]
        assert 1 <= p < 10 and any(np.array_equal(k, TRACE.layer(L).k[:p].astype(np.float32)) for L in TRACE.layers)


def test_trace_sequence_is_a_prefix_of_the_layer():
    seq = trace_inputs.trace_decode_sequence(TRACE, 27, 12, 5)
    full = TRACE.layer(27).sequences()
    for got, want in zip((seq.q_seq, seq.k_seq, seq.v_seq), full):
        assert got.dtype == np.float64 and np.array_equal(got, want[:12])
    assert seq.prefill_len == 5 and seq.family == "trace:smollm2-135m_gpl3_2048:L27" and seq.seed == 0

    @FEW
    @given(trace_inputs.trace_decode_sequences(TRACE, min_prefill=5, max_length=9))
    def bounds(s):
        assert 5 <= s.prefill_len < s.length <= 9

    bounds()


# --- a planted bug is caught on trace inputs ------------------------------------------------------

def quest_whole_pages_only(method, q, k, v, *, positions=None, scale=None):
    """Planted bug: counts pages as ``n // P``, so the partial last page is never seen (the real
    kernel on the cache cut to whole pages)."""
    n, p = k.shape[1], method.page_size
    cut = n - n % p if n >= p else n
    return numba_kernel("quest")(method, q, k[:, :cut], v[:, :cut], positions=positions, scale=scale)


def test_a_planted_quest_bug_is_caught_on_trace_inputs():
    report = suites.run_suite("quest", quest_whole_pages_only, settings=FIND, inputs="trace", max_n=96)
    assert not report.ok, "the partial-page bug was not found on trace inputs"
    assert "family='trace:smollm2-135m_gpl3_2048:L" in report.failure.input
    assert report.failure.failures[0].name == "selection", str(report.failure)


def test_a_planted_h2o_bug_is_caught_on_trace_sequences():
    from kvsparse.kernels.numba.h2o import H2OKernel

    class LowestScoresAreHeavy(H2OKernel):
        """Planted bug: keeps the tokens with the LOWEST accumulated attention as heavy hitters."""

        @staticmethod
        def evict(kept, scores, heavy, recent, protect_leaving):
            return H2OKernel.evict(kept, -scores, heavy, recent, protect_leaving)

    report = suites.run_suite("h2o", LowestScoresAreHeavy(), settings=FIND, inputs="trace", max_n=16)
    assert not report.ok and report.failure.failures[0].name == "selection", str(report)
    assert "family='trace:smollm2-135m_gpl3_2048:L" in report.failure.input


# --- kvsparse validate --inputs and the plugin -----------------------------------------------------

def test_validate_inputs_trace_end_to_end(tmp_path, capsys):
    assert cli.main(["validate", "dense", f"{EXAMPLES}:dense_ok", "--inputs", "trace", "--examples", "8"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "note: inputs: trace" in out
    # stateful: a kernel with the older prefill signature (no scale) still runs, on trace prefixes
    assert cli.main(["validate", "streaming_llm", f"{EXAMPLES}:streaming_ok", "--inputs", "trace",
                     "--examples", "5"]) == 0
    save = tmp_path / "fail.npz"
    code = cli.main(["validate", "quest", f"{EXAMPLES}:quest_partial_page_off_by_one", "--inputs", "trace",
                     "--examples", "40", "--save", str(save)])
    out = capsys.readouterr().out
    assert code == 1 and "property broken: selection" in out and "family='trace:smollm2" in out, out
    # the saved trace input replays: the buggy kernel fails on it, the correct one passes
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_partial_page_off_by_one", "--replay", str(save)]) == 1
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_ok", "--replay", str(save)]) == 0


def test_validate_with_another_trace_file(tmp_path, capsys):
    from kvsparse.traces.synthetic import preset, synthetic_trace
    path = tmp_path / "tiny.safetensors"
    synthetic_trace(preset("smollm2-late", n_tokens=64, n_heads=4, n_kv_heads=2, head_dim=16)).save(path)
    assert cli.main(["validate", "quest", "kvsparse.kernels.numba.quest:quest", "--inputs", "trace",
                     "--trace", str(path), "--examples", "6"]) == 0
    assert "tiny.safetensors" in capsys.readouterr().out


def test_pytest_plugin_takes_kvsparse_inputs(tmp_path):
    assert plugin.INPUT_SOURCES == suites.INPUT_SOURCES
    (tmp_path / "test_nothing.py").write_text("def test_placeholder():\n    assert True\n")
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_nothing.py"),
            "--kvsparse-examples", "10", "--kvsparse-inputs", "trace"]
    ok = subprocess.run(base + ["--kvsparse-kernel", f"dense={EXAMPLES}:dense_ok"], capture_output=True, text=True,
                        cwd=tmp_path)
    assert ok.returncode == 0 and "2 passed" in ok.stdout, ok.stdout[-2000:]
    bad = subprocess.run(base + ["--kvsparse-kernel", f"dense={EXAMPLES}:dense_wrong_scale"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "1 failed" in bad.stdout and "family='trace:smollm2" in bad.stdout, bad.stdout[-2000:]
    wrong = subprocess.run(base[:-1] + ["nope", "--kvsparse-kernel", f"dense={EXAMPLES}:dense_ok"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert wrong.returncode != 0 and "--kvsparse-inputs" in wrong.stderr


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_choices_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="inputs must be one of"):
        suites.run_suite("dense", numba_kernel("dense"), inputs="traces")
    with pytest.raises(ValueError, match="max_n"):
        suites.run_suite("dense", numba_kernel("dense"), inputs="trace", max_n=0)
    with pytest.raises(ValueError, match="trace is read only with inputs='trace' or 'mixed'"):
        suites.run_suite("dense", numba_kernel("dense"), trace=TRACE)
    with pytest.raises(ValueError, match="inputs must be 'strategies' for 'vattention'"):
        validate.validate("vattention", numba_kernel("dense"), inputs="trace")
    with pytest.raises(ValueError, match="prefill_len must be < length"):
        trace_inputs.trace_decode_sequence(TRACE, 3, 5, 5)
    with pytest.raises(ValueError, match="length must be <= the trace's T=2048"):
        trace_inputs.trace_decode_sequence(TRACE, 3, 4096, 5)
    with pytest.raises(ValueError, match="layer 4 is not in the trace"):
        trace_inputs.trace_decode_sequences(TRACE, layers=[4])
    with pytest.raises(ValueError, match="min_prefill"):
        trace_inputs.trace_decode_sequences(TRACE, min_prefill=2048)
    ok = f"{EXAMPLES}:dense_ok"
    assert cli.main(["validate", "dense", ok, "--inputs", "trace", "--trace", str(tmp_path / "none.safetensors")]) == 2
    assert cli.main(["validate", "dense", ok, "--trace", str(EXAMPLES)]) == 2
    assert cli.main(["validate", "dense", ok, "--inputs", "trace", "--replay", str(tmp_path / "f.npz")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "trace is read only with" in err and "cannot be combined with --replay" in err
    with pytest.raises(SystemExit):
        cli.main(["validate", "dense", ok, "--inputs", "nope"])


def test_explicit_examples_accept_a_decode_sequence():
    from kvsparse.oracle.h2o import H2O
    seq = trace_inputs.trace_decode_sequence(TRACE, 3, 8, 4)
    assert isinstance(seq, DecodeSequence)
    report = suites.run_suite("h2o", numba_kernel("h2o"), settings=settings(max_examples=1, database=None),
                              examples=[(H2O(heavy=2, recent=1), seq, 1.3)])
    assert report.ok and report.examples >= 2, str(report)
    wrong = dataclasses.replace(H2O(heavy=2, recent=1), recent=2)

    class WrongRecent:
        def prefill(self, method, *a, **kw):
            return numba_kernel("h2o").prefill(wrong, *a, **kw)

        def decode(self, method, state, *a, **kw):
            return numba_kernel("h2o").decode(wrong, state, *a, **kw)

    bad = suites.run_suite("h2o", WrongRecent(), examples=[(H2O(heavy=2, recent=1), seq)])
    assert not bad.ok and bad.failure.input.startswith("DecodeSequence(T=8") and "L3" in bad.failure.input
