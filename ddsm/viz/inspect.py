"""Where DDSM samples: the positions every DDSM branch of a model really read in one forward pass.

:func:`sampling_calls` runs the model once inside :func:`ddsm.models.sampling.record_positions` (the
op records the positions it computed and used) with a forward pre-hook on every
:class:`~ddsm.models.ddsm.SpatialBranch` / :class:`~ddsm.models.ddsm.ChannelBranch` naming the call;
nothing here recomputes the op's arithmetic. :func:`to_image_coords` maps a spatial branch's feature
pixels to input pixels; :func:`probe_pixels` picks the pixels a figure shows (a thin-class pixel, a
boundary pixel, a flat-region pixel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage as ndi

from ddsm.models.ddsm import ChannelBranch, SpatialBranch
from ddsm.models.sampling import record_positions

__all__ = ["SamplingCall", "offset_magnitudes", "probe_pixels", "sampling_calls", "to_image_coords"]


@dataclass
class SamplingCall:
    """One DDSM branch's sampling in one forward pass.

    ``name``: the module path (e.g. ``head.fusions.1.spatial``); ``branch``: spatial | channel;
    ``positions``/``offsets``: (B, N, H, W, 2) as (y, x) on the branch's map (spatial: the x_l feature map;
    channel: the side x side grid of channels); ``map_size``: (H, W) of that map.
    """

    name: str
    branch: str
    positions: torch.Tensor
    offsets: torch.Tensor
    map_size: tuple[int, int]

    @property
    def base(self) -> torch.Tensor:
        """The base-grid positions (B, N, H, W, 2): what was sampled minus the learned offsets."""
        return self.positions - self.offsets


@torch.no_grad()
def sampling_calls(model: nn.Module, image: torch.Tensor) -> list[SamplingCall]:
    """Run ``model`` on ``image`` (B, 3, H, W) and return every DDSM branch's sampling, in call order
    (empty for a model without DDSM)."""
    names: list[tuple[str, str]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (SpatialBranch, ChannelBranch)):
            kind = "spatial" if isinstance(module, SpatialBranch) else "channel"
            hooks.append(module.register_forward_pre_hook(lambda _m, _a, n=name, k=kind: names.append((n, k))))
    try:
        with record_positions() as calls:
            model(image)
    finally:
        for h in hooks:
            h.remove()
    if len(calls) != len(names):
        raise RuntimeError(f"{len(names)} DDSM branches ran but the sampling op recorded {len(calls)} calls")
    return [SamplingCall(name=n, branch=k, positions=c["positions"], offsets=c["offsets"],
                         map_size=tuple(c["map_size"])) for (n, k), c in zip(names, calls)]


def to_image_coords(yx: np.ndarray, *, map_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(..., 2) (y, x) feature-map pixels -> input-image pixels, with the half-pixel centres of
    bilinear upsampling (``align_corners=False``, as the network's upsampling): (p + 0.5) * s - 0.5."""
    scale = np.array([image_size[0] / map_size[0], image_size[1] / map_size[1]])
    return (np.asarray(yx, dtype=np.float64) + 0.5) * scale - 0.5


def offset_magnitudes(call: SamplingCall) -> np.ndarray:
    """|offset| of every sampled point, in pixels of the branch's map: (B * N * H * W,)."""
    return call.offsets.float().norm(dim=-1).flatten().cpu().numpy()


def probe_pixels(label: np.ndarray, *, thin_ids: list[int], ignore_index: int = 255) -> dict[str, tuple[int, int]]:
    """The (y, x) pixels a sampling figure shows, chosen from the ground truth ``label`` (H, W):

    ``thin``: the thin-class pixel farthest from its class boundary (the middle of a pole), ``boundary``:
    a pixel on a class boundary half-way down the image, ``flat``: the pixel farthest from every boundary.
    A kind absent from the image (no thin class, no boundary) is left out.
    """
    label = np.asarray(label)
    valid = label != ignore_index
    edge = np.zeros_like(valid)
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge &= valid
    out: dict[str, tuple[int, int]] = {}
    thin = np.isin(label, thin_ids) & valid
    if thin.any():
        inside = ndi.distance_transform_edt(thin)  # (H, W): distance to the nearest non-thin pixel
        out["thin"] = tuple(int(v) for v in np.unravel_index(np.argmax(inside), label.shape))
    if edge.any():
        ys, xs = np.nonzero(edge & ~thin)
        if len(ys) == 0:
            ys, xs = np.nonzero(edge)
        i = int(np.argmin(np.abs(ys - label.shape[0] / 2) + np.abs(xs - label.shape[1] / 2) * 0.01))
        out["boundary"] = (int(ys[i]), int(xs[i]))
        far = ndi.distance_transform_edt(~edge) * valid  # (H, W): distance to the nearest boundary
        out["flat"] = tuple(int(v) for v in np.unravel_index(np.argmax(far), label.shape))
    return out
