"""A real ``mlflow server`` on 127.0.0.1 stopped and restarted under a running grid (slow: minutes).

1. The server is away for a while: the driver keeps launching, the trials keep running, and when the
   server is back every buffered write reaches it in order; the grid exits 0 with nothing lost.
2. The server stays away past ``--tracking-outage-s``: the driver stops cleanly with exit code 3
   (finished cells on disk, the running one checkpointed, the rest journaled); once the server is back,
   re-running the same command records everything: no run left RUNNING, none duplicated.

The driver logic of the same cases is unit-tested in test_tracking_queue.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from harness.cells import expand
from harness.spec import load_spec
from harness.tracking_queue import JOURNAL_FILE
from tests.harness.fakes import wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class Server:
    """``mlflow server`` on a free loopback port, in its own process group (stopped by that group only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        tic = time.time()
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"], stdout=(self.folder / "server.log").open("a"),
            stderr=subprocess.STDOUT, start_new_session=True)
        while time.time() - tic < timeout:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return time.time() - tic
            except OSError:
                time.sleep(1)
        raise AssertionError(f"mlflow server did not come up in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


def _driver(spec: Path, out: Path, server: Server, ray_address: str, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "harness.cli", "run", str(spec), "--out", str(out), "--address", ray_address,
           "--tracking-uri", server.uri, "--max-concurrent", "1", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _started(out: Path, cell) -> bool:
    return (out / "cells" / cell.hash / "attempts.jsonl").is_file()


def _runs(server: Server, experiment: str, kind: str = "cell") -> list:
    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'")) if exp else []


def _spec(tmp_path: Path, write_spec, tiny_base: dict, name: str, seeds: list[int]) -> Path:
    base = {**tiny_base, "train": {**tiny_base["train"], "steps": 24, "ckpt_every": 4}}
    return write_spec(tmp_path / f"{name}.yaml", base=base, seeds=seeds)


def test_the_grid_goes_on_through_an_outage_and_writes_everything_when_the_server_is_back(
        server: Server, ray_address: str, tmp_path: Path, write_spec, tiny_base):
    spec = _spec(tmp_path, write_spec, tiny_base, "outage", seeds=[0, 1, 2])
    cells = expand(load_spec(spec))
    out, log = tmp_path / "out", tmp_path / "driver.log"
    proc = _driver(spec, out, server, ray_address, log)
    try:
        wait_for(lambda: _started(out, cells[0]), proc=proc, timeout=300, log=log)
        server.stop()
        down = time.time()
        wait_for(lambda: _started(out, cells[1]), proc=proc, timeout=300, log=log)  # launches while the store is away
        launched_while_down = time.time() - down
        up_after = server.start()
        rc = proc.wait(timeout=900)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "unreachable" in text and "tracking store back after" in text
    children = _runs(server, "outage")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}, text[-2000:]
    client = MlflowClient(tracking_uri=server.uri)
    for child in children:  # every point buffered during the outage arrived, once each
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 25)), (child.data.tags["cell_hash"], steps)
    (parent,) = _runs(server, "outage", "grid")
    assert parent.info.status == "FINISHED"
    print(f"\noutage: second cell launched {launched_while_down:.0f} s into the outage; server back after "
          f"{up_after:.0f} s more; exit {rc}; 3/3 runs FINISHED with 24/24 loss points each")


def test_an_outage_past_the_limit_exits_3_and_a_rerun_records_everything(
        server: Server, ray_address: str, tmp_path: Path, write_spec, tiny_base):
    spec = _spec(tmp_path, write_spec, tiny_base, "limit", seeds=[0, 1])
    first, second = expand(load_spec(spec))
    out, log = tmp_path / "out", tmp_path / "driver.log"
    if server.proc is None:
        server.start()
    proc = _driver(spec, out, server, ray_address, log, "--tracking-outage-s", "20")
    try:
        wait_for(lambda: (out / "cells" / first.hash / "result.json").is_file() and _started(out, second), proc=proc,
              timeout=600, log=log)
        server.stop()
        down = time.time()
        rc = proc.wait(timeout=300)
        took = time.time() - down
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == 3, text[-3000:]
    assert "stopped: tracking store" in text and "unreachable for" in text and "Traceback" not in text, text[-3000:]
    journal = json.loads((out / JOURNAL_FILE).read_text())
    assert journal["ops"], "the unsent writes are journaled"
    assert (out / "cells" / first.hash / "result.json").is_file()  # finished: safe on disk
    assert list((out / "cells" / second.hash / "checkpoints").glob("step_*.pt"))  # running: checkpointed

    server.start()
    rerun = tmp_path / "rerun.log"
    rc = _driver(spec, out, server, ray_address, rerun).wait(timeout=900)
    assert rc == 0, rerun.read_text()[-3000:]
    assert "replaying" in rerun.read_text()
    children = _runs(server, "limit")
    assert sorted(c.data.tags["cell_hash"] for c in children) == sorted([first.hash, second.hash])  # none twice
    assert {c.info.status for c in children} == {"FINISHED"}  # none left RUNNING
    assert not json.loads((out / JOURNAL_FILE).read_text())["ops"]
    assert len((out / "cells" / first.hash / "attempts.jsonl").read_text().splitlines()) == 1  # never trained again
    print(f"\noutage past the limit: exit 3 {took:.0f} s after the server stopped ({len(journal['ops'])} writes "
          f"journaled); re-run exit 0, 2/2 runs FINISHED, none duplicated")
