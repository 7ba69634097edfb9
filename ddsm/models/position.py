"""Position embeddings added to both DDSM inputs (figure: e_pl, e_ph).

The figure draws a sine-wave icon but does not say whether the embedding is learned; both are
options (``pos_embed``: sine | learned | none), sine being the default.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddsm.models.projection import memory_format


def sine_embedding_2d(channels: int, height: int, width: int, *, device=None, dtype=None) -> torch.Tensor:
    """DETR-style 2-D sinusoidal embedding: half the channels encode y, half x; shape (1, C, H, W).

    Coordinates are normalised to [0, 2*pi] so the embedding does not depend on the absolute size;
    an odd channel count leaves the last channel zero.
    """
    half = channels // 2
    nfreq = max(half // 2, 1)
    dim_t = 10000 ** (torch.arange(nfreq, device=device, dtype=torch.float32) / nfreq)  # (F,)
    y = torch.linspace(0, 2 * math.pi, height, device=device)[:, None] / dim_t  # (H, F)
    x = torch.linspace(0, 2 * math.pi, width, device=device)[:, None] / dim_t  # (W, F)
    ey = torch.cat([y.sin(), y.cos()], dim=1)[:, :half]  # (H, half)
    ex = torch.cat([x.sin(), x.cos()], dim=1)[:, :half]  # (W, half)
    emb = torch.zeros(channels, height, width, device=device)
    emb[:half] = ey.t()[:, :, None].expand(half, height, width)
    emb[half : 2 * half] = ex.t()[:, None, :].expand(half, height, width)
    return emb[None].to(dtype or torch.float32)  # (1, C, H, W)


class PositionEmbedding(nn.Module):
    """Adds a position embedding to a (B, C, H, W) map.

    kind: ``sine`` (fixed, any size), ``learned`` (a (1, C, S, S) table resized bilinearly to the input
    size, so one module serves every resolution), or ``none`` (identity).
    """

    KINDS = ("sine", "learned", "none")

    def __init__(self, channels: int, *, kind: str = "sine", table_size: int = 16):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"pos_embed={kind!r} is not allowed: expected one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.channels = channels
        self._cache: dict[tuple, torch.Tensor] = {}  # sine tables by (H, W, device, dtype)
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(1, channels, table_size, table_size) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x + e; shape unchanged."""
        if self.kind == "none":
            return x
        H, W = x.shape[-2:]
        if self.kind == "sine":
            # stored in x's layout: adding a (1, C, H, W) table of the other layout is a strided pass ~10x slower
            fmt = memory_format(x)
            key = (H, W, x.device, x.dtype, fmt)
            if key not in self._cache:
                e = sine_embedding_2d(self.channels, H, W, device=x.device, dtype=x.dtype)
                self._cache[key] = e.contiguous(memory_format=fmt)
            e = self._cache[key]
        else:
            e = F.interpolate(self.table, size=(H, W), mode="bilinear", align_corners=False).to(x.dtype)
        return x + e
