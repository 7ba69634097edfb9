"""``ddsm-bench run``: a grid's policy (recover, launch, retry) and :func:`run_grid`, its session.

Layout of ``<out>``::

    mlflow.db                 default tracking store (sqlite); artifacts under mlartifacts/
    grid.json                 the expanded cells (hash, name, variant, seed, reference)
    cells/<hash>/             one folder per cell = the engine's out_dir (see harness/worker.py)

Re-running the same command skips cells whose child run FINISHED with the same cell (train) hash and
eval hash, records cells that finished but were never recorded (their result.json), and resumes the
others from their last checkpoint (``engine.train(resume=True)`` on the same cell folder), reusing
their child run.

Evaluate without retraining (:mod:`harness.cells`: train hash vs eval hash): a cell that finished
training but whose eval hash differs (``eval.*`` or ``data.val_split`` changed), or every finished
cell with ``reevaluate=True`` (``--reevaluate``), gets an evaluate-only attempt: its final checkpoint
is scored with the new settings (:func:`ddsm.engine.reevaluate`), ``attempts.jsonl`` is untouched
(``evaluations.jsonl`` gets a line), and the scores go to the same MLflow run with the new
``eval_hash`` tag and ``eval.*`` tags (params are what trained the weights; MLflow params never change).

Retries: a cell is launched up to ``1 + max_failures`` times; only failure classes in the spec's
``retry_on`` are retried (default oom, error, killed). ``nan`` is not retried by default: the same
seed resumed from the same checkpoint diverges again; ``config`` (a ConfigError inside the worker) is
never retried.

Cost: when the cells are done, the isolated cost phase (:mod:`harness.cost`) measures every variant
once, alone on its device; the report's latency, train-step and memory columns come from it.

Ctrl-C / SIGTERM (:mod:`harness.driver`): what finished is recorded, running cells (and cells
waiting for a retry) are marked KILLED, exit 130; nothing finished is lost.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddsm.config import ConfigError, to_dict
from ddsm.engine.failures import NEVER_RETRIED
from ddsm.metrics.catalogue import diagnostic, is_accuracy
from harness import console as view
from harness.cells import HASH_VERSION, Cell, eval_fields, expand, grid_hash, train_params
from harness.driver import (RESULT_FILE, Event, Job, Policy, Recorder, TrialOutcome, TrialPayload, append_jsonl,
                            write_json)
from harness.mlflow_io import REPORT_MODULE, Tag, record_event, write_report_from_mlflow
from harness.session import (claim_out, close_recorder, cluster, default_concurrency, git_sha, imports_in_background,
                             open_recorder, preflight, print_where_to_look, run_policy, stop_exit_code,
                             store_while_ray_starts)
from harness.spec import GridSpec, load_spec
from harness.worker import FAIL_ONCE_ENV, OUTCOMES_FILE, cell_artifacts

__all__ = ["CellResult", "GridPolicy", "GridSummary", "run_grid", "write_grid_json"]


@dataclass
class CellResult:
    """What happened to one cell in this invocation."""

    cell: Cell
    status: str = "pending"  # pending | running | evaluating | retrying | finished | skipped | failed | killed
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # failure class of every failed attempt
    attempts: int = 0  # training launches in this invocation (the retry budget)
    earlier: int = 0  # training launches by earlier invocations (its attempts.jsonl)
    mode: str = "train"  # what its next launch does: train | evaluate (trained already, scored another way)
    evaluations: int = 0  # evaluate-only launches in this invocation
    run_id: str | None = None
    step: int = 0
    last_miou: float | None = None
    started: float | None = None
    elapsed: float = 0.0
    device: str = ""
    node_id: str = ""  # where the latest attempt runs

    @property
    def done(self) -> bool:
        """Finished now or before."""
        return self.status in ("finished", "skipped")

    @property
    def launches(self) -> int:
        """Launches of the cell over every invocation (the ``attempts`` tag)."""
        return self.earlier + self.attempts


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
    cost: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> isolated cost record (harness.cost)
    stop_reason: str | None = None  # signal | tracking | cluster (see harness.driver.StopFlag)
    stop_message: str = ""
    journaled: int = 0  # tracking writes left in <out>/tracking-journal.json for the next run

    @property
    def exit_code(self) -> int:
        """:mod:`harness.exit_codes`: 3 tracking store lost, 4 cluster lost, 130 interrupted, 1 some cell failed
        after its retries, 0 every cell finished."""
        return stop_exit_code(self, ok=all(r.done for r in self.results))


class GridPolicy(Policy):
    """The grid's decisions: which cells to (re)launch, their MLflow runs, retries (see the module docstring)."""

    def __init__(self, *, spec: GridSpec, cells: list[Cell], out: Path, recorder: Recorder, parent: str, sha: str,
                 log_checkpoints: bool = False, fail_once: str | None = None, reevaluate: bool = False) -> None:
        """Args:
        spec: the grid (its retry policy).
        cells: its expanded cells, in order.
        out: the grid's out dir (cell folders under ``cells/``).
        recorder: where runs are tracked; ``parent`` the grid's parent run.
        sha: git SHA tagged on every run.
        log_checkpoints: also upload each cell's last checkpoint.
        fail_once: the DDSM_BENCH_FAIL_ONCE test hook (see harness/worker.py).
        reevaluate: score every finished cell again from its final checkpoint, even with the same eval hash.
        """
        self.spec, self.out, self.recorder, self.parent, self.sha = spec, out, recorder, parent, sha
        self.log_checkpoints, self.fail_once, self.reevaluate = log_checkpoints, fail_once, reevaluate
        self.results = [CellResult(cell=c) for c in cells]
        self.pending: deque[CellResult] = deque()
        self.notes: list[str] = []  # lines for the user about what start() found

    def cell_dir(self, cell: Cell) -> Path:
        """``<out>/cells/<hash>``."""
        return self.out / "cells" / cell.hash

    def start(self) -> None:
        """Mark cells finished in MLflow (same eval hash) as skipped; record finished-but-unrecorded ones; plan an
        evaluate-only attempt for cells trained already but scored another way; reuse other runs."""
        runs = self.recorder.cell_runs()
        rebuilt = 0
        for r in self.results:
            r.earlier = _launches(self.cell_dir(r.cell))
            found = runs.get(r.cell.hash)
            trained = self._trained(r)
            if found and found.status == "FINISHED":
                r.run_id = found.run_id
                if found.eval_hash == r.cell.eval_hash and not self.reevaluate:
                    r.status = "skipped"
                    r.metrics = found.metrics if found.metrics is not None else self.recorder.final_metrics(found.run_id)
                else:  # the weights are done; only how they are scored changed
                    r.mode = "evaluate" if trained else "train"
                continue
            r.run_id = found.run_id if found else None
            record = self._result(r)
            if record is None:
                continue
            if record.get("eval_hash") == r.cell.eval_hash and not self.reevaluate:
                self._open_run(r)  # trained to the end, but the driver died before recording it
                self._finish(r, record["metrics"])
                rebuilt += 1
            elif trained:
                r.mode = "evaluate"
        if rebuilt:
            self.notes.append(f"recorded {rebuilt} finished cell(s) from their result.json: the tracking store "
                              "did not have them (a driver stopped before recording them, or a new store)")
        self.pending.extend(r for r in self.results if r.status == "pending")

    def _trained(self, r: CellResult) -> bool:
        """The cell's final checkpoint is on disk (an evaluate-only attempt can score it)."""
        return (self.cell_dir(r.cell) / "checkpoints" / "last.pt").is_file()

    def _result(self, r: CellResult) -> dict[str, Any] | None:
        """The cell's ``result.json`` (metrics and the eval hash they were scored with), if an attempt finished."""
        path = self.cell_dir(r.cell) / RESULT_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def next_job(self) -> Job | None:
        """The next pending cell (a retry first), its run opened and tagged."""
        if not self.pending:
            return None
        r = self.pending.popleft()
        evaluating = r.mode == "evaluate"
        status = "evaluating" if evaluating else "running"
        # training launches are counted over every invocation; an evaluate-only launch keeps that count
        tags = {Tag.STATUS: status} if evaluating else {Tag.ATTEMPTS: r.launches + 1, Tag.STATUS: status}
        if r.run_id is None or (r.attempts == 0 and r.evaluations == 0):
            self._open_run(r, tags)
        else:
            self.recorder.set_tags(r.run_id, tags)
        if evaluating:
            r.evaluations += 1
        else:
            r.attempts += 1
        r.status, r.started, r.step, r.node_id = status, time.time(), 0, ""
        payload = TrialPayload(key=r.cell.hash, cell_hash=r.cell.hash, name=r.cell.name, config=to_dict(r.cell.config),
                               cell_dir=str(self.cell_dir(r.cell)), attempt=r.evaluations if evaluating else r.launches,
                               fail_once=self.fail_once, mode=r.mode, eval_hash=r.cell.eval_hash,
                               figures=self.spec.figures or None)
        return Job(payload=payload, owner=r)

    def queued(self) -> int:
        """The cells (and retries) not launched yet."""
        return len(self.pending)

    def on_event(self, job: Job, event: Event, *, final: bool) -> bool:
        """Progress rows and MLflow; a grid never stops a cell early."""
        r: CellResult = job.owner
        r.step = max(r.step, event.step)
        if event.kind == "start":
            r.device, r.node_id = event.info.get("device", ""), event.info.get("node_id", "")
        elif event.kind == "eval" and "miou" in event.metrics:
            r.last_miou = event.metrics["miou"]
        record_event(self.recorder, r.run_id, event)
        return False

    def on_outcome(self, job: Job, outcome: TrialOutcome) -> None:
        """Record a finished attempt, or its failure; queue a retry when the class allows one."""
        r: CellResult = job.owner
        r.elapsed += time.time() - (r.started or time.time())
        self._outcome_line(r, job, outcome.status, outcome.failure_class, outcome.error)
        if outcome.finished:
            self._finish(r, outcome.metrics)
            return
        cls = outcome.failure_class
        r.failures.append(cls)
        (self.cell_dir(r.cell) / "error.txt").write_text(outcome.traceback or outcome.error)
        launches = r.evaluations if r.mode == "evaluate" else r.attempts
        retry = cls in self.spec.retry_on and cls not in NEVER_RETRIED and launches <= self.spec.max_failures
        self.recorder.set_tags(r.run_id, {Tag.FAILURES: ",".join(r.failures), Tag.FAILURE_CLASS: cls,
                                          Tag.LAST_ERROR: outcome.error[:500]})
        if retry:
            r.status = "retrying"
            self.pending.appendleft(r)
            return
        r.status = "failed"
        self.recorder.end_run(r.run_id, status="FAILED", tags={Tag.STATUS: "failed"}, artifacts=self._artifacts(r))

    def on_interrupted(self, job: Job) -> None:
        """Mark the cell's run KILLED (re-running the grid resumes it from its checkpoint)."""
        r: CellResult = job.owner
        r.elapsed += time.time() - (r.started or time.time())
        self._outcome_line(r, job, "interrupted", "killed", "the driver stopped (re-run to resume)")
        self._kill(r)

    def on_stop(self) -> None:
        """Cells waiting for a retry have an open run: mark it KILLED too."""
        for r in self.pending:
            if r.status == "retrying":
                self._kill(r)

    def _outcome_line(self, r: CellResult, job: Job, status: str, failure_class: str, error: str) -> None:
        """One line in the cell's outcomes.jsonl: how this attempt ended, and on which node."""
        node = r.node_id or _node_in(error)
        append_jsonl(self.cell_dir(r.cell) / OUTCOMES_FILE, {
            "attempt": job.attempt, "time": time.time(), "status": status, "failure_class": failure_class,
            "node_id": node, "error": error[:500]})

    def _kill(self, r: CellResult) -> None:
        r.status = "killed"
        self.recorder.end_run(r.run_id, status="KILLED", tags={Tag.STATUS: "killed", Tag.FAILURE_CLASS: "killed"})

    def _open_run(self, r: CellResult, extra: dict[str, Any] | None = None) -> None:
        """Create (or reopen) the child run of a cell: params are what trains the weights (never change), the
        evaluation fields are tags (a re-evaluation changes them), plus the ``extra`` tags."""
        cell = r.cell
        r.run_id = self.recorder.start_run(
            name=cell.name, parent_id=self.parent, cell_hash=cell.hash, reuse=r.run_id,
            params=train_params(cell.config),
            tags={Tag.SEED: cell.seed, Tag.VARIANT: cell.variant, Tag.BASELINE: cell.baseline,
                  Tag.REFERENCE: cell.reference or "", Tag.GIT_SHA: self.sha, Tag.SPEC: self.spec.source,
                  Tag.FAILURE_CLASS: "none", Tag.CELL_DIR: str(self.cell_dir(cell)), **eval_fields(cell.config),
                  **(extra or {})})

    def _finish(self, r: CellResult, metrics: dict[str, float]) -> None:
        """Record the final scores (timed costs as ``trial_*`` diagnostics) under the cell's eval hash."""
        metrics = diagnostic(metrics)
        r.status, r.metrics = "finished", metrics
        self.recorder.log_metrics(r.run_id, metrics, step=r.cell.config.train.steps)
        tags = {Tag.STATUS: "finished", Tag.FAILURE_CLASS: "none", Tag.ELAPSED_S: round(r.elapsed, 1),
                Tag.EVAL_HASH: r.cell.eval_hash, Tag.EVAL_METRICS: sorted(k for k in metrics if is_accuracy(k)),
                **eval_fields(r.cell.config)}
        if r.mode != "evaluate" or r.failures:  # an evaluate-only launch keeps what the training recorded
            tags.update({Tag.FAILURES: ",".join(r.failures), Tag.ATTEMPTS: r.launches})
        self.recorder.end_run(r.run_id, status="FINISHED", artifacts=self._artifacts(r), tags=tags)

    def _artifacts(self, r: CellResult) -> list[tuple[Path, str | None]]:
        return cell_artifacts(self.cell_dir(r.cell), checkpoint=self.log_checkpoints)


def _launches(cell_dir: Path) -> int:
    """Launches recorded in a cell's attempts.jsonl (one line per launch, every invocation)."""
    path = cell_dir / "attempts.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _node_in(error: str) -> str:
    """The node id a Ray error message names ("... node <id>)"), else ""."""
    m = re.search(r"node (?:ID: )?([0-9a-f]{16,})", error)
    return m.group(1) if m else ""


def write_grid_json(path: Path, spec: GridSpec, cells: list[Cell]) -> None:
    """The planned cells (the report shows those that never ran); logged on the parent run at the end."""
    write_json(path, {"name": spec.name, "source": spec.source, "baseline": spec.baseline, "smoke": spec.mode.smoke,
                      "hash_version": HASH_VERSION,
                      "cells": [{"hash": c.hash, "eval_hash": c.eval_hash, "name": c.name, "variant": c.variant,
                                 "seed": c.seed, "baseline": c.baseline, "reference": c.reference} for c in cells]})


def check_out_dir(out: Path) -> None:
    """Refuse an out dir written with another cell-hash scheme (its cells would all look new and retrain)."""
    path = out / "grid.json"
    if not path.is_file():
        return
    try:
        version = json.loads(path.read_text()).get("hash_version", 1)
    except (ValueError, AttributeError):
        raise ConfigError(f"--out {str(out)!r} holds a grid.json that is not valid JSON: expected the grid.json "
                          "ddsm-bench run writes (use another --out)") from None
    if version != HASH_VERSION:
        raise ConfigError(f"--out {str(out)!r} was written by an older ddsm-bench (cell hash version {version}, this one "
                          f"writes {HASH_VERSION}: a train hash plus an eval hash): resuming it would train every cell "
                          "again under new hashes; use a new --out (the old results stay readable by ddsm-bench report)")


def run_grid(spec: GridSpec | str | Path, *, out_dir: str | Path, address: str | None = None,
             tracking_uri: str | None = None, max_concurrent: int | None = None, smoke: bool = False,
             log_checkpoints: bool = False, reevaluate: bool = False, tracking_outage_s: float | None = None,
             artifact_location: str | None = None, dashboard: bool = False, console: Any = None,
             measure_cost: Any = None, train_fn: Callable[..., dict] | None = None,
             fresh_workers: bool = True) -> GridSummary:
    """Run every cell of a grid on Ray, tracked in MLflow, resuming an earlier run in ``out_dir``.

    Args:
        spec: a GridSpec (its mode as loaded) or the path of a spec file.
        out_dir: where cells, checkpoints and (by default) the MLflow store live; locked while the grid runs.
        address: a Ray cluster to join (None: start a local instance, or reuse an initialised one); with
            an address, dataset folders are not checked here (they must exist on the workers).
        tracking_uri: MLflow tracking URI (None: ``sqlite:///<out>/mlflow.db``).
        max_concurrent: trials in flight at once (None: as many as the cluster's resources allow).
        smoke: run the spec under --smoke (see :data:`harness.spec.SMOKE_OVERRIDES`).
        log_checkpoints: also upload each cell's last checkpoint as an MLflow artifact.
        reevaluate: score every finished cell again from its final checkpoint (``--reevaluate``); cells whose
            eval hash changed are re-evaluated anyway.
        tracking_outage_s: how long the tracking store may stay unreachable before the driver stops
            (None: the spec's ``tracking_outage_s``).
        artifact_location: where a new experiment keeps its artifacts (default ``<out>/mlartifacts``, or
            the server's default for an http(s) tracking URI).
        dashboard: start the Ray dashboard with a local instance (its URL is printed).
        console: a rich Console for the live table and the summary (None: stderr and stdout).
        measure_cost: ``task -> record`` for the cost phase (None: :func:`harness.cost.measure` alone on its
            device through :func:`harness.ray_backend.run_isolated`); tests pass a fake.
        train_fn, fresh_workers: the trial seam (:class:`harness.ray_backend.RayLauncher`): what trains
            inside each trial (default the engine) and whether each trial gets a fresh worker process.

    Raises:
        ConfigError: bad spec, ``--out`` (or held by another driver, or written with another hash version),
            unreachable tracking store or cluster, unschedulable resources or unshared storage; nothing was
            launched.
        TrackingLost: the tracking store went away while the grid was being opened.
    """
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    spec = spec.with_mode(smoke=smoke or spec.mode.smoke, check_paths=spec.mode.check_paths and address is None)
    cells = expand(spec)
    res = spec.trial_resources
    out_path = Path(out_dir).resolve()
    check_out_dir(out_path)
    say = view.line_printer(console)
    preflight(tracking_uri=tracking_uri, out=out_path)
    with claim_out(out_path, command=f"ddsm-bench run {spec.source}", say=say):
        with store_while_ray_starts(tracking_uri=tracking_uri, out=out_path, experiment=spec.experiment,
                                    artifact_location=artifact_location) as store, \
                cluster(address=address, resources=res, out=out_path, dashboard=dashboard) as connection:
            outage_s = spec.tracking_outage_s if tracking_outage_s is None else tracking_outage_s
            recorder = open_recorder(tracking_uri=tracking_uri, out=out_path, experiment=spec.experiment, say=say,
                                     outage_s=outage_s, artifact_location=artifact_location, prepared=store,
                                     id_wait_s=0.0)  # run ids stay inside this session: never wait on the store
            print_where_to_look(recorder, connection, console=view.stdout_console(console),
                                artifact_location=artifact_location)
            stop = None
            cost: dict[str, dict[str, Any]] = {}
            try:
                write_grid_json(out_path / "grid.json", spec, cells)
                sha = git_sha()
                parent = recorder.start_parent(
                    key=grid_hash([c.hash for c in cells]), name=spec.name,
                    tags={Tag.SPEC: spec.source, Tag.GIT_SHA: sha, Tag.SMOKE: spec.mode.smoke,
                          Tag.BASELINE: spec.baseline, Tag.DESCRIPTION: spec.description,
                          Tag.FIGURES: json.dumps(spec.figures)},
                    params={"cells": len(cells), "seeds": spec.seeds, "max_failures": spec.max_failures,
                            "retry_on": spec.retry_on,
                            **{f"resources.{k}": v for k, v in dataclasses.asdict(res).items()}})
                policy = GridPolicy(spec=spec, cells=cells, out=out_path, recorder=recorder, parent=parent, sha=sha,
                                    log_checkpoints=log_checkpoints, fail_once=os.environ.get(FAIL_ONCE_ENV),
                                    reevaluate=reevaluate)
                # the report's imports load while the driver waits on the trials (~1.2 s less at the end)
                with view.ProgressBoard(policy.results, console=console) as board, imports_in_background(REPORT_MODULE):
                    stop = run_policy(policy, resources=res, recorder=recorder, console=board,
                                      limit=max_concurrent or default_concurrency(res), train_fn=train_fn,
                                      fresh_workers=fresh_workers)
                for note in policy.notes:
                    say(note)
                if not stop and spec.cost.enabled:
                    try:
                        cost = _cost_phase(spec, policy, recorder=recorder, parent=parent, measure=measure_cost,
                                           console=console)
                    except KeyboardInterrupt:
                        stop.set()
                recorder.log_artifact(parent, out_path / "grid.json")  # lets the report show cells never run
                recorder.end_run(parent, status="KILLED" if stop else
                                 ("FINISHED" if all(r.done for r in policy.results) else "FAILED"))
            finally:
                journaled = close_recorder(recorder, stop)
            summary = GridSummary(spec=spec, out_dir=out_path, tracking_uri=recorder.tracking_uri,
                                  experiment_id=recorder.experiment_id, parent_run_id=parent, results=policy.results,
                                  interrupted=bool(stop), cost=cost, stop_reason=stop.reason,
                                  stop_message=stop.message, journaled=journaled)
            view.print_grid_summary(summary, console=console)
        if not stop:  # after Ray's shutdown (when this session started it): its processes stop competing
            _write_report(summary, console=console)
        return summary


def _cost_phase(spec: GridSpec, policy: GridPolicy, *, recorder: Recorder, parent: str, measure: Any,
                console: Any) -> dict[str, dict[str, Any]]:
    """Measure every variant with a finished cell once, alone on its device; record it (see harness/cost.py)."""
    from harness import cost as costs

    done = [r for r in policy.results if r.done]
    if not done:
        return {}
    settings = spec.cost_settings
    if measure is None:
        from harness import ray_backend

        def measure(task: costs.CostTask) -> dict[str, Any]:
            return ray_backend.run_isolated(costs.measure, task, gpu=task.device == "cuda", threads=task.threads)

    records = costs.run_cost_phase(costs.plan([r.cell for r in done], settings), out=policy.out, run=measure,
                                   log=view.stderr_line(console))
    for r in done:
        metrics = costs.cost_metrics(records.get(r.cell.variant, {"error": "not measured"}))
        if metrics and any(r.metrics.get(k) != v for k, v in metrics.items()):  # not recorded yet
            recorder.log_metrics(r.run_id, metrics, step=r.cell.config.train.steps)
            recorder.set_tags(r.run_id, {Tag.COST_SOURCE: f"isolated:{records[r.cell.variant]['key']}"})
            r.metrics = {**r.metrics, **metrics}
    recorder.flush()
    path = policy.out / "cost" / "cost.json"
    write_json(path, {"protocol": costs.describe(settings, records), "variants": records})
    recorder.set_tags(parent, {Tag.COST_PHASE: costs.describe(settings, records)})
    recorder.log_artifact(parent, path)
    return records


def _write_report(summary: GridSummary, *, console: Any) -> None:
    """Write the paper tables and figures of the grid to <out>/report (a failure there never fails the grid)."""
    try:
        paths = write_report_from_mlflow(summary.tracking_uri, parent_run_id=summary.parent_run_id,
                                         out_dir=summary.out_dir / "report", baseline=summary.spec.baseline)
    except Exception as e:  # the grid's results are already safe in MLflow; say why the report is missing
        view.print_report_written(summary, None, e, console=console)
        return
    view.print_report_written(summary, paths, None, console=console)
