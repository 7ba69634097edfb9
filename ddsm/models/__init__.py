"""The model zoo: one registry, one builder, one output contract.

``build_model(name, *, num_classes, backbone, **options)`` builds any registered model; every model
returns ``{"out": logits (B, K, H, W)}`` (plus ``"aux"`` when enabled and training).
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
DDSM_OPTIONS = ("branches", "num_points", "pos_embed", "pooled_size", "fusion", "offset_range", "inner_ratio")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it, a one-line description, the options it accepts."""

    name: str
    description: str
    builder: Callable[..., nn.Module]
    options: tuple[str, ...] = COMMON_OPTIONS


def _ddsm(*, branches: str = "dual", num_points: int = 9, pos_embed: str = "sine", pooled_size: int = 8,
          fusion: str = "sum", offset_range: float = 0.0, inner_ratio: float = 0.5, **common: Any) -> nn.Module:
    opts = dict(branches=branches, num_points=num_points, pos_embed=pos_embed, pooled_size=pooled_size,
                fusion=fusion, offset_range=offset_range, inner_ratio=inner_ratio)
    check_ddsm_options(**opts)
    return pyramid_net(make_fusion=lambda dim: DDSM(dim, **opts), **common)


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("fpn", "FPN + PPM decoder, upsample-and-add fusion (the baseline)",
                  partial(pyramid_net, make_fusion=UpsampleAdd)),
        ModelSpec("sfnet", "FPN + PPM decoder, SFNet flow alignment fusion (1 sampled point, no affinity)",
                  partial(pyramid_net, make_fusion=FlowAlign)),
        ModelSpec("ddsm", "FPN + PPM decoder, DDSM fusion (spatial/channel/dual, N points, affinity)",
                  _ddsm, COMMON_OPTIONS + DDSM_OPTIONS),
        ModelSpec("fcn", "dilated ResNet (OS 8) + FCN head (torchvision)", partial(context_net, "fcn")),
        ModelSpec("deeplabv3", "dilated ResNet (OS 8) + ASPP head (torchvision DeepLabV3)", partial(context_net, "deeplabv3")),
        ModelSpec("pspnet", "dilated ResNet (OS 8) + pyramid pooling module", partial(context_net, "pspnet")),
        ModelSpec("nonlocal", "dilated ResNet (OS 8) + non-local block", partial(context_net, "nonlocal")),
        ModelSpec("danet", "dilated ResNet (OS 8) + DANet position + channel attention", partial(context_net, "danet")),
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


def default_dim(backbone: str) -> int:
    """Decoder width: 128 for ResNet-18/34, 256 for ResNet-50/101 (SFNet's fpn_dim)."""
    return 128 if BACKBONES[backbone][2][-1] == 512 else 256


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
    aux = bool(options.pop("aux", False))
    dim = int(options.pop("decoder_dim", 0)) or default_dim(backbone)
    if dim < 1:
        raise ConfigError(f"decoder_dim={dim!r} is not allowed: expected 0 (default) or an integer >= 1")
    return spec.builder(backbone=backbone, weights=weights, num_classes=num_classes, dim=dim, aux=aux, **options)


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The options of ``cfg`` that its model uses (others are ignored and not hashed)."""
    return {k: getattr(cfg, k) for k in model_options(cfg.name)}


def build_model_from_config(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """Build the model described by a ModelConfig."""
    return build_model(cfg.name, num_classes=num_classes, backbone=cfg.backbone, **model_kwargs(cfg))


__all__ = ["REGISTRY", "ModelSpec", "build_model", "build_model_from_config", "list_models", "model_kwargs",
           "model_options", "default_dim", "DDSM"]
