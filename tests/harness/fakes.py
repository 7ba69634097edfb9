"""Fakes for driving grids and studies without Ray or MLflow: a scripted launcher and an in-memory recorder.

:class:`FakeLauncher` runs each submitted attempt as a script, one item per ``wait()``: events (put on
its queue), then a ``result.json`` on disk (as a worker writes it before its task returns), then the
outcome. :class:`MemoryRecorder` keeps runs in a dict with the MLflow semantics the driver relies on
(parent found by key, the latest child run per cell hash with FINISHED winning, reopening, buffered
metrics). Both call ``hook(name)`` before every method, so a test can interrupt at any call.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.driver import Event, TrialOutcome, TrialPayload, write_json

Step = Event | TrialOutcome | str  # "result": write result.json of the outcome that follows


def default_script(payload: TrialPayload, *, steps: int = 4, val_every: int = 2,
                   score: Callable[[TrialPayload], float] | None = None) -> list[Step]:
    """start, a train event per step, an eval every ``val_every``, a checkpoint, then finished metrics."""
    miou = score(payload) if score else (int(payload.cell_hash[:4], 16) % 1000) / 1000 if payload.cell_hash else 0.5
    ev = dict(key=payload.key, attempt=payload.attempt)
    script: list[Step] = [Event(kind="start", step=0, info={"device": "cpu", "torch": "fake", "host": "here"}, **ev)]
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
                 hook: Callable[[str], None] | None = None) -> None:
        self.script, self.hook = script, hook or (lambda name: None)
        self._ids = itertools.count()
        self.live: dict[int, list[Step]] = {}  # handle -> steps still to run
        self.payloads: dict[int, TrialPayload] = {}
        self.outcomes: dict[int, TrialOutcome] = {}
        self.submitted: list[TrialPayload] = []
        self.cancelled: list[TrialPayload] = []
        self.queue: list[Event] = []
        self.closed = False

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
        out, self.queue = self.queue, []
        return out

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
        self.runs: dict[str, Run] = {}
        self._buffer: list[tuple[str, str, float, int]] = []

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

    def flush(self) -> None:
        self.hook("flush")
        buffer, self._buffer = self._buffer, []
        for run_id, k, v, step in buffer:
            self.runs[run_id].metrics.append((k, v, step))

    def end_run(self, run_id: str, *, status: str, tags: dict[str, Any] | None = None,
                artifacts: list[tuple[Path, str | None]] = ()) -> None:
        self.hook("end_run")
        assert status in ("FINISHED", "FAILED", "KILLED"), status
        self.flush()
        run = self.runs[run_id]
        run.tags.update(_str(tags or {}))
        run.artifacts += [Path(p).name for p, _ in artifacts if Path(p).is_file()]
        run.status = status

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


def _str(d: dict[str, Any]) -> dict[str, str]:
    import json

    return {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v) for k, v in d.items()}
