"""Synthetic street scenes: the embedded default dataset, generated from a seed, no files needed.

Each image is a street-like layout drawn in this order (later layers cover earlier ones):

* large textured regions: **sky** (0) above a blocky skyline of **building** (1) facades, then a
  slanted ground line with a **sidewalk** (5) band and **road** (2) below it;
* thin structures 1-3 px wide: vertical **poles** (3) standing on the sidewalk, and **lines** (7):
  dashed lane markings on the road converging to the horizon plus 1 px wires across the sky;
* small objects: a **sign** (6) on top of some poles, rounded **cars** (4) on the road, and, when
  num_classes > 8, small blobs of the extra classes ``object_8`` ... (one per extra class id);
* ignore pixels (255): 1-2 "clutter" blobs with random colour and strong noise, and on half the
  images an ego-vehicle strip along the bottom edge.

Appearance is learnable but not trivial: every class has a fixed base colour plus a class-dependent
texture (vertical gradient, window grid, tile lines, diagonal stripes, Gaussian noise of class-specific
strength), and every image gets a random illumination and a small random colour shift per class. The
colours and textures depend only on the class (never on the seed), so any split or seed shares them.
With num_classes < 8 the classes with larger ids are simply not drawn (the region below falls back to
road or building): thin structures need num_classes >= 4.

Layouts come from ``numpy.random.default_rng([seed, split, index])``: item ``i`` is the same whatever
order items are read in, and different seeds give different images. Train has num_images items,
val and test ``num_images // 4`` each (at least 1). Generation is vectorised numpy (about a millisecond at 128x128);
generated items are cached in memory when the split fits in ``cache_mb``.
"""
from __future__ import annotations

import colorsys

import numpy as np
import torch

from ddsm.data.base import DatasetError, SegmentationDataset
from ddsm.data.transforms import IGNORE_INDEX, EvalTransform, TrainTransform

__all__ = ["NAMED_CLASSES", "THIN_CLASSES", "SyntheticDataset", "class_names", "generate", "palette"]

SKY, BUILDING, ROAD, POLE, CAR, SIDEWALK, SIGN, LINE = range(8)
NAMED_CLASSES = ("sky", "building", "road", "pole", "car", "sidewalk", "sign", "line")
THIN_CLASSES = ("pole", "sign", "line")
MIN_CLASSES, MAX_CLASSES = 2, 255
MIN_SIZE = 16
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# Base colours (RGB) of the named classes; extra classes get evenly spread hues.
_PALETTE = np.array([
    (120, 170, 230), (140, 110, 90), (90, 90, 95), (200, 190, 70),
    (190, 40, 40), (170, 150, 150), (60, 90, 210), (235, 235, 235),
], dtype=np.float32)
# Texture amplitudes per named class over the fields (gradient, windows, tiles, diagonal) and noise std.
_TEXTURE = np.array([
    (-25, 0, 0, 0), (0, 25, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0),
    (0, 0, 0, 10), (0, 0, 20, 0), (0, 0, 0, 0), (0, 0, 0, 0),
], dtype=np.float32)
_NOISE = np.array([3, 8, 14, 4, 6, 6, 3, 3], dtype=np.float32)
_CLUTTER_NOISE = 35.0


def class_names(num_classes: int) -> list[str]:
    """Names of the first ``num_classes`` classes: the 8 named ones, then ``object_8``, ``object_9``, ..."""
    return [NAMED_CLASSES[c] if c < len(NAMED_CLASSES) else f"object_{c}" for c in range(num_classes)]


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Display colour (RGB) of every class: its base colour in the generated images (evenly spread hues
    for the extra classes), so that a figure's colours match what the images show."""
    table = _class_tables(num_classes)[0][:num_classes]  # (K, 3)
    return [tuple(int(round(c)) for c in row) for row in table]


class SyntheticDataset(SegmentationDataset):
    """``num_images`` generated scenes of one split; see the module docstring for their content."""

    def __init__(
        self,
        *,
        num_images: int,
        image_size: tuple[int, int],
        num_classes: int,
        seed: int,
        split: str,
        transform: TrainTransform | EvalTransform,
        cache_mb: float = 256.0,
    ) -> None:
        """Args:
        num_images: items in this split.
        image_size: (H, W), each at least 16.
        num_classes: 2..255.
        seed: layout seed; the split name is mixed in, so train and val never share images.
        split: "train", "val" or "test".
        transform: see :class:`~ddsm.data.SegmentationDataset`.
        cache_mb: keep generated items in memory when the whole split needs at most this much.
        """
        super().__init__(transform=transform)
        if num_images < 1:
            raise DatasetError(f"data.num_images={num_images!r} is not allowed: expected an integer >= 1")
        if len(image_size) != 2 or min(image_size) < MIN_SIZE:
            raise DatasetError(f"data.image_size={tuple(image_size)!r} is not allowed: expected (H, W) with both >= "
                               f"{MIN_SIZE}")
        if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
            raise DatasetError(f"data.num_classes={num_classes!r} is not allowed for synthetic: expected "
                               f"{MIN_CLASSES}..{MAX_CLASSES}")
        self.num_images = num_images
        self.size = (int(image_size[0]), int(image_size[1]))
        self.num_classes = num_classes
        self.seed = seed
        self.split_code = _SPLIT_CODE[split]
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        if num_images * self.size[0] * self.size[1] * 4 <= cache_mb * 2**20:
            self._cache = {}

    def __len__(self) -> int:
        """Number of images in this split."""
        return self.num_images

    def image_size(self, index: int) -> tuple[int, int]:
        """All items share data.image_size."""
        return self.size

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``: image uint8 (3, H, W), label uint8 (H, W)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image, label = generate([self.seed, self.split_code, index], size=self.size, num_classes=self.num_classes)
        item = torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label)  # (3, H, W), (H, W)
        if self._cache is not None:
            self._cache[index] = item
        return item


def generate(seed: list[int], *, size: tuple[int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene from ``seed`` (any entropy numpy accepts): image uint8 (H, W, 3), label uint8 (H, W)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # (H, W) each
    label = _layout(rng, yy, xx, num_classes)
    return _paint(rng, label, yy, xx, num_classes), label


# ----------------------------------------------------------------------------- layout


def _layout(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, k: int) -> np.ndarray:
    """Label map uint8 (H, W) with ids < k and 255 = ignore."""
    h, w = yy.shape
    label = np.where(yy < _skyline(rng, h, w)[None, :], SKY, BUILDING).astype(np.uint8)  # (H, W)
    ground = h * rng.uniform(0.55, 0.68) + rng.uniform(-0.08, 0.08) * (xx - w / 2)  # (H, W) first ground row
    curb = ground + h * rng.uniform(0.05, 0.1) + rng.uniform(-0.05, 0.05) * (xx - w / 2)
    if ROAD < k:
        label[yy >= ground] = ROAD
    if SIDEWALK < k:
        label[(yy >= ground) & (yy < curb)] = SIDEWALK
    horizon = float(ground.mean())
    if LINE < k:
        label[_lane_markings(rng, yy, xx, horizon)] = LINE
        if rng.random() < 0.7:  # a wire across the sky
            y0, y1 = rng.uniform(0.04, 0.3, size=2) * h
            label[_segment(yy, xx, (y0, -1.0), (y1, w + 1.0), width=1)] = LINE
    if POLE < k:
        for x, top in _poles(rng, h, w):
            width = int(rng.integers(1, 4))
            bottom = curb[0, min(int(x), w - 1)]
            label[(yy >= top) & (yy < bottom) & (xx >= x) & (xx < x + width)] = POLE
            if SIGN < k and rng.random() < 0.6:
                side = max(3.0, h * rng.uniform(0.04, 0.08))
                sign = (np.abs(yy - top) <= side / 2) & (np.abs(xx - x - width / 2) <= side / 2)
                label[sign] = SIGN
    if CAR < k:
        for _ in range(rng.integers(1, 4)):
            label[_car(rng, yy, xx, horizon)] = CAR
    for c in _extra_classes(rng, k):
        label[_blob(rng, yy, xx, radius=(0.03, 0.07), y_range=(0.3, 0.95))] = c
    for _ in range(rng.integers(1, 3)):
        label[_blob(rng, yy, xx, radius=(0.03, 0.07), y_range=(0.0, 1.0))] = IGNORE_INDEX
    if rng.random() < 0.5:  # ego-vehicle strip
        label[yy >= h * (1 - rng.uniform(0.03, 0.08))] = IGNORE_INDEX
    return label


def _skyline(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(W,) first building row per column: facades 8-30% of the width wide."""
    tops = np.empty(w, dtype=np.float32)
    x = 0
    while x < w:
        width = max(2, int(w * rng.uniform(0.08, 0.3)))
        tops[x:x + width] = h * rng.uniform(0.08, 0.42)
        x += width
    return tops


def _segment(yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], *, width: float,
             dash: float = 0.0) -> np.ndarray:
    """(H, W) mask of pixels within width/2 of segment p0-p1 ((y, x) points); dashed when dash > 0."""
    dy, dx = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(dy * dy + dx * dx, 1e-6)
    t = np.clip(((yy - p0[0]) * dy + (xx - p0[1]) * dx) / length2, 0.0, 1.0)  # (H, W) position along it
    dist = np.hypot(yy - p0[0] - t * dy, xx - p0[1] - t * dx)
    mask = dist <= width / 2
    if dash > 0:
        mask &= (t * np.sqrt(length2) / dash) % 2 < 1
    return mask


def _lane_markings(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, horizon: float) -> np.ndarray:
    """(H, W) mask of 1-2 dashed lines from the bottom edge towards a vanishing point."""
    h, w = yy.shape
    vanish = (horizon, w * rng.uniform(0.4, 0.6))
    mask = np.zeros_like(yy, dtype=bool)
    for _ in range(rng.integers(1, 3)):
        start = (h - 1.0, w * rng.uniform(0.15, 0.85))
        frac = rng.uniform(0.5, 0.8)  # stop before the lines meet
        end = (start[0] + frac * (vanish[0] - start[0]), start[1] + frac * (vanish[1] - start[1]))
        mask |= _segment(yy, xx, start, end, width=float(rng.integers(1, 4)), dash=max(3.0, h * 0.06))
    return mask


def _poles(rng: np.random.Generator, h: int, w: int) -> list[tuple[float, float]]:
    """(left column, top row) of 1-4 poles at least 8 px apart."""
    xs: list[float] = []
    for x in rng.uniform(0.02, 0.95, size=rng.integers(1, 5)) * w:
        if all(abs(x - other) >= 8 for other in xs):
            xs.append(float(int(x)))
    return [(x, h * rng.uniform(0.12, 0.45)) for x in xs]


def _car(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, horizon: float) -> np.ndarray:
    """(H, W) mask of a rounded box on the road, larger closer to the camera."""
    h, w = yy.shape
    cy = rng.uniform(horizon + 0.08 * h, 0.92 * h)
    near = (cy - horizon) / max(h - horizon, 1.0)  # 0 at the horizon, 1 at the bottom
    half_h = h * (0.03 + 0.06 * near) * rng.uniform(0.8, 1.2)
    half_w = half_h * rng.uniform(1.4, 2.2)
    cx = rng.uniform(0.05, 0.95) * w
    dy2, dx2 = np.square((yy - cy) / half_h), np.square((xx - cx) / half_w)  # (H, W); ** 4 is 20x slower
    return dy2 * dy2 + dx2 * dx2 <= 1.0


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, *, radius: tuple[float, float],
          y_range: tuple[float, float]) -> np.ndarray:
    """(H, W) mask of a random ellipse with radii a fraction ``radius`` of H, centred within ``y_range``."""
    h, w = yy.shape
    ry, rx = np.maximum(rng.uniform(*radius, size=2) * h, 1.5)
    cy, cx = rng.uniform(*y_range) * h, rng.uniform(0, 1) * w
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _extra_classes(rng: np.random.Generator, k: int) -> np.ndarray:
    """0-3 of the extra class ids 8..k-1 to draw in this image."""
    extras = np.arange(len(NAMED_CLASSES), k)
    if extras.size == 0:
        return extras
    return rng.choice(extras, size=min(extras.size, int(rng.integers(0, 4))), replace=False)


# ----------------------------------------------------------------------------- appearance


def _class_tables(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class base colour (k+1, 3), texture amplitudes (k+1, 4) and noise std (k+1,); row k = ignore.

    Fixed (seeded by a constant), so every seed and split shares the class appearance.
    """
    palette = np.zeros((k + 1, 3), dtype=np.float32)
    texture = np.zeros((k + 1, 4), dtype=np.float32)
    noise = np.full(k + 1, 5.0, dtype=np.float32)
    named = min(k, len(NAMED_CLASSES))
    palette[:named], texture[:named], noise[:named] = _PALETTE[:named], _TEXTURE[:named], _NOISE[:named]
    fixed = np.random.default_rng(12345)
    for c in range(named, k):
        hue = (c * 0.618033988749895) % 1.0
        palette[c] = np.array(colorsys.hsv_to_rgb(hue, 0.7, 0.85)) * 255
        texture[c, fixed.integers(0, 4)] = fixed.uniform(15, 30)
    palette[k] = 128
    noise[k] = _CLUTTER_NOISE
    return palette, texture, noise


def _paint(rng: np.random.Generator, label: np.ndarray, yy: np.ndarray, xx: np.ndarray, k: int) -> np.ndarray:
    """Image uint8 (H, W, 3): class colour + class texture + class noise, with per-image illumination."""
    h, w = label.shape
    palette, texture, noise = _class_tables(k)
    palette = palette + rng.normal(0, 10, size=palette.shape).astype(np.float32)  # per-image colour shift
    palette[k] = rng.uniform(40, 220, size=3)  # clutter gets a random colour
    fields = np.stack([
        2 * yy / h - 1,  # vertical gradient
        np.where((yy % 6 < 3) & (xx % 5 < 3), 1.0, -1.0),  # window grid
        np.where((yy % 8 < 1) | (xx % 12 < 1), -1.0, 0.0),  # tile lines
        np.sin(2 * np.pi * (xx + yy) / 7),  # diagonal stripes
    ]).astype(np.float32)  # (4, H, W)
    idx = np.where(label == IGNORE_INDEX, k, label).astype(np.intp)  # (H, W) row of the class tables
    image = palette[idx] * rng.uniform(0.8, 1.2)  # (H, W, 3)
    image += np.einsum("hwt,thw->hw", texture[idx], fields)[..., None]
    image += noise[idx][..., None] * rng.standard_normal((h, w, 3), dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)
