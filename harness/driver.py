"""The one driver loop of ``ddsm-bench run`` and ``ddsm-bench tune``: launch, follow, record, interrupt.

:func:`drive` knows nothing of grids, studies, Ray or MLflow. It asks a :class:`Policy` what to run
next, hands it to a :class:`Launcher` (Ray in :mod:`harness.ray_backend`, a scripted fake in the
tests), passes every :class:`Event` a trial sends back to the policy (which may stop the trial:
pruning), and tells the policy each attempt's :class:`TrialOutcome`. The policy records through a
:class:`Recorder` (MLflow in :mod:`harness.mlflow_io`) and decides retries, requeues and budgets:
:class:`harness.grid.GridPolicy`, :class:`harness.study.StudyPolicy`.

Interruption has one path. SIGINT/SIGTERM set a :class:`StopFlag` (:func:`stop_on_signals`); the
loop checks it between steps, so no bookkeeping is ever cut in half, and then: the last events are
delivered, every attempt in flight that finished (its outcome came back, or its ``result.json`` is
on disk) is recorded as finished, the others are cancelled and handed to
:meth:`Policy.on_interrupted`, and :meth:`Policy.on_stop` closes what is open but not running. A
second signal raises KeyboardInterrupt to abort a loop that is stuck; the same path then runs with
whatever is left.

Also here: the types that cross the driver/worker boundary (:class:`TrialPayload` in,
:class:`Event` and :class:`TrialOutcome` out, ``result.json`` on disk), so :mod:`harness.worker` and
the launchers share them without importing each other.
"""
from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Event", "Job", "Launcher", "Policy", "Recorder", "StopFlag", "TrialOutcome", "TrialPayload", "drive",
           "read_result", "stop_on_signals", "write_json"]

POLL_S = 0.5  # longest wait for a trial to finish before events are delivered and the flag checked
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
    kind: str  # start | train | eval | checkpoint
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    time: float = 0.0
    info: dict[str, str] = field(default_factory=dict)  # start: device, torch, host


@dataclass(frozen=True)
class TrialOutcome:
    """How an attempt ended: finished with its final scalar metrics, or failed with a failure class."""

    status: str  # finished | failed
    metrics: dict[str, float] = field(default_factory=dict)
    failure_class: str = ""  # a class of ddsm.engine.failures.FAILURE_CLASSES (failed only)
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
        """Every event received since the last call, in order."""

    def done(self, handle: Any) -> bool:
        """Whether the attempt ended (without waiting)."""

    def outcome(self, handle: Any, timeout: float | None = None) -> TrialOutcome:
        """How an ended attempt ended (a launcher-level failure becomes a failed outcome)."""

    def cancel(self, handle: Any) -> None:
        """Stop an attempt (its outcome is never asked for)."""

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


class Policy:
    """What a grid or a study decides; :func:`drive` calls these, in the loop's order."""

    def start(self) -> None:
        """Before the first launch (under the stop flag): recover what an earlier session left."""

    def next_job(self) -> Job | None:
        """The next attempt to launch now, or None (nothing now: the loop ends when nothing runs either)."""
        raise NotImplementedError

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
    """Set by the first SIGINT/SIGTERM (or by :meth:`set`); the driver loop checks it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int = signal.SIGINT) -> None:
        """Ask the loop to stop (keeps the first signal number)."""
        if self.signum is None:
            self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


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
        if flag:
            raise KeyboardInterrupt
        flag.set(signum)

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


def drive(policy: Policy, launcher: Launcher, recorder: Recorder, console: Console, *, limit: int,
          stop: StopFlag) -> bool:
    """Run the policy's jobs, at most ``limit`` at once, until it has none left; True when interrupted.

    First :meth:`Policy.start`; then, step by step: launch while there is room, wait (at most
    :data:`POLL_S`) for attempts to end, deliver events (the policy may stop an attempt), record the
    outcomes of those that ended, flush the recorder, redraw. When ``stop`` is raised, the interrupt
    path of the module docstring runs.
    """
    flight: dict[str, _Flight] = {}  # job key -> in flight
    try:
        policy.start()
        console.refresh()
        while not stop:
            while not stop and len(flight) < limit:
                job = policy.next_job()
                if job is None:
                    break
                flight[job.key] = _Flight(launcher.submit(job.payload), job)
            if not flight or stop:
                break
            by_handle = {f.handle: key for key, f in flight.items()}
            ready = {by_handle[h] for h in launcher.wait(list(by_handle), timeout=POLL_S)}
            if stop:
                break
            _deliver(policy, launcher, flight, final=ready)
            for key in ready:
                f = flight.pop(key, None)
                if f is not None:
                    policy.on_outcome(f.job, launcher.outcome(f.handle))
            recorder.flush()
            console.refresh()
    except KeyboardInterrupt:  # the second Ctrl-C while a step was busy: clean up what we can, now
        stop.set()
    if stop:
        _interrupt(policy, launcher, flight)
    console.refresh()
    return bool(stop)


def _deliver(policy: Policy, launcher: Launcher, flight: dict[str, _Flight], *, final: set[str]) -> None:
    """Hand each event of an attempt in flight to the policy; cancel the attempts it stops."""
    for event in launcher.events():
        f = flight.get(event.key)
        if f is None or f.job.attempt != event.attempt:
            continue  # a late event of an attempt that already ended
        if policy.on_event(f.job, event, final=event.key in final) and event.key not in final:
            launcher.cancel(f.handle)
            del flight[event.key]


def _interrupt(policy: Policy, launcher: Launcher, flight: dict[str, _Flight]) -> None:
    """Record what finished, cancel the rest (see the module docstring). Launcher calls are best effort:
    on Ctrl-C in a terminal the Ray processes got the signal too and may already be gone."""
    with _best_effort():
        _deliver(policy, launcher, flight, final=set(flight))
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


@contextmanager
def _best_effort() -> Iterator[None]:
    """Swallow any error (not KeyboardInterrupt) of a launcher call while shutting down."""
    try:
        yield
    except Exception:  # noqa: BLE001 - best effort by design
        pass
