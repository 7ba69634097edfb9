"""benchmarks/gpu_check.py: its CPU mode runs every section as a user would run it, and one failing
or hanging section is one row while the others still run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from ddsm.models import list_models

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_cpu_mode_runs_every_section(tmp_path: Path, ray_address: str):
    proc = _run(["--device", "cpu", "--out", str(tmp_path), "--ray-address", ray_address])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    assert {r["section"] for r in rows} == set(gpu_check.SECTIONS)
    bad = [r for r in rows if r["status"] not in ("ok", "n/a")]
    assert not bad, bad
    models = [r for r in rows if r["section"] == "models"]
    assert [r["check"].split()[0] for r in models] == list_models()
    assert all(r["time_ms"] > 0 and "grads finite" in r["result"] for r in models)
    assert any("gloo" in r["check"] for r in rows if r["section"] == "ddp")
    assert {r["check"] for r in rows if r["section"] == "bench_train_step"} >= {"engine / plain-loop throughput"}
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "0 failed" in table  # header row + one row per check
    assert "section" in proc.stdout and "wrote" in proc.stdout


def test_a_failing_or_hanging_section_is_one_row_and_the_rest_still_run(tmp_path: Path):
    proc = _run(["--device", "cpu", "--out", str(tmp_path), "--only", "env,sampling,syncs", "--limit", "sampling=0.5"],
                env={gpu_check.FAIL_ENV: "env"}, timeout=120)
    assert proc.returncode == 1
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    status = {r["section"]: r["status"] for r in rows}
    assert status == {"env": "FAIL", "sampling": "TIMEOUT", "syncs": "n/a"}
    assert "injected failure" in rows[0]["result"]
    assert "2 failed" in (tmp_path / "gpu_check.md").read_text()


def test_sections_past_the_budget_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--budget", "1", "--only", "env,models"]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [(r["section"], r["status"]) for r in rows] == [("env", "skipped"), ("models", "skipped")]
    assert "time budget" in rows[0]["result"]


def test_unknown_section_is_a_usage_error(tmp_path: Path):
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--only", "env,gpus"])
    assert info.value.code == 2
