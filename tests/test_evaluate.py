"""kvsparse evaluate: exact quality metrics on a trace beside simulated cost."""
import numpy as np
import pytest

from kvsparse import cli
from kvsparse.oracle import core
from kvsparse.oracle.quest import Quest
from kvsparse.sim.evaluate import DEFAULT_TRACE, evaluate, method_with_budget, quality_rows
from kvsparse.traces.format import load_trace


@pytest.fixture(scope="module")
def short_layer():
    trace = load_trace(DEFAULT_TRACE)
    return tuple(np.asarray(a[:400], np.float64) for a in trace.layer(trace.layers[0]).sequences())


def test_budget_covering_the_context_is_exact(short_layer):
    row = quality_rows(*short_layer, Quest(token_budget=4096), steps=3)
    assert row["rel_error"] == 0.0 and row["mass"] == pytest.approx(1.0) and row["topk_overlap"] == 1.0


def test_metrics_against_a_hand_computation(short_layer):
    q, k, v = short_layer
    method = Quest(token_budget=64, page_size=16)
    row = quality_rows(q, k, v, method, steps=1)
    t = q.shape[0] - 1
    kc, vc = k[: t + 1].transpose(1, 0, 2), v[: t + 1].transpose(1, 0, 2)
    res = method.step(q[t], kc, vc)
    p = core.softmax(core.logits(q[t], kc))
    exact = core.attend_dense(q[t], kc, vc)
    errs = [np.linalg.norm(res.output[h] - exact[h]) / np.linalg.norm(exact[h]) for h in range(q.shape[1])]
    mass = [p[h, res.selection.indices[h]].sum() for h in range(q.shape[1])]
    overlap = [len(set(res.selection.indices[h]) & set(np.argsort(-p[h], kind="stable")[: res.selection.sizes[h]]))
               / res.selection.sizes[h] for h in range(q.shape[1])]
    assert row["rel_error"] == pytest.approx(np.mean(errs))
    assert row["mass"] == pytest.approx(np.mean(mass))
    assert row["topk_overlap"] == pytest.approx(np.mean(overlap))
    assert 0 < row["mass"] < 1 and 0 < row["topk_overlap"] <= 1


def test_more_budget_is_never_worse_for_quest_on_the_trace():
    rows = [r for r in evaluate(DEFAULT_TRACE, ["quest"], [64, 256, 1024], steps=2) if r["layer"] == "all"]
    errs = [r["rel_error"] for r in rows]
    times = [r["us_per_token"] for r in rows]
    assert errs[0] > errs[1] > errs[2] and times[0] < times[1] < times[2]


def test_method_with_budget_sets_the_cost_models_parameter():
    assert method_with_budget("quest", 128).token_budget == 128
    with pytest.raises(ValueError, match="no budget hyper-parameter"):
        method_with_budget("dense", 128)
    with pytest.raises(ValueError, match="budget must be > 0"):
        method_with_budget("quest", 0)


def test_cli_writes_table_csv_and_plot(tmp_path, capsys):
    csv_path, png = tmp_path / "e.csv", tmp_path / "e.png"
    assert cli.main(["evaluate", "--methods", "quest,sparq", "--budgets", "64,256", "--steps", "2",
                     "--csv", str(csv_path), "--plot", str(png), "--context", "32k", "--model", "llama-3-8b"]) == 0
    out = capsys.readouterr().out
    assert "rel_error" in out and "context 32768" in out
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * 3          # header + (method, budget) x (2 layers + overall)
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 1000
    assert cli.main(["evaluate", "--layers", "5"]) == 2
