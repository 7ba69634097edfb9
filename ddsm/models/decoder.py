"""SFNet-style decoder (the paper's setting): PPM on the last stage, FPN top-down path with a
pluggable fusion step, multi-level concat head at 1/4 resolution.

Fusion steps (``fusion(x_l, x_h) -> fused at x_l's size``):
- ``UpsampleAdd``: x_l + up(x_h), the plain FPN baseline;
- ``FlowAlign``: SFNet's flow alignment module (one sampled point per pixel, no affinity);
- ``ddsm.models.ddsm.DDSM``: N sampled points with a softmax affinity.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(in_ch: int, out_ch: int, k: int = 3) -> nn.Sequential:
    """k x k conv (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet): pooled branches at ``bins`` + the input, then a 3x3 conv to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, *, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_ch, out_ch, 1)) for b in bins)
        self.bottleneck = conv_bn_relu(in_ch + len(bins) * out_ch, out_ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, h, w) -> (B, out_ch, h, w)."""
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UpsampleAdd(nn.Module):
    """Plain FPN fusion: x_l + bilinear up(x_h)."""

    def __init__(self, channels: int):
        super().__init__()

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> (B, C, H, W)."""
        return x_l + F.interpolate(x_h, size=x_l.shape[-2:], mode="bilinear", align_corners=False)


class FlowAlign(nn.Module):
    """SFNet's flow alignment module: a 2-channel flow from concat(x_l, up(x_h)) (each reduced to C/2)
    warps x_h onto x_l's grid; output x_l + warp(x_h).

    The flow conv is zero-initialised (start as plain upsampling, like DDSM's offsets); SFNet uses the
    default init.
    """

    def __init__(self, channels: int):
        super().__init__()
        half = max(channels // 2, 1)
        self.down_l = nn.Conv2d(channels, half, 1, bias=False)
        self.down_h = nn.Conv2d(channels, half, 1, bias=False)
        self.flow = nn.Conv2d(2 * half, 2, 3, padding=1, bias=False)
        nn.init.zeros_(self.flow.weight)

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> (B, C, H, W)."""
        B, _, H, W = x_l.shape
        up_h = F.interpolate(self.down_h(x_h), size=(H, W), mode="bilinear", align_corners=False)
        flow = self.flow(torch.cat([self.down_l(x_l), up_h], dim=1))  # (B, 2, H, W) in output pixels (x, y)
        ys = torch.linspace(-1.0, 1.0, H, device=x_l.device, dtype=x_l.dtype)
        xs = torch.linspace(-1.0, 1.0, W, device=x_l.device, dtype=x_l.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        base = torch.stack([gx, gy], dim=-1)[None]  # (1, H, W, 2)
        norm = torch.tensor([W, H], device=x_l.device, dtype=x_l.dtype)
        grid = base + flow.permute(0, 2, 3, 1) / norm  # (B, H, W, 2), as SFNet's flow_warp
        return x_l + F.grid_sample(x_h, grid, mode="bilinear", align_corners=True)


class FPNDecoder(nn.Module):
    """PPM + FPN top-down with ``make_fusion(dim)`` at strides 16, 8, 4 + multi-level concat head.

    Returns logits at 1/4 of the input resolution (B, K, H/4, W/4).
    """

    def __init__(self, in_channels: tuple[int, ...], dim: int, num_classes: int, *,
                 make_fusion: Callable[[int], nn.Module]):
        super().__init__()
        self.ppm = PPM(in_channels[-1], dim)
        self.laterals = nn.ModuleList(conv_bn_relu(c, dim, 1) for c in in_channels[:-1])
        self.fusions = nn.ModuleList(make_fusion(dim) for _ in in_channels[:-1])
        self.smooth = nn.ModuleList(conv_bn_relu(dim, dim, 3) for _ in in_channels[:-1])
        self.head = nn.Sequential(conv_bn_relu(len(in_channels) * dim, dim, 3), nn.Conv2d(dim, num_classes, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats [c2, c3, c4, c5] -> logits (B, K, H/4, W/4)."""
        f = self.ppm(feats[-1])
        outs = [f]
        for i in reversed(range(len(feats) - 1)):  # strides 16, 8, 4
            f = self.fusions[i](self.laterals[i](feats[i]), f)
            outs.insert(0, self.smooth[i](f))
        size = outs[0].shape[-2:]
        ups = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.head(torch.cat(ups, dim=1))
