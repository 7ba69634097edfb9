"""The isolated cost phase of a grid: latency, train-step time and peak memory of each variant, measured alone.

A trial's own timings are taken while other trials share its machine (two at a time on two cores
make a 30 ms model read 80 +- 60 ms), so a grid reports cost from a separate phase instead. When the
cells are done, every *variant* (not every seed: the seeds of a variant are the same network) gets
one profiling task that runs alone on its device: a whole GPU, or every CPU of a node, which Ray
gives it only when no other task holds any of them, so it waits rather than shares
(:func:`harness.ray_backend.run_isolated`), with the trial's thread count. The task runs the protocol
of ``ddsm-bench profile``
(:func:`ddsm.profile.profile_model`): ``warmup`` untimed calls, then ``repeats`` timed ones (CUDA
events on GPU, ``perf_counter`` on CPU), their median and interquartile range, peak memory of one
more call, and the context (device name, threads, torch/CUDA versions, dtype, size, batch, host).

Results are cached per measurement key in ``<out>/cost/<key>.json`` (a re-run measures only what is
new) and recorded in MLflow: ``cost.json`` on the grid's parent run, its protocol as the parent's
``cost_phase`` tag, and on every finished cell run of the variant the metrics ``latency_ms``,
``train_step_ms``, ``peak_mem_mb``, ``train_peak_mem_mb`` (plus ``_p25``/``_p75`` for the times) and the
``cost_source`` tag; the report's cost columns read those. What each trial measured stays in MLflow
as ``trial_<name>`` diagnostics (:data:`ddsm.metrics.catalogue.TIMED`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddsm.config import to_dict

__all__ = ["CostSettings", "CostTask", "SMOKE_COST", "cost_metrics", "describe", "measure", "plan", "run_cost_phase",
           "settings_from"]


@dataclass(frozen=True)
class CostSettings:
    """The spec's ``cost:`` section: how each variant is profiled (the defaults of ``ddsm-bench profile``)."""

    enabled: bool = True
    repeats: int = 20  # timed calls
    warmup: int = 5  # untimed calls before timing
    batch: int = 1  # latency and inference memory; the train step uses max(batch, 2) (BatchNorm after pooling)
    size: tuple[int, int] | None = None  # input H x W; None: data.crop_size of the variant


SMOKE_COST = {"repeats": 2, "warmup": 1}  # --smoke: check the plumbing, not the numbers


@dataclass(frozen=True)
class CostTask:
    """What one profiling task measures (picklable; the variant is for humans, ``key`` for the cache)."""

    key: str
    variant: str
    model: dict[str, Any]  # ModelConfig as a dict (weights dropped: cost does not depend on their values)
    num_classes: int
    size: tuple[int, int]
    batch: int
    device: str  # cpu | cuda (the variant's train.device)
    amp: str  # train.amp (CUDA only)
    channels_last: bool
    repeats: int
    warmup: int
    threads: int  # torch intra-op threads: the trial's train.threads


def plan(cells: Iterable[Any], settings: CostSettings) -> list[CostTask]:
    """One task per variant (its first cell's config), in cell order."""
    from ddsm.data import dataset_info

    tasks: dict[str, CostTask] = {}
    for cell in cells:
        if cell.variant in tasks:
            continue
        cfg = cell.config
        device = "cuda" if cfg.train.device == "cuda" else "cpu"
        body = {"model": {**to_dict(cfg.model), "weights": None},
                "num_classes": dataset_info(cfg.data.name, cfg.data).num_classes,
                "size": list(settings.size or cfg.data.crop_size), "batch": settings.batch, "device": device,
                "amp": cfg.train.amp if device == "cuda" else "none", "channels_last": cfg.train.channels_last,
                "repeats": settings.repeats, "warmup": settings.warmup, "threads": cfg.train.threads}
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
        tasks[cell.variant] = CostTask(key=key, variant=cell.variant, model=body["model"],
                                       num_classes=body["num_classes"], size=tuple(body["size"]), batch=settings.batch,
                                       device=device, amp=body["amp"], channels_last=body["channels_last"],
                                       repeats=settings.repeats, warmup=settings.warmup,
                                       threads=max(1, int(cfg.train.threads or 1)))
    return list(tasks.values())


def measure(task: CostTask) -> dict[str, Any]:
    """Profile one variant in this process (the task's body; no Ray): ``ddsm-bench profile``'s protocol."""
    from ddsm.config import ModelConfig, from_dict
    from ddsm.models import build_model_from_config
    from ddsm.profile import profile_model

    cfg = from_dict(task.model, ModelConfig, prefix="model.")
    model = build_model_from_config(cfg, num_classes=task.num_classes)
    r = profile_model(model, size=tuple(task.size), batch=task.batch, device=task.device, repeats=task.repeats,
                      warmup=task.warmup, amp=task.amp, channels_last=task.channels_last)
    keep = ("gflops", "params_m", "latency_ms", "train_step_ms", "train_batch", "peak_mem_mb", "train_peak_mem_mb",
            "peak_mem_kind", "device", "device_type", "cpu_threads", "torch", "cuda", "cudnn", "dtype", "size",
            "batch", "amp", "channels_last")
    return {"key": task.key, "variant": task.variant, "host": socket.gethostname(), **{k: r[k] for k in keep}}


def run_cost_phase(tasks: list[CostTask], *, out: Path, run: Callable[[CostTask], dict[str, Any]],
                   log: Callable[[str], None] = lambda line: None) -> dict[str, dict[str, Any]]:
    """Measure every task not in the cache ``<out>/cost/`` with ``run`` (one at a time); ``{variant: record}``.

    ``run`` is :func:`harness.ray_backend.run_isolated` around :func:`measure` in a grid, a counting fake in
    the tests. A task that fails leaves its variant out (with ``error`` in its record, not cached): the
    grid's results stand, the report shows no cost for it.
    """
    folder = out / "cost"
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        path = folder / f"{task.key}.json"
        if path.is_file():
            results[task.variant] = {**json.loads(path.read_text()), "variant": task.variant}
            continue
        log(f"cost: profiling {task.variant} alone on {task.device} ({task.warmup} warm-up + {task.repeats} timed "
            "calls)")
        try:
            record = run(task)
        except Exception as e:  # noqa: BLE001 - a cost failure never fails the grid
            log(f"cost: {task.variant} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            results[task.variant] = {"key": task.key, "variant": task.variant, "error": f"{type(e).__name__}: {e}"}
            continue
        path.write_text(json.dumps(record, indent=1) + "\n")
        results[task.variant] = record
    return results


def cost_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The metrics a cell run of the variant gets from its cost record (empty when it failed)."""
    if "error" in record:
        return {}
    out: dict[str, float] = {}
    for name in ("latency_ms", "train_step_ms"):
        stats = record.get(name)
        if stats:
            out.update({name: stats["median"], f"{name}_p25": stats["p25"], f"{name}_p75": stats["p75"]})
    for name in ("peak_mem_mb", "train_peak_mem_mb"):
        if record.get(name) is not None:
            out[name] = record[name]
    return out


def describe(settings: CostSettings, records: dict[str, dict[str, Any]]) -> str:
    """The protocol in one line, for the report's provenance (the parent's ``cost_phase`` tag)."""
    ok = [r for r in records.values() if "error" not in r]
    devices = sorted({f"{r['device']} ({r['cpu_threads']} thread{'s' if r['cpu_threads'] != 1 else ''})"
                      if r["device_type"] == "cpu" else r["device"] for r in ok})
    size = sorted({"x".join(map(str, r["size"])) for r in ok})
    failed = [v for v, r in records.items() if "error" in r]
    return (f"isolated cost phase: one profiling task per variant, alone on {', '.join(devices) or 'its device'}; "
            f"{settings.warmup} warm-up + {settings.repeats} timed calls, median [p25-p75]; batch {settings.batch}, "
            f"input {', '.join(size) or '-'}; peak memory of one more call"
            + (f"; failed: {', '.join(failed)}" if failed else ""))


def settings_from(raw: dict[str, Any]) -> CostSettings:
    """A validated :class:`CostSettings` from the spec's ``cost:`` mapping (raises ConfigError naming the key)."""
    from ddsm.config import ConfigError, from_dict

    settings = from_dict(raw, CostSettings, prefix="cost.")
    for key, minimum in (("repeats", 1), ("warmup", 0), ("batch", 1)):
        if getattr(settings, key) < minimum:
            raise ConfigError(f"cost.{key}={getattr(settings, key)!r} is not allowed: expected an integer >= {minimum}")
    if settings.size is not None and min(settings.size) < 1:
        raise ConfigError(f"cost.size={settings.size!r} is not allowed: expected two positive ints (H, W)")
    return dataclasses.replace(settings, size=tuple(settings.size) if settings.size else None)
