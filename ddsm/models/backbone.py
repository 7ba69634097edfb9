"""torchvision ResNet backbones returning the four stage outputs, in one of three variants:

- ``plain``: strides 4, 8, 16, 32 (torchvision as is);
- ``os8``: output stride 8 for the context-module baselines (strides 4, 8, 8, 8): stages 4 and 5 lose
  their stride and their first 3x3 conv per block is dilated 2 and 4, the first block of each stage
  using half of it (mmsegmentation's ``ResNetV1c`` with ``dilations=(1, 1, 2, 4)``,
  ``contract_dilation=True``; torchvision's ``replace_stride_with_dilation`` for Bottleneck);
- ``sfsegnets``: SFSegNets' dilation variant "D" (``network/sfnet_resnet.py``, ``AlignNetResNet``):
  the ``conv2`` of every block of stages 4 and 5 dilated 2 and 4 with their strides kept, so the
  output stride stays 32 and only the receptive field grows. The default of the FPN-decoder models.

Deviation from both references, kept on purpose: torchvision's ResNets (7x7 stem) instead of the
deep-stem ResNets (three 3x3 convs; mmseg ``resnet*_v1c``, SFSegNets ``resnet_d``), because
torchvision's ImageNet weights are the ones users can get.

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


VARIANTS = ("plain", "os8", "sfsegnets")


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 stage whose blocks dilate their first 3x3 conv (``os8``).

    As mmseg's ResNet: the strided 3x3 (BasicBlock conv1, Bottleneck conv2) is the one dilated, a
    BasicBlock's second 3x3 is not, and the first block uses ``dilation // 2`` (contract_dilation).
    Written here because torchvision's ``replace_stride_with_dilation`` refuses BasicBlock (ResNet-18/34).
    """
    for i, block in enumerate(layer):
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
        d = max(dilation // 2, 1) if i == 0 else dilation
        conv = _first_3x3(block)
        conv.dilation, conv.padding = (d, d), (d, d)


def _dilate_sfsegnets(layer: nn.Sequential, dilation: int) -> None:
    """SFSegNets' variant D on one stage: every block's ``conv2`` dilated, strides unchanged."""
    for block in layer:
        block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)


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

    def __init__(self, name: str = "resnet18", *, weights: str | None = None, variant: str = "plain"):
        super().__init__()
        check_backbone(name)
        if variant not in VARIANTS:
            raise ConfigError(f"backbone variant {variant!r} is not allowed: expected one of {', '.join(VARIANTS)}")
        builder, _, channels = BACKBONES[name]
        net: torchvision.models.ResNet = builder(weights=None)
        if weights is not None:
            _load_weights(net, name, weights)
        if variant == "os8":  # output stride 8, as in DeepLab/PSPNet
            _dilate(net.layer3, 2)
            _dilate(net.layer4, 4)
        elif variant == "sfsegnets":
            _dilate_sfsegnets(net.layer3, 2)
            _dilate_sfsegnets(net.layer4, 4)
        self.variant = variant
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) -> [c2 (stride 4), c3 (8), c4 (16, or 8 for os8), c5 (32, or 8 for os8)]."""
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]
