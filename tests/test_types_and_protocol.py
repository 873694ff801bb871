"""Selection, Layout, Traffic, the method protocol, the registry and the CLI."""
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvsparse import cli, registry
from kvsparse.oracle import Layout, Method, Selection, Traffic, core, kv_traffic, run_decode
from kvsparse.oracle.dense import Dense
from kvsparse.property_tests.strategies import decode_inputs, make_decode_input


def test_selection_normalises_and_validates():
    sel = Selection(([3, 1, 2], np.array([], int)), n=5)
    assert [list(i) for i in sel.indices] == [[1, 2, 3], []]
    assert list(sel.sizes) == [3, 0]
    with pytest.raises(ValueError, match="duplicate"):
        Selection(([1, 1],), n=5)
    with pytest.raises(ValueError, match=r"indices\[0\] must lie in \[0, 5\)"):
        Selection(([5],), n=5)
    with pytest.raises(ValueError, match=r"weights\[0\] must have one weight per index"):
        Selection(([1, 2],), n=5, weights=([1.0],))
    with pytest.raises(ValueError, match="non-negative"):
        Selection(([1],), n=5, weights=([-1.0],))


def test_selection_kv_union_and_per_kv_head():
    sel = Selection(([0, 1], [1, 4], [2], [3]), n=5)
    assert [list(u) for u in sel.kv_union(2)] == [[0, 1, 4], [2, 3]]
    shared = Selection.per_kv_head([[0, 2], [4]], h_q=4, n=5)
    assert [list(i) for i in shared.indices] == [[0, 2], [0, 2], [4], [4]]
    assert Selection.from_mask(shared.mask()) == shared


def test_kv_traffic_hand_counts():
    sel = Selection(([0, 1], [1, 4], [2], [3]), n=5)
    d = 8
    shared = kv_traffic(sel, 2, d, Layout(element_bits=16))
    # KV head 0 reads rows {0,1,4}, KV head 1 rows {2,3}: 5 rows x 8 channels x 2 bytes, keys and values
    assert shared.get("hbm", "keys") == 5 * 8 * 2 and shared.get("hbm", "values") == 5 * 8 * 2
    per_head = kv_traffic(sel, 2, d, Layout(element_bits=16, share_kv_heads=False))
    assert per_head.get("hbm", "keys") == 6 * 8 * 2
    paged = kv_traffic(sel, 2, d, Layout(element_bits=16, page_size=4))
    # pages of 4: head 0 touches page 0 (4 rows) and page 1 (1 filled row); head 1 touches page 0 (4 rows)
    assert paged.get("hbm", "keys") == (4 + 1 + 4) * 8 * 2
    int4 = kv_traffic(sel, 2, d, Layout(element_bits=4))
    assert int4.get("hbm", "keys") == 5 * 8 // 2
    assert int4.total == 2 * 5 * 4


def test_traffic_arithmetic_and_validation():
    a = Traffic({("hbm", "keys"): 10, ("pcie", "values"): 3})
    b = Traffic({("hbm", "keys"): 5, ("hbm", "metadata"): 2})
    c = a + b
    assert c.get("hbm", "keys") == 15 and c.by_memory("hbm") == 17 and c.by_tensor("values") == 3 and c.total == 20
    assert c.to_dict()["pcie.values"] == 3
    with pytest.raises(ValueError, match="memory must be one of"):
        Traffic({("l2", "keys"): 1})
    with pytest.raises(ValueError, match="non-negative integer"):
        Traffic({("hbm", "keys"): 1.5})
    with pytest.raises(ValueError, match="different layouts"):
        a + Traffic({}, Layout(page_size=16))
    with pytest.raises(ValueError, match="element_bits"):
        Layout(element_bits=12)


@given(decode_inputs(max_n=50))
def test_dense_method_step_is_dense_attention_with_full_traffic(x):
    res = Dense().step(x.q, x.k, x.v)
    h_q, d = x.q.shape
    h_kv, n, _ = x.k.shape
    assert np.allclose(res.output, core.attend_dense(x.q, x.k, x.v), rtol=1e-12, atol=1e-14)
    assert res.selection == Selection.full(h_q, n)
    assert res.traffic.get("hbm", "keys") == h_kv * n * d * 2 == res.traffic.get("hbm", "values")
    assert res.traffic.total == 2 * h_kv * n * d * 2
    # a GQA-unaware layout pays G times more
    unshared = Dense().step(x.q, x.k, x.v, layout=Layout(share_kv_heads=False))
    assert unshared.traffic.total == res.traffic.total * (h_q // h_kv)


def test_run_decode_for_a_stateless_method_attends_to_the_prefix_including_itself():
    x = make_decode_input(2, 1, 9, 4, seed=4)
    q_seq = np.stack([x.q] * 9)
    k_seq, v_seq = x.k.transpose(1, 0, 2), x.v.transpose(1, 0, 2)
    run = run_decode(Dense(), q_seq, k_seq, v_seq, prefill_len=6)
    assert len(run.steps) == 3
    for j, step in enumerate(run.steps):
        t = 6 + j
        assert step.selection.n == t + 1
        assert np.allclose(step.output, core.attend_dense(x.q, x.k[:, : t + 1], x.v[:, : t + 1]))
    with pytest.raises(ValueError, match="prefill_len must be < T"):
        run_decode(Dense(), q_seq, k_seq, v_seq, prefill_len=9)
    with pytest.raises(ValueError, match="must agree on T"):
        run_decode(Dense(), q_seq[:5], k_seq, v_seq, prefill_len=2)


def test_method_step_validates_positions():
    x = make_decode_input(2, 1, 5, 4)
    with pytest.raises(ValueError, match=r"positions must have shape \(5,\)"):
        Dense().step(x.q, x.k, x.v, positions=np.arange(4))
    with pytest.raises(TypeError, match="positions must be integers"):
        Dense().step(x.q, x.k, x.v, positions=np.arange(5.0))


def test_registry_table_is_computed_from_registrations():
    rows = {r["method"]: r for r in registry.coverage_rows()}
    assert rows["dense"]["oracle"] == "yes" and "canonical" in rows["dense"]["presets"]

    @registry.register_method
    @dataclass(frozen=True)
    class _Probe(Method):
        name = "zz-probe"
        family = "test"

    registry.register_kernel("zz-probe", "numba")(lambda *a: None)
    try:
        rows = {r["method"]: r for r in registry.coverage_rows()}
        assert rows["zz-probe"]["oracle"] == "yes" and rows["zz-probe"]["numba"] == "yes"
        assert rows["zz-probe"]["triton"] == "" and rows["zz-probe"]["sim cost"] == ""
        with pytest.raises(ValueError, match="already has an oracle"):
            registry.register_method(type("Other", (Method,), {"name": "zz-probe"}))
        with pytest.raises(ValueError, match="backend must be one of"):
            registry.register_kernel("zz-probe", "cuda")
    finally:
        registry._ENTRIES.pop("zz-probe")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="no preset 'x'"):
        registry.oracle("dense", "x")


def test_cli_methods_table_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "kvsparse", "methods"], capture_output=True, text=True, check=True)
    assert "dense" in out.stdout and "oracle" in out.stdout
    n_rows = len(registry.coverage_rows())
    assert f"{n_rows} methods" in out.stdout


def test_cli_demo_prints_precision_and_every_oracle(capsys):
    assert cli.main(["demo", "--n", "256"]) == 0
    out = capsys.readouterr().out
    assert "naive float16" in out
    for name in registry.entries():
        assert name in out


def test_cli_report_is_the_main_job(capsys):
    assert cli.main(["report", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "methods; oracle:" in out and "Quality on a real trace" in out
    assert "quest            128" in out and "dense attention, same model/GPU/context" in out


def test_cli_usage_errors_exit_2(capsys):
    assert cli.main(["demo", "--n", "0"]) == 2
    assert "n must be" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_format_table_aligns_columns():
    text = cli.format_table([{"a": 1, "b": "xyz"}, {"a": 22.5, "b": ""}])
    lines = text.splitlines()
    assert lines[0].index("b") == lines[2].index("xyz") == lines[1].index(" -") + 1
    assert lines[3].startswith("22.5")
