"""Fakes for driving grids and studies without Ray or MLflow: a scripted launcher and an in-memory recorder.

:class:`FakeLauncher` runs each submitted attempt as a script, one item per ``wait()``: events (put on
its queue), then a ``result.json`` on disk (as a worker writes it before its task returns), then the
outcome. :class:`MemoryRecorder` keeps runs in a dict with the MLflow semantics the driver relies on
(parent found by key, the latest child run per cell hash with FINISHED winning, reopening, buffered
metrics). Both call ``hook(name)`` before every method, so a test can interrupt at any call.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.driver import GRACE_S, Event, StopFlag, TrialOutcome, TrialPayload, drive, write_json

Step = Event | TrialOutcome | str  # "result": write result.json of the outcome that follows


def default_script(payload: TrialPayload, *, steps: int = 4, val_every: int = 2,
                   score: Callable[[TrialPayload], float] | None = None) -> list[Step]:
    """start, a train event per step, an eval every ``val_every``, a checkpoint, then finished metrics."""
    miou = score(payload) if score else (int(payload.cell_hash[:4], 16) % 1000) / 1000 if payload.cell_hash else 0.5
    ev = dict(key=payload.key, attempt=payload.attempt)
    script: list[Step] = [Event(kind="start", step=0, info={"device": "cpu", "torch": "fake", "host": "here",
                                                            "node_id": "node-a"}, **ev)]
    for s in range(1, steps + 1):
        script.append(Event(kind="train", step=s, metrics={"loss": 1.0 / s}, **ev))
        if s % val_every == 0 and s < steps:
            script.append(Event(kind="eval", step=s, metrics={"miou": miou * s / steps}, **ev))
            script.append(Event(kind="checkpoint", step=s, **ev))
    script.append(Event(kind="eval", step=steps, metrics={"miou": miou}, **ev))
    final = {"miou": miou, "pixel_acc": 0.9, "gflops": 1.5, "params_m": 2.0, "latency_ms": 3.0}
    return [*script, "result", TrialOutcome(status="finished", metrics=final)]


def failing_script(failure_class: str) -> list[Step]:
    """An attempt that fails at once with ``failure_class``."""
    return [TrialOutcome(status="failed", failure_class=failure_class, error=f"injected {failure_class}")]


class FakeLauncher:
    """A :class:`harness.driver.Launcher` whose attempts follow scripts (``script(payload) -> steps``)."""

    def __init__(self, script: Callable[[TrialPayload], list[Step]] = default_script,
                 hook: Callable[[str], None] | None = None, event_lag: int = 0) -> None:
        """``event_lag``: how many :meth:`events` calls an event waits before it is returned (the Ray
        launcher's queue answers a step late); :meth:`caught_up` is False while an attempt's events wait."""
        self.script, self.hook, self.event_lag = script, hook or (lambda name: None), event_lag
        self._ids = itertools.count()
        self.live: dict[int, list[Step]] = {}  # handle -> steps still to run
        self.payloads: dict[int, TrialPayload] = {}
        self.outcomes: dict[int, TrialOutcome] = {}
        self.submitted: list[TrialPayload] = []
        self.cancelled: list[TrialPayload] = []
        self.queue: list[Event] = []
        self._lagging: list[tuple[int, Event]] = []  # (events() calls left to wait, event)
        self.stopped: list[TrialPayload] = []
        self.lost_reason: str | None = None  # set to simulate a lost cluster
        self.closed = False
        self.prepared: list[int] = []  # every prepare(queued) hint, in order

    def submit(self, payload: TrialPayload) -> int:
        self.hook("submit")
        handle = next(self._ids)
        Path(payload.cell_dir).mkdir(parents=True, exist_ok=True)
        self.live[handle], self.payloads[handle] = list(self.script(payload)), payload
        self.submitted.append(payload)
        return handle

    def wait(self, handles: list[int], timeout: float) -> list[int]:
        """Advance every live attempt by one step; return those whose outcome is in."""
        self.hook("wait")
        for h in handles:
            steps = self.live.get(h)
            if not steps:
                continue
            step = steps.pop(0)
            if isinstance(step, Event):
                self.queue.append(step)
            elif step == "result":
                p = self.payloads[h]
                write_json(Path(p.cell_dir) / "result.json", {"cell_hash": p.cell_hash, "eval_hash": p.eval_hash,
                                                              "metrics": steps[0].metrics})
            else:
                self.outcomes[h] = step
                del self.live[h]
        return [h for h in handles if h in self.outcomes]

    def events(self) -> list[Event]:
        self.hook("events")
        self._lagging += [(self.event_lag, e) for e in self.queue]
        self.queue = []
        out = [e for wait, e in self._lagging if wait <= 0]
        self._lagging = [(wait - 1, e) for wait, e in self._lagging if wait > 0]
        return out

    def caught_up(self, handle: int) -> bool:
        self.hook("caught_up")
        p = self.payloads[handle]
        return not any((e.key, e.attempt) == (p.key, p.attempt) for e in self.queue + [e for _, e in self._lagging])

    def done(self, handle: int) -> bool:
        self.hook("done")
        return handle in self.outcomes

    def outcome(self, handle: int, timeout: float | None = None) -> TrialOutcome:
        self.hook("outcome")
        return self.outcomes[handle]

    def cancel(self, handle: int) -> None:
        self.hook("cancel")
        if self.live.pop(handle, None) is not None:
            self.cancelled.append(self.payloads[handle])

    def stop(self, handle: int) -> None:
        """The attempt checkpoints, sends its end event and fails ``killed`` (as a trial asked to stop does)."""
        self.hook("stop")
        if self.live.pop(handle, None) is None:
            return
        p = self.payloads[handle]
        self.stopped.append(p)
        ev = dict(key=p.key, attempt=p.attempt)
        self.queue += [Event(kind="checkpoint", step=0, **ev),
                       Event(kind="end", step=0, info={"status": "failed", "failure_class": "killed"}, **ev)]
        self.outcomes[handle] = TrialOutcome(status="failed", failure_class="killed", error="stopped")

    def prepare(self, queued: int) -> None:
        self.prepared.append(queued)

    def lost(self) -> str | None:
        self.hook("lost")
        return self.lost_reason

    def close(self) -> None:
        self.closed = True

    def launches(self, key: str) -> int:
        """How many attempts of ``key`` were submitted."""
        return sum(p.key == key for p in self.submitted)


@dataclass
class Run:
    """One run in a :class:`MemoryRecorder`."""

    run_id: str
    name: str
    status: str = "RUNNING"
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)  # (key, value, step), in logging order
    artifacts: list[str] = field(default_factory=list)


@dataclass
class CellRun:
    run_id: str
    cell_hash: str
    status: str
    eval_hash: str = ""
    metrics: dict[str, float] | None = None  # None: the policy asks final_metrics()


class MemoryRecorder:
    """A :class:`harness.driver.Recorder` in memory (one experiment)."""

    tracking_uri = "memory://"
    experiment_id = "0"

    def __init__(self, hook: Callable[[str], None] | None = None) -> None:
        self.hook = hook or (lambda name: None)
        self.lost_reason: str | None = None  # set to simulate a store gone past its outage limit
        self.runs: dict[str, Run] = {}
        self._buffer: list[tuple[str, str, float, int]] = []
        self._high: dict[str, dict[str, int]] = {}  # run -> key -> latest step (points at older steps are skipped)

    def _new(self, name: str, tags: dict[str, Any]) -> Run:
        run = Run(run_id=f"r{len(self.runs)}", name=name, tags=_str(tags))
        self.runs[run.run_id] = run
        return run

    def start_parent(self, *, key: str, name: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        self.hook("start_parent")
        found = [r for r in self.runs.values() if r.tags.get("kind") == "grid" and r.tags.get("grid_hash") == key]
        if found:
            run = found[0]
            run.status = "RUNNING"
        else:
            run = self._new(name, {"kind": "grid", "grid_hash": key})
            run.params.update(_str(params))
        run.tags.update(_str(tags))
        return run.run_id

    def cell_runs(self) -> dict[str, CellRun]:
        self.hook("cell_runs")
        out: dict[str, CellRun] = {}
        for run in self.children():
            h = run.tags.get("cell_hash", "")
            if h not in out or out[h].status != "FINISHED":
                out[h] = CellRun(run.run_id, h, run.status, run.tags.get("eval_hash", ""))
        return out

    def start_run(self, *, name: str, parent_id: str, cell_hash: str, params: dict[str, Any], tags: dict[str, Any],
                  reuse: str | None = None) -> str:
        self.hook("start_run")
        tags = {**tags, "kind": "cell", "cell_hash": cell_hash}
        if reuse:
            run = self.runs[reuse]
            run.status = "RUNNING"
            self._high[reuse] = {}
            for k, _, step in run.metrics:
                self._high[reuse][k] = max(step, self._high[reuse].get(k, -1))
        else:
            run = self._new(name, {"mlflow.parentRunId": parent_id})
        run.params.update(_str(params))
        run.tags.update(_str(tags))
        return run.run_id

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.hook("set_tags")
        self.runs[run_id].tags.update(_str(tags))

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int) -> None:
        self.hook("log_metrics")
        self._buffer += [(run_id, k, float(v), int(step)) for k, v in metrics.items()]

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.hook("log_artifact")
        self.runs[run_id].artifacts.append(Path(path).name)

    def log_points(self, run_id: str, points: list[tuple[str, float, int, int]]) -> None:
        self.hook("log_points")
        self._keep(run_id, [(k, float(v), int(step)) for k, v, _, step in points])

    def flush(self) -> None:
        self.hook("flush")
        buffer, self._buffer = self._buffer, []
        for run_id, k, v, step in buffer:
            self._keep(run_id, [(k, v, step)])

    def _keep(self, run_id: str, points: list[tuple[str, float, int]]) -> None:
        high = self._high.setdefault(run_id, {})
        for k, v, step in points:
            if step > high.get(k, -1):
                self.runs[run_id].metrics.append((k, v, step))
                high[k] = step

    def end_run(self, run_id: str, *, status: str, tags: dict[str, Any] | None = None,
                artifacts: list[tuple[Path, str | None]] = ()) -> None:
        self.hook("end_run")
        assert status in ("FINISHED", "FAILED", "KILLED"), status
        self.flush()
        run = self.runs[run_id]
        run.tags.update(_str(tags or {}))
        run.artifacts += [Path(p).name for p, _ in artifacts if Path(p).is_file()]
        run.status = status

    def problem(self) -> str | None:
        self.hook("problem")
        return self.lost_reason

    def final_metrics(self, run_id: str) -> dict[str, float]:
        self.hook("final_metrics")
        latest: dict[str, tuple[int, float]] = {}
        for k, v, step in self.runs[run_id].metrics:
            if k not in latest or step >= latest[k][0]:
                latest[k] = (step, v)
        return {k: v for k, (_, v) in latest.items()}

    # ------------------------------------------------------------------ for assertions

    def children(self) -> list[Run]:
        """Every cell/trial run, in creation order."""
        return [r for r in self.runs.values() if r.tags.get("kind") == "cell"]

    def by_hash(self) -> dict[str, list[Run]]:
        """Child runs per cell hash."""
        out: dict[str, list[Run]] = {}
        for r in self.children():
            out.setdefault(r.tags["cell_hash"], []).append(r)
        return out



class NoConsole:
    """A driver console that shows nothing (driver-logic tests)."""

    def refresh(self) -> None:
        """Nothing to redraw."""


def drive_grid(grid: tuple[Any, list], out: Path, recorder: MemoryRecorder, launcher: FakeLauncher, *,
               stop: StopFlag | None = None, limit: int = 2, grace_s: float = GRACE_S) -> tuple[Any, StopFlag, bool]:
    """Drive a ``(spec, cells)`` grid's GridPolicy on the fake launcher; return (policy, stop flag, interrupted)."""
    from harness.grid import GridPolicy

    spec, cells = grid
    parent = recorder.start_parent(key="grid", name="g", tags={}, params={})
    policy = GridPolicy(spec=spec, cells=cells, out=out, recorder=recorder, parent=parent, sha="sha")
    stop = stop if stop is not None else StopFlag()
    interrupted = drive(policy, launcher, recorder, NoConsole(), limit=limit, stop=stop, grace_s=grace_s)
    return policy, stop, interrupted


def wait_for(what: Callable[[], bool], *, proc: Any, timeout: float, log: Path) -> None:
    """Poll ``what()`` every 0.5 s; fail with the tail of ``log`` when the driver ``proc`` (a Popen) exits or
    ``timeout`` seconds pass first (the live fault tests: node loss, head loss, MLflow outage)."""
    deadline = time.time() + timeout
    while not what():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s (driver rc {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _str(d: dict[str, Any]) -> dict[str, str]:
    import json

    return {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v) for k, v in d.items()}
