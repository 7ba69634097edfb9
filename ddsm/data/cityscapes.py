"""Cityscapes (gtFine) in the official layout, labelIds mapped to the 19 train ids.

Layout under ``root`` (as downloaded from cityscapes-dataset.com)::

    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

The root is data.root, or else the environment variable ``DDSM_CITYSCAPES_ROOT``. Label ids 0..33 are
valid; the 19 evaluated classes get train ids 0..18 and every other id becomes 255 (ignore), exactly
as ``cityscapesscripts.helpers.labels`` does (the test suite checks this table against it).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ddsm.data.base import DatasetError, PairedImageDataset, check_pairs
from ddsm.data.transforms import IGNORE_INDEX, EvalTransform, TrainTransform

__all__ = ["CLASS_NAMES", "ID_TO_TRAIN_ID", "LAYOUT", "PALETTE", "THIN_CLASSES", "SPLITS", "TEST_REFUSED", "CityscapesDataset", "check_split",
           "label_table", "resolve_root"]

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# cityscapesscripts.helpers.labels colours (RGB) of the 19 train ids, in CLASS_NAMES order.
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
# Thin, boundary-dominated classes (the ones a DDSM paper argues about).
THIN_CLASSES = ("pole", "traffic light", "traffic sign", "person", "rider", "bicycle")
# labelId -> trainId for the 19 evaluated classes; all other ids 0..33 are ignored.
ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
SPLITS = ("train", "val")  # the test split's labels are withheld by the benchmark server
TEST_REFUSED = ("cityscapes has no test labels (gtFine/test holds placeholders; test scores come only from the "
                "benchmark server): report on data.val_split=val, tune on minival")
NUM_LABEL_IDS = 34  # labelIds 0..33 (license plate, id -1, never appears in labelIds PNGs)
LAYOUT = ("leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine/{split}/{city}/*_gtFine_labelIds.png")
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def label_table() -> np.ndarray:
    """int16 (256,) labelId -> train id; 255 for ignored ids, -1 for values that are not label ids."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[:NUM_LABEL_IDS] = IGNORE_INDEX
    for label_id, train_id in ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


def resolve_root(root: str | None) -> Path:
    """data.root, else $DDSM_CITYSCAPES_ROOT; raise DatasetError when neither is set."""
    root = root or os.environ.get("DDSM_CITYSCAPES_ROOT")
    if not root:
        raise DatasetError(f"data.root is not set for cityscapes (nor DDSM_CITYSCAPES_ROOT): expected a folder "
                           f"with {LAYOUT}")
    return Path(root).expanduser()


class CityscapesDataset(PairedImageDataset):
    """The fine-annotation ``train`` (2975 images) or ``val`` (500) split (``test`` is refused: no labels)."""

    def __init__(self, *, root: str | Path, split: str, transform: TrainTransform | EvalTransform) -> None:
        """Args:
        root: the folder holding leftImg8bit/ and gtFine/.
        split: "train" or "val".
        transform: see :class:`~ddsm.data.SegmentationDataset`.
        """
        super().__init__(pairs=_list_pairs(Path(root), split), lut=label_table(),
                         allowed=f"0..{NUM_LABEL_IDS - 1}", transform=transform)


def _list_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of a split, sorted; raise DatasetError for a missing folder or label."""
    pairs = []
    for image, label in _candidates(root, split):
        if not label.is_file():
            raise DatasetError(f"cityscapes image {str(image)!r} has no label file {str(label)!r}: expected {LAYOUT}")
        pairs.append((image, label))
    return pairs


def _candidates(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Every image of a split with the label path it should have (which may not exist)."""
    if split == "test":
        raise DatasetError(f"data.val_split='test' is not allowed: {TEST_REFUSED}")
    if split not in SPLITS:
        raise DatasetError(f"cityscapes split {split!r} is not allowed: expected one of {', '.join(SPLITS)}")
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DatasetError(f"cityscapes root {str(root)!r} has no folder {str(image_dir)!r}: expected {LAYOUT}")
    images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
    if not images:
        raise DatasetError(f"cityscapes folder {str(image_dir)!r} has no images: expected {LAYOUT}")
    return [(image, root / "gtFine" / split / image.parent.name / (image.name[: -len(_IMAGE_SUFFIX)] + _LABEL_SUFFIX))
            for image in images]


def check_split(root: str | Path, split: str) -> list[str]:
    """Problems with the files of a split (one line each, naming the file), from headers only."""
    try:
        pairs = _candidates(Path(root), split)
    except DatasetError as e:
        return [str(e)]
    return check_pairs([(image, label, "") for image, label in pairs])
