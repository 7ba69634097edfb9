"""Score a finished trial again from its final checkpoint, with other evaluation settings; nothing is trained.

What a trial's weights are depends only on :func:`ddsm.config.train_identity`; how they are scored is
the ``eval`` section and ``data.val_split``. :func:`reevaluate` loads the newest intact checkpoint of
``<out>/checkpoints/`` (``last.pt`` or its numbered twin; a damaged one is set aside as in a resume), checks that it is the end of a run of the same training (same identity, the last step), evaluates
it with ``cfg`` and rewrites the outputs of the evaluation (``metrics.json``, ``per_class_iou.csv``,
``confusion.csv``, ``config.yaml``), keeping what the training measured (its time, world size and
per-trial cost) from the previous ``metrics.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddsm.config import ConfigError, TrialConfig, from_dict, save_config, train_identity

__all__ = ["TRAINING_KEYS", "reevaluate", "trained_model"]

# Entries of metrics.json that the training measured (kept by a re-evaluation); everything else is the evaluation's.
TRAINING_KEYS = ("step", "world_size", "train_time_s", "amp_dtype", "gflops", "gmacs", "params_m", "latency_ms",
                 "train_step_ms", "peak_mem_mb", "train_peak_mem_mb", "peak_mem_kind", "uncounted_ops", "cost_error")


def trained_model(cfg: TrialConfig, state: dict[str, Any], *, device: Any) -> Any:
    """The model of ``cfg.model`` with the weights ``state``, on ``device``, channels-last if the config says so."""
    import torch

    from ddsm.data import dataset_info
    from ddsm.models import build_model_from_config

    model = build_model_from_config(cfg.model, num_classes=dataset_info(cfg.data.name, cfg.data).num_classes)
    model.load_state_dict(state)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def reevaluate(cfg: TrialConfig, *, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate the final checkpoint in ``out_dir`` with ``cfg``'s evaluation settings; return the metrics.

    Raises:
        ConfigError: no checkpoint, a checkpoint of another training, or one before the last step.
    """
    from ddsm.engine.checkpoint import find_resume
    from ddsm.engine.evaluate import evaluate
    from ddsm.engine.train import intra_op_threads, resolve_device, write_results

    cfg.validate()
    out_dir = Path(out_dir).resolve()
    found = find_resume(out_dir / "checkpoints")
    if found.state is None:
        damaged = f" ({'; '.join(found.damaged)})" if found.damaged else ""
        raise ConfigError(f"cannot re-evaluate {out_dir}: it has no intact final checkpoint{damaged} (train it first)")
    ckpt, path = found.state, found.path
    trained = from_dict(ckpt["config"])
    mine, theirs = train_identity(cfg), train_identity(trained)
    if mine != theirs:
        key = next(f"{s}.{k}" for s in mine for k in {**mine[s], **theirs.get(s, {})}
                   if mine[s].get(k) != theirs.get(s, {}).get(k))
        if mine["data"].get("holds_out_minival") != theirs["data"].get("holds_out_minival"):
            key = "data.val_split (minival is held out of the training images)"
        raise ConfigError(f"cannot re-evaluate {path}: it was trained with another config ({key} differs); "
                          "only eval.* and data.val_split (between val and test) may change")
    if int(ckpt["step"]) != cfg.train.steps:
        raise ConfigError(f"cannot re-evaluate {path}: it holds step {int(ckpt['step'])} of {cfg.train.steps} "
                          "(the training did not finish)")
    device = resolve_device(cfg.train.device)
    with intra_op_threads(cfg.train.threads):
        metrics = evaluate(trained_model(cfg, ckpt["model"], device=device), cfg, device=device)
    previous_path = out_dir / "metrics.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    metrics.update({k: previous[k] for k in TRAINING_KEYS if k in previous})
    metrics.update(step=int(ckpt["step"]), device=str(device))
    write_results(metrics, out_dir)
    save_config(cfg, out_dir / "config.yaml")
    metrics.pop("confusion", None)
    return metrics
