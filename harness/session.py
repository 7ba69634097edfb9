"""What every ``ddsm-bench run`` and ``tune`` session does around its policy: the preamble, the run, the end.

:func:`preflight` checks, before Ray starts or anything is written, that the tracking store (and a
study's storage) answers; :func:`claim_out` makes ``--out`` a writable folder and takes its lock (one
driver per out dir, :mod:`harness.lock`); :func:`cluster` connects to Ray and checks, before anything
is written, that a trial fits the cluster and that every node sees ``--out``; :func:`open_recorder`
opens the MLflow store behind the retry queue of :mod:`harness.tracking_queue` (a new default
SQLite store is built by :func:`store_while_ray_starts` in a temporary folder while ``ray.init``
runs, and moved into ``--out`` once the cluster checks pass);
:func:`print_where_to_look` says where the runs, the dashboard and the study can be watched;
:func:`run_policy` drives a policy on Ray with Ctrl-C / SIGTERM, a lost tracking store and a lost
cluster turned into the stop flag; :func:`close_recorder` writes what is buffered (or journals it for
the next run) and :func:`stop_exit_code` maps how the session ended to :mod:`harness.exit_codes`.
Grids (:mod:`harness.grid`) and studies (:mod:`harness.study`) differ only in their policy.
"""
from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ddsm.config import ConfigError
from harness import exit_codes, ray_backend
from harness.driver import Console, Policy, StopFlag, drive, stop_on_signals
from harness.lock import OutDirLock
from harness.mlflow_io import STORE_FILE, MlflowRecorder, Tag, classify_error, store_uri, ui_hint
from harness.preflight import check_database, check_tracking_uri
from harness.secrets import redact
from harness.spec import DEFAULT_TRACKING_OUTAGE_S, Resources
from harness.tracking_queue import JOURNAL_FILE, QueuedRecorder

__all__ = ["PreparedStore", "claim_out", "close_recorder", "cluster", "git_sha", "imports_in_background",
           "open_recorder", "preflight", "print_where_to_look", "run_policy", "stop_exit_code", "store_while_ray_starts"]

INTERRUPT_FLUSH_S = 10.0  # how long an interrupted driver waits for a slow store before journaling the rest
LOST_FLUSH_S = 15.0  # the same when the cluster is lost (Ray ends such a driver 60 s after its head went away)


def preflight(*, tracking_uri: str | None, out: Path, storage: str | None = None) -> str:
    """Check that the tracking store (and ``storage``, a study's Optuna storage) answer; return the tracking
    URI the session will use. Raises ConfigError (exit 2) before Ray starts or ``out`` is created."""
    uri = store_uri(tracking_uri, folder=out)
    check_tracking_uri(uri)
    if storage:
        check_database(storage, what="Optuna storage (search.storage)")
    return uri


@contextmanager
def claim_out(out: Path, *, command: str, say: Any = print) -> Iterator[OutDirLock]:
    """Create ``out`` and hold its lock for the block (ConfigError, exit 2: bad ``--out`` or another driver
    holds it); ``say`` receives one line when a stale lock of a dead driver is taken over. Bad input found
    inside the block (a ConfigError) leaves no folder behind that this call created."""
    out = Path(out).resolve()
    created = [p for p in (out, *out.parents) if not p.exists()]  # what a failure must not leave behind
    lock = OutDirLock(out, command=command).acquire()
    try:
        if lock.took_over is not None:
            say(f"taking over {out}: its previous driver is gone ({lock.took_over.describe()})")
        yield lock
    except ConfigError:
        lock.release()
        lock.path.unlink(missing_ok=True)
        for folder in created:  # innermost first; only if nothing else was written there
            with suppress(OSError):
                folder.rmdir()
        raise
    finally:
        lock.release()


@contextmanager
def cluster(*, address: str | None, resources: Resources, out: Path,
            dashboard: bool = False) -> Iterator[ray_backend.Connection]:
    """Connect to Ray (a local instance when ``address`` is None, with its dashboard if ``dashboard``),
    check resources and shared storage, create ``out``; on exit, shut Ray down if this call started it.

    Raises:
        ConfigError: the cluster cannot be joined, no trial could ever be scheduled, or ``out`` is not
            shared by every node (nothing was written).
    """
    connection = ray_backend.connect(address, dashboard=dashboard)
    try:
        ray_backend.check_resources(resources)
        ray_backend.check_shared_storage(out)
        out.mkdir(parents=True, exist_ok=True)
        yield connection
    finally:
        if connection.started:
            ray_backend.shutdown()


def default_concurrency(resources: Resources) -> int:
    """How many trials with these resources the connected cluster runs at once."""
    return ray_backend.default_concurrency(resources)


def _artifact_root(uri: str, out: Path, artifact_location: str | None) -> str | Path | None:
    """Where a new experiment keeps its artifacts (see :func:`open_recorder`)."""
    served = uri.startswith(("http://", "https://"))
    return artifact_location or (None if served else out / "mlartifacts")


def open_recorder(*, tracking_uri: str | None, out: Path, experiment: str, outage_s: float = DEFAULT_TRACKING_OUTAGE_S,
                  artifact_location: str | None = None, say: Any = print,
                  prepared: PreparedStore | None = None, id_wait_s: float = 5.0) -> QueuedRecorder:
    """The tracking recorder of a session: MLflow at ``tracking_uri`` (or ``sqlite:///<out>/mlflow.db``) behind
    the retry queue, journaling to ``<out>/tracking-journal.json``.

    Artifacts of a new experiment go to ``artifact_location``; without one, to ``<out>/mlartifacts``
    for a local or database store (never the driver's working directory), and to the server's default
    for an ``http(s)://`` server. ``outage_s``: how long the store may stay unreachable mid-run before the
    driver stops; ``say`` receives the queue's lines (outage started, store back, a write refused). ``prepared``: a
    store built while Ray started (:func:`store_while_ray_starts`), put in place first. ``id_wait_s``: how long
    ``start_run`` waits for the store's run id before handing out a provisional one (0: never wait, for a
    caller that keeps ids inside the session; a study waits, since Optuna keeps the id).

    Raises:
        ConfigError: the store's SQLite file is damaged (the message says how to rebuild it).
    """
    # The queue retries; one MLflow request must fail fast so that the queue sees the store come back.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if prepared is not None:
        prepared.install()
    uri = store_uri(tracking_uri, folder=out)
    inner = MlflowRecorder(tracking_uri=uri, experiment=experiment,
                           artifact_root=_artifact_root(uri, out, artifact_location))
    me = f"{socket.gethostname()}:{os.getpid()}"
    return QueuedRecorder(inner, outage_s=outage_s, classify=classify_error, journal=out / JOURNAL_FILE,
                          heartbeat=lambda: {Tag.DRIVER: me, Tag.DRIVER_HEARTBEAT: round(time.time(), 1)},
                          notify=say, wait_s=id_wait_s)


class PreparedStore:
    """A new SQLite tracking store (schema migrations, experiment, its tags) built in a temporary folder
    by a background thread, so that its ~3 s overlap ``ray.init``; :meth:`install` moves it to its place.

    Only for the default store ``<out>/mlflow.db`` when it does not exist yet: nothing is written under
    ``out`` before the cluster checks pass (a failed check leaves no ``out``). Any failure in the thread
    only means :func:`open_recorder` builds the store itself, as without it.
    """

    def __init__(self, *, target: Path, experiment: str, artifact_root: str | Path | None) -> None:
        """Start building the store for ``target`` (the final mlflow.db path) in a temporary folder."""
        self.target = target
        self._tmp = Path(tempfile.mkdtemp(prefix="ddsm-bench-store-"))
        self._ok = False
        self._thread = threading.Thread(target=self._build, args=(experiment, artifact_root), daemon=True,
                                        name="ddsm-bench-store")
        self._thread.start()

    def _build(self, experiment: str, artifact_root: str | Path | None) -> None:
        with suppress(Exception):
            MlflowRecorder(tracking_uri=f"sqlite:///{self._tmp / self.target.name}", experiment=experiment,
                           artifact_root=artifact_root)
            self._ok = True

    def install(self, timeout_s: float = 300.0) -> bool:
        """Wait for the thread; move the built store to ``target`` unless one appeared there meanwhile.
        True when it was moved."""
        self._thread.join(timeout_s)
        built = self._tmp / self.target.name
        if self._thread.is_alive() or not self._ok or self.target.exists() or not built.is_file():
            return False
        shutil.move(built, self.target)
        return True

    def close(self) -> None:
        """Remove the temporary folder (waits for the thread first)."""
        self._thread.join(300.0)
        shutil.rmtree(self._tmp, ignore_errors=True)


@contextmanager
def store_while_ray_starts(*, tracking_uri: str | None, out: Path, experiment: str,
                           artifact_location: str | None = None) -> Iterator[PreparedStore | None]:
    """Yield a :class:`PreparedStore` building ``<out>/mlflow.db`` in the background when the session
    uses the default store and it does not exist yet (else None); enter it before :func:`cluster` and
    pass it to :func:`open_recorder`. Its temporary folder is removed on exit."""
    target = out / STORE_FILE
    if tracking_uri is not None or target.exists():
        yield None
        return
    prepared = PreparedStore(target=target, experiment=experiment,
                             artifact_root=_artifact_root(store_uri(None, folder=out), out, artifact_location))
    try:
        yield prepared
    finally:
        prepared.close()


@contextmanager
def imports_in_background(module: str) -> Iterator[threading.Thread]:
    """Import ``module`` in a background thread for the length of the block, and wait for it (up to 60 s) when
    the block ends, so the process never exits mid-import. For the end-of-grid report's imports (pandas,
    matplotlib, scipy: ~1.2 s on a 2-core CPU) while the driver waits on its trials. A failed import is
    left for the module's first real user to raise."""
    thread = threading.Thread(target=_import_quietly, args=(module,), daemon=True, name=f"ddsm-bench-import-{module}")
    thread.start()
    try:
        yield thread
    finally:
        thread.join(60.0)


def _import_quietly(module: str) -> None:
    with suppress(Exception):
        importlib.import_module(module)


def print_where_to_look(recorder: QueuedRecorder | MlflowRecorder, connection: ray_backend.Connection, *,
                        console: Any, storage: str | None = None, artifact_location: str | None = None) -> None:
    """Print, at start, how to browse the runs (MLflow UI), the Ray dashboard when one runs, the study
    storage for ``optuna-dashboard``, and where artifacts go (passwords hidden)."""
    lines = [f"MLflow: {ui_hint(recorder.tracking_uri, recorder.experiment_id)}",
             f"artifacts: {redact(recorder.artifact_location or '')}"]
    if artifact_location and recorder.artifact_location and \
            recorder.artifact_location.rstrip("/") != _as_uri(artifact_location).rstrip("/"):
        lines.append(f"note: --artifact-location is ignored: experiment {recorder.experiment_id} already stores "
                     f"its artifacts at {redact(recorder.artifact_location)} (a new experiment name takes it)")
    if connection.dashboard_url:
        lines.append(f"Ray dashboard: {connection.dashboard_url}")
    if storage:
        lines.append(f"study: optuna-dashboard {redact(storage)}")
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _as_uri(location: str) -> str:
    from harness.mlflow_io import artifact_uri

    return artifact_uri(location) or ""


def run_policy(policy: Policy, *, resources: Resources, recorder: QueuedRecorder, console: Console,
               limit: int, train_fn: Callable[..., dict] | None = None, fresh_workers: bool = True) -> StopFlag:
    """Drive ``policy`` on Ray (at most ``limit`` trials at once) with SIGINT/SIGTERM, a lost tracking store
    and a lost cluster as the stop flag; return the flag (falsy: the policy ran out of work).
    ``train_fn`` / ``fresh_workers``: see :class:`harness.ray_backend.RayLauncher`."""
    launcher = ray_backend.RayLauncher(resources, train_fn=train_fn, fresh_workers=fresh_workers)
    try:
        with stop_on_signals() as stop:
            drive(policy, launcher, recorder, console, limit=limit, stop=stop)
            return stop
    finally:
        with suppress(Exception):  # Ray may be going down already (Ctrl-C reaches its processes too)
            launcher.close()


def close_recorder(recorder: QueuedRecorder, stop: StopFlag | None) -> int:
    """Write what the recorder holds, waiting as the way the session ended allows (a finished session: up to
    the outage limit; interrupted or failed (``stop`` None): :data:`INTERRUPT_FLUSH_S`; a lost cluster:
    :data:`LOST_FLUSH_S`; a lost store: not at all); the rest goes to the journal. Returns how many writes were
    journaled (a finished session that journaled some
    is then ended as ``tracking``)."""
    if stop is None:  # the session failed before or while driving: do not linger
        timeout = INTERRUPT_FLUSH_S
    else:
        timeout = {None: recorder.outage_s + 60, "signal": INTERRUPT_FLUSH_S, "cluster": LOST_FLUSH_S}.get(
            stop.reason, 0.0)
    recorder.close(timeout_s=timeout)
    left = recorder.journaled
    if left and stop is not None and not stop:
        stop.lost("tracking", recorder.problem() or f"{left} tracking writes could not be sent to "
                  f"{recorder.tracking_uri}")
    return left


def stop_exit_code(summary: Any, *, ok: bool) -> int:
    """The exit code of a session whose summary has ``stop_reason`` and ``interrupted`` (``ok``: its work is
    complete): :data:`exit_codes.TRACKING_LOST`, :data:`exit_codes.CLUSTER_LOST`, :data:`exit_codes.INTERRUPTED`,
    else OK or CELLS_FAILED."""
    if summary.stop_reason == "tracking":
        return exit_codes.TRACKING_LOST
    if summary.stop_reason == "cluster":
        return exit_codes.CLUSTER_LOST
    if summary.interrupted:
        return exit_codes.INTERRUPTED
    return exit_codes.OK if ok else exit_codes.CELLS_FAILED


def git_sha() -> str:
    """``git describe --always --dirty`` of the project, or ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
