"""benchmarks/bench_scale.py at a tiny size on the session's Ray: the grid, its resume and its report run and
every figure is measured (the targets are the benchmark's business, not this test's)."""
from __future__ import annotations

from pathlib import Path

from benchmarks.bench_scale import TARGETS, measure, print_table


def test_bench_scale_tiny(ray_address: str, tmp_path: Path, capsys):
    res = measure(cells=10, out=tmp_path / "grid", concurrency=2)
    assert res["cells"] == 10 and res["driver_ms_per_cell"] > 0  # 11 runs: the parent and 10 cells
    assert res["mlflow_calls"]["create_run"] == 11 and res["mlflow_calls"]["set_terminated"] == 11
    assert res["resume_scan_get_run"] <= 2  # the resume reads final metrics from one search, not a get_run per cell
    assert 0 < res["resume_s"] and 0 < res["report_s"]
    assert (tmp_path / "grid" / "report_cli" / "report.md").is_file()
    print_table(res)
    table = capsys.readouterr().out
    assert all(f"{t:.1f}" in table for t in TARGETS.values())
