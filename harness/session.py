"""What every ``ddsm-bench run`` and ``tune`` session does around its policy: the preamble and the run.

:func:`preflight` checks, before Ray starts or anything is written, that the tracking store (and a
study's storage) answers; :func:`cluster` connects to Ray and checks that a trial fits the cluster
and that every node sees ``--out``; :func:`open_recorder` opens the MLflow store;
:func:`print_where_to_look` says where the runs, the dashboard and the study can be watched;
:func:`run_policy` drives a policy on Ray with Ctrl-C / SIGTERM turned into the stop flag. Grids
(:mod:`harness.grid`) and studies (:mod:`harness.study`) differ only in their policy.
"""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from harness import ray_backend
from harness.driver import Console, Policy, drive, stop_on_signals
from harness.mlflow_io import MlflowRecorder, store_uri, ui_hint
from harness.preflight import check_database, check_tracking_uri
from harness.secrets import redact
from harness.spec import Resources

__all__ = ["cluster", "git_sha", "open_recorder", "preflight", "print_where_to_look", "run_policy"]


def preflight(*, tracking_uri: str | None, out: Path, storage: str | None = None) -> str:
    """Check that the tracking store (and ``storage``, a study's Optuna storage) answer; return the tracking
    URI the session will use. Raises ConfigError (exit 2) before Ray starts or ``out`` is created."""
    uri = store_uri(tracking_uri, folder=out)
    check_tracking_uri(uri)
    if storage:
        check_database(storage, what="Optuna storage (search.storage)")
    return uri


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


def open_recorder(*, tracking_uri: str | None, out: Path, experiment: str,
                  artifact_location: str | None = None) -> MlflowRecorder:
    """The MLflow recorder of a session: ``tracking_uri``, or ``sqlite:///<out>/mlflow.db``.

    Artifacts of a new experiment go to ``artifact_location``; without one, to ``<out>/mlartifacts``
    for a local or database store (never the driver's working directory), and to the server's default
    for an ``http(s)://`` server.
    """
    uri = store_uri(tracking_uri, folder=out)
    served = uri.startswith(("http://", "https://"))
    root = artifact_location or (None if served else out / "mlartifacts")
    return MlflowRecorder(tracking_uri=uri, experiment=experiment, artifact_root=root)


def print_where_to_look(recorder: MlflowRecorder, connection: ray_backend.Connection, *, console: Any,
                        storage: str | None = None, artifact_location: str | None = None) -> None:
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


def run_policy(policy: Policy, *, resources: Resources, recorder: MlflowRecorder, console: Console,
               limit: int, train_fn: Callable[..., dict] | None = None, fresh_workers: bool = True) -> bool:
    """Drive ``policy`` on Ray (at most ``limit`` trials at once) with SIGINT/SIGTERM as the stop flag;
    True when interrupted. ``train_fn`` / ``fresh_workers``: see :class:`harness.ray_backend.RayLauncher`."""
    launcher = ray_backend.RayLauncher(resources, train_fn=train_fn, fresh_workers=fresh_workers)
    try:
        with stop_on_signals() as stop:
            return drive(policy, launcher, recorder, console, limit=limit, stop=stop)
    finally:
        with suppress(Exception):  # Ray may be going down already (Ctrl-C reaches its processes too)
            launcher.close()


def git_sha() -> str:
    """``git describe --always --dirty`` of the project, or ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
