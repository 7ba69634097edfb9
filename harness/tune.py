"""The study driver of ``ddsm-bench tune``: Optuna ask/tell on the driver, each trial a Ray task.

Read top to bottom: opening (or continuing) the persistent study, the driver loop (:class:`_Driver`:
ask -> launch -> report/prune -> tell), then the outputs written to the out dir.

How a study runs. The driver asks Optuna for a trial, samples the search space define-by-run
(:meth:`SearchSpace.suggest`), resolves the TrialConfig and launches it as the same Ray task a grid
cell uses (:mod:`harness.ray_runner`: one fresh worker process with the spec's resources, or a DDP
TorchTrainer), at most ``concurrency`` at once. The trial's engine callback puts every validation on
a Ray queue; the driver calls ``trial.report(value, step)`` and, with pruning on, ``should_prune()``,
and cancels a pruned trial's task. Finished trials are told COMPLETE with their final objective
values, failed ones FAIL (``failure_class`` user attr), pruned ones PRUNED. The driver is the only
writer of the Optuna storage and of MLflow (one child run per trial under the study's parent run,
tagged ``optuna_trial`` and ``optuna_state``).

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

Persistence and budget. The study lives in ``search.storage`` (default ``sqlite:///<out>/study.db``;
an RDB URL on a cluster, or a ``*.log`` path for Optuna's journal file on a shared file system) under
``search.study_name`` (default the spec name, ``-smoke`` under --smoke). Re-running the same command
continues it: trial numbers go on, and the budget ``n_trials`` counts trials that reached a
verdict (COMPLETE, PRUNED, or FAIL by the trial itself). Ctrl-C (or SIGTERM) records every finished
trial, marks the running ones FAIL (user attr ``interrupted``) and re-queues their parameters, so
the next run tries them first and resumes them from their last checkpoint; a driver that died
without cleaning up leaves RUNNING trials, which the next run treats the same way. One driver per
study at a time.

Outputs in ``<out>``: ``study.db``, ``trials/<number>/`` (each trial's engine out_dir),
``trials.csv``, ``history*.png``, ``importances*.png``, ``intermediate_values.png`` (single
objective), ``pareto_front.png`` + ``pareto.csv`` (several objectives), ``best.yaml`` (a spec for
``ddsm-bench run``: the best parameters, or one baseline per Pareto point, with
``search.confirm_seeds``) and ``study.json`` (a summary).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from optuna.trial import TrialState

from ddsm.config import ConfigError, TrialConfig, to_dict
from harness.ray_runner import (TrialPayload, check_resources, check_shared_storage, connect, default_concurrency,
                                git_sha, launch_trial, ray_failure_class)
from harness.search_space import (SearchSpace, TuneSpec, build_pruner, build_sampler, load_tune_spec,
                                  resolve_trial_config, trial_overrides)
from harness.spec import Resources, cell_hash, effective_resources, flatten

__all__ = ["StudySummary", "best_spec", "count_finished", "open_storage", "open_study", "run_study", "write_outputs"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class StudySummary:
    """The outcome of :func:`run_study`."""

    spec: TuneSpec
    out_dir: Path
    study_name: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    states: dict[str, int]  # Optuna state name -> trials in the study (all sessions)
    finished: int  # trials counted against the budget
    budget: int
    outputs: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """130 interrupted, 1 no trial completed, 0 otherwise (failed trials are part of a search)."""
        if self.interrupted:
            return 130
        return 0 if self.states.get("COMPLETE", 0) else 1


# ============================================================================ the study


def open_study(spec: TuneSpec, *, storage: str, study_name: str, seed_offset: int | None = None,
               rung_step: int = 1, total_steps: int = 1) -> optuna.Study:
    """Create the study or load the stored one; raise ConfigError when it was made for another search.

    The sampler's seed is ``sampler.seed + <trials already in the study>``, so a continued study does
    not replay the random start-up points of the first session yet stays reproducible.
    """
    search = spec.search
    backend = open_storage(storage)
    if seed_offset is None:
        try:
            seed_offset = len(optuna.load_study(study_name=study_name, storage=backend).trials)
        except KeyError:  # no such study yet
            seed_offset = 0
    sampler = build_sampler(search, seed_offset=seed_offset)
    pruner = build_pruner(search, rung_step=rung_step, total_steps=total_steps)
    study = optuna.create_study(storage=backend, study_name=study_name, sampler=sampler, pruner=pruner,
                                directions=search.directions, load_if_exists=True)
    stored = [d.name.lower() for d in study.directions]
    if stored != search.directions:
        raise ConfigError(f"study {study_name!r} in {_redact(storage)} optimises {stored}, not {search.directions}: "
                          "use another --out, search.storage or search.study_name")
    fingerprint = study.user_attrs.get("search_fingerprint")
    if fingerprint is None:
        study.set_user_attr("search_fingerprint", search.fingerprint())
        study.set_user_attr("objectives", search.metrics)
        study.set_user_attr("spec", spec.source)
    elif fingerprint != search.fingerprint():
        raise ConfigError(f"study {study_name!r} in {_redact(storage)} was created with another search space "
                          "(params or objectives changed): use another --out, search.storage or search.study_name")
    return study


def open_storage(storage: str) -> Any:
    """An RDB URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``) as is; a path ending in ``.log``
    as Optuna's JournalStorage file (meant for NFS-like shared file systems where SQLite locking fails).
    """
    if storage.endswith(".log") and "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(Path(storage).resolve())))
    return storage


def count_finished(study: optuna.Study) -> int:
    """Trials counted against the budget: COMPLETE, PRUNED, and FAIL unless re-queued (interrupted)."""
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("requeued_from") for t in trials}
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in requeued) for t in trials)


# ============================================================================ running a study


def run_study(spec: TuneSpec | str | Path, *, out_dir: str | Path, address: str | None = None,
              tracking_uri: str | None = None, max_concurrent: int | None = None, smoke: bool = False,
              n_trials: int | None = None, console: Any = None) -> StudySummary:
    """Run (or continue) the study of a tune spec until ``n_trials`` trials reached a verdict.

    Args:
        spec: a TuneSpec or the path of a tune spec file.
        out_dir: trials, study storage (by default), MLflow store (by default) and outputs.
        address: a Ray cluster to join (None: start a local instance, or reuse an initialised one).
        tracking_uri: MLflow tracking URI (None: ``sqlite:///<out>/mlflow.db``).
        max_concurrent: trials in flight at once (None: ``search.concurrency``, else what the cluster fits).
        smoke: a few steps on tiny inputs and the ``search.smoke_trials`` budget, in study ``<name>-smoke``.
        n_trials: overrides the budget (``search.n_trials``, or ``search.smoke_trials`` under smoke).
        console: a rich Console for progress lines (None: stderr).

    Raises:
        ConfigError: bad spec, data, resources or storage, or a stored study made for another search;
            nothing was launched.
    """
    from rich.console import Console

    from harness.tracking import Tracker, default_tracking_uri

    spec = load_tune_spec(spec) if isinstance(spec, (str, Path)) else spec
    search = spec.search
    console = console or Console(stderr=True)
    out = Path(out_dir).resolve()
    base = resolve_trial_config(spec, {}, smoke=smoke, check_paths=address is None)
    _check_pruning(search, base, smoke=smoke)
    res = effective_resources(spec.grid, smoke=smoke)
    budget = n_trials or (search.smoke_trials if smoke else search.n_trials)
    started = connect(address)
    try:
        check_resources(res)
        check_shared_storage(out)
        out.mkdir(parents=True, exist_ok=True)
        storage = search.storage or f"sqlite:///{out / 'study.db'}"
        name = (search.study_name or spec.name) + ("-smoke" if smoke else "")
        study = open_study(spec, storage=storage, study_name=name, rung_step=base.train.val_every,
                           total_steps=base.train.steps)
        uri = tracking_uri or default_tracking_uri(out)
        tracker = Tracker(tracking_uri=uri, experiment=spec.name + ("-smoke" if smoke else ""),
                          artifact_root=None if tracking_uri else out / "mlartifacts")
        sha = git_sha()
        parent = tracker.start_grid(
            grid_hash=_study_hash(storage, name), name=name,
            tags={"mode": "tune", "study": name, "storage": _redact(storage), "spec": spec.source, "git_sha": sha,
                  "smoke": smoke},
            params={"objectives": search.metrics, "directions": search.directions, "sampler": search.sampler,
                    "pruner": search.pruner if search.pruning else "none",
                    "space": {p.name: _describe(p) for p in search.params}})
        driver = _Driver(spec=spec, study=study, tracker=tracker, parent=parent, out=out, res=res, smoke=smoke,
                         check_paths=address is None, sha=sha, console=console)
        driver.recover_stale()
        for params in search.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        limit = max_concurrent or search.concurrency or default_concurrency(res)
        with _stop_on_signals() as stop:
            try:
                interrupted = driver.loop(budget=budget, limit=limit, stop=stop)
            except KeyboardInterrupt:  # a second Ctrl-C: clean up what we can, now
                interrupted = True
            try:
                if interrupted:
                    driver.interrupt()
            finally:
                driver.close()
        outputs = write_outputs(study, spec, out)
        tracker.end_run(parent, status="KILLED" if interrupted else "FINISHED",
                        tags={"n_finished": count_finished(study)},
                        artifacts=[(p, "study") for p in outputs.values()])
        summary = StudySummary(spec=spec, out_dir=out, study_name=name, storage=storage, tracking_uri=uri,
                               parent_run_id=parent, states=_states(study), finished=count_finished(study),
                               budget=budget, outputs=outputs, interrupted=interrupted)
        _print_summary(study, summary, console)
        return summary
    finally:
        if started:
            ray.shutdown()


def _check_pruning(search: SearchSpace, cfg: TrialConfig, *, smoke: bool) -> None:
    """Pruning needs validations before the end: ``0 < train.val_every < train.steps``."""
    if search.pruning and not 0 < cfg.train.val_every < cfg.train.steps:
        where = " under --smoke (set it in the spec's smoke section)" if smoke else ""
        raise ConfigError(f"train.val_every={cfg.train.val_every} with train.steps={cfg.train.steps}{where}: pruning "
                          "needs validations during training; expected 0 < val_every < steps, or search.pruning: false")


@dataclass(eq=False)
class _Running:
    """A trial in flight."""

    trial: optuna.Trial
    params: dict[str, Any]
    config: TrialConfig
    run_id: str
    ref: Any  # the Ray task's ObjectRef
    reported: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.time)


class _Driver:
    """The driver's state for one session: the study, trials in flight, their MLflow runs."""

    def __init__(self, *, spec: TuneSpec, study: optuna.Study, tracker: Any, parent: str, out: Path, res: Resources,
                 smoke: bool, check_paths: bool, sha: str, console: Any) -> None:
        self.spec, self.search, self.study, self.tracker, self.parent = spec, spec.search, study, tracker, parent
        self.out, self.res, self.smoke, self.check_paths = out, res, smoke, check_paths
        self.sha, self.console = sha, console
        self.in_flight: dict[str, _Running] = {}  # event key -> trial
        self.queue: Any = None
        self.finished = 0
        self.budget = 0

    # ------------------------------------------------------------------ before launching

    def recover_stale(self) -> None:
        """Trials left RUNNING by a driver that died: tell FAIL, close their MLflow runs, re-queue them."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(t.number, state=TrialState.FAIL)
            self._requeue(t.number, t.params, t.user_attrs.get("trial_dir"))
            if t.user_attrs.get("mlflow_run_id"):
                self.tracker.end_run(t.user_attrs["mlflow_run_id"], status="KILLED",
                                     tags={"optuna_state": "FAIL", "failure_class": "killed", "status": "killed"})
            self._print(f"trial {t.number} was left running by an earlier driver: marked FAIL, re-queued")

    def _requeue(self, number: int, params: dict[str, Any], trial_dir: str | None) -> None:
        """Enqueue ``params`` again; the new trial resumes from ``trial_dir``'s last checkpoint."""
        attrs = {"requeued_from": number, **({"trial_dir": trial_dir} if trial_dir else {})}
        self.study.enqueue_trial(params, user_attrs=attrs)

    # ------------------------------------------------------------------ the loop

    def loop(self, *, budget: int, limit: int, stop: "_StopFlag") -> bool:
        """Launch trials (at most ``limit`` at once) until ``budget`` trials reached a verdict.

        Returns True when ``stop`` was raised (Ctrl-C / SIGTERM) before that; the caller then calls
        :meth:`interrupt`. The flag is only checked between steps, so no trial is ever half told.
        """
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.finished, self.budget = count_finished(self.study), budget
        self._print(f"study {self.study.study_name}: {self.finished}/{budget} trials done, up to {limit} at once")
        while not stop:
            while self.finished + len(self.in_flight) < budget and len(self.in_flight) < limit and not stop:
                self._launch()
            if not self.in_flight:
                return bool(stop)
            refs = {r.ref: r for r in self.in_flight.values()}
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            self._drain_events()
            for ref in ready:
                if refs[ref] in self.in_flight.values():  # not pruned while draining (identity: eq=False)
                    self._collect(refs[ref])
            self.tracker.flush()
        return True

    def _launch(self) -> None:
        """Ask for a trial, sample it, resolve its config and start its Ray task."""
        trial = self.study.ask()
        params = self.search.suggest(trial)
        trial_dir = Path(trial.user_attrs.get("trial_dir") or self.out / "trials" / f"{trial.number:04d}")
        trial.set_user_attr("trial_dir", str(trial_dir))
        try:
            cfg = resolve_trial_config(self.spec, params, smoke=self.smoke, check_paths=self.check_paths)
        except ConfigError as e:  # valid values whose combination is not a valid config
            run_id = self.tracker.start_cell(name=f"trial {trial.number}", parent_id=self.parent, cell_hash="",
                                             params={f"search.{k}": v for k, v in params.items()},
                                             tags=self._tags(trial, params))
            self._fail(trial, run_id, "error", str(e))
            return
        run_id = self.tracker.start_cell(name=f"trial {trial.number}", parent_id=self.parent,
                                         cell_hash=cell_hash(cfg, world_size=self.res.num_workers),
                                         params=flatten(to_dict(cfg)),
                                         tags=self._tags(trial, params))
        trial.set_user_attr("mlflow_run_id", run_id)
        key = f"trial{trial.number:04d}"
        payload = TrialPayload(cell_hash=key, name=f"trial {trial.number}", config=to_dict(cfg),
                               cell_dir=str(trial_dir), attempt=1)
        ref = launch_trial(payload, self.queue, self.res)
        self.in_flight[key] = _Running(trial=trial, params=params, config=cfg, run_id=run_id, ref=ref)
        self._print(f"trial {trial.number} started: {_fmt_params(params)}")

    def _tags(self, trial: optuna.Trial, params: dict[str, Any]) -> dict[str, Any]:
        return {"optuna_trial": trial.number, "optuna_state": "RUNNING", "study": self.study.study_name,
                "optuna_params": params, "seed": self.spec.grid.seeds[0], "variant": f"trial{trial.number}",
                "git_sha": self.sha, "spec": self.spec.source, "failure_class": "none",
                "requeued_from": trial.user_attrs.get("requeued_from", "")}

    def _drain_events(self, *, finishing: _Running | None = None) -> None:
        """Validation events -> MLflow metrics, ``trial.report`` and pruning decisions.

        ``finishing``: a trial whose task already returned; its late validations are reported, not pruned.
        """
        n = self.queue.size()
        for ev in self.queue.get_nowait_batch(n) if n else []:
            running = self.in_flight.get(ev["hash"])
            if running is None:
                continue  # a late event of a trial already told
            if ev["type"] == "start":
                self.tracker.set_tags(running.run_id, {"device": ev.get("device", ""), "host": ev.get("host", "")})
            elif ev["type"] in ("train", "eval") and ev["metrics"]:
                self.tracker.log_metrics(running.run_id, ev["metrics"], step=ev["step"])
                if ev["type"] == "eval":
                    self._report(running, ev["step"], ev["metrics"], prune=running is not finishing)

    def _report(self, running: _Running, step: int, metrics: dict[str, float], *, prune: bool) -> None:
        """Intermediate value (single objective only); prune at validations before the final one."""
        metric = self.search.metrics[0]
        if self.search.multi or metric not in metrics or step in running.reported:
            return
        running.trial.report(metrics[metric], step)
        running.reported.add(step)
        if prune and self.search.pruning and step < running.config.train.steps and running.trial.should_prune():
            self._prune(running, step, metrics[metric])

    def _prune(self, running: _Running, step: int, value: float) -> None:
        """Stop the task, tell PRUNED (Optuna keeps the last intermediate value), close the MLflow run."""
        ray.cancel(running.ref, force=True)
        self._pop(running)
        running.trial.set_user_attr("pruned_at_step", step)
        self.study.tell(running.trial, state=TrialState.PRUNED)
        self.finished += 1
        self.tracker.end_run(running.run_id, status="KILLED", artifacts=self._artifacts(running), tags={
            "optuna_state": "PRUNED", "status": "pruned", "pruned_at_step": step})
        self._print(f"trial {running.trial.number} PRUNED at step {step} ({self.search.metrics[0]} {value:.4f})")

    def _collect(self, running: _Running) -> None:
        """Tell Optuna how a finished task ended; re-queue (once) a trial whose worker was killed."""
        try:
            outcome = ray.get(running.ref)
        except ray.exceptions.RayError as e:
            outcome = {"status": "failed", "failure_class": ray_failure_class(e), "error": str(e).splitlines()[0]}
        self._drain_events(finishing=running)  # its last validations, before it leaves the in-flight set
        self._pop(running)
        if outcome["status"] == "finished":
            self._complete(running, outcome["metrics"])
            return
        cls = outcome.get("failure_class", "error")
        requeue = cls == "killed" and "requeued_from" not in running.trial.user_attrs
        if requeue:
            running.trial.set_user_attr("interrupted", True)
            self._requeue(running.trial.number, running.params, running.trial.user_attrs.get("trial_dir"))
        self._fail(running.trial, running.run_id, cls, outcome.get("error", ""), running=running, counts=not requeue)

    def _complete(self, running: _Running, metrics: dict[str, float]) -> None:
        """Tell COMPLETE with the final objective values (FAIL if one is missing or not finite)."""
        values = [metrics.get(m) for m in self.search.metrics]
        bad = [m for m, v in zip(self.search.metrics, values) if v is None or not math.isfinite(v)]
        if bad:
            why = f"objective {', '.join(bad)} missing or not finite {metrics.get('cost_error', '')}".strip()
            self._fail(running.trial, running.run_id, "error", why, running=running)
            return
        self.study.tell(running.trial, values, skip_if_finished=True)
        self.finished += 1
        self.tracker.log_metrics(running.run_id, metrics, step=running.config.train.steps)
        self.tracker.end_run(running.run_id, status="FINISHED", artifacts=self._artifacts(running), tags={
            "optuna_state": "COMPLETE", "status": "finished", "elapsed_s": round(time.time() - running.started, 1)})
        text = ", ".join(f"{m} {v:.4f}" for m, v in zip(self.search.metrics, values))
        self._print(f"trial {running.trial.number} COMPLETE: {text}")

    def _fail(self, trial: optuna.Trial, run_id: str, failure_class: str, error: str,
              running: _Running | None = None, counts: bool = True) -> None:
        """Tell FAIL with the failure class; ``counts``: whether it uses up budget (not when re-queued)."""
        trial.set_user_attr("failure_class", failure_class)
        trial.set_user_attr("error", error[:500])
        self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        self.finished += int(counts)
        self.tracker.end_run(run_id, status="KILLED" if failure_class == "killed" else "FAILED",
                             artifacts=self._artifacts(running) if running else [],
                             tags={"optuna_state": "FAIL", "status": "failed", "failure_class": failure_class,
                                   "last_error": error[:500]})
        first = error.splitlines()[0] if error else ""
        self._print(f"trial {trial.number} FAIL ({failure_class}){': ' + first if first else ''}")

    def _pop(self, running: _Running) -> None:
        self.in_flight = {k: r for k, r in self.in_flight.items() if r is not running}

    def _artifacts(self, running: _Running) -> list[tuple[Path, str | None]]:
        d = Path(running.trial.user_attrs.get("trial_dir", ""))
        return [(d / f, None) for f in ("config.yaml", "metrics.json", "per_class_iou.csv", "train.log")]

    # ------------------------------------------------------------------ Ctrl-C / SIGTERM

    def interrupt(self) -> None:
        """Tell what already finished; cancel the rest, tell them FAIL (``interrupted``) and re-queue them.

        A trial counts as finished when its task returned, or when its ``result.json`` is on disk (it
        trained and validated to the end but its task had not returned yet).
        """
        self._print("interrupted: recording finished trials, re-queueing running ones (Ctrl-C again to abort)")
        for running in list(self.in_flight.values()):
            metrics = self._finished_metrics(running)
            if metrics is not None:
                self._pop(running)
                self._complete(running, metrics)
        for running in list(self.in_flight.values()):
            ray.cancel(running.ref, force=True)
            trial = running.trial
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("failure_class", "killed")
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            self._requeue(trial.number, running.params, trial.user_attrs.get("trial_dir"))
            self.tracker.end_run(running.run_id, status="KILLED", artifacts=[], tags={
                "optuna_state": "FAIL", "status": "killed", "failure_class": "killed"})
            self._print(f"trial {trial.number} interrupted: marked FAIL and re-queued")
        self.in_flight.clear()

    def _finished_metrics(self, running: _Running) -> dict[str, float] | None:
        """The final metrics of a trial that finished (task returned, or result.json written), else None."""
        ready, _ = ray.wait([running.ref], timeout=0)
        if ready:
            try:
                outcome = ray.get(running.ref, timeout=5)
                if outcome.get("status") == "finished":
                    return outcome["metrics"]
            except Exception:  # noqa: BLE001 - a failed or cancelled task has no result
                return None
        result = Path(running.trial.user_attrs.get("trial_dir", "")) / "result.json"
        return json.loads(result.read_text())["metrics"] if result.is_file() else None

    def close(self) -> None:
        """Remove the event queue's actor."""
        if self.queue is not None:
            self.queue.shutdown()
            self.queue = None

    def _print(self, text: str) -> None:
        prefix = f"[{self.finished}/{self.budget}] " if self.budget else ""
        self.console.print(prefix + text, highlight=False, soft_wrap=True)


class _StopFlag:
    """Set by the first SIGINT/SIGTERM; the driver loop checks it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    """Ctrl-C / SIGTERM set a flag instead of raising, so bookkeeping is never cut in half; a second
    Ctrl-C raises KeyboardInterrupt. Installed from the main thread only (elsewhere the flag stays down).
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag:
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ============================================================================ outputs


def write_outputs(study: optuna.Study, spec: TuneSpec, out: Path) -> dict[str, Path]:
    """trials.csv, study.json, best.yaml, pareto.csv and the plots (those the study has enough trials for)."""
    outputs: dict[str, Path] = {}
    trials_csv = out / "trials.csv"
    study.trials_dataframe().to_csv(trials_csv, index=False)
    outputs["trials"] = trials_csv
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = best_spec(spec, study)
    if best is not None:
        outputs["best"] = out / "best.yaml"
        header = (f"# Best configuration(s) of study {study.study_name!r} ({spec.source}), to confirm with more "
                  f"seeds:\n#   ddsm-bench run {outputs['best']}\n")
        outputs["best"].write_text(header + yaml.safe_dump(best, sort_keys=False))
    if spec.search.multi and complete:
        outputs["pareto"] = out / "pareto.csv"
        _pareto_frame(study, spec).to_csv(outputs["pareto"], index=False)
    outputs.update(_plots(study, spec, out))
    outputs["summary"] = out / "study.json"
    outputs["summary"].write_text(json.dumps(_summary(study, spec), indent=1, default=str) + "\n")
    return outputs


def best_spec(spec: TuneSpec, study: optuna.Study) -> dict[str, Any] | None:
    """A ``ddsm-bench run`` spec of the best trial (or one baseline per Pareto point), None before any COMPLETE.

    Pareto points that resolve to the same config (same cell hash) are kept once.
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trials if spec.search.multi else [study.best_trial]
    baselines, seen = [], set()
    for t in sorted(best, key=lambda t: t.number):
        overrides = {**trial_overrides(spec, t.params), **spec.search.confirm_overrides}
        h = cell_hash(resolve_trial_config(spec, {**t.params, **spec.search.confirm_overrides}, check_paths=False))
        if h not in seen:
            seen.add(h)
            baselines.append({"name": f"trial{t.number}", "overrides": overrides})
    grid = spec.grid
    values = "; ".join(f"trial {t.number}: " + ", ".join(f"{m}={v:.4g}" for m, v in zip(spec.search.metrics, t.values))
                       for t in best)
    smoke = dict(grid.smoke)
    if grid.smoke_resources:
        smoke["resources"] = grid.smoke_resources
    return {
        "name": f"{spec.name}-best",
        "description": f"best of study {study.study_name} ({values})",
        "baseline": baselines[0]["name"],
        "base": grid.base,
        "baselines": baselines,
        "seeds": list(spec.search.confirm_seeds),
        "resources": dataclasses.asdict(grid.resources),
        "max_failures": grid.max_failures,
        "retry_on": list(grid.retry_on),
        "smoke": smoke,
    }


def _pareto_frame(study: optuna.Study, spec: TuneSpec) -> Any:
    import pandas as pd

    rows = [{"number": t.number, **dict(zip(spec.search.metrics, t.values)), **t.params} for t in study.best_trials]
    return pd.DataFrame(rows).sort_values(spec.search.metrics[0])


def _plots(study: optuna.Study, spec: TuneSpec, out: Path) -> dict[str, Path]:
    """Optimisation history, importances, intermediate values / Pareto front, as PNGs (skipped if too few trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    metrics = spec.search.metrics
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    jobs: dict[str, Any] = {}
    for i, metric in enumerate(metrics):
        suffix = f"_{metric}" if spec.search.multi else ""
        target = (lambda t, i=i: t.values[i]) if spec.search.multi else None
        if n_complete:
            jobs[f"history{suffix}"] = lambda target=target, metric=metric: ovm.plot_optimization_history(
                study, target=target, target_name=metric)
        if n_complete >= 2 and spec.search.params:
            jobs[f"importances{suffix}"] = lambda target=target, metric=metric: ovm.plot_param_importances(
                study, target=target, target_name=metric)
    if not spec.search.multi and study.trials:
        jobs["intermediate_values"] = lambda: ovm.plot_intermediate_values(study)
    if spec.search.multi and n_complete and len(metrics) <= 3:
        jobs["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=metrics)
    written = {}
    for name, job in jobs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = job()
            except (ValueError, RuntimeError, ZeroDivisionError, ImportError):  # too few trials; no sklearn (fANOVA)
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written[name] = path
    return written


def _summary(study: optuna.Study, spec: TuneSpec) -> dict[str, Any]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = (study.best_trials if spec.search.multi else [study.best_trial]) if complete else []
    return {"study": study.study_name, "objectives": dict(zip(spec.search.metrics, spec.search.directions)),
            "states": _states(study), "finished": count_finished(study),
            "best": [{"number": t.number, "values": dict(zip(spec.search.metrics, t.values)), "params": t.params}
                     for t in best]}


def _states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _print_summary(study: optuna.Study, summary: StudySummary, console: Any) -> None:
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary.states.items()))
    state = "interrupted" if summary.interrupted else "done"
    console.print(f"{state}: study {summary.study_name}: {summary.finished}/{summary.budget} trials ({states})",
                  highlight=False, soft_wrap=True)
    for entry in _summary(study, summary.spec)["best"]:
        values = ", ".join(f"{m} {v:.4f}" for m, v in entry["values"].items())
        console.print(f"best trial {entry['number']}: {values}  {_fmt_params(entry['params'])}", highlight=False,
                      soft_wrap=True)
    if "best" in summary.outputs:
        console.print(f"confirm with more seeds: ddsm-bench run {summary.outputs['best']}", highlight=False,
                      soft_wrap=True)
    console.print(f"results in {summary.out_dir}; browse: mlflow ui --backend-store-uri {summary.tracking_uri}",
                  highlight=False, soft_wrap=True)


# ============================================================================ small helpers


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in params.items())


def _describe(p: Any) -> str:
    if p.type == "categorical":
        text = f"categorical{list(p.choices)}"
    else:
        text = f"{p.type}[{p.low}, {p.high}]" + (" log" if p.log else "") + (f" step {p.step}" if p.step else "")
    return text + (f" when {dict(p.when)}" if p.when else "")


def _redact(url: str) -> str:
    """Hide the password of a database URL."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _study_hash(storage: str, name: str) -> str:
    import hashlib

    return hashlib.sha256(f"{storage}|{name}".encode()).hexdigest()[:12]
