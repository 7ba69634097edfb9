"""Bilinear resizing of NCHW maps on CPU whose backward is two matrix products (interpolation is separable).

``F.interpolate(x, size, mode="bilinear")`` of an NCHW float map on CPU has a fast forward, but its
backward scatters every output gradient into a zeroed map with ATen's scalar kernel: for DDSM's channel
branch (128 channels, 32x64 -> 64x128, batch 2) 3.0 ms forward and 11 ms forward + backward on this
2-core CPU. The adjoint of bilinear upsampling is ``A_h^T g A_w`` with the two (out, in) 1-D
interpolation matrices, i.e. two GEMMs: 7 ms forward + backward. The forward stays ATen's (as fast, and
what FLOP counts and every other caller see). Same gradient up to float rounding (the matrices hold the
weights ATen computes: tests/ddsm/models/test_resize.py). Channels-last maps, other dtypes and devices
use ``F.interpolate`` and its own backward, which are the fast ones there.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ddsm.models.precision import float32_region

__all__ = ["interpolation_matrix", "resize_bilinear"]


@functools.lru_cache(maxsize=32)
def interpolation_matrix(n_out: int, n_in: int, *, align_corners: bool,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (n_out, n_in) matrix of 1-D linear interpolation from n_in to n_out samples, as ATen's
    ``upsample_bilinear2d`` weighs them for a given output size: source coordinate ``i (n_in - 1) / (n_out - 1)``
    (align_corners, 0 for n_out = 1) or ``(i + 0.5) n_in / n_out - 0.5`` clamped at 0; the left sample
    ``min(floor(src), n_in - 1)`` and its right neighbour (itself at the last sample) weighted 1 - frac and frac.
    On CPU (the only device :func:`resize_bilinear` uses it on)."""
    i = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(i)
    else:
        src = ((i + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(n_in - 1)
    frac = (src - lo).clamp(0, 1)
    hi = torch.where(lo < n_in - 1, lo + 1, lo)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(dtype)


class _Bilinear(torch.autograd.Function):
    """``F.interpolate(x, size, mode="bilinear")`` forward; backward ``A_h^T g A_w`` as two GEMMs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
        """x (B, C, h, w) NCHW -> (B, C, H, W), ATen's kernel."""
        ctx.in_size, ctx.align_corners = tuple(x.shape[-2:]), align_corners
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        """grad (B, C, H, W), any layout -> (B, C, h, w) NCHW: along H at full width first (a batched GEMM with
        one small matrix), then along W (one GEMM over every row)."""
        B, C, H, W = grad.shape
        h, w = ctx.in_size
        a_h = interpolation_matrix(H, h, align_corners=ctx.align_corners, dtype=grad.dtype)  # (H, h)
        a_w = interpolation_matrix(W, w, align_corners=ctx.align_corners, dtype=grad.dtype)  # (W, w)
        g = grad.contiguous().view(B * C, H, W)  # (B*C, H, W)
        with float32_region(grad.device):  # in the gradient's own dtype (float32/64) whatever the autocast state
            cols = torch.matmul(a_h.t(), g)  # (h, H) @ (B*C, H, W) -> (B*C, h, W)
            dx = torch.mm(cols.view(B * C * h, W), a_w)  # (B*C*h, W) @ (W, w) -> (B*C*h, w)
        return dx.view(B, C, h, w), None, None


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], *, align_corners: bool) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=...)``: x (B, C, h, w) -> (B, C, H, W).

    For NCHW float32/64 maps on CPU that need a gradient, the backward runs as two GEMMs (module
    docstring); every other input goes through ``F.interpolate`` alone.
    """
    gemm_backward = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
                     and x.requires_grad and torch.is_grad_enabled())
    if not gemm_backward:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    return _Bilinear.apply(x, tuple(size), align_corners)
