"""Run an ablation grid on Ray: one fresh worker process per trial, retries, resume, MLflow on the driver.

Read top to bottom: what a trial does inside its worker (:func:`run_trial`, the DDP variant on Ray
Train's TorchTrainer), the checks the driver makes before launching anything (resources, shared
storage), then the driver loop :func:`run_grid`.

Layout of ``<out>``::

    mlflow.db                 default tracking store (sqlite); artifacts under mlartifacts/
    grid.json                 the expanded cells (hash, name, variant, seed, reference)
    cells/<hash>/             one folder per cell = the engine's out_dir: config.yaml, metrics.json,
                              checkpoints/last.pt, ... plus attempts.jsonl (one line per launch),
                              train.log (the worker's output) and result.json (written on success)

Re-running the same command skips cells whose child run FINISHED with the same cell hash, records
cells that finished but were never recorded (their result.json), and resumes the others from their
last checkpoint (``engine.train(resume=True)`` on the same cell folder).

Retries: a cell is launched up to ``1 + max_failures`` times; only failure classes in the spec's
``retry_on`` are retried (default oom, error, killed). ``nan`` is not retried by default: the same
seed resumed from the same checkpoint diverges again.

Test hook: ``DDSM_BENCH_FAIL_ONCE=<class>:<dir>`` (read by the driver) makes every cell fail its
first launch with that failure class (error, nan, oom, killed), using ``<dir>/<hash>`` as marker.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from ddsm.config import ConfigError, from_dict, to_dict
from harness.spec import Cell, GridSpec, Resources, effective_resources, expand, flatten, load_spec

__all__ = ["CellResult", "GridSummary", "TrialPayload", "check_resources", "check_shared_storage", "connect",
           "default_concurrency", "git_sha", "launch_trial", "ray_failure_class", "run_grid", "run_trial"]

FAIL_ONCE_ENV = "DDSM_BENCH_FAIL_ONCE"


# ============================================================================ inside a worker


@dataclass
class TrialPayload:
    """Everything a worker needs to run one attempt of one cell (picklable, no Ray/MLflow objects)."""

    cell_hash: str
    name: str
    config: dict  # to_dict(TrialConfig)
    cell_dir: str  # absolute; the engine's out_dir
    attempt: int  # 1-based
    fail_once: str | None = None  # test hook "<class>:<dir>", see the module docstring


def run_trial(payload: TrialPayload, queue: Any | None, *, rank: int = 0, reraise: bool = False) -> dict:
    """Train one cell in this process; return ``{"status": "finished", "metrics"}`` or a failure record.

    Args:
        payload: the cell and attempt.
        queue: a ``ray.util.queue.Queue`` receiving progress events (None on ranks > 0).
        rank: distributed rank (only rank 0 logs attempts and writes result.json).
        reraise: re-raise a training exception after recording it (DDP: the other ranks must stop too).
    """
    import torch

    from ddsm import engine
    from ddsm.engine.failures import classify_failure

    cell_dir = Path(payload.cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    _redirect_output(cell_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log"))
    cfg = from_dict(payload.config).validate()
    device = _device_name(cfg.train.device)
    if rank == 0:
        _append_json(cell_dir / "attempts.jsonl", {
            "attempt": payload.attempt, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
            "resumed": (cell_dir / "checkpoints" / "last.pt").is_file(), "device": device})
    sink = _QueueCallback(queue, cell_hash=payload.cell_hash, attempt=payload.attempt) if queue is not None else None
    if sink is not None:
        sink.send("start", 0, {}, device=device, torch=torch.__version__, host=socket.gethostname())
    try:
        _maybe_fail_once(payload, rank=rank)
        metrics = engine.train(cfg, out_dir=cell_dir, callbacks=[sink] if sink else [], resume=True)
    except BaseException as e:  # noqa: BLE001 - every failure is classified and reported to the driver
        record = {"status": "failed", "failure_class": classify_failure(e), "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(), "rank": rank}
        _write_json(cell_dir / f"failure.rank{rank}.json", record)
        if reraise:
            raise
        return record
    final = _scalars(metrics)
    if rank == 0:
        _write_json(cell_dir / "result.json", {"cell_hash": payload.cell_hash, "metrics": final})
    return {"status": "finished", "metrics": final, "device": device, "torch": torch.__version__}


class _QueueCallback:
    """An engine callback that forwards progress to the driver (trials never talk to MLflow)."""

    rank_zero_only = True

    def __init__(self, queue: Any, *, cell_hash: str, attempt: int) -> None:
        self.queue, self.cell_hash, self.attempt = queue, cell_hash, attempt

    def send(self, kind: str, step: int, metrics: dict, **extra: Any) -> None:
        """Put one event ``{hash, attempt, type, step, metrics, ...}`` on the queue."""
        self.queue.put({"hash": self.cell_hash, "attempt": self.attempt, "type": kind, "step": int(step),
                        "metrics": _scalars(metrics), "time": time.time(), **extra})

    def on_train_step(self, step: int, metrics: dict) -> None:
        """Train loss, lr, step time."""
        self.send("train", step, metrics)

    def on_eval(self, step: int, metrics: dict) -> None:
        """Validation metrics."""
        self.send("eval", step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint is on disk."""
        self.send("checkpoint", step, {})

    def on_end(self, metrics: dict) -> None:
        """Final metrics travel as the task's return value instead."""


def _maybe_fail_once(payload: TrialPayload, *, rank: int) -> None:
    """The DDSM_BENCH_FAIL_ONCE test hook: fail the first launch of each cell with the given class."""
    if not payload.fail_once or rank != 0:
        return
    kind, _, folder = payload.fail_once.partition(":")
    marker = Path(folder) / payload.cell_hash
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(kind)
    if kind == "killed":
        os._exit(1)  # the worker process dies: Ray reports a crashed worker
    if kind == "nan":
        from ddsm.engine.failures import TrainingDiverged

        raise TrainingDiverged(1, float("nan"))
    if kind == "oom":
        raise MemoryError("injected out of memory (DDSM_BENCH_FAIL_ONCE)")
    raise RuntimeError("injected failure (DDSM_BENCH_FAIL_ONCE)")


@ray.remote(max_calls=1, max_retries=0)
def _single_task(payload: TrialPayload, queue: Any, threads: int) -> dict:
    """One trial in a fresh worker process (max_calls=1: GPU memory is released when it exits)."""
    import torch

    torch.set_num_threads(max(1, threads))
    return run_trial(payload, queue)


def _ddp_loop(config: dict) -> None:
    """Ray Train worker loop: torch.distributed is initialised; engine.train wraps DDP + SyncBN."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    run_trial(config["payload"], config["queue"] if rank == 0 else None, rank=rank, reraise=True)


@ray.remote(num_cpus=0, max_calls=1, max_retries=0)
def _ddp_task(payload: TrialPayload, queue: Any, resources: Resources) -> dict:
    """One DDP trial: a TorchTrainer with ``num_workers`` workers (gloo on CPU, NCCL on GPU)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.cpus, **({"GPU": resources.gpus} if resources.gpus else {})}
    trainer = TorchTrainer(
        _ddp_loop,
        train_loop_config={"payload": payload, "queue": queue},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.gpus > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"{payload.cell_hash}-attempt{payload.attempt}",
                             storage_path=str(Path(payload.cell_dir) / "ray_train"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    cell_dir = Path(payload.cell_dir)
    for old in cell_dir.glob("failure.rank*.json"):
        old.unlink()
    try:
        trainer.fit()
    except TrainingFailedError as e:
        # The root cause wins over its echoes: one rank's OOM or NaN makes the others fail in a collective.
        records = [json.loads(p.read_text()) for p in sorted(cell_dir.glob("failure.rank*.json"))]
        records.sort(key=lambda r: ("oom", "nan", "error", "killed").index(r["failure_class"]))
        return records[0] if records else {"status": "failed", "failure_class": "killed", "error": str(e).splitlines()[0]}
    result = json.loads((cell_dir / "result.json").read_text())
    return {"status": "finished", "metrics": result["metrics"]}


def launch_trial(payload: TrialPayload, queue: Any, res: Resources) -> Any:
    """Submit one attempt; return its ObjectRef (the outcome dict of :func:`run_trial`).

    A single-process trial is a ``max_calls=1`` task holding ``res.cpus``/``res.gpus``; with
    ``res.num_workers > 1`` or ``res.ddp`` it is a zero-CPU launcher task running a TorchTrainer of
    that many workers.
    """
    if res.num_workers > 1 or res.ddp:
        return _ddp_task.remote(payload, queue, res)
    return _single_task.options(num_cpus=res.cpus, num_gpus=res.gpus).remote(payload, queue, int(res.cpus))


def _device_name(wanted: str) -> str:
    import torch

    if wanted != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _redirect_output(path: Path) -> None:
    """Send this worker's stdout/stderr (fd level) to ``path``: the driver's terminal stays readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.close(fd)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _append_json(path: Path, obj: Any) -> None:
    with path.open("a") as f:
        f.write(json.dumps(obj) + "\n")


# ============================================================================ driver: checks


def connect(address: str | None) -> bool:
    """Start a local Ray instance (address None) or join a cluster; True when this call started/joined it.

    An already initialised Ray (e.g. a test session's) is reused and left running.
    """
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             configure_logging=True)
    return True


def check_resources(res: Resources) -> None:
    """Raise ConfigError (exit 2) when no trial of the grid could ever be scheduled on this cluster.

    Ray would queue such a trial forever, so the driver checks ``ray.cluster_resources()`` (totals) and
    the alive nodes (one worker must fit on one node) before launching anything.
    """
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have = f"the cluster has CPU: {total.get('CPU', 0):g}, GPU: {total.get('GPU', 0):g} over {len(nodes)} node(s)"
    ask = (f"each trial asks for {res.num_workers} worker(s) x ({res.cpus:g} CPU + {res.gpus:g} GPU) = "
           f"{res.cpus * res.num_workers:g} CPU + {res.gpus * res.num_workers:g} GPU")
    fits_node = any(n.get("CPU", 0) >= res.cpus and n.get("GPU", 0) >= res.gpus for n in nodes)
    fits_total = (total.get("CPU", 0) >= res.cpus * res.num_workers
                  and total.get("GPU", 0) >= res.gpus * res.num_workers)
    if not (fits_node and fits_total):
        raise ConfigError(f"{ask}, but {have}: Ray would wait forever; lower `resources` in the spec "
                          "or join a bigger cluster with --address")


def default_concurrency(res: Resources) -> int:
    """How many trials the cluster can run at once with these per-trial resources."""
    total = ray.cluster_resources()
    limits = [total.get("CPU", 0) // (res.cpus * res.num_workers)]
    if res.gpus:
        limits.append(total.get("GPU", 0) // (res.gpus * res.num_workers))
    return max(1, int(min(limits)))


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    p = Path(path)
    return p.read_text() if p.is_file() else None


def check_shared_storage(out_dir: Path) -> None:
    """On a multi-node cluster, raise ConfigError unless every node reads a marker the driver wrote."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir.resolve() / f".storage-check-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    marker.write_text(token)
    try:
        refs = {n["NodeManagerAddress"]: _read_marker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes}
        blind = [host for host, ref in refs.items() if ray.get(ref, timeout=60) != token]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"--out {str(out_dir)!r} is not shared: node(s) {', '.join(blind)} cannot read it; "
                          "on a multi-node cluster put --out on a shared filesystem (NFS, Lustre, ...)")


def git_sha() -> str:
    """``git describe --always --dirty`` of the project, or ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM behaves like Ctrl-C in the driver (so both mark running cells KILLED and exit 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ============================================================================ driver: the grid


@dataclass
class CellResult:
    """What happened to one cell in this invocation."""

    cell: Cell
    status: str = "pending"  # pending | running | finished | skipped | failed | killed
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # failure class of every failed attempt
    attempts: int = 0  # launches in this invocation
    run_id: str | None = None
    step: int = 0
    last_miou: float | None = None
    started: float | None = None
    elapsed: float = 0.0
    device: str = ""

    @property
    def done(self) -> bool:
        """Finished now or before."""
        return self.status in ("finished", "skipped")


@dataclass
class GridSummary:
    """The outcome of :func:`run_grid`."""

    spec: GridSpec
    out_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    results: list[CellResult]
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """130 interrupted, 1 some cell failed after retries, 0 every cell finished."""
        if self.interrupted:
            return 130
        return 0 if all(r.done for r in self.results) else 1


def run_grid(spec: GridSpec | str | Path, *, out_dir: str | Path, address: str | None = None,
             tracking_uri: str | None = None, max_concurrent: int | None = None, smoke: bool = False,
             log_checkpoints: bool = False, console: Any = None) -> GridSummary:
    """Run every cell of a grid on Ray, tracked in MLflow, resuming an earlier run in ``out_dir``.

    Args:
        spec: a GridSpec or the path of a spec file.
        out_dir: where cells, checkpoints and (by default) the MLflow store live.
        address: a Ray cluster to join (None: start a local instance, or reuse an initialised one).
        tracking_uri: MLflow tracking URI (None: ``sqlite:///<out>/mlflow.db``).
        max_concurrent: trials in flight at once (None: as many as the cluster's resources allow).
        smoke: a few steps on tiny inputs (see :data:`harness.spec.SMOKE_OVERRIDES`).
        log_checkpoints: also upload each cell's last checkpoint as an MLflow artifact.
        console: a rich Console for the live table (None: stderr).

    Raises:
        ConfigError: bad spec, unschedulable resources or unshared storage; nothing was launched.
    """
    from harness import progress
    from harness.tracking import Tracker, default_tracking_uri

    spec = load_spec(spec) if isinstance(spec, (str, Path)) else spec
    cells = expand(spec, smoke=smoke, check_paths=address is None)
    res = effective_resources(spec, smoke=smoke)
    out = Path(out_dir).resolve()
    started = connect(address)
    try:
        check_resources(res)
        check_shared_storage(out)
        out.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri or default_tracking_uri(out)
        tracker = Tracker(tracking_uri=uri, experiment=spec.name + ("-smoke" if smoke else ""),
                          artifact_root=None if tracking_uri else out / "mlartifacts")
        _write_grid_json(out / "grid.json", spec, cells, smoke=smoke)
        sha = git_sha()
        grid_hash = _grid_hash(cells)
        parent = tracker.start_grid(
            grid_hash=grid_hash, name=spec.name,
            tags={"spec": spec.source, "git_sha": sha, "smoke": smoke, "baseline": spec.baseline},
            params={"cells": len(cells), "seeds": spec.seeds, "max_failures": spec.max_failures,
                    "retry_on": spec.retry_on, **{f"resources.{k}": v for k, v in dataclasses.asdict(res).items()}})
        grid = _Grid(spec=spec, cells=cells, res=res, out=out, tracker=tracker, parent=parent, sha=sha,
                     log_checkpoints=log_checkpoints, fail_once=os.environ.get(FAIL_ONCE_ENV))
        board = progress.ProgressBoard(grid.results, console=console)
        interrupted = False
        with _sigterm_as_interrupt(), board:
            try:
                grid.recover()
                board.refresh()
                grid.loop(board, max_concurrent or default_concurrency(res))
            except KeyboardInterrupt:
                interrupted = True
                grid.interrupt()
            finally:
                board.refresh()
        tracker.log_json(parent, progress.comparison_rows(grid.results), "comparison.json")
        tracker.client.log_artifact(parent, str(out / "grid.json"))  # lets the report show cells never run
        tracker.end_run(parent, status="KILLED" if interrupted else
                        ("FINISHED" if all(r.done for r in grid.results) else "FAILED"))
        summary = GridSummary(spec=spec, out_dir=out, tracking_uri=uri, experiment_id=tracker.experiment_id,
                              parent_run_id=parent, results=grid.results, interrupted=interrupted)
        progress.print_summary(summary, console=console)
        if not interrupted:
            _write_report(summary, console=console)
        return summary
    finally:
        if started:
            ray.shutdown()


def _write_report(summary: GridSummary, *, console) -> None:  # noqa: ANN001 - rich Console
    """Write the paper tables and figures of the grid to <out>/report (a failure there never fails the grid)."""
    from rich.console import Console

    from harness.mlflow_store import write_report_from_mlflow

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    try:
        paths = write_report_from_mlflow(summary.tracking_uri, parent_run_id=summary.parent_run_id,
                                         out_dir=summary.out_dir / "report", baseline=summary.spec.baseline)
    except Exception as e:  # the grid's results are already safe in MLflow; say why the report is missing
        console.print(f"[yellow]report not written: {type(e).__name__}: {e}[/yellow]")
        return
    console.print(f"report: {summary.out_dir / 'report' / 'report.md'} ({len(paths)} files; "
                  f"re-create with `ddsm-bench report --run {summary.parent_run_id} "
                  f"--tracking-uri {summary.tracking_uri} --out DIR`)", highlight=False)


@dataclass
class _Running:
    result: CellResult
    attempt: int


class _Grid:
    """The driver's state for one invocation: pending cells, trials in flight, their MLflow runs."""

    def __init__(self, *, spec: GridSpec, cells: list[Cell], res: Resources, out: Path, tracker: Any, parent: str,
                 sha: str, log_checkpoints: bool, fail_once: str | None) -> None:
        self.spec, self.res, self.out, self.tracker, self.parent = spec, res, out, tracker, parent
        self.sha, self.log_checkpoints, self.fail_once = sha, log_checkpoints, fail_once
        self.results = [CellResult(cell=c) for c in cells]
        self.by_hash = {r.cell.hash: r for r in self.results}
        self.in_flight: dict[Any, _Running] = {}
        self.queue = None

    def cell_dir(self, cell: Cell) -> Path:
        """``<out>/cells/<hash>``."""
        return self.out / "cells" / cell.hash

    # ------------------------------------------------------------------ before launching

    def recover(self) -> None:
        """Mark cells finished in MLflow as skipped; record finished-but-unrecorded ones; reuse other runs."""
        runs = self.tracker.cell_runs()
        for r in self.results:
            found = runs.get(r.cell.hash)
            if found and found.status == "FINISHED":
                r.status, r.run_id = "skipped", found.run_id
                r.metrics = self.tracker.final_metrics(found.run_id)
                continue
            r.run_id = found.run_id if found else None
            result_file = self.cell_dir(r.cell) / "result.json"
            if result_file.is_file():  # trained to the end, but the driver died before recording it
                r.metrics = json.loads(result_file.read_text())["metrics"]
                self._open_run(r)
                self._finish(r, r.metrics)

    # ------------------------------------------------------------------ the loop

    def loop(self, board: Any, limit: int) -> None:
        """Launch pending cells (at most ``limit`` at once), follow events, retry, record; until done."""
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        pending = [r for r in self.results if r.status == "pending"]
        while pending or self.in_flight:
            while pending and len(self.in_flight) < limit:
                self._launch(pending.pop(0))
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=0.5)
            self._drain_events()
            for ref in ready:
                retry = self._collect(ref)
                if retry is not None:
                    pending.insert(0, retry)
            self.tracker.flush()
            board.refresh()

    def _launch(self, r: CellResult) -> None:
        if r.run_id is None or r.attempts == 0:
            self._open_run(r)
        r.attempts += 1
        r.status, r.started, r.step = "running", time.time(), 0
        payload = TrialPayload(cell_hash=r.cell.hash, name=r.cell.name, config=to_dict(r.cell.config),
                               cell_dir=str(self.cell_dir(r.cell)), attempt=r.attempts, fail_once=self.fail_once)
        ref = launch_trial(payload, self.queue, self.res)
        self.in_flight[ref] = _Running(result=r, attempt=r.attempts)
        self.tracker.set_tags(r.run_id, {"attempts": r.attempts, "status": "running"})

    def _open_run(self, r: CellResult) -> None:
        """Create (or reopen) the child run of a cell with its params and tags."""
        cell = r.cell
        r.run_id = self.tracker.start_cell(
            name=cell.name, parent_id=self.parent, cell_hash=cell.hash, reuse=r.run_id,
            params=flatten(to_dict(cell.config)),
            tags={"seed": cell.seed, "variant": cell.variant, "baseline": cell.baseline,
                  "reference": cell.reference or "", "git_sha": self.sha, "spec": self.spec.source,
                  "failure_class": "none", "cell_dir": str(self.cell_dir(cell))})

    def _drain_events(self) -> None:
        """Move trial events from the queue to the progress rows and the MLflow buffers."""
        n = self.queue.size()
        for ev in self.queue.get_nowait_batch(n) if n else []:
            r = self.by_hash.get(ev["hash"])
            running = next((x for x in self.in_flight.values() if x.result is r), None)
            if r is None or running is None or running.attempt != ev["attempt"]:
                continue  # a late event of an attempt that already ended
            r.step = max(r.step, ev["step"])
            if ev["type"] == "start":
                r.device = ev.get("device", "")
                self.tracker.set_tags(r.run_id, {"device": r.device, "torch": ev.get("torch", ""),
                                                 "host": ev.get("host", "")})
            elif ev["type"] in ("train", "eval") and ev["metrics"]:
                if ev["type"] == "eval" and "miou" in ev["metrics"]:
                    r.last_miou = ev["metrics"]["miou"]
                self.tracker.log_metrics(r.run_id, ev["metrics"], step=ev["step"])

    def _collect(self, ref: Any) -> CellResult | None:
        """Record a finished attempt; return the cell when it should be launched again."""
        self._drain_events()  # the attempt's last events, while it still counts as running
        running = self.in_flight.pop(ref)
        r = running.result
        r.elapsed += time.time() - (r.started or time.time())
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as e:
            outcome = {"status": "failed", "failure_class": ray_failure_class(e), "error": str(e).splitlines()[0]}
        if outcome["status"] == "finished":
            self._finish(r, outcome["metrics"])
            return None
        cls = outcome["failure_class"]
        r.failures.append(cls)
        (self.cell_dir(r.cell) / "error.txt").write_text(outcome.get("traceback") or outcome.get("error", ""))
        retry = cls in self.spec.retry_on and r.attempts <= self.spec.max_failures
        self.tracker.set_tags(r.run_id, {"failures": ",".join(r.failures), "failure_class": cls,
                                         "last_error": outcome.get("error", "")[:500]})
        if retry:
            r.status = "retrying"
            return r
        r.status = "failed"
        self.tracker.end_run(r.run_id, status="FAILED", tags={"status": "failed"}, artifacts=self._artifacts(r))
        return None

    def _finish(self, r: CellResult, metrics: dict[str, float]) -> None:
        r.status, r.metrics = "finished", metrics
        self.tracker.log_metrics(r.run_id, metrics, step=r.cell.config.train.steps)
        self.tracker.end_run(r.run_id, status="FINISHED", artifacts=self._artifacts(r), tags={
            "status": "finished", "failure_class": "none", "failures": ",".join(r.failures),
            "attempts": r.attempts, "elapsed_s": round(r.elapsed, 1)})

    def _artifacts(self, r: CellResult) -> list[tuple[Path, str | None]]:
        d = self.cell_dir(r.cell)
        files = ["config.yaml", "metrics.json", "per_class_iou.csv", "confusion.csv", "attempts.jsonl",
                 "train.log", "error.txt"]
        out = [(d / f, None) for f in files]
        if self.log_checkpoints:
            out.append((d / "checkpoints" / "last.pt", "checkpoints"))
        return out

    # ------------------------------------------------------------------ Ctrl-C / SIGTERM

    def interrupt(self) -> None:
        """Record what already finished, kill the rest, mark their runs KILLED (nothing finished is lost).

        Ray may already be going down (Ctrl-C in a terminal reaches its processes too), so every Ray
        call here is best effort; the MLflow records are what must not be lost.
        """
        with _suppress():
            self._drain_events()
        for ref, running in list(self.in_flight.items()):
            r = running.result
            outcome = None
            with _suppress():
                if ray.wait([ref], timeout=0)[0]:
                    outcome = ray.get(ref, timeout=5)
            result_file = self.cell_dir(r.cell) / "result.json"
            if (outcome or {}).get("status") != "finished" and result_file.is_file():  # done, not yet returned
                outcome = {"status": "finished", "metrics": json.loads(result_file.read_text())["metrics"]}
            if (outcome or {}).get("status") == "finished":
                self._finish(r, outcome["metrics"])
                continue
            with _suppress():
                ray.cancel(ref, force=True)
            r.status = "killed"
            r.elapsed += time.time() - (r.started or time.time())
            self.tracker.end_run(r.run_id, status="KILLED", tags={"status": "killed", "failure_class": "killed"},
                                 artifacts=[])
        self.in_flight.clear()


@contextmanager
def _suppress():
    """Swallow any error (not KeyboardInterrupt) from a best-effort Ray call during shutdown."""
    try:
        yield
    except Exception:  # noqa: BLE001 - best effort by design
        pass


def ray_failure_class(e: Exception) -> str:
    """Failure class of an exception raised by Ray itself (the trial's own exceptions are caught inside)."""
    if isinstance(e, ray.exceptions.OutOfMemoryError):
        return "oom"
    if isinstance(e, ray.exceptions.RayTaskError):
        from ddsm.engine.failures import classify_failure

        return classify_failure(e.cause) if getattr(e, "cause", None) else "error"
    return "killed"  # worker crashed, node died, task cancelled


def _grid_hash(cells: list[Cell]) -> str:
    import hashlib

    return hashlib.sha256(",".join(sorted(c.hash for c in cells)).encode()).hexdigest()[:12]


def _write_grid_json(path: Path, spec: GridSpec, cells: list[Cell], *, smoke: bool) -> None:
    _write_json(path, {"name": spec.name, "source": spec.source, "baseline": spec.baseline, "smoke": smoke,
                       "cells": [{"hash": c.hash, "name": c.name, "variant": c.variant, "seed": c.seed,
                                  "baseline": c.baseline, "reference": c.reference} for c in cells]})


_ray_failure_class = ray_failure_class  # the name harness/tune.py imports
