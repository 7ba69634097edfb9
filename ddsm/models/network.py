"""Segmentation networks: a ResNet backbone + either the FPN decoder (pluggable fusion) or a
context-module head on the dilated backbone. One output contract for all:
``{"out": logits (B, K, H, W) at input resolution}`` plus ``"aux"`` (same shape) when the auxiliary
head is enabled and the model is training.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.fcn import FCNHead

from ddsm.models.backbone import ResNetBackbone
from ddsm.models.context import build_context_head
from ddsm.models.decoder import FPNDecoder


class SegmentationNet(nn.Module):
    """Backbone + head; the aux head (torchvision's FCNHead) reads the stage-3 output c4."""

    def __init__(self, backbone: ResNetBackbone, head: nn.Module, *, num_classes: int, aux: bool, uses_pyramid: bool):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.uses_pyramid = uses_pyramid
        self.aux_head = FCNHead(backbone.channels[2], num_classes) if aux else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W) -> {"out": (B, K, H, W)[, "aux": (B, K, H, W)]}."""
        size = x.shape[-2:]
        feats = self.backbone(x)
        logits = self.head(feats if self.uses_pyramid else feats[-1])
        out = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        if self.aux_head is not None and self.training:
            out["aux"] = F.interpolate(self.aux_head(feats[2]), size=size, mode="bilinear", align_corners=False)
        return out


def pyramid_net(*, backbone: str, weights: str | None, num_classes: int, dim: int, aux: bool,
                make_fusion: Callable[[int], nn.Module]) -> SegmentationNet:
    """ResNet (output stride 32) + SFNet-style FPN decoder with the given fusion step."""
    bb = ResNetBackbone(backbone, weights=weights, dilated=False)
    head = FPNDecoder(bb.channels, dim, num_classes, make_fusion=make_fusion)
    return SegmentationNet(bb, head, num_classes=num_classes, aux=aux, uses_pyramid=True)


def context_net(kind: str, *, backbone: str, weights: str | None, num_classes: int, dim: int,
                aux: bool) -> SegmentationNet:
    """Dilated ResNet (output stride 8) + a context head on c5."""
    bb = ResNetBackbone(backbone, weights=weights, dilated=True)
    head = build_context_head(kind, bb.channels[-1], dim, num_classes)
    return SegmentationNet(bb, head, num_classes=num_classes, aux=aux, uses_pyramid=False)
