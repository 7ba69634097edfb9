"""Node loss and cluster loss on a real multi-node Ray cluster on this machine (slow: minutes each).

The cluster belongs to a helper process (tests/harness/ray_cluster.py) in a private RAY_TMPDIR; the
driver is the ``ddsm-bench run`` CLI in its own process, as a user runs it. The driver logic of the same
cases is unit-tested in test_driver_faults.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from harness.cells import expand
from harness.mlflow_io import load_runs
from harness.spec import load_spec
from reports.load import cell_status
from tests.harness.fakes import wait_for
from tests.harness.ray_cluster import LocalCluster

pytestmark = pytest.mark.slow


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _driver(spec: Path, out: Path, cluster: LocalCluster, log: Path, *extra: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "harness.cli", "run", str(spec), "--out", str(out), "--address", cluster.address,
           *extra]
    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env={**cluster.env, **env},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _children(out: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], "tags.kind = 'cell'"))


def _long(tiny_base: dict, steps: int = 40) -> dict:
    return {**tiny_base, "train": {**tiny_base["train"], "steps": steps, "ckpt_every": 4}}


def test_node_loss_mid_trial_retries_on_another_node_from_the_checkpoint(tmp_path: Path, write_spec, tiny_base):
    spec = write_spec(tmp_path / "nodeloss.yaml", base=_long(tiny_base))
    (cell,) = expand(load_spec(spec))
    out, log = tmp_path / "out", tmp_path / "driver.log"
    cell_dir = out / "cells" / cell.hash
    with LocalCluster(workers=2) as cluster:
        proc = _driver(spec, out, cluster, log)
        try:
            wait_for(lambda: (cell_dir / "checkpoints" / "step_0000008.pt").is_file(), proc=proc, timeout=400, log=log)
            (first,) = _lines(cell_dir / "attempts.jsonl")
            assert first["node_id"] in cluster.workers
            tic = time.time()
            cluster.remove(first["node_id"])  # the node running the trial dies with it
            rc = proc.wait(timeout=600)
        finally:
            proc.kill()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    one, two = _lines(cell_dir / "attempts.jsonl")
    assert two["node_id"] in cluster.workers and two["node_id"] != first["node_id"] and two["resumed"], two
    (lost, done) = _lines(cell_dir / "outcomes.jsonl")
    assert (lost["status"], lost["failure_class"], lost["node_id"]) == ("failed", "node_lost", first["node_id"]), lost
    assert done["status"] == "finished" and done["node_id"] == two["node_id"]
    (child,) = _children(out, "nodeloss")
    tags = child.data.tags
    assert child.info.status == "FINISHED" and (tags["failures"], tags["attempts"]) == ("node_lost", "2"), tags
    assert "step_" in tags["resumed_from"] and tags["ray_node_id"] == two["node_id"]  # resumed from its checkpoint
    print(f"\nnode loss: trial on node {first['node_id'][:12]} (removed at step >= 8), attempt 1 "
          f"{lost['failure_class']} ({lost['error'][:90]}...), attempt 2 on node {two['node_id'][:12]} "
          f"resumed from {tags['resumed_from']}, "
          f"finished {time.time() - tic:.0f} s after the removal; run {child.info.status}, failures={tags['failures']}")


def test_a_lost_head_stops_the_driver_cleanly_and_a_rerun_resumes(tmp_path: Path, write_spec, tiny_base):
    spec = write_spec(tmp_path / "headloss.yaml", base=_long(tiny_base), seeds=[0, 1])
    first, second = expand(load_spec(spec))
    out, log = tmp_path / "out", tmp_path / "driver.log"
    running = None
    with LocalCluster(workers=1) as cluster:
        proc = _driver(spec, out, cluster, log, "--max-concurrent", "1", DDSM_BENCH_CLUSTER_LOST_S="5")
        try:
            ckpt = lambda c: out / "cells" / c.hash / "checkpoints" / "step_0000008.pt"  # noqa: E731
            wait_for(lambda: ckpt(first).is_file() or ckpt(second).is_file(), proc=proc, timeout=400, log=log)
            running = first if ckpt(first).is_file() else second
            tic = time.time()
            cluster.kill_head()
            rc = proc.wait(timeout=120)
            took = time.time() - tic
        finally:
            proc.kill()
    text = log.read_text()
    assert rc == 4, text[-3000:]
    assert took < 55, took  # before Ray's own 60 s would end the driver abruptly
    assert "stopped: the Ray cluster is lost" in text and "re-run the same command once the cluster is back" in text
    assert "Traceback" not in text, text[-3000:]
    runs = {c.data.tags["cell_hash"]: c for c in _children(out, "headloss")}
    assert runs[running.hash].info.status == "KILLED" and not [r for r in runs.values() if r.info.status == "RUNNING"]
    state = cell_status(load_runs(str(out), experiment="headloss").frame)
    by_seed = dict(zip(state["seed"], state["state"]))
    assert by_seed[running.seed] == "interrupted", state  # not "running": its driver is gone

    with LocalCluster(workers=1) as cluster:  # the cluster is back
        proc = _driver(spec, out, cluster, tmp_path / "rerun.log")
        rc = proc.wait(timeout=900)
    assert rc == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    attempts = _lines(out / "cells" / running.hash / "attempts.jsonl")
    assert len(attempts) == 2 and attempts[1]["resumed"]
    assert {c.info.status for c in _children(out, "headloss")} == {"FINISHED"}
    print(f"\nhead loss: driver exited 4 {took:.0f} s after the head was killed; "
          f"{running.name} KILLED -> report 'interrupted' -> re-run resumed it (attempt 2, resumed=True), exit 0")
