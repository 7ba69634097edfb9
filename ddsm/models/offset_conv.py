"""The spatial branch's offset conv, a 3x3 conv on concat(x_l, up(x_h)), computed as 1x1 taps.

A 3x3 conv with n outputs is nine 1x1 convs (its taps), each shifted by its kernel position and summed.
Here the taps of both halves of the input run as 1x1 convs C -> 9n: the x_l half at H x W, the up(x_h)
half at h x w before upsampling (a 1x1 conv commutes with bilinear upsampling, whose weights sum to 1;
4x fewer FLOPs at a 2x upsampling, and no C-channel map at H x W). The two 9n-channel maps are added
and :func:`shift_sum` adds each tap shifted by its kernel position, with the zero padding of the conv.

Exact algebra (any sizes, either ``align_corners``), equal to the direct conv up to float rounding
(tests/ddsm/models/test_offsets.py, 1e-12 in float64). Why: with n = 2N = 18 outputs, mkldnn's 3x3
conv on CPU is slow (its backward took twice the time of a 1x1 128 -> 128 conv of similar FLOPs), a
grouped one-hot 3x3 conv for the shifts cost as much again; a 1x1 conv with 9n = 162 outputs is one
well-shaped GEMM, and the shifts are nine strided adds. Forward + backward of the whole offset conv at
64x128, C=128, batch 2: 61-65 ms -> 47 ms on this 2-core CPU (benchmarks/README.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddsm.models.precision import at_least_fp32, float32_region
from ddsm.models.projection import conv1x1

__all__ = ["conv3x3_of_upsampled", "offset_conv_of_concat", "shift_sum"]


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv weight (n, C, 3, 3) as the 1x1 conv (9n, C, 1, 1) of its taps, tap-major and in reversed
    kernel order: channel s*n + o is output o's tap at kernel position (ky, kx) = (2 - s // 3, 2 - s % 3), so
    each tap's n channels are adjacent in a channels-last map and the backward is one strided view."""
    n, c = weight.shape[:2]
    return weight.flip(2, 3).permute(2, 3, 0, 1).reshape(9 * n, c, 1, 1)


def _window(slot: int, height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """For the tap in slot s (reading the input at offset dy, dx = 1 - s // 3, 1 - s % 3): the output
    rows/columns that read it and the input rows/columns they read (out[y, x] += in[y + dy, x + dx] where
    both lie on the map)."""
    dy, dx = 1 - slot // 3, 1 - slot % 3
    out_y, out_x = slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx))
    in_y, in_x = slice(max(0, dy), height + min(0, dy)), slice(max(0, dx), width + min(0, dx))
    return out_y, out_x, in_y, in_x


class _ShiftSum(torch.autograd.Function):
    """out[o](y, x) = sum_s taps[s*n + o](y + dy_s, x + dx_s), zero outside: a grouped 3x3 conv with one-hot
    kernels, as eight strided adds on channels-last rows (forward) and one copy of a strided view (backward)."""

    @staticmethod
    def forward(ctx, taps: torch.Tensor, n: int) -> torch.Tensor:
        """taps (B, 9n, H, W) -> (B, n, H, W) with channels-last strides."""
        B, _, H, W = taps.shape
        rows = taps.permute(0, 2, 3, 1).reshape(B, H, W, 9, n)  # (B, H, W, 9, n); a view when channels-last
        out = rows[:, :, :, 4].clone()  # the centre tap reads every pixel
        for s in (0, 1, 2, 3, 5, 6, 7, 8):
            oy, ox, iy, ix = _window(s, H, W)
            out[:, oy, ox] += rows[:, iy, ix, s]
        ctx.n = n
        return out.permute(0, 3, 1, 2)  # (B, n, H, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        """d taps[s](y', x') = grad(y' - dy_s, x' - dx_s) (0 off the map) = padded grad(y' + a, x' + c) with
        (a, c) = (s // 3, s % 3): the 3x3 windows of the zero-padded gradient, one strided view."""
        n = ctx.n
        B, _, H, W = grad.shape
        padded = F.pad(grad.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H + 2, W + 2, n), contiguous
        sb, sy, sx, so = padded.stride()
        windows = padded.as_strided((B, H, W, 3, 3, n), (sb, sy, sx, sy, sx, so))  # [b, y, x, a, c] = padded[b, y+a, x+c]
        out = windows.reshape(B, H, W, 9 * n)  # (B, H, W, 9n): one copy
        return out.permute(0, 3, 1, 2), None  # (B, 9n, H, W), channels-last


def shift_sum(taps: torch.Tensor, n: int) -> torch.Tensor:
    """Sum the nine tap maps of a 3x3 conv, each shifted by its kernel position (zero padding 1):
    taps (B, 9n, H, W) in :func:`_taps`' order (channel s*n + o: kernel position (2 - s // 3, 2 - s % 3))
    -> (B, n, H, W), channels-last strides. Equal to the grouped conv with one-hot kernels of that order."""
    return _ShiftSum.apply(taps, n)


def _upsampled_taps(x: torch.Tensor, weight: torch.Tensor, *, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """The nine taps of a 3x3 conv on up(x), without up(x): the 1x1 conv of the taps at x's size, then its maps
    upsampled (bilinear, to ``size``). x (B, C, h, w), weight (n, C, 3, 3) -> (B, 9n, H, W) in :func:`_taps`'
    order, channels-last; in the dtype of x (callers choose it)."""
    z = conv1x1(x, _taps(weight.to(x.dtype)), channels_last=True)  # (B, 9n, h, w) rows
    return F.interpolate(z, size=size, mode="bilinear", align_corners=align_corners)  # (B, 9n, H, W)


def conv3x3_of_upsampled(x: torch.Tensor, weight: torch.Tensor, *, size: tuple[int, int],
                         align_corners: bool) -> torch.Tensor:
    """``conv2d(up(x), weight, padding=1)`` in float32 (under any autocast) without up(x), up = bilinear to
    ``size``: x (B, C, h, w), weight (n, C, 3, 3) -> (B, n, H, W); the taps at h x w, upsampled, shift-summed."""
    with float32_region(x.device):
        x = at_least_fp32(x)
        return shift_sum(_upsampled_taps(x, weight, size=size, align_corners=align_corners), weight.shape[0])


def offset_conv_of_concat(x_l: torch.Tensor, x_h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                          align_corners: bool) -> torch.Tensor:
    """``conv2d(cat([x_l, up(x_h)]), weight, bias, padding=1)`` in float32 under any autocast (offsets need
    more than bf16's 8 mantissa bits), up = bilinear to x_l's size, computed as taps (module docstring):
    x_l (B, C, H, W), x_h (B, C, h, w) in either layout, weight (n, 2C, 3, 3) -> (B, n, H, W), channels-last strides.
    The two halves' taps are added before one shift-sum (as :func:`conv3x3_of_upsampled` does for the second)."""
    n, C = weight.shape[0], x_l.shape[1]
    with float32_region(x_l.device):
        x_l, x_h = at_least_fp32(x_l), at_least_fp32(x_h)
        w = weight.to(x_l.dtype)
        taps = conv1x1(x_l, _taps(w[:, :C]), channels_last=True)  # (B, 9n, H, W) rows: the x_l half
        taps = taps.add_(_upsampled_taps(x_h, w[:, C:], size=x_l.shape[-2:], align_corners=align_corners))
        out = shift_sum(taps, n)  # (B, n, H, W)
        return out if bias is None else out + bias.to(out.dtype).view(1, n, 1, 1)
