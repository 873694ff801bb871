"""benchmarks/bench_kernels.py runs end to end on a tiny cache and prints one table row per method it
was asked for (no timing is asserted: the machine is shared)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    """``{method: {column: cell}}`` from the printed Markdown table."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]   # noqa: E731
    header = split(lines[0])
    assert header[0] == "method", lines[0]
    return {cells[0]: dict(zip(header, cells)) for cells in map(split, lines[1:]) if len(cells) == len(header)}


def test_quick_run_prints_a_row_per_method():
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "dense,quest", "--n", "2048",
                          "--repeats", "1", "--reuse-cache"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = table_rows(res.stdout)
    assert {"dense", "quest"} <= set(rows), res.stdout
    assert not any(r.startswith(("sparq", "twilight")) for r in rows)      # --only is honoured
    for name in ("dense", "quest"):
        row = rows[name]
        assert row["speed-up med"].endswith("x") and row["speed-up min"].endswith("x"), row
        assert row[">= 10x"] in ("yes", "min only", "NO"), row
        assert float(row["first call s"]) >= 0 and not row["note"].startswith("FAILED"), row
        tokens = row["tokens/head oracle / kernel"].split(" / ")
        assert tokens[0] == tokens[1], row                                 # both sides did the same selection
    assert rows["dense"]["tokens/head oracle / kernel"] == "2048 / 2048"
    assert rows["dense"]["note"].startswith("DENSE STEP")                   # the dense step is flagged
    assert not rows["quest"]["note"].startswith("DENSE STEP")               # budget 1024 < n: sparse


def test_unknown_method_is_an_error():
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "no_such_method", "--reuse-cache"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "no_such_method" in res.stderr
