"""``kvsparse sim`` / ``sweep`` / ``budget`` on built-in defaults, and the token-count parser."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from kvsparse.cli import main
from kvsparse.sim.cli import parse_list, parse_tokens


def test_parse_tokens_and_lists():
    assert parse_tokens("32k") == 32768 and parse_tokens("4096") == 4096 and parse_tokens("1m") == 1 << 20
    assert parse_list("1k,2k") == [1024, 2048]
    assert parse_list("geom:1k:8k:4") == [1024, 2048, 4096, 8192]
    for bad in ("abc", "0", "1.5"):
        with pytest.raises(ValueError):
            parse_tokens(bad)


def test_sim_table_and_json(capsys):
    assert main(["sim", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--method", "quest", "--budget", "2048",
                 "--context", "32k"]) == 0
    out = capsys.readouterr().out
    for text in ("quest_estimate", "quest_topk", "sparse_attention", "dense_attention", "lm_head",
                 "time per step", "speed-up over dense"):
        assert text in out
    assert main(["sim", "--method", "dense", "--context", "4k,8k", "--json", "--generate", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["contexts"] == [4096, 8192] and data["summary"]["generation_s"] > 0
    # fp16 Llama-3-8B: 128 KiB of K/V per token
    kv = data["summary"]["hbm_read_GB_by_tensor"]
    assert (kv["keys"] + kv["values"]) * 1e9 == pytest.approx(131072 * (4096 + 8192))


def test_sim_errors_are_reported(capsys):
    assert main(["sim", "--gpu", "tpu-v5"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
    assert main(["sim", "--method", "quest", "--kv", "fp4"]) == 2


def test_sweep_writes_csv_and_plot(tmp_path, capsys):
    out, png = tmp_path / "s.csv", tmp_path / "s.png"
    assert main(["sweep", "--methods", "dense,quest", "--gpus", "h100-sxm,a100-80gb", "--budgets", "512,1k",
                 "--contexts", "4k,16k,64k", "--out", str(out), "--plot", str(png)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 * 2 * 2 * 3
    assert {r["method"] for r in rows} == {"dense", "quest"} and png.stat().st_size > 0
    text = capsys.readouterr().out
    assert "faster than dense from context" in text and "a row of panels per GPU: h100-sxm, a100-80gb" in text


def plotted_gpus(fig, result) -> list[str]:
    """Which swept GPU each row of the sweep figure shows, read from the plotted numbers (not titles)."""
    c, b = result.contexts.size - 1, result.budgets.size // 2
    axes = fig.axes
    assert len(axes) == 2 * len(result.gpus)
    shown = []
    for row in range(len(axes) // 2):
        ax_b, ax_c = axes[2 * row], axes[2 * row + 1]
        match = [key for g, key in enumerate(result.gpus)
                 if all(np.allclose(line.get_ydata(), result.step_seconds[m, g, :, c] * 1e3)
                        for m, line in enumerate(ax_b.get_lines()))
                 and all(np.allclose(line.get_ydata(), result.step_seconds[m, g, b, :] * 1e3)
                         for m, line in enumerate(ax_c.get_lines()))]
        assert len(match) == 1, f"row {row} matches GPUs {match}"
        assert match[0] in ax_b.get_title() and match[0] in ax_c.get_title()
        shown.append(match[0])
    return shown


def test_sweep_figure_has_a_row_per_gpu(monkeypatch):
    import matplotlib.pyplot as plt
    from kvsparse.sim import sweep as sw
    res = sw.sweep("llama-3-8b", ["h100-sxm", "a100-80gb", "rtx-4090"], ["dense", "quest"], [512, 1024],
                   [4096, 16384, 65536])
    fig = sw.figure(res)
    assert plotted_gpus(fig, res) == ["h100-sxm", "a100-80gb", "rtx-4090"]
    plt.close(fig)
    fig = sw.figure(res, gpus=["rtx-4090"])
    assert [ax.get_title().split(" on ")[-1].split(",")[0] for ax in fig.axes[:1]] == ["rtx-4090"]
    plt.close(fig)
    with pytest.raises(ValueError, match="gpus"):
        sw.figure(res, gpus=["tpu-v5"])
    # planted bug: every row drawn from the first GPU (the old behaviour) is caught
    real = sw._draw_gpu
    monkeypatch.setattr(sw, "_draw_gpu", lambda a, b, r, g: real(a, b, r, 0))
    fig = sw.figure(res)
    assert plotted_gpus(fig, res) == ["h100-sxm"] * 3 != res.gpus
    plt.close(fig)


def test_budget_command(capsys):
    assert main(["budget", "--method", "quest", "--context", "64k", "--target-us", "20000", "--cuda-graphs"]) == 0
    assert "largest budget" in capsys.readouterr().out


def test_tables_print_large_numbers_without_e_notation(capsys):
    """Values from 10,000 up print as whole numbers with thousands separators (not 2.099e+04). Llama-3.1-70B
    (80 layers, hidden 8192, intermediate 28672), fp16: the MLP gate/up GEMV reads 80 * 2 * 8192 * 28672 * 2 B
    of weights plus an 8192-element fp16 input per layer = 75,163.24 MB per step."""
    import re
    from kvsparse.cli import format_table
    table = format_table([{"x": 20990.4}, {"x": 9999.5}, {"x": 1629.4}, {"x": 0.0005}])
    cells = [c.strip() for c in table.splitlines()[2:]]
    assert cells == ["20,990", "10,000", "1629", "5.000e-04"]
    assert main(["sim", "--model", "llama-3.1-70b", "--method", "dense", "--context", "128k"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[1]
    assert not re.search(r"\de\+\d", table)
    mlp = (80 * 2 * 8192 * 28672 * 2 + 80 * 8192 * 2) / 1e6
    row = next(line for line in table.splitlines() if line.startswith("mlp_gate_up"))
    assert f"{mlp:,.0f}" == "75,163" and row.split()[2] == "75,163"
