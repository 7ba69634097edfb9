"""Everything a trial would reject, found by the driver before anything is launched or written.

:meth:`ddsm.config.TrialConfig.validate` checks each value on its own (ranges, lists, splits); what
needs the library is checked here, for every resolved config of a grid or study (each distinct
thing once):

- the model: every distinct model config is built once on the meta device (no memory, no weights),
  so any option the builder refuses (``backbone: resnet7``, ``branches: both``, ``pooled_size: 0``,
  ``offset_range: -1``) is named; ``weights`` must be a file, or ``imagenet`` in the torch hub cache
  (only when the data lives here, ``Mode.check_paths``);
- the data: every split a trial reads (train and ``data.val_split``) of every distinct data config is
  built, and for datasets on disk every listed image/label pair's header is read
  (:func:`ddsm.data.check_data`: existence, size, mode, truncation, naming the file and list line);
- the device against the resources: ``train.device: cuda`` on a trial that asks for no GPU.

:func:`check_configs` returns ``{problem: [cell names]}`` so the caller prints one line per problem
(:class:`harness.spec.SpecError`). A ConfigError that still happens inside a worker is classified
``config`` and never retried (:mod:`ddsm.engine.failures`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ddsm.config import ConfigError, ModelConfig, TrialConfig
from harness.spec import Mode, Resources

__all__ = ["check_configs", "check_model", "check_weights"]

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def check_configs(named: Iterable[tuple[str, TrialConfig]], *, resources: Resources, mode: Mode,
                  splits: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Problems of resolved configs (``(cell name, config)`` pairs), each mapped to the cells that have it.

    Args:
        named: the configs to check, each with the name a problem line shows.
        resources: what each trial gets (``train.device: cuda`` needs a GPU).
        mode: ``check_paths`` off (data and weights live on remote workers): files are not checked.
        splits: more splits to read besides train and ``data.val_split`` (a tune spec's confirm split).
    """
    from ddsm.data import check_data

    problems: dict[str, list[str]] = {}
    data_seen: dict[tuple, list[str]] = {}
    model_seen: dict[tuple, list[str]] = {}
    world = resources.num_workers
    for name, cfg in named:
        found: list[str] = []
        if cfg.train.device == "cuda" and resources.gpus <= 0:
            found.append(f"train.device='cuda' is not allowed with resources.gpus={resources.gpus:g}: the trial would "
                         "get no GPU; set resources.gpus >= 1, or train.device: cpu")
        reads = tuple(dict.fromkeys(("train", cfg.data.val_split, *splits)))
        files_here = mode.check_paths or cfg.data.name == "synthetic"
        data_key = (repr(cfg.data), reads, cfg.data.batch_size * world, files_here)
        if data_key not in data_seen:
            data_seen[data_key] = check_data(cfg.data, splits=reads, batch_size=cfg.data.batch_size * world) \
                if files_here else []
        found += data_seen[data_key]
        if not data_seen[data_key]:  # the model needs the number of classes of data that is valid
            model_key = (repr(dataclasses.replace(cfg.model, weights=None)), repr(cfg.data))
            if model_key not in model_seen:
                model_seen[model_key] = check_model(cfg)
            found += model_seen[model_key]
        if mode.check_paths and cfg.model.weights is not None:
            found += check_weights(cfg)
        for problem in found:
            problems.setdefault(problem, []).append(name)
    return problems


def check_model(cfg: TrialConfig) -> list[str]:
    """The model of ``cfg`` built on the meta device (no memory, no weights); the builder's refusal, if any."""
    import torch

    from ddsm.data import dataset_info
    from ddsm.models import build_model_from_config

    try:
        num_classes = dataset_info(cfg.data.name, cfg.data).num_classes
        with torch.device("meta"):
            build_model_from_config(dataclasses.replace(cfg.model, weights=None), num_classes=num_classes)
    except ConfigError as e:
        return [_model_message(str(e))]
    return []


def _model_message(text: str) -> str:
    """``branches='both' is not ...`` -> ``model.branches='both' is not ...`` (the config field it names)."""
    field = text.split("=", 1)[0]
    if field == "model":
        return f"model.name{text[len('model'):]}"
    return f"model.{text}" if field in _MODEL_FIELDS else f"model: {text}"


def check_weights(cfg: TrialConfig) -> list[str]:
    """``model.weights`` must load: a local file, or ``imagenet`` in the torch hub cache (never downloaded)."""
    from pathlib import Path

    import torch

    from ddsm.models.backbone import BACKBONES

    weights, backbone = cfg.model.weights, cfg.model.backbone
    if weights == "imagenet":
        if backbone not in BACKBONES:
            return []  # the backbone itself is reported by check_model
        url = BACKBONES[backbone][1].url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if not cached.is_file():
            return [f"model.weights='imagenet' for {backbone} needs {url} in the torch hub cache ({cached}), which "
                    "is missing: put the file there, or pass model.weights=/path/to/state_dict.pth"]
        return []
    if not Path(weights).is_file():
        return [f"model.weights={weights!r}: no such file; expected 'imagenet' (from the torch hub cache) or a path "
                "to a local ResNet state dict"]
    return []
