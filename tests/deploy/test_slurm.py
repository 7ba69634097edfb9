"""The Slurm path end to end, on a real one-node Slurm on this machine (slow; root).

`deploy/slurm/local_slurm.sh start` installs Debian's slurm-wlm + munge when absent and starts slurmctld,
slurmd and munged on localhost. The test submits the quickstart grid (--smoke) with
`deploy/slurm/ddsm-bench.sbatch`, sends the batch shell Slurm's warning signal once two cells have
finished (what `--signal=B:USR1@300` does before a time limit or preemption), and follows the job through
its requeue to completion: cells finished before the signal are not trained again, the rest resume.

    .venv/bin/python -m pytest -m slow tests/deploy/test_slurm.py -s
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "deploy" / "slurm"
pytestmark = pytest.mark.slow


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict of its key=value fields."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _finished(out: Path) -> dict[str, float]:
    """Cell hash -> mtime of its result.json, for cells that finished."""
    return {p.parent.name: p.stat().st_mtime for p in out.glob("cells/*/result.json")}


def _wait(what: str, predicate, *, timeout: float, poll: float = 2.0):  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def slurm() -> None:
    """A running one-node Slurm (started by the deploy script); skipped where it cannot be had."""
    if os.geteuid() != 0 and not shutil.which("sbatch"):
        pytest.skip("Slurm is not installed and installing it needs root")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    started = subprocess.run([str(SLURM / "local_slurm.sh"), "start"], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.skip(f"could not start a local Slurm: {started.stderr.strip() or started.stdout.strip()}")
    print(started.stdout.strip())


def test_quickstart_through_sbatch_with_preemption_and_requeue(slurm: None, tmp_path: Path) -> None:
    out, log = tmp_path / "quickstart", tmp_path / "job.log"
    env = dict(os.environ, DDSM_VENV=sys.prefix, DDSM_RAY_IP="127.0.0.1")
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", str(SLURM / "ddsm-bench.sbatch"),
         "run", "ablations/quickstart.yaml", "--smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}")
    try:
        before = _wait("two finished cells", lambda: (f := _finished(out)) and len(f) >= 2 and f, timeout=600)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        print(f"warning signal sent with {len(before)} cells finished")
        _wait("the requeue", lambda: _job(job_id).get("Restarts") == "1", timeout=300)
        print("job requeued:", {k: _job(job_id).get(k) for k in ("JobState", "Restarts", "Reason")})
        _wait("the job to complete", lambda: _job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
              timeout=900, poll=5)
        state = _job(job_id)
    finally:
        if _job(job_id).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", None):
            subprocess.run(["scancel", job_id])
    text = log.read_text()
    print("\n".join(line for line in text.splitlines() if line.startswith("[ddsm-bench.sbatch")))
    driver = "\n".join(line for line in text.splitlines() if " INFO " not in line and line.strip())  # not Ray's
    outcomes = {p.parent.name: p.read_text()[-500:] for p in (out / "cells").glob("*/outcomes.jsonl")}
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, driver[-4000:], outcomes)
    assert "requeueing job" in text and "driver exited with 130" in text and "driver exited with 0" in text
    after = _finished(out)
    assert len(after) == 10, sorted(after)
    # Cells that finished before the signal were skipped on the requeued run, not trained again.
    assert {h: after[h] for h in before} == before
    summary = json.loads((out / "grid.json").read_text())
    print(f"cells: {len(after)} finished, grid.json lists {len(summary.get('cells', summary))}")
