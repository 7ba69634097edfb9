"""Context-module baselines on a dilated ResNet (output stride 8): heads that map c5 to logits.

FCN and DeepLabV3 use torchvision's heads; PSPNet's PPM, the non-local block (Wang et al. 2018) and
DANet's position + channel attention (Fu et al. 2019) are written here, as torchvision has none.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from ddsm.models.decoder import PPM, conv_bn_relu


class PSPHead(nn.Module):
    """PPM (bins 1, 2, 3, 6) + classifier."""

    def __init__(self, in_ch: int, dim: int, num_classes: int):
        super().__init__()
        self.ppm = PPM(in_ch, dim)
        self.cls = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, h, w) -> (B, K, h, w)."""
        return self.cls(self.ppm(x))


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block with inner width C/2 and a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        B, _, H, W = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        k = self.phi(x).flatten(2)  # (B, C', HW)
        v = self.g(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        attn = torch.softmax(q @ k, dim=-1)  # (B, HW, HW)
        y = (attn @ v).transpose(1, 2).reshape(B, -1, H, W)  # (B, C', H, W)
        return x + self.out(y)


class PositionAttention(nn.Module):
    """DANet's position attention module: HW x HW affinity, learned residual scale gamma (init 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, max(channels // 8, 1), 1)
        self.key = nn.Conv2d(channels, max(channels // 8, 1), 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, C/8)
        k = self.key(x).flatten(2)  # (B, C/8, HW)
        attn = torch.softmax(q @ k, dim=-1)  # (B, HW, HW)
        v = self.value(x).flatten(2)  # (B, C, HW)
        y = (v @ attn.transpose(1, 2)).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.gamma * y


class ChannelAttention(nn.Module):
    """DANet's channel attention module: C x C affinity (max-minus-energy softmax), gamma init 0."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        f = x.flatten(2)  # (B, C, HW)
        energy = f @ f.transpose(1, 2)  # (B, C, C)
        energy = energy.amax(dim=-1, keepdim=True) - energy
        y = (torch.softmax(energy, dim=-1) @ f).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.gamma * y


class AttentionHead(nn.Module):
    """Reduce c5 with a 3x3 conv, apply attention block(s), sum, classify (non-local or DANet)."""

    def __init__(self, in_ch: int, dim: int, num_classes: int, *, kind: str):
        super().__init__()
        if kind == "nonlocal":
            self.reduce = nn.ModuleList([conv_bn_relu(in_ch, dim)])
            self.blocks = nn.ModuleList([NonLocalBlock(dim)])
        else:  # danet: parallel position and channel attention
            self.reduce = nn.ModuleList([conv_bn_relu(in_ch, dim), conv_bn_relu(in_ch, dim)])
            self.blocks = nn.ModuleList([PositionAttention(dim), ChannelAttention()])
        self.post = nn.ModuleList(conv_bn_relu(dim, dim) for _ in self.blocks)
        self.cls = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, h, w) -> (B, K, h, w)."""
        y = sum(post(block(red(x))) for red, block, post in zip(self.reduce, self.blocks, self.post))
        return self.cls(y)


def build_context_head(kind: str, in_ch: int, dim: int, num_classes: int) -> nn.Module:
    """The head of a context-module baseline: fcn | deeplabv3 | pspnet | nonlocal | danet."""
    if kind == "fcn":
        return FCNHead(in_ch, num_classes)
    if kind == "deeplabv3":
        return DeepLabHead(in_ch, num_classes)
    if kind == "pspnet":
        return PSPHead(in_ch, dim, num_classes)
    return AttentionHead(in_ch, dim, num_classes, kind=kind)
