"""The MLflow adapter: the only module that imports mlflow. Schema, store URIs, pagination, writer, reader.

Schema (what ``reports/README.md`` calls the contract): one experiment per spec (its ``name``,
``-smoke`` appended under --smoke), one parent run per grid or study (tag ``kind=grid``), one child
run per cell or trial (``kind=cell``, ``mlflow.parentRunId``). Tag names are the :class:`Tag`
constants; a child run's params are every resolved config field (flattened dotted keys); its metrics
are the train/eval metrics per step (logged in batches with ``MlflowClient.log_batch``) and the
final metrics at the last step (:mod:`ddsm.metrics.catalogue`); its artifacts the cell's files
(:data:`harness.worker.CELL_ARTIFACTS`). The parent of a grid carries ``grid.json`` (the planned
cells), so a report shows cells that never ran.

Store: ``--tracking-uri`` as given; without one, a grid or study writes ``sqlite:///<out>/mlflow.db``
(artifacts in ``<out>/mlartifacts``) and ``ddsm-bench report`` reads ``$MLFLOW_TRACKING_URI`` or
``./mlflow.db`` (:func:`store_uri` is the one place that decides). A bare path to a ``.db`` file or to
a grid's out folder is read as that SQLite store.

The driver is the only writer (:class:`MlflowRecorder`, the :class:`harness.driver.Recorder` on
MLflow, behind :class:`harness.tracking_queue.QueuedRecorder` so the driver never waits on the store;
:func:`classify_error` tells that queue which errors to retry); trials never import mlflow. A run
reopened after an interruption keeps one point per metric and step: points at steps it already has
(the steps a resumed attempt re-runs after its checkpoint) are not logged again. The reader
(:func:`load_runs`) turns a grid's runs into the tidy frame of :mod:`reports.load`.
"""
from __future__ import annotations

import csv
import datetime as dt
import importlib
import itertools
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import DatabaseError as SqlDatabaseError
from sqlalchemy.exc import OperationalError as SqlOperationalError

from ddsm.config import ConfigError
from harness.driver import Event, Recorder
from harness.secrets import redact

__all__ = ["CellRun", "GridRuns", "MlflowRecorder", "RUN_TAGS", "RunArtifacts", "Tag", "artifact_uri", "classify_error",
           "damaged_store_message", "driver_gone", "experiment_tags", "iter_runs", "load_runs", "reader_uri",
           "record_event", "store_uri", "ui_hint", "write_report_from_mlflow"]

for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_BATCH = 1000  # MLflow's per-request limit for metrics (params and tags: 100)
STORE_FILE = "mlflow.db"
DRIVER_STALE_S = 150.0  # a driver whose heartbeat (every 30 s, harness.tracking_queue) is older than this is gone


class Tag:
    """The MLflow tag names ddsm-bench writes and reads (values are strings; lists are JSON)."""

    PARENT = "mlflow.parentRunId"
    KIND = "kind"  # "grid" (parent) | "cell" (child)
    GRID_HASH = "grid_hash"  # parent: the cells' (or the study's) identity; a re-run reopens its parent
    SPEC = "spec"  # the spec file
    SMOKE = "smoke"
    BASELINE = "baseline"  # parent: the reference baseline; child: the baseline the cell derives from
    GIT_SHA = "git_sha"
    MODE = "mode"  # parent of a study: "tune"
    STUDY = "study"  # the Optuna study name
    STORAGE = "storage"  # the Optuna storage (password hidden)
    N_FINISHED = "n_finished"  # parent of a study: trials counted against the budget
    CELL_HASH = "cell_hash"  # the train hash (harness.cells): what determines the weights
    EVAL_HASH = "eval_hash"  # how the final scores were computed (eval.*, data.val_split); tags eval.* hold them
    EVAL_METRICS = "eval_metrics"  # the accuracy metrics of that evaluation (earlier ones are stale)
    COST_SOURCE = "cost_source"  # child: "isolated:<key>" when the timed costs come from the cost phase
    COST_PHASE = "cost_phase"  # parent: the cost phase's protocol (harness.cost.describe)
    OBJECTIVE_SPLIT = "objective_split"  # study parent: the split the objective was measured on
    CONFIRM_SPLIT = "confirm_split"  # study parent: the split best.yaml reports
    SPLIT_LEAK = "split_leak"  # study parent: true when the study tuned on the split it reports (explicit flag)
    DESCRIPTION = "description"  # parent: the spec's description
    FIGURES = "figures"  # parent: the spec's figures block (JSON, ddsm.viz.ViewSettings)
    SEED = "seed"
    VARIANT = "variant"  # the cell without its seed
    REFERENCE = "reference"  # the reference-baseline variant a cell is compared with
    CELL_DIR = "cell_dir"
    STATUS = "status"  # running | retrying | finished | failed | killed | pruned
    ATTEMPTS = "attempts"  # launches of the cell
    FAILURES = "failures"  # failure classes of earlier attempts, comma-joined
    FAILURE_CLASS = "failure_class"  # oom | nan | error | killed; "none" when finished
    LAST_ERROR = "last_error"
    ELAPSED_S = "elapsed_s"
    DEVICE = "device"
    TORCH = "torch"
    HOST = "host"  # where the attempt ran (DDP: every rank's host, comma-joined)
    NODE_ID = "ray_node_id"  # Ray node id(s)
    GPU_IDS = "gpu_ids"  # ray.get_gpu_ids() (DDP: per rank, in rank order), comma-joined; "" on CPU
    GPU_UUIDS = "gpu_uuids"
    CUDA_VISIBLE_DEVICES = "cuda_visible_devices"
    WORKERS = "workers"  # DDP: JSON list of every rank's placement
    OPTUNA_TRIAL = "optuna_trial"
    OPTUNA_STATE = "optuna_state"  # RUNNING | COMPLETE | PRUNED | FAIL
    OPTUNA_PARAMS = "optuna_params"
    REQUEUED_FROM = "requeued_from"
    PRUNED_AT_STEP = "pruned_at_step"
    RESUMED_FROM = "resumed_from"  # the checkpoint the latest attempt resumed from ("<path> (step N)")
    CHECKPOINT_DAMAGED = "checkpoint_damaged"  # checkpoints set aside as damaged before that resume
    DRIVER = "driver"  # parent: "<host>:<pid>" of the driver running it (harness.tracking_queue)
    DRIVER_HEARTBEAT = "driver_heartbeat"  # parent: unix time that driver was last seen alive


KIND_GRID, KIND_CELL = "grid", "cell"
# Child-run tags the reader copies into the tidy frame (reports.load.RUN_COLUMNS).
RUN_TAGS = (Tag.VARIANT, Tag.SEED, Tag.CELL_HASH, Tag.FAILURE_CLASS, Tag.FAILURES, Tag.ATTEMPTS, Tag.BASELINE,
            Tag.GIT_SHA, Tag.DEVICE, Tag.TORCH)


# ============================================================================ store URIs


def store_uri(uri: str | None, *, folder: str | Path, must_exist: bool = False) -> str:
    """The tracking URI to use: ``uri`` if given, else ``sqlite:///<folder>/mlflow.db``.

    A bare path to a ``.db`` file, or to a folder holding ``mlflow.db`` (a grid's ``--out``), becomes
    ``sqlite:///<absolute path>``. With ``must_exist`` (readers), a SQLite file that does not exist is
    a ConfigError instead of a new, empty store.
    """
    if uri is None:
        uri = f"sqlite:///{Path(folder).resolve() / STORE_FILE}"
    elif "://" not in uri and (Path(uri) / STORE_FILE).is_file():
        uri = f"sqlite:///{(Path(uri) / STORE_FILE).resolve()}"
    elif "://" not in uri and uri.endswith(".db"):
        uri = f"sqlite:///{Path(uri).resolve()}"
    if must_exist and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"tracking store {uri!r} does not exist: expected the mlflow.db of a grid "
                          "(ddsm-bench run writes <out>/mlflow.db); pass --tracking-uri")
    return uri


def artifact_uri(location: str | Path | None) -> str | None:
    """An experiment's artifact location: a URI as given (``s3://``, ``file://``, ...), a path as ``file://``."""
    if location is None:
        return None
    text = str(location)
    return text if "://" in text else Path(text).resolve().as_uri()


# The MLflow UI opens an experiment on its GenAI traces page unless the experiment says what it is
# (mlflow/server/js: the experiment tag "mlflow.experimentKind", values "genai_development" and
# "custom_model_development"); a shared view state (tag "mlflow.sharedViewState.<key>", opened by the
# URL's ?viewStateShareKey=<key>) picks the runs table's columns.
EXPERIMENT_KIND = "mlflow.experimentKind"
VIEW_KEY = "ddsmbench"
VIEW_COLUMNS = ("tags.`variant`", "tags.`seed`", "tags.`status`", "metrics.`miou`", "metrics.`pixel_acc`",
                "metrics.`gflops`", "metrics.`latency_ms`")


def experiment_tags() -> dict[str, str]:
    """Tags every ddsm-bench experiment carries so the MLflow UI opens on its runs table with key columns."""
    view = {"selectedColumns": list(VIEW_COLUMNS), "orderByKey": "attributes.start_time", "orderByAsc": False}
    return {EXPERIMENT_KIND: "custom_model_development", f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}


def ui_hint(tracking_uri: str, experiment_id: str | None = None) -> str:
    """Where to browse the runs: the server's URL for http(s), else the ``mlflow ui`` command for the store
    (password hidden), and the experiment's page on it."""
    page = f"#/experiments/{experiment_id}?viewStateShareKey={VIEW_KEY}" if experiment_id else ""
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):  # the server is the UI (no userinfo: the browser asks for it)
        netloc = parts.netloc.rpartition("@")[2]
        return f"{urlunsplit((parts.scheme, netloc, parts.path.rstrip('/'), '', ''))}/{page}"
    return f"mlflow ui --backend-store-uri {redact(tracking_uri)}, then open http://127.0.0.1:5000/{page}"


def reader_uri(uri: str | None) -> str:
    """What ``ddsm-bench report`` reads: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``
    (never created)."""
    from harness.preflight import check_tracking_uri

    found = store_uri(uri or os.environ.get("MLFLOW_TRACKING_URI"), folder=Path.cwd(), must_exist=True)
    check_tracking_uri(found)
    return found


def iter_runs(client: Any, experiment_ids: list[str], *, filter_string: str = "",
              page_size: int = 1000) -> Iterator[Any]:
    """Every run matching the search, oldest first, following ``page_token`` until the last page.

    ``client`` is an :class:`mlflow.MlflowClient` (or anything with the same ``search_runs``).
    """
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=page_size,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


# ============================================================================ the writer


@dataclass
class CellRun:
    """A child run found in the experiment."""

    run_id: str
    cell_hash: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    eval_hash: str = ""  # how its final scores were computed ("" for runs of hash version 1)
    metrics: dict[str, float] | None = None  # the latest value of each metric, as the search returned them


class MlflowRecorder:
    """Driver-side MLflow writer for one grid or study: parent run, child runs, buffered metrics."""

    def __init__(self, *, tracking_uri: str, experiment: str, artifact_root: str | Path | None = None) -> None:
        """Args:
        tracking_uri: any MLflow tracking URI (see :func:`store_uri`).
        experiment: experiment name (the spec name); created if missing.
        artifact_root: where a newly created experiment stores artifacts: a local path or any artifact URI
            (``s3://...``); None: the server's default. An existing experiment keeps its own.
        """
        self.tracking_uri = tracking_uri
        try:
            self._client = MlflowClient(tracking_uri=tracking_uri)
            found = self._client.get_experiment_by_name(experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
                self.artifact_location = found.artifact_location
            else:
                location = artifact_uri(artifact_root)
                self.experiment_id = self._client.create_experiment(experiment, artifact_location=location)
                self.artifact_location = self._client.get_experiment(self.experiment_id).artifact_location
            for key, value in experiment_tags().items():
                self._client.set_experiment_tag(self.experiment_id, key, value)
        except SqlDatabaseError as e:
            raise ConfigError(damaged_store_message(tracking_uri, e)) from None
        self._metrics: dict[str, list[Metric]] = {}
        self._high: dict[str, dict[str, int]] = {}  # run id -> metric key -> latest step logged

    def _search(self, filter_string: str) -> list:
        return list(iter_runs(self._client, [self.experiment_id], filter_string=filter_string))

    def start_parent(self, *, key: str, name: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        """Create the parent run, or reopen the one of an earlier run with the same ``key``; return its id."""
        found = self._search(f"tags.{Tag.KIND} = '{KIND_GRID}' and tags.{Tag.GRID_HASH} = '{key}'")
        if found:
            run_id = found[0].info.run_id
            self._client.update_run(run_id, status="RUNNING")
        else:
            run_id = self._client.create_run(self.experiment_id, run_name=name,
                                             tags={Tag.KIND: KIND_GRID, Tag.GRID_HASH: key}).info.run_id
            self._log(run_id, params=params)
        self._log(run_id, tags=tags)
        return run_id

    def cell_runs(self) -> dict[str, CellRun]:
        """The latest child run of each cell hash in the experiment (a FINISHED one wins), with its final
        metrics: one paginated search, so resuming a finished 1000-cell grid reads no run one by one."""
        out: dict[str, CellRun] = {}
        for run in self._search(f"tags.{Tag.KIND} = '{KIND_CELL}'"):  # oldest first
            h = run.data.tags.get(Tag.CELL_HASH, "")
            prev = out.get(h)
            if prev is None or prev.status != "FINISHED":
                out[h] = CellRun(run_id=run.info.run_id, cell_hash=h, status=run.info.status,
                                 eval_hash=run.data.tags.get(Tag.EVAL_HASH, ""), metrics=dict(run.data.metrics))
        return out

    def start_run(self, *, name: str, parent_id: str, cell_hash: str, params: dict[str, Any],
                  tags: dict[str, Any], reuse: str | None = None) -> str:
        """Create the child run of a cell (or reopen ``reuse``, an unfinished one); log params and tags."""
        tags = {**tags, Tag.KIND: KIND_CELL, Tag.CELL_HASH: cell_hash}
        if reuse:
            self._client.update_run(reuse, status="RUNNING")
            latest = self._client.get_run(reuse).data._metric_objs  # the latest point of each key (largest step)
            self._high[reuse] = {m.key: int(m.step) for m in latest}
            self._log(reuse, params=params, tags=tags)
            return reuse
        run_id = self._client.create_run(self.experiment_id, run_name=name,
                                         tags={Tag.PARENT: parent_id, **_str(tags)}).info.run_id
        self._log(run_id, params=params)
        return run_id

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set (or overwrite) tags now."""
        self._log(run_id, tags=tags)

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int) -> None:
        """Buffer scalar metrics of ``step``; they are sent by :meth:`flush`."""
        now = int(time.time() * 1000)
        self._metrics.setdefault(run_id, []).extend(
            Metric(k, float(v), now, int(step)) for k, v in metrics.items() if _is_number(v))

    def log_points(self, run_id: str, points: list[tuple[str, float, int, int]]) -> None:
        """Send ``(key, value, timestamp ms, step)`` points now (at most 1000), skipping those at a step the run
        already has for that key."""
        self._send(run_id, [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in points])

    def _send(self, run_id: str, metrics: list[Metric]) -> None:
        high = self._high.setdefault(run_id, {})
        fresh = []
        for m in metrics:
            if m.step > high.get(m.key, -1):
                fresh.append(m)
                high[m.key] = m.step
        for i in range(0, len(fresh), _BATCH):
            self._client.log_batch(run_id, metrics=fresh[i: i + _BATCH])

    def log_artifact(self, run_id: str, path: Path) -> None:
        """Upload one file to the run's artifact root."""
        self._client.log_artifact(run_id, str(path))

    def flush(self) -> None:
        """Send every buffered metric, ``log_batch`` by ``log_batch``."""
        pending, self._metrics = self._metrics, {}
        for run_id, metrics in pending.items():
            self._send(run_id, metrics)

    def end_run(self, run_id: str, *, status: str, tags: dict[str, Any] | None = None,
                artifacts: Iterable[tuple[Path, str | None]] = ()) -> None:
        """Flush, set tags, upload ``(local file, artifact dir)`` pairs that exist, set the final status."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r} is not allowed: expected FINISHED, FAILED or KILLED")
        mine = self._metrics.pop(run_id, [])
        self.flush()
        tag_list = [RunTag(k, _value(v)) for k, v in (tags or {}).items()]
        # the run's last metrics with its first 100 tags in one request (MLflow: <= 1000 entities per batch)
        chunks = [mine[i: i + _BATCH - 100] for i in range(0, len(mine), _BATCH - 100)] or [[]]
        for n, chunk in enumerate(chunks):
            if chunk or (n == 0 and tag_list):
                self._client.log_batch(run_id, metrics=chunk, tags=tag_list[:100] if n == 0 else [])
        for i in range(100, len(tag_list), 100):
            self._client.log_batch(run_id, tags=tag_list[i: i + 100])
        self._log_files(run_id, artifacts)
        self._client.set_terminated(run_id, status=status)

    def _log_files(self, run_id: str, artifacts: Iterable[tuple[Path, str | None]]) -> None:
        """Upload the files that exist, one request per artifact dir (each ``log_artifact`` resolves the run
        again): the files of a dir are linked into a temporary folder that is logged whole."""
        groups: dict[str | None, dict[str, Path]] = {}
        for path, where in artifacts:
            if Path(path).is_file():
                groups.setdefault(where, {})[Path(path).name] = Path(path)  # same name, same dir: the last wins
        for where, files in groups.items():
            if len(files) == 1:
                self._client.log_artifact(run_id, str(next(iter(files.values()))), artifact_path=where)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                for name, path in files.items():
                    try:
                        os.link(path, Path(tmp) / name)
                    except OSError:  # another filesystem
                        shutil.copy2(path, Path(tmp) / name)
                self._client.log_artifacts(run_id, tmp, artifact_path=where)

    def final_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run."""
        return dict(self._client.get_run(run_id).data.metrics)

    def _log(self, run_id: str, *, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> None:
        p = [Param(k, _value(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, _value(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(p), len(t)), 100):
            self._client.log_batch(run_id, params=p[i: i + 100], tags=t[i: i + 100])


def classify_error(e: BaseException) -> str:
    """How :class:`harness.tracking_queue.QueuedRecorder` treats an error of the store: ``lost`` (a damaged
    SQLite file, refused credentials: retrying cannot help), ``refused`` (this one write is invalid, e.g.
    its run was deleted), else ``retry`` (unreachable server, timeout, 5xx, a locked database)."""
    from harness.tracking_queue import LOST, REFUSED, RETRY

    if isinstance(e, SqlDatabaseError) and not isinstance(e, SqlOperationalError):
        return LOST
    if isinstance(e, MlflowException):
        if e.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"):
            return LOST
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                            "INVALID_STATE", "BAD_REQUEST"):
            return REFUSED
    return RETRY


def damaged_store_message(uri: str, e: BaseException) -> str:
    """One line for a tracking store SQLite cannot read, with the remedy."""
    why = str(getattr(e, "orig", e)).splitlines()[0]
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri
    return (f"tracking store {path} is damaged ({why}): move it aside (mv {path} {path}.damaged) and re-run: the "
            "grid rebuilds it from the cells' result.json files (final metrics and artifacts; the per-step "
            "curves are not rebuilt); a study's trials stay in its study.db")


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


def _str(d: dict[str, Any]) -> dict[str, str]:
    return {k: _value(v) for k, v in d.items()}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v drops NaN


def record_event(recorder: Recorder, run_id: str, event: Event) -> None:
    """What every trial's run records of an event: where it runs (start) and its train/eval metrics."""
    if event.kind == "start":
        info = event.info
        tags = {Tag.DEVICE: info.get("device", ""), Tag.TORCH: info.get("torch", ""), Tag.HOST: info.get("host", ""),
                Tag.NODE_ID: info.get("node_id", ""), Tag.GPU_IDS: info.get("gpu_ids", ""),
                Tag.GPU_UUIDS: info.get("gpu_uuids", ""), Tag.CUDA_VISIBLE_DEVICES: info.get("cuda_visible_devices", "")}
        if info.get("workers"):
            tags[Tag.WORKERS] = info["workers"]
        recorder.set_tags(run_id, tags)
    elif event.kind == "resume":
        recorder.set_tags(run_id, {Tag.RESUMED_FROM: event.info.get("path", ""),
                                   Tag.CHECKPOINT_DAMAGED: event.info.get("damaged", "")})
    elif event.kind in ("train", "eval") and event.metrics:
        recorder.log_metrics(run_id, event.metrics, step=event.step)


# ============================================================================ the reader


@dataclass
class GridRuns:
    """What a report needs from the store: the tidy frame, its provenance, and the planned cells."""

    frame: pd.DataFrame
    provenance: dict[str, Any]
    expected: pd.DataFrame | None  # columns variant, seed; None when nothing says which cells were planned
    artifact_uris: dict[str, str] = field(default_factory=dict)  # run id -> its artifact location


def load_runs(tracking_uri: str | None, *, experiment: str | None = None, parent_run_id: str | None = None,
              page_size: int = 1000, read_artifacts: bool = True) -> GridRuns:
    """Load every cell run of an experiment (all its grid launches) or of one grid's parent run.

    With a parent run, its children are loaded, plus the runs of its planned cells (by ``cell_hash``)
    that an earlier launch of the grid finished under another parent (the harness skips those).

    Args:
        tracking_uri: see :func:`reader_uri`.
        experiment: experiment name; exactly one of ``experiment`` and ``parent_run_id``.
        parent_run_id: a grid's parent run.
        page_size: runs per search request (pages are followed to the end).
        read_artifacts: read ``per_class_iou.csv`` and the planned cells (``grid.json``).

    Raises:
        ConfigError: unknown store, experiment or run, or no cell run.
    """
    from reports.load import tidy_frame

    if (experiment is None) == (parent_run_id is None):
        raise ConfigError("give exactly one of experiment (--experiment NAME) and parent run (--run ID)")
    uri = reader_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bar per artifact read
    try:
        client = MlflowClient(tracking_uri=uri)
        if parent_run_id is not None:
            try:
                parents = [client.get_run(parent_run_id)]
            except MlflowException:
                raise ConfigError(f"run {parent_run_id!r} not found in tracking store {uri}") from None
            exp = client.get_experiment(parents[0].info.experiment_id)
        else:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                known = [e.name for e in client.search_experiments(max_results=20)]
                raise ConfigError(f"experiment {experiment!r} not found in tracking store {uri}: known experiments: "
                                  f"{', '.join(known) or 'none'}")
        every = list(iter_runs(client, [exp.experiment_id], page_size=page_size))
    except SqlDatabaseError as e:
        raise ConfigError(damaged_store_message(uri, e)) from None
    referenced = {r.data.tags.get(Tag.PARENT) for r in every} - {None}
    if parent_run_id is None:
        parents = [r for r in every if _is_parent(r, referenced)]
    uris = {r.info.run_id: r.info.artifact_uri for r in [*parents, *every]}
    with tempfile.TemporaryDirectory() as tmp:
        files = RunArtifacts(client, dest=tmp, artifact_uris=uris)
        plan = [c for p in parents for c in _plan(files, p)] if read_artifacts else []
        hashes = {c.get("hash") for c in plan} - {None}
        ids = {p.info.run_id for p in parents}
        runs = [r for r in every if not _is_parent(r, referenced)
                and (parent_run_id is None or r.data.tags.get(Tag.PARENT) in ids
                     or r.data.tags.get(Tag.CELL_HASH) in hashes)]
        if not runs:
            where = f"parent run {parent_run_id!r}" if parent_run_id else f"experiment {experiment!r}"
            raise ConfigError(f"{where} has no cell runs in tracking store {uri}")
        by_id, now = {r.info.run_id: r for r in every}, time.time()
        frame = tidy_frame(_record(r, exp.name, _per_class_artifact(files, r) if read_artifacts else {},
                                   interrupted=_interrupted(r, by_id, now)) for r in runs)
    return GridRuns(frame=frame, provenance=_provenance(uri, exp, parents, runs),
                    expected=_expected(plan, parents, frame), artifact_uris=uris)


class RunArtifacts:
    """Reads runs' artifacts: from their folder when the artifact store is this machine's filesystem
    (``file://`` or a path), else through the MLflow client (downloaded under ``dest``). Written by hand
    because the client resolves the run (one store query) and copies the file for every artifact read:
    at 1000 runs that was most of a report's time."""

    def __init__(self, client: Any, *, dest: str | Path, artifact_uris: dict[str, str] | None = None) -> None:
        """Args:
        client: the MlflowClient of the store.
        dest: where artifacts of a remote store are downloaded.
        artifact_uris: run id -> artifact location (``run.info.artifact_uri``); runs not in it are read
            through the client.
        """
        self.client, self.dest = client, Path(dest)
        self._roots = {run_id: _local_folder(u) for run_id, u in (artifact_uris or {}).items()}

    def names(self, run_id: str, path: str = "") -> set[str]:
        """Paths of the artifacts directly under ``path`` (as ``list_artifacts`` gives them: ``views/a.png``)."""
        root = self._roots.get(run_id)
        if root is None:
            return {f.path for f in self.client.list_artifacts(run_id, path or None)}
        folder = root / path if path else root
        return {f"{path}/{p.name}" if path else p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def path(self, run_id: str, path: str) -> Path:
        """A local path of the artifact (a file or a folder); read it, do not change it."""
        root = self._roots.get(run_id)
        if root is None:
            return Path(self.client.download_artifacts(run_id, path, str(self.dest / run_id)))
        return root / path


def _local_folder(artifact_uri: str | None) -> Path | None:
    """The folder of a ``file://`` (or plain path) artifact location, else None (a server or object store)."""
    if not artifact_uri:
        return None
    parts = urlsplit(artifact_uri)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return Path(unquote(parts.path))
    return Path(artifact_uri) if parts.scheme == "" else None


def _record(run: Any, experiment: str, per_class: dict[str, float], *, interrupted: bool = False) -> dict[str, Any]:
    """An MLflow run -> the plain record :func:`reports.load.tidy_frame` takes (status ``INTERRUPTED`` when
    ``interrupted``).

    The evaluation fields (``eval.*``, ``data.val_split``) are read from the run's tags (a re-evaluation
    changes them; params never change), and accuracy metrics of an earlier evaluation that the latest one
    did not report (its ``eval_metrics`` tag) are left out: a report shows one evaluation per run.
    """
    from ddsm.metrics.catalogue import is_accuracy

    tags = run.data.tags
    status = "INTERRUPTED" if interrupted else run.info.status
    fields = {"run_id": run.info.run_id, "parent_run_id": tags.get(Tag.PARENT), "experiment": experiment,
              "experiment_id": run.info.experiment_id, "run_name": run.info.run_name, "status": status,
              "start_time": run.info.start_time, **{t: tags.get(t) for t in RUN_TAGS}}
    evaluation = {k: v for k, v in tags.items() if k.startswith("eval.") or k == "data.val_split"}
    metrics = dict(run.data.metrics)
    if tags.get(Tag.EVAL_METRICS):
        current = set(json.loads(tags[Tag.EVAL_METRICS]))
        metrics = {k: v for k, v in metrics.items() if not is_accuracy(k) or k in current}
    return {"run": fields, "params": {**run.data.params, **evaluation}, "metrics": {**metrics, **per_class}}


def _interrupted(run: Any, by_id: dict[str, Any], now: float) -> bool:
    """A cell run its driver stopped (KILLED, tagged ``status=killed``), or left RUNNING by a driver that is gone."""
    tags = run.data.tags
    if run.info.status == "KILLED":
        return tags.get(Tag.STATUS) == "killed"
    if run.info.status not in ("RUNNING", "SCHEDULED"):
        return False
    parent = by_id.get(tags.get(Tag.PARENT, ""))
    return parent is not None and driver_gone(parent, now=now)


def driver_gone(parent: Any, *, now: float | None = None) -> bool:
    """Whether the driver of a grid's (or study's) parent run is gone: it ended the parent, or its heartbeat
    (:data:`Tag.DRIVER_HEARTBEAT`) is older than :data:`DRIVER_STALE_S`, or it ran on this host and its process
    is gone. A parent without a heartbeat (an older ddsm-bench) counts as alive while RUNNING."""
    from harness.lock import pid_alive

    if parent.info.status != "RUNNING":
        return True
    tags, now = parent.data.tags, time.time() if now is None else now
    host, _, pid = tags.get(Tag.DRIVER, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        return True
    beat = tags.get(Tag.DRIVER_HEARTBEAT)
    try:
        return beat is not None and now - float(beat) > DRIVER_STALE_S
    except ValueError:
        return False


def _per_class_artifact(files: RunArtifacts, run: Any) -> dict[str, float]:
    """``iou_<class>`` from ``per_class_iou.csv`` when the run logged no ``iou_*`` metric, and the per-class
    boundary F ``bf_<r>px/<class>`` from ``metrics.json`` (its ``bf_per_class``), of a finished run."""
    if run.info.status != "FINISHED":
        return {}
    names = files.names(run.info.run_id)
    out = _per_class_bf(files, run) if "metrics.json" in names else {}
    if any(k.startswith("iou_") for k in run.data.metrics) or "per_class_iou.csv" not in names:
        return out
    return {**out, **_per_class_iou(files, run)}


def _per_class_bf(files: RunArtifacts, run: Any) -> dict[str, float]:
    """``bf_<r>px/<class>`` from ``metrics.json``: ``bf_per_class`` {radius: K scores} and ``class_names``."""
    from ddsm.metrics.catalogue import bf_key, class_bf_key

    data = json.loads(files.path(run.info.run_id, "metrics.json").read_text())
    names = data.get("class_names") or []
    out = {}
    for radius, scores in (data.get("bf_per_class") or {}).items():
        r = float(radius)
        bf = bf_key(r, radius=int(r)) if r.is_integer() else bf_key(r)
        for cls, v in zip(names, scores):
            out[class_bf_key(bf, cls)] = float("nan") if v is None else float(v)
    return out


def _per_class_iou(files: RunArtifacts, run: Any) -> dict[str, float]:
    """``iou_<class>`` from ``per_class_iou.csv``."""
    with open(files.path(run.info.run_id, "per_class_iou.csv"), newline="") as fh:
        return {f"iou_{r['class_name']}": float(r["iou"]) if r["iou"] else float("nan") for r in csv.DictReader(fh)}


def _plan(files: RunArtifacts, parent: Any) -> list[dict[str, Any]]:
    """The planned cells of a grid: its parent's ``grid.json`` (``{"cells": [{"variant", "seed", "hash"}]}``);
    empty when it was not logged (a study's parent)."""
    if "grid.json" not in files.names(parent.info.run_id):
        return []
    return list(json.loads(files.path(parent.info.run_id, "grid.json").read_text()).get("cells", []))


def _is_parent(run: Any, referenced: set[str]) -> bool:
    return run.info.run_id in referenced or run.data.tags.get(Tag.KIND) == KIND_GRID


def _expected(plan: list[dict[str, Any]], parents: list[Any], frame: pd.DataFrame) -> pd.DataFrame | None:
    """Planned (variant, seed) cells: the plan if logged, else every variant seen x the parents' ``seeds``
    param; None when neither is known (the report then expects every seed seen)."""
    if plan:
        return pd.DataFrame(plan, columns=["variant", "seed"]).drop_duplicates()
    seeds = sorted({s for p in parents for s in json.loads(p.data.params.get("seeds", "[]"))})
    if not seeds:
        return None
    variants = pd.unique(frame["variant"])
    return pd.MultiIndex.from_product([variants, seeds], names=["variant", "seed"]).to_frame(index=False)


def _provenance(uri: str, exp: Any, parents: list[Any], runs: list[Any]) -> dict[str, Any]:
    """Spec, experiment, parent runs, git SHAs, hardware and run dates for the report header."""
    def uniq(values: Any) -> list[str]:
        return sorted({v for v in values if v})

    ptags = [p.data.tags for p in parents]
    times = [r.info.start_time for r in runs if r.info.start_time]
    stamp = [dt.datetime.fromtimestamp(t / 1000, dt.timezone.utc).isoformat(timespec="seconds") for t in
             (min(times), max(times))] if times else []
    smoke = any(str(t.get(Tag.SMOKE)).lower() == "true" for t in ptags)
    isolated = sum(bool(r.data.tags.get(Tag.COST_SOURCE)) for r in runs)
    phases = uniq(t.get(Tag.COST_PHASE) for t in ptags)
    if phases:
        cost = "; ".join(phases) + (f" (for {isolated} of {len(runs)} runs)" if isolated < len(runs) else "") + \
            "; what each trial measured while sharing its machine is kept in MLflow as trial_* diagnostics"
    else:
        cost = "measured inside each trial, while trials shared the machine (no isolated cost phase recorded)"
    return {
        "spec": exp.name,  # the experiment is named after the spec ("-smoke" appended under --smoke)
        "spec_path": ", ".join(uniq(t.get(Tag.SPEC) for t in ptags)),
        "smoke": "yes: a few steps on tiny inputs, the numbers are not results" if smoke else None,
        "spec_baseline": next((t[Tag.BASELINE] for t in ptags if t.get(Tag.BASELINE)), None),
        "experiment": exp.name,
        "experiment_id": exp.experiment_id,
        "parent_run_ids": [p.info.run_id for p in parents],
        "tracking_uri": redact(uri),
        "git_sha": uniq([*(t.get(Tag.GIT_SHA) for t in ptags), *(r.data.tags.get(Tag.GIT_SHA) for r in runs)]),
        "hardware": uniq(r.data.tags.get(Tag.DEVICE) for r in runs),
        "torch": uniq(r.data.tags.get(Tag.TORCH) for r in runs),
        "hosts": uniq(h for r in runs for h in (r.data.tags.get(Tag.HOST) or "").split(",")),
        "nodes": uniq(n for r in runs for n in (r.data.tags.get(Tag.NODE_ID) or "").split(",")),
        "gpus": uniq(g for r in runs for g in _gpus(r.data.tags)),
        "runs_started": " to ".join(stamp),
        "description": "; ".join(uniq(t.get(Tag.DESCRIPTION) for t in ptags)),
        "accuracy_split": _splits(runs),
        "cost_source": cost,
        "split_leak": "; ".join(uniq(t.get(Tag.SPLIT_LEAK) for t in ptags)) or None,
    }


def _splits(runs: list[Any]) -> str:
    """Which split the accuracy metrics come from: ``data.val_split`` of every run (a tag; a param before hash v2)."""
    counts: dict[str, int] = {}
    for r in runs:
        split = r.data.tags.get("data.val_split") or r.data.params.get("data.val_split") or "val"
        counts[split] = counts.get(split, 0) + 1
    what = {"val": "the dataset's validation split", "test": "the dataset's test split",
            "minival": "minival, held out of the train split (a tuning split)"}
    return "; ".join(f"{s} ({what.get(s, s)}), {n} run{'s' if n != 1 else ''}" for s, n in counts.items())
def _gpus(tags: dict[str, str]) -> list[str]:
    """``host:gpu_id (uuid)`` of every GPU an attempt of the run held (empty on CPU)."""
    ids = [g for g in (tags.get(Tag.GPU_IDS) or "").split(",") if g]
    uuids = [u for u in (tags.get(Tag.GPU_UUIDS) or "").split(",") if u]
    hosts = (tags.get(Tag.HOST) or "").split(",")
    if tags.get(Tag.WORKERS):
        workers = json.loads(tags[Tag.WORKERS])
        return [f"{w.get('host', '')}:{g}" + (f" ({u})" if u else "")
                for w in workers for g, u in itertools.zip_longest(w.get("gpu_ids", []), w.get("gpu_uuids", []))
                if g is not None]
    return [f"{hosts[0]}:{g}" + (f" ({u})" if u else "") for g, u in itertools.zip_longest(ids, uuids) if g]


HISTORY_METRICS = ("loss", "miou")  # plus every bf_* : the learning curves (reports.curves)


def load_figure_inputs(tracking_uri: str | None, frame: pd.DataFrame, *, dest: str | Path,
                       artifact_uris: dict[str, str] | None = None) -> Any:
    """The learning-curve histories, resume steps and ``views/`` folders of the finished runs in ``frame``
    (read in place from a local artifact store, else downloaded under ``dest``; ``artifact_uris`` as in
    :class:`RunArtifacts`), and the grid's ``figures`` settings: a :class:`reports.inputs.FigureInputs`."""
    from ddsm.metrics.catalogue import bf_metrics
    from reports.inputs import HISTORY_COLUMNS, FigureInputs, resume_steps

    client = MlflowClient(tracking_uri=reader_uri(tracking_uri))
    files = RunArtifacts(client, dest=dest, artifact_uris=artifact_uris)
    rows, resumes, views, settings = [], [], {}, {}
    finished = frame.loc[frame["status"].eq("FINISHED"), ["run_id", "parent_run_id"]].drop_duplicates("run_id")
    logged = frame.groupby("run_id")["metric"].agg(lambda m: set(m.dropna()))  # final metrics: no get_run per run
    for run_id, parent_id in finished.itertuples(index=False):
        names_logged = logged.get(run_id, set())
        keys = [k for k in HISTORY_METRICS if k in names_logged] + bf_metrics(names_logged)
        points = [(run_id, k, m.step, m.value, m.timestamp) for k in keys for m in client.get_metric_history(run_id, k)]
        rows += points
        names = files.names(run_id)
        if "attempts.jsonl" in names:
            text = files.path(run_id, "attempts.jsonl").read_text()
            attempts = [json.loads(line) for line in text.splitlines() if line.strip()]
            history = pd.DataFrame([p for p in points if p[1] == "loss"], columns=HISTORY_COLUMNS)
            resumes += [(run_id, s) for s in resume_steps(history, attempts)]
        if "views" in names and "views/index.json" in files.names(run_id, "views"):
            views[run_id] = files.path(run_id, "views")
        if not settings and parent_id:
            try:
                settings = json.loads(client.get_run(parent_id).data.tags.get(Tag.FIGURES) or "{}")
            except MlflowException:
                settings = {}
    return FigureInputs(histories=pd.DataFrame(rows, columns=HISTORY_COLUMNS),
                        resumes=pd.DataFrame(resumes, columns=["run_id", "step"]), views=views, settings=settings)


REPORT_MODULE = "reports.build"  # the report writer (pandas, matplotlib, scipy): imported on first use


def write_report_from_mlflow(tracking_uri: str | None, *, experiment: str | None = None,
                             parent_run_id: str | None = None, out_dir: str | Path, baseline: str | None = None,
                             method: str = "ttest", alpha: float = 0.05) -> dict[str, Path]:
    """Load a grid from MLflow and write its report (:func:`reports.build.write_report`), figures included
    (learning curves from the metric histories, panels and sampling figures from the cells' ``views/``
    artifacts: nothing but the store is read).

    ``ddsm-bench run`` calls this at the end of every grid; ``ddsm-bench report`` is the same from the CLI.
    Returns ``{relative path: path}`` of every written file (``report.md`` among them).
    """
    write_report = importlib.import_module(REPORT_MODULE).write_report

    grid = load_runs(tracking_uri, experiment=experiment, parent_run_id=parent_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = load_figure_inputs(tracking_uri, grid.frame, dest=tmp, artifact_uris=grid.artifact_uris)
        return write_report(grid.frame, out_dir, baseline=baseline, provenance=grid.provenance, method=method,
                            alpha=alpha, expected=grid.expected, figure_inputs=inputs)
