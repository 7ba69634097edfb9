"""The training engine: one trial end to end, as plain functions plus callbacks.

``train(cfg, out_dir=...)`` builds the model and data from a :class:`~ddsm.config.TrialConfig`,
trains with SGD + poly/warm-up and CE (optionally OHEM), validates, checkpoints (resume is exact on
CPU) and writes ``metrics.json``. ``evaluate(model, cfg, device=...)`` runs validation alone;
``reevaluate(cfg, out_dir=...)`` scores a finished run's final checkpoint with other eval settings.
Logging and tracking are :class:`Callback` subclasses; :func:`classify_failure` tells the harness
whether a trial died of ``oom``, ``nan``, ``config`` (never retried), ``killed``, ``node_lost`` or another
``error``.
"""
from __future__ import annotations

from ddsm.engine.callbacks import Callback, CallbackList, ConsoleLogger, JsonlLogger, scalar_metrics
from ddsm.engine.checkpoint import CheckpointError, find_resume, last_checkpoint, load_checkpoint, save_checkpoint
from ddsm.engine.evaluate import evaluate, predict, sliding_window_logits, to_jsonable
from ddsm.engine.failures import FAILURE_CLASSES, TrainingDiverged, TrialKilled, classify_failure
from ddsm.engine.loss import ohem_keep_mask, segmentation_loss, total_loss
from ddsm.engine.reevaluate import reevaluate
from ddsm.engine.schedule import build_scheduler, poly_factor
from ddsm.engine.train import amp_dtype, resolve_device, train, write_results

__all__ = [
    "Callback",
    "CallbackList",
    "CheckpointError",
    "ConsoleLogger",
    "FAILURE_CLASSES",
    "JsonlLogger",
    "TrainingDiverged",
    "TrialKilled",
    "amp_dtype",
    "build_scheduler",
    "classify_failure",
    "evaluate",
    "find_resume",
    "last_checkpoint",
    "load_checkpoint",
    "ohem_keep_mask",
    "poly_factor",
    "predict",
    "reevaluate",
    "resolve_device",
    "save_checkpoint",
    "scalar_metrics",
    "segmentation_loss",
    "sliding_window_logits",
    "to_jsonable",
    "total_loss",
    "train",
    "write_results",
]
