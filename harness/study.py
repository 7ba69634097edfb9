"""``ddsm-bench tune``: a study's policy (Optuna ask/tell, pruning, re-queue) and :func:`run_study`.

How a study runs. The policy asks Optuna for a trial, samples the search space define-by-run
(:meth:`harness.tune_spec.SearchSpace.suggest`), resolves its TrialConfig and launches it as the same
trial a grid cell is (:mod:`harness.worker` on :mod:`harness.ray_backend`: a fresh worker process
with the spec's resources, or a DDP TorchTrainer), at most ``concurrency`` at once, until ``budget``
trials reached a verdict. Every validation the trial reports becomes ``trial.report(value, step)``
and, with pruning on, ``should_prune()``; a pruned trial is stopped. Finished trials are told
COMPLETE with their final objective values, failed ones FAIL (``failure_class`` user attr), pruned
ones PRUNED. The driver is the only writer of the Optuna storage and of MLflow (one child run per
trial under the study's parent run, tagged ``optuna_trial`` and ``optuna_state``).

Why ask/tell instead of Ray Tune's ``OptunaSearch`` (checked in ray 2.60,
``ray/tune/search/optuna/optuna_search.py``): it does take a storage and continues a study
(``load_if_exists=True``), but (1) it creates the study with ``NopPruner``, so Optuna's pruners cannot
be used; (2) a trial stopped by a Tune scheduler (ASHA) is told COMPLETE with its last intermediate
value, so a pruned trial enters TPE's history as a finished one and is never recorded PRUNED; (3)
trials running at Ctrl-C are never told and stay RUNNING in the storage; (4) trials would run on a
second scheduling path (Tune actors; DDP through a TorchTrainer nested in a Tune function under Ray
Train V2) instead of the tasks ``ddsm-bench run`` uses. Optuna's SuccessiveHalvingPruner is ASHA.
Multi-objective studies (NSGA-II by default) are never pruned: Optuna's pruners compare one
intermediate value per step, and ``Trial.report`` is single-objective only.

Ctrl-C (or SIGTERM) records every finished trial, marks the running ones FAIL (user attr
``interrupted``) and re-queues their parameters, so the next run tries them first and resumes them
from their last checkpoint; a driver that died without cleaning up leaves RUNNING trials, which the
next run treats the same way. A trial whose worker was killed is re-queued once the same way.

Outputs in ``<out>`` (:func:`harness.optuna_study.write_outputs`): ``study.db``, ``trials/<number>/``
(each trial's cell folder), ``trials.csv``, plots, ``best.yaml``, ``study.json``.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddsm.config import ConfigError, TrialConfig, to_dict
from harness import console as view
from harness.cells import cell_hash, eval_fields, eval_hash, train_params
from harness.driver import Event, Job, Policy, Recorder, TrialOutcome, TrialPayload
from harness.mlflow_io import Tag, record_event
from harness.optuna_study import StudyBook, count_finished, open_study, states, summary, write_outputs
from harness.secrets import redact
from harness.session import (claim_out, close_recorder, cluster, default_concurrency, git_sha, open_recorder,
                             preflight, print_where_to_look, run_policy, stop_exit_code, store_while_ray_starts)
from harness.tune_spec import TuneSpec, load_tune_spec
from harness.worker import FAIL_ONCE_ENV, cell_artifacts

__all__ = ["StudyPolicy", "StudySummary", "run_study", "study_split_tags"]


@dataclass
class StudySummary:
    """The outcome of :func:`run_study`."""

    spec: TuneSpec
    out_dir: Path
    study_name: str
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    states: dict[str, int]  # Optuna state name -> trials in the study (all sessions)
    finished: int  # trials counted against the budget
    budget: int
    outputs: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False
    stop_reason: str | None = None  # signal | tracking | cluster (see harness.driver.StopFlag)
    stop_message: str = ""
    journaled: int = 0  # tracking writes left in <out>/tracking-journal.json for the next run

    @property
    def exit_code(self) -> int:
        """:mod:`harness.exit_codes`: 3 tracking store lost, 4 cluster lost, 130 interrupted, 1 no trial completed,
        0 otherwise (failed trials are part of a search)."""
        return stop_exit_code(self, ok=bool(self.states.get("COMPLETE", 0)))


@dataclass(eq=False)
class _Trial:
    """A trial in flight."""

    trial: Any  # optuna.Trial
    params: dict[str, Any]
    config: TrialConfig
    run_id: str
    reported: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.time)

    @property
    def dir(self) -> Path:
        """The trial's cell folder (a re-queued trial keeps the folder of the one it resumes)."""
        return Path(self.trial.user_attrs.get("trial_dir", ""))


class StudyPolicy(Policy):
    """The study's decisions: ask, launch, report and prune, tell, re-queue (see the module docstring)."""

    def __init__(self, *, spec: TuneSpec, book: StudyBook, recorder: Recorder, parent: str, out: Path, sha: str,
                 budget: int, limit: int, log: view.StudyLog, fail_once: str | None = None) -> None:
        """Args:
        spec: the tune spec (its mode as run).
        book: the Optuna study.
        recorder: where runs are tracked; ``parent`` the study's parent run.
        out: the out dir (trial folders under ``trials/``).
        sha: git SHA tagged on every run.
        budget: trials that must reach a verdict (all sessions together); ``limit``: at once.
        log: where progress lines go.
        fail_once: the DDSM_BENCH_FAIL_ONCE test hook (see harness/worker.py).
        """
        self.spec, self.search, self.book, self.recorder, self.parent = spec, spec.search, book, recorder, parent
        self.out, self.sha, self.budget, self.limit, self.log, self.fail_once = out, sha, budget, limit, log, fail_once
        self.running: set[str] = set()
        self.finished = 0

    # ------------------------------------------------------------------ before launching

    def start(self) -> None:
        """Trials left RUNNING by a driver that died: tell FAIL, close their runs, re-queue them; enqueue
        ``search.enqueue``."""
        for t in self.book.stale():
            self.book.tell_stale(t.number)
            self.book.requeue(t.number, t.params, t.user_attrs.get("trial_dir"))
            if t.user_attrs.get("mlflow_run_id"):
                self.recorder.end_run(t.user_attrs["mlflow_run_id"], status="KILLED", tags={
                    Tag.OPTUNA_STATE: "FAIL", Tag.FAILURE_CLASS: "killed", Tag.STATUS: "killed"})
            self.log.line(f"trial {t.number} was left running by an earlier driver: marked FAIL, re-queued")
        for params in self.search.enqueue:
            self.book.enqueue(params)
        self.finished = self.log.done = self.book.count_finished()
        self.log.budget = self.budget
        self.log.line(f"study {self.book.name}: {self.finished}/{self.budget} trials done, up to {self.limit} at once")

    # ------------------------------------------------------------------ the loop

    def queued(self) -> int:
        """The trials of the budget not asked for yet."""
        return max(0, self.budget - self.finished - len(self.running))

    def next_job(self) -> Job | None:
        """Ask for trials until one resolves to a runnable config (or the budget is covered)."""
        while self.finished + len(self.running) < self.budget:
            trial = self.book.ask()
            params = self.search.suggest(trial)
            trial_dir = Path(trial.user_attrs.get("trial_dir") or self.out / "trials" / f"{trial.number:04d}")
            trial.set_user_attr("trial_dir", str(trial_dir))
            try:
                cfg = self.spec.trial_config(params)
            except ConfigError as e:  # valid values whose combination is not a valid config
                run_id = self.recorder.start_run(name=f"trial {trial.number}", parent_id=self.parent, cell_hash="",
                                                 params={f"search.{k}": v for k, v in params.items()},
                                                 tags=self._tags(trial, params))
                self._fail(_Trial(trial, params, None, run_id), "error", str(e), artifacts=False)
                continue
            h = cell_hash(cfg, world_size=self.spec.trial_resources.num_workers)
            run_id = self.recorder.start_run(name=f"trial {trial.number}", parent_id=self.parent, cell_hash=h,
                                             params=train_params(cfg),
                                             tags={**self._tags(trial, params), **eval_fields(cfg)})
            trial.set_user_attr("mlflow_run_id", run_id)
            key = f"trial{trial.number:04d}"
            self.running.add(key)
            self.log.line(f"trial {trial.number} started: {view.format_params(params)}")
            payload = TrialPayload(key=key, cell_hash=h, name=f"trial {trial.number}", config=to_dict(cfg),
                                   cell_dir=str(trial_dir), attempt=1, fail_once=self.fail_once,
                                   eval_hash=eval_hash(cfg))
            return Job(payload=payload, owner=_Trial(trial, params, cfg, run_id))
        return None

    def _tags(self, trial: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {Tag.OPTUNA_TRIAL: trial.number, Tag.OPTUNA_STATE: "RUNNING", Tag.STUDY: self.book.name,
                Tag.OPTUNA_PARAMS: params, Tag.SEED: self.spec.seed, Tag.VARIANT: f"trial{trial.number}",
                Tag.GIT_SHA: self.sha, Tag.SPEC: self.spec.source, Tag.FAILURE_CLASS: "none",
                Tag.REQUEUED_FROM: trial.user_attrs.get("requeued_from", "")}

    def on_event(self, job: Job, event: Event, *, final: bool) -> bool:
        """Metrics to MLflow; a validation is reported to Optuna and may prune (not once the trial ended)."""
        t: _Trial = job.owner
        record_event(self.recorder, t.run_id, event)
        if event.kind != "eval":
            return False
        metric = self.search.metrics[0]
        if self.search.multi or metric not in event.metrics or event.step in t.reported:
            return False
        self.book.report(t.trial, event.metrics[metric], event.step)
        t.reported.add(event.step)
        prune = (not final and self.search.pruning and event.step < t.config.train.steps
                 and self.book.should_prune(t.trial))
        if prune:
            self._prune(job, event.step, event.metrics[metric])
        return prune

    def _prune(self, job: Job, step: int, value: float) -> None:
        """Tell PRUNED, close the MLflow run (the driver stops the attempt)."""
        t: _Trial = job.owner
        self.running.discard(job.key)
        self.book.prune(t.trial, step)
        self._count(1)
        self.recorder.end_run(t.run_id, status="KILLED", artifacts=cell_artifacts(t.dir), tags={
            Tag.OPTUNA_STATE: "PRUNED", Tag.STATUS: "pruned", Tag.PRUNED_AT_STEP: step})
        self.log.line(f"trial {t.trial.number} PRUNED at step {step} ({self.search.metrics[0]} {value:.4f})")

    def on_outcome(self, job: Job, outcome: TrialOutcome) -> None:
        """Tell Optuna how the trial ended; re-queue (once) a trial whose worker was killed."""
        t: _Trial = job.owner
        self.running.discard(job.key)
        if outcome.finished:
            self._complete(t, outcome.metrics)
            return
        requeue = outcome.failure_class == "killed" and "requeued_from" not in t.trial.user_attrs
        if requeue:
            self.book.requeue(t.trial.number, t.params, t.trial.user_attrs.get("trial_dir"))
        self._fail(t, outcome.failure_class, outcome.error, counts=not requeue, interrupted=requeue)

    def on_interrupted(self, job: Job) -> None:
        """Tell FAIL (interrupted), re-queue it to resume from its checkpoint, mark its run KILLED."""
        t: _Trial = job.owner
        self.running.discard(job.key)
        self.book.fail(t.trial, failure_class="killed", interrupted=True)
        self.book.requeue(t.trial.number, t.params, t.trial.user_attrs.get("trial_dir"))
        self.recorder.end_run(t.run_id, status="KILLED", tags={
            Tag.OPTUNA_STATE: "FAIL", Tag.STATUS: "killed", Tag.FAILURE_CLASS: "killed"})
        self.log.line(f"trial {t.trial.number} interrupted: marked FAIL and re-queued")

    def on_stop(self) -> None:
        """Say what the interruption kept."""
        self.log.line("interrupted: finished trials are recorded, running ones re-queued (re-run to continue)")

    # ------------------------------------------------------------------ verdicts

    def _complete(self, t: _Trial, metrics: dict[str, float]) -> None:
        """Tell COMPLETE with the final objective values (FAIL if one is missing or not finite)."""
        values = [metrics.get(m) for m in self.search.metrics]
        bad = [m for m, v in zip(self.search.metrics, values) if v is None or not math.isfinite(v)]
        if bad:
            why = f"objective {', '.join(bad)} missing or not finite {metrics.get('cost_error', '')}".strip()
            self._fail(t, "error", why)
            return
        self.book.complete(t.trial, values)
        self._count(1)
        self.recorder.log_metrics(t.run_id, metrics, step=t.config.train.steps)
        self.recorder.end_run(t.run_id, status="FINISHED", artifacts=cell_artifacts(t.dir), tags={
            Tag.OPTUNA_STATE: "COMPLETE", Tag.STATUS: "finished", Tag.ELAPSED_S: round(time.time() - t.started, 1)})
        text = ", ".join(f"{m} {v:.4f}" for m, v in zip(self.search.metrics, values))
        self.log.line(f"trial {t.trial.number} COMPLETE: {text}")

    def _fail(self, t: _Trial, failure_class: str, error: str, *, counts: bool = True, interrupted: bool = False,
              artifacts: bool = True) -> None:
        """Tell FAIL with the failure class; ``counts``: whether it uses up budget (not when re-queued)."""
        self.book.fail(t.trial, failure_class=failure_class, error=error, interrupted=interrupted)
        self._count(int(counts))
        if artifacts and error:
            (t.dir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
            (t.dir / "error.txt").write_text(error)
        self.recorder.end_run(t.run_id, status="KILLED" if failure_class == "killed" else "FAILED",
                              artifacts=cell_artifacts(t.dir) if artifacts else [],
                              tags={Tag.OPTUNA_STATE: "FAIL", Tag.STATUS: "failed", Tag.FAILURE_CLASS: failure_class,
                                    Tag.LAST_ERROR: error[:500]})
        first = error.splitlines()[0] if error else ""
        self.log.line(f"trial {t.trial.number} FAIL ({failure_class}){': ' + first if first else ''}")

    def _count(self, n: int) -> None:
        self.finished += n
        self.log.done = self.finished


def run_study(spec: TuneSpec | str | Path, *, out_dir: str | Path, address: str | None = None,
              tracking_uri: str | None = None, max_concurrent: int | None = None, smoke: bool = False,
              n_trials: int | None = None, tracking_outage_s: float | None = None,
              artifact_location: str | None = None, dashboard: bool = False,
              console: Any = None, train_fn: Any = None, fresh_workers: bool = True) -> StudySummary:
    """Run (or continue) the study of a tune spec until its budget of trials reached a verdict.

    Args:
        spec: a TuneSpec (its mode as loaded) or the path of a tune spec file.
        out_dir: trials, study storage (by default), MLflow store (by default) and outputs.
        address: a Ray cluster to join (None: start a local instance, or reuse an initialised one).
        tracking_uri: MLflow tracking URI (None: ``sqlite:///<out>/mlflow.db``).
        max_concurrent: trials in flight at once (None: ``search.concurrency``, else what the cluster fits).
        smoke: run under --smoke: a few steps on tiny inputs and the ``search.smoke_trials`` budget, in
            study ``<name>-smoke``.
        n_trials: overrides the budget (``search.n_trials``, or ``search.smoke_trials`` under smoke).
        tracking_outage_s: how long the tracking store may stay unreachable before the driver stops
            (None: the spec's ``tracking_outage_s``).
        artifact_location: where a new experiment keeps its artifacts (see :func:`harness.grid.run_grid`).
        dashboard: start the Ray dashboard with a local instance (its URL is printed).
        train_fn, fresh_workers: the trial seam (:class:`harness.ray_backend.RayLauncher`).
        console: a rich Console for progress lines (None: stderr).

    Raises:
        ConfigError: bad spec, data, resources or storage, or a stored study made for another search;
            nothing was launched.
    """
    from rich.console import Console

    if isinstance(spec, (str, Path)):
        spec = load_tune_spec(spec)
    spec = spec.with_mode(smoke=smoke or spec.mode.smoke, check_paths=spec.mode.check_paths and address is None)
    console = console or Console(stderr=True)
    out = Path(out_dir).resolve()
    base = spec.base_config
    _check_pruning(spec, base)
    res = spec.trial_resources
    budget = spec.budget(n_trials)
    say = view.line_printer(console)
    storage = spec.search.storage or f"sqlite:///{out / 'study.db'}"
    preflight(tracking_uri=tracking_uri, out=out, storage=storage)
    with claim_out(out, command=f"ddsm-bench tune {spec.source}", say=say), \
            store_while_ray_starts(tracking_uri=tracking_uri, out=out, experiment=spec.experiment,
                                   artifact_location=artifact_location) as store, \
            cluster(address=address, resources=res, out=out, dashboard=dashboard) as connection:
        name = spec.study_name
        study = open_study(spec, storage=storage, study_name=name, rung_step=base.train.val_every,
                           total_steps=base.train.steps)
        recorder = open_recorder(tracking_uri=tracking_uri, out=out, experiment=spec.experiment, say=say,
                                 outage_s=spec.tracking_outage_s if tracking_outage_s is None else tracking_outage_s,
                                 artifact_location=artifact_location, prepared=store)
        print_where_to_look(recorder, connection, console=console, storage=storage,
                            artifact_location=artifact_location)
        stop = None
        try:
            sha = git_sha()
            search = spec.search
            log = view.StudyLog(console)
            if spec.leaks:
                log.line(spec.split_note())
            parent = recorder.start_parent(
                key=hashlib.sha256(f"{storage}|{name}".encode()).hexdigest()[:12], name=name,
                tags={Tag.MODE: "tune", Tag.STUDY: name, Tag.STORAGE: redact(storage), Tag.SPEC: spec.source,
                      Tag.GIT_SHA: sha, Tag.SMOKE: spec.mode.smoke, **study_split_tags(spec)},
                params={"objectives": search.metrics, "directions": search.directions, "sampler": search.sampler,
                        "pruner": search.pruner if search.pruning else "none",
                        "space": {p.name: p.describe() for p in search.params}})
            limit = max_concurrent or search.concurrency or default_concurrency(res)
            policy = StudyPolicy(spec=spec, book=StudyBook(study), recorder=recorder, parent=parent, out=out,
                                 sha=sha, budget=budget, limit=limit, log=log,
                                 fail_once=os.environ.get(FAIL_ONCE_ENV))
            stop = run_policy(policy, resources=res, recorder=recorder, console=policy.log, limit=limit,
                              train_fn=train_fn, fresh_workers=fresh_workers)
            outputs = write_outputs(study, spec, out)
            recorder.end_run(parent, status="KILLED" if stop else "FINISHED",
                             tags={Tag.N_FINISHED: count_finished(study)},
                             artifacts=[(p, "study") for p in outputs.values()])
        finally:
            journaled = close_recorder(recorder, stop)
        result = StudySummary(spec=spec, out_dir=out, study_name=name, storage=storage,
                              tracking_uri=recorder.tracking_uri, experiment_id=recorder.experiment_id,
                              parent_run_id=parent, states=states(study), finished=count_finished(study),
                              budget=budget, outputs=outputs, interrupted=bool(stop), stop_reason=stop.reason,
                              stop_message=stop.message, journaled=journaled)
        view.print_study_summary(result, summary(study, spec)["best"], console)
        return result


def study_split_tags(spec: TuneSpec) -> dict[str, Any]:
    """The parent run's provenance of splits: the objective split, the confirm split, a leak (with its warning)."""
    tags: dict[str, Any] = {Tag.OBJECTIVE_SPLIT: spec.objective_split, Tag.CONFIRM_SPLIT: spec.search.confirm_split,
                            Tag.DESCRIPTION: "; ".join(t for t in (spec.description, spec.split_note()) if t)}
    if spec.leaks:
        tags[Tag.SPLIT_LEAK] = spec.split_note()
    return tags


def _check_pruning(spec: TuneSpec, cfg: TrialConfig) -> None:
    """Pruning needs validations before the end: ``0 < train.val_every < train.steps``."""
    if spec.search.pruning and not 0 < cfg.train.val_every < cfg.train.steps:
        where = " under --smoke (set it in the spec's smoke section)" if spec.mode.smoke else ""
        raise ConfigError(f"train.val_every={cfg.train.val_every} with train.steps={cfg.train.steps}{where}: pruning "
                          "needs validations during training; expected 0 < val_every < steps, or search.pruning: false")
