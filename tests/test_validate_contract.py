"""The kernel contract at the edges of `kvsparse validate` and the suites: unimportable kernels are usage
errors (exit 2), failure files replay exactly (nested methods, the softmax scale) and only for their own
method, output verdicts show expected vs got, torch tensors are converted at the boundary, and a kernel
that ignores ``scale`` is caught."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from kvsparse import cli, registry
from kvsparse.oracle import core
from kvsparse.oracle.dense import Dense
from kvsparse.oracle.types import Selection
from kvsparse.property_tests import suites, validate
from kvsparse.property_tests.strategies import make_decode_input

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "user_kernels.py"
FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FIND_ONLY = settings(FEW, max_examples=300, phases=(Phase.explicit, Phase.generate))   # stop at the first failure


# --- (a) a kernel that cannot be imported is a usage error, not a bug found --------------------------

BROKEN = {
    "syntax.py": ("def kernel(method, q, k, v, *, positions=None, scale=None)\n    return q\n", "SyntaxError", "line 1"),
    "raises.py": ("import numpy\n\nraise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here", "line 3"),
    "missing_dep.py": ("import no_such_dependency_xyz\n", "ModuleNotFoundError", "line 1"),
}


@pytest.mark.parametrize("fname", sorted(BROKEN))
def test_unimportable_kernel_file_exits_2_with_a_clear_message(fname, tmp_path, capsys):
    text, what, where = BROKEN[fname]
    (tmp_path / fname).write_text(text)
    assert cli.main(["validate", "dense", f"{tmp_path / fname}:kernel", "--examples", "2"]) == 2
    err = capsys.readouterr().err
    assert "kvsparse validate: error: cannot import kernel file" in err and what in err and where in err, err
    assert "Traceback" not in err
    assert Path(fname).stem not in sys.modules          # a half-imported module is not left behind


def test_unimportable_kernel_module_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "kvs_broken_mod.py").write_text("x = 1 +\n")
    (tmp_path / "kvs_raising_mod.py").write_text("raise ValueError('bad config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["validate", "dense", "kvs_broken_mod:kernel"]) == 2
    assert cli.main(["validate", "dense", "kvs_raising_mod:kernel"]) == 2
    err = capsys.readouterr().err
    assert "cannot import kernel module 'kvs_broken_mod': SyntaxError" in err
    assert "cannot import kernel module 'kvs_raising_mod': ValueError: bad config" in err


def test_pytest_plugin_reports_an_unimportable_kernel_as_a_usage_error(tmp_path):
    (tmp_path / "conftest.py").write_text("")
    (tmp_path / "test_nothing.py").write_text("def test_placeholder():\n    assert True\n")
    (tmp_path / "kern.py").write_text("def kernel(:\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_nothing.py"),
                          "--kvsparse-kernel", f"dense={tmp_path / 'kern.py'}:kernel"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1 and "1 failed, 1 passed" in res.stdout, res.stdout[-2000:]
    assert "usage error: cannot import kernel file" in res.stdout and "SyntaxError" in res.stdout


# --- (b) method parameters round-trip exactly, nested methods included ---------------------------------

def _roundtrip(name, method):
    meta = {"method": name, "class": type(method).__name__, "params": validate.method_params(method)}
    return validate.saved_method(json.loads(json.dumps(meta)))


SUITE_METHODS = sorted(n for n, e in registry.entries().items() if e.oracle is not None and e.suite is not None)
ALL_PRESETS = [(n, p) for n, e in registry.entries().items() if e.oracle is not None for p in e.oracle.presets()]


@pytest.mark.parametrize("name,preset", ALL_PRESETS, ids=[f"{n}:{p}" for n, p in ALL_PRESETS])
def test_every_preset_round_trips_through_a_failure_file(name, preset):
    method = registry.oracle(name, preset)
    back = _roundtrip(name, method)
    assert back == method and type(back) is type(method)
    assert repr(back) == repr(method)


def test_presets_with_suites_are_all_covered():
    assert {"twilight", "quest", "double_sparsity", "h2o", "streaming_llm"} <= set(SUITE_METHODS)
    assert any(p != "canonical" for n, p in ALL_PRESETS if n == "twilight")


@pytest.mark.parametrize("name", SUITE_METHODS)
def test_drawn_hyper_parameters_round_trip(name):
    """What the suites draw (tuples of tuples for channels, nested Quest/DoubleSparsity bases) survives JSON."""
    suite = suites.suite_for(name)

    @FEW
    @given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.sampled_from([4, 8, 16]), st.data())
    def check(h_kv, g, n, d, data):
        method = data.draw(suite.methods(core.DecodeShapes(h_kv * g, h_kv, n, d)))
        assert _roundtrip(name, method) == method

    check()


def test_nested_base_is_stored_as_class_and_params():
    from kvsparse.oracle.quest import Quest
    from kvsparse.oracle.twilight import Twilight
    m = Twilight(base=Quest(token_budget=7, page_size=2), p=0.5)
    params = json.loads(json.dumps(validate.method_params(m)))
    assert params["base"]["class"] == "Quest" and params["base"]["method"] == "quest"
    assert params["base"]["params"]["token_budget"] == 7
    with pytest.raises(ValueError, match="not 'DoubleSparsity'"):
        bad = dict(params, base=dict(params["base"], **{"class": "DoubleSparsity"}))
        validate.saved_method({"method": "twilight", "class": "Twilight", "params": bad})


TWILIGHT_BUGGY = '''
import numpy as np
from kvsparse.kernels.numba.twilight import twilight


def off_by_a_little(method, q, k, v, *, positions=None, scale=None):
    out, idx = twilight(method, q, k, v, positions=positions, scale=scale)
    return out * np.float32(1.01), idx
'''


def test_twilight_failure_replays(tmp_path, capsys):
    (tmp_path / "tw_kernels.py").write_text(TWILIGHT_BUGGY)
    bad, good, save = f"{tmp_path / 'tw_kernels.py'}:off_by_a_little", "kvsparse.kernels.numba.twilight:twilight", tmp_path / "tw.npz"
    assert cli.main(["validate", "twilight", bad, "--examples", "10", "--save", str(save)]) == 1
    meta, *_ = validate.load_failure(save)
    assert isinstance(meta["params"]["base"], dict) and meta["params"]["base"]["class"] in ("Quest", "DoubleSparsity")
    assert cli.main(["validate", "twilight", bad, "--replay", str(save)]) == 1
    assert cli.main(["validate", "twilight", good, "--replay", str(save)]) == 0
    # a file from before this format (base saved as its repr) is refused with a reason, exit 2
    legacy = tmp_path / "legacy.npz"
    with np.load(save) as z:
        arrays = {key: z[key] for key in ("q", "k", "v")}
    meta["params"]["base"] = "Quest(token_budget=3, page_size=2)"
    np.savez(legacy, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    capsys.readouterr()
    assert cli.main(["validate", "twilight", good, "--replay", str(legacy)]) == 2
    assert "saved as text" in capsys.readouterr().err


# --- (c) --replay checks the method it replays ------------------------------------------------------

def test_replay_of_another_methods_file_is_a_usage_error(tmp_path, capsys):
    save = tmp_path / "quest.npz"
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_per_group", "--examples", "20", "--save", str(save)]) == 1
    capsys.readouterr()
    assert cli.main(["validate", "dense", f"{EXAMPLES}:dense_ok", "--replay", str(save)]) == 2
    err = capsys.readouterr().err
    assert "failing input of method 'quest', not 'dense'" in err
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_ok", "--replay", str(save),
                     "--params", '{"page_size": 4}']) == 2
    assert "cannot be combined with --replay" in capsys.readouterr().err
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_per_group", "--replay", str(save)]) == 1
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_ok", "--replay", str(save)]) == 0
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_ok", "--replay", str(tmp_path / "none.npz")]) == 2


# --- (d) an output failure shows the worst head's expected and got rows ----------------------------

def test_output_verdict_shows_expected_and_got_rows():
    x = make_decode_input(4, 2, 9, 8, "gaussian", 5)
    ref = core.attend_dense(x.q, x.k, x.v)
    got = ref.copy()
    got[2, 6] += 0.25
    res = suites.check_output(Dense(), got, x.q, x.k, x.v, Selection.full(4, 9), "float64")
    assert not res.ok
    assert f"worst query head 2, channel 6: expected {ref[2, 6]:.9g}, got {got[2, 6]:.9g}" in res.detail
    assert "channels 2..7 of 8: expected [..., " in res.detail
    assert f"{ref[2, 2]:.6g}" in res.detail and f"{got[2, 6]:.6g}" in res.detail


def test_validate_prints_the_rows(tmp_path, capsys):
    assert cli.main(["validate", "dense", f"{EXAMPLES}:dense_wrong_scale", "--examples", "10",
                     "--save", str(tmp_path / "f.npz")]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] output" in out and "worst query head" in out and ": expected [" in out and ", got [" in out


# --- torch tensors are converted at the boundary ----------------------------------------------------

class FakeCudaTensor:
    """Behaves like a CUDA torch tensor at the boundary: ``.numpy()`` refuses until ``.cpu()``."""

    def __init__(self, t, on_gpu=True):
        self.t, self.on_gpu, self.dtype = t, on_gpu, t.dtype

    def detach(self):
        return FakeCudaTensor(self.t.detach(), self.on_gpu)

    def float(self):
        return FakeCudaTensor(self.t.float(), self.on_gpu)

    def cpu(self):
        return FakeCudaTensor(self.t, False)

    def numpy(self):
        if self.on_gpu:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        return self.t.numpy()

    def __len__(self):
        return len(self.t)

    def __iter__(self):
        return (FakeCudaTensor(r, self.on_gpu) for r in self.t)


def test_as_kernel_step_converts_torch_tensors():
    torch = pytest.importorskip("torch")
    out = torch.randn(4, 8)
    idx = torch.tensor([[0, 2, 5]] * 4)
    w = torch.ones(4, 3, dtype=torch.float64)
    cases = {
        "bfloat16": out.bfloat16(),
        "float16": out.half(),
        "requires_grad": out.clone().requires_grad_(True) * 2,
        "float64": out.double(),
        "cuda (fake)": FakeCudaTensor(out.bfloat16().requires_grad_(True)),
    }
    for label, t in cases.items():
        step = suites.as_kernel_step((t, FakeCudaTensor(idx), FakeCudaTensor(w)), 4)
        assert isinstance(step.output, np.ndarray) and step.output.shape == (4, 8), label
        want = (t.t if isinstance(t, FakeCudaTensor) else t).detach().float().numpy()
        assert np.array_equal(step.output.astype(np.float32), want), label
        assert all(r.dtype == np.int64 and r.tolist() == [0, 2, 5] for r in step.indices), label
        assert all(r.dtype == np.float64 for r in step.weights)
    assert suites.as_kernel_step(out.double(), 4).output.dtype == np.float64     # no silent narrowing
    assert suites.as_kernel_step(out.half(), 4).output.dtype == np.float32       # exact widening


def _torch_dense(out_dtype, requires_grad):
    import torch

    def kernel(method, q, k, v, *, positions=None, scale=None):
        qt, kt, vt = (torch.tensor(np.asarray(a, np.float32), requires_grad=requires_grad) for a in (q, k, v))
        g = qt.shape[0] // kt.shape[0]
        kk, vv = kt.repeat_interleave(g, 0), vt.repeat_interleave(g, 0)
        s = (1 / math.sqrt(qt.shape[1])) if scale is None else scale
        p = torch.softmax(torch.einsum("hd,hnd->hn", qt, kk) * s, dim=-1)
        return torch.einsum("hn,hnd->hd", p, vv).to(out_dtype)
    return kernel


@pytest.mark.parametrize("out_dtype,dtype", [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_torch_kernel_with_grad_passes_the_dense_suite(out_dtype, dtype):
    torch = pytest.importorskip("torch")
    report = suites.run_suite("dense", _torch_dense(getattr(torch, out_dtype), True), dtype=dtype, settings=FEW)
    assert report.ok, str(report)


def test_a_wrong_torch_kernel_is_still_caught():
    torch = pytest.importorskip("torch")
    good = _torch_dense(torch.float32, True)
    bad = lambda method, q, k, v, **kw: good(method, q, k, v, **kw) * 1.001
    report = suites.run_suite("dense", bad, settings=FEW)
    assert not report.ok and report.failure.failures[0].name == "output"


# --- the softmax scale is drawn: a kernel ignoring it is caught --------------------------------------

def _ignoring_scale(name):
    kernel = registry.get(name).kernels["numba"]

    def ignores(method, q, k, v, *, positions=None, scale=None):
        return kernel(method, q, k, v, positions=positions, scale=None)
    return ignores


@pytest.mark.parametrize("name", ["dense", "quest", "sliding_window"])
def test_a_kernel_ignoring_scale_is_caught(name):
    report = suites.run_suite(name, _ignoring_scale(name), settings=FEW)
    assert not report.ok, f"{name}: a kernel ignoring scale passed"
    assert "scale=" in report.failure.input and report.failure.failures[0].name == "output"
    assert suites.run_suite(name, registry.get(name).kernels["numba"], settings=FEW).ok


def test_scales_are_mostly_none_and_explicit_sometimes():
    seen = []

    @FEW
    @given(suites.softmax_scales(16))
    def draw(s):
        seen.append(s)

    draw()
    explicit = {s for s in seen if s is not None}
    assert None in seen and explicit and explicit <= {0.125, 0.5, 1.0, 1.3}
    for s in explicit:
        core.check_scale(s)


STATEFUL_SUITES = sorted(n for n in SUITE_METHODS if registry.oracle(n).stateful)


def test_every_stateful_oracle_takes_the_scale_so_its_suite_draws_one():
    assert set(STATEFUL_SUITES) >= {"h2o", "corm", "snapkv", "pyramidkv", "streaming_llm", "clusterkv"}
    for name in STATEFUL_SUITES:
        assert suites.decode_takes_scale(registry.oracle(name)), name

    class NoScale:          # an oracle whose decode has no scale keeps the default: none is drawn
        def prefill(self, q, k, v, *, scale=None): ...

        def decode(self, state, q, k, v): ...
    assert not suites.decode_takes_scale(NoScale())


def _stateful_ignoring_scale(name, *, in_prefill=True, in_decode=True):
    base = registry.get(name).kernels["numba"]

    class Ignores:
        def prefill(self, method, *a, scale=None):
            state = base.prefill(method, *a, **({} if in_prefill else {"scale": scale}))
            if not in_decode:
                state.scale = scale       # the state claims the scale, so that decode accepts it
            return state

        def decode(self, method, state, *a, scale=None):
            return base.decode(method, state, *a, **({} if in_decode else {"scale": scale}))
    return Ignores()


@pytest.mark.parametrize("name", STATEFUL_SUITES)
def test_a_stateful_kernel_ignoring_scale_is_caught(name):
    report = suites.run_suite(name, _stateful_ignoring_scale(name), settings=FIND_ONLY)
    assert not report.ok, f"{name}: a stateful kernel ignoring scale passed"
    assert "scale=" in report.failure.input, str(report.failure)
    assert report.failure.failures[0].name in ("output", "selection"), str(report.failure)
    assert suites.run_suite(name, registry.get(name).kernels["numba"], settings=FEW).ok


@pytest.mark.parametrize("name", ["h2o", "corm", "snapkv"])
def test_a_prefill_ignoring_scale_is_caught(name):
    """The prompt's scores (accumulated attention, the window vote) are formed with the scale too."""
    from kvsparse.oracle.corm import CORM
    from kvsparse.oracle.h2o import H2O
    from kvsparse.oracle.snapkv import SnapKV
    from kvsparse.property_tests import suites_eviction
    from kvsparse.property_tests.sequences import make_decode_sequence
    method = {"h2o": H2O(heavy=3, recent=1), "corm": CORM(window=2, threshold=1.0),
              "snapkv": SnapKV(window=2, capacity=6, kernel=1, pool="none")}[name]
    seq = make_decode_sequence(14, 2, 1, 8, prefill_len=10, seed=4)
    suites_eviction.remember(seq.q_seq, seq.k_seq)
    scores = suites.suite_for(name).scores
    check = lambda kernel, scale: suites.check_decode(method, kernel, seq.q_seq, seq.k_seq, seq.v_seq,  # noqa: E731
                                                      prefill_len=seq.prefill_len, scale=scale, scores=scores)
    buggy = _stateful_ignoring_scale(name, in_decode=False)
    assert all(v.ok for v in check(buggy, None))                   # at the default scale nothing differs
    assert all(v.ok for v in check(registry.get(name).kernels["numba"], 2.0))
    verdicts = check(buggy, 2.0)
    assert not verdicts[-1].ok and verdicts[-1].failures[0].name == "selection", str(verdicts[-1])


def test_a_prefill_without_scale_follows_the_older_contract():
    """A prefill with no ``scale`` parameter is called without it: fine where the prompt is not scored
    (StreamingLLM), caught where it is (H2O); the verdict says so."""
    def old_contract(name):
        base = registry.get(name).kernels["numba"]

        class Old:
            def prefill(self, method, q, k, v):
                return base.prefill(method, q, k, v)

            def decode(self, method, state, *a, scale=None):
                state.scale = None            # a state of its own, without the scale
                return base.decode(method, state, *a, scale=scale)
        return Old()

    assert not suites.prefill_takes_scale(old_contract("h2o"))
    assert suites.prefill_takes_scale(registry.get("h2o").kernels["numba"])
    assert suites.run_suite("streaming_llm", old_contract("streaming_llm"), settings=FEW).ok
    report = suites.run_suite("h2o", old_contract("h2o"), settings=FIND_ONLY)
    assert not report.ok and "prefill takes no scale: called without it" in report.failure.input, str(report)


def test_a_scale_failure_replays_with_its_scale(tmp_path, capsys):
    (tmp_path / "ign.py").write_text(
        "from kvsparse.kernels.numba.dense import dense\n\n"
        "def ignores(method, q, k, v, *, positions=None, scale=None):\n"
        "    return dense(method, q, k, v, positions=positions)\n")
    save = tmp_path / "scale.npz"
    assert cli.main(["validate", "dense", f"{tmp_path / 'ign.py'}:ignores", "--examples", "30", "--save", str(save)]) == 1
    assert "scale=" in capsys.readouterr().out
    meta, *_ = validate.load_failure(save)
    assert meta["scale"] is not None
    assert cli.main(["validate", "dense", f"{tmp_path / 'ign.py'}:ignores", "--replay", str(save)]) == 1
    assert cli.main(["validate", "dense", f"{EXAMPLES}:dense_ok", "--replay", str(save)]) == 0


def test_a_real_cuda_tensor_is_converted():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA path is covered by FakeCudaTensor above")
    out = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.arange(3, device="cuda").repeat(4, 1)
    step = suites.as_kernel_step((out * 1, idx), 4)
    assert np.array_equal(step.output, out.detach().float().cpu().numpy())
    assert [r.tolist() for r in step.indices] == [[0, 1, 2]] * 4
