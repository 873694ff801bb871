#!/usr/bin/env bash
# One prepared GPU session (issue 9), for the `device` tool's H100/H200 machine or any CUDA box:
#   bash benchmarks/gpu_session.sh [OUTDIR]        (OUTDIR defaults to $OUT, else benchmarks/results)
# 1. the decode benchmark (records the simulator calibrates from, floors printed beside them);
# 2. the Triton kernel tests, natively on the GPU with their larger GPU shapes;
# 3. the simulator's prediction error against the new records.
# Uses the machine's own torch/triton; kvsparse is taken from this checkout (no install needed).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
    >"$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$out/gpu.txt"
timeout 300 python3 benchmarks/gpu_decode.py --out "$out/gpu_decode.jsonl" 2>&1 | tee "$out/gpu_decode.log"
bench=$?
timeout 240 python3 -m pytest -q -x -p no:cacheprovider -m triton tests/test_kernels_triton_attention.py \
    tests/test_kernels_triton_methods.py tests/test_kernels_triton_suites.py 2>&1 | tee "$out/tests.log"
tests=$?
python3 - "$out/gpu_decode.jsonl" <<'PY' 2>&1 | tee "$out/sim_error.txt"
import json, sys
sys.path.insert(0, "benchmarks")
import gpu_decode
from kvsparse.sim import hardware
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
args = gpu_decode.build_parser().parse_args([])
cal = hardware.calibrated(hardware.for_device_name(rows[0]["gpu"]), rows)
print("calibrated efficiency curve (from the dense kernels):", cal.efficiency)
print(f"{'kernel':20s} {'n':>7s} {'B':>7s} {'measured us':>12s} {'graph us':>9s} {'catalog sim':>12s} "
      f"{'error':>7s} {'calibrated':>11s} {'error':>7s}")
for r in rows:
    if not r.get("sim_seconds"):
        continue
    c = gpu_decode.sim_seconds(r["kernel"], r["n"], r["budget"], args, cal)
    graph = f"{r['seconds_graph'] * 1e6:9.1f}" if r.get("seconds_graph") else f"{'-':>9s}"
    print(f"{r['kernel']:20s} {r['n']:7d} {r['budget']:7d} {r['seconds'] * 1e6:12.1f} {graph} "
          f"{r['sim_seconds'] * 1e6:12.1f} {r['sim_error']:+7.0%} {c * 1e6:11.1f} {c / r['seconds'] - 1:+7.0%}")
PY
echo "benchmark exit $bench, tests exit $tests"
exit $(( bench || tests ))
