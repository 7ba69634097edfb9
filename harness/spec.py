"""Ablation grid specs: one YAML file -> validated dataclasses -> a deterministic list of hashed cells.

A spec (see ``ablations/*.yaml``) has a ``base`` TrialConfig dict, named ``baselines`` (overrides of
the base, each optionally with its own ``axes``), global ``axes`` crossed with every baseline,
explicit extra ``cells``, ``seeds`` (each sets ``train.seed``), per-trial ``resources`` and retry
policy. Overrides are mappings whose keys may be dotted (``model.name: fpn``) or nested
(``model: {name: fpn}``).

A cell's config is built in this order: base <- baseline overrides <- global axis values <-
baseline axis values <- cell overrides <- seed <- (``--smoke``) smoke overrides. Its hash is the
first 12 hex digits of the sha256 of the canonical JSON of the resolved TrialConfig, where the model
fields a model does not read (``ddsm.models.model_options``) are reset to their defaults, so e.g.
``num_points`` cannot make two FPN cells differ.

Every problem in a spec (unknown keys, wrong types, impossible values, duplicate cells) is collected
and raised at once as a :class:`SpecError` with one line per problem, before anything is launched or
written.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddsm.config import ConfigError, ModelConfig, TrialConfig, from_dict, set_in, to_dict

__all__ = [
    "FAILURE_CLASSES", "SMOKE_OVERRIDES", "Baseline", "Cell", "ExtraCell", "GridSpec", "Resources", "SpecError",
    "canonical_config", "cell_hash", "config_diff", "effective_resources", "expand", "flatten", "load_spec",
    "parse_spec", "reference_config", "resolve_config",
]

FAILURE_CLASSES = ("oom", "nan", "error", "killed")

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
             "max_failures", "retry_on", "smoke")


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

    name: str  # the MLflow experiment
    base: dict[str, Any]  # a TrialConfig dict
    baselines: list[Baseline]
    baseline: str  # the reference baseline of reports and `--dry-run` diffs
    description: str = ""
    axes: dict[str, list] = field(default_factory=dict)  # crossed with every baseline
    cells: list[ExtraCell] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 1  # retries per cell after the first attempt
    # nan is not retried by default: same seed + same checkpoint diverge again (deterministic).
    retry_on: list[str] = field(default_factory=lambda: ["oom", "error", "killed"])
    smoke: dict[str, Any] = field(default_factory=dict)  # dotted overrides applied by --smoke
    smoke_resources: dict[str, Any] = field(default_factory=dict)  # resources under --smoke (e.g. gpus: 0)
    source: str = "<dict>"


@dataclass(frozen=True)
class Cell:
    """One trial of the grid: a resolved, canonical config and its content hash."""

    variant: str  # what the cell is, without the seed, e.g. "ddsm[branches=spatial]"
    baseline: str  # the baseline it derives from ("" for a bare-base extra cell)
    seed: int
    reference: str | None  # the reference-baseline variant with the same values on its axes (None: none)
    overrides: tuple[tuple[str, Any], ...]  # every dotted override applied on top of the base
    config: TrialConfig
    hash: str

    @property
    def name(self) -> str:
        """``<variant>/seed=<seed>``."""
        return f"{self.variant}/seed={self.seed}"


# ----------------------------------------------------------------------------- hashing


def canonical_config(cfg: TrialConfig) -> TrialConfig:
    """A copy of ``cfg`` with the model fields its model does not read reset to their defaults."""
    from ddsm.models import model_options  # torch import: keep `ddsm-bench --help` fast

    used = {"name", "backbone", *model_options(cfg.model.name)}
    defaults = ModelConfig()
    reset = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in used}
    out = copy.deepcopy(cfg)
    out.model = dataclasses.replace(out.model, **reset)
    return out


def cell_hash(cfg: TrialConfig, *, world_size: int = 1) -> str:
    """First 12 hex digits of sha256 over the canonical JSON of the canonical config.

    ``data.batch_size`` is per rank, so a DDP trial (``world_size > 1``) trains with a larger global
    batch: its world size is then hashed too (single-process cells hash the config alone).
    """
    body: dict[str, Any] = to_dict(canonical_config(cfg))
    if world_size > 1:
        body = {"config": body, "world_size": world_size}
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


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


def config_diff(cfg: TrialConfig, ref: TrialConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ: ``{key: (value in cfg, value in ref)}``."""
    a, b = flatten(to_dict(cfg)), flatten(to_dict(ref))
    return {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}


# ----------------------------------------------------------------------------- parsing


def load_spec(path: str | Path) -> GridSpec:
    """Read and validate a spec file; raise SpecError (exit 2) listing every structural problem."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(str(p), [f"spec file {str(p)!r} does not exist"])
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(str(p), [f"not valid YAML: {str(e).splitlines()[0]}"]) from None
    return parse_spec(raw, source=str(p))


def parse_spec(raw: Any, *, source: str = "<dict>") -> GridSpec:
    """Build a GridSpec from a YAML-loaded dict; raise SpecError listing every structural problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SpecError(source, [f"the spec must be a mapping with keys {', '.join(SPEC_KEYS)}, got {raw!r}"])
    for key in raw:
        if key not in SPEC_KEYS:
            problems.append(f"unknown key {key!r}; allowed keys: {', '.join(SPEC_KEYS)}")

    name = _typed(raw, "name", str, "", problems) or (Path(source).stem if source != "<dict>" else "grid")
    description = _typed(raw, "description", str, "", problems)
    if name and not all(c.isalnum() or c in "-_." for c in name):
        problems.append(f"name={name!r} is not allowed: expected letters, digits, '-', '_' or '.'")
    base = _typed(raw, "base", dict, {}, problems)
    _check_overrides(base, "base", problems)
    axes = _axes(raw.get("axes", {}), "axes", problems)
    baselines = _baselines(raw.get("baselines"), problems)
    cells = _cells(raw.get("cells", []), [b.name for b in baselines], problems)
    seeds = _seeds(raw.get("seeds", [0]), problems)
    resources = _resources(raw.get("resources", {}), "resources", problems)
    max_failures = _typed(raw, "max_failures", int, 1, problems)
    if max_failures < 0:
        problems.append(f"max_failures={max_failures!r} is not allowed: expected an integer >= 0")
    retry_on = _typed(raw, "retry_on", list, ["oom", "error", "killed"], problems)
    for c in retry_on:
        if c not in FAILURE_CLASSES:
            problems.append(f"retry_on: {c!r} is not allowed: expected some of {', '.join(FAILURE_CLASSES)}")
    smoke_raw = dict(_typed(raw, "smoke", dict, {}, problems))
    smoke_resources = smoke_raw.pop("resources", {})
    _resources(smoke_resources, "smoke.resources", problems)
    smoke = _overrides(smoke_raw, "smoke", problems)

    names = [b.name for b in baselines]
    reference = _typed(raw, "baseline", str, names[0] if names else "", problems)
    if names and reference not in names:
        problems.append(f"baseline={reference!r} is not a baseline name: expected one of {', '.join(names)}")
    for dup in {n for n in names if names.count(n) > 1}:
        problems.append(f"baselines: name {dup!r} is used more than once")
    if problems:
        raise SpecError(source, problems)
    return GridSpec(name=name, description=description, base=base, baselines=baselines,
                    baseline=reference, axes=axes, cells=cells, seeds=seeds, resources=resources,
                    max_failures=max_failures, retry_on=list(retry_on), smoke=smoke,
                    smoke_resources=smoke_resources, source=source)


def _typed(raw: dict, key: str, tp: type, default: Any, problems: list[str]) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{key}={value!r} has the wrong type: expected {tp.__name__}")
        return default
    return value


def _overrides(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """A mapping of (dotted or nested) overrides -> flat dotted dict, each key and type checked."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}={value!r} has the wrong type: expected a mapping of config keys to values")
        return {}
    flat = flatten(value)
    _check_overrides(flat, where, problems)
    return flat


def _check_overrides(d: dict, where: str, problems: list[str]) -> None:
    for key, value in flatten(d).items():
        problem = _key_problem(key, value)
        if problem:
            problems.append(f"{where}: {problem}")


def _key_problem(key: str, value: Any) -> str | None:
    """Why ``key=value`` cannot be set on a TrialConfig (unknown key or wrong type), else None."""
    parts = key.split(".")
    cls: Any = TrialConfig
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = ".".join(parts[:i])
        if part not in fields:
            allowed = ", ".join(f"{prefix + '.' if prefix else ''}{n}" for n in fields)
            return f"unknown key {key!r}; allowed keys: {allowed}"
        tp = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        if i != len(parts) - 1:
            return f"unknown key {key!r}: {'.'.join(parts[: i + 1])!r} is not a section"
        if key == "train.seed":
            return "train.seed is set by `seeds:`; list the seeds there instead"
        try:
            from_dict({parts[-1]: value}, cls, prefix=prefix + ".")
        except ConfigError as e:
            return str(e)
        return None
    return f"{key!r} is a section, not a field: give its fields (e.g. {key}.<field>: value)"


def _axes(value: Any, where: str, problems: list[str]) -> dict[str, list]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}={value!r} has the wrong type: expected a mapping of config keys to value lists")
        return {}
    out: dict[str, list] = {}
    for key, values in flatten(value).items():
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


def _baselines(value: Any, problems: list[str]) -> list[Baseline]:
    if not isinstance(value, list) or not value:
        problems.append(f"baselines={value!r} is not allowed: expected a non-empty list of {{name, overrides, axes}}")
        return []
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"baselines[{i}]={item!r} is not allowed: expected a mapping with a string 'name'")
            continue
        where = f"baselines[{item['name']}]"
        for k in item:
            if k not in ("name", "overrides", "axes"):
                problems.append(f"{where}: unknown key {k!r}; allowed keys: name, overrides, axes")
        out.append(Baseline(name=item["name"], overrides=_overrides(item.get("overrides"), f"{where}.overrides", problems),
                            axes=_axes(item.get("axes", {}), f"{where}.axes", problems)))
    return out


def _cells(value: Any, baselines: list[str], problems: list[str]) -> list[ExtraCell]:
    if not isinstance(value, list):
        problems.append(f"cells={value!r} has the wrong type: expected a list of {{name, baseline, overrides}}")
        return []
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"cells[{i}]={item!r} is not allowed: expected a mapping with a string 'name'")
            continue
        where = f"cells[{item['name']}]"
        for k in item:
            if k not in ("name", "baseline", "overrides"):
                problems.append(f"{where}: unknown key {k!r}; allowed keys: name, baseline, overrides")
        base = item.get("baseline")
        if base is not None and base not in baselines:
            problems.append(f"{where}: baseline={base!r} is not a baseline name: expected one of {', '.join(baselines)}")
        out.append(ExtraCell(name=item["name"], baseline=base,
                             overrides=_overrides(item.get("overrides"), f"{where}.overrides", problems)))
    return out


def _seeds(value: Any, problems: list[str]) -> list[int]:
    ok = isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    if not ok:
        problems.append(f"seeds={value!r} is not allowed: expected a non-empty list of integers")
        return [0]
    if len(set(value)) != len(value):
        problems.append(f"seeds={value!r} is not allowed: seeds must be distinct")
    return list(value)


def _resources(value: Any, where: str, problems: list[str]) -> Resources:
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


# ----------------------------------------------------------------------------- expansion


def effective_resources(spec: GridSpec, *, smoke: bool = False) -> Resources:
    """The per-trial resources, with the spec's ``smoke.resources`` applied under ``--smoke``."""
    if not smoke:
        return spec.resources
    return from_dict({**dataclasses.asdict(spec.resources), **spec.smoke_resources}, Resources)


def expand(spec: GridSpec, *, smoke: bool = False, check_paths: bool = True) -> list[Cell]:
    """Every cell of the grid in a deterministic order; raise SpecError listing every problem.

    Args:
        spec: a parsed spec.
        smoke: apply the smoke overrides; a dataset whose root is absent is replaced by synthetic data
            (smoke checks the plumbing, not the data).
        check_paths: check that dataset roots exist here (off when the data lives on a remote cluster).
    """
    world_size = effective_resources(spec, smoke=smoke).num_workers
    failures: dict[str, list[str]] = {}  # problem -> the cells that have it (one line per problem)
    cells: list[Cell] = []
    for variant, baseline, overrides in _plans(spec):
        for seed in spec.seeds:
            where = f"{variant}/seed={seed}"
            try:
                cfg = resolve_config(spec, overrides, seed=seed, smoke=smoke, check_paths=check_paths)
            except ConfigError as e:
                failures.setdefault(str(e), []).append(where)
                continue
            cells.append(Cell(variant=variant, baseline=baseline, seed=seed, reference=_reference(spec, cfg),
                              overrides=tuple(overrides.items()), config=canonical_config(cfg),
                              hash=cell_hash(cfg, world_size=world_size)))
    problems = [f"{where[0]}{f' (and {len(where) - 1} more cells)' if len(where) > 1 else ''}: {msg}"
                for msg, where in failures.items()]
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.hash in seen:
            problems.append(f"duplicate cells: {seen[c.hash].name!r} and {c.name!r} resolve to the same config "
                            f"(hash {c.hash}); an axis or override has no effect there (e.g. a DDSM-only field on "
                            "another model)")
        else:
            seen[c.hash] = c
    if problems:
        raise SpecError(spec.source, problems)
    return cells


def reference_config(spec: GridSpec, cell: Cell, *, smoke: bool = False) -> TrialConfig | None:
    """The config of ``cell.reference`` with the seed of ``cell`` (None when the cell has no reference)."""
    ref = next(b for b in spec.baselines if b.name == spec.baseline)
    assign = _reference_assignment(spec, cell.config)
    if assign is None:
        return None
    return resolve_config(spec, {**ref.overrides, **assign}, seed=cell.seed, smoke=smoke, check_paths=False)


def _reference(spec: GridSpec, cfg: TrialConfig) -> str | None:
    """Label of the reference-baseline variant whose axis values equal those of ``cfg`` (None: no such)."""
    assign = _reference_assignment(spec, cfg)
    return None if assign is None else _label(spec.baseline, assign)


def _reference_assignment(spec: GridSpec, cfg: TrialConfig) -> dict[str, Any] | None:
    ref = next(b for b in spec.baselines if b.name == spec.baseline)
    flat = flatten(to_dict(cfg))
    assign = {}
    for key, values in {**spec.axes, **ref.axes}.items():
        match = [v for v in values if v == flat.get(key)]
        if not match:
            return None
        assign[key] = match[0]
    return assign


def _plans(spec: GridSpec):
    """(variant label, baseline name, dotted overrides) in file order."""
    for b in spec.baselines:
        axes = {**spec.axes, **b.axes}
        for values in itertools.product(*axes.values()):
            assign = dict(zip(axes, values))
            yield _label(b.name, assign), b.name, {**b.overrides, **assign}
    for c in spec.cells:
        over = dict(next((b.overrides for b in spec.baselines if b.name == c.baseline), {}))
        yield c.name, c.baseline or "", {**over, **c.overrides}


def _label(name: str, assign: dict[str, Any]) -> str:
    """``ddsm[branches=spatial,num_points=4]``: the baseline name and its axis values (short keys)."""
    if not assign:
        return name
    labels = _axis_labels(list(assign))
    return f"{name}[{','.join(f'{labels[k]}={_fmt(v)}' for k, v in assign.items())}]"


def _axis_labels(keys: list[str]) -> dict[str, str]:
    """Short axis names (last key part) unless two axes share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _fmt(v: Any) -> str:
    return "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def resolve_config(spec: GridSpec, overrides: dict[str, Any], *, seed: int, smoke: bool = False,
                   check_paths: bool = True) -> TrialConfig:
    """base <- overrides <- seed <- (smoke) smoke overrides -> a validated TrialConfig (or ConfigError)."""
    from ddsm.models import list_models  # torch import: keep `ddsm-bench --help` fast

    d = copy.deepcopy(spec.base)
    for key, value in overrides.items():
        set_in(d, key.split("."), copy.deepcopy(value))
    set_in(d, ["train", "seed"], seed)
    if smoke:
        for key, value in {**SMOKE_OVERRIDES, **spec.smoke}.items():
            set_in(d, key.split("."), copy.deepcopy(value))
    cfg = from_dict(d).validate()
    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name={cfg.model.name!r} is not allowed: expected one of {', '.join(list_models())}")
    return _resolve_data(cfg, smoke=smoke, check_paths=check_paths)


def _resolve_data(cfg: TrialConfig, *, smoke: bool, check_paths: bool) -> TrialConfig:
    """Make a dataset root absolute (Ray workers run elsewhere); under smoke, swap an absent one for synthetic."""
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
    if smoke:
        cfg.data = dataclasses.replace(cfg.data, name="synthetic", root=None)
        return cfg
    if check_paths:
        raise ConfigError(f"data.root={cfg.data.root!r} ({cfg.data.name}) does not exist here: expected the dataset "
                          "folder (or run with --smoke, which uses synthetic data when the dataset is absent)")
    return cfg
