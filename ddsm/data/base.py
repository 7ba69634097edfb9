"""Shared dataset pieces: the error type, the dataset info record, base classes, checked PNG reading, and the
header check of image/label files that runs before a grid launches (:func:`check_pairs`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ddsm.config import ConfigError
from ddsm.data.transforms import IGNORE_INDEX, EvalTransform, TrainTransform


class DatasetError(ConfigError):
    """A dataset path, file or label value is wrong; the message names it and what is expected."""


@dataclass
class DatasetInfo:
    """What a model and the metrics need to know about a dataset."""

    num_classes: int
    class_names: list[str] = field(default_factory=list)
    ignore_index: int = IGNORE_INDEX
    palette: list[tuple[int, int, int]] = field(default_factory=list)  # display colour (RGB) per class
    thin_classes: tuple[str, ...] = ()  # thin, boundary-dominated classes (per-class boundary F figure)


# ----------------------------------------------------------------------------- dataset base classes


class SegmentationDataset(Dataset):
    """Base: ``load(index)`` gives a raw uint8 pair, ``__getitem__`` applies the transform.

    An item key is an index, or ``(index, seed)`` as produced by :func:`build_loader`: the seed drives
    this item's augmentation through its own ``torch.Generator`` (plain indices use the global RNG).
    """

    def __init__(self, *, transform: TrainTransform | EvalTransform) -> None:
        """Args:
        transform: called as ``transform(image, label, generator)``.
        """
        self.transform = transform

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw pair: image uint8 (3, H, W), label uint8 (H, W) in train ids with 255 = ignore."""
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of item ``index`` without decoding it where possible."""
        return tuple(self.load(index)[1].shape)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float32 (3, H, W), label int64 (H, W)) for an index or an (index, seed) pair."""
        index, seed = (key if isinstance(key, tuple) else (key, None))
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image, label = self.load(index)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return self.transform(image, label, generator)


class PairedImageDataset(SegmentationDataset):
    """Image/label PNG pairs on disk; raw label values are mapped to train ids through a lookup table."""

    def __init__(
        self,
        *,
        pairs: list[tuple[Path, Path]],
        lut: np.ndarray,
        allowed: str,
        transform: TrainTransform | EvalTransform,
    ) -> None:
        """Args:
        pairs: (image path, label path) per item; existence is checked by the subclass.
        lut: int16 (256,) raw label value -> train id (255 = ignore, -1 = not a valid label value).
        allowed: how the valid raw values read in an error message, e.g. "0..11".
        transform: see :class:`SegmentationDataset`.
        """
        super().__init__(transform=transform)
        self.pairs = pairs
        self.lut = lut
        self.allowed = allowed

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.pairs)

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) read from the PNG header only."""
        path = self.pairs[index][0]
        try:
            with Image.open(path) as im:
                return im.height, im.width
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image file {str(path)!r}: {e}") from None

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode, check and map one pair: uint8 (3, H, W) and uint8 (H, W) train ids."""
        image_path, label_path = self.pairs[index]
        image = _read_png(image_path, kind="image", mode="RGB")  # (H, W, 3)
        raw = _read_png(label_path, kind="label", mode=None)  # (H, W)
        if raw.ndim != 2:
            raise DatasetError(f"label file {str(label_path)!r} has {raw.shape[-1]} channels: expected a "
                               f"single-channel PNG of label ids ({self.allowed})")
        if raw.shape != image.shape[:2]:
            raise DatasetError(f"label file {str(label_path)!r} is {raw.shape[1]}x{raw.shape[0]} but its image "
                               f"{str(image_path)!r} is {image.shape[1]}x{image.shape[0]}: expected equal sizes")
        label = _map_labels(raw, self.lut, path=label_path, allowed=self.allowed)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label)  # (3, H, W), (H, W)


def _read_png(path: Path, *, kind: str, mode: str | None) -> np.ndarray:
    """Decode an image file (converted to ``mode`` when given) or raise DatasetError naming it."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert(mode) if mode else im)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
        raise DatasetError(f"cannot read {kind} file {str(path)!r}: {e}") from None


def _map_labels(raw: np.ndarray, lut: np.ndarray, *, path: Path, allowed: str) -> np.ndarray:
    """raw label values -> uint8 train ids; values the table marks -1 raise DatasetError naming them."""
    raw = raw.astype(np.int64, copy=False)
    in_table = (raw >= 0) & (raw < len(lut))
    mapped = lut[np.where(in_table, raw, 0)]
    bad = ~in_table | (mapped < 0)
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise DatasetError(f"label file {str(path)!r} has values {shown} outside the dataset's label ids "
                           f"({allowed}) in {int(bad.sum())} pixels")
    return mapped.astype(np.uint8)


class Subset(SegmentationDataset):
    """Items ``indices`` of another dataset, in that order, with its transform (minival, train minus minival)."""

    def __init__(self, base: SegmentationDataset, indices: list[int]) -> None:
        """Args:
        base: the full split.
        indices: positions in ``base``.
        """
        super().__init__(transform=base.transform)
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        """Number of kept items."""
        return len(self.indices)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw pair of item ``indices[index]`` of the base split."""
        return self.base.load(self.indices[index])

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of item ``indices[index]`` of the base split."""
        return self.base.image_size(self.indices[index])


# ----------------------------------------------------------------------------- checking files before a launch

# Label modes PIL decodes to one channel of integer ids; images may be anything PIL converts to RGB.
LABEL_MODES = ("1", "L", "P", "I", "I;16")
# How a complete file ends: a PNG with its IEND chunk (length, type, CRC), a JPEG with its EOI marker.
_TRAILERS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}
MAX_PROBLEMS = 5  # per split: the first ones, then a count


def check_pairs(pairs: list[tuple[Path, Path, str]]) -> list[str]:
    """Problems with image/label pairs, found from file headers (nothing is decoded); one line each.

    Each pair is ``(image, label, where)``, ``where`` naming it for a human (``"train.txt line 12"``).
    Checked: both files exist and open, a complete file ends with its format's end marker (so a file
    cut short is found without decoding it), the label is single-channel, and image and label have the
    same size. The first :data:`MAX_PROBLEMS` problems are listed, then how many more there are.
    """
    problems: list[str] = []
    extra = 0
    for image, label, where in pairs:
        found = _pair_problem(image, label, where)
        if found is None:
            continue
        if len(problems) < MAX_PROBLEMS:
            problems.append(found)
        else:
            extra += 1
    if extra:
        problems.append(f"... and {extra} more broken image/label pairs in the same split")
    return problems


def _pair_problem(image: Path, label: Path, where: str) -> str | None:
    at = f" ({where})" if where else ""
    sizes = {}
    for kind, path in (("image", image), ("label", label)):
        if not path.is_file():
            return f"{kind} file {str(path)!r}{at} does not exist"
        try:
            with Image.open(path) as im:
                sizes[kind], mode = im.size, im.mode
        except (OSError, ValueError, SyntaxError) as e:
            return f"cannot read {kind} file {str(path)!r}{at}: {str(e).splitlines()[0]}"
        if not _complete(path):
            return f"{kind} file {str(path)!r}{at} is truncated: it does not end with its format's end marker"
        if kind == "label" and mode not in LABEL_MODES:
            return (f"label file {str(path)!r}{at} has mode {mode}: expected a single-channel image of label ids "
                    f"(one of modes {', '.join(LABEL_MODES)})")
    if sizes["image"] != sizes["label"]:
        (iw, ih), (lw, lh) = sizes["image"], sizes["label"]
        return (f"label file {str(label)!r}{at} is {lw}x{lh} but its image {str(image)!r} is {iw}x{ih}: "
                "expected equal sizes")
    return None


def _complete(path: Path) -> bool:
    """Whether the file ends with the end marker of its format (formats without one: True)."""
    trailer = _TRAILERS.get(path.suffix.lower())
    if trailer is None:
        return True
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 64))
        return f.read().rstrip(b"\x00").endswith(trailer)
