"""The Dynamic Dual Sampling Module (Shi et al., ICIP 2021), as drawn in the paper's figure.

Inputs: a lower (finer) map ``x_l`` (B, C, H, W) and a higher (coarser) map ``x_h`` (B, C, h, w).

Spatial branch (figure a): for every pixel of x_l, N points of up(x_h) are sampled around it (a k x k
base grid plus learned offsets), compared with the pixel's query, softmax-weighted and summed.
Channel branch (figure b): both inputs pooled to a x a; every channel (an a^2 vector) samples N other
channels on a sqrt(c) x sqrt(c) layout of the channels, compares, softmax-weights and sums the
sampled channels of x_h, which is then upsampled to H x W.

Choices where the figure is silent (each an option so it can be ablated):
- offsets: a 3x3 conv, zero-initialised (training starts from the regular grid). Spatial: on
  concat(x_l, up(x_h)) as in SFNet's flow alignment module; channel: on the key's channel grid.
  ``offset_range`` > 0 bounds them by ``range * tanh``.
- dot products are scaled by 1/sqrt(dim) (the figure shows no scale).
- internal width of the spatial branch: ``inner_ratio`` x C (non-local's C/2 by default).
- channel width not a perfect square: the channel branch projects to the nearest square s*s with its
  1x1 query/key/value convs and back to C with a 1x1 conv (e.g. 128 -> 121 -> 128).
- the channel branch's values are x_h at its own resolution h x w (the figure's "down").
- fusion into x_l: ``sum`` (x_l + x_S + x_C, default) or ``concat`` (1x1 conv of [x_l, x_S, x_C]).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddsm.config import ConfigError
from ddsm.models.position import PositionEmbedding
from ddsm.models.sampling import dynamic_affinity

BRANCHES = ("spatial", "channel", "dual")
FUSIONS = ("sum", "concat")


def check_ddsm_options(*, branches: str, num_points: int, pos_embed: str, pooled_size: int, fusion: str,
                       offset_range: float, inner_ratio: float) -> None:
    """Raise ConfigError (a ValueError) naming the first bad option, its value and what is allowed."""
    k = math.isqrt(num_points) if num_points > 0 else 0
    checks = [
        (branches in BRANCHES, "branches", branches, f"one of {', '.join(BRANCHES)}"),
        (k * k == num_points and 1 <= k <= 7, "num_points", num_points,
         "a perfect square k*k with k in 1..7 (1, 4, 9, 16, 25, 36, 49)"),
        (pos_embed in PositionEmbedding.KINDS, "pos_embed", pos_embed, f"one of {', '.join(PositionEmbedding.KINDS)}"),
        (pooled_size >= 1, "pooled_size", pooled_size, "an integer >= 1"),
        (fusion in FUSIONS, "fusion", fusion, f"one of {', '.join(FUSIONS)}"),
        (offset_range >= 0, "offset_range", offset_range, "a float >= 0 (0 = unbounded)"),
        (0 < inner_ratio <= 1, "inner_ratio", inner_ratio, "a float in (0, 1]"),
    ]
    for ok, name, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{name}={value!r} is not allowed: expected {allowed}")


def _offset_conv(in_ch: int, num_points: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, 2 * num_points, 3, padding=1)
    nn.init.zeros_(conv.weight)  # start from the regular k x k grid
    nn.init.zeros_(conv.bias)
    return conv


def _bound(offsets: torch.Tensor, offset_range: float) -> torch.Tensor:
    return offsets if offset_range <= 0 else offset_range * torch.tanh(offsets / offset_range)


class SpatialBranch(nn.Module):
    """Spatial-wise dynamic affinity (figure a): returns x_S_out (B, C, H, W)."""

    def __init__(self, channels: int, *, num_points: int = 9, pos_embed: str = "sine",
                 inner_ratio: float = 0.5, offset_range: float = 0.0):
        super().__init__()
        d = max(1, round(channels * inner_ratio))
        self.num_points = num_points
        self.offset_range = offset_range
        self.pos_l = PositionEmbedding(channels, kind=pos_embed)
        self.pos_h = PositionEmbedding(channels, kind=pos_embed)
        self.query = nn.Conv2d(channels, d, 1)  # theta
        self.key = nn.Conv2d(2 * channels, d, 1)  # phi, on concat(x_l, up(x_h))
        self.value = nn.Conv2d(channels, d, 1)  # g, on up(x_h)
        self.offset = _offset_conv(2 * channels, num_points)
        self.proj = nn.Conv2d(d, channels, 1)

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> (B, C, H, W)."""
        size = x_l.shape[-2:]
        xl = self.pos_l(x_l)
        xh = F.interpolate(self.pos_h(x_h), size=size, mode="bilinear", align_corners=False)  # (B, C, H, W)
        q = self.query(xl)  # (B, d, H, W)
        k = self.key(torch.cat([xl, xh], dim=1))  # (B, d, H, W)
        v = self.value(xh)  # (B, d, H, W)
        up_h = xh if self.pos_h.kind == "none" else F.interpolate(x_h, size=size, mode="bilinear", align_corners=False)
        offsets = _bound(self.offset(torch.cat([x_l, up_h], dim=1)), self.offset_range)  # (B, 2N, H, W)
        y = dynamic_affinity(q, k, v, offsets, num_points=self.num_points)  # (B, d, H, W)
        return self.proj(y)


class ChannelBranch(nn.Module):
    """Channel-wise dynamic affinity (figure b): returns x_C_out (B, C, H, W)."""

    def __init__(self, channels: int, *, num_points: int = 9, pooled_size: int = 8, offset_range: float = 0.0):
        super().__init__()
        self.side = max(1, round(math.sqrt(channels)))  # channels laid out on side x side
        c = self.side ** 2
        self.num_points = num_points
        self.pooled_size = pooled_size
        self.offset_range = offset_range
        self.query = nn.Conv2d(channels, c, 1)
        self.key = nn.Conv2d(2 * channels, c, 1)
        self.value = nn.Conv2d(channels, c, 1)
        self.offset = _offset_conv(pooled_size ** 2, num_points)
        self.proj = nn.Conv2d(c, channels, 1) if c != channels else nn.Identity()

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        B, c, h, w = x.shape
        # every channel becomes a pixel of a side x side grid whose features are its h*w values
        return x.flatten(2).transpose(1, 2).reshape(B, h * w, self.side, self.side)  # (B, hw, s, s)

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> (B, C, H, W)."""
        B, _, H, W = x_l.shape
        h, w = x_h.shape[-2:]
        pl = F.adaptive_avg_pool2d(x_l, self.pooled_size)  # (B, C, a, a)
        ph = F.adaptive_avg_pool2d(x_h, self.pooled_size)  # (B, C, a, a)
        q = self._to_grid(self.query(pl))  # (B, a^2, s, s)
        k = self._to_grid(self.key(torch.cat([pl, ph], dim=1)))  # (B, a^2, s, s)
        v = self._to_grid(self.value(x_h))  # (B, hw, s, s)
        offsets = _bound(self.offset(k), self.offset_range)  # (B, 2N, s, s)
        z = dynamic_affinity(q, k, v, offsets, num_points=self.num_points)  # (B, hw, s, s)
        z = z.reshape(B, h * w, self.side ** 2).transpose(1, 2).reshape(B, -1, h, w)  # (B, c, h, w)
        return F.interpolate(self.proj(z), size=(H, W), mode="bilinear", align_corners=False)


class DDSM(nn.Module):
    """Fuses x_h into x_l with the spatial and/or channel branch; output (B, C, H, W).

    ``branches``: spatial | channel | dual. ``fusion``: sum (x_l + branches) | concat (1x1 conv).
    """

    def __init__(self, channels: int, *, branches: str = "dual", num_points: int = 9, pos_embed: str = "sine",
                 pooled_size: int = 8, fusion: str = "sum", offset_range: float = 0.0, inner_ratio: float = 0.5):
        super().__init__()
        check_ddsm_options(branches=branches, num_points=num_points, pos_embed=pos_embed, pooled_size=pooled_size,
                           fusion=fusion, offset_range=offset_range, inner_ratio=inner_ratio)
        self.fusion = fusion
        self.spatial = (SpatialBranch(channels, num_points=num_points, pos_embed=pos_embed, inner_ratio=inner_ratio,
                                      offset_range=offset_range) if branches in ("spatial", "dual") else None)
        self.channel = (ChannelBranch(channels, num_points=num_points, pooled_size=pooled_size,
                                      offset_range=offset_range) if branches in ("channel", "dual") else None)
        n_in = 1 + (self.spatial is not None) + (self.channel is not None)
        self.merge = nn.Conv2d(n_in * channels, channels, 1) if fusion == "concat" else None

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> fused (B, C, H, W)."""
        parts = [x_l]
        if self.spatial is not None:
            parts.append(self.spatial(x_l, x_h))
        if self.channel is not None:
            parts.append(self.channel(x_l, x_h))
        if self.merge is not None:
            return self.merge(torch.cat(parts, dim=1))
        return sum(parts[1:], parts[0])
