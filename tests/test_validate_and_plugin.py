"""`kvsparse validate` and the pytest plugin pass a correct user kernel and catch every planted bug,
naming the property it broke and saving an input that reproduces it."""
import subprocess
import sys
from pathlib import Path

import pytest

from kvsparse import cli
from kvsparse.property_tests import validate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "user_kernels.py"

CASES = [  # (method, kernel, expected exit status, property that must be named)
    ("dense", "dense_ok", 0, None),
    ("dense", "dense_wrong_scale", 1, "output"),
    ("quest", "quest_ok", 0, None),
    ("quest", "quest_partial_page_off_by_one", 1, "selection"),
    ("quest", "quest_per_group", 1, "selection"),
    ("streaming_llm", "streaming_ok", 0, None),
    ("streaming_llm", "streaming_dropped_sink", 1, "selection"),
    # statistical (module doc of property_tests/vattention.py, check_sampler): a correct sampler fails
    # with probability <= --alpha (1e-8 here, per run; its replay below at 1e-8/30; suite total in
    # tests/test_vattention_guarantee.py); the undersized sample must be caught
    ("vattention", "vattention_ok", 0, None),
    ("vattention", "vattention_quarter_budget", 1, "guarantee"),
]
GOOD = {"dense": "dense_ok", "quest": "quest_ok", "streaming_llm": "streaming_ok", "vattention": "vattention_ok"}


@pytest.mark.parametrize("method,kernel,status,prop", CASES, ids=[c[1] for c in CASES])
def test_validate_verdicts(method, kernel, status, prop, tmp_path, capsys):
    save = tmp_path / "fail.npz"
    code = cli.main(["validate", method, f"{EXAMPLES}:{kernel}", "--examples", "30", "--save", str(save),
                     "--alpha", "1e-8"])
    out = capsys.readouterr().out
    assert code == status, out
    if status == 0:
        assert "PASS" in out and not save.exists()
        return
    assert f"property broken: {prop}" in out and any(s in out for s in ("DecodeInput(", "DecodeSequence(T=", "sequence T="))
    if prop == "guarantee":   # the verdict states the measured rate, its interval and delta
        assert "95% CI [" in out and "vs delta" in out and "exact binomial test" in out
    # the saved input re-runs: the buggy kernel still fails on it, the correct one passes
    assert cli.main(["validate", method, f"{EXAMPLES}:{kernel}", "--replay", str(save)]) == 1
    assert cli.main(["validate", method, f"{EXAMPLES}:{GOOD[method]}", "--replay", str(save)]) == 0


def test_validate_usage_errors_exit_2(capsys):
    assert cli.main(["validate", "no-such-method", f"{EXAMPLES}:dense_ok"]) == 2
    assert cli.main(["validate", "dense", "no_such_module_xyz:fn"]) == 2
    assert cli.main(["validate", "dense", f"{EXAMPLES}:missing"]) == 2
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_ok", "--params", '{"no_field": 1}']) == 2
    assert cli.main(["validate", "quest", f"{EXAMPLES}:quest_ok", "--params", "[1]"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'no-such-method'" in err and "not hyper-parameters of 'quest'" in err


def test_fixed_params_and_seed():
    kernel = validate.load_callable(f"{EXAMPLES}:quest_ok")
    report, path = validate.validate("quest", kernel, params={"token_budget": 32, "page_size": 8}, examples=10, seed=7)
    assert report.ok and path is None and report.examples >= 10


def run_pytest(tmp_path, *args):
    (tmp_path / "test_nothing.py").write_text("def test_placeholder():\n    assert True\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=tmp_path)


def test_pytest_plugin_runs_the_suites_as_test_items(tmp_path):
    ok = run_pytest(tmp_path, "--kvsparse-kernel", f"quest={EXAMPLES}:quest_ok", "--kvsparse-examples", "10")
    assert ok.returncode == 0 and "2 passed" in ok.stdout, ok.stdout[-2000:]
    bad = run_pytest(tmp_path, "--kvsparse-kernel", f"quest={EXAMPLES}:quest_per_group",
                     "--kvsparse-kernel", f"dense={EXAMPLES}:dense_ok", "--kvsparse-examples", "20")
    assert bad.returncode == 1, bad.stdout[-2000:]
    assert "1 failed, 2 passed" in bad.stdout and "[FAIL] selection" in bad.stdout


def test_pytest_plugin_usage_error(tmp_path):
    res = run_pytest(tmp_path, "--kvsparse-kernel", "quest-without-equals")
    assert res.returncode != 0 and "METHOD=VALUE" in (res.stdout + res.stderr)
