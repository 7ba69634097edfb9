"""A grid spec -> a deterministic list of hashed cells; reference configs, diffs and the dry-run cost.

A cell's config is built in this order: base <- baseline overrides <- global axis values <-
baseline axis values <- cell overrides <- seed <- (``--smoke``) smoke overrides
(:meth:`harness.spec.GridSpec.resolve`, which also fixes ``train.device`` and ``train.threads`` from
the trial's resources, so they are part of what is hashed).

A cell has two hashes (first 12 hex digits of a sha256 of canonical JSON):

- the **train hash** (``Cell.hash``, :func:`cell_hash`): what determines the weights,
  :func:`ddsm.config.train_identity` of the canonical config (the model fields a model does not read,
  ``ddsm.models.model_options``, reset to their defaults, so e.g. ``num_points`` cannot make two FPN
  cells differ); a DDP cell also hashes its world size (``data.batch_size`` is per rank). Every input
  of the computation is in it: the thread count and the device type (which also fixes the
  deterministic-algorithm setting: on for CPU, off for CUDA). The cell folder is ``cells/<train hash>``.
- the **eval hash** (``Cell.eval_hash``, :func:`eval_hash`): how the weights are scored, the ``eval``
  section and ``data.val_split`` (:func:`ddsm.config.evaluation_identity`). A finished cell whose eval
  hash changed is re-evaluated from its final checkpoint, not trained again (:mod:`harness.grid`).

:data:`HASH_VERSION` is written to ``grid.json``; an out dir of another version is refused (its cells
would all look new).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ddsm.config import (EVAL_DATA_FIELDS, EVAL_SECTION, ConfigError, ModelConfig, TrialConfig, evaluation_identity,
                         to_dict, train_identity)
from harness.spec import GridSpec, SpecError, flatten

__all__ = ["HASH_VERSION", "Cell", "canonical_config", "cell_hash", "config_diff", "dry_run_rows", "eval_fields",
           "eval_hash", "expand", "forward_gflops", "grid_hash", "reference_config", "train_params"]

HASH_VERSION = 2  # 1: one hash over the whole config (eval included); 2: train hash + eval hash


@dataclass(frozen=True)
class Cell:
    """One trial of the grid: a resolved, canonical config and its content hash."""

    variant: str  # what the cell is, without the seed, e.g. "ddsm[branches=spatial]"
    baseline: str  # the baseline it derives from ("" for a bare-base extra cell)
    seed: int
    reference: str | None  # the reference-baseline variant with the same values on its axes (None: none)
    overrides: tuple[tuple[str, Any], ...]  # every dotted override applied on top of the base
    config: TrialConfig
    hash: str  # the train hash (cell folder, MLflow tag cell_hash)
    eval_hash: str = ""  # how it is scored (MLflow tag eval_hash)

    @property
    def name(self) -> str:
        """``<variant>/seed=<seed>``."""
        return f"{self.variant}/seed={self.seed}"


# ----------------------------------------------------------------------------- hashing


def canonical_config(cfg: TrialConfig) -> TrialConfig:
    """A copy of ``cfg`` with the model fields its model does not read reset to their defaults."""
    used = _used_model_fields(cfg)
    defaults = ModelConfig()
    reset = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in used}
    out = copy.deepcopy(cfg)
    out.model = dataclasses.replace(out.model, **reset)
    return out


def _digest(body: Any) -> str:
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cell_hash(cfg: TrialConfig, *, world_size: int = 1) -> str:
    """The train hash: first 12 hex digits of sha256 over the canonical JSON of what determines the weights
    (:func:`ddsm.config.train_identity` of the canonical config).

    ``data.batch_size`` is per rank, so a DDP trial (``world_size > 1``) trains with a larger global
    batch: its world size is then hashed too (single-process cells hash the config alone).
    """
    body: dict[str, Any] = train_identity(canonical_config(cfg))
    if world_size > 1:
        body = {"config": body, "world_size": world_size}
    return _digest(body)


def eval_hash(cfg: TrialConfig) -> str:
    """First 12 hex digits of sha256 over how a trial is scored (:func:`ddsm.config.evaluation_identity`)."""
    return _digest(evaluation_identity(cfg))


def _used_model_fields(cfg: TrialConfig) -> set[str]:
    from ddsm.models import model_options  # torch import: keep `ddsm-bench --help` fast

    return {"name", "backbone", *model_options(cfg.model.name)}


def train_params(cfg: TrialConfig) -> dict[str, Any]:
    """The dotted config fields logged as a run's (immutable) params: everything but the evaluation fields
    (:func:`eval_fields`) and the model fields its model does not read (those are not part of the cell)."""
    used = _used_model_fields(cfg)
    flat = flatten(to_dict(cfg))
    evaluation = eval_fields(cfg)
    return {k: v for k, v in flat.items() if k not in evaluation
            and not (k.startswith("model.") and k.split(".", 1)[1] not in used)}


def eval_fields(cfg: TrialConfig) -> dict[str, Any]:
    """The dotted evaluation fields (``eval.*``, ``data.val_split``): logged as tags, which a re-evaluation
    may change."""
    flat = flatten(to_dict(cfg))
    return {k: v for k, v in flat.items()
            if k.startswith(EVAL_SECTION + ".") or k in {f"data.{f}" for f in EVAL_DATA_FIELDS}}


def grid_hash(hashes: list[str]) -> str:
    """12 hex digits identifying a set of cells (the parent run of a grid is found by it)."""
    return hashlib.sha256(",".join(sorted(hashes)).encode()).hexdigest()[:12]


def config_diff(cfg: TrialConfig, ref: TrialConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ: ``{key: (value in cfg, value in ref)}``."""
    a, b = flatten(to_dict(cfg)), flatten(to_dict(ref))
    return {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}


# ----------------------------------------------------------------------------- expansion


def expand(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid in a deterministic order (in ``spec.mode``); raise SpecError listing every problem."""
    world_size = spec.trial_resources.num_workers
    failures: dict[str, list[str]] = {}  # problem -> the cells that have it (one line per problem)
    cells: list[Cell] = []
    for variant, baseline, overrides in _plans(spec):
        for seed in spec.seeds:
            try:
                cfg = spec.resolve(overrides, seed=seed)
            except ConfigError as e:
                failures.setdefault(str(e), []).append(f"{variant}/seed={seed}")
                continue
            cells.append(Cell(variant=variant, baseline=baseline, seed=seed, reference=_reference(spec, cfg),
                              overrides=tuple(overrides.items()), config=canonical_config(cfg),
                              hash=cell_hash(cfg, world_size=world_size), eval_hash=eval_hash(cfg)))
    if not failures:  # every value resolved: now what only building the model and reading the data can tell
        from harness.validate import check_configs

        failures = check_configs([(c.name, c.config) for c in cells], resources=spec.trial_resources, mode=spec.mode)
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


def reference_config(spec: GridSpec, cell: Cell) -> TrialConfig | None:
    """The config of ``cell.reference`` with the seed of ``cell`` (None when the cell has no reference)."""
    assign = _reference_assignment(spec, cell.config)
    if assign is None:
        return None
    ref = next(b for b in spec.baselines if b.name == spec.baseline)
    return spec.with_mode(check_paths=False).resolve({**ref.overrides, **assign}, seed=cell.seed)


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


def _plans(spec: GridSpec) -> Iterator[tuple[str, str, dict[str, Any]]]:
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
    last = [k.split(".")[-1] for k in assign]
    labels = {k: (s if last.count(s) == 1 else k) for k, s in zip(assign, last)}  # short unless ambiguous
    return f"{name}[{','.join(f'{labels[k]}={_fmt(v)}' for k, v in assign.items())}]"


def _fmt(v: Any) -> str:
    return "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


# ----------------------------------------------------------------------------- dry run


def dry_run_rows(spec: GridSpec, cells: list[Cell]) -> list[dict[str, Any]]:
    """Per cell: hash, name, whether it has a reference, what differs from it (``{key: (value, reference
    value)}``, the seed left out), forward GFLOPs per image and training TFLOPs.

    Training TFLOPs ~= 3 x forward x global batch x steps (backward ~= 2x forward).
    """
    world_size = spec.trial_resources.num_workers
    rows = []
    for c in cells:
        ref = reference_config(spec, c)
        diff = config_diff(c.config, ref) if ref is not None else {}
        diff.pop("train.seed", None)
        gflops = forward_gflops(c.config)
        tflops = 3 * gflops * c.config.data.batch_size * world_size * c.config.train.steps / 1e3
        rows.append({"hash": c.hash, "cell": c.name, "reference": ref is not None, "diff": diff, "gflops": gflops,
                     "train_tflops": tflops})
    return rows


_FLOPS_CACHE: dict[tuple, float] = {}


def forward_gflops(cfg: TrialConfig) -> float:
    """Forward GFLOPs per image at data.crop_size, counted on the meta device (no memory, no weights;
    cached per model and size)."""
    import torch

    from ddsm.data import dataset_info
    from ddsm.models import build_model_from_config
    from ddsm.profile.flops import count_flops

    num_classes = dataset_info(cfg.data.name, cfg.data).num_classes
    model_cfg = dataclasses.replace(cfg.model, weights=None)  # FLOPs do not depend on weights: load none
    key = (repr(model_cfg), tuple(cfg.data.crop_size), num_classes)
    if key not in _FLOPS_CACHE:
        with torch.device("meta"):
            model = build_model_from_config(model_cfg, num_classes=num_classes)
        _FLOPS_CACHE[key] = count_flops(model, torch.empty(1, 3, *cfg.data.crop_size, device="meta")).gflops
    return _FLOPS_CACHE[key]
