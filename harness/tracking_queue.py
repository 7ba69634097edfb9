"""The driver never waits on the tracking store: an ordered, bounded retry queue in front of a Recorder.

:class:`QueuedRecorder` is the :class:`harness.driver.Recorder` the driver uses. Every tracking call
becomes an operation on one FIFO queue, executed in order by one writer thread on the real recorder
(:class:`harness.mlflow_io.MlflowRecorder`, or the in-memory one of the tests), so nothing on the
driver's loop blocks on the store:

- writes (tags, metrics, artifacts, ends) return at once; a new run's id is waited for at most
  ``wait_s``, after which the run gets a provisional id (``pending-...``) that the writer binds to the
  real one when the store answers; later operations naming it are resolved then;
- an operation that fails with a retryable error (connection refused, timeout, 5xx, a locked SQLite)
  is retried with backoff, and everything behind it waits: when the store is back, the buffer is
  written in order. The grid keeps launching and trials keep running meanwhile;
- when the store stays away past ``outage_s`` (spec ``tracking_outage_s``, ``--tracking-outage-s``),
  or is damaged, or more than ``max_pending`` operations wait, :meth:`QueuedRecorder.problem` says so
  and the driver stops cleanly (exit code :data:`harness.exit_codes.TRACKING_LOST`);
- what is still queued when the driver ends is written to a journal (``<out>/tracking-journal.json``)
  and replayed first by the next session on that store, so a re-run records everything and closes
  every run the stopped driver could not (nothing stays RUNNING);
- a write the store refuses (e.g. a run deleted by hand) is dropped with a warning, not retried forever.

Reads (``cell_runs``, ``final_metrics``) and ``start_parent`` wait for the queue ahead of them (they
run at the start of a session). While idle the writer refreshes the parent run's driver heartbeat
(tags given by the caller: ``Tag.DRIVER``, ``Tag.DRIVER_HEARTBEAT``), which is how a report tells that a
RUNNING cell's driver is gone.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.driver import TrackingLost
from harness.secrets import redact

__all__ = ["HEARTBEAT_S", "JOURNAL_FILE", "LOST", "REFUSED", "RETRY", "QueuedRecorder", "TrackingLost"]

JOURNAL_FILE = "tracking-journal.json"
HEARTBEAT_S = 30.0
_BATCH = 1000  # metric points per write (MLflow's per-request limit)

# classify(exception) -> one of these
RETRY, LOST, REFUSED = "retry", "lost", "refused"


@dataclass
class _Op:
    method: str  # a method of the inner recorder
    kwargs: dict[str, Any]
    binds: str | None = None  # the provisional id its result (a run id) is bound to
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None


class QueuedRecorder:
    """A :class:`harness.driver.Recorder` that queues every call for one writer thread (module docstring)."""

    def __init__(self, inner: Any, *, outage_s: float, classify: Callable[[BaseException], str],
                 journal: Path | None = None, max_pending: int = 200_000, wait_s: float = 5.0,
                 backoff_s: tuple[float, float] = (0.5, 15.0), heartbeat_s: float = HEARTBEAT_S,
                 heartbeat: Callable[[], dict[str, Any]] | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        """Args:
        inner: the recorder that talks to the store (its methods are only ever called by the writer thread).
        outage_s: how long the store may stay unreachable before :meth:`problem` reports it lost.
        classify: an exception of the store -> RETRY, LOST or REFUSED (``harness.mlflow_io.classify_error``).
        journal: where operations left at :meth:`close` go, and are replayed from at the start.
        max_pending: more queued operations than this is reported as lost (bounded memory).
        wait_s: how long a new run's id is waited for before a provisional id is handed out.
        backoff_s: first and longest pause between retries.
        heartbeat_s: how often the parent run's driver heartbeat is refreshed while idle.
        heartbeat: the heartbeat's tags, e.g. ``{Tag.DRIVER: "host:pid", Tag.DRIVER_HEARTBEAT: time.time()}``.
        notify: receives one line when an outage starts, when it ends and when a write is refused.
        """
        self.inner, self.outage_s, self.classify = inner, outage_s, classify
        self.tracking_uri, self.experiment_id = inner.tracking_uri, inner.experiment_id
        self.artifact_location = getattr(inner, "artifact_location", None)
        self.journal, self.max_pending, self.wait_s = journal, max_pending, wait_s
        self.backoff_s, self.heartbeat_s, self.heartbeat = backoff_s, heartbeat_s, heartbeat
        self.notify = notify or (lambda line: None)
        self.refused: list[str] = []  # one line per write the store refused
        self.journaled = 0  # operations left for the next session by close()
        self._ops: deque[_Op] = deque()
        self._ids: dict[str, str] = {}  # provisional -> real run id
        self._buffer: dict[str, list[tuple[str, float, int, int]]] = {}  # run id -> metric points
        self._cv = threading.Condition()
        self._lost: str | None = None
        self._down_since: float | None = None
        self._closing = False
        self._parent: str | None = None
        self._beat = 0.0
        self._replayed: list[_Op] = []  # journaled operations not yet written again
        self._replay()
        self._thread = threading.Thread(target=self._write_loop, name="ddsm-bench-tracking", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the Recorder interface

    def start_parent(self, *, key: str, name: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        """Create or reopen the parent run (waits for the store); its driver heartbeat starts now."""
        self._parent = self._call("start_parent", key=key, name=name, tags=tags, params=params)
        self._heartbeat_op()
        return self._parent

    def cell_runs(self) -> dict[str, Any]:
        """The latest child run of each cell hash (waits for the queue and the store)."""
        return self._call("cell_runs")

    def final_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run (waits for the queue and the store)."""
        return self._call("final_metrics", run_id=run_id)

    def start_run(self, *, name: str, parent_id: str, cell_hash: str, params: dict[str, Any],
                  tags: dict[str, Any], reuse: str | None = None) -> str:
        """Queue the run's creation; its id if the store answers within ``wait_s``, else a provisional one."""
        provisional = f"pending-{uuid.uuid4().hex[:12]}"
        op = self._put("start_run", binds=provisional, name=name, parent_id=parent_id, cell_hash=cell_hash,
                       params=params, tags=tags, reuse=reuse)
        if self._down_since is None and self._lost is None and op.done.wait(self.wait_s) and op.result:
            return op.result
        return provisional

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Queue tags."""
        self._put("set_tags", run_id=run_id, tags=tags)

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int) -> None:
        """Buffer scalar metrics of ``step`` (queued by :meth:`flush`)."""
        now = int(time.time() * 1000)
        self._buffer.setdefault(run_id, []).extend(
            (k, float(v), now, int(step)) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v)

    def log_artifact(self, run_id: str, path: Path) -> None:
        """Queue one file's upload."""
        self._put("log_artifact", run_id=run_id, path=str(path))

    def flush(self) -> None:
        """Queue every buffered metric point, in order, at most :data:`_BATCH` per write."""
        for run_id in list(self._buffer):
            self._flush_run(run_id)

    def end_run(self, run_id: str, *, status: str, tags: dict[str, Any] | None = None,
                artifacts: Iterable[tuple[Path, str | None]] = ()) -> None:
        """Queue the run's buffered metrics, then its end (tags, artifacts, final status)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r} is not allowed: expected FINISHED, FAILED or KILLED")
        self._flush_run(run_id)
        self._put("end_run", run_id=run_id, status=status, tags=tags,
                  artifacts=[(str(p), where) for p, where in artifacts])

    # ------------------------------------------------------------------ for the driver

    def problem(self) -> str | None:
        """Why tracking cannot go on (the driver then stops cleanly), else None."""
        with self._cv:
            if self._lost is None and len(self._ops) > self.max_pending:
                self._lost = (f"more than {self.max_pending} tracking writes are waiting for "
                              f"{redact(self.tracking_uri)}")
            return self._lost

    def pending(self) -> int:
        """Operations not yet written."""
        with self._cv:
            return len(self._ops)

    def close(self, timeout_s: float = 60.0) -> bool:
        """Write what is queued (waiting at most ``timeout_s``, or the outage limit if the store is away),
        stop the writer, journal what is left; True when everything was written."""
        self.flush()
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._ops and self._lost is None and time.monotonic() < deadline:
                self._cv.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        with self._cv:
            left = list(self._ops)
        self._write_journal(left)
        self.journaled = len(left)
        return not left

    # ------------------------------------------------------------------ queue

    def _put(self, method: str, *, binds: str | None = None, **kwargs: Any) -> _Op:
        op = _Op(method=method, kwargs=kwargs, binds=binds)
        with self._cv:
            self._ops.append(op)
            self._cv.notify_all()
        return op

    def _call(self, method: str, **kwargs: Any) -> Any:
        """Queue an operation and wait for its result (reads and the parent run)."""
        op = self._put(method, **kwargs)
        while not op.done.wait(0.2):
            if self.problem() is not None:
                raise TrackingLost(self._lost)
        return op.result

    def _flush_run(self, run_id: str) -> None:
        points = self._buffer.pop(run_id, [])
        for i in range(0, len(points), _BATCH):
            self._put("log_points", run_id=run_id, points=points[i: i + _BATCH])

    def _heartbeat_op(self) -> None:
        self._beat = time.monotonic()
        if self.heartbeat is not None:
            self._put("set_tags", run_id=self._parent, tags=self.heartbeat())

    # ------------------------------------------------------------------ the writer thread

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                beats = self._parent is not None and self.heartbeat is not None
                while not self._ops and not self._closing:
                    due = self.heartbeat_s - (time.monotonic() - self._beat)
                    if beats and due <= 0:
                        break
                    self._cv.wait(timeout=max(0.05, due) if beats else None)
                if not self._ops:
                    if self._closing:
                        return
                    op = None
                else:
                    op = self._ops[0]
            if op is None:
                self._heartbeat_op()
                continue
            if not self._execute(op):
                return  # lost: what is queued stays queued (journaled by close)
            with self._cv:
                self._ops.popleft()
                self._cv.notify_all()
            op.done.set()
            if self._replayed:  # keep the journal true to what is left, so a kill now never replays twice
                self._replayed = [o for o in self._replayed if o is not op]
                self._write_journal(self._replayed)

    def _execute(self, op: _Op) -> bool:
        """Run one operation, retrying while the store is away; False when tracking is lost."""
        pause = self.backoff_s[0]
        while True:
            try:
                kwargs = self._resolve(op.kwargs)
            except KeyError as e:  # names a run whose creation the store refused
                self._refuse(op, f"run {e.args[0]} was never created")
                return True
            try:
                op.result = getattr(self.inner, op.method)(**kwargs)
            except Exception as e:  # noqa: BLE001 - every store error is classified
                kind = self.classify(e)
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                if kind == REFUSED:
                    self._refuse(op, why)
                    return True
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    self.notify(f"tracking store {redact(self.tracking_uri)} unreachable ({why}): buffering, "
                                f"the grid goes on; stopping if it stays away {self.outage_s:.0f} s")
                if kind == LOST or now - self._down_since > self.outage_s:
                    with self._cv:
                        self._lost = (f"tracking store {redact(self.tracking_uri)} "
                                      + (f"unusable: {why}" if kind == LOST else
                                         f"unreachable for {now - self._down_since:.0f} s: {why}"))
                        self._cv.notify_all()
                    return False
                with self._cv:
                    if self._closing:  # close() gave up waiting: leave the rest to the journal
                        return False
                    self._cv.wait(timeout=pause)
                pause = min(self.backoff_s[1], pause * 2)
                continue
            if op.binds is not None and op.result:
                self._ids[op.binds] = op.result
            if self._down_since is not None:
                self.notify(f"tracking store back after {time.monotonic() - self._down_since:.0f} s: "
                            f"writing {self.pending()} buffered operation(s) in order")
                self._down_since = None
            return True

    def _resolve(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        for key in ("run_id", "parent_id", "reuse"):
            value = out.get(key)
            if isinstance(value, str) and value.startswith("pending-"):
                out[key] = self._ids[value]
        if out.get("artifacts"):
            out["artifacts"] = [(Path(p), where) for p, where in out["artifacts"]]
        if "path" in out:
            out["path"] = Path(out["path"])
        return out

    def _refuse(self, op: _Op, why: str) -> None:
        line = f"tracking store refused {op.method}({op.kwargs.get('run_id') or op.kwargs.get('name', '')}): {why}"
        self.refused.append(line)
        self.notify(line + " (dropped)")

    # ------------------------------------------------------------------ journal

    def _write_journal(self, left: list[_Op]) -> None:
        if self.journal is None:
            return
        if not left and not self._ids and not self.journal.is_file():
            return
        data = {"tracking_uri": redact(self.tracking_uri), "experiment_id": self.experiment_id, "ids": self._ids,
                "ops": [{"method": op.method, "kwargs": op.kwargs, "binds": op.binds} for op in left
                        if op.method not in ("cell_runs", "final_metrics")]}
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        tmp.write_text(json.dumps(data, default=str))
        tmp.replace(self.journal)

    def _replay(self) -> None:
        """Queue what an earlier session journaled for this store, ahead of everything else."""
        if self.journal is None or not self.journal.is_file():
            return
        try:
            data = json.loads(self.journal.read_text())
        except ValueError:
            self.notify(f"tracking journal {self.journal} is unreadable: moved aside to {self.journal.name}.bad")
            self.journal.replace(self.journal.with_name(self.journal.name + ".bad"))
            return
        if data.get("tracking_uri") != redact(self.tracking_uri) or data.get("experiment_id") != self.experiment_id:
            if data.get("ops"):
                self.notify(f"tracking journal {self.journal} belongs to {data.get('tracking_uri')} (experiment "
                            f"{data.get('experiment_id')}): not replayed here; re-run with that --tracking-uri")
            return
        self._ids.update(data.get("ids", {}))
        ops = [_Op(method=o["method"], kwargs=o["kwargs"], binds=o.get("binds")) for o in data.get("ops", [])]
        self._ops.extend(ops)
        self._replayed = list(ops)
        if ops:
            self.notify(f"replaying {len(ops)} tracking write(s) an earlier run of this out dir could not send")
