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

__all__ = ["conv1x1", "conv1x1_heads", "memory_format"]


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
    """out_i = W_i x + b_i per pixel for every head i; x (B, C, H, W) NCHW or channels-last, W_i (O_i, C),
    b_i (O_i,) or None; ``params`` = (W_1, b_1, W_2, b_2, ...)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, channels_last: bool, *params: torch.Tensor | None):
        """-> one (B, O_i, H, W) map per head, each its own tensor, stored channels-last or NCHW as asked."""
        B, C, H, W = x.shape
        weights, biases = params[0::2], params[1::2]
        dtype = _compute_dtype(x, weights[0])
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        results = []
        ctx.set_materialize_grads(False)  # an output nobody used gets None in the backward, not a zero map
        x_c = x.to(dtype)  # x itself unless autocast casts it; saved as is, so the backward does not cast again
        with float32_region(x.device):  # the dtype is chosen above; no op below may recast
            xr = _rows(x_c)  # (B, HW, C)
            for weight, bias in zip(weights, biases):
                O = weight.shape[0]
                w = weight.reshape(O, C).to(dtype)  # (O, C)
                b = None if bias is None else bias.to(dtype)
                result = torch.empty(B, O, H, W, dtype=dtype, device=x.device, memory_format=fmt)  # a base, not a
                # view: callers may add into it in place
                if channels_last:
                    out = result.permute(0, 2, 3, 1).view(B, H * W, O)  # rows
                    for i in range(B):
                        _product(xr[i], w.t(), None if b is None else b[None], out=out[i])  # (HW, C) @ (C, O)
                else:
                    out = result.view(B, O, H * W)
                    for i in range(B):
                        _product(w, xr[i].t(), None if b is None else b[:, None], out=out[i])  # (O, C) @ (C, HW)
                results.append(result)
        ctx.save_for_backward(x_c, *weights)
        ctx.dtype, ctx.x_dtype, ctx.x_channels_last = dtype, x.dtype, memory_format(x) == torch.channels_last
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        """dx = sum_i W_i^T grad_i in x's layout (channels-last or NCHW), accumulated in one buffer;
        dW_i = sum_pixels grad_i x^T, db_i = sum_pixels grad_i. A head whose output was not used gets no gradient."""
        x, *weights = ctx.saved_tensors  # x in the compute dtype
        B, C, H, W = x.shape
        need = ctx.needs_input_grad
        need_x = need[0]
        dx = None
        params_grads: list[torch.Tensor | None] = []
        with float32_region(x.device):
            xr = _rows(x)  # (B, HW, C)
            for head, (weight, grad) in enumerate(zip(weights, grads)):
                need_w, need_b = need[2 + 2 * head], need[3 + 2 * head]
                if grad is None:
                    params_grads += [None, None]
                    continue
                O = weight.shape[0]
                g = _rows(grad.to(ctx.dtype))  # (B, HW, O), any layout of grad
                w = weight.reshape(O, C).to(ctx.dtype)
                if need_x:
                    dx = _add_input_grad(dx, g, w, shape=(B, C, H, W), channels_last=ctx.x_channels_last)
                dw = db = None
                if need_w:
                    dw = torch.mm(g[0].t(), xr[0])  # (O, C)
                    for i in range(1, B):
                        dw.addmm_(g[i].t(), xr[i])
                    dw = dw.to(weight.dtype).view(weight.shape)
                if need_b:  # False when the bias is None
                    db = grad.sum(dim=(0, 2, 3)).to(weight.dtype)  # (O,)
                params_grads += [dw, db]
        if dx is not None:
            dx = dx.to(ctx.x_dtype)
        elif need_x:  # no head's output was used
            dx = torch.zeros_like(x, dtype=ctx.x_dtype)
        return dx, None, *params_grads


def _add_input_grad(dx: torch.Tensor | None, g: torch.Tensor, w: torch.Tensor, *, shape: tuple[int, int, int, int],
                    channels_last: bool) -> torch.Tensor:
    """dx (+)= g W per image: g (B, HW, O) rows, w (O, C) -> dx (B, C, H, W) channels-last or NCHW; the first head
    writes a new buffer, every further head adds into it in its GEMM (no separate sum of the heads' gradients)."""
    B, C, H, W = shape
    if channels_last:
        rows = g.new_empty(B, H * W, C) if dx is None else dx.permute(0, 2, 3, 1).view(B, H * W, C)
        for i in range(B):
            if dx is None:
                torch.mm(g[i], w, out=rows[i])  # (HW, O) @ (O, C)
            else:
                rows[i].addmm_(g[i], w)
        return rows.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
    maps = g.new_empty(B, C, H * W) if dx is None else dx.view(B, C, H * W)
    for i in range(B):
        if dx is None:
            torch.mm(w.t(), g[i].t(), out=maps[i])  # (C, O) @ (O, HW)
        else:
            maps[i].addmm_(w.t(), g[i].t())
    return maps.view(B, C, H, W)


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
    return _Conv1x1.apply(x, channels_last, weight, bias)[0]


def conv1x1_heads(x: torch.Tensor, heads: list[tuple[torch.Tensor, torch.Tensor | None]], *,
                  channels_last: bool) -> tuple[torch.Tensor, ...]:
    """Several 1x1 convs of one input, :func:`conv1x1` for each ``(weight, bias)`` of ``heads``, each output its
    own tensor. Where one conv with the weights concatenated would be split: each output's rows are then
    contiguous (no copy where they are read as rows), and the backward adds the heads' input gradients in
    their GEMMs instead of concatenating the output gradients first (a copy of every output map)."""
    if not heads:
        raise ValueError("conv1x1_heads: heads is empty; expected at least one (weight, bias) pair")
    params = [t for head in heads for t in head]
    return _Conv1x1.apply(x, channels_last, *params)
