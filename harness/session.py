"""What every ``ddsm-bench run`` and ``tune`` session does around its policy: the preamble and the run.

:func:`cluster` connects to Ray and checks, before anything is written, that a trial fits the
cluster and that every node sees ``--out``; :func:`open_recorder` opens the MLflow store;
:func:`run_policy` drives a policy on Ray with Ctrl-C / SIGTERM turned into the stop flag. Grids
(:mod:`harness.grid`) and studies (:mod:`harness.study`) differ only in their policy.
"""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from harness import ray_backend
from harness.driver import Console, Policy, drive, stop_on_signals
from harness.mlflow_io import MlflowRecorder, store_uri
from harness.spec import Resources

__all__ = ["cluster", "git_sha", "open_recorder", "run_policy"]


@contextmanager
def cluster(*, address: str | None, resources: Resources, out: Path) -> Iterator[None]:
    """Connect to Ray (a local instance when ``address`` is None), check resources and shared storage,
    create ``out``; on exit, shut Ray down if this call started it.

    Raises:
        ConfigError: no trial could ever be scheduled, or ``out`` is not shared by every node (nothing
            was written).
    """
    started = ray_backend.connect(address)
    try:
        ray_backend.check_resources(resources)
        ray_backend.check_shared_storage(out)
        out.mkdir(parents=True, exist_ok=True)
        yield
    finally:
        if started:
            ray_backend.shutdown()


def default_concurrency(resources: Resources) -> int:
    """How many trials with these resources the connected cluster runs at once."""
    return ray_backend.default_concurrency(resources)


def open_recorder(*, tracking_uri: str | None, out: Path, experiment: str) -> MlflowRecorder:
    """The MLflow recorder of a session: ``tracking_uri``, or ``sqlite:///<out>/mlflow.db`` with artifacts in
    ``<out>/mlartifacts``."""
    return MlflowRecorder(tracking_uri=store_uri(tracking_uri, folder=out), experiment=experiment,
                          artifact_root=None if tracking_uri else out / "mlartifacts")


def run_policy(policy: Policy, *, resources: Resources, recorder: MlflowRecorder, console: Console,
               limit: int) -> bool:
    """Drive ``policy`` on Ray (at most ``limit`` trials at once) with SIGINT/SIGTERM as the stop flag;
    True when interrupted."""
    launcher = ray_backend.RayLauncher(resources)
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
