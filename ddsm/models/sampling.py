"""Dynamic sampling and sparse affinity: the core op of DDSM (figure, "DS" boxes).

For every output location p and every point k of a k x k base grid r_k, a feature map is sampled
bilinearly at ``p + r_k + offset_k(p)``; a query at p is compared with the N sampled keys, a softmax
over the N points gives the affinity, and the affinity-weighted sum of the N sampled values is the
output. Points outside the map read zeros (as in deformable convolution), so with zero offsets the
sampling equals an explicit zero-padded k x k neighbourhood gather.

Written here (not taken from torchvision.ops.deform_conv2d) because DDSM needs the sampled keys and
values themselves for a softmax affinity, not a weighted convolution of them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def base_grid(num_points: int, *, device=None, dtype=None) -> torch.Tensor:
    """The k x k regular offsets (dy, dx) around the centre, row-major; shape (N, 2).

    N must be a perfect square k*k; N=1 is the centre alone.
    """
    k = math.isqrt(num_points)
    if k * k != num_points or k < 1:
        raise ValueError(f"num_points={num_points} is not allowed: expected a perfect square k*k (1, 4, 9, ...)")
    # Even k (N=4, 16, ...) has no centre pixel: its grid is centred half a pixel off, at -(k-1)/2 .. (k-1)/2.
    r = torch.arange(k, device=device, dtype=dtype or torch.float32) - (k - 1) / 2
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dy.reshape(-1), dx.reshape(-1)], dim=1)  # (N, 2)


def sample_positions(offsets: torch.Tensor, num_points: int) -> torch.Tensor:
    """Absolute sampling positions p + r_k + offset_k(p) in pixels.

    offsets: (B, 2N, H, W) laid out as (dy_1, dx_1, dy_2, dx_2, ...). Returns (B, N, H, W, 2) as (y, x).
    """
    B, _, H, W = offsets.shape
    off = offsets.view(B, num_points, 2, H, W).permute(0, 1, 3, 4, 2)  # (B, N, H, W, 2)
    ys = torch.arange(H, device=offsets.device, dtype=offsets.dtype)
    xs = torch.arange(W, device=offsets.device, dtype=offsets.dtype)
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    centre = torch.stack([py, px], dim=-1)  # (H, W, 2)
    grid = base_grid(num_points, device=offsets.device, dtype=offsets.dtype)  # (N, 2)
    return centre[None, None] + grid[None, :, None, None, :] + off  # (B, N, H, W, 2)


def sample_at(feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``feat`` (B, C, Hin, Win) at pixel positions ``pos`` (B, N, H, W, 2) as (y, x).

    Returns (B, N, C, H, W); positions outside read zeros.
    """
    B, C, Hin, Win = feat.shape
    _, N, H, W, _ = pos.shape
    # grid_sample wants (x, y) normalised to [-1, 1] with align_corners=True: -1 = pixel 0, 1 = last pixel.
    gx = pos[..., 1] * (2.0 / max(Win - 1, 1)) - 1.0
    gy = pos[..., 0] * (2.0 / max(Hin - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).view(B, N * H, W, 2)  # (B, N*H, W, 2)
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # (B, C, N*H, W)
    return out.view(B, C, N, H, W).transpose(1, 2)  # (B, N, C, H, W)


def dynamic_affinity(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    *,
    num_points: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Affinity-weighted sum of N dynamically sampled values.

    query: (B, C, H, W), one query per output location.
    key, value: (B, C, Hk, Wk) maps sampled at the N positions of every location (same grid as the
    query when Hk, Wk = H, W).
    offsets: (B, 2N, H, W) learned offsets in pixels of the key/value map.
    scale: dot-product scale, default 1/sqrt(C) (as in scaled dot-product attention).
    Returns (B, C, H, W).
    """
    B, C, H, W = query.shape
    pos = sample_positions(offsets, num_points)  # (B, N, H, W, 2)
    k = sample_at(key, pos)  # (B, N, C, H, W)
    v = sample_at(value, pos)  # (B, N, C, H, W)
    s = scale if scale is not None else C ** -0.5
    logits = (k * query[:, None]).sum(dim=2) * s  # (B, N, H, W)
    attn = logits.softmax(dim=1)  # softmax over the N sampled points
    return (attn[:, :, None] * v).sum(dim=1)  # (B, C, H, W)
