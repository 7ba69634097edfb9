"""Numerics under mixed precision: the few computations that must stay in float32 under autocast.

Used for attention energies and softmaxes (DANet, Non-local: energies of 1e2-1e4, where bf16's 8-bit
mantissa moves a softmax by percents) and for sampling offsets / flows (a position of tens of pixels
in bf16 is off by a tenth of a pixel, which moves every bilinear weight).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["at_least_fp32", "conv2d_fp32", "float32_region"]


def float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` (the ops inside run in the dtype of their inputs); a no-op on
    devices without autocast (``meta``, used to count FLOPs)."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    if available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def conv2d_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``F.conv2d`` in at least float32 whatever the autocast state (no cast for float32/64 inputs)."""
    with float32_region(x.device):
        x = at_least_fp32(x)
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), **kwargs)
