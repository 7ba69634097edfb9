"""Paired image/label transforms: random scale, crop, flip and jitter for training; normalise always.

Every op works on an image ``(3, H, W)`` (uint8, or float in [0, 1]) and a label ``uint8 (H, W)``
(255 = ignore) and is a thin wrapper over ``torchvision.transforms.v2.functional``. Resizing and
cropping run on uint8 (less memory), jitter on float (faster); :func:`normalize` turns the pair into the
model's input ``float32 (3, H, W)`` and ``int64 (H, W)``.

Randomness comes from an explicit ``torch.Generator`` (one per sample, seeded by the loader), so a
training sample depends only on the loader seed and its position in the stream, not on the number of
workers or on the global RNG.
"""
from __future__ import annotations

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "TrainTransform",
    "crop",
    "hflip",
    "jitter",
    "normalize",
    "pad_to",
    "rescale",
]

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pair = tuple[torch.Tensor, torch.Tensor]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high] (inclusive)."""
    return int(torch.randint(0, high + 1, (), generator=generator).item())


def rescale(image: torch.Tensor, label: torch.Tensor, *, scale: float) -> Pair:
    """Resize both by ``scale``: bilinear (antialiased) for the image, nearest for the label."""
    h, w = label.shape
    size = [max(1, round(h * scale)), max(1, round(w * scale))]
    image = F.resize_image(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    label = F.resize_mask(label, size, interpolation=InterpolationMode.NEAREST_EXACT)
    return image, label


def crop(image: torch.Tensor, label: torch.Tensor, *, top: int, left: int, size: tuple[int, int]) -> Pair:
    """Cut the window ``(top, left, size)``, clipped to the image (so it may come out smaller)."""
    h, w = label.shape
    vh, vw = min(size[0], h - top), min(size[1], w - left)
    return F.crop_image(image, top, left, vh, vw), F.crop_mask(label, top, left, vh, vw)  # (3, vh, vw), (vh, vw)


def pad_to(image: torch.Tensor, label: torch.Tensor, *, size: tuple[int, int]) -> Pair:
    """Pad bottom/right up to at least ``size``: 0 in the image, :data:`IGNORE_INDEX` in the label."""
    h, w = label.shape
    padding = [0, 0, max(size[1] - w, 0), max(size[0] - h, 0)]  # left, top, right, bottom
    if padding == [0, 0, 0, 0]:
        return image, label
    return F.pad_image(image, padding, fill=0), F.pad_mask(label, padding, fill=IGNORE_INDEX)


def hflip(image: torch.Tensor, label: torch.Tensor) -> Pair:
    """Mirror image and label left-right together."""
    return F.horizontal_flip_image(image), F.horizontal_flip_mask(label)


def jitter(image: torch.Tensor, *, strength: float, hue: float = 0.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Photometric jitter: brightness, contrast, saturation factors each uniform in [1 - s, 1 + s], then
    (``hue`` > 0) a hue shift uniform in [-hue, hue] (a fraction of the colour wheel, at most 0.5, as
    torchvision's ``ColorJitter``; SFSegNets jitters all four by 0.25).

    Applied in that fixed order (ColorJitter shuffles the order; a fixed one is simpler to reproduce).
    The hue draw happens only when hue > 0, so configs without hue keep their random stream.
    """
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    image = F.adjust_brightness_image(image, _uniform(low, high, generator))
    image = F.adjust_contrast_image(image, _uniform(low, high, generator))
    image = F.adjust_saturation_image(image, _uniform(low, high, generator))
    if hue > 0:
        image = F.adjust_hue_image(image, _uniform(-hue, hue, generator))
    return image


def normalize(image: torch.Tensor, label: torch.Tensor) -> Pair:
    """(uint8 or [0, 1] float image, uint8 label) -> (float32 (3, H, W) ImageNet-normalised, int64 (H, W))."""
    image = F.to_dtype_image(image, torch.float32, scale=True)  # [0, 1]; no-op for float input
    image = F.normalize_image(image, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return image, label.long()


class EvalTransform:
    """Validation: whole image, normalise only."""

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None) -> Pair:
        """Normalise the pair; ``generator`` is accepted for a uniform signature and unused."""
        return normalize(image, label)


class TrainTransform:
    """Training: random scale -> random crop -> jitter -> pad (ignore) -> flip -> normalise."""

    def __init__(
        self,
        *,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        jitter: float = 0.25,
        hue: float = 0.0,
    ) -> None:
        """Args:
        crop_size: output (H, W).
        scale_range: scale factor drawn uniformly from (low, high); (1, 1) disables scaling.
        flip: mirror left-right with probability 0.5.
        jitter: brightness / contrast / saturation jitter strength; 0 disables it.
        hue: hue jitter in [0, 0.5] (fraction of the colour wheel); 0 disables it.
        """
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue={hue!r} is not allowed: expected a float in [0, 0.5]")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self.jitter = jitter
        self.hue = hue

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None) -> Pair:
        """Augment one pair; all random draws come from ``generator`` (global RNG when None)."""
        scale = _uniform(*self.scale_range, generator)
        if scale != 1.0:
            image, label = rescale(image, label, scale=scale)
        h, w = label.shape
        top = _randint(max(h - self.crop_size[0], 0), generator)
        left = _randint(max(w - self.crop_size[1], 0), generator)
        image, label = crop(image, label, top=top, left=left, size=self.crop_size)  # (3, <=ch, <=cw)
        image = F.to_dtype_image(image, torch.float32, scale=True)  # [0, 1]; jitter is ~4x faster in float
        if self.jitter > 0 or self.hue > 0:  # before padding, so padded pixels stay exactly 0
            image = jitter(image, strength=self.jitter, hue=self.hue, generator=generator)
        image, label = pad_to(image, label, size=self.crop_size)  # (3, ch, cw), (ch, cw)
        if self.flip and torch.rand((), generator=generator).item() < 0.5:
            image, label = hflip(image, label)
        return normalize(image, label)
