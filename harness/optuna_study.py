"""The Optuna adapter: the only module that imports optuna. Storage, study, samplers, pruners, outputs.

Persistence and budget. A study lives in ``search.storage`` (default ``sqlite:///<out>/study.db``; an
RDB URL on a cluster, or a ``*.log`` path for Optuna's journal file on a shared file system) under
its study name. Re-running continues it: trial numbers go on, and the budget counts trials that
reached a verdict (COMPLETE, PRUNED, or FAIL by the trial itself; a trial failed by an interruption
and re-queued does not count, :func:`count_finished`). The driver asks and tells through a
:class:`StudyBook` (ask/tell, report/should_prune, re-queue); one driver per study at a time.

Outputs (:func:`write_outputs`): ``trials.csv``, ``history*.png``, ``importances*.png``,
``intermediate_values.png`` (single objective), ``pareto_front.png`` + ``pareto.csv`` (several
objectives), ``best.yaml`` (a ``ddsm-bench run`` spec: the best parameters, or one baseline per
Pareto point, with ``search.confirm_seeds``; :func:`best_spec`) and ``study.json`` (a summary).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import TrialState

from ddsm.config import ConfigError
from harness.cells import cell_hash
from harness.secrets import redact

if TYPE_CHECKING:
    from harness.tune_spec import SearchSpace, TuneSpec

__all__ = ["PRUNERS", "SAMPLERS", "StudyBook", "accepted_options", "best_spec", "build_pruner", "build_sampler",
           "check_options", "count_finished", "open_storage", "open_study", "states", "summary", "write_outputs"]

optuna.logging.set_verbosity(optuna.logging.WARNING)

SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("successive_halving", "median", "percentile", "hyperband")
_CLASSES = {
    "sampler": {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
                "random": optuna.samplers.RandomSampler},
    "pruner": {"successive_halving": optuna.pruners.SuccessiveHalvingPruner, "median": optuna.pruners.MedianPruner,
               "percentile": optuna.pruners.PercentilePruner, "hyperband": optuna.pruners.HyperbandPruner},
}


# ============================================================================ samplers and pruners


def accepted_options(component: str, kind: str) -> list[str]:
    """Keyword options of the ``component`` ("sampler" | "pruner") class ``kind``, from its signature."""
    return [p for p in inspect.signature(_CLASSES[component][kind].__init__).parameters if p != "self"]


def check_options(search: SearchSpace) -> list[str]:
    """One line per option value the sampler or pruner itself rejects (built once to find out)."""
    problems = []
    for name, build in (("sampler", lambda: build_sampler(search)),
                        ("pruner", lambda: build_pruner(search, rung_step=1, total_steps=2))):
        try:
            build()
        except (TypeError, ValueError) as e:
            problems.append(f"search.{name}: {str(e).splitlines()[0]}")
    return problems


def build_sampler(search: SearchSpace, *, seed_offset: int = 0) -> Any:
    """TPE (single objective default; multivariate, grouped when parameters are conditional), NSGA-II or random.

    Chosen defaults: ``seed`` 0; TPE ``multivariate=True``, ``group=True`` when a ``when`` makes the
    space conditional (Optuna's recommendation for conditional spaces), and ``constant_liar=True``
    (trials run concurrently: running ones count as bad, so TPE does not ask for the same point
    again), passed explicitly because it is Optuna's default only since 5.0 (``optuna>=3.6`` is allowed).
    """
    options = {k: v for k, v in search.sampler.items() if k != "type"}
    options["seed"] = int(options.get("seed", 0)) + seed_offset
    kind = search.sampler["type"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            conditional = any(p.when for p in search.params)
            options = {"multivariate": True, "group": conditional, "constant_liar": True, **options}
        return _CLASSES["sampler"][kind](**options)


def build_pruner(search: SearchSpace, *, rung_step: int, total_steps: int) -> Any:
    """The pruner of ``search.pruner`` (NopPruner when pruning is off).

    Chosen defaults: successive halving (asynchronous, i.e. ASHA) with its first rung at the first
    validation (``min_resource = train.val_every``) and ``reduction_factor`` 3; hyperband spans
    ``val_every .. train.steps``; median/percentile prune from the first validation after 2 trials.
    """
    if not search.pruning:
        return optuna.pruners.NopPruner()
    options = {k: v for k, v in search.pruner.items() if k != "type"}
    kind = search.pruner["type"]
    defaults: dict[str, Any] = {
        "successive_halving": {"min_resource": rung_step, "reduction_factor": 3},
        "hyperband": {"min_resource": rung_step, "max_resource": total_steps, "reduction_factor": 3},
        "median": {"n_startup_trials": 2},
        "percentile": {"percentile": 50.0, "n_startup_trials": 2},
    }[kind]
    return _CLASSES["pruner"][kind](**{**defaults, **options})


# ============================================================================ the study


def open_storage(storage: Any) -> Any:
    """An RDB URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``) as is; a path ending in ``.log``
    as Optuna's JournalStorage file (meant for NFS-like shared file systems where SQLite locking fails);
    an Optuna storage object as is.
    """
    if not isinstance(storage, str):
        return storage
    if storage.endswith(".log") and "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(Path(storage).resolve())))
    return storage


def open_study(spec: TuneSpec, *, storage: Any, study_name: str, seed_offset: int | None = None,
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
        raise ConfigError(f"study {study_name!r} in {redact(str(storage))} optimises {stored}, not "
                          f"{search.directions}: use another --out, search.storage or search.study_name")
    fingerprint = study.user_attrs.get("search_fingerprint")
    split = study.user_attrs.get("objective_split", "val" if study.trials else None)  # before splits: val
    if fingerprint is None:
        study.set_user_attr("search_fingerprint", search.fingerprint())
        study.set_user_attr("objectives", search.metrics)
        study.set_user_attr("spec", spec.source)
    elif fingerprint != search.fingerprint():
        raise ConfigError(f"study {study_name!r} in {redact(str(storage))} was created with another search space "
                          "(params or objectives changed): use another --out, search.storage or search.study_name")
    if split is not None and split != spec.objective_split:
        raise ConfigError(f"study {study_name!r} in {redact(str(storage))} holds trials that validated on {split}, "
                          f"this spec's trials validate on {spec.objective_split}: their objective values cannot be "
                          "compared; use another --out, search.storage or search.study_name")
    study.set_user_attr("objective_split", spec.objective_split)
    return study


def count_finished(study: optuna.Study) -> int:
    """Trials counted against the budget: COMPLETE, PRUNED, and FAIL unless re-queued (interrupted)."""
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("requeued_from") for t in trials}
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in requeued) for t in trials)


def states(study: optuna.Study) -> dict[str, int]:
    """Optuna state name -> trials in the study (all sessions)."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


class StudyBook:
    """The driver's writes to one study: ask, tell (COMPLETE / FAIL / PRUNED), report, re-queue.

    Trials are ``optuna.Trial`` objects; their ``number``, ``params`` and ``user_attrs`` are read
    directly. User attrs written here: ``trial_dir``, ``mlflow_run_id``, ``failure_class``, ``error``,
    ``interrupted``, ``pruned_at_step``, ``requeued_from``.
    """

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    @property
    def name(self) -> str:
        """The study name."""
        return self.study.study_name

    def ask(self) -> optuna.Trial:
        """The next trial (an enqueued one first)."""
        return self.study.ask()

    def enqueue(self, params: dict[str, Any]) -> None:
        """Try ``params`` first (once: skipped when an identical set is already in the study)."""
        self.study.enqueue_trial(params, skip_if_exists=True)

    def requeue(self, number: int, params: dict[str, Any], trial_dir: str | None) -> None:
        """Enqueue ``params`` again; the new trial resumes from ``trial_dir``'s last checkpoint."""
        attrs = {"requeued_from": number, **({"trial_dir": trial_dir} if trial_dir else {})}
        self.study.enqueue_trial(params, user_attrs=attrs)

    def stale(self) -> list[Any]:
        """Trials left RUNNING by a driver that died (frozen trials)."""
        return self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    def tell_stale(self, number: int) -> None:
        """Tell FAIL for a trial left RUNNING."""
        self.study.tell(number, state=TrialState.FAIL)

    def complete(self, trial: optuna.Trial, values: list[float]) -> None:
        """Tell COMPLETE with the objective values."""
        self.study.tell(trial, values, skip_if_finished=True)

    def fail(self, trial: optuna.Trial, *, failure_class: str, error: str | None = None,
             interrupted: bool = False) -> None:
        """Tell FAIL with the failure class, the error (when known) and ``interrupted`` when it is re-queued."""
        if interrupted:
            trial.set_user_attr("interrupted", True)
        trial.set_user_attr("failure_class", failure_class)
        if error is not None:
            trial.set_user_attr("error", error[:500])
        self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def report(self, trial: optuna.Trial, value: float, step: int) -> None:
        """An intermediate value (single objective)."""
        trial.report(value, step)

    def should_prune(self, trial: optuna.Trial) -> bool:
        """The pruner's verdict after the last report."""
        return trial.should_prune()

    def prune(self, trial: optuna.Trial, step: int) -> None:
        """Tell PRUNED (Optuna keeps the last intermediate value as the trial's value)."""
        trial.set_user_attr("pruned_at_step", step)
        self.study.tell(trial, state=TrialState.PRUNED)

    def count_finished(self) -> int:
        """See :func:`count_finished`."""
        return count_finished(self.study)


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
                  f"seeds:\n#   ddsm-bench run {outputs['best']}\n# Splits: {spec.split_note()}\n")
        outputs["best"].write_text(header + yaml.safe_dump(best, sort_keys=False))
    if spec.search.multi and complete:
        outputs["pareto"] = out / "pareto.csv"
        _pareto_frame(study, spec).to_csv(outputs["pareto"], index=False)
    outputs.update(_plots(study, spec, out))
    outputs["summary"] = out / "study.json"
    outputs["summary"].write_text(json.dumps(summary(study, spec), indent=1, default=str) + "\n")
    return outputs


def best_spec(spec: TuneSpec, study: optuna.Study) -> dict[str, Any] | None:
    """A ``ddsm-bench run`` spec of the best trial (or one baseline per Pareto point), None before any COMPLETE.

    Pareto points that resolve to the same config (same cell hash) are kept once. The spec trains on the
    whole train split and reports ``search.confirm_split`` (its ``data.val_split``); its description says
    which split the study tuned on (and warns when that is the split it reports).
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trials if spec.search.multi else [study.best_trial]
    plain = spec.with_mode(smoke=False, check_paths=False)
    confirm = {**spec.search.confirm_overrides, "data.val_split": spec.search.confirm_split}
    baselines, seen = [], set()
    for t in sorted(best, key=lambda t: t.number):
        h = cell_hash(plain.trial_config({**t.params, **confirm}))
        if h not in seen:
            seen.add(h)
            baselines.append({"name": f"trial{t.number}", "overrides": {**spec.trial_overrides(t.params), **confirm}})
    values = "; ".join(f"trial {t.number}: " + ", ".join(f"{m}={v:.4g}" for m, v in zip(spec.search.metrics, t.values))
                       for t in best)
    values += f"; {spec.split_note()}"
    smoke = dict(spec.smoke)
    if spec.smoke_resources:
        smoke["resources"] = spec.smoke_resources
    return {
        "name": f"{spec.name}-best",
        "description": f"best of study {study.study_name} ({values})",
        "baseline": baselines[0]["name"],
        "base": spec.base,
        "baselines": baselines,
        "seeds": list(spec.search.confirm_seeds),
        "resources": dataclasses.asdict(spec.resources),
        "max_failures": spec.max_failures,
        "retry_on": list(spec.retry_on),
        "smoke": smoke,
    }


def summary(study: optuna.Study, spec: TuneSpec) -> dict[str, Any]:
    """The study in one dict: objectives, states, trials counted, best trial(s) with values and params."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = (study.best_trials if spec.search.multi else [study.best_trial]) if complete else []
    return {"study": study.study_name, "objectives": dict(zip(spec.search.metrics, spec.search.directions)),
            "states": states(study), "finished": count_finished(study),
            "best": [{"number": t.number, "values": dict(zip(spec.search.metrics, t.values)), "params": t.params}
                     for t in best]}


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
