"""The driver on a lost cluster, with trials asked to stop, and over several invocations (no Ray, no MLflow).

The live-Ray counterparts (a head that dies, a node removed mid-trial, random kills of the driver) are
test_cluster_faults.py and test_stress.py (slow).
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from harness import exit_codes
from harness.cells import expand
from harness.driver import Event, StopFlag, TrialOutcome
from harness.grid import GridPolicy, GridSummary
from harness.spec import parse_spec
from tests.harness.fakes import FakeLauncher, MemoryRecorder, default_script, drive_grid


@pytest.fixture(scope="module")
def grid():
    spec = parse_spec({"name": "g", "base": {"train": {"steps": 4}},
                       "baselines": [{"name": "fpn", "overrides": {"model.name": "fpn"}}], "seeds": [0, 1, 2]})
    return spec, expand(spec)


def _run(grid, out: Path, recorder: MemoryRecorder, launcher: FakeLauncher, *, stop: StopFlag | None = None,
         limit: int = 2) -> tuple[GridPolicy, StopFlag]:
    policy, stop, _ = drive_grid(grid, out, recorder, launcher, stop=stop, limit=limit, grace_s=1.0)
    return policy, stop


def _summary(grid, policy: GridPolicy, stop: StopFlag, out: Path) -> GridSummary:
    return GridSummary(spec=grid[0], out_dir=out, tracking_uri="memory://", experiment_id="0", parent_run_id="r0",
                       results=policy.results, interrupted=bool(stop), stop_reason=stop.reason,
                       stop_message=stop.message)


def test_a_lost_cluster_stops_the_grid_marks_running_cells_killed_and_a_rerun_resumes(grid, tmp_path: Path):
    recorder = MemoryRecorder()
    waits = []

    def head_dies(name: str) -> None:
        waits.append(name) if name == "wait" else None
        if len(waits) == 8:
            launcher.lost_reason = "the Ray cluster is lost: its head at 10.0.0.1:6379 has not answered for 15 s"

    launcher = FakeLauncher(hook=head_dies)
    policy, stop = _run(grid, tmp_path, recorder, launcher)
    assert (stop.reason, stop.message) == ("cluster", launcher.lost_reason)
    summary = _summary(grid, policy, stop, tmp_path)
    assert summary.exit_code == exit_codes.CLUSTER_LOST == 4
    killed = [r for r in policy.results if r.status == "killed"]
    assert killed and not [r for r in recorder.children() if r.status == "RUNNING"]
    assert {recorder.runs[r.run_id].status for r in killed} == {"KILLED"}
    assert {p.key for p in launcher.stopped} == {r.cell.hash for r in killed}  # asked to checkpoint first
    for r in killed:
        (line,) = [json.loads(x) for x in (tmp_path / "cells" / r.cell.hash / "outcomes.jsonl").read_text().splitlines()
                   if json.loads(x)["status"] == "interrupted"]
        assert line["failure_class"] == "killed" and line["node_id"] == "node-a"

    finished = {r.cell.hash for r in policy.results if r.status == "finished"}
    again = FakeLauncher()
    policy, stop = _run(grid, tmp_path, recorder, again)
    assert not stop and all(r.done for r in policy.results)
    assert _summary(grid, policy, stop, tmp_path).exit_code == exit_codes.OK
    assert {p.key for p in again.submitted} == {c.hash for c in grid[1]} - finished  # finished ones never again
    assert all(len(runs) == 1 and runs[0].status == "FINISHED" for runs in recorder.by_hash().values())


@pytest.mark.parametrize("reason, code", [("signal", 130), ("tracking", 3), ("cluster", 4)])
def test_every_way_of_stopping_has_its_exit_code(grid, tmp_path: Path, reason: str, code: int):
    stop = StopFlag()
    stop.set(signal.SIGTERM) if reason == "signal" else stop.lost(reason, "gone")
    policy = GridPolicy(spec=grid[0], cells=grid[1], out=tmp_path, recorder=MemoryRecorder(), parent="p", sha="s")
    assert _summary(grid, policy, stop, tmp_path).exit_code == code
    assert code in exit_codes.EXIT_CODES


def _resumable(steps_done: dict[str, int]):
    """Scripts of an engine that resumes: an attempt starts after the checkpoint of the previous one (step 2)
    and re-sends the train metrics of the steps it re-runs."""
    def script(payload):
        start = steps_done.get(payload.key, 0)
        ev = dict(key=payload.key, attempt=payload.attempt)
        out = [Event(kind="start", step=start, info={"device": "cpu", "node_id": "node-a"}, **ev)]
        out += [Event(kind="train", step=s, metrics={"loss": 1.0 / s}, **ev) for s in range(start + 1, 5)]
        steps_done[payload.key] = 2  # its checkpoint
        final = {"miou": 0.5}
        return [*out, "result", TrialOutcome(status="finished", metrics=final)]
    return script


def test_attempts_count_every_invocation_and_resumed_steps_are_logged_once(grid, tmp_path: Path):
    recorder, steps = MemoryRecorder(), {}
    stop = StopFlag()

    def interrupt(name: str) -> None:  # Ctrl-C once every cell sent its step-3 metrics
        runs = recorder.children()
        if name == "wait" and len(runs) == 3 and all(any(s == 3 for _, _, s in r.metrics) for r in runs):
            stop.set()

    # attempts.jsonl is the worker's: one line per launch, in every invocation
    def launched(payload):
        line = json.dumps({"attempt": payload.attempt})
        path = Path(payload.cell_dir) / "attempts.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.open("a").write(line + "\n")
        return _resumable(steps)(payload)

    policy, stop = _run(grid, tmp_path, recorder, FakeLauncher(launched, hook=interrupt), stop=stop, limit=3)
    assert stop.reason == "signal" and {r.status for r in policy.results} == {"killed"}
    again = FakeLauncher(launched)
    policy, _ = _run(grid, tmp_path, recorder, again)
    assert [p.attempt for p in again.submitted] == [2, 2, 2]  # numbered over every invocation
    for run in recorder.children():
        assert run.status == "FINISHED" and run.tags["attempts"] == "2"
        loss_steps = [s for k, _, s in run.metrics if k == "loss"]
        assert loss_steps == [1, 2, 3, 4]  # steps 3 and 4 ran twice, each is recorded once


def test_a_second_signal_skips_the_grace(grid, tmp_path: Path):
    stop, recorder = StopFlag(), MemoryRecorder()
    calls = []

    def twice(name: str) -> None:
        calls.append(name)
        if name == "wait" and calls.count("wait") == 3:
            stop.set()
        if name == "stop":
            raise KeyboardInterrupt  # the second Ctrl-C arrives while the first trial is asked to stop

    launcher = FakeLauncher(hook=twice)
    policy, stop = _run(grid, tmp_path, recorder, launcher, stop=stop)
    assert stop and not [r for r in recorder.children() if r.status == "RUNNING"]
