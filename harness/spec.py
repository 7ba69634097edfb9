"""Ablation grid specs: one YAML file -> a validated :class:`GridSpec`, with ``--smoke`` applied here, once.

A spec (see ``ablations/*.yaml``) has a ``base`` TrialConfig dict, named ``baselines`` (overrides of
the base, each optionally with its own ``axes``), global ``axes`` crossed with every baseline,
explicit extra ``cells``, ``seeds`` (each sets ``train.seed``), per-trial ``resources`` and retry
policy. Overrides are mappings whose keys may be dotted (``model.name: fpn``) or nested
(``model: {name: fpn}``). Expanding a spec into hashed cells is :mod:`harness.cells`.

How a spec is run is its :class:`Mode`, set once when it is loaded (:func:`load_spec`,
:meth:`GridSpec.with_mode`): ``smoke`` (a few steps on tiny inputs: :data:`SMOKE_OVERRIDES`, then the
spec's own ``smoke:`` section, applied after everything else; its ``smoke.resources``; an absent
dataset replaced by synthetic data; the experiment ``<name>-smoke``) and ``check_paths`` (dataset
folders must exist here; off when the data lives on a remote cluster). Everything downstream reads
the mode from the spec instead of taking flags.

Every problem in a spec (unknown keys, wrong types, impossible values) is collected and raised at
once as a :class:`SpecError` with one line per problem, before anything is launched or written. The
field parsers here are shared with tune specs (:mod:`harness.tune_spec`).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddsm.config import ConfigError, TrialConfig, from_dict, set_in, yaml_problem
from harness.cost import SMOKE_COST, CostSettings, settings_from

__all__ = [
    "DEFAULT_RETRY_ON", "DEFAULT_TRACKING_OUTAGE_S", "SMOKE_OVERRIDES", "Baseline", "ExtraCell", "GridSpec", "Mode",
    "Resources", "SpecError", "field_type",
    "flatten", "load_spec", "parse_spec", "read_spec_file", "resolve_config",
]

# --smoke: a few steps on tiny inputs; a spec's own `smoke:` overrides are applied on top of these.
SMOKE_OVERRIDES: dict[str, Any] = {
    "train.steps": 2, "train.val_every": 0, "train.ckpt_every": 0, "train.warmup_steps": 0, "train.log_every": 1,
    "train.ohem_min_kept": 256,
    "data.batch_size": 2, "data.workers": 0, "data.num_images": 4, "data.image_size": [64, 64],
    "data.crop_size": [64, 64],
    "eval.max_images": 2, "eval.sliding": False, "eval.scales": [1.0], "eval.flip": False,
    "model.weights": None,
}

SPEC_KEYS = ("name", "description", "baseline", "base", "baselines", "axes", "cells", "seeds", "resources",
             "max_failures", "retry_on", "tracking_outage_s", "smoke", "cost", "figures")
# nan is not retried by default: the same seed resumed from the same checkpoint diverges again.
DEFAULT_RETRY_ON = ("oom", "error", "killed", "node_lost")
DEFAULT_TRACKING_OUTAGE_S = 1800  # how long the tracking store may stay away mid-run before the driver stops


class SpecError(ConfigError):
    """A spec has one or more problems; ``problems`` holds one readable line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = list(dict.fromkeys(problems))  # de-duplicated, order kept
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in spec {source}:\n{lines}")


@dataclass
class Resources:
    """What one trial asks Ray for; with ``num_workers > 1`` (or ``ddp``) the trial is DDP on Ray Train."""

    cpus: float = 1.0  # per worker
    gpus: float = 0.0  # per worker; fractions share a GPU (0.5 = two trials per GPU)
    num_workers: int = 1  # > 1: DDP via Ray Train's TorchTrainer (SyncBN, per-rank data shards)
    ddp: bool = False  # True: Ray Train DDP even with one worker (e.g. to check NCCL + SyncBN on one GPU)

    @property
    def distributed(self) -> bool:
        """Whether a trial runs as DDP on Ray Train (``num_workers > 1`` or ``ddp``)."""
        return self.num_workers > 1 or self.ddp


@dataclass(frozen=True)
class Mode:
    """How a spec is run (see the module docstring)."""

    smoke: bool = False
    check_paths: bool = True  # dataset folders must exist on this machine


@dataclass
class Baseline:
    """A named variant of the base config, optionally with axes crossed only within it."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    axes: dict[str, list] = field(default_factory=dict)  # dotted key -> values, crossed


@dataclass
class ExtraCell:
    """An explicit extra cell: a baseline (or the bare base) plus overrides."""

    name: str
    baseline: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridSpec:
    """A validated ablation spec (see the module docstring for the file format)."""

    name: str  # the MLflow experiment (see `experiment`)
    base: dict[str, Any]  # a TrialConfig dict
    baselines: list[Baseline]
    baseline: str  # the reference baseline of reports and `--dry-run` diffs
    description: str = ""
    axes: dict[str, list] = field(default_factory=dict)  # crossed with every baseline
    cells: list[ExtraCell] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    resources: Resources = field(default_factory=Resources)  # as written (see `trial_resources`)
    max_failures: int = 1  # retries per cell after the first attempt
    retry_on: list[str] = field(default_factory=lambda: list(DEFAULT_RETRY_ON))
    tracking_outage_s: float = DEFAULT_TRACKING_OUTAGE_S  # the store may be away this long before the driver stops
    smoke: dict[str, Any] = field(default_factory=dict)  # dotted overrides applied by --smoke
    smoke_resources: dict[str, Any] = field(default_factory=dict)  # resources under --smoke (e.g. gpus: 0)
    source: str = "<dict>"
    mode: Mode = field(default_factory=Mode)
    cost: CostSettings = field(default_factory=CostSettings)  # the isolated cost phase (harness/cost.py)
    figures: dict[str, Any] = field(default_factory=dict)  # ddsm.viz.ViewSettings: the report's panels

    @property
    def cost_settings(self) -> CostSettings:
        """``cost`` as run: under --smoke a couple of calls (:data:`harness.cost.SMOKE_COST`)."""
        return dataclasses.replace(self.cost, **SMOKE_COST) if self.mode.smoke else self.cost

    def with_mode(self, *, smoke: bool | None = None, check_paths: bool | None = None) -> GridSpec:
        """This spec run another way (None keeps the current setting)."""
        return dataclasses.replace(self, mode=_mode(self.mode, smoke, check_paths))

    @property
    def experiment(self) -> str:
        """The MLflow experiment: the name, ``-smoke`` appended under --smoke."""
        return self.name + ("-smoke" if self.mode.smoke else "")

    @property
    def trial_resources(self) -> Resources:
        """The per-trial resources, with ``smoke.resources`` applied under --smoke."""
        return trial_resources(self.resources, self.smoke_resources, self.mode)

    def resolve(self, overrides: dict[str, Any], *, seed: int) -> TrialConfig:
        """base <- ``overrides`` <- seed <- (smoke) smoke overrides -> a validated TrialConfig (or ConfigError)."""
        final = {**SMOKE_OVERRIDES, **self.smoke} if self.mode.smoke else {}
        return resolve_config(self.base, overrides, seed=seed, final=final, mode=self.mode,
                              resources=self.trial_resources)


def _mode(mode: Mode, smoke: bool | None, check_paths: bool | None) -> Mode:
    return Mode(smoke=mode.smoke if smoke is None else smoke,
                check_paths=mode.check_paths if check_paths is None else check_paths)


def trial_resources(resources: Resources, smoke_resources: dict[str, Any], mode: Mode) -> Resources:
    """``resources`` with ``smoke_resources`` on top when ``mode.smoke``."""
    if not mode.smoke:
        return resources
    return from_dict({**dataclasses.asdict(resources), **smoke_resources}, Resources)


# ----------------------------------------------------------------------------- resolving one config


def resolve_config(base: dict[str, Any], overrides: dict[str, Any], *, seed: int, final: dict[str, Any],
                   mode: Mode, resources: Resources | None = None) -> TrialConfig:
    """base <- dotted ``overrides`` <- seed <- ``final`` (the smoke overrides) -> a validated TrialConfig.

    Dataset roots are made absolute (Ray workers run elsewhere); under smoke an absent dataset is
    replaced by synthetic data; with ``mode.check_paths`` an absent dataset is a ConfigError. With the
    trial's ``resources``, what the computation depends on is fixed here, so the cell hash holds it:
    ``train.device: auto`` becomes ``cuda`` when the trial gets a GPU, else ``cpu``, and
    ``train.threads: 0`` becomes the trial's CPUs (torch intra-op threads; on CPU the results depend on
    them), so a grid cell and ``ddsm-bench train <cell>/config.yaml`` run the same computation.
    """
    from ddsm.models import list_models  # torch import: keep `ddsm-bench --help` fast

    d = copy.deepcopy(base)
    for key, value in overrides.items():
        set_in(d, key.split("."), copy.deepcopy(value))
    set_in(d, ["train", "seed"], seed)
    for key, value in final.items():
        set_in(d, key.split("."), copy.deepcopy(value))
    cfg = from_dict(d).validate()
    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name={cfg.model.name!r} is not allowed: expected one of {', '.join(list_models())}")
    if resources is not None:
        if cfg.train.device == "auto":
            cfg.train.device = "cuda" if resources.gpus > 0 else "cpu"
        if cfg.train.threads == 0:
            cfg.train.threads = max(1, int(resources.cpus))
    return _resolve_data(cfg, mode)


def _resolve_data(cfg: TrialConfig, mode: Mode) -> TrialConfig:
    """Make a dataset root absolute; under smoke, swap an absent one for synthetic data."""
    from ddsm.data import DATASETS

    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.data.name!r} is not allowed: expected one of {', '.join(DATASETS)}")
    if cfg.data.name == "synthetic":
        return cfg
    module = importlib.import_module(f"ddsm.data.{cfg.data.name}")
    try:
        root = Path(module.resolve_root(cfg.data.root)).resolve()
    except ConfigError:
        root = None
    if root is not None and root.is_dir():
        cfg.data.root = str(root)
        return cfg
    if mode.smoke:
        cfg.data = dataclasses.replace(cfg.data, name="synthetic", root=None)
        return cfg
    if mode.check_paths:
        raise ConfigError(f"data.root={cfg.data.root!r} ({cfg.data.name}) does not exist here: expected the dataset "
                          "folder (or run with --smoke, which uses synthetic data when the dataset is absent)")
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; already-dotted keys are kept."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- parsing a grid spec


def read_spec_file(path: str | Path) -> tuple[dict | Any, str]:
    """The YAML content of a spec file (its ``name`` defaulting to the file stem) and its source string."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(str(p), [f"spec file {str(p)!r} does not exist"])
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(str(p), [f"not valid YAML: {yaml_problem(e)}"]) from None
    if isinstance(raw, dict) and not raw.get("name"):
        raw = {**raw, "name": p.stem}
    return raw, str(p)


def load_spec(path: str | Path, *, smoke: bool = False, check_paths: bool = True) -> GridSpec:
    """Read and validate a spec file (run in :class:`Mode` ``smoke``/``check_paths``); raise SpecError (exit 2)."""
    raw, source = read_spec_file(path)
    return parse_spec(raw, source=source, smoke=smoke, check_paths=check_paths)


def parse_spec(raw: Any, *, source: str = "<dict>", smoke: bool = False, check_paths: bool = True) -> GridSpec:
    """Build a GridSpec from a YAML-loaded dict; raise SpecError listing every structural problem."""
    if not isinstance(raw, dict):
        raise SpecError(source, [f"the spec must be a mapping with keys {', '.join(SPEC_KEYS)}, got {raw!r}"])
    problems: list[str] = []
    for key in raw:
        if key not in SPEC_KEYS:
            problems.append(f"unknown key {key!r}; allowed keys: {', '.join(SPEC_KEYS)}")
    common = parse_common(raw, source=source, problems=problems)
    axes = axes_section(raw.get("axes", {}), "axes", problems)
    baselines = baselines_section(raw.get("baselines"), problems)
    names = [b.name for b in baselines]
    cells = _cells(raw.get("cells", []), names, problems)
    reference = typed(raw, "baseline", str, names[0] if names else "", problems)
    if names and reference not in names:
        problems.append(f"baseline={reference!r} is not a baseline name: expected one of {', '.join(names)}")
    cost = CostSettings()
    try:
        cost = settings_from(typed(raw, "cost", dict, {}, problems))
    except ConfigError as e:
        problems.append(str(e))
    figures = _figures(typed(raw, "figures", dict, {}, problems), common.get("base", {}), problems)
    if problems:
        raise SpecError(source, problems)
    return GridSpec(baselines=baselines, baseline=reference, axes=axes, cells=cells, source=source,
                    mode=Mode(smoke=smoke, check_paths=check_paths), cost=cost, figures=figures, **common)


def _figures(raw: dict, base: dict, problems: list[str]) -> dict[str, Any]:
    """The ``figures`` block (:class:`ddsm.viz.ViewSettings`) as a validated dict; its tolerance must be one
    of the base's ``eval.tolerances`` (the per-class boundary F is computed only there)."""
    from ddsm.viz.views import ViewSettings  # torch import: only once a spec is parsed

    try:
        view = ViewSettings.from_dict(raw)
    except (ConfigError, TypeError) as e:
        problems.append(str(e))
        return {}
    tolerances = (base.get("eval") or {}).get("tolerances") if isinstance(base.get("eval"), dict) else None
    tolerances = tolerances if tolerances is not None else TrialConfig().eval.tolerances
    if view.tolerance is not None and view.tolerance not in list(tolerances):
        problems.append(f"figures.tolerance={view.tolerance!r} is not allowed: expected one of base eval.tolerances "
                        f"{list(tolerances)}")
    return view.to_dict()


def parse_common(raw: dict, *, source: str, problems: list[str]) -> dict[str, Any]:
    """The keys grid and tune specs share: name, description, base, seeds, resources, max_failures,
    retry_on, tracking_outage_s, smoke (split into ``smoke`` overrides and ``smoke_resources``); one line per
    problem."""
    from ddsm.engine.failures import FAILURE_CLASSES, NEVER_RETRIED  # torch import: only once a spec is parsed

    name = typed(raw, "name", str, "", problems) or (Path(source).stem if source != "<dict>" else "grid")
    if name and not all(c.isalnum() or c in "-_." for c in name):
        problems.append(f"name={name!r} is not allowed: expected letters, digits, '-', '_' or '.'")
    base = typed(raw, "base", dict, {}, problems)
    _check_overrides(base, "base", problems)
    max_failures = typed(raw, "max_failures", int, 1, problems)
    if max_failures < 0:
        problems.append(f"max_failures={max_failures!r} is not allowed: expected an integer >= 0")
    retry_on = typed(raw, "retry_on", list, list(DEFAULT_RETRY_ON), problems)
    retriable = [c for c in FAILURE_CLASSES if c not in NEVER_RETRIED]
    for c in retry_on:
        if c in NEVER_RETRIED:
            problems.append(f"retry_on: {c!r} is not allowed: a {c} error is deterministic, the same attempt "
                            "fails again (fix the value it names)")
        elif c not in FAILURE_CLASSES:
            problems.append(f"retry_on: {c!r} is not allowed: expected some of {', '.join(retriable)}")
    outage = raw.get("tracking_outage_s")
    if outage is None:
        outage = DEFAULT_TRACKING_OUTAGE_S
    elif isinstance(outage, bool) or not isinstance(outage, (int, float)) or outage <= 0:
        problems.append(f"tracking_outage_s={outage!r} is not allowed: expected seconds > 0 (how long the "
                        "tracking store may stay unreachable before the driver stops)")
        outage = DEFAULT_TRACKING_OUTAGE_S
    smoke_raw = dict(typed(raw, "smoke", dict, {}, problems))
    smoke_resources = smoke_raw.pop("resources", {})
    resources_section(smoke_resources, "smoke.resources", problems)
    return {"name": name, "description": typed(raw, "description", str, "", problems), "base": base,
            "seeds": seed_list(raw.get("seeds", [0]), "seeds", problems),
            "resources": resources_section(raw.get("resources", {}), "resources", problems),
            "max_failures": max_failures, "retry_on": list(retry_on), "tracking_outage_s": float(outage),
            "smoke": overrides_section(smoke_raw, "smoke", problems), "smoke_resources": smoke_resources}


def typed(raw: dict, key: str, tp: type, default: Any, problems: list[str], *, where: str = "") -> Any:
    """``raw[key]`` if it has type ``tp`` (None or absent: ``default``); else a problem and ``default``."""
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{where}{key}={value!r} has the wrong type: expected {tp.__name__}")
        return default
    return value


def _flat_mapping(value: Any, where: str, expected: str, problems: list[str]) -> dict[str, Any]:
    """``value`` (None: empty) flattened to dotted keys, or a wrong-type problem and an empty dict."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}={value!r} has the wrong type: expected {expected}")
        return {}
    return flatten(value)


def overrides_section(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """A mapping of (dotted or nested) overrides -> flat dotted dict, each key and type checked."""
    flat = _flat_mapping(value, where, "a mapping of config keys to values", problems)
    _check_overrides(flat, where, problems)
    return flat


def _check_overrides(d: dict, where: str, problems: list[str]) -> None:
    for key, value in flatten(d).items():
        problem = _key_problem(key, value)
        if problem:
            problems.append(f"{where}: {problem}")


def field_type(key: str, *, noun: str = "key") -> tuple[type, Any] | str:
    """The dataclass holding dotted TrialConfig field ``key`` and the field's annotated type, or a
    one-line problem (a str: unknown key with the allowed ones, a field used as a section, a section)."""
    parts = key.split(".")
    cls: Any = TrialConfig
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(parts[:i])
        if part not in names:
            allowed = ", ".join(f"{prefix + '.' if prefix else ''}{n}" for n in names)
            return f"unknown {noun} {key!r}; allowed keys: {allowed}"
        tp = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        if i != len(parts) - 1:
            return f"unknown {noun} {key!r}: {'.'.join(parts[: i + 1])!r} is a field, not a section"
        return cls, tp
    return f"{key!r} is a section, not a field: give its fields (e.g. {key}.<field>: value)"


def _key_problem(key: str, value: Any) -> str | None:
    """Why ``key=value`` cannot be set on a TrialConfig (unknown key or wrong type), else None."""
    found = field_type(key)
    if isinstance(found, str):
        return found
    if key == "train.seed":
        return "train.seed is set by `seeds:`; list the seeds there instead"
    prefix, _, name = key.rpartition(".")
    try:
        from_dict({name: value}, found[0], prefix=prefix + "." if prefix else "")
    except ConfigError as e:
        return str(e)
    return None


def yaml_number(value: Any) -> Any:
    """``"1e-3"`` -> 0.001 (YAML 1.1 reads 1e-3, without a dot, as a string; ddsm.config accepts it too)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def axes_section(value: Any, where: str, problems: list[str]) -> dict[str, list]:
    """``{dotted key: [values]}``; each value is checked against the config field."""
    out: dict[str, list] = {}
    for key, values in _flat_mapping(value, where, "a mapping of config keys to value lists", problems).items():
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.{key}={values!r} has the wrong type: expected a non-empty list of values")
            continue
        for v in values:
            problem = _key_problem(key, v)
            if problem:
                problems.append(f"{where}: {problem}")
                break
        out[key] = values
    return out


def baselines_section(value: Any, problems: list[str], *, allow_axes: bool = True) -> list[Baseline]:
    """The ``baselines`` list: names (distinct), overrides and (``allow_axes``) axes of each."""
    if not isinstance(value, list) or not value:
        problems.append(f"baselines={value!r} is not allowed: expected a non-empty list of {{name, overrides, axes}}")
        return []
    keys = ("name", "overrides", "axes") if allow_axes else ("name", "overrides")
    out = []
    for where, item in _named_items(value, "baselines", keys, problems):
        out.append(Baseline(name=item["name"], overrides=overrides_section(item.get("overrides"), f"{where}.overrides",
                                                                          problems),
                            axes=axes_section(item.get("axes", {}), f"{where}.axes", problems)))
    names = [b.name for b in out]
    for dup in {n for n in names if names.count(n) > 1}:
        problems.append(f"baselines: name {dup!r} is used more than once")
    return out


def _named_items(items: list, section: str, keys: tuple[str, ...], problems: list[str]) -> Iterator[tuple[str, dict]]:
    """Each ``{name: ..., <keys>}`` item of a list section with its label ``section[name]``; an item without a
    string name, or with a key not in ``keys``, is a problem."""
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"{section}[{i}]={item!r} is not allowed: expected a mapping with a string 'name'")
            continue
        where = f"{section}[{item['name']}]"
        for k in item:
            if k not in keys:
                problems.append(f"{where}: unknown key {k!r}; allowed keys: {', '.join(keys)}")
        yield where, item


def _cells(value: Any, baselines: list[str], problems: list[str]) -> list[ExtraCell]:
    if not isinstance(value, list):
        problems.append(f"cells={value!r} has the wrong type: expected a list of {{name, baseline, overrides}}")
        return []
    out = []
    for where, item in _named_items(value, "cells", ("name", "baseline", "overrides"), problems):
        base = item.get("baseline")
        if base is not None and base not in baselines:
            problems.append(f"{where}: baseline={base!r} is not a baseline name: expected one of "
                            f"{', '.join(baselines)}")
        out.append(ExtraCell(name=item["name"], baseline=base,
                             overrides=overrides_section(item.get("overrides"), f"{where}.overrides", problems)))
    return out


def seed_list(value: Any, where: str, problems: list[str], *, default: list[int] | None = None) -> list[int]:
    """A non-empty list of distinct integers (``seeds``, ``search.confirm_seeds``)."""
    default = [0] if default is None else default
    ok = isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    if not ok:
        problems.append(f"{where}={value!r} is not allowed: expected a non-empty list of integers")
        return list(default)
    if len(set(value)) != len(value):
        problems.append(f"{where}={value!r} is not allowed: seeds must be distinct")
    return list(value)


def resources_section(value: Any, where: str, problems: list[str]) -> Resources:
    """The ``resources`` mapping as :class:`Resources`, each value checked."""
    try:
        res = from_dict(value, Resources, prefix=f"{where}.")
    except ConfigError as e:
        problems.append(str(e))
        return Resources()
    if res.cpus <= 0:
        problems.append(f"{where}.cpus={res.cpus!r} is not allowed: expected a number > 0")
    if res.gpus < 0 or (res.gpus > 1 and res.gpus != int(res.gpus)):
        problems.append(f"{where}.gpus={res.gpus!r} is not allowed: expected >= 0, a fraction < 1 or a whole number")
    if res.num_workers < 1:
        problems.append(f"{where}.num_workers={res.num_workers!r} is not allowed: expected an integer >= 1")
    return res
