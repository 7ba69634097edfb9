"""Tune specs: one configuration to start from (``base``, at most one baseline, one seed) plus a ``search``.

The keys of a run spec (:mod:`harness.spec`) except ``axes`` and ``cells``, and a ``search`` section
(see ``ablations/tune_*.yaml``)::

    search:
      params:                                   # dotted TrialConfig fields
        train.lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
        model.num_points: [1, 4, 9, 16, 25]     # a plain list = categorical
        model.branches: {type: categorical, choices: [spatial, channel, dual]}
        model.pooled_size: {type: int, low: 2, high: 16, step: 2, when: {model.branches: [channel, dual]}}
      objectives: {miou: maximize}              # or {miou: maximize, gflops: minimize}
      n_trials: 40                              # budget: trials that reached a verdict (all runs together)
      smoke_trials: 4                           # the budget under --smoke
      concurrency: 4                            # trials at once (default: what the cluster fits)
      pruning: true                             # single validation-metric objective only (default: when possible)
      pruner: {type: successive_halving, reduction_factor: 3}   # | median | percentile | hyperband (+ options)
      sampler: {type: tpe, seed: 0}             # tpe (default) | nsga2 (default for 2+ objectives) | random
      storage: null                             # RDB URL or *.log journal file (default sqlite:///<out>/study.db)
      study_name: null                          # default: the spec name
      enqueue: [{train.lr: 0.01, model.num_points: 9}]      # parameter sets tried first
      confirm_seeds: [0, 1, 2]                  # seeds of the exported best spec
      confirm_overrides: {train.steps: 55800}   # applied to the exported best spec (e.g. the full schedule)
      confirm_split: val                        # what the exported best spec reports: val (default) | test

Splits (leak-proof tuning): trials validate on ``data.val_split``, which defaults to ``minival`` in a tune
spec (a fixed subset of the train split, held out of training, ``ddsm/data/__init__.py``), and the
exported ``best.yaml`` trains on the whole train split and reports ``search.confirm_split``. A study
whose objective split equals its confirm split would choose hyperparameters on the numbers it then
reports: that is refused (exit 2) unless the user asks for it explicitly (``--tune-on-confirm-split``),
which is printed as a warning and recorded in the study's provenance and in ``best.yaml``.

A parameter is a range (``int``/``float``, optional ``log: true`` or ``step``) or ``categorical``
``choices``; ``when: {parent: [values]}`` samples it only when the (categorical) parent took one of
those values, otherwise the base value stays. Objectives are final metrics of the catalogue
(:mod:`ddsm.metrics.catalogue`): accuracy ones are reported at every validation, so they can be
pruned on; cost ones only at the end. Sampler and pruner options are passed to Optuna's classes and
checked against their signatures (:mod:`harness.optuna_study`).

Everything wrong in a spec is collected and raised at once as a :class:`harness.spec.SpecError`
(a ConfigError: ``ddsm-bench`` exits 2), one line per problem, before anything runs.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ddsm.config import ConfigError, TrialConfig
from ddsm.metrics.catalogue import is_accuracy, metric_names
from harness import optuna_study
from harness.spec import (DEFAULT_RETRY_ON, DEFAULT_TRACKING_OUTAGE_S, SMOKE_OVERRIDES, SPEC_KEYS, Mode, Resources,
                          SpecError, baselines_section, field_type, flatten, parse_common, read_spec_file,
                          resolve_config, seed_list, trial_resources, typed, yaml_number)

__all__ = ["Objective", "Param", "SearchSpace", "TUNE_SMOKE_OVERRIDES", "TuneSpec", "load_tune_spec",
           "parse_search", "parse_tune_spec"]

TUNE_KEYS = (*(k for k in SPEC_KEYS if k not in ("axes", "cells", "cost")), "search")
DIRECTIONS = {"maximize": "maximize", "maximise": "maximize", "max": "maximize",
              "minimize": "minimize", "minimise": "minimize", "min": "minimize"}
PARAM_TYPES = ("int", "float", "categorical")
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices", "when")
SEARCH_KEYS = ("params", "objectives", "n_trials", "smoke_trials", "concurrency", "pruning", "pruner", "sampler",
               "storage", "study_name", "enqueue", "confirm_seeds", "confirm_overrides", "confirm_split")
CONFIRM_SPLITS = ("val", "test")
DEFAULT_OBJECTIVE_SPLIT = "minival"  # a tune spec that does not set data.val_split tunes on minival
# --smoke in a study: 4 steps with a validation at step 2, so pruning has a rung to act on.
TUNE_SMOKE_OVERRIDES: dict[str, Any] = {"train.steps": 4, "train.val_every": 2}


@dataclass(frozen=True)
class Param:
    """One searched config field: an int/float range (optionally log-scaled or stepped) or a set of choices."""

    name: str  # dotted TrialConfig field, e.g. "train.lr"; also the Optuna parameter name
    type: str  # int | float | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()  # (parent param, allowed values): sampled only if all hold

    def active(self, values: dict[str, Any]) -> bool:
        """Whether every ``when`` condition holds for the parent values sampled so far."""
        return all(parent in values and values[parent] in allowed for parent, allowed in self.when)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take."""
        if self.type == "categorical":
            return value in self.choices
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok_type and self.low <= value <= self.high and (self.type == "float" or float(value).is_integer())

    def describe(self) -> str:
        """``float[0.001, 0.1] log``, ``categorical[1, 4, 9] when {...}`` (logged as a param of the study)."""
        if self.type == "categorical":
            text = f"categorical{list(self.choices)}"
        else:
            text = f"{self.type}[{self.low}, {self.high}]" + (" log" if self.log else "") + \
                (f" step {self.step}" if self.step else "")
        return text + (f" when {dict(self.when)}" if self.when else "")


@dataclass(frozen=True)
class Objective:
    """A final metric to optimise and its direction."""

    metric: str
    direction: str  # maximize | minimize


@dataclass
class SearchSpace:
    """The validated ``search`` section (see the module docstring)."""

    params: list[Param]  # parents before children
    objectives: list[Objective]
    n_trials: int = 20
    smoke_trials: int = 4  # the budget under --smoke
    concurrency: int | None = None  # None: as many as the cluster's resources allow
    pruning: bool = True
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "successive_halving"})
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    storage: str | None = None  # None: sqlite:///<out>/study.db
    study_name: str | None = None  # None: the spec name
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # parameter sets tried first
    confirm_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # seeds of the exported best spec
    confirm_overrides: dict[str, Any] = field(default_factory=dict)  # dotted overrides of the best spec (e.g. steps)
    confirm_split: str = "val"  # data.val_split of the exported best spec (what it reports)

    @property
    def multi(self) -> bool:
        """More than one objective (NSGA-II / Pareto front, no pruning)."""
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        """Optuna directions, in objective order."""
        return [o.direction for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        """Objective metric names, in order."""
        return [o.metric for o in self.objectives]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Define-by-run: sample every active parameter from an ``optuna.Trial``; return {dotted key: value}."""
        values: dict[str, Any] = {}
        for p in self.params:
            if not p.active(values):
                continue
            if p.type == "categorical":
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.type == "int":
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                values[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)
        return values

    def fingerprint(self) -> str:
        """Hash of the parameters and objectives: a stored study must match it to be continued."""
        payload = json.dumps([[dataclasses.asdict(p) for p in self.params], self.metrics, self.directions],
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class TuneSpec:
    """A validated tune spec: the configuration trials start from, how they run, and the search."""

    name: str  # the MLflow experiment and the default study name
    base: dict[str, Any]  # a TrialConfig dict
    search: SearchSpace
    overrides: dict[str, Any] = field(default_factory=dict)  # of the spec's one baseline (if it has one)
    seed: int = 0  # every trial's train.seed
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 1  # kept for the exported best spec
    retry_on: list[str] = field(default_factory=lambda: list(DEFAULT_RETRY_ON))
    tracking_outage_s: float = DEFAULT_TRACKING_OUTAGE_S
    smoke: dict[str, Any] = field(default_factory=dict)  # dotted overrides applied by --smoke
    smoke_resources: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = "<dict>"
    mode: Mode = field(default_factory=Mode)
    allow_leak: bool = False  # --tune-on-confirm-split: tune on the split best.yaml reports (warned, recorded)

    @property
    def objective_split(self) -> str:
        """The split every trial validates on (its objective's numbers)."""
        return self.base_config.data.val_split

    @property
    def leaks(self) -> bool:
        """The study tunes on the split its best spec reports (only with ``allow_leak``)."""
        return self.objective_split == self.search.confirm_split

    def split_note(self) -> str:
        """One line for provenance: where the study tuned and what its best spec reports."""
        text = f"tuned on {self.objective_split}, confirmed on {self.search.confirm_split}"
        if self.leaks:
            text = (f"WARNING: tuned on {self.objective_split}, the split the confirm run reports "
                    "(--tune-on-confirm-split): its scores there are optimistic")
        return text

    def with_mode(self, *, smoke: bool | None = None, check_paths: bool | None = None) -> TuneSpec:
        """This spec run another way (None keeps the current setting)."""
        return dataclasses.replace(self, mode=Mode(smoke=self.mode.smoke if smoke is None else smoke,
                                                   check_paths=self.mode.check_paths if check_paths is None
                                                   else check_paths))

    @property
    def experiment(self) -> str:
        """The MLflow experiment: the name, ``-smoke`` appended under --smoke."""
        return self.name + ("-smoke" if self.mode.smoke else "")

    @property
    def study_name(self) -> str:
        """``search.study_name`` (default the spec name), ``-smoke`` appended under --smoke."""
        return (self.search.study_name or self.name) + ("-smoke" if self.mode.smoke else "")

    @property
    def trial_resources(self) -> Resources:
        """The per-trial resources, with ``smoke.resources`` applied under --smoke."""
        return trial_resources(self.resources, self.smoke_resources, self.mode)

    def budget(self, n_trials: int | None = None) -> int:
        """Trials that must reach a verdict: ``n_trials``, else ``search.smoke_trials`` under --smoke, else
        ``search.n_trials``."""
        return n_trials or (self.search.smoke_trials if self.mode.smoke else self.search.n_trials)

    def trial_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Dotted overrides of one trial: the baseline's overrides, then the sampled parameters."""
        return {**self.overrides, **params}

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        """The validated TrialConfig of a trial with ``params`` (ConfigError if it cannot run).

        Under --smoke: :data:`harness.spec.SMOKE_OVERRIDES`, then :data:`TUNE_SMOKE_OVERRIDES`, then the
        spec's own ``smoke`` section.
        """
        final = {**SMOKE_OVERRIDES, **TUNE_SMOKE_OVERRIDES, **self.smoke} if self.mode.smoke else {}
        return resolve_config(self.base, self.trial_overrides(params), seed=self.seed, final=final, mode=self.mode,
                              resources=self.trial_resources)

    @cached_property
    def base_config(self) -> TrialConfig:
        """The config of a trial that samples nothing (the start of the search)."""
        return self.trial_config({})


# ----------------------------------------------------------------------------- loading


def load_tune_spec(path: str | Path, *, smoke: bool = False, check_paths: bool = True,
                   allow_leak: bool = False) -> TuneSpec:
    """Read and validate a tune spec file (run in ``smoke``/``check_paths`` mode); raise SpecError (exit 2).

    ``allow_leak`` (``--tune-on-confirm-split``) lets the objective split equal ``search.confirm_split``.
    """
    raw, source = read_spec_file(path)
    return parse_tune_spec(raw, source=source, smoke=smoke, check_paths=check_paths, allow_leak=allow_leak)


def parse_tune_spec(raw: Any, *, source: str = "<dict>", smoke: bool = False, check_paths: bool = True,
                    allow_leak: bool = False) -> TuneSpec:
    """Build a TuneSpec from a YAML-loaded dict; raise SpecError listing every problem (see the module docstring
    for the splits)."""
    if not isinstance(raw, dict):
        raise SpecError(source, [f"the spec must be a mapping with a `search` section, got {raw!r}"])
    problems: list[str] = []
    raw = copy.deepcopy(raw)
    search_raw = raw.pop("search", None)
    for key in ("axes", "cells"):
        if raw.pop(key, None) is not None:
            problems.append(f"{key} is not allowed in a tune spec: list the values to search under search.params")
    for key in raw:
        if key not in TUNE_KEYS:
            problems.append(f"unknown key {key!r}; allowed keys: {', '.join(TUNE_KEYS)}")
    n_before = len(problems)
    common = parse_common(raw, source=source, problems=problems)
    baselines = baselines_section(raw["baselines"], problems, allow_axes=False) if "baselines" in raw else []
    names = [b.name for b in baselines] or ["base"]
    reference = typed(raw, "baseline", str, names[0], problems)
    if reference not in names:
        problems.append(f"baseline={reference!r} is not a baseline name: expected one of {', '.join(names)}")
    parsed = len(problems) == n_before
    if len(baselines) > 1:
        problems.append(f"baselines: a tune spec starts from one configuration, got {len(baselines)} "
                        "baselines: keep one (or search over the field that differs)")
    seeds = common.pop("seeds")
    if len(seeds) > 1:
        problems.append(f"seeds={seeds!r} is not allowed: a study trains each trial with one seed; "
                        "give one (the exported best spec confirms with search.confirm_seeds)")
    overrides = baselines[0].overrides if baselines else {}
    if "data.val_split" not in {**flatten(common["base"]), **overrides, **common["smoke"]}:
        overrides = {"data.val_split": DEFAULT_OBJECTIVE_SPLIT, **overrides}  # trials tune on minival
    start = TuneSpec(**common, search=SearchSpace(params=[], objectives=[]), seed=seeds[0], source=source,
                     overrides=overrides, allow_leak=allow_leak)
    search = parse_search(search_raw, start=start if parsed else None, problems=problems)
    if search is not None:
        spec = dataclasses.replace(start, search=search, mode=Mode(smoke=smoke, check_paths=check_paths))
        problems += _split_problems(spec) + _data_problems(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


def _split_problems(spec: TuneSpec) -> list[str]:
    """A study must not tune on the split it reports, unless asked (``allow_leak``)."""
    try:
        split = spec.objective_split
    except ConfigError:
        return []  # reported with the base config
    if split == spec.search.confirm_split and not spec.allow_leak:
        return [f"search: the trials validate on data.val_split={split!r}, the split the exported best spec reports "
                f"(search.confirm_split={spec.search.confirm_split!r}): the tuned numbers would be reported on the "
                "split that chose them; tune on minival (the default when data.val_split is not set) or pass "
                "--tune-on-confirm-split to do it anyway (recorded in the study's provenance)"]
    return []


def _data_problems(spec: TuneSpec) -> list[str]:
    """The data every trial and the confirm run read (files and headers, in the spec's mode), the device."""
    from harness.validate import check_configs

    try:
        base = spec.base_config
        confirm = spec.trial_config({**spec.search.confirm_overrides, "data.val_split": spec.search.confirm_split})
    except ConfigError as e:
        return [f"base: {e}"]
    found = check_configs([("base", base), ("best spec", confirm)], resources=spec.trial_resources, mode=spec.mode)
    return [f"{', '.join(where)}: {problem}" for problem, where in found.items()]


# ----------------------------------------------------------------------------- the search section


def parse_search(raw: Any, *, start: TuneSpec | None, problems: list[str]) -> SearchSpace | None:
    """Validate the ``search`` section, appending one line per problem; None when it cannot be built.

    ``start`` (the spec without its search, None if it had problems) is used to check every range bound
    and choice against the base config and to find the objective metrics the trials will report.
    """
    if not isinstance(raw, dict):
        problems.append(f"search={raw!r} is not allowed: expected a mapping with params and objectives "
                        f"(keys: {', '.join(SEARCH_KEYS)})")
        return None
    for key in raw:
        if key not in SEARCH_KEYS:
            problems.append(f"search: unknown key {key!r}; allowed keys: {', '.join(SEARCH_KEYS)}")
    n_before = len(problems)
    params = _params(raw.get("params"), problems)
    objectives = _objectives(raw.get("objectives"), problems)
    n_trials = _int(raw, "n_trials", 20, 1, problems)
    smoke_trials = _int(raw, "smoke_trials", min(n_trials, 4), 1, problems)
    concurrency = _int(raw, "concurrency", None, 1, problems)
    pruning = _pruning(raw.get("pruning"), objectives, problems)
    pruner = _component(raw.get("pruner"), "pruner", "successive_halving", optuna_study.PRUNERS, problems)
    sampler = _component(raw.get("sampler"), "sampler", "nsga2" if len(objectives) > 1 else "tpe",
                         optuna_study.SAMPLERS, problems)
    storage = _optional_str(raw, "storage", problems)
    study_name = _optional_str(raw, "study_name", problems)
    enqueue = _enqueue(raw.get("enqueue", []), params, problems)
    seeds = seed_list(raw.get("confirm_seeds", [0, 1, 2]), "search.confirm_seeds", problems, default=[0, 1, 2])
    confirm = _confirm_overrides(raw.get("confirm_overrides"), problems)
    confirm_split = raw.get("confirm_split", "val")
    if confirm_split not in CONFIRM_SPLITS:
        problems.append(f"search.confirm_split={confirm_split!r} is not allowed: expected one of "
                        f"{', '.join(CONFIRM_SPLITS)} (the split the best spec reports; tune on minival)")
    if "data.val_split" in confirm:
        problems.append("search.confirm_overrides: data.val_split is set by search.confirm_split; set it there")
    if start is not None:
        _check_against_base(start.with_mode(smoke=False, check_paths=False), params, objectives, confirm, problems)
    if len(problems) > n_before:
        return None
    space = SearchSpace(params=params, objectives=objectives, n_trials=n_trials, smoke_trials=smoke_trials,
                        concurrency=concurrency, pruning=pruning, pruner=pruner, sampler=sampler, storage=storage,
                        study_name=study_name, enqueue=enqueue, confirm_seeds=seeds, confirm_overrides=confirm,
                        confirm_split=confirm_split)
    for problem in optuna_study.check_options(space):  # option values the sampler/pruner itself rejects
        problems.append(problem)
    return None if len(problems) > n_before else space


def _confirm_overrides(raw: Any, problems: list[str]) -> dict[str, Any]:
    """``confirm_overrides`` of the best spec, flattened (checked against the base with the rest)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"search.confirm_overrides={raw!r} is not allowed: expected a mapping of dotted config "
                        "fields to values (applied to the exported best spec, e.g. {train.steps: 55800})")
        return {}
    return flatten(raw)


def _params(raw: Any, problems: list[str]) -> list[Param]:
    """Parse every parameter, then check the ``when`` parents and order parents before children."""
    if not isinstance(raw, dict) or not raw:
        problems.append(f"search.params={raw!r} is not allowed: expected a mapping of dotted config fields to "
                        "ranges or choices, e.g. train.lr: {type: float, low: 1.0e-3, high: 0.1, log: true}")
        return []
    parsed = {}
    for key, spec in raw.items():
        param = _param(str(key), spec, problems)
        if param is not None:
            parsed[param.name] = param
    for p in parsed.values():
        for parent, allowed in p.when:
            if parent not in parsed:
                if parent not in raw:  # a parent that failed to parse was already reported
                    problems.append(f"search.params.{p.name}: `when` depends on {parent!r}, which is not a searched "
                                    f"parameter; searched: {', '.join(parsed)}")
                continue
            bad = [v for v in allowed if not parsed[parent].contains(v)]
            if bad:
                problems.append(f"search.params.{p.name}: `when` value(s) {bad!r} can never be taken by {parent!r}")
    return _topological(parsed, problems)


def _param(key: str, spec: Any, problems: list[str]) -> Param | None:
    where = f"search.params.{key}"
    tp = _searchable_type(key)
    if isinstance(tp, str):
        problems.append(f"{where}: {tp}")
        return None
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        problems.append(f"{where}={spec!r} is not allowed: expected a list of choices or a mapping with "
                        f"{', '.join(PARAM_KEYS)}")
        return None
    unknown = [k for k in spec if k not in PARAM_KEYS]
    if unknown:
        problems.append(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(PARAM_KEYS)}")
        return None
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in PARAM_TYPES:
        problems.append(f"{where}.type={kind!r} is not allowed: expected one of {', '.join(PARAM_TYPES)}")
        return None
    when = _when(spec.get("when"), where, problems)
    if kind == "categorical":
        return _categorical(key, spec, when, where, problems)
    return _numeric(key, kind, spec, tp, when, where, problems)


def _searchable_type(key: str) -> Any:
    """The annotated type of dotted TrialConfig field ``key`` (Optional unwrapped), or a one-line problem."""
    found = field_type(key, noun="parameter")
    if isinstance(found, str):
        return found
    if key == "train.seed":
        return "train.seed cannot be searched: it is set by `seeds:` (and search.confirm_seeds for the best spec)"
    tp = found[1]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    return tp


def _categorical(key: str, spec: dict, when: tuple, where: str, problems: list[str]) -> Param | None:
    choices = spec.get("choices")
    extra = [k for k in ("low", "high", "log", "step") if k in spec]
    if extra:
        problems.append(f"{where}: {extra[0]!r} is not allowed for a categorical parameter: give choices only")
        return None
    if not isinstance(choices, list) or not choices:
        problems.append(f"{where}.choices={choices!r} is not allowed: expected a non-empty list")
        return None
    if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
        problems.append(f"{where}.choices={choices!r} is not allowed: choices must be numbers, strings, booleans or "
                        "null (list-valued fields cannot be searched)")
        return None
    if len({json.dumps(c) for c in choices}) != len(choices):
        problems.append(f"{where}.choices={choices!r} is not allowed: choices must be distinct")
        return None
    return Param(name=key, type="categorical", choices=tuple(choices), when=when)


def _numeric(key: str, kind: str, spec: dict, tp: Any, when: tuple, where: str, problems: list[str]) -> Param | None:
    if "choices" in spec:
        problems.append(f"{where}: 'choices' is not allowed for a {kind} range: use type categorical")
        return None
    if kind == "float" and tp is int:
        problems.append(f"{where}: {key} is an int field: use type int or categorical, not float")
        return None
    if tp not in (int, float):
        problems.append(f"{where}: {key} is not a number field: use type categorical")
        return None
    values = {}
    for k in ("low", "high", "step"):
        v = yaml_number(spec.get(k)) if kind == "float" else spec.get(k)
        if v is None and k == "step":
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (kind == "int" and not float(v).is_integer()):
            expected = "an integer" if kind == "int" else "a number"
            problems.append(f"{where}.{k}={v!r} has the wrong type: expected {expected}")
            return None
        values[k] = v
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{where}.log={log!r} has the wrong type: expected true or false")
        return None
    low, high, step = values["low"], values["high"], values.get("step")
    if low > high:
        problems.append(f"{where}: empty range low={low!r} > high={high!r}: expected low < high")
    elif low == high:
        problems.append(f"{where}: range low=high={low!r} holds one value: set it in base instead of searching it")
    elif log and low <= 0:
        problems.append(f"{where}: log range needs positive bounds, got low={low!r}: expected 0 < low < high")
    elif log and step is not None:
        problems.append(f"{where}: step={step!r} is not allowed with log: true (Optuna samples log ranges "
                        "continuously)")
    elif step is not None and not 0 < step <= high - low:
        problems.append(f"{where}.step={step!r} is not allowed: expected 0 < step <= high - low")
    else:
        return Param(name=key, type=kind, low=low, high=high, log=log, step=step, when=when)
    return None


def _when(raw: Any, where: str, problems: list[str]) -> tuple[tuple[str, tuple], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{where}.when={raw!r} is not allowed: expected a mapping of parent parameter to the value "
                        "(or list of values) for which this one is searched, e.g. {model.branches: [channel, dual]}")
        return ()
    return tuple((str(k), tuple(v) if isinstance(v, list) else (v,)) for k, v in raw.items())


def _topological(params: dict[str, Param], problems: list[str]) -> list[Param]:
    """Parents before children, otherwise file order; a cycle is a problem."""
    ordered: list[Param] = []
    placed: set[str] = set()
    remaining = list(params.values())
    while remaining:
        progress = False
        for p in list(remaining):
            if all(parent in placed or parent not in params for parent, _ in p.when):
                ordered.append(p)
                placed.add(p.name)
                remaining.remove(p)
                progress = True
        if not progress:
            problems.append(f"search.params: the `when` conditions of {', '.join(p.name for p in remaining)} form a "
                            "cycle: a parameter cannot depend (directly or not) on itself")
            return ordered
    return ordered


def _objectives(raw: Any, problems: list[str]) -> list[Objective]:
    """``{metric: direction, ...}`` or ``[{metric: m, direction: d}, ...]`` -> objectives in order."""
    pairs: list[tuple[Any, Any]] = []
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list) and all(isinstance(o, dict) and set(o) == {"metric", "direction"} for o in raw):
        pairs = [(o["metric"], o["direction"]) for o in raw]
    if not pairs:
        problems.append(f"search.objectives={raw!r} is not allowed: expected a mapping of metric to direction, e.g. "
                        "{miou: maximize} or {miou: maximize, gflops: minimize}")
        return []
    out = []
    for metric, direction in pairs:
        d = DIRECTIONS.get(str(direction).lower()) if isinstance(direction, str) else None
        if d is None:
            problems.append(f"search.objectives.{metric}: direction {direction!r} is not allowed: expected maximize "
                            "or minimize")
            continue
        out.append(Objective(metric=str(metric), direction=d))
    if len({o.metric for o in out}) != len(out):
        problems.append(f"search.objectives: metric listed twice in {[o.metric for o in out]}")
    return out


def _pruning(raw: Any, objectives: list[Objective], problems: list[str]) -> bool:
    """Default: on for one accuracy objective (reported at every validation); explicit ``true`` elsewhere
    is a problem."""
    prunable = len(objectives) == 1 and is_accuracy(objectives[0].metric)
    if raw is None:
        return prunable
    if not isinstance(raw, bool):
        problems.append(f"search.pruning={raw!r} has the wrong type: expected true or false")
        return False
    if raw and len(objectives) > 1:
        problems.append("search.pruning=true is not allowed with several objectives: Optuna's pruners compare one "
                        "intermediate value per step; set pruning: false")
    elif raw and objectives and not prunable:
        problems.append(f"search.pruning=true is not allowed for objective {objectives[0].metric!r}: it is only known "
                        "at the end; pruning needs a validation metric (miou, pixel_acc, mean_acc, biou, bf_<r>px)")
    return raw


def _component(raw: Any, name: str, default: str, allowed: tuple[str, ...], problems: list[str]) -> dict[str, Any]:
    """``{type: ..., <keyword options>}`` for a sampler/pruner; options are checked against its signature."""
    if raw is None:
        raw = {"type": default}
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        problems.append(f"search.{name}={raw!r} is not allowed: expected a mapping {{type: ..., <options>}}")
        return {"type": default}
    out = {"type": default, **raw}
    if out["type"] not in allowed:
        problems.append(f"search.{name}.type={out['type']!r} is not allowed: expected one of {', '.join(allowed)}")
        return out
    accepted = optuna_study.accepted_options(name, out["type"])
    for key in out:
        if key != "type" and key not in accepted:
            problems.append(f"search.{name}: unknown option {key!r} for {out['type']}; allowed: {', '.join(accepted)}")
    return out


def _int(raw: dict, key: str, default: int | None, minimum: int, problems: list[str]) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        problems.append(f"search.{key}={value!r} is not allowed: expected an integer >= {minimum}")
        return default if default is not None else minimum
    return value


def _optional_str(raw: dict, key: str, problems: list[str]) -> str | None:
    value = raw.get(key)
    if value is not None and not (isinstance(value, str) and value):
        problems.append(f"search.{key}={value!r} has the wrong type: expected a non-empty string")
        return None
    return value


def _enqueue(raw: Any, params: list[Param], problems: list[str]) -> list[dict[str, Any]]:
    """Parameter sets to try first: each key a searched parameter, each value one it can take."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        problems.append(f"search.enqueue={raw!r} is not allowed: expected a list of {{parameter: value}} mappings")
        return []
    by_name = {p.name: p for p in params}
    for i, item in enumerate(raw):
        for key, value in item.items():
            if key not in by_name:
                problems.append(f"search.enqueue[{i}]: {key!r} is not a searched parameter; searched: "
                                f"{', '.join(by_name)}")
            elif not by_name[key].contains(value):
                problems.append(f"search.enqueue[{i}]: {key}={value!r} is outside its range or choices")
    return [dict(item) for item in raw]


def _check_against_base(start: TuneSpec, params: list[Param], objectives: list[Objective],
                        confirm: dict[str, Any], problems: list[str]) -> None:
    """Every bound/choice and the confirm overrides must give a valid config; every objective must be a
    metric the trials report (:func:`ddsm.metrics.catalogue.metric_names`)."""
    try:
        base = start.base_config
    except ConfigError as e:
        problems.append(f"base: {e}")
        return
    try:
        start.trial_config(confirm)
    except ConfigError as e:
        problems.append(f"search.confirm_overrides: {e}")
    from harness.validate import check_configs

    named = [("base", base)]
    for p in params:
        values = p.choices if p.type == "categorical" else (p.low, p.high)
        parents = {parent: allowed[0] for parent, allowed in p.when}
        for value in values:
            try:
                named.append((f"search.params.{p.name}={value!r}", start.trial_config({**parents, p.name: value})))
            except ConfigError as e:
                problems.append(f"search.params.{p.name}: {e}")
                break
    # what only building the model (on the meta device) can tell, for every choice and range end
    for problem, where in check_configs(named, resources=start.trial_resources, mode=start.mode).items():
        problems.append(f"{where[0]}{f' (and {len(where) - 1} more)' if len(where) > 1 else ''}: {problem}")
    metrics = metric_names(base.eval.tolerances)
    fractional = any(t < 1 for t in base.eval.tolerances)  # their bf_<r>px keys depend on the image size
    for o in objectives:
        if o.metric not in metrics and not (fractional and re.fullmatch(r"bf_\d+px", o.metric)):
            problems.append(f"search.objectives: unknown metric {o.metric!r}: expected one of {', '.join(metrics)}")
