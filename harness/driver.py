"""The one driver loop of ``ddsm-bench run`` and ``ddsm-bench tune``: launch, follow, record, interrupt.

:func:`drive` knows nothing of grids, studies, Ray or MLflow. It asks a :class:`Policy` what to run
next, hands it to a :class:`Launcher` (Ray in :mod:`harness.ray_backend`, a scripted fake in the
tests), passes every :class:`Event` a trial sends back to the policy (which may stop the trial:
pruning), and tells the policy each attempt's :class:`TrialOutcome`. The policy records through a
:class:`Recorder` (MLflow in :mod:`harness.mlflow_io`) and decides retries, requeues and budgets:
:class:`harness.grid.GridPolicy`, :class:`harness.study.StudyPolicy`.

Interruption has one path, whatever stops the loop: SIGINT/SIGTERM (:func:`stop_on_signals`), the
tracking store gone past its outage limit (:meth:`Recorder.problem`, or :class:`TrackingLost` from a
read), or the cluster lost (:meth:`Launcher.lost`). Each sets the :class:`StopFlag` with its
``reason`` (``signal``, ``tracking``, ``cluster``: the caller maps it to an exit code); the loop
checks it between steps, so no bookkeeping is ever cut in half, and then: the last events are
delivered; the attempts still running are asked to stop (:meth:`Launcher.stop`: a trial finishes
its current step, writes a checkpoint and sends its ``end`` event) and given up to ``grace_s`` to
do so; every attempt that finished (its outcome came back, or its ``result.json`` is on disk) is
recorded as finished, the others are cancelled and handed to :meth:`Policy.on_interrupted`, and
:meth:`Policy.on_stop` closes what is open but not running. A second signal raises
KeyboardInterrupt to abort a loop that is stuck; the same path then runs, without the grace, with
whatever is left.

Also here: the types that cross the driver/worker boundary (:class:`TrialPayload` in,
:class:`Event` and :class:`TrialOutcome` out, ``result.json`` on disk), so :mod:`harness.worker` and
the launchers share them without importing each other.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Event", "Job", "Launcher", "Policy", "Recorder", "StopFlag", "TrackingLost", "TrialOutcome", "TrialPayload",
           "append_jsonl", "drive", "read_result", "stop_on_signals", "write_json"]

POLL_S = 0.5  # longest wait for a trial to finish before events are delivered and the flag checked
SETTLE_S = 10.0  # longest an ended attempt's outcome waits for its last events (Launcher.caught_up)
SETTLE_POLL_S = 0.05  # the loop's pause while attempts settle and none runs
GRACE_S = 30.0  # how long trials asked to stop get to write their checkpoint
LOST_GRACE_S = 10.0  # the same on a lost cluster (Ray ends a driver whose head is gone after 60 s)
RESULT_FILE = "result.json"


# ============================================================================ what crosses the boundary


@dataclass
class TrialPayload:
    """Everything a worker needs to run one attempt of one trial (picklable, no Ray/MLflow objects)."""

    key: str  # unique among the trials of one driver: the cell hash (grid) or "trial0004" (study)
    cell_hash: str  # hash of the resolved config (harness.cells.cell_hash)
    name: str  # for humans, e.g. "ddsm[branches=dual]/seed=0" or "trial 4"
    config: dict  # to_dict(TrialConfig)
    cell_dir: str  # absolute; the engine's out_dir
    attempt: int  # 1-based
    fail_once: str | None = None  # test hook "<class>:<dir>", see harness.worker
    mode: str = "train"  # train (resume or start) | evaluate (score the final checkpoint again, train nothing)
    eval_hash: str = ""  # how it is scored (harness.cells.eval_hash); result.json records it
    figures: dict | None = None  # ddsm.viz.ViewSettings as a dict: views saved at the end (None: none)


@dataclass(frozen=True)
class Event:
    """Progress of a running attempt, sent by the worker's engine callback."""

    key: str
    attempt: int
    kind: str  # start | resume | train | eval | checkpoint | end
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    time: float = 0.0
    info: dict[str, str] = field(default_factory=dict)  # start: device, torch, host, node_id; resume: path,
    #                                                     damaged; end: status, failure_class


@dataclass(frozen=True)
class TrialOutcome:
    """How an attempt ended: finished with its final scalar metrics, or failed with a failure class."""

    status: str  # finished | failed
    metrics: dict[str, float] = field(default_factory=dict)
    failure_class: str = ""  # one of ddsm.engine.failures.FAILURE_CLASSES (failed only)
    error: str = ""  # one line
    traceback: str = ""

    @property
    def finished(self) -> bool:
        """The attempt trained and validated to the end."""
        return self.status == "finished"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a ``.tmp`` file renamed over ``path``)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def append_jsonl(path: Path, obj: Any) -> None:
    """Append ``obj`` as one JSON line to ``path`` (``attempts.jsonl``, ``outcomes.jsonl``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(obj) + "\n")


def read_result(cell_dir: str | Path, *, eval_hash: str | None = None) -> dict[str, float] | None:
    """The final metrics in ``<cell_dir>/result.json`` (written by a worker when an attempt finished), else None;
    with ``eval_hash``, None unless they were scored that way (an earlier evaluation is not this one's result)."""
    path = Path(cell_dir) / RESULT_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if eval_hash and record.get("eval_hash", "") != eval_hash:
        return None
    return record["metrics"]


# ============================================================================ the parts drive() uses


@dataclass
class Job:
    """One attempt: what the launcher runs and the policy's own record of it (``owner``)."""

    payload: TrialPayload
    owner: Any

    @property
    def key(self) -> str:
        """The trial key (events are matched to jobs by key and attempt)."""
        return self.payload.key

    @property
    def attempt(self) -> int:
        """1-based attempt number."""
        return self.payload.attempt


class Launcher(Protocol):
    """Runs attempts somewhere and reports back (:class:`harness.ray_backend.RayLauncher`)."""

    def submit(self, payload: TrialPayload) -> Any:
        """Start one attempt; return a hashable handle."""

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        """The handles that finished: every one ready now, after waiting up to ``timeout`` for the first."""

    def events(self) -> list[Event]:
        """Every event received since the last call, in order (without waiting: events may arrive a call late)."""

    def caught_up(self, handle: Any) -> bool:
        """Whether :meth:`events` has returned every event the ended attempt sent (its outcome is recorded
        after them, so its last metrics are not dropped as late)."""

    def done(self, handle: Any) -> bool:
        """Whether the attempt ended (without waiting)."""

    def outcome(self, handle: Any, timeout: float | None = None) -> TrialOutcome:
        """How an ended attempt ended (a launcher-level failure becomes a failed outcome)."""

    def cancel(self, handle: Any) -> None:
        """Stop an attempt now (its outcome is never asked for)."""

    def stop(self, handle: Any) -> None:
        """Ask an attempt to stop after its current step and a checkpoint; it then sends its ``end`` event."""

    def prepare(self, queued: int) -> None:
        """``queued`` attempts wait behind those running: get workers ready for them while these run (a hint,
        called every step; a launcher whose workers cost nothing to start ignores it)."""

    def lost(self) -> str | None:
        """Why the cluster is gone (head node, or the driver's connection), else None."""

    def close(self) -> None:
        """Release what the launcher holds (event queue)."""


class Recorder(Protocol):
    """Where runs are tracked (:class:`harness.mlflow_io.MlflowRecorder`). Writes may be buffered until
    :meth:`flush`; :meth:`end_run` flushes the run first."""

    tracking_uri: str
    experiment_id: str

    def start_parent(self, *, key: str, name: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        """Create the parent run of a grid or study, or reopen the one with the same ``key``; return its id."""

    def cell_runs(self) -> dict[str, Any]:
        """The latest child run of each cell hash (a FINISHED one wins): ``{hash: CellRun}``."""

    def start_run(self, *, name: str, parent_id: str, cell_hash: str, params: dict[str, Any],
                  tags: dict[str, Any], reuse: str | None = None) -> str:
        """Create a child run (or reopen ``reuse``), log params and tags; return its id."""

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set (or overwrite) tags."""

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int) -> None:
        """Buffer scalar metrics of ``step``."""

    def log_artifact(self, run_id: str, path: Path) -> None:
        """Upload one file."""

    def flush(self) -> None:
        """Send everything buffered."""

    def end_run(self, run_id: str, *, status: str, tags: dict[str, Any] | None = None,
                artifacts: list[tuple[Path, str | None]] = ()) -> None:
        """Flush, set tags, upload ``(file, artifact dir)`` pairs that exist, set FINISHED/FAILED/KILLED."""

    def final_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run."""

    def problem(self) -> str | None:
        """Why tracking cannot go on (the store stayed away past its limit, or is damaged), else None."""


class TrackingLost(RuntimeError):
    """Raised by a Recorder read when the store cannot be used any more (the driver stops cleanly)."""


class Policy:
    """What a grid or a study decides; :func:`drive` calls these, in the loop's order."""

    def start(self) -> None:
        """Before the first launch (under the stop flag): recover what an earlier session left."""

    def next_job(self) -> Job | None:
        """The next attempt to launch now, or None (nothing now: the loop ends when nothing runs either)."""
        raise NotImplementedError

    def queued(self) -> int:
        """How many attempts wait behind those running (a hint for :meth:`Launcher.prepare`; 0: none known)."""
        return 0

    def on_event(self, job: Job, event: Event, *, final: bool) -> bool:
        """Handle an event of a running attempt; return True to stop it now (pruning). ``final``: its
        outcome is already in (late events are recorded, never acted on)."""
        raise NotImplementedError

    def on_outcome(self, job: Job, outcome: TrialOutcome) -> None:
        """Record how an attempt ended (and plan a retry or requeue)."""
        raise NotImplementedError

    def on_interrupted(self, job: Job) -> None:
        """The attempt was cancelled by an interruption before it finished."""
        raise NotImplementedError

    def on_stop(self) -> None:
        """After an interruption: close anything still open that is not running (e.g. a retry not relaunched)."""


class Console(Protocol):
    """What drive() redraws after every step."""

    def refresh(self) -> None:
        """Redraw (or print what changed)."""


# ============================================================================ Ctrl-C / SIGTERM


class StopFlag:
    """Set by the first SIGINT/SIGTERM (or by :meth:`set`, :meth:`lost`); the driver loop checks it between steps.

    ``reason``: ``signal`` (also a stop asked from code), ``tracking`` or ``cluster``; ``message`` says
    what was lost. The first reason is kept.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.reason: str | None = None
        self.message = ""

    def set(self, signum: int = signal.SIGINT) -> None:
        """Ask the loop to stop (keeps the first signal number)."""
        if self.signum is None:
            self.signum = signum
        self.reason = self.reason or "signal"

    def lost(self, reason: str, message: str) -> None:
        """Stop because ``reason`` (``tracking`` or ``cluster``) is gone."""
        if self.reason is None:
            self.reason, self.message = reason, message

    def __bool__(self) -> bool:
        return self.reason is not None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Ctrl-C / SIGTERM set a flag instead of raising, so bookkeeping is never cut in half; a second
    one raises KeyboardInterrupt. Installed from the main thread only (elsewhere the flag stays down
    unless set by hand)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if flag:
            raise KeyboardInterrupt(f"{name} again")
        flag.set(signum)
        if flag.reason == "signal":  # the summary says which signal stopped the session
            flag.message = flag.message or f"{name} received"

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ============================================================================ the loop


@dataclass
class _Flight:
    handle: Any
    job: Job
    ended_at: float | None = None  # monotonic time the attempt's task ended (it is settling: see drive)


def drive(policy: Policy, launcher: Launcher, recorder: Recorder, console: Console, *, limit: int,
          stop: StopFlag, grace_s: float = GRACE_S) -> bool:
    """Run the policy's jobs, at most ``limit`` at once, until it has none left; True when interrupted
    (``stop.reason`` says why).

    First :meth:`Policy.start`; then, step by step: launch while there is room (and tell the launcher
    how many wait behind: :meth:`Launcher.prepare`), wait (at most :data:`POLL_S`) for attempts to end,
    deliver events (the policy may stop an attempt), record the outcomes of those that ended, flush the
    recorder, check the store and the cluster, redraw. When ``stop`` is raised, the interrupt path of
    the module docstring runs (``grace_s``: how long running attempts get to checkpoint).

    Events come without waiting (a queue round trip per step was most of the loop's time), so an attempt's
    last events may arrive a step after its task ended: an ended attempt *settles* (its slot is free for the
    next launch, its late events are still delivered, as final) until :meth:`Launcher.caught_up` says they
    all came, or :data:`SETTLE_S` passed; then its outcome is recorded.
    """
    flight: dict[str, _Flight] = {}  # job key -> in flight (running, or ended and settling)
    aborted = False
    try:
        policy.start()
        console.refresh()
        while not stop:
            running = {f.handle: key for key, f in flight.items() if f.ended_at is None}
            while not stop and len(running) < limit:
                job = policy.next_job()
                if job is None:
                    break
                flight[job.key] = _Flight(launcher.submit(job.payload), job)
                running[flight[job.key].handle] = job.key
            launcher.prepare(policy.queued())
            _check(recorder, launcher, stop)
            if not flight or stop:
                break
            ready = launcher.wait(list(running), timeout=POLL_S if running else SETTLE_POLL_S)
            if stop:
                break
            now = time.monotonic()
            for handle in ready:
                flight[running[handle]].ended_at = now
            _deliver(policy, launcher, flight, final={k for k, f in flight.items() if f.ended_at is not None})
            for key, f in list(flight.items()):
                if f.ended_at is not None and (launcher.caught_up(f.handle) or now - f.ended_at >= SETTLE_S):
                    del flight[key]
                    policy.on_outcome(f.job, launcher.outcome(f.handle))
            recorder.flush()
            console.refresh()
    except KeyboardInterrupt as e:  # the second Ctrl-C while a step was busy: clean up what we can, now
        stop.set()
        if stop.reason == "signal" and not stop.message:
            stop.message = f"KeyboardInterrupt ({e})" if str(e) else "KeyboardInterrupt"
        aborted = True
    except TrackingLost as e:  # a read found the store gone
        stop.lost("tracking", str(e))
    if stop:
        grace = 0.0 if aborted else min(grace_s, LOST_GRACE_S) if stop.reason == "cluster" else grace_s
        _interrupt(policy, launcher, flight, grace_s=grace)
    console.refresh()
    return bool(stop)


def _check(recorder: Recorder, launcher: Launcher, stop: StopFlag) -> None:
    """Raise the flag when the tracking store or the cluster is gone."""
    problem = recorder.problem()
    if problem:
        stop.lost("tracking", problem)
    lost = launcher.lost()
    if lost:
        stop.lost("cluster", lost)


def _deliver(policy: Policy, launcher: Launcher, flight: dict[str, _Flight], *, final: set[str]) -> set[str]:
    """Hand each event of an attempt in flight to the policy; cancel the attempts it stops. Returns the keys
    whose ``end`` event arrived."""
    ended = set()
    for event in launcher.events():
        f = flight.get(event.key)
        if f is None or f.job.attempt != event.attempt:
            continue  # a late event of an attempt that already ended
        if event.kind == "end":
            ended.add(event.key)
        if policy.on_event(f.job, event, final=event.key in final) and event.key not in final:
            launcher.cancel(f.handle)
            del flight[event.key]
    return ended


def _interrupt(policy: Policy, launcher: Launcher, flight: dict[str, _Flight], *, grace_s: float) -> None:
    """Let running attempts checkpoint, record what finished, cancel the rest (see the module docstring).
    Launcher calls are best effort: on Ctrl-C in a terminal the Ray processes got the signal too, and on a
    lost cluster they may be gone."""
    with _best_effort():
        _deliver(policy, launcher, flight, final=set(flight))
    if grace_s > 0:
        _let_checkpoint(policy, launcher, flight, grace_s=grace_s)
        _settle(policy, launcher, flight, timeout_s=min(grace_s, SETTLE_S))
    for key, f in list(flight.items()):
        outcome = None
        with _best_effort():
            if launcher.done(f.handle):
                outcome = launcher.outcome(f.handle, timeout=5)
        if outcome is None or not outcome.finished:
            metrics = read_result(f.job.payload.cell_dir, eval_hash=f.job.payload.eval_hash)  # done, outcome not back
            outcome = TrialOutcome(status="finished", metrics=metrics) if metrics is not None else None
        if outcome is not None:
            policy.on_outcome(f.job, outcome)
        else:
            with _best_effort():
                launcher.cancel(f.handle)
            policy.on_interrupted(f.job)
        del flight[key]
    policy.on_stop()


def _let_checkpoint(policy: Policy, launcher: Launcher, flight: dict[str, _Flight], *, grace_s: float) -> None:
    """Ask every attempt still running to stop after a checkpoint; wait up to ``grace_s`` for their ``end``.
    A second Ctrl-C meanwhile ends the waiting (the rest of the interrupt path still runs)."""
    try:
        asked = set()
        for key, f in flight.items():
            with _best_effort():
                if not launcher.done(f.handle):
                    launcher.stop(f.handle)
                    asked.add(key)
        deadline = time.monotonic() + grace_s
        while asked and time.monotonic() < deadline:
            with _best_effort():
                asked -= _deliver(policy, launcher, flight, final=set(flight))
            if asked:
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        return


def _settle(policy: Policy, launcher: Launcher, flight: dict[str, _Flight], *, timeout_s: float) -> None:
    """Deliver events until every ended attempt in flight has caught up (at most ``timeout_s``; a second
    Ctrl-C or a failing launcher call ends it)."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            _deliver(policy, launcher, flight, final=set(flight))
            if all(launcher.caught_up(f.handle) for f in flight.values() if launcher.done(f.handle)):
                return
            time.sleep(SETTLE_POLL_S)
    except Exception:  # noqa: BLE001 - best effort: a launcher that fails now (lost cluster) has nothing more to give
        return
    except KeyboardInterrupt:
        return


@contextmanager
def _best_effort() -> Iterator[None]:
    """Swallow any error (not KeyboardInterrupt) of a launcher call while shutting down."""
    try:
        yield
    except Exception:  # noqa: BLE001 - best effort by design
        pass
