"""1x1 convolutions as per-image matrix products that read a map in its own memory layout and write the
layout asked for, with gradients that go back in the input's layout.

DDSM's spatial branch samples channels-last rows, while the network around it runs NCHW (on CPU). A 1x1
conv of an NCHW map is one GEMM per image whichever layout the result is stored in: BLAS reads the
(C, HW) map transposed for free. So the branch's projections read NCHW maps and write rows, and its
output projection reads rows and writes NCHW, where ``F.conv2d`` would follow its input's layout and the
branch would need a relayout (a transpose of the whole map, forward and backward) at each end: at 64x128,
C=128, batch 2, on this 2-core CPU, relayout + conv + backward 77 ms vs 44 ms as here (benchmarks/README.md).
Written by hand because no torch op writes a conv's output in another layout than its input's.
"""
from __future__ import annotations

import torch

from ddsm.models.precision import float32_region

__all__ = ["conv1x1", "memory_format"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): a view for NCHW (transposed rows) and channels-last maps, else a copy."""
    B, C, H, W = x.shape
    if x.is_contiguous():
        return x.view(B, C, H * W).transpose(1, 2)  # (B, HW, C), column-major per image
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x (B, C, H, W) is stored NHWC (and not also NCHW-contiguous), else contiguous_format."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a conv would compute in here: autocast's lower precision where it is on, else the promotion."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


class _Conv1x1(torch.autograd.Function):
    """out = W x + b per pixel; x (B, C, H, W) NCHW or channels-last, W (O, C), b (O,) or None."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, channels_last: bool):
        """-> (B, O, H, W), stored channels-last or NCHW as asked."""
        B, C, H, W = x.shape
        O = weight.shape[0]
        dtype = _compute_dtype(x, weight)
        with float32_region(x.device):  # the dtype is chosen above; no op below may recast
            xr = _rows(x.to(dtype))  # (B, HW, C)
            w = weight.reshape(O, C).to(dtype)  # (O, C)
            b = None if bias is None else bias.to(dtype)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            result = torch.empty(B, O, H, W, dtype=dtype, device=x.device, memory_format=fmt)  # a base, not a view:
            # callers may add into it in place
            if channels_last:
                out = result.permute(0, 2, 3, 1).view(B, H * W, O)  # rows
                for i in range(B):
                    _product(xr[i], w.t(), None if b is None else b[None], out=out[i])  # (HW, C) @ (C, O)
            else:
                out = result.view(B, O, H * W)
                for i in range(B):
                    _product(w, xr[i].t(), None if b is None else b[:, None], out=out[i])  # (O, C) @ (C, HW)
        ctx.save_for_backward(x.to(dtype), weight)  # x itself unless autocast casts it: not cast twice
        ctx.dtype, ctx.x_dtype, ctx.x_channels_last = dtype, x.dtype, memory_format(x) == torch.channels_last
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        """dx in x's layout (channels-last or NCHW), dW = sum_pixels grad x^T, db = sum_pixels grad."""
        x, weight = ctx.saved_tensors  # x in the compute dtype
        B, C, H, W = x.shape
        O = weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with float32_region(x.device):
            g = _rows(grad.to(ctx.dtype))  # (B, HW, O), any layout of grad
            w = weight.reshape(O, C).to(ctx.dtype)
            if need_x:
                if ctx.x_channels_last:
                    rows = g.new_empty(B, H * W, C)
                    for i in range(B):
                        torch.mm(g[i], w, out=rows[i])  # (HW, O) @ (O, C)
                    dx = rows.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
                else:
                    maps = g.new_empty(B, C, H * W)
                    for i in range(B):
                        torch.mm(w.t(), g[i].t(), out=maps[i])  # (C, O) @ (O, HW)
                    dx = maps.view(B, C, H, W)
                dx = dx.to(ctx.x_dtype)
            if need_w:
                xr = _rows(x)  # (B, HW, C)
                dw = torch.mm(g[0].t(), xr[0])  # (O, C)
                for i in range(1, B):
                    dw.addmm_(g[i].t(), xr[i])
                dw = dw.to(weight.dtype).view(weight.shape)
            if need_b:  # False when bias is None
                db = grad.sum(dim=(0, 2, 3)).to(weight.dtype)  # (O,)
        return dx, dw, db, None


def _product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor) -> None:
    """out = a @ b (+ bias, broadcast), written into ``out``."""
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            channels_last: bool) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight`` (O, C, 1, 1) or (O, C): x (B, C, H, W) in any layout
    -> (B, O, H, W) stored channels-last (``channels_last=True``, whose rows the sampling reads) or NCHW.
    Under autocast it computes in autocast's dtype, as the conv would. x's gradient comes back in x's
    layout (channels-last or NCHW)."""
    return _Conv1x1.apply(x, weight, bias, channels_last)
