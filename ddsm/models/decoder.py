"""The SFNet decoder as SFSegNets builds it (lxtGH/SFSegNets, ``network/sfnet_resnet.py``
``UperNetAlignHead`` and ``network/nn/operators.py`` ``PSPModule`` / ``AlignedModule``, read at commit
22c56698b8f7bec0c38882618a45854ce2a9baa3): PPM on the last stage, FPN top-down path with a pluggable
fusion step at strides 16, 8, 4, multi-level concat head at 1/4 resolution.

``fpn``, ``sfnet`` and ``ddsm`` share every layer of it and differ only in their fusion
(``fusion(x_l, x_h) -> x_l + (what x_h brings) at x_l's size``):

- ``UpsampleAdd``: x_l + up(x_h), the plain FPN baseline (SFSegNets' ``UperNetHead``);
- ``FlowAlign``: SFNet's flow alignment module (one sampled point per pixel, no affinity);
- ``ddsm.models.ddsm.DDSM``: N sampled points with a softmax affinity.

As in SFSegNets: the PPM's pooled branches are 1x1 conv + BN without ReLU, its bottleneck is a 1x1
conv + BN + ReLU + Dropout2d(0.1) on concat(pooled..., input); the lateral 1x1 convs have a bias; the
smoothing and the head's 3x3 convs do not; layers keep PyTorch's default initialisation (SFSegNets calls
no initialiser on its head). One ``align_corners`` convention runs through the whole decoder (PPM
upsampling, fusions, the concat head and the final upsampling of the logits): ``True`` by default, as
every interpolation and ``grid_sample`` in SFSegNets' decoder.

Remaining deviations from SFSegNets (the backbone's are in :mod:`ddsm.models.backbone`):
- ``FlowAlign`` warps x_h with the flow divided by the output size (W, H), exactly as SFSegNets'
  ``flow_warp``; with ``align_corners=True`` one unit of that flow moves a point by (W-1)/(2W) of a
  pixel, not a whole one. Kept as in the reference, because this is the SFNet users compare with.
- Deep supervision on the FPN levels (SFSegNets' ``--fpn_dsn_loss``, off in its default scripts) is
  not built; ``aux=True`` adds the FCN head on stage 3 instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddsm.models.precision import conv2d_fp32, float32_region


def conv_bn_relu(in_ch: int, out_ch: int, k: int = 3, *, bias: bool = False) -> nn.Sequential:
    """k x k conv (no bias unless asked) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=bias), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


def upsample(x: torch.Tensor, size, *, align_corners: bool) -> torch.Tensor:
    """Bilinear resize of x (B, C, h, w) to ``size`` (H, W)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class PPM(nn.Module):
    """SFSegNets' pyramid pooling module (``PSPModule``): pooled branches at ``bins`` (1x1 conv + BN,
    no ReLU), upsampled and concatenated before the input, then a 1x1 conv + BN + ReLU + Dropout2d(0.1)."""

    def __init__(self, in_ch: int, out_ch: int, *, bins: tuple[int, ...] = (1, 2, 3, 6), align_corners: bool = True):
        super().__init__()
        self.align_corners = align_corners
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
            for b in bins)
        self.bottleneck = nn.Sequential(conv_bn_relu(in_ch + len(bins) * out_ch, out_ch, 1), nn.Dropout2d(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, h, w) -> (B, out_ch, h, w)."""
        size = x.shape[-2:]
        pooled = [upsample(s(x), size, align_corners=self.align_corners) for s in self.stages]
        return self.bottleneck(torch.cat([*pooled, x], dim=1))  # (B, Cin + 4 out_ch, h, w) -> (B, out_ch, h, w)


class UpsampleAdd(nn.Module):
    """Plain FPN fusion: x_l + bilinear up(x_h)."""

    def __init__(self, channels: int, *, align_corners: bool = True):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> (B, C, H, W)."""
        return x_l + upsample(x_h, x_l.shape[-2:], align_corners=self.align_corners)


class FlowAlign(nn.Module):
    """SFNet's flow alignment module (SFSegNets ``AlignedModule``): a 2-channel flow from a 3x3 conv on
    concat(up(down_h(x_h)), down_l(x_l)) (each reduced to C/2 by a 1x1 conv) warps x_h onto x_l's grid;
    output x_l + warp(x_h). The upsampling and the warp use the same ``align_corners``."""

    def __init__(self, channels: int, *, align_corners: bool = True):
        super().__init__()
        half = max(channels // 2, 1)
        self.align_corners = align_corners
        self.down_h = nn.Conv2d(channels, half, 1, bias=False)
        self.down_l = nn.Conv2d(channels, half, 1, bias=False)
        self.flow = nn.Conv2d(2 * half, 2, 3, padding=1, bias=False)

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> (B, C, H, W)."""
        H, W = x_l.shape[-2:]
        up_h = upsample(self.down_h(x_h), (H, W), align_corners=self.align_corners)  # (B, C/2, H, W)
        # the flow, the grid and the warp in float32 under any autocast: bf16 resolves [-1, 1] to ~1/128,
        # i.e. several pixels of a 1024-wide map
        cat = torch.cat([up_h, self.down_l(x_l)], dim=1)  # (B, C, H, W)
        flow = conv2d_fp32(cat, self.flow.weight, padding=1)  # (B, 2, H, W) as (x, y)
        gy, gx = torch.meshgrid(self._centres(H, flow), self._centres(W, flow), indexing="ij")
        base = torch.stack([gx, gy], dim=-1)[None]  # (1, H, W, 2)
        norm = torch.tensor([W, H], device=flow.device, dtype=flow.dtype)
        grid = base + flow.permute(0, 2, 3, 1) / norm  # (B, H, W, 2), as SFSegNets' flow_warp
        # zeros outside as SFSegNets (align_corners=True: a zero flow never leaves the map); with False the
        # outer half-pixel ring of centres lies outside, where the upsampling clamps: so does the warp
        padding = "zeros" if self.align_corners else "border"
        with float32_region(flow.device):
            warped = F.grid_sample(x_h.to(flow.dtype), grid, mode="bilinear", padding_mode=padding,
                                   align_corners=self.align_corners)
        return x_l + warped.to(x_l.dtype)

    def _centres(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Normalised coordinates of the n output pixel centres under ``align_corners`` (device and dtype
        of ``like``): -1..1 when True (SFSegNets' linspace), (2i + 1) / n - 1 when False; a zero flow then
        warps exactly as :func:`upsample` with the same convention."""
        if self.align_corners:
            return torch.linspace(-1.0, 1.0, n, device=like.device, dtype=like.dtype)
        return (2 * torch.arange(n, device=like.device, dtype=like.dtype) + 1) / n - 1


class FPNDecoder(nn.Module):
    """PPM + FPN top-down with ``make_fusion(dim, align_corners=...)`` at strides 16, 8, 4 + multi-level
    concat head (SFSegNets' ``UperNetAlignHead``). Returns logits at 1/4 of the input (B, K, H/4, W/4)."""

    def __init__(self, in_channels: tuple[int, ...], dim: int, num_classes: int, *,
                 make_fusion: Callable[..., nn.Module], align_corners: bool = True):
        super().__init__()
        self.align_corners = align_corners
        self.ppm = PPM(in_channels[-1], dim, align_corners=align_corners)
        self.laterals = nn.ModuleList(conv_bn_relu(c, dim, 1, bias=True) for c in in_channels[:-1])
        self.fusions = nn.ModuleList(make_fusion(dim, align_corners=align_corners) for _ in in_channels[:-1])
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
        ups = [outs[0]] + [upsample(o, size, align_corners=self.align_corners) for o in outs[1:]]
        return self.head(torch.cat(ups, dim=1))  # (B, 4 dim, H/4, W/4) -> (B, K, H/4, W/4)
