"""Segmentation networks: a ResNet backbone + either the FPN decoder (pluggable fusion) or a
context-module head on the dilated backbone. One output contract for all:
``{"out": logits (B, K, H, W) at input resolution}``, plus in training the extra supervised outputs
(same shape): ``"aux"`` when the auxiliary head is on, and a head's own extra outputs (DANet's
``"pam"`` and ``"cam"``). Each extra output's loss weight is in :data:`ddsm.engine.loss.HEAD_WEIGHTS`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ddsm.models.backbone import ResNetBackbone
from ddsm.models.context import build_aux_head, build_context_head
from ddsm.models.decoder import FPNDecoder, upsample


class SegmentationNet(nn.Module):
    """Backbone + head (+ an auxiliary head on the stage-3 output c4, training only).

    ``align_corners`` is the convention of the final upsampling of every output to the input size.
    """

    def __init__(self, backbone: ResNetBackbone, head: nn.Module, *, aux_head: nn.Module | None, uses_pyramid: bool,
                 align_corners: bool):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.uses_pyramid = uses_pyramid
        self.aux_head = aux_head
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W) -> {"out": (B, K, H, W)[, extra outputs (B, K, H, W) in training]}."""
        size = x.shape[-2:]
        feats = self.backbone(x)
        logits = self.head(feats if self.uses_pyramid else feats[-1])
        outs = dict(logits) if isinstance(logits, dict) else {"out": logits}
        if self.aux_head is not None and self.training:
            outs["aux"] = self.aux_head(feats[2])
        return {k: upsample(v, size, align_corners=self.align_corners) for k, v in outs.items()}


def pyramid_net(*, backbone: str, weights: str | None, num_classes: int, dim: int, aux: bool,
                make_fusion: Callable[..., nn.Module], align_corners: bool = True,
                backbone_dilation: str = "sfsegnets") -> SegmentationNet:
    """ResNet (output stride 32; ``backbone_dilation`` sfsegnets = SFSegNets' variant D, or none) +
    SFNet's FPN decoder with the given fusion step, one ``align_corners`` convention throughout."""
    variant = "sfsegnets" if backbone_dilation == "sfsegnets" else "plain"
    bb = ResNetBackbone(backbone, weights=weights, variant=variant)
    head = FPNDecoder(bb.channels, dim, num_classes, make_fusion=make_fusion, align_corners=align_corners)
    aux_head = build_aux_head("pyramid", bb.channels[2], num_classes) if aux else None
    return SegmentationNet(bb, head, aux_head=aux_head, uses_pyramid=True, align_corners=align_corners)


def context_net(kind: str, *, backbone: str, weights: str | None, num_classes: int, dim: int,
                aux: bool) -> SegmentationNet:
    """Dilated ResNet (output stride 8) + a context head on c5; ``align_corners=False`` as mmseg's
    configs and torchvision."""
    bb = ResNetBackbone(backbone, weights=weights, variant="os8")
    head = build_context_head(kind, bb.channels[-1], dim, num_classes)
    aux_head = build_aux_head(kind, bb.channels[2], num_classes) if aux else None
    return SegmentationNet(bb, head, aux_head=aux_head, uses_pyramid=False, align_corners=False)
