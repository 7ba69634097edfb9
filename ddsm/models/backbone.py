"""torchvision ResNet backbones returning the four stage outputs (strides 4, 8, 16, 32, or 4, 8, 8, 8
when dilated for the context-module baselines).

Pretrained weights are opt-in: ``weights="imagenet"`` uses torchvision's weights API but only from the
local torch hub cache (nothing is downloaded at run time); a path loads a local state dict.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.models import resnet

from ddsm.config import ConfigError

BACKBONES = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1, (64, 128, 256, 512)),
    "resnet34": (resnet.resnet34, resnet.ResNet34_Weights.IMAGENET1K_V1, (64, 128, 256, 512)),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V2, (256, 512, 1024, 2048)),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V2, (256, 512, 1024, 2048)),
}


def check_backbone(name: str) -> None:
    """Raise ConfigError when ``name`` is not a supported backbone."""
    if name not in BACKBONES:
        raise ConfigError(f"backbone={name!r} is not allowed: expected one of {', '.join(BACKBONES)}")


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 stage with dilated 3x3 convs (any block type).

    Written here because torchvision's ``replace_stride_with_dilation`` refuses BasicBlock (ResNet-18/34).
    """
    for i, block in enumerate(layer):
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                # the first block keeps the previous dilation on its entry conv, as in DeepLab's ResNets
                d = max(dilation // 2, 1) if (i == 0 and m is _first_3x3(block)) else dilation
                m.dilation, m.padding = (d, d), (d, d)


def _first_3x3(block: nn.Module) -> nn.Conv2d:
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))


def _load_weights(model: nn.Module, name: str, weights: str) -> None:
    if weights == "imagenet":
        w = BACKBONES[name][1]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        if not cached.is_file():
            raise ConfigError(
                f"weights='imagenet' for {name} needs {w.url} in the torch hub cache ({cached}), which is missing; "
                f"download it there once, or pass weights=/path/to/state_dict.pth")
        state = torch.load(cached, map_location="cpu", weights_only=True)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"weights={weights!r}: no such file; expected 'imagenet' (from the torch hub cache) "
                              f"or a path to a local ResNet state dict")
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ConfigError(f"weights {weights!r} do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")


class ResNetBackbone(nn.Module):
    """Stem + four stages of a torchvision ResNet; forward returns [c2, c3, c4, c5]."""

    def __init__(self, name: str = "resnet18", *, weights: str | None = None, dilated: bool = False):
        super().__init__()
        check_backbone(name)
        builder, _, channels = BACKBONES[name]
        net: torchvision.models.ResNet = builder(weights=None)
        if weights is not None:
            _load_weights(net, name, weights)
        if dilated:  # output stride 8, as in DeepLab/PSPNet
            _dilate(net.layer3, 2)
            _dilate(net.layer4, 4)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) -> [c2 (stride 4), c3 (8), c4 (16 or 8), c5 (32 or 8)]."""
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]
