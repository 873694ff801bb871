"""``kvsparse sim`` / ``sweep`` / ``budget`` on built-in defaults, and the token-count parser."""
from __future__ import annotations

import csv
import json

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
    assert "faster than dense from context" in capsys.readouterr().out


def test_budget_command(capsys):
    assert main(["budget", "--method", "quest", "--context", "64k", "--target-us", "20000", "--cuda-graphs"]) == 0
    assert "largest budget" in capsys.readouterr().out
