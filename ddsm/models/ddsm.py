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
- a sampled point outside its map (the image border for the spatial branch, the channel grid's border
  for the channel branch): ``spatial_out_of_map`` / ``channel_out_of_map``, ``mask`` (default: only a
  point's on-map corners count, renormalised, and its softmax term is scaled by its on-map share) or
  ``zero`` (a zero key and value that keeps its softmax share, as deformable conv's zero padding).
  Why mask is the default: :mod:`ddsm.models.sampling`.
- upsampling of x_h (and of the channel branch's output): ``align_corners`` as the decoder around it
  (SFSegNets: True).

Controls (a grid can ask "is it the learned sampling, or just more context?"):
- ``grid_dilation`` d: the spatial branch's k x k base grid spaced d pixels (same N, a (d(k-1)+1)^2
  window);
- ``learn_offsets=False``: no offset conv, the points stay on the (dilated) regular grid, i.e. a fixed
  sparse attention over the same window;
- ``channel_order``: ``natural`` (channel i of the 1x1 projections at cell (i // s, i % s) of the s x s
  grid) or ``permuted`` (a fixed random permutation of the grid, drawn from torch's RNG when the model is
  built, i.e. seeded by the trial seed, and saved in the state dict). Every layer in front of the grid
  is a learned 1x1 conv with i.i.d. initialisation, so the two are equal in distribution: the control
  shows whether results depend on which channels happen to be grid neighbours (they should not beyond
  seed noise; a gap is a bug or a seed effect, not a property of DDSM).

Diagnostics: every branch keeps the offsets of its last forward; :meth:`DDSM.offset_stats` gives their
mean and max magnitude |(dy, dx)| (pixels of x_l for the spatial branch, grid cells for the channel
branch), which the engine logs at every validation.

Implementation (same results up to float rounding, several times faster on CPU): both branches read
the inputs in their own layout (NCHW or channels-last) and return x_l's; inside, the spatial branch
samples channels-last rows, which its 1x1 convs write directly (:mod:`ddsm.models.projection`), and it
rearranges its convs (see :meth:`SpatialBranch.forward`, and
:mod:`ddsm.models.offset_conv` for the offset conv); the sampling is
:func:`ddsm.models.sampling.dynamic_affinity`'s gather path; the backward of the channel branch's
upsampling of an NCHW output on CPU is two GEMMs (:mod:`ddsm.models.resize`). tests/ddsm/models/test_sampling_fast.py
checks both branches against the figure written literally.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddsm.config import ConfigError
from ddsm.models.position import PositionEmbedding
from ddsm.models.offset_conv import offset_conv_of_concat
from ddsm.models.precision import conv2d_fp32
from ddsm.models.projection import conv1x1, conv1x1_heads, memory_format
from ddsm.models.resize import resize_bilinear
from ddsm.models.sampling import OUT_OF_MAP, dynamic_affinity

BRANCHES = ("spatial", "channel", "dual")
FUSIONS = ("sum", "concat")
CHANNEL_ORDERS = ("natural", "permuted")


def check_ddsm_options(*, branches: str, num_points: int, pos_embed: str, pooled_size: int, fusion: str,
                       offset_range: float, inner_ratio: float, spatial_out_of_map: str = "mask",
                       channel_out_of_map: str = "mask", channel_order: str = "natural", grid_dilation: int = 1,
                       learn_offsets: bool = True) -> None:
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
        (spatial_out_of_map in OUT_OF_MAP, "spatial_out_of_map", spatial_out_of_map, f"one of {', '.join(OUT_OF_MAP)}"),
        (channel_out_of_map in OUT_OF_MAP, "channel_out_of_map", channel_out_of_map, f"one of {', '.join(OUT_OF_MAP)}"),
        (channel_order in CHANNEL_ORDERS, "channel_order", channel_order, f"one of {', '.join(CHANNEL_ORDERS)}"),
        (isinstance(grid_dilation, int) and not isinstance(grid_dilation, bool) and grid_dilation >= 1,
         "grid_dilation", grid_dilation, "an integer >= 1"),
        (isinstance(learn_offsets, bool), "learn_offsets", learn_offsets, "true or false"),
    ]
    for ok, name, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{name}={value!r} is not allowed: expected {allowed}")


def _offset_conv(in_ch: int, num_points: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, 2 * num_points, 3, padding=1)
    nn.init.zeros_(conv.weight)  # start from the regular k x k grid
    nn.init.zeros_(conv.bias)
    return conv


class _ToMemoryFormat(torch.autograd.Function):
    """``x.contiguous(memory_format=fmt)`` whose backward returns the gradient in x's own layout.

    (The plain ``contiguous`` passes the gradient through in whatever layout it arrives, so the
    branches would get NCHW gradients for their channels-last tensors and every backward op and
    gradient sum would mix layouts, which is several times slower on CPU.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        """Return x in memory format ``fmt`` (x itself if it already is)."""
        ctx.fmt = memory_format(x)
        return _relayout(x, fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """The gradient in the input's memory format."""
        return _relayout(grad, ctx.fmt), None


def _relayout(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """x.contiguous(memory_format=fmt), between NCHW and NHWC as one 2-D (C, HW) transpose per image:
    ATen has a blocked kernel for 2-D transposes; its general strided copy is 2-6x slower here."""
    if x.is_contiguous(memory_format=fmt):
        return x
    B, C, H, W = x.shape
    if fmt == torch.channels_last and x.is_contiguous():
        out = x.new_empty(B, H * W, C)
        for b in range(B):
            out[b].copy_(x[b].view(C, H * W).t())
        return out.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
    if fmt == torch.contiguous_format and x.is_contiguous(memory_format=torch.channels_last):
        out = x.new_empty(B, C, H * W)
        for b in range(B):
            out[b].copy_(x[b].permute(1, 2, 0).reshape(H * W, C).t())
        return out.view(B, C, H, W)
    return x.contiguous(memory_format=fmt)


def to_memory_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """x (B, C, H, W) stored in ``fmt`` (channels_last or contiguous_format); its gradient goes back
    in x's own layout."""
    return _ToMemoryFormat.apply(x, fmt)


def _bound(offsets: torch.Tensor, offset_range: float) -> torch.Tensor:
    return offsets if offset_range <= 0 else offset_range * torch.tanh(offsets / offset_range)


def offset_magnitude(offsets: torch.Tensor) -> tuple[float, float]:
    """Mean and max of |(dy, dx)| over every point and location of offsets (B, 2N, H, W)."""
    B, twice_n, H, W = offsets.shape
    norm = offsets.detach().float().reshape(B, twice_n // 2, 2, H, W).norm(dim=2)  # (B, N, H, W)
    return float(norm.mean()), float(norm.amax())


class SpatialBranch(nn.Module):
    """Spatial-wise dynamic affinity (figure a): returns x_S_out (B, C, H, W)."""

    def __init__(self, channels: int, *, num_points: int = 9, pos_embed: str = "sine",
                 inner_ratio: float = 0.5, offset_range: float = 0.0, out_of_map: str = "mask",
                 grid_dilation: int = 1, learn_offsets: bool = True, align_corners: bool = True):
        super().__init__()
        d = max(1, round(channels * inner_ratio))
        self.num_points = num_points
        self.offset_range = offset_range
        self.out_of_map = out_of_map
        self.grid_dilation = grid_dilation
        self.align_corners = align_corners
        self.last_offsets: torch.Tensor | None = None  # (B, 2N, H, W) of the last forward, detached
        self.pos_l = PositionEmbedding(channels, kind=pos_embed)
        self.pos_h = PositionEmbedding(channels, kind=pos_embed)
        self.query = nn.Conv2d(channels, d, 1)  # theta
        self.key = nn.Conv2d(2 * channels, d, 1)  # phi, on concat(x_l, up(x_h))
        self.value = nn.Conv2d(channels, d, 1)  # g, on up(x_h)
        self.offset = _offset_conv(2 * channels, num_points) if learn_offsets else None
        self.proj = nn.Conv2d(d, channels, 1)

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w), NCHW or channels-last -> (B, C, H, W) in x_l's layout.

        Computed as the figure draws it, rearranged for speed with the same parameters and the same
        result up to float rounding: the 1x1 convs read the inputs in their own layout and write
        channels-last rows, which the sampling reads, and the output projection writes x_l's layout
        (:func:`ddsm.models.projection.conv1x1`: no relayout of a whole map at either end); query and
        the x_l half of the key as two heads of one 1x1 conv of x_l, the up(x_h) half of the key and the
        value as two of x_h (:func:`ddsm.models.projection.conv1x1_heads`), the latter at h x w
        before upsampling (a 1x1 conv commutes with bilinear upsampling, whose weights sum to 1); the
        offset conv as the 1x1 convs of its nine taps, the up(x_h) half's at h x w, added and
        shift-summed (:mod:`ddsm.models.offset_conv`).
        """
        C, size = x_l.shape[1], x_l.shape[-2:]
        xl, xh = self.pos_l(x_l), self.pos_h(x_h)  # (B, C, H, W), (B, C, h, w)
        w_key_l, w_key_h = self.key.weight[:, :C], self.key.weight[:, C:]
        q, k_l = conv1x1_heads(xl, [(self.query.weight, self.query.bias), (w_key_l, self.key.bias)],
                               channels_last=True)  # (B, d, H, W) rows each
        k_h, v = (F.interpolate(t, size=size, mode="bilinear", align_corners=self.align_corners)
                  for t in conv1x1_heads(xh, [(w_key_h, None), (self.value.weight, self.value.bias)],
                                         channels_last=True))  # (B, d, h, w) rows -> (B, d, H, W) each
        k = k_l + k_h  # theta, phi, g: each (B, d, H, W)
        offsets = self._offsets(x_l, x_h)  # (B, 2N, H, W)
        self.last_offsets = offsets.detach()
        y = dynamic_affinity(q, k, v, offsets, num_points=self.num_points, out_of_map=self.out_of_map,
                             dilation=self.grid_dilation)  # (B, d, H, W) rows
        return conv1x1(y, self.proj.weight, self.proj.bias, channels_last=memory_format(x_l) == torch.channels_last)

    def _offsets(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """The offset conv on concat(x_l, up(x_h)) as 1x1 taps (the up(x_h) half at h x w,
        :func:`ddsm.models.offset_conv.offset_conv_of_concat`), bounded, in float32 under any autocast
        (positions of tens of pixels need more than bf16's 8 mantissa bits); zeros without learned offsets.
        x_l (B, C, H, W), x_h (B, C, h, w) -> (B, 2N, H, W) float32."""
        B, C, H, W = x_l.shape
        if self.offset is None:
            return x_l.new_zeros(B, 2 * self.num_points, H, W, dtype=torch.promote_types(x_l.dtype, torch.float32))
        offsets = offset_conv_of_concat(x_l, x_h, self.offset.weight, self.offset.bias, align_corners=self.align_corners)
        return _bound(offsets, self.offset_range)


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, size)``: x (B, C, H, W) -> (B, C, size, size). When size divides H and W, as
    block sums of a view, scaled: the backward is then a broadcast (an expanded view) that the gradient sum
    takes in one pass, where CPU's adaptive pooling backward zero-fills a full-size map first (12 ms at
    64x128, C=128, batch 2) and a mean's backward divides into a new full-size one (8 ms)."""
    B, C, H, W = x.shape
    if H % size or W % size:
        return F.adaptive_avg_pool2d(x, size)
    blocks = x.reshape(B, C, size, H // size, size, W // size)  # (B, C, a, H/a, a, W/a)
    return blocks.sum(dim=(3, 5)) * (size * size / (H * W))  # (B, C, a, a)


class ChannelBranch(nn.Module):
    """Channel-wise dynamic affinity (figure b): returns x_C_out (B, C, H, W)."""

    def __init__(self, channels: int, *, num_points: int = 9, pooled_size: int = 8, offset_range: float = 0.0,
                 out_of_map: str = "mask", channel_order: str = "natural", learn_offsets: bool = True,
                 align_corners: bool = True):
        super().__init__()
        self.side = max(1, round(math.sqrt(channels)))  # channels laid out on side x side
        c = self.side ** 2
        self.num_points = num_points
        self.pooled_size = pooled_size
        self.offset_range = offset_range
        self.out_of_map = out_of_map
        self.align_corners = align_corners
        self.last_offsets: torch.Tensor | None = None  # (B, 2N, s, s) of the last forward, detached
        self.query = nn.Conv2d(channels, c, 1)
        self.key = nn.Conv2d(2 * channels, c, 1)
        self.value = nn.Conv2d(channels, c, 1)
        self.offset = _offset_conv(pooled_size ** 2, num_points) if learn_offsets else None
        self.proj = nn.Conv2d(c, channels, 1) if c != channels else nn.Identity()
        if channel_order == "permuted":  # grid cell g holds channel perm[g]; drawn from torch's (seeded) RNG
            perm = torch.randperm(c)
            self.register_buffer("perm", perm)
            self.register_buffer("inverse_perm", torch.argsort(perm))
        else:
            self.perm = self.inverse_perm = None

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)  # channel perm[g] at cell g (a fresh NCHW-contiguous tensor)
        B, c, h, w = x.shape
        # every channel becomes a pixel of a side x side grid whose features are its h*w values;
        # a view (channels-last strides) when x is contiguous, which the sampling reads as rows
        return x.reshape(B, self.side, self.side, h * w).permute(0, 3, 1, 2)  # (B, hw, s, s)

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> (B, C, H, W) in x_l's layout (NCHW or channels-last)."""
        B, _, H, W = x_l.shape
        h, w = x_h.shape[-2:]
        pl, ph = _pool(x_l, self.pooled_size), _pool(x_h, self.pooled_size)  # (B, C, a, a) each
        q = self._to_grid(self.query(pl))  # (B, a^2, s, s)
        k = self._to_grid(self.key(torch.cat([pl, ph], dim=1)))  # (B, a^2, s, s)
        v = self._to_grid(to_memory_format(self.value(x_h), torch.contiguous_format))  # (B, hw, s, s)
        offsets = self._offsets(k)  # (B, 2N, s, s)
        self.last_offsets = offsets.detach()
        z = dynamic_affinity(q, k, v, offsets, num_points=self.num_points, out_of_map=self.out_of_map)  # (B, hw, s, s)
        z = z.permute(0, 2, 3, 1).reshape(B, -1, h, w)  # (B, s, s, hw) -> (B, c, h, w), grid order
        if self.inverse_perm is not None:
            z = z.index_select(1, self.inverse_perm)  # back to channel order: channel j from cell inverse_perm[j]
        z = to_memory_format(self.proj(z), memory_format(x_l))  # small here; the upsampled map is not
        return resize_bilinear(z, (H, W), align_corners=self.align_corners)  # NCHW on CPU: backward as GEMMs


    def _offsets(self, k: torch.Tensor) -> torch.Tensor:
        """The offset conv on the key's channel grid, bounded, in float32 under any autocast (as the
        spatial branch's); zeros without learned offsets. k (B, a^2, s, s) -> (B, 2N, s, s)."""
        if self.offset is None:
            dtype = torch.promote_types(k.dtype, torch.float32)
            return k.new_zeros(k.shape[0], 2 * self.num_points, self.side, self.side, dtype=dtype)
        return _bound(conv2d_fp32(k, self.offset.weight, self.offset.bias, padding=1), self.offset_range)


class DDSM(nn.Module):
    """Fuses x_h into x_l with the spatial and/or channel branch; output (B, C, H, W).

    ``branches``: spatial | channel | dual. ``fusion``: sum (x_l + branches) | concat (1x1 conv).
    """

    def __init__(self, channels: int, *, branches: str = "dual", num_points: int = 9, pos_embed: str = "sine",
                 pooled_size: int = 8, fusion: str = "sum", offset_range: float = 0.0, inner_ratio: float = 0.5,
                 spatial_out_of_map: str = "mask", channel_out_of_map: str = "mask", channel_order: str = "natural",
                 grid_dilation: int = 1, learn_offsets: bool = True, align_corners: bool = True):
        super().__init__()
        check_ddsm_options(branches=branches, num_points=num_points, pos_embed=pos_embed, pooled_size=pooled_size,
                           fusion=fusion, offset_range=offset_range, inner_ratio=inner_ratio,
                           spatial_out_of_map=spatial_out_of_map, channel_out_of_map=channel_out_of_map,
                           channel_order=channel_order, grid_dilation=grid_dilation, learn_offsets=learn_offsets)
        self.fusion = fusion
        self.spatial = (SpatialBranch(channels, num_points=num_points, pos_embed=pos_embed, inner_ratio=inner_ratio,
                                      offset_range=offset_range, out_of_map=spatial_out_of_map,
                                      grid_dilation=grid_dilation, learn_offsets=learn_offsets,
                                      align_corners=align_corners)
                        if branches in ("spatial", "dual") else None)
        self.channel = (ChannelBranch(channels, num_points=num_points, pooled_size=pooled_size,
                                      offset_range=offset_range, out_of_map=channel_out_of_map,
                                      channel_order=channel_order, learn_offsets=learn_offsets,
                                      align_corners=align_corners)
                        if branches in ("channel", "dual") else None)
        n_in = 1 + (self.spatial is not None) + (self.channel is not None)
        self.merge = nn.Conv2d(n_in * channels, channels, 1) if fusion == "concat" else None

    def forward(self, x_l: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
        """x_l (B, C, H, W), x_h (B, C, h, w) -> fused (B, C, H, W), in x_l's memory format."""
        # every branch returns x_l's layout: the spatial branch's 1x1 convs read NCHW or channels-last maps and
        # write the channels-last rows it samples, and its output projection writes x_l's layout back; the
        # channel branch pools the inputs as they come and upsamples its small result in x_l's layout
        parts = [x_l]
        if self.spatial is not None:
            parts.append(self.spatial(x_l, x_h))
        if self.channel is not None:
            parts.append(self.channel(x_l, x_h))
        if self.merge is not None:
            return self.merge(torch.cat(parts, dim=1))
        out = parts[1]  # a fresh branch output that its backward does not read: safe to add into in place
        for part in (*parts[2:], x_l):
            out = out.add_(part)
        return out

    def offset_stats(self) -> dict[str, tuple[float, float]]:
        """``{branch: (mean, max) |offset|}`` of each branch's last forward (branches not run yet are left out)."""
        branches = {"spatial": self.spatial, "channel": self.channel}
        return {name: offset_magnitude(b.last_offsets) for name, b in branches.items()
                if b is not None and b.last_offsets is not None}
