"""harness.grid end to end on the session's Ray instance: grid, MLflow, retries, interruption, DDP.

These are the integration tests (a real Ray, real MLflow, real training): trials are tiny CPU runs
(64x64 synthetic images, a few steps). Ray is started once per session (``ray_address`` in
conftest.py); ``run_grid`` reuses it in-process and subprocess drivers join it. The driver's logic
(retry, interruption at any point, resume) is unit-tested without Ray in test_driver.py.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from harness.cells import expand
from harness.cli import main
from harness.grid import run_grid
from harness.mlflow_io import write_report_from_mlflow
from harness.spec import load_spec
from harness.worker import FAIL_ONCE_ENV

FINAL = ("miou", "pixel_acc", "bf_1px", "bf_2px", "biou", "gflops", "params_m", "latency_ms", "train_step_ms",
         "peak_mem_mb")


# ----------------------------------------------------------------------------- the quickstart, end to end


@pytest.mark.slow  # ~3 min on 2 cores (10 cells, cost phase, figures, report, re-run): `make demo` is this path
def test_quickstart_smoke_end_to_end_then_rerun_skips_everything(ray_address: str, tmp_path: Path, quiet, mlflow_runs,
                                                                    attempts, repo_root):
    out = tmp_path / "qs"
    spec = repo_root / "ablations" / "quickstart.yaml"
    summary = run_grid(spec, out_dir=out, smoke=True, console=quiet)
    assert summary.exit_code == 0
    assert [r.status for r in summary.results] == ["finished"] * 10

    (parent,) = mlflow_runs(out, "quickstart-smoke", "grid")
    children = mlflow_runs(out, "quickstart-smoke", "cell")
    assert len(children) == 10
    assert {c.data.tags["cell_hash"] for c in children} == {r.cell.hash for r in summary.results}
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for tag in ("cell_hash", "seed", "git_sha", "device", "torch", "failure_class"):
            assert child.data.tags.get(tag), tag
        assert child.data.tags["failure_class"] == "none" and child.data.tags["device"] == "cpu"
        assert child.data.params["train.seed"] == child.data.tags["seed"]
        assert child.data.params["data.image_size"] == "[64, 64]"
        assert all(k in child.data.metrics for k in FINAL), sorted(child.data.metrics)
        assert 0.0 <= child.data.metrics["miou"] <= 1.0
        assert client.get_metric_history(child.info.run_id, "loss")  # per-step train metrics
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "per_class_iou.csv", "confusion.csv", "metrics.json"} <= files

    # the summary is built from the same final metrics
    fpn = [r for r in summary.results if r.cell.variant == "fpn"]
    run = next(c for c in children if c.data.tags["cell_hash"] == fpn[0].cell.hash)
    assert fpn[0].metrics["miou"] == pytest.approx(run.data.metrics["miou"])

    report = (out / "report" / "report.md").read_text()  # the grid ends by writing its paper report
    assert "fpn" in report and "miou" in report.lower()
    # cost columns from the isolated cost phase: one profiling task per variant (5), provenance and IQR in the report
    assert len(list((out / "cost").glob("*.json"))) == 5 + 1  # + cost.json
    assert "Cost columns (latency, train step, memory) from: isolated cost phase" in report
    latency = re.search(r"\| fpn \| .*\| \**([\d.]+)\** \[([\d.]+)\u2013([\d.]+)\] \|", report)  # bold if fastest
    assert latency and float(latency[2]) <= float(latency[1]) <= float(latency[3]), report
    assert "Accuracy metrics from: val" in report and "Statistical power vs fpn" in report
    fpn_row = next(line for line in report.splitlines() if line.startswith("| fpn | fpn |"))
    assert fpn_row.split(" | ")[2] == "\u2014"  # fpn does not read model.branches: no "dual" there
    # issue 16: every figure, linked with a caption; views saved per cell and uploaded
    figs = {p.name for p in (out / "report" / "figures").glob("*.png")}
    assert {"learning_curves.png", "per_class_bf_thin.png", "panel_val_0000.png", "offset_hist.png",
            "sampling_ddsm_branches_dual.png", "miou_vs_gflops.png"} <= figs, figs
    assert all(f"(figures/{f})\n\n*" in report for f in figs)
    assert "views/pred_val_0000.png" in {a.path for a in client.list_artifacts(run.info.run_id, "views")}
    again = run_grid(spec, out_dir=out, smoke=True, console=quiet)
    assert again.exit_code == 0 and {r.status for r in again.results} == {"skipped"}
    assert len(mlflow_runs(out, "quickstart-smoke", "cell")) == 10
    assert len(mlflow_runs(out, "quickstart-smoke", "grid")) == 1
    assert all(len(attempts(out / "cells" / r.cell.hash)) == 1 for r in again.results)  # nothing trained again
    assert again.results[0].metrics["miou"] == pytest.approx(summary.results[0].metrics["miou"])

    # only eval.tolerances changes: every cell is scored again from its final checkpoint, nothing trains
    launches = {r.cell.hash: (out / "cells" / r.cell.hash / "attempts.jsonl").read_text() for r in again.results}
    raw = yaml.safe_load(spec.read_text())
    raw["base"]["eval"] = {"tolerances": [1, 3]}
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(raw))
    scored = run_grid(tmp_path / "quickstart.yaml", out_dir=out, smoke=True, console=quiet)
    assert scored.exit_code == 0 and [r.cell.hash for r in scored.results] == [r.cell.hash for r in again.results]
    assert {(r.status, r.attempts, r.evaluations) for r in scored.results} == {("finished", 0, 1)}
    assert {r.cell.hash: (out / "cells" / r.cell.hash / "attempts.jsonl").read_text()
            for r in scored.results} == launches  # attempts.jsonl unchanged
    children = mlflow_runs(out, "quickstart-smoke", "cell")
    assert len(children) == 10 and all("bf_3px" in c.data.metrics for c in children)  # the same runs, new scores
    assert {c.data.tags["eval_hash"] for c in children} == {r.cell.eval_hash for r in scored.results}
    rescored = (out / "report" / "report.md").read_text()
    assert "BF@3px" in rescored and "BF@2px" not in rescored

    # the report re-created from MLflow alone: no cell folder, no model
    shutil.rmtree(out / "cells")
    again_figs = write_report_from_mlflow(str(out), experiment="quickstart-smoke", out_dir=tmp_path / "again")
    assert {p.name for rel, p in again_figs.items() if rel.startswith("figures/")} == figs


# ----------------------------------------------------------------------------- retries and failure classes


def test_failed_attempt_is_retried_and_recorded(ray_address: str, tmp_path: Path, monkeypatch, quiet, write_spec,
                                                mlflow_runs, attempts):
    monkeypatch.setenv(FAIL_ONCE_ENV, f"error:{tmp_path / 'markers'}")
    spec = write_spec(tmp_path / "retry.yaml", max_failures=1)
    summary = run_grid(spec, out_dir=tmp_path / "out", console=quiet)
    (r,) = summary.results
    assert summary.exit_code == 0
    assert (r.status, r.failures, r.attempts) == ("finished", ["error"], 2)
    (child,) = mlflow_runs(tmp_path / "out", "retry", "cell")
    assert child.info.status == "FINISHED"
    assert (child.data.tags["failures"], child.data.tags["attempts"], child.data.tags["failure_class"]) == (
        "error", "2", "none")
    assert len(attempts(tmp_path / "out" / "cells" / r.cell.hash)) == 2


def test_nan_is_not_retried_and_exit_code_is_1(ray_address: str, tmp_path: Path, monkeypatch, quiet, write_spec,
                                               mlflow_runs):
    monkeypatch.setenv(FAIL_ONCE_ENV, f"nan:{tmp_path / 'markers'}")
    spec = write_spec(tmp_path / "diverge.yaml", max_failures=3)
    summary = run_grid(spec, out_dir=tmp_path / "out", console=quiet)
    (r,) = summary.results
    assert summary.exit_code == 1
    assert (r.status, r.failures, r.attempts) == ("failed", ["nan"], 1)
    (child,) = mlflow_runs(tmp_path / "out", "diverge", "cell")
    assert child.info.status == "FAILED" and child.data.tags["failure_class"] == "nan"


@pytest.mark.slow
def test_crashed_worker_is_classified_killed_and_retried(ray_address: str, tmp_path: Path, monkeypatch, quiet,
                                                        write_spec):
    monkeypatch.setenv(FAIL_ONCE_ENV, f"killed:{tmp_path / 'markers'}")
    summary = run_grid(write_spec(tmp_path / "crash.yaml"), out_dir=tmp_path / "out", console=quiet)
    (r,) = summary.results
    assert (r.status, r.failures, r.attempts) == ("finished", ["killed"], 2)


# ----------------------------------------------------------------------------- interruption and resume


def test_sigterm_marks_running_killed_then_rerun_resumes_without_retraining(ray_address: str, tmp_path: Path, quiet,
                                                                            write_spec, mlflow_runs, attempts,
                                                                            repo_root, tiny_base):
    base = {**tiny_base, "train": {**tiny_base["train"], "steps": 20, "ckpt_every": 4}}
    spec = write_spec(tmp_path / "interrupt.yaml", base=base, seeds=[0, 1])
    first, second = (c.hash for c in expand(load_spec(spec)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(spec), "--out", str(out), "--address", ray_address,
           "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not ((out / "cells" / first / "result.json").is_file()
               and (out / "cells" / second / "checkpoints" / "last.pt").is_file()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0] if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log
    status = {c.data.tags["cell_hash"]: c.info.status for c in mlflow_runs(out, "interrupt", "cell")}
    assert status[second] == "KILLED", log
    assert status.get(first) in ("FINISHED", None), log  # None: finished but not yet recorded (rerun records it)

    summary = run_grid(spec, out_dir=out, console=quiet)
    assert summary.exit_code == 0
    assert len(attempts(out / "cells" / first)) == 1  # the finished cell never trains again
    resumed = attempts(out / "cells" / second)
    assert len(resumed) == 2 and resumed[1]["resumed"] is True  # from its last checkpoint
    children = mlflow_runs(out, "interrupt", "cell")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}  # the KILLED run was reused


# ----------------------------------------------------------------------------- one computation per hash


def test_a_grid_cell_and_ddsm_bench_train_of_its_config_give_the_same_metrics(ray_address: str, tmp_path: Path,
                                                                             quiet, write_spec, tiny_base, capsys):
    spec = write_spec(tmp_path / "repro.yaml", base=tiny_base, resources={"cpus": 2}, cost={"enabled": False})
    summary = run_grid(spec, out_dir=tmp_path / "grid", console=quiet)
    (r,) = summary.results
    assert summary.exit_code == 0 and r.cell.config.train.threads == 2  # the trial's 2 CPUs, in the hash
    cell = tmp_path / "grid" / "cells" / r.cell.hash
    assert main(["train", str(cell / "config.yaml"), "--out", str(tmp_path / "alone")]) == 0  # here: 1 thread
    grid, alone = (json.loads((d / "metrics.json").read_text()) for d in (cell, tmp_path / "alone"))
    for key in ("miou", "pixel_acc", "bf_1px", "bf_2px", "biou", "per_class_iou"):
        assert grid[key] == alone[key], key


# ----------------------------------------------------------------------------- DDP and resources


def test_two_worker_gloo_ddp_trial(ray_address: str, tmp_path: Path, write_spec, mlflow_runs):
    spec = write_spec(tmp_path / "ddp.yaml", resources={"cpus": 1, "num_workers": 2})
    (cell,) = expand(load_spec(spec))
    cell_dir = tmp_path / "out" / "cells" / cell.hash
    # through the CLI, as a user runs it (the command prints its summary and report with its own console)
    rc = main(["run", str(spec), "--out", str(tmp_path / "out"), "--address", ray_address])
    assert rc == 0, (cell_dir / "error.txt").read_text() if (cell_dir / "error.txt").is_file() else rc
    assert json.loads((cell_dir / "metrics.json").read_text())["world_size"] == 2
    assert (cell_dir / "train.rank1.log").is_file()
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    (child,) = mlflow_runs(tmp_path / "out", "ddp", "cell")
    assert child.info.status == "FINISHED" and "miou" in child.data.metrics


def test_asking_for_a_gpu_here_exits_2_fast(ray_address: str, tmp_path: Path, capsys, write_spec):
    spec = write_spec(tmp_path / "gpu.yaml", resources={"gpus": 1})
    out = tmp_path / "out"
    tic = time.time()
    assert main(["run", str(spec), "--out", str(out)]) == 2
    assert time.time() - tic < 30
    err = capsys.readouterr().err
    assert "1 GPU" in err and "GPU: 0" in err and "wait forever" in err
    assert not out.exists()
