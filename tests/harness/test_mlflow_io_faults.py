"""harness.mlflow_io when things went wrong: resumed runs, drivers that are gone, damaged stores, error classes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from harness.cli import main
from harness.mlflow_io import MlflowRecorder, Tag, classify_error, load_runs
from harness.tracking_queue import LOST, REFUSED, RETRY
from reports.load import cell_status
from tests.harness.fakes import MemoryRecorder


@pytest.fixture(params=["memory", "mlflow"])
def recorder(request, tmp_path: Path):
    if request.param == "memory":
        return MemoryRecorder()
    return MlflowRecorder(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="faults",
                          artifact_root=tmp_path / "mlartifacts")


def _history(recorder, run_id: str, key: str) -> list[int]:
    if isinstance(recorder, MemoryRecorder):
        return [s for k, _, s in recorder.runs[run_id].metrics if k == key]
    return sorted(m.step for m in recorder._client.get_metric_history(run_id, key))


def test_a_reopened_run_keeps_one_point_per_metric_and_step(recorder):
    parent = recorder.start_parent(key="g", name="g", tags={}, params={})
    run = recorder.start_run(name="a", parent_id=parent, cell_hash="h", params={}, tags={})
    for step in (1, 2, 3):
        recorder.log_metrics(run, {"loss": 1.0 / step}, step=step)
    recorder.end_run(run, status="KILLED")  # interrupted after step 3, its checkpoint was at step 2
    again = recorder.start_run(name="a", parent_id=parent, cell_hash="h", params={}, tags={}, reuse=run)
    now = int(time.time() * 1000)
    recorder.log_points(again, [("loss", 1.0 / s, now, s) for s in (3, 4)])  # step 3 re-ran
    recorder.log_metrics(again, {"loss": 0.2, "miou": 0.5}, step=5)
    recorder.end_run(again, status="FINISHED")
    assert _history(recorder, run, "loss") == [1, 2, 3, 4, 5] and _history(recorder, run, "miou") == [5]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_report_shows_cells_whose_driver_is_gone_as_interrupted(tmp_path: Path):
    now, here = time.time(), socket.gethostname()
    cases = {  # variant: (parent status, parent tags, child status, child tags, expected state)
        "alive": ("RUNNING", {Tag.DRIVER: f"{here}:{os.getpid()}", Tag.DRIVER_HEARTBEAT: now}, "RUNNING", {},
                  "running"),
        "silent": ("RUNNING", {Tag.DRIVER: "node-9:123", Tag.DRIVER_HEARTBEAT: now - 3600}, "RUNNING", {},
                   "interrupted"),
        "pid_gone": ("RUNNING", {Tag.DRIVER: f"{here}:{_dead_pid()}", Tag.DRIVER_HEARTBEAT: now}, "RUNNING", {},
                     "interrupted"),  # a kill -9, or a lost head node that took the driver with it
        "grid_ended": ("KILLED", {}, "RUNNING", {}, "interrupted"),  # its driver ended the grid without this run
        "stopped": ("KILLED", {}, "KILLED", {Tag.STATUS: "killed"}, "interrupted"),  # Ctrl-C, outage, lost cluster
        "failed": ("FINISHED", {}, "FAILED", {Tag.STATUS: "failed", Tag.FAILURE_CLASS: "oom"}, "failed"),
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("rep", artifact_location=(tmp_path / "art").as_uri())
    for variant, (parent_status, parent_tags, child_status, child_tags, _) in cases.items():
        parent = client.create_run(exp, tags={Tag.KIND: "grid", **{k: str(v) for k, v in parent_tags.items()}})
        child = client.create_run(exp, tags={Tag.KIND: "cell", Tag.PARENT: parent.info.run_id, Tag.VARIANT: variant,
                                             Tag.SEED: "0", Tag.CELL_HASH: variant, **child_tags})
        for run, status in ((parent, parent_status), (child, child_status)):
            if status != "RUNNING":
                client.set_terminated(run.info.run_id, status)
    status = cell_status(load_runs(uri, experiment="rep", read_artifacts=False).frame)
    assert dict(zip(status["variant"], status["state"])) == {v: case[-1] for v, case in cases.items()}


def test_a_damaged_store_exits_2_with_its_remedy(ray_address: str, tmp_path: Path, capsys, write_spec):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mlflow.db").write_bytes(os.urandom(20000))
    spec = write_spec(tmp_path / "grid.yaml")
    assert main(["run", str(spec), "--out", str(out), "--address", ray_address]) == 2
    err = capsys.readouterr().err
    db = out.resolve() / "mlflow.db"
    assert f"tracking store {db} is damaged (file is not a database)" in err, err
    assert f"mv {db} {db}.damaged" in err and "result.json" in err and "Traceback" not in err
    assert main(["report", "--experiment", "grid", "--tracking-uri", str(out), "--out", str(tmp_path / "r")]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_errors_are_classified_for_the_retry_queue():
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, UNAUTHENTICATED
    from sqlalchemy.exc import DatabaseError, OperationalError

    assert classify_error(MlflowException("API request to http://x failed with exception Connection refused")) == RETRY
    assert classify_error(ConnectionError("refused")) == RETRY
    assert classify_error(OperationalError("stmt", {}, Exception("database is locked"))) == RETRY
    assert classify_error(DatabaseError("stmt", {}, Exception("database disk image is malformed"))) == LOST
    assert classify_error(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)) == REFUSED
    assert classify_error(MlflowException("bad token", error_code=UNAUTHENTICATED)) == LOST
