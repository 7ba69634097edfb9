"""What runs inside a trial's process (no Ray, no MLflow): one attempt of one cell or study trial.

:func:`run_trial` trains a :class:`~harness.driver.TrialPayload` with the engine in the cell folder
(resuming from its last checkpoint), sends progress to the driver through an :class:`EventSink`
(an engine Callback), and returns a :class:`~harness.driver.TrialOutcome`; it never raises for a
training failure (the failure is classified, :data:`ddsm.engine.failures.FAILURE_CLASSES`). Its
last event is always ``end`` (status and failure class): a driver that asked the trial to stop
(SIGINT from ``ray.cancel(force=False)``: the engine checkpoints after its current step) waits for
it. :data:`CELL_ARTIFACTS` is the one list of files a finished or failed trial uploads.

Cell folder: the engine's outputs (config.yaml, metrics.json, per_class_iou.csv, confusion.csv,
checkpoints/) plus ``attempts.jsonl`` (one line per launch), ``outcomes.jsonl`` (one line per
attempt's end, written by the driver: status, failure class, node id, error), ``train.log`` (this
process's output), ``result.json`` (written when the attempt finished) and ``failure.rank<r>.json``
(when it failed). Each line of ``attempts.jsonl`` says where the attempt ran: host, pid, Ray node id,
GPU ids and UUIDs, ``CUDA_VISIBLE_DEVICES``, whether it resumed, and for DDP every rank's (``workers``).

Test hook: ``DDSM_BENCH_FAIL_ONCE=<class>:<dir>`` (read by the driver, passed in the payload) makes
every trial fail its first launch with that failure class (error, nan, oom, killed), using
``<dir>/<key>`` as marker.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddsm.config import from_dict
from ddsm.engine.callbacks import Callback, scalar_metrics
from harness.driver import RESULT_FILE, Event, TrialOutcome, TrialPayload, append_jsonl, write_json

__all__ = ["CELL_ARTIFACTS", "FAIL_ONCE_ENV", "EventSink", "cell_artifacts", "placement_info", "root_cause",
           "run_trial", "save_trial_views"]

FAIL_ONCE_ENV = "DDSM_BENCH_FAIL_ONCE"
# Uploaded with every trial's tracking run, where they exist (the checkpoint only on request).
CELL_ARTIFACTS = ("config.yaml", "metrics.json", "per_class_iou.csv", "confusion.csv", "attempts.jsonl",
                  "outcomes.jsonl", "train.log", "evaluations.jsonl", "eval.log", "error.txt")
OUTCOMES_FILE = "outcomes.jsonl"


def cell_artifacts(cell_dir: str | Path, *, checkpoint: bool = False) -> list[tuple[Path, str | None]]:
    """``(file, artifact folder)`` pairs of :data:`CELL_ARTIFACTS`, every file of ``views/`` (the report's
    panels and sampling figures, :mod:`ddsm.viz`) and ``checkpoints/last.pt`` on request."""
    d = Path(cell_dir)
    out: list[tuple[Path, str | None]] = [(d / f, None) for f in CELL_ARTIFACTS]
    if checkpoint:
        out.append((d / "checkpoints" / "last.pt", "checkpoints"))
    from ddsm.viz.views import VIEWS_DIR

    views = d / VIEWS_DIR
    out += [(p, VIEWS_DIR) for p in sorted(views.iterdir()) if p.is_file()] if views.is_dir() else []
    return out


def run_trial(payload: TrialPayload, queue: Any | None, *, rank: int = 0, reraise: bool = False,
              placement: dict[str, Any] | None = None, train_fn: Callable[..., dict] | None = None) -> TrialOutcome:
    """Train one attempt in this process (or, ``payload.mode == "evaluate"``, score the cell's final checkpoint
    with its eval settings: :func:`ddsm.engine.reevaluate`); return its outcome (failures are caught and classified).

    Args:
        payload: the trial and attempt.
        queue: anything with ``put(Event)`` (a Ray queue) receiving progress; None on ranks > 0.
        rank: distributed rank (only rank 0 logs attempts and writes result.json).
        reraise: re-raise a training exception after recording it (DDP: the other ranks must stop too).
        placement: where the attempt runs (:func:`harness.ray_backend.placement`: Ray node id, GPU ids and
            UUIDs, CUDA_VISIBLE_DEVICES; ``workers``: every DDP rank's), written to ``attempts.jsonl``
            and sent with the start event.
        train_fn: what trains (default ``ddsm.engine.train``); anything with its signature
            ``(cfg, *, out_dir, callbacks, resume) -> metrics`` -- the seam for trivial trials in
            placement tests and ``benchmarks/bench_scale.py``.
    """
    import torch

    from ddsm.engine import reevaluate
    from ddsm.engine.failures import classify_failure

    if train_fn is None:
        from ddsm.engine import train as train_fn
    cell_dir = Path(payload.cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    evaluating = payload.mode == "evaluate"
    log = "eval" if evaluating else "train"
    _redirect_output(cell_dir / (f"{log}.log" if rank == 0 else f"{log}.rank{rank}.log"))
    cfg = from_dict(payload.config).validate()
    device = _device_name(cfg.train.device)
    where = {"host": socket.gethostname(), **(placement or {})}
    if rank == 0:
        append_jsonl(cell_dir / ("evaluations.jsonl" if evaluating else "attempts.jsonl"), {
            "attempt": payload.attempt, "time": time.time(), "pid": os.getpid(),
            "resumed": any((cell_dir / "checkpoints").glob("*.pt")), "device": device,
            "eval_hash": payload.eval_hash, **where})
    sink = EventSink(queue, key=payload.key, attempt=payload.attempt) if queue is not None else None
    if sink is not None:
        sink.send("start", 0, {}, info={"device": device, "torch": torch.__version__, **placement_info(where)})
    try:
        _maybe_fail_once(payload, rank=rank)
        if evaluating:
            metrics = reevaluate(cfg, out_dir=cell_dir)
            if sink is not None:
                sink.on_eval(cfg.train.steps, metrics)
        else:
            metrics = train_fn(cfg, out_dir=cell_dir, callbacks=[sink] if sink else [], resume=True)
    except BaseException as e:  # noqa: BLE001 - every failure is classified and reported to the driver
        record = {"failure_class": classify_failure(e), "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(), "rank": rank}
        write_json(cell_dir / f"failure.rank{rank}.json", record)
        if sink is not None:
            sink.send("end", 0, {}, info={"status": "failed", "failure_class": record["failure_class"]})
        if reraise:
            raise
        return _failed(record)
    final = scalar_metrics(metrics)
    if rank == 0 and payload.figures is not None:
        save_trial_views(cfg, cell_dir, payload.figures)
    if rank == 0:
        write_json(cell_dir / RESULT_FILE, {"cell_hash": payload.cell_hash, "eval_hash": payload.eval_hash,
                                            "metrics": final})
    if sink is not None:
        sink.send("end", int(final.get("step", 0)), {}, info={"status": "finished", "failure_class": ""})
    return TrialOutcome(status="finished", metrics=final)


def save_trial_views(cfg: Any, cell_dir: Path, settings: dict) -> None:
    """The end-of-trial hook of the report's figures: predictions and DDSM sampling of the final
    checkpoint in ``<cell>/views/`` (:func:`ddsm.viz.save_views`). Never fails the trial: an error is
    printed to the trial's log and written to ``views/error.txt``."""
    from ddsm.viz import VIEWS_DIR, ViewSettings, save_views_from_checkpoint

    view = ViewSettings.from_dict(settings)
    if not view.enabled:
        return
    try:
        save_views_from_checkpoint(cell_dir, view, cfg=cfg)
    except Exception as e:  # noqa: BLE001 - figures must not fail a trained cell
        (cell_dir / VIEWS_DIR).mkdir(exist_ok=True)
        (cell_dir / VIEWS_DIR / "error.txt").write_text(traceback.format_exc())
        print(f"views not saved: {type(e).__name__}: {e}", flush=True)


def placement_info(where: dict[str, Any]) -> dict[str, str]:
    """A placement record as the start event's string fields: ``host``, ``node_id``, ``gpu_ids``, ``gpu_uuids``,
    ``cuda_visible_devices`` (comma-joined over DDP ranks, in rank order) and ``workers`` (JSON, DDP only)."""
    workers = where.get("workers") or [where]

    def joined(key: str, *, unique: bool = False) -> str:
        values = [str(v) for w in workers for v in (w.get(key) if isinstance(w.get(key), list) else [w.get(key)])
                  if v not in (None, "")]
        return ",".join(dict.fromkeys(values) if unique else values)

    info = {"host": joined("host", unique=True), "node_id": joined("node_id", unique=True),
            "gpu_ids": joined("gpu_ids"), "gpu_uuids": joined("gpu_uuids"),
            "cuda_visible_devices": str(where.get("cuda_visible_devices", ""))}
    if where.get("workers"):
        info["workers"] = json.dumps(where["workers"])
    return info


def root_cause(cell_dir: str | Path) -> TrialOutcome | None:
    """The failure of a DDP attempt from its ranks' ``failure.rank*.json``: the root cause wins over its
    echoes (one rank's OOM or NaN makes the others fail in a collective); None when no rank wrote one."""
    from ddsm.engine.failures import FAILURE_CLASSES

    records = [json.loads(p.read_text()) for p in sorted(Path(cell_dir).glob("failure.rank*.json"))]
    records.sort(key=lambda r: FAILURE_CLASSES.index(r["failure_class"]))
    return _failed(records[0]) if records else None


def _failed(record: dict[str, Any]) -> TrialOutcome:
    return TrialOutcome(status="failed", failure_class=record["failure_class"], error=record["error"],
                        traceback=record.get("traceback", ""))


class EventSink(Callback):
    """The engine callback that forwards progress to the driver as :class:`~harness.driver.Event` (trials
    never talk to MLflow)."""

    rank_zero_only = True

    def __init__(self, queue: Any, *, key: str, attempt: int) -> None:
        self.queue, self.key, self.attempt = queue, key, attempt

    def send(self, kind: str, step: int, metrics: dict, *, info: dict[str, str] | None = None) -> None:
        """Put one event on the queue."""
        self.queue.put(Event(key=self.key, attempt=self.attempt, kind=kind, step=int(step),
                             metrics=scalar_metrics(metrics), time=time.time(), info=info or {}))

    def on_train_step(self, step: int, metrics: dict) -> None:
        """Train loss, lr, step time."""
        self.send("train", step, metrics)

    def on_eval(self, step: int, metrics: dict) -> None:
        """Validation metrics."""
        self.send("eval", step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint is on disk."""
        self.send("checkpoint", step, {})

    def on_resume(self, step: int, path: Path | None, damaged: list[str]) -> None:
        """Where the attempt resumes from, and the damaged checkpoints set aside (recorded in the tracking run)."""
        where = f"{path} (step {step})" if path is not None else "step 0 (no intact checkpoint)"
        self.send("resume", step, {}, info={"path": where, "damaged": " | ".join(damaged)})


def _maybe_fail_once(payload: TrialPayload, *, rank: int) -> None:
    """The DDSM_BENCH_FAIL_ONCE test hook: fail the first launch of each trial with the given class."""
    if not payload.fail_once or rank != 0:
        return
    kind, _, folder = payload.fail_once.partition(":")
    marker = Path(folder) / payload.key
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(kind)
    if kind == "killed":
        os._exit(1)  # the worker process dies: the launcher reports a crashed worker
    if kind == "nan":
        from ddsm.engine.failures import TrainingDiverged

        raise TrainingDiverged(1, float("nan"))
    if kind == "oom":
        raise MemoryError("injected out of memory (DDSM_BENCH_FAIL_ONCE)")
    raise RuntimeError("injected failure (DDSM_BENCH_FAIL_ONCE)")


def _device_name(wanted: str) -> str:
    import torch

    if wanted != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _redirect_output(path: Path) -> None:
    """Send this process's stdout/stderr (fd level) to ``path``: the driver's terminal stays readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.close(fd)
