"""harness.tracking_queue with the grid driver, without Ray or MLflow: a store that goes away mid-grid.

A :class:`FlakyStore` wraps the in-memory recorder and refuses every call while ``down`` (as an MLflow
server that was stopped does); the grid runs on the scripted launcher. The real server outage is in
test_outage.py (slow).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.cells import expand
from harness.driver import StopFlag, TrackingLost, drive
from harness.grid import GridPolicy
from harness.spec import parse_spec
from harness.tracking_queue import JOURNAL_FILE, LOST, REFUSED, RETRY, QueuedRecorder
from tests.harness.fakes import FakeLauncher, MemoryRecorder, NoConsole


class FlakyStore:
    """A recorder whose every call raises ConnectionError while ``down`` (or RefusedWrite for ``refuse``)."""

    def __init__(self, inner: MemoryRecorder) -> None:
        self.inner, self.down, self.refuse, self.calls_while_down = inner, False, set(), 0

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                self.calls_while_down += 1
                raise ConnectionError("connection refused")
            if name in self.refuse:
                raise RefusedWrite(f"{name} refused")
            return attr(*args, **kwargs)

        return call


class RefusedWrite(Exception):
    pass


def classify(e: BaseException) -> str:
    return REFUSED if isinstance(e, RefusedWrite) else LOST if isinstance(e, OSError) and "damaged" in str(e) else RETRY


@pytest.fixture(scope="module")
def grid():
    spec = parse_spec({"name": "g", "base": {"train": {"steps": 4}},
                       "baselines": [{"name": "fpn", "overrides": {"model.name": "fpn"}},
                                     {"name": "sfnet", "overrides": {"model.name": "sfnet"}}],
                       "seeds": [0, 1, 2]})
    return spec, expand(spec)


def _queued(store, out: Path, **kw) -> QueuedRecorder:
    kw = {"outage_s": 30.0, "backoff_s": (0.01, 0.05), "wait_s": 0.5, **kw}
    return QueuedRecorder(store, classify=classify, journal=out / JOURNAL_FILE, **kw)


def _run(grid, out: Path, recorder, launcher, *, limit: int = 2) -> tuple[GridPolicy, StopFlag]:
    spec, cells = grid
    parent = recorder.start_parent(key="grid", name="g", tags={}, params={})
    policy = GridPolicy(spec=spec, cells=cells, out=out, recorder=recorder, parent=parent, sha="sha")
    stop = StopFlag()
    drive(policy, launcher, recorder, NoConsole(), limit=limit, stop=stop, grace_s=1.0)
    return policy, stop


def test_the_grid_goes_on_while_the_store_is_away_and_everything_is_written_in_order(grid, tmp_path: Path):
    memory = MemoryRecorder()
    store = FlakyStore(memory)
    waits = {"n": 0, "launched while down": 0}

    def outage(name: str) -> None:  # the store goes away after the first launches, back 12 loop steps later
        if name == "wait":
            waits["n"] += 1
            store.down = 3 <= waits["n"] < 15
        if name == "submit" and store.down:
            waits["launched while down"] += 1

    launcher = FakeLauncher(hook=outage)
    recorder = _queued(store, tmp_path)
    tic = time.monotonic()
    policy, stop = _run(grid, tmp_path, recorder, launcher)
    assert not stop and time.monotonic() - tic < 10  # never blocked on the store
    assert waits["launched while down"] >= 2  # the grid kept launching
    assert recorder.close(timeout_s=20) and store.calls_while_down > 0
    assert [r.status for r in policy.results] == ["finished"] * 6 and len(launcher.submitted) == 6
    assert not [r for r in memory.children() if r.status != "FINISHED"]
    assert all(len(runs) == 1 for runs in memory.by_hash().values())  # provisional ids bound, no duplicates
    for run in memory.children():  # every buffered point written, in order
        assert [step for k, _, step in run.metrics if k == "loss"] == [1, 2, 3, 4], run.name
        assert run.tags["device"] == "cpu" and run.tags["attempts"] == "1"
    assert not json.loads((tmp_path / JOURNAL_FILE).read_text())["ops"]


def test_a_store_away_past_the_limit_stops_cleanly_and_a_rerun_records_everything(grid, tmp_path: Path):
    memory = MemoryRecorder()
    store = FlakyStore(memory)

    def goes_away(name: str) -> None:  # after the second launch, for good; trials take their time
        if name == "submit" and len(launcher.submitted) == 2:
            store.down = True
        if name == "wait":
            time.sleep(0.05)

    launcher = FakeLauncher(hook=goes_away)
    recorder = _queued(store, tmp_path, outage_s=0.3)
    policy, stop = _run(grid, tmp_path, recorder, launcher)
    assert stop.reason == "tracking" and "unreachable for" in stop.message
    assert launcher.stopped  # the running cells were asked to checkpoint and stop
    recorder.close(timeout_s=0)
    journal = json.loads((tmp_path / JOURNAL_FILE).read_text())
    assert recorder.journaled == len(journal["ops"]) > 0
    done = {c.hash for c in grid[1] if (tmp_path / "cells" / c.hash / "result.json").is_file()}
    assert done  # finished cells are on disk even though the store never heard of them

    store.down = False  # the store is back: the re-run replays the journal first
    again_launcher = FakeLauncher()
    again = _queued(store, tmp_path)
    policy, stop = _run(grid, tmp_path, again, again_launcher)
    assert again.close(timeout_s=20) and not stop
    assert all(r.done for r in policy.results)
    assert not done & {p.key for p in again_launcher.submitted}  # a finished cell never trains again
    assert {r.status for r in memory.children()} == {"FINISHED"}  # nothing left RUNNING, nothing duplicated
    assert all(len(runs) == 1 for runs in memory.by_hash().values())
    assert not json.loads((tmp_path / JOURNAL_FILE).read_text())["ops"]


def test_refused_writes_are_dropped_with_a_line_and_the_rest_goes_on(tmp_path: Path):
    memory, lines = MemoryRecorder(), []
    store = FlakyStore(memory)
    recorder = _queued(store, tmp_path, notify=lines.append)
    parent = recorder.start_parent(key="g", name="g", tags={}, params={})
    run = recorder.start_run(name="a", parent_id=parent, cell_hash="h", params={}, tags={})
    store.refuse = {"set_tags"}
    recorder.set_tags(run, {"x": 1})
    recorder.end_run(run, status="FINISHED")
    assert recorder.close(timeout_s=10)
    assert memory.runs[run].status == "FINISHED" and "x" not in memory.runs[run].tags
    assert any("refused set_tags" in line and "dropped" in line for line in lines)


def test_provisional_ids_reads_and_the_bound(tmp_path: Path):
    memory = MemoryRecorder()
    store = FlakyStore(memory)
    recorder = _queued(store, tmp_path, max_pending=50)
    parent = recorder.start_parent(key="g", name="g", tags={}, params={})
    assert recorder.start_run(name="fast", parent_id=parent, cell_hash="h0", params={}, tags={}).startswith("r")
    store.down = True
    late = recorder.start_run(name="late", parent_id=parent, cell_hash="h1", params={}, tags={})
    assert late.startswith("pending-")  # the store is away: an id that the writer binds later
    recorder.set_tags(late, {"seen": "yes"})
    store.down = False
    assert recorder.cell_runs()["h1"].status == "RUNNING"  # a read waits for the writes ahead of it
    assert memory.runs[recorder._ids[late]].tags["seen"] == "yes"
    store.down = True
    for i in range(60):
        recorder.set_tags(parent, {"i": i})
    assert "more than 50 tracking writes are waiting" in recorder.problem()
    with pytest.raises(TrackingLost):
        recorder.final_metrics(parent)
    recorder.close(timeout_s=0)
    assert recorder.journaled >= 60


def test_a_damaged_store_is_lost_at_once(tmp_path: Path):
    class Damaged(MemoryRecorder):
        def set_tags(self, run_id, tags):
            raise OSError("database disk image is damaged")

    recorder = _queued(Damaged(), tmp_path, outage_s=3600)
    parent = recorder.start_parent(key="g", name="g", tags={}, params={})
    recorder.set_tags(parent, {"a": 1})
    deadline = time.monotonic() + 10
    while recorder.problem() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "unusable: OSError: database disk image is damaged" in recorder.problem()
    recorder.close(timeout_s=0)
