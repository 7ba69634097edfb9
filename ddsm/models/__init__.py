"""The model zoo: one registry, one builder, one output contract.

``build_model(name, *, num_classes, backbone, **options)`` builds any registered model; every model
returns ``{"out": logits (B, K, H, W)}`` (plus, in training, ``"aux"`` when the auxiliary head is on
and a head's own extra outputs, e.g. DANet's ``"pam"`` / ``"cam"``).

The default of every registered name is its reference structure: ``fpn`` / ``sfnet`` / ``ddsm`` are
SFSegNets' SFNet decoder (:mod:`ddsm.models.decoder`, :mod:`ddsm.models.backbone`) with three
fusions; ``fcn`` / ``deeplabv3`` are torchvision's; ``pspnet`` / ``nonlocal`` / ``danet`` are
mmsegmentation's Cityscapes configs (:mod:`ddsm.models.context`). ``aux=None`` (the default) means
"as the reference trains it": on for the five context models (mmseg and torchvision's reference
recipes train with the FCN head on stage 3), off for the three FPN-decoder models (SFSegNets' default
scripts train without deep supervision). ``decoder_dim=0`` means the reference width. The narrow
forms stay reachable: ``decoder_dim=256`` and ``aux=False``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch.nn as nn

from ddsm.config import ConfigError, ModelConfig
from ddsm.models.backbone import BACKBONES, check_backbone
from ddsm.models.ddsm import DDSM, check_ddsm_options
from ddsm.models.decoder import FlowAlign, UpsampleAdd
from ddsm.models.network import context_net, pyramid_net

COMMON_OPTIONS = ("weights", "aux", "decoder_dim")
PYRAMID_OPTIONS = COMMON_OPTIONS + ("align_corners", "backbone_dilation")
DDSM_OPTIONS = ("branches", "num_points", "pos_embed", "pooled_size", "fusion", "offset_range", "inner_ratio",
                "spatial_out_of_map", "channel_out_of_map", "channel_order", "grid_dilation", "learn_offsets")
BACKBONE_DILATIONS = ("sfsegnets", "none")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it, a one-line description, the options it accepts, whether its
    reference trains with the auxiliary head, and its family (``pyramid`` or ``context``)."""

    name: str
    description: str
    builder: Callable[..., nn.Module]
    options: tuple[str, ...] = COMMON_OPTIONS
    reference_aux: bool = False
    family: str = "context"


def _ddsm(*, branches: str = "dual", num_points: int = 9, pos_embed: str = "sine", pooled_size: int = 8,
          fusion: str = "sum", offset_range: float = 0.0, inner_ratio: float = 0.5, spatial_out_of_map: str = "mask",
          channel_out_of_map: str = "mask", channel_order: str = "natural", grid_dilation: int = 1,
          learn_offsets: bool = True, **common: Any) -> nn.Module:
    opts = dict(branches=branches, num_points=num_points, pos_embed=pos_embed, pooled_size=pooled_size,
                fusion=fusion, offset_range=offset_range, inner_ratio=inner_ratio,
                spatial_out_of_map=spatial_out_of_map, channel_out_of_map=channel_out_of_map,
                channel_order=channel_order, grid_dilation=grid_dilation, learn_offsets=learn_offsets)
    check_ddsm_options(**opts)
    return pyramid_net(make_fusion=partial(DDSM, **opts), **common)


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("fpn", "SFNet's FPN + PPM decoder, upsample-and-add fusion (the baseline)",
                  partial(pyramid_net, make_fusion=UpsampleAdd), PYRAMID_OPTIONS, family="pyramid"),
        ModelSpec("sfnet", "SFNet (SFSegNets): FPN + PPM decoder, flow alignment fusion (1 point, no affinity)",
                  partial(pyramid_net, make_fusion=FlowAlign), PYRAMID_OPTIONS, family="pyramid"),
        ModelSpec("ddsm", "SFNet's FPN + PPM decoder, DDSM fusion (spatial/channel/dual, N points, affinity)",
                  _ddsm, PYRAMID_OPTIONS + DDSM_OPTIONS, family="pyramid"),
        ModelSpec("fcn", "dilated ResNet (OS 8) + FCN head, aux head (torchvision)", partial(context_net, "fcn"),
                  reference_aux=True),
        ModelSpec("deeplabv3", "dilated ResNet (OS 8) + ASPP head, aux head (torchvision DeepLabV3)",
                  partial(context_net, "deeplabv3"), reference_aux=True),
        ModelSpec("pspnet", "dilated ResNet (OS 8) + PSPHead 512, aux head (mmseg pspnet_r50-d8)",
                  partial(context_net, "pspnet"), reference_aux=True),
        ModelSpec("nonlocal", "dilated ResNet (OS 8) + NLHead 512, aux head (mmseg nonlocal_r50-d8)",
                  partial(context_net, "nonlocal"), reference_aux=True),
        ModelSpec("danet", "dilated ResNet (OS 8) + DAHead 512 (PAM + CAM, 3 losses), aux head (mmseg danet_r50-d8)",
                  partial(context_net, "danet"), reference_aux=True),
    ]
}


def list_models() -> list[str]:
    """Names of every registered model, in registry order."""
    return list(REGISTRY)


def model_options(name: str) -> tuple[str, ...]:
    """The ModelConfig fields (besides name/backbone) that model ``name`` uses."""
    return _spec(name).options


def _spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ConfigError(f"model={name!r} is not allowed: expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def default_dim(backbone: str, name: str = "fpn") -> int:
    """Reference head width. FPN-decoder models: 128 for ResNet-18/34, 256 for ResNet-50/101 (SFSegNets'
    fpn_dim). Context models: 512 for ResNet-50/101 (mmseg ``channels``), 128 for ResNet-18/34 (mmseg's
    ``pspnet_r18-d8``); torchvision's FCN/DeepLabV3 heads have fixed widths and ignore it."""
    small = BACKBONES[backbone][2][-1] == 512
    if _spec(name).family == "pyramid":
        return 128 if small else 256
    return 128 if small else 512


def build_model(name: str, *, num_classes: int, backbone: str = "resnet18", **options: Any) -> nn.Module:
    """Build a registered model; raise ConfigError (a ValueError) naming any bad option and what is allowed."""
    spec = _spec(name)
    check_backbone(backbone)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} is not allowed: expected an integer >= 1")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ConfigError(f"option {unknown[0]!r} is not allowed for model {name!r}: expected one of {', '.join(spec.options)}")
    weights = options.pop("weights", None)
    aux = options.pop("aux", None)
    if aux is not None and not isinstance(aux, bool):
        raise ConfigError(f"aux={aux!r} is not allowed: expected true, false or null (as the reference trains it)")
    aux = spec.reference_aux if aux is None else aux
    dim = options.pop("decoder_dim", 0)
    if not isinstance(dim, int) or dim < 0:
        raise ConfigError(f"decoder_dim={dim!r} is not allowed: expected 0 (the reference width) or an integer >= 1")
    dim = dim or default_dim(backbone, name)
    if options.get("backbone_dilation", "sfsegnets") not in BACKBONE_DILATIONS:
        raise ConfigError(f"backbone_dilation={options['backbone_dilation']!r} is not allowed: expected one of "
                          f"{', '.join(BACKBONE_DILATIONS)}")
    if not isinstance(options.get("align_corners", True), bool):
        raise ConfigError(f"align_corners={options['align_corners']!r} is not allowed: expected true or false")
    return spec.builder(backbone=backbone, weights=weights, num_classes=num_classes, dim=dim, aux=aux, **options)


def uses_aux(name: str, aux: bool | None) -> bool:
    """Whether model ``name`` built with ``aux`` has the auxiliary head (None = as its reference)."""
    return _spec(name).reference_aux if aux is None else aux


def offset_stats(model: nn.Module) -> dict[str, float]:
    """Mean and max |offset| (pixels; grid cells for the channel branch) of every DDSM branch's last
    forward, as ``{"offset_mean/<layer>.<branch>": ..., "offset_max/<layer>.<branch>": ...}``.

    ``<layer>`` is the module path (``head.fusions.0`` / ``.1`` / ``.2`` = strides 4 / 8 / 16; a DDP
    wrapper's ``module.`` is dropped). Empty for models without DDSM or before their first forward.
    """
    stats: dict[str, float] = {}
    for path, m in model.named_modules():
        if isinstance(m, DDSM):
            layer = path.removeprefix("module.")
            for branch, (mean, top) in m.offset_stats().items():
                stats[f"offset_mean/{layer}.{branch}"] = mean
                stats[f"offset_max/{layer}.{branch}"] = top
    return stats


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The options of ``cfg`` that its model uses (others are ignored and not hashed)."""
    return {k: getattr(cfg, k) for k in model_options(cfg.name)}


def build_model_from_config(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """Build the model described by a ModelConfig."""
    return build_model(cfg.name, num_classes=num_classes, backbone=cfg.backbone, **model_kwargs(cfg))


__all__ = ["REGISTRY", "ModelSpec", "build_model", "build_model_from_config", "list_models", "model_kwargs",
           "model_options", "default_dim", "offset_stats", "uses_aux", "DDSM"]
