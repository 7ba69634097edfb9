"""Trial configuration: plain dataclasses, validated strictly, saved with every run.

A trial is one (model, data, train, eval) configuration. Configs come from YAML files or dicts,
optionally overridden by ``key.sub=value`` strings (``--set`` on the CLI). Every problem raises
:class:`ConfigError` naming the key, the value and what is allowed, before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key, type or value is not allowed; the message is one readable line."""


DEVICES = ("auto", "cpu", "cuda")
VAL_SPLITS = ("val", "test", "minival")  # what data.val_split may name (ddsm/data/__init__.py)


@dataclass
class ModelConfig:
    """Which network to build; DDSM-only fields are ignored (and not hashed) for other models."""

    name: str = "ddsm"  # a registered model (see `ddsm-bench models`)
    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 | resnet101
    weights: str | None = None  # None (random init) | "imagenet" | path to a local state dict
    aux: bool | None = None  # auxiliary FCN head on stage 3 (training only); None = as the model's reference
    decoder_dim: int = 0  # head width; 0 = the reference's (FPN decoder 128/256, context heads 128/512)
    # FPN-decoder models (fpn, sfnet, ddsm), see ddsm/models/decoder.py and backbone.py
    align_corners: bool = True  # one interpolation convention through the decoder (SFSegNets: true)
    backbone_dilation: str = "sfsegnets"  # sfsegnets (variant D: stages 4/5 conv2 dilated 2/4, stride kept) | none
    # DDSM options (see ddsm/models/ddsm.py for what each choice means)
    branches: str = "dual"  # spatial | channel | dual
    num_points: int = 9  # N sampled points/channels, a perfect square k*k with k in 1..7
    pos_embed: str = "sine"  # sine | learned | none
    pooled_size: int = 8  # a: channel branch pools both inputs to a x a
    fusion: str = "sum"  # sum | concat
    offset_range: float = 0.0  # 0 = unbounded offsets; > 0 bounds them by tanh * range (pixels)
    inner_ratio: float = 0.5  # internal width of the spatial branch = ratio * decoder_dim
    spatial_out_of_map: str = "mask"  # mask | zero: a point outside the image (see ddsm/models/sampling.py)
    channel_out_of_map: str = "mask"  # mask | zero: a point outside the channel grid
    channel_order: str = "natural"  # natural | permuted (fixed random grid permutation, seeded by train.seed)
    grid_dilation: int = 1  # spacing of the spatial branch's k x k base grid (pixels)
    learn_offsets: bool = True  # false: points stay on the (dilated) base grid


@dataclass
class DataConfig:
    """Which dataset, where, and how training crops are made."""

    name: str = "synthetic"  # synthetic | camvid | cityscapes
    root: str | None = None  # dataset root (camvid, cityscapes)
    crop_size: tuple[int, int] = (128, 128)  # training crop (H, W)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random scale for training
    flip: bool = True
    jitter: float = 0.25  # brightness / contrast / saturation jitter strength; 0 disables
    hue: float = 0.0  # hue jitter in [0, 0.5] (fraction of the colour wheel; SFSegNets: 0.25); 0 disables
    batch_size: int = 8
    workers: int = 0
    # what a trial validates on (see ddsm/data/__init__.py): val | test | minival (held out of train)
    val_split: str = "val"
    minival_size: int = 0  # images of train held out as minival; 0 = a tenth of train (at least 1)
    minival_seed: int = 0  # which images: a fixed draw, the same for every trial and seed
    # synthetic only
    num_images: int = 64  # training images; val gets num_images // 4
    image_size: tuple[int, int] = (128, 128)
    num_classes: int = 8
    seed: int = 0


@dataclass
class TrainConfig:
    """The optimisation recipe (SGD + poly with warm-up, CE/OHEM, optional AMP)."""

    steps: int = 200
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    poly_power: float = 0.9
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 10000
    aux_weight: float = 0.4
    amp: str = "none"  # none | bf16 | fp16 (CUDA only; ignored on CPU)
    channels_last: bool = False
    grad_clip: float = 0.0  # 0 disables clipping (max global norm otherwise)
    seed: int = 0
    val_every: int = 0  # 0 = validate only at the end
    ckpt_every: int = 0  # 0 = checkpoint only at the end
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads (results depend on it on CPU); 0 = leave torch's setting
    log_every: int = 10


@dataclass
class EvalConfig:
    """How validation runs and which boundary tolerances are reported."""

    tolerances: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0])  # px if >= 1, else fraction of diagonal
    biou_width: int = 3  # band half-width (px) of boundary IoU
    absent_as_one: bool = False  # count classes absent from both maps as F=1 (GSCNN protocol)
    sliding: bool = False
    crop: tuple[int, int] = (512, 512)  # sliding-window crop
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    max_images: int = 0  # 0 = whole val split


@dataclass
class TrialConfig:
    """One trial: everything needed to train and evaluate a model reproducibly."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "TrialConfig":
        """Check values that a type check cannot; raise ConfigError naming the field.

        Everything a trial would reject later (at the first step or at its final evaluation) is checked
        here; model options and dataset files are checked by building them (``harness/validate.py``).
        """
        m, d, t, e = self.model, self.data, self.train, self.eval
        _check(t.steps >= 1, "train.steps", t.steps, "an integer >= 1")
        _check(t.lr > 0, "train.lr", t.lr, "a positive float")
        _check(t.amp in ("none", "bf16", "fp16"), "train.amp", t.amp, "one of none, bf16, fp16")
        _check(t.device in DEVICES, "train.device", t.device, f"one of {', '.join(DEVICES)}")
        _check(t.threads >= 0, "train.threads", t.threads, "0 (torch's setting) or an integer >= 1")
        for key in ("val_every", "ckpt_every", "log_every", "warmup_steps"):
            _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "an integer >= 0")
        _check(0 <= t.ohem_thresh <= 1, "train.ohem_thresh", t.ohem_thresh, "a float in [0, 1]")
        _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
        _check(d.workers >= 0, "data.workers", d.workers, "an integer >= 0")
        _check(all(s > 0 for s in d.crop_size), "data.crop_size", d.crop_size, "two positive ints (H, W)")
        _check(0 < d.scale_range[0] <= d.scale_range[1], "data.scale_range", d.scale_range,
               "(low, high) with 0 < low <= high")
        _check(d.jitter >= 0, "data.jitter", d.jitter, "a float >= 0 (0 disables it)")
        _check(0.0 <= d.hue <= 0.5, "data.hue", d.hue, "a float in [0, 0.5]")
        _check(d.val_split in VAL_SPLITS, "data.val_split", d.val_split, f"one of {', '.join(VAL_SPLITS)}")
        _check(d.minival_size >= 0, "data.minival_size", d.minival_size,
               "0 (a tenth of the train split) or a number of images >= 1")
        _check(len(e.tolerances) > 0 and all(tol > 0 and (tol < 1 or float(tol).is_integer()) for tol in e.tolerances),
               "eval.tolerances", e.tolerances,
               "a non-empty list of whole pixel counts >= 1 or fractions of the image diagonal in (0, 1)")
        _check(len(e.scales) > 0 and all(s > 0 for s in e.scales), "eval.scales", e.scales,
               "a non-empty list of positive scale factors, e.g. [1.0]")
        _check(all(c > 0 for c in e.crop), "eval.crop", e.crop, "two positive ints (H, W)")
        _check(e.biou_width >= 0, "eval.biou_width", e.biou_width, "an integer >= 0")
        _check(e.max_images >= 0, "eval.max_images", e.max_images, "0 (the whole split) or an integer >= 1")
        _check(m.decoder_dim >= 0, "model.decoder_dim", m.decoder_dim, "0 (the backbone's default) or an integer >= 1")
        _check(0 < m.inner_ratio <= 1, "model.inner_ratio", m.inner_ratio, "a float in (0, 1]")
        k = math.isqrt(max(m.num_points, 0))
        _check(k * k == m.num_points and 1 <= k <= 7, "model.num_points", m.num_points,
               "a perfect square k*k with k in 1..7 (1, 4, 9, 16, 25, 36, 49)")
        return self


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


# ----------------------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) ready for YAML/JSON."""
    return _plain(dataclasses.asdict(cfg))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def from_dict(d: dict | None, cls: type = TrialConfig, prefix: str = "") -> Any:
    """Build ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(d).__name__} {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {path!r} (value {value!r}); allowed keys: {', '.join(prefix + n for n in names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    cfg = cls(**kwargs)
    return cfg


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Coerce a YAML value to the annotated type or raise ConfigError naming the key."""
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, prefix=path + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}={value!r} has the wrong type")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a list")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} has the wrong type: expected bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} has the wrong type: expected int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r} has the wrong type: expected float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={value!r} has the wrong type: expected str")
    return value


# ----------------------------------------------------------------------------- overrides and files


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=0.01)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_in(d: dict, keys: list[str], value: Any) -> None:
    """Set ``d[k0][k1]...`` creating intermediate dicts."""
    for k in keys[:-1]:
        node = d.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {k!r} is not a section")
        d = node
    d[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrialConfig:
    """Load a YAML trial config, apply ``key=value`` overrides, validate."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides or []:
        keys, value = parse_override(item)
        set_in(d, keys, value)
    return from_dict(d).validate()


# Fields that say how a trained model is scored, never how it is trained: changing only these
# re-evaluates a finished trial instead of training it again (harness/cells.py: eval hash).
EVAL_SECTION = "eval"
EVAL_DATA_FIELDS = ("val_split",)


def train_identity(cfg: TrialConfig) -> dict:
    """What determines a trial's weights, as a plain dict: the config without ``eval`` and ``data.val_split``.

    Holding out minival changes the training images, so with ``data.val_split == "minival"`` the dict
    keeps ``data.minival_size``/``data.minival_seed`` and marks ``data.holds_out_minival``; with any other
    split those two fields (unused) are left out. Two configs with equal identities train the same
    weights (:func:`evaluation_identity` says how they are scored).
    """
    d = to_dict(cfg)
    d.pop(EVAL_SECTION)
    data = d["data"]
    held = data.pop("val_split") == "minival"
    if held:
        data["holds_out_minival"] = True
    else:
        data.pop("minival_size"), data.pop("minival_seed")
    return d


def evaluation_identity(cfg: TrialConfig) -> dict:
    """How a trained model is scored: the ``eval`` section and ``data.val_split``."""
    return {EVAL_SECTION: to_dict(cfg.eval), **{f"data.{k}": getattr(cfg.data, k) for k in EVAL_DATA_FIELDS}}


def save_config(cfg: TrialConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
