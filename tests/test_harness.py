"""harness.ray_runner end to end on the session's Ray instance: grid, MLflow, retries, interruption, DDP.

Trials are tiny CPU runs (64x64 synthetic images, a few steps). Ray is started once per session
(``ray_address`` in conftest.py); ``run_grid`` reuses it in-process and subprocess drivers join it.
"""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from harness.cli import main
from harness.ray_runner import FAIL_ONCE_ENV, run_grid
from harness.spec import expand, load_spec

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("miou", "pixel_acc", "bf_1px", "bf_2px", "biou", "gflops", "params_m", "latency_ms", "train_step_ms",
         "peak_mem_mb")
TINY_BASE = {
    "model": {"name": "fpn", "backbone": "resnet18", "decoder_dim": 32},
    "data": {"name": "synthetic", "image_size": [64, 64], "crop_size": [64, 64], "num_images": 4, "batch_size": 2},
    "train": {"steps": 2, "device": "cpu", "log_every": 1},
    "eval": {"tolerances": [1, 2], "max_images": 2},
}


def _write_spec(path: Path, **over) -> Path:
    spec = {"name": path.stem, "base": TINY_BASE, "baselines": [{"name": "fpn"}], "seeds": [0]}
    spec.update(over)
    path.write_text(yaml.safe_dump(spec))
    return path


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _client(out: Path):
    from mlflow import MlflowClient

    from harness.tracking import default_tracking_uri

    return MlflowClient(tracking_uri=default_tracking_uri(out))


def _runs(out: Path, experiment: str, kind: str) -> list:
    client = _client(out)
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'")) if exp else []


def _attempts(out: Path, cell_hash: str) -> list[dict]:
    path = out / "cells" / cell_hash / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ----------------------------------------------------------------------------- the quickstart, end to end


def test_quickstart_smoke_end_to_end_then_rerun_skips_everything(ray_address: str, tmp_path: Path):
    out = tmp_path / "qs"
    spec = ROOT / "ablations" / "quickstart.yaml"
    summary = run_grid(spec, out_dir=out, smoke=True, console=_quiet())
    assert summary.exit_code == 0
    assert [r.status for r in summary.results] == ["finished"] * 10

    (parent,) = _runs(out, "quickstart-smoke", "grid")
    children = _runs(out, "quickstart-smoke", "cell")
    assert len(children) == 10
    assert {c.data.tags["cell_hash"] for c in children} == {r.cell.hash for r in summary.results}
    client = _client(out)
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
    again = run_grid(spec, out_dir=out, smoke=True, console=_quiet())
    assert again.exit_code == 0 and {r.status for r in again.results} == {"skipped"}
    assert len(_runs(out, "quickstart-smoke", "cell")) == 10 and len(_runs(out, "quickstart-smoke", "grid")) == 1
    assert all(len(_attempts(out, r.cell.hash)) == 1 for r in again.results)  # nothing trained again
    assert again.results[0].metrics["miou"] == pytest.approx(summary.results[0].metrics["miou"])


# ----------------------------------------------------------------------------- retries and failure classes


def test_failed_attempt_is_retried_and_recorded(ray_address: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(FAIL_ONCE_ENV, f"error:{tmp_path / 'markers'}")
    spec = _write_spec(tmp_path / "retry.yaml", max_failures=1)
    summary = run_grid(spec, out_dir=tmp_path / "out", console=_quiet())
    (r,) = summary.results
    assert summary.exit_code == 0
    assert (r.status, r.failures, r.attempts) == ("finished", ["error"], 2)
    (child,) = _runs(tmp_path / "out", "retry", "cell")
    assert child.info.status == "FINISHED"
    assert (child.data.tags["failures"], child.data.tags["attempts"], child.data.tags["failure_class"]) == (
        "error", "2", "none")
    assert len(_attempts(tmp_path / "out", r.cell.hash)) == 2


def test_nan_is_not_retried_and_exit_code_is_1(ray_address: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(FAIL_ONCE_ENV, f"nan:{tmp_path / 'markers'}")
    spec = _write_spec(tmp_path / "diverge.yaml", max_failures=3)
    summary = run_grid(spec, out_dir=tmp_path / "out", console=_quiet())
    (r,) = summary.results
    assert summary.exit_code == 1
    assert (r.status, r.failures, r.attempts) == ("failed", ["nan"], 1)
    (child,) = _runs(tmp_path / "out", "diverge", "cell")
    assert child.info.status == "FAILED" and child.data.tags["failure_class"] == "nan"


@pytest.mark.slow
def test_crashed_worker_is_classified_killed_and_retried(ray_address: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(FAIL_ONCE_ENV, f"killed:{tmp_path / 'markers'}")
    summary = run_grid(_write_spec(tmp_path / "crash.yaml"), out_dir=tmp_path / "out", console=_quiet())
    (r,) = summary.results
    assert (r.status, r.failures, r.attempts) == ("finished", ["killed"], 2)


# ----------------------------------------------------------------------------- interruption and resume


def test_sigterm_marks_running_killed_then_rerun_resumes_without_retraining(ray_address: str, tmp_path: Path):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 20, "ckpt_every": 4}}
    spec = _write_spec(tmp_path / "interrupt.yaml", base=base, seeds=[0, 1])
    first, second = (c.hash for c in expand(load_spec(spec)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(spec), "--out", str(out), "--address", ray_address,
           "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not ((out / "cells" / first / "result.json").is_file()
               and (out / "cells" / second / "checkpoints" / "last.pt").is_file()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0] if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log
    status = {c.data.tags["cell_hash"]: c.info.status for c in _runs(out, "interrupt", "cell")}
    assert status[second] == "KILLED", log
    assert status.get(first) in ("FINISHED", None), log  # None: finished but not yet recorded (rerun records it)

    summary = run_grid(spec, out_dir=out, console=_quiet())
    assert summary.exit_code == 0
    assert len(_attempts(out, first)) == 1  # the finished cell never trains again
    resumed = _attempts(out, second)
    assert len(resumed) == 2 and resumed[1]["resumed"] is True  # from its last checkpoint
    children = _runs(out, "interrupt", "cell")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}  # the KILLED run was reused


# ----------------------------------------------------------------------------- DDP and resources


def test_two_worker_gloo_ddp_trial(ray_address: str, tmp_path: Path):
    spec = _write_spec(tmp_path / "ddp.yaml", resources={"cpus": 1, "num_workers": 2})
    (cell,) = expand(load_spec(spec))
    cell_dir = tmp_path / "out" / "cells" / cell.hash
    # through the CLI, as a user runs it (the command prints its summary and report with its own console)
    rc = main(["run", str(spec), "--out", str(tmp_path / "out"), "--address", ray_address])
    assert rc == 0, (cell_dir / "error.txt").read_text() if (cell_dir / "error.txt").is_file() else rc
    assert json.loads((cell_dir / "metrics.json").read_text())["world_size"] == 2
    assert (cell_dir / "train.rank1.log").is_file()
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    (child,) = _runs(tmp_path / "out", "ddp", "cell")
    assert child.info.status == "FINISHED" and "miou" in child.data.metrics


def test_asking_for_a_gpu_here_exits_2_fast(ray_address: str, tmp_path: Path, capsys):
    spec = _write_spec(tmp_path / "gpu.yaml", resources={"gpus": 1})
    out = tmp_path / "out"
    tic = time.time()
    assert main(["run", str(spec), "--out", str(out)]) == 2
    assert time.time() - tic < 30
    err = capsys.readouterr().err
    assert "1 GPU" in err and "GPU: 0" in err and "wait forever" in err
    assert not out.exists()


def test_comparison_rows_mean_std_and_delta():
    from types import SimpleNamespace as NS

    from harness.progress import comparison_rows

    def result(variant: str, seed: int, miou: float, status: str = "finished"):
        cell = NS(variant=variant, reference="fpn", hash=f"{variant}{seed}")
        return NS(cell=cell, status=status, metrics={"miou": miou})

    rows = comparison_rows([result("fpn", 0, 0.4), result("fpn", 1, 0.6), result("ddsm", 0, 0.7),
                            result("ddsm", 1, 0.9), result("ddsm", 2, 0.1, status="failed")])
    fpn, ddsm = rows
    assert (fpn["n"], fpn["mean"]["miou"], fpn["delta_miou"]) == (2, pytest.approx(0.5), None)
    assert fpn["std"]["miou"] == pytest.approx(0.1414213, rel=1e-5)  # sample std of (0.4, 0.6)
    assert (ddsm["n"], ddsm["of"]) == (2, 3)
    assert ddsm["delta_miou"] == pytest.approx(0.3)



def test_shared_storage_check_names_nodes_that_cannot_read_the_marker(ray_address: str, tmp_path: Path,
                                                                         monkeypatch):
    import ray

    from ddsm.config import ConfigError
    from harness import ray_runner

    node = next(n for n in ray.nodes() if n["Alive"])
    twin = {**node, "NodeManagerAddress": "10.0.0.2"}  # a second node that runs on the same machine
    monkeypatch.setattr(ray, "nodes", lambda: [node, twin])
    ray_runner.check_shared_storage(tmp_path / "shared")  # both read the marker: passes
    assert not list((tmp_path / "shared").glob(".storage-check-*"))  # and it cleans up

    class Blind:  # stands in for the remote reader on a node with its own local disk
        def options(self, **kwargs):
            return self

        def remote(self, path: str):
            return ray.put(None)

    monkeypatch.setattr(ray_runner, "_read_marker", Blind())
    with pytest.raises(ConfigError, match=r"is not shared: node\(s\) .*10\.0\.0\.2 cannot read it"):
        ray_runner.check_shared_storage(tmp_path / "local")
