"""The GPU benchmark script exists and works without a GPU: argument parsing, the plan, and every
code path on tiny shapes (Triton interpreter)."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode.py"


def test_dry_run_prints_the_plan_with_bytes():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--contexts", "32k", "--budgets", "4k"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["sdpa_flash", "triton_dense", "triton_sparse", "quest_step"]
    # dense fp16 K+V of 8 KV heads x 32768 tokens x 128 dims, with the simulator's prediction beside it
    assert "bytes=134217728" in lines[0] and "sim_h100-sxm_us=" in lines[0]
    sim_us = {line.split()[0]: float(line.split("sim_h100-sxm_us=")[1]) for line in lines}
    assert sim_us["triton_sparse"] < sim_us["quest_step"] and sim_us["triton_sparse"] < sim_us["sdpa_flash"]


def test_bad_arguments_exit_2():
    res = subprocess.run([sys.executable, str(SCRIPT), "--contexts", "0", "--dry-run"], capture_output=True, text=True)
    assert res.returncode == 2 and "positive" in res.stderr


def test_smoke_runs_every_kernel(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path / "r.jsonl"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    kernels = [__import__("json").loads(line)["kernel"] for line in out.read_text().splitlines()]
    assert kernels == ["sdpa_flash", "triton_dense", "triton_sparse", "quest_step"]
