"""One trial end to end: build, train (SGD + poly, CE/OHEM, optional AMP), validate, checkpoint, report.

Choices: SGD with momentum and weight decay on every parameter (BN and biases included, as the
torchvision segmentation reference does; the notes do not say what DDSM did); one update per step.

No host sync per step: the losses of each update stay on the device and are read back together
(one all-reduce and one device-to-host copy) every ``train.log_every`` steps, before every
checkpoint and validation, at the end, and at least every :data:`MAX_UNREAD_STEPS` steps. The
first non-finite loss among them raises :class:`~ddsm.engine.failures.TrainingDiverged` naming its
exact iteration. The updates after it (up to the read-back) ran on NaN weights, but no checkpoint
is ever written before its losses were read, so the last checkpoint on disk is always a good one.

:func:`train` is the composition root. It reads every section of the :class:`~ddsm.config.TrialConfig`:
``model`` (via :func:`ddsm.models.build_model_from_config`), ``data`` (dataset, batch_size, workers),
``train`` (steps, lr, momentum, weight_decay, warmup_steps, poly_power, ohem*, aux_weight, amp,
channels_last, grad_clip, seed, val_every, ckpt_every, device, log_every) and ``eval`` (through
:func:`ddsm.engine.evaluate`). Everything else (logging, trackers, Ray reporting) is a
:class:`~ddsm.engine.callbacks.Callback`.

Outputs under ``out_dir``: ``config.yaml``, ``checkpoints/{last,step_<N>}.pt``, and at the end
``metrics.json``, ``per_class_iou.csv`` and ``confusion.csv`` (``failure.json`` when the run fails).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from ddsm.config import ConfigError, TrialConfig, save_config, to_dict
from ddsm.engine.callbacks import Callback, CallbackList
from ddsm.engine.checkpoint import capture_rng, last_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from ddsm.engine.evaluate import distributed_context, evaluate, to_jsonable
from ddsm.engine.failures import TrainingDiverged, classify_failure, sigterm_as_exception
from ddsm.engine.loss import total_loss
from ddsm.engine.sampler import StepSampler
from ddsm.engine.schedule import build_scheduler

__all__ = ["train", "resolve_device", "amp_dtype", "seed_everything", "build_training_model", "intra_op_threads",
           "write_results"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_UNREAD_STEPS = 100  # read the losses back (and check them) at least this often, even without logging


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` picks the device of ``LOCAL_RANK`` (default 0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' is not allowed: CUDA is not available here; expected auto or cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``; None (float32) on CPU, where AMP is ignored."""
    return AMP_DTYPES[amp] if device.type == "cuda" else None


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (``train.threads``; 0 leaves the setting), then restore it.

    On CPU the reductions of a convolution depend on how many threads split them, so the thread count
    is part of a trial's config (and of its cell hash) rather than whatever the process happens to have.
    """
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Turn on ``torch.use_deterministic_algorithms`` (warn-only) for the block, then restore the setting.

    Without ``torch.utils.deterministic.fill_uninitialized_memory``: that switch (on by default with
    deterministic algorithms) writes NaN into every ``torch.empty`` result, ~10% of a CPU training step
    of ddsm (benchmarks/README.md), and only matters for ops that read memory they never wrote.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def build_training_model(cfg: TrialConfig, *, num_classes: int, device: torch.device) -> nn.Module:
    """The model on ``device`` (channels_last if asked); BN -> SyncBatchNorm in a process group on CUDA.

    SyncBatchNorm needs a GPU, so a CPU (gloo) process group keeps per-process BatchNorm. In a group
    of one process it is converted too (torch then computes plain batch statistics), so a 1-worker
    Ray Train trial runs the same modules as a multi-GPU one.
    """
    from ddsm.models import build_model_from_config

    model = build_model_from_config(cfg.model, num_classes=num_classes)
    if _distributed() and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _distributed() -> bool:
    """A ``torch.distributed`` process group is initialised (of any size)."""
    return dist.is_available() and dist.is_initialized()


def _train_loader(cfg: TrialConfig, *, start_step: int, rank: int, world_size: int) -> DataLoader:
    """Infinite training loader whose batch ``i`` is a pure function of (train.seed, start_step + i)."""
    from ddsm.data import build_dataset

    dataset = build_dataset(cfg.data, split="train", train=True)
    sampler = StepSampler(len(dataset), batch_size=cfg.data.batch_size, seed=cfg.train.seed, start_step=start_step,
                          rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=cfg.data.workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(cfg.train.seed))


class _Unread:
    """The losses of the updates not read back yet: device tensors, read and checked in one batch."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.first = 0  # the 1-based iteration of the first unread update
        self.losses: list[dict[str, torch.Tensor]] = []
        self.step_times: list[float] = []

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, iteration: int, losses: dict[str, torch.Tensor], step_time_ms: float) -> None:
        """Keep the 0-d loss tensors of update ``iteration`` (no host sync)."""
        if not self.losses:
            self.first = iteration
        self.losses.append(losses)
        self.step_times.append(step_time_ms)

    def read(self) -> list[dict[str, float]]:
        """Per update: its losses as floats, averaged over ranks, and ``step_time_ms``; then forget them.

        One all-reduce and one host sync for all of them. Every rank reads at the same steps and gets
        the same values, so all ranks stop together. Raises :class:`TrainingDiverged` naming the first
        update whose loss is not finite.
        """
        names = list(self.losses[0])
        values = torch.stack([torch.stack([losses[k] for k in names]) for losses in self.losses])  # (updates, names)
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        rows = [dict(zip(names, row), step_time_ms=ms) for row, ms in zip(values.tolist(), self.step_times)]
        first = self.first
        self.losses, self.step_times = [], []
        for i, row in enumerate(rows):
            if not math.isfinite(row["loss"]):
                raise TrainingDiverged(iteration=first + i, loss=row["loss"])
        return rows


class _Window:
    """Running means of the train metrics between two ``on_train_step`` calls."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def flush(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


def train(cfg: TrialConfig, *, out_dir: str | Path, callbacks: Sequence[Callback] = (), resume: bool = True) -> dict:
    """Train and evaluate one trial; return the final metrics (also written to ``out_dir/metrics.json``).

    Resumes from ``out_dir/checkpoints/last.pt`` when ``resume`` and it exists; the continued run is
    identical to an uninterrupted one on CPU. When a ``torch.distributed`` process group is already
    initialised, the model is wrapped in DDP, the data is sharded per rank and only rank 0 writes.

    Raises:
        TrainingDiverged: the loss became non-finite (classified ``nan``).
        ConfigError: the config cannot be run (e.g. CUDA asked for but absent, or the checkpoint in
            ``out_dir`` belongs to another model).
    """
    cfg.validate()
    out_dir = Path(out_dir).resolve()
    rank, world_size = distributed_context()
    device = resolve_device(cfg.train.device)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "failure.json").unlink(missing_ok=True)
    cbs = CallbackList(callbacks, rank=rank)
    state = {"step": 0}
    try:
        with _deterministic(device.type == "cpu"), intra_op_threads(cfg.train.threads), sigterm_as_exception():
            return _run(cfg, out_dir=out_dir, cbs=cbs, resume=resume, device=device, rank=rank,
                        world_size=world_size, state=state)
    except BaseException as e:
        if rank == 0:
            step = e.iteration - 1 if isinstance(e, TrainingDiverged) else state["step"]  # updates done before it
            failure = {"failure_class": classify_failure(e), "message": str(e), "step": step}
            (out_dir / "failure.json").write_text(json.dumps(failure, indent=2))
        raise


def _run(cfg: TrialConfig, *, out_dir: Path, cbs: CallbackList, resume: bool, device: torch.device, rank: int,
         world_size: int, state: dict) -> dict:
    """The body of :func:`train` (``state["step"]`` tracks progress for the failure record)."""
    from ddsm.data import dataset_info

    t = cfg.train
    ckpt_dir = out_dir / "checkpoints"
    info = dataset_info(cfg.data.name, cfg.data)
    seed_everything(t.seed)
    model = build_training_model(cfg, num_classes=info.num_classes, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps=t.steps, warmup_steps=t.warmup_steps, power=t.poly_power)
    dtype = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    ckpt_path = last_checkpoint(out_dir) if resume else None
    if ckpt_path is not None:
        step = _restore(ckpt_path, cfg, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        device=device)
    else:
        step = 0
        if rank == 0:
            for stale in ckpt_dir.glob("step_*.pt"):
                stale.unlink()
    state["step"] = step

    saved_step = step if ckpt_path is not None else -1

    def checkpoint() -> None:
        nonlocal saved_step
        path = ckpt_dir / "last.pt"
        saved_step = step
        if rank == 0:
            net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            path = save_checkpoint(ckpt_dir, {
                "step": step, "config": to_dict(cfg), "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": capture_rng()})
        if world_size > 1:
            dist.barrier()
        cbs.on_checkpoint(step, path)

    if ckpt_path is None:
        checkpoint()  # step 0: there is always a last good checkpoint, even if the first update diverges
    if _distributed():  # a process group of any size, so 1-worker DDP trials run DDP too
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(_train_loader(cfg, start_step=step, rank=rank, world_size=world_size))
    window, unread = _Window(), _Unread(world_size)
    loss_kwargs = dict(aux_weight=t.aux_weight, ignore_index=info.ignore_index, ohem=t.ohem,
                       ohem_thresh=t.ohem_thresh, ohem_min_kept=t.ohem_min_kept)
    model.train()
    start_time = time.perf_counter()
    while step < t.steps:
        tic = time.perf_counter()
        images, labels = next(batches)  # (B, 3, H, W), (B, H, W)
        lr = optimizer.param_groups[0]["lr"]  # the LR this update uses
        losses = _update(model, images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                         optimizer=optimizer, scaler=scaler, params=params, dtype=dtype, cfg=cfg,
                         loss_kwargs=loss_kwargs)
        scheduler.step()
        step += 1
        state["step"] = step
        unread.add(step, losses, 1000 * (time.perf_counter() - tic))  # on a GPU: launch time (sums right)
        log = (t.log_every > 0 and step % t.log_every == 0) or step == t.steps
        ckpt = t.ckpt_every > 0 and step % t.ckpt_every == 0 and step < t.steps
        val = t.val_every > 0 and step % t.val_every == 0 and step < t.steps
        if log or ckpt or val or len(unread) >= MAX_UNREAD_STEPS:
            for values in unread.read():  # raises TrainingDiverged at the first non-finite loss
                window.add(values)
        if log:
            cbs.on_train_step(step, {**window.flush(), "lr": lr})
        if ckpt:
            checkpoint()
        if val:
            cbs.on_eval(step, _validate(model, cfg, device=device))
    train_time = time.perf_counter() - start_time
    if step != saved_step:
        checkpoint()
    metrics = _validate(model, cfg, device=device)
    cbs.on_eval(step, metrics)
    metrics.update(step=step, device=str(device), amp_dtype=str(dtype or torch.float32).removeprefix("torch."),
                   world_size=world_size, train_time_s=train_time,
                   dist_backend=dist.get_backend() if _distributed() else "none",
                   sync_batchnorm=any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()))
    if rank == 0:
        net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        metrics.update(_trial_cost(net, cfg, device=device))
        write_results(metrics, out_dir)
    metrics.pop("confusion", None)
    cbs.on_end(metrics)
    return metrics


def _validate(model: nn.Module, cfg: TrialConfig, *, device: torch.device) -> dict[str, Any]:
    """:func:`evaluate`'s metrics plus every DDSM layer's mean / max |offset| of the last training
    forward (:func:`ddsm.models.offset_stats`; read before validating, which runs forwards of its own)."""
    from ddsm.models import offset_stats

    offsets = offset_stats(model)
    return {**evaluate(model, cfg, device=device), **offsets}


def _update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, params: list[nn.Parameter], dtype: torch.dtype | None, cfg: TrialConfig,
            loss_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One optimiser update: forward under autocast, float32 loss, scaled backward, clip, step.

    No host sync: returns the detached 0-d loss tensors (``loss``, ``loss_main``, ``loss_aux`` when
    there is an aux head), which :func:`_run` reads back and checks for NaN/inf in batches.
    """
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W) stored NHWC
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = model(images)
    losses = total_loss(outputs, labels, **loss_kwargs)  # float32, outside autocast
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    if cfg.train.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach() for k, v in losses.items()}


def _restore(path: Path, cfg: TrialConfig, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: torch.amp.GradScaler, device: torch.device) -> int:
    """Load a checkpoint into the (unwrapped) model and the optimiser state; return its step."""
    ckpt = load_checkpoint(path, map_location=device)
    saved, current = ckpt["config"].get("model", {}), to_dict(cfg.model)
    changed = [k for k in current if saved.get(k) != current[k]]
    if changed:
        k = changed[0]
        raise ConfigError(f"cannot resume from {path}: model.{k} is {saved.get(k)!r} there but {current[k]!r} now; "
                          "expected the same model config (use another output directory or resume=False)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"])
    return int(ckpt["step"])


def _trial_cost(model: nn.Module, cfg: TrialConfig, *, device: torch.device) -> dict[str, Any]:
    """:func:`ddsm.profile.trial_cost`, or ``{"cost_error": ...}`` if it is missing or fails (never fatal)."""
    try:
        from ddsm.profile import trial_cost

        return dict(trial_cost(model, cfg, device=device))
    except Exception as e:  # profiling must not kill a finished trial
        return {"cost_error": f"{type(e).__name__}: {e}"}


def write_results(metrics: dict[str, Any], out_dir: str | Path) -> None:
    """``metrics.json`` (everything but the matrix; NaN -> null), ``per_class_iou.csv`` and ``confusion.csv``."""
    out_dir = Path(out_dir)
    names = metrics.get("class_names") or [str(i) for i in range(len(metrics.get("per_class_iou", [])))]
    public = {k: v for k, v in metrics.items() if k != "confusion"}
    (out_dir / "metrics.json").write_text(json.dumps(to_jsonable(public), indent=2) + "\n")
    lines = ["class_id,class_name,iou"]
    for i, (name, iou) in enumerate(zip(names, metrics.get("per_class_iou", []))):
        lines.append(f"{i},{name},{'' if iou is None or math.isnan(iou) else repr(float(iou))}")
    (out_dir / "per_class_iou.csv").write_text("\n".join(lines) + "\n")
    if "confusion" in metrics:
        rows = [",".join(["gt\\pred", *names])]
        rows += [",".join([name, *(str(int(v)) for v in row)]) for name, row in zip(names, metrics["confusion"])]
        (out_dir / "confusion.csv").write_text("\n".join(rows) + "\n")
