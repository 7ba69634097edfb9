"""Dynamic sampling and sparse affinity: the core op of DDSM (figure, "DS" boxes).

For every output location p and every point k of a k x k base grid r_k, a feature map is sampled
bilinearly at ``p + r_k + offset_k(p)``; a query at p is compared with the N sampled keys, a softmax
over the N points gives the affinity, and the affinity-weighted sum of the N sampled values is the
output.

What a point outside the map contributes (``out_of_map``, chosen per branch by DDSM):

- ``mask`` (the default): only the part of a point's bilinear footprint that lies on the map counts.
  With ``m_k`` in [0, 1] that share (1 for every point inside, 0 for a point a pixel or more outside,
  linear in between), the point reads its on-map corners renormalised (key and value = sum_c w_c X_c
  / m_k) and its softmax term is weighted by it: ``attn_k = m_k exp(l_k) / sum_j m_j exp(l_j)``. A
  point off the map takes no weight, the output is a convex combination of real features wherever the
  query sits, and the weight fades out continuously, so the op stays differentiable in the offsets.
  A query whose N points are all off the map returns 0.
- ``zero``: the point reads a zero key (logit 0) and a zero value and keeps its share of the softmax,
  as in deformable convolution's zero padding; with zero offsets the sampling is then exactly an
  explicit zero-padded k x k neighbourhood gather.

Why ``mask`` is the default: a zero-padded point is a constant "null" slot with logit 0, not -inf. At
initialisation every logit is near 0, so a query with n of its N points inside gets an output scaled by
about n/N, and this shrinkage depends on where the query sits, not on what it sees. On the channel
branch's sqrt(c) x sqrt(c) grid nearly every channel is near a border (at R18, 33% of channels have a
point off the grid at N=9 and 79% at N=49), so with ``zero`` the N ablation would measure padding as
much as sampling. Masking is how attention treats padding elsewhere (key padding masks); ``zero`` stays
available as the deformable-convolution-style ablation.

The base grid can be dilated (``dilation``: r_k * d), which spreads the N points over a larger window
without learning anything: the control that separates "learned sampling" from "more context".

Written here (not taken from torchvision.ops.deform_conv2d) because DDSM needs the sampled keys and
values themselves for a softmax affinity, not a weighted convolution of them.

Two implementations of :func:`dynamic_affinity` (``impl``):

- ``gather`` (default): channels-last rows, the 4 bilinear corners of the N points read with
  ``embedding_bag`` (a weighted row gather) and a fused gather-dot, with a hand-written backward
  (:class:`SampledAffinity`). It never materialises the (B, N, C, H, W) sampled keys or values, so
  memory stays O(B C H W + B N H W) and the CPU time is a few passes over the feature maps.
- ``grid_sample``: the direct reading of the figure with ``F.grid_sample`` and autograd; the
  reference the fast path is tested against (tests/ddsm/models/test_sampling_fast.py), kept for benchmarks.

Which one the model uses (``impl=None``) is chosen per device type by :func:`default_impl`: the
``DDSM_SAMPLING_IMPL`` environment variable (``grid_sample`` for every device, or per device type:
``cuda=grid_sample,cpu=gather``), else :data:`DEFAULT_IMPLS`. ``benchmarks/gpu_check.py`` times
both on the GPU it runs on and says which to set when the gather path loses there.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

IMPLS = ("gather", "grid_sample")
_RECORDERS: list[list[dict[str, torch.Tensor]]] = []  # open record_positions() blocks, innermost last


@contextlib.contextmanager
def record_positions() -> Iterator[list[dict[str, torch.Tensor]]]:
    """Collect what every :func:`dynamic_affinity` call inside the block sampled, in call order.

    Each entry: ``positions`` (B, N, H, W, 2) the absolute (y, x) pixel positions the op read on its
    key/value map, ``offsets`` (B, N, H, W, 2) the learned part of them, and ``map_size`` (Hk, Wk).
    Detached copies (the figures of :mod:`ddsm.viz` read them); only the innermost block records.
    """
    calls: list[dict[str, torch.Tensor]] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


def _record(pos: torch.Tensor, offsets: torch.Tensor, map_size: tuple[int, int]) -> None:
    """pos (B, N, H, W, 2) and offsets (B, 2N, H, W) -> the innermost :func:`record_positions` list."""
    B, N, H, W, _ = pos.shape
    off = offsets.detach().view(B, N, 2, H, W).permute(0, 1, 3, 4, 2)  # (B, N, H, W, 2)
    _RECORDERS[-1].append({"positions": pos.detach().clone(), "offsets": off.clone(), "map_size": map_size})
OUT_OF_MAP = ("mask", "zero")  # what a point outside the map contributes (module docstring); mask is the default
# The implementation per device type when none is given (measured on CPU; on CUDA by benchmarks/gpu_check.py).
DEFAULT_IMPLS: dict[str, str] = {"cpu": "gather", "cuda": "gather"}
IMPL_ENV = "DDSM_SAMPLING_IMPL"


@functools.lru_cache(maxsize=8)
def _parse_impl_env(text: str) -> dict[str, str]:
    """``"grid_sample"`` -> {"*": "grid_sample"}; ``"cuda=grid_sample,cpu=gather"`` -> per device type."""
    choice: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        device_type, _, impl = item.rpartition("=")
        impl = impl.strip()
        if impl not in IMPLS:
            raise ValueError(f"{IMPL_ENV}={text!r} is not allowed: {impl!r} is not one of {', '.join(IMPLS)} "
                             "(expected e.g. grid_sample or cuda=grid_sample,cpu=gather)")
        choice[device_type.strip() or "*"] = impl
    return choice


def default_impl(device: torch.device | str) -> str:
    """The :func:`dynamic_affinity` implementation for ``device`` when the caller gives none.

    ``DDSM_SAMPLING_IMPL`` (read on every call, so a process can change it) wins over
    :data:`DEFAULT_IMPLS`; device types in neither use ``gather``.
    """
    device_type = torch.device(device).type
    override = _parse_impl_env(os.environ.get(IMPL_ENV, ""))
    return override.get(device_type) or override.get("*") or DEFAULT_IMPLS.get(device_type, "gather")


def base_grid(num_points: int, *, dilation: int = 1, device=None, dtype=None) -> torch.Tensor:
    """The k x k regular offsets (dy, dx) around the centre, row-major, spaced ``dilation`` pixels; shape (N, 2).

    N must be a perfect square k*k; N=1 is the centre alone.
    """
    k = math.isqrt(num_points)
    if k * k != num_points or k < 1:
        raise ValueError(f"num_points={num_points} is not allowed: expected a perfect square k*k (1, 4, 9, ...)")
    # Even k (N=4, 16, ...) has no centre pixel: its grid is centred half a pixel off, at -(k-1)/2 .. (k-1)/2.
    r = torch.arange(k, device=device, dtype=dtype or torch.float32) - (k - 1) / 2
    if dilation != 1:
        r = r * dilation
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dy.reshape(-1), dx.reshape(-1)], dim=1)  # (N, 2)


def _grid_positions(height: int, width: int, num_points: int, *, dilation: int = 1, device, dtype) -> torch.Tensor:
    """p + r_k for every pixel p of an H x W map and every base-grid point k: (H, W, N, 2) as (y, x)."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    centre = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # (H, W, 2)
    grid = base_grid(num_points, dilation=dilation, device=device, dtype=dtype)
    return centre[:, :, None] + grid  # (H, W, N, 2)


def sample_positions(offsets: torch.Tensor, num_points: int, *, dilation: int = 1) -> torch.Tensor:
    """Absolute sampling positions p + r_k * dilation + offset_k(p) in pixels.

    offsets: (B, 2N, H, W) laid out as (dy_1, dx_1, dy_2, dx_2, ...). Returns (B, N, H, W, 2) as (y, x).
    """
    B, _, H, W = offsets.shape
    off = offsets.view(B, num_points, 2, H, W).permute(0, 1, 3, 4, 2)  # (B, N, H, W, 2)
    grid = _grid_positions(H, W, num_points, dilation=dilation, device=offsets.device, dtype=offsets.dtype)
    return grid.permute(2, 0, 1, 3)[None] + off  # (B, N, H, W, 2)


def sample_at(feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``feat`` (B, C, Hin, Win) at pixel positions ``pos`` (B, N, H, W, 2) as (y, x).

    Returns (B, N, C, H, W); positions outside read zeros. This is the grid_sample reference.
    """
    B, C, Hin, Win = feat.shape
    _, N, H, W, _ = pos.shape
    # grid_sample wants (x, y) normalised to [-1, 1]; with align_corners=False pixel i sits at (2i + 1) / n - 1,
    # which holds for every size, 1 included (align_corners=True maps a size-1 axis to pixel 0 wherever it points)
    gx = (2.0 * pos[..., 1] + 1.0) / Win - 1.0
    gy = (2.0 * pos[..., 0] + 1.0) / Hin - 1.0
    grid = torch.stack([gx, gy], dim=-1).view(B, N * H, W, 2)  # (B, N*H, W, 2)
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, N*H, W)
    return out.view(B, C, N, H, W).transpose(1, 2)  # (B, N, C, H, W)


# ----------------------------------------------------------------------------- fast path
#
# Two layouts: feature maps as channels-last rows (B*H*W, C), gathered row by row; and everything
# per point as (B, 4 corners, N points, L = H*W pixels), so elementwise maths and reductions over
# corners or points run along the long, contiguous pixel axis. The embedding_bag kernels want one
# contiguous bag of 4N samples per pixel, (B*L, 4N): _to_bags / _from_bags transpose between the two.


CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (dy, dx) of the 4 bilinear corners from (floor y, floor x)


def _to_bags(x: torch.Tensor) -> torch.Tensor:
    """(B, J, L) -> (B*L, J): one 2-D transpose per image (ATen's blocked transpose kernel)."""
    B, J, L = x.shape
    out = x.new_empty(B, L, J)
    for b in range(B):
        out[b].copy_(x[b].t())
    return out.view(B * L, J)


def _from_bags(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*L, J) -> (B, J, L), the inverse of :func:`_to_bags`."""
    P, J = x.shape
    out = x.new_empty(batch, J, P // batch)
    for b, rows in enumerate(x.view(batch, P // batch, J)):
        out[b].copy_(rows.t())
    return out


class Corners:
    """The 4 bilinear corners of N sampling positions per pixel on a B x Hk x Wk map.

    pos: (B, 2, N, L) as (y, x) in pixels of the map, for L output pixels per image. Attributes:
    ``weights`` (B, 4, N, L) over :data:`CORNERS`, 0 for a corner outside the map; ``index``
    (B, 4, N, L) and ``bag_index`` (B*L, 4N, one bag per output pixel) the row b*Hk*Wk + y*Wk + x of
    every corner (a corner outside reads some valid row, with weight 0); ``factors`` (B, 2 coords,
    2 lo/hi, N, L), the 1-D weights 1 - frac and frac, each times ``inside`` (that row / column lies
    inside the map).
    """

    def __init__(self, pos: torch.Tensor, *, height: int, width: int):
        B, _, N, L = pos.shape
        self.batch, self.height, self.width = B, height, width
        size = torch.tensor([height, width], device=pos.device, dtype=pos.dtype)[:, None, None]  # (2, 1, 1)
        lo = pos.floor()  # (B, 2, N, L): (y0, x0)
        frac = pos - lo
        inside = [torch.logical_and(lo >= 0, lo < size), torch.logical_and(lo >= -1, lo < size - 1)]  # lo, lo + 1
        self.inside = torch.stack(inside, dim=2).to(pos.dtype)  # (B, 2, 2, N, L)
        self.factors = torch.stack([1 - frac, frac], dim=2) * self.inside  # (B, 2, 2, N, L)
        fy, fx = self.factors[:, 0], self.factors[:, 1]  # (B, 2, N, L) each, over (lo, lo + 1)
        self.weights = (fy[:, :, None] * fx[:, None]).view(B, 4, N, L)  # corner (a, b) = fy[a] * fx[b]
        rows = B * height * width
        self.index_dtype = torch.int32 if rows < 2**31 else torch.int64
        lo_i = lo.to(self.index_dtype)  # NaN and huge positions give garbage here, clamped below (weight 0)
        image = torch.arange(B, device=pos.device, dtype=self.index_dtype)[:, None, None] * (height * width)
        base = lo_i[:, 0] * width + lo_i[:, 1] + image  # (B, N, L): row of (y0, x0)
        steps = torch.tensor([0, 1, width, width + 1], device=pos.device, dtype=self.index_dtype)[:, None, None]
        self.index = (base[:, None] + steps).clamp_(0, rows - 1)  # (B, 4, N, L)
        self.bag_index = _to_bags(self.index.view(B, 4 * N, L))  # (B*L, 4N)

    def position_grad(self, grad_weights: torch.Tensor) -> torch.Tensor:
        """Chain rule through the weights: dL/dweights (B, 4, N, L) -> dL/dpos (B, 2, N, L) as (y, x).

        d(fy[a] fx[b])/dy = sign(a) inside_y[a] fx[b] (sign -1 for lo, +1 for lo + 1), likewise for x.
        """
        B, _, N, L = grad_weights.shape
        g = grad_weights.view(B, 2, 2, N, L)  # (a, b)
        fy, fx = self.factors[:, 0], self.factors[:, 1]  # (B, 2, N, L)
        per_row = torch.stack([(g * fx[:, None]).sum(2), (g * fy[:, :, None]).sum(1)], dim=1)  # (B, 2, 2, N, L)
        sign = torch.tensor([-1.0, 1.0], device=g.device, dtype=g.dtype)[:, None, None]  # lo, lo + 1
        return (per_row * self.inside * sign).sum(2)  # (B, 2, N, L)


@functools.lru_cache(maxsize=16)
def _bags(num_bags: int, bag_size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-size bags: their starts (num_bags,) and the bag of every sample (num_bags * bag_size,)."""
    starts = torch.arange(0, num_bags * bag_size, bag_size, device=device, dtype=dtype)
    bag_of = torch.arange(num_bags, device=device, dtype=dtype).repeat_interleave(bag_size)  # contiguous, even for 1
    return starts, bag_of


def weighted_gather(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[p] = sum_j weights[p, j] * table[index[p, j]]: table (R, C), index/weights (P, J) -> (P, C).

    ``embedding_bag`` (mode sum, per-sample weights) does this in one pass, never forming (P, J, C).
    """
    return F.embedding_bag(index, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def gather_dot(x: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[p, j] = <x[p], table[index[p, j]]>: x (P, C), table (R, C), index (P, J) -> (P, J).

    This is exactly the per-sample-weight gradient of ``embedding_bag`` (a dot product of each bag's
    output gradient with each of its rows), so that ATen kernel is used: one pass, no (P, J, C) tensor.
    """
    P, J = index.shape
    starts, bag_of = _bags(P, J, index.device, index.dtype)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x, table, index.reshape(-1), starts, bag_of, 0, -1)  # mode 0 = sum; strided rows are fine
    return out.view(P, J)


def scatter_corners(corners: Corners, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Adjoint of the corner gather: for each (x (B*L, C), weights (B*L, 4N) in bag layout, as
    ``corners.bag_index``) return (R, C) with out[bag_index[p, j]] += weights[p, j] * x[p], R = B*Hk*Wk.

    The corner rows of the bags are sorted once (shared by all pairs; int32 keys sort several times faster
    than int64), which makes every output row a contiguous bag of (pixel, weight) samples: one
    ``embedding_bag`` per pair then sums them. A sample's pixel is its flat position // 4N (bag layout).
    No (P, N, C) tensor and no atomic scatter (CPU ``index_add_`` loops over rows one by one).
    """
    P, J = corners.bag_index.shape
    rows = corners.batch * corners.height * corners.width
    keys, order = torch.sort(corners.bag_index.reshape(-1))  # (P*J,)
    counts = torch.bincount(keys, minlength=rows)
    starts = (counts.cumsum(0) - counts).to(corners.index_dtype)  # (R,) first sorted sample of each output row
    source = torch.div(order, J, rounding_mode="floor").to(corners.index_dtype)  # pixel of each sorted sample
    return [F.embedding_bag(source, x, starts, mode="sum", per_sample_weights=w.reshape(-1)[order].to(x.dtype))
            for x, w in pairs]


def masked_softmax(logits: torch.Tensor, mass: torch.Tensor, *, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn = mass * exp(logits) / sum(mass * exp(logits))`` along ``dim``, and ``ratio = attn / mass``.

    ``mass`` in [0, 1] is each point's share of the map (see the module docstring); a point with mass 0
    gets weight 0 whatever its logit, and a slice whose points all have mass 0 gets attn 0 (not NaN, in
    the forward and the backward). The maximum is taken over points with mass > 0 only, so a large
    logit of an off-map point cannot underflow the others. ``ratio`` (``exp(l) / sum``) is what the
    backward needs.
    """
    off_map = mass <= 0
    top = logits.detach().masked_fill(off_map, float("-inf")).amax(dim, keepdim=True)  # -inf: no point on the map
    e = torch.exp((logits - top).masked_fill(off_map, float("-inf")))  # 0 off the map, never inf or NaN
    den = (mass * e).sum(dim, keepdim=True)
    ratio = e / den.clamp_min(torch.finfo(den.dtype).tiny)  # e == 0 wherever den == 0
    return mass * ratio, ratio


class SampledAffinity(torch.autograd.Function):
    """softmax_n(scale <q_p, K(pos_pn)>)-weighted sum of V(pos_pn) over the N points of each pixel p.

    q (B*L, C), key (R, C), value (R, Cv) as rows, R = B*Hk*Wk; pos (B, 2, N, L) in pixels (y, x).
    ``masked`` (``out_of_map="mask"``): a point reads its on-map corners renormalised by its mass m
    (the sum of its corner weights) and its softmax term is weighted by m; otherwise off-map corners
    read zeros (``"zero"``). Returns (B*L, Cv). Saved for the backward: the inputs, the corners and the
    per-point weights (O(B N L) each); no (B, N, C, L) tensor.
    """

    @staticmethod
    def forward(ctx, q, key, value, pos, height: int, width: int, scale: float, masked: bool):
        """See the class docstring."""
        corners = Corners(pos, height=height, width=width)
        B, _, N, L = corners.weights.shape
        w = corners.weights.to(q.dtype)  # (B, 4, N, L)
        dots = _from_bags(gather_dot(q, key, corners.bag_index), B).view(B, 4, N, L)  # <q_p, key[corner]>
        raw = (w * dots).sum(1)  # (B, N, L): <q, zero-padded key read>
        if masked:  # renormalised reads, softmax terms weighted by the on-map mass
            mass = w.sum(1)  # (B, N, L)
            logits = raw / mass.clamp_min(torch.finfo(mass.dtype).tiny) * scale  # raw == 0 where mass == 0
            attn, ratio = masked_softmax(logits, mass, dim=1)
            wv = ratio[:, None] * w  # attn_k * w_c / m_k: weight of every value row, (B, 4, N, L)
        else:  # plain softmax over the N points
            logits = raw * scale
            attn = ratio = logits.softmax(dim=1)
            wv = attn[:, None] * w
        wv_bags = _to_bags(wv.view(B, 4 * N, L))  # (B*L, 4N)
        out = weighted_gather(value, corners.bag_index, wv_bags)  # (B*L, Cv)
        ctx.save_for_backward(q, key, value, attn, ratio, logits, dots, wv_bags)
        ctx.corners, ctx.scale, ctx.pos_dtype, ctx.masked = corners, scale, pos.dtype, masked
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        """Gradients of q, key, value and pos (not of the integer sizes, the scale or the mode).

        Zero mode: the softmax backward, g_k = dL/dattn_k - sum_j attn_j dL/dattn_j, dL/dl_k = attn_k g_k.
        Masked: with u_kc = w_kc / m_k the renormalised corner weights, r_k = attn_k / m_k, l_k = s <q, u_k K>
        and A_kc = <dL/dout, V_c>: dL/dattn_k = sum_c u_kc A_kc, and through u and m (m_k = sum_c w_kc)
        dL/dw_kc = r_k (A_kc - dL/dattn_k + s g_k <q, K_c> - g_k l_k + g_k), with no division by m.
        """
        q, key, value, attn, ratio, logits, dots, wv_bags = ctx.saved_tensors
        corners, scale = ctx.corners, ctx.scale
        B, N, L = attn.shape
        w = corners.weights.to(q.dtype)
        vdots = _from_bags(gather_dot(grad_out, value, corners.bag_index), B).view(B, 4, N, L)  # <g_p, value[c]>
        d_attn = (w * vdots).sum(1)  # (B, N, L): dL/dattn (zero mode), m times it (masked)
        if ctx.masked:
            d_attn = d_attn / w.sum(1).clamp_min(torch.finfo(w.dtype).tiny)  # 0 where the mass is 0
        g = d_attn - (attn * d_attn).sum(1, keepdim=True)  # softmax backward, (B, N, L)
        wk = (scale * ratio * g)[:, None] * w  # (B, 4, N, L): weight of every key row (attn g u s = r g w s)
        need_q, need_k, need_v, need_pos = ctx.needs_input_grad[:4]
        wk_bags = _to_bags(wk.view(B, 4 * N, L)) if need_q or need_k else None  # (B*L, 4N)
        dq = weighted_gather(key, corners.bag_index, wk_bags) if need_q else None
        dpos = None
        if need_pos:
            if ctx.masked:
                d_w = ratio[:, None] * (vdots - d_attn[:, None] + (scale * g)[:, None] * dots
                                        + (g * (1 - logits))[:, None])  # dL / d weight, (B, 4, N, L)
            else:
                d_w = attn[:, None] * vdots + (scale * attn * g)[:, None] * dots  # dL / d weight, (B, 4, N, L)
            dpos = corners.position_grad(d_w.to(corners.factors.dtype)).to(ctx.pos_dtype)  # (B, 2, N, L)
        pairs = ([(q, wk_bags)] if need_k else []) + ([(grad_out, wv_bags)] if need_v else [])
        grads = iter(scatter_corners(corners, pairs) if pairs else [])
        dk = next(grads) if need_k else None
        dv = next(grads) if need_v else None
        return dq, dk, dv, dpos, None, None, None, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C); a free view when x is channels-last."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # (B*H*W, C)


def dynamic_affinity(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    *,
    num_points: int,
    scale: float | None = None,
    out_of_map: str = "mask",
    dilation: int = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """Affinity-weighted sum of N dynamically sampled values.

    query: (B, C, H, W), one query per output location.
    key, value: (B, C, Hk, Wk) and (B, Cv, Hk, Wk) maps sampled at the N positions of every location
    (same grid as the query when Hk, Wk = H, W).
    offsets: (B, 2N, H, W) learned offsets in pixels of the key/value map; half-precision offsets are
    promoted to float32 (positions of a few hundred pixels need more than bf16's 8 mantissa bits).
    scale: dot-product scale, default 1/sqrt(C) (as in scaled dot-product attention).
    out_of_map: ``mask`` (default) or ``zero``: what a point outside the key/value map contributes
    (see the module docstring for both and why mask is the default).
    dilation: spacing of the k x k base grid in pixels (1 = adjacent pixels).
    impl: ``gather`` (fast) or ``grid_sample`` (the reference); None: :func:`default_impl` of the device.
    Returns (B, Cv, H, W); the gather path returns it with channels-last strides.
    """
    impl = impl if impl is not None else default_impl(query.device)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not allowed: expected one of {', '.join(IMPLS)}")
    if out_of_map not in OUT_OF_MAP:
        raise ValueError(f"out_of_map={out_of_map!r} is not allowed: expected one of {', '.join(OUT_OF_MAP)}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation={dilation!r} is not allowed: expected an integer >= 1")
    masked = out_of_map == "mask"
    B, C, H, W = query.shape
    N = num_points
    s = scale if scale is not None else C ** -0.5
    offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))
    Hk, Wk = key.shape[-2:]
    if impl == "grid_sample":
        pos = sample_positions(offsets, N, dilation=dilation)  # (B, N, H, W, 2)
        if _RECORDERS:
            _record(pos, offsets, (Hk, Wk))
        return _affinity_grid_sample(query, key, value, pos, scale=s, masked=masked)
    dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    grid = _grid_positions(H, W, N, dilation=dilation, device=offsets.device, dtype=offsets.dtype)  # (H, W, N, 2)
    grid = grid.permute(3, 2, 0, 1).reshape(2, N, H * W)  # (2, N, L)
    pos = (offsets.contiguous().view(B, N, 2, H * W).transpose(1, 2) + grid).contiguous()  # (B, 2, N, L)
    if _RECORDERS:
        _record(pos.view(B, 2, N, H, W).permute(0, 2, 3, 4, 1), offsets, (Hk, Wk))  # as (B, N, H, W, 2)
    out = SampledAffinity.apply(_rows(query.to(dtype)), _rows(key.to(dtype)), _rows(value.to(dtype)), pos,
                                Hk, Wk, s, masked)  # (B*L, Cv)
    return out.view(B, H, W, -1).permute(0, 3, 1, 2)  # (B, Cv, H, W)


def _affinity_grid_sample(query, key, value, pos, *, scale: float, masked: bool) -> torch.Tensor:
    """Reference: sample (B, N, C, H, W) keys and values with grid_sample, softmax over N, sum.

    The on-map mass of each point (``masked``) is a ones map sampled the same way (zeros outside), by
    which the zero-padded reads are divided.
    """
    k = sample_at(key, pos.to(key.dtype))  # (B, N, C, H, W)
    v = sample_at(value, pos.to(value.dtype))  # (B, N, Cv, H, W)
    if masked:  # renormalise the reads by the on-map mass, weight the softmax terms by it
        ones = key.new_ones(key.shape[0], 1, *key.shape[-2:])  # (B, 1, Hk, Wk)
        mass = sample_at(ones, pos.to(key.dtype))  # (B, N, 1, H, W)
        k, v = (t / mass.clamp_min(torch.finfo(mass.dtype).tiny) for t in (k, v))  # 0 where the mass is 0
        logits = (k * query[:, None]).sum(dim=2) * scale  # (B, N, H, W)
        attn, _ = masked_softmax(logits, mass[:, :, 0], dim=1)
    else:
        logits = (k * query[:, None]).sum(dim=2) * scale  # (B, N, H, W)
        attn = logits.softmax(dim=1)  # softmax over the N sampled points
    return (attn[:, :, None] * v).sum(dim=1)  # (B, Cv, H, W)
