"""Datasets and loaders: ``synthetic`` (embedded default), ``camvid`` (SegNet layout), ``cityscapes`` (gtFine).

Every dataset yields ``(image float32 (3, H, W) ImageNet-normalised, label int64 (H, W))`` with
255 = ignore. Training items are augmented (:class:`~ddsm.data.transforms.TrainTransform`), validation
items are whole images, only normalised. Bad input raises :class:`DatasetError` (a ConfigError) naming
the file or path, the offending values and what is allowed.

Public API: :func:`build_dataset`, :func:`dataset_info`, :func:`build_loader`, :class:`DatasetInfo`,
:class:`DatasetError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from ddsm.config import ConfigError, DataConfig
from ddsm.data.transforms import IGNORE_INDEX, EvalTransform, TrainTransform

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetError",
    "DatasetInfo",
    "PairedImageDataset",
    "SegmentationDataset",
    "build_dataset",
    "build_loader",
    "dataset_info",
]

DATASETS = ("synthetic", "camvid", "cityscapes")
SPLITS = ("train", "val")


class DatasetError(ConfigError):
    """A dataset path, file or label value is wrong; the message names it and what is expected."""


@dataclass
class DatasetInfo:
    """What a model and the metrics need to know about a dataset."""

    num_classes: int
    class_names: list[str] = field(default_factory=list)
    ignore_index: int = IGNORE_INDEX


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


# The dataset modules use DatasetError and the base classes above, so they are imported after them.
from ddsm.data import camvid, cityscapes, synthetic  # noqa: E402

# ----------------------------------------------------------------------------- public builders


def dataset_info(name: str, cfg: DataConfig | None = None) -> DatasetInfo:
    """Number of classes, class names and ignore index of dataset ``name`` (synthetic reads ``cfg``)."""
    if name == "synthetic":
        cfg = cfg or DataConfig()
        return DatasetInfo(num_classes=cfg.num_classes, class_names=synthetic.class_names(cfg.num_classes))
    if name == "camvid":
        return DatasetInfo(num_classes=len(camvid.CLASS_NAMES), class_names=list(camvid.CLASS_NAMES))
    if name == "cityscapes":
        return DatasetInfo(num_classes=len(cityscapes.CLASS_NAMES), class_names=list(cityscapes.CLASS_NAMES))
    raise DatasetError(f"data.name={name!r} is not allowed: expected one of {', '.join(DATASETS)}")


def build_dataset(cfg: DataConfig, *, split: str, train: bool) -> SegmentationDataset:
    """The ``split`` ("train" | "val") of ``cfg.name``; ``train`` turns on augmentation.

    Reads data.name, root, crop_size, scale_range, flip, jitter and, for synthetic, num_images,
    image_size, num_classes, seed.
    """
    if split not in SPLITS:
        raise DatasetError(f"split={split!r} is not allowed: expected one of {', '.join(SPLITS)}")
    if cfg.name not in DATASETS:
        raise DatasetError(f"data.name={cfg.name!r} is not allowed: expected one of {', '.join(DATASETS)}")
    transform = _train_transform(cfg) if train else EvalTransform()
    if cfg.name == "synthetic":
        return synthetic.SyntheticDataset(
            num_images=cfg.num_images if split == "train" else max(1, cfg.num_images // 4),
            image_size=cfg.image_size, num_classes=cfg.num_classes, seed=cfg.seed, split=split, transform=transform)
    if cfg.name == "camvid":
        return camvid.CamVidDataset(root=camvid.resolve_root(cfg.root), split=split, transform=transform)
    return cityscapes.CityscapesDataset(root=cityscapes.resolve_root(cfg.root), split=split, transform=transform)


def _train_transform(cfg: DataConfig) -> TrainTransform:
    """The training transform of ``cfg``, after checking the fields TrialConfig.validate leaves open."""
    low, high = cfg.scale_range
    if not 0 < low <= high:
        raise DatasetError(f"data.scale_range={tuple(cfg.scale_range)!r} is not allowed: expected 0 < low <= high")
    if not all(int(s) >= 1 for s in cfg.crop_size):
        raise DatasetError(f"data.crop_size={tuple(cfg.crop_size)!r} is not allowed: expected two positive ints (H, W)")
    if not cfg.jitter >= 0:
        raise DatasetError(f"data.jitter={cfg.jitter!r} is not allowed: expected a float >= 0 (0 disables it)")
    return TrainTransform(crop_size=cfg.crop_size, scale_range=cfg.scale_range, flip=cfg.flip, jitter=cfg.jitter)


def build_loader(
    cfg: DataConfig,
    *,
    split: str,
    train: bool,
    seed: int = 0,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    distributed_rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A seeded DataLoader over :func:`build_dataset`; re-iterating it starts a new epoch.

    Batches and augmentations depend only on ``seed``, the rank and the epoch count (not on
    data.workers): a seeded sampler hands each item its own augmentation seed. Training shards with
    ``DistributedSampler`` when ``world_size > 1`` (reshuffled every epoch); validation shards exactly
    (rank::world_size, no padded duplicates, so metrics count each image once; ``shuffle`` is then
    ignored). Validation batches
    are data.batch_size when all images share a size, else 1.

    Args:
        cfg: the data section.
        split: "train" or "val".
        train: augment (and, by default, shuffle and drop the last partial batch).
        seed: seeds shuffling and augmentation.
        shuffle: default ``train``.
        drop_last: default ``train``.
        distributed_rank: this process's rank in [0, world_size).
        world_size: number of processes sharing the data.
    """
    if not 0 <= distributed_rank < world_size:
        raise DatasetError(f"distributed_rank={distributed_rank} is not allowed with world_size={world_size}: "
                           "expected 0 <= rank < world_size")
    dataset = build_dataset(cfg, split=split, train=train)
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    if world_size > 1 and train:
        base: Sampler = DistributedSampler(dataset, num_replicas=world_size, rank=distributed_rank, shuffle=shuffle,
                                           seed=seed, drop_last=drop_last)
    elif world_size > 1:
        base = _ShardSampler(len(dataset), rank=distributed_rank, world_size=world_size)
    elif shuffle:
        base = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        base = SequentialSampler(dataset)
    sampler = _SeededSampler(base, seed=seed, rank=distributed_rank) if train else base
    batch_size = cfg.batch_size if train or _uniform_size(dataset) else 1
    if drop_last and len(sampler) < batch_size:
        raise DatasetError(f"data.batch_size={batch_size} is larger than the {len(sampler)} {split} images of rank "
                           f"{distributed_rank}: expected at most {len(sampler)} (or more images)")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                      generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available())


def _uniform_size(dataset: SegmentationDataset) -> bool:
    """True when every item has the size of the first (read from file headers, not decoded)."""
    first = dataset.image_size(0)
    return all(dataset.image_size(i) == first for i in range(1, len(dataset)))


class _SeededSampler(Sampler):
    """Wraps a sampler to yield ``(index, augmentation seed)``; seeds come from a generator seeded by (seed, rank).

    Written by hand: torch seeds augmentation only per worker, so results would depend on data.workers.
    """

    def __init__(self, base: Sampler, *, seed: int, rank: int) -> None:
        """Args:
        base: the index sampler (its ``set_epoch`` is called on every new iteration when it has one).
        seed: loader seed.
        rank: process rank, so ranks draw different augmentations.
        """
        self.base = base
        self.epoch = 0
        state = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
        self.generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __len__(self) -> int:
        """Items per epoch."""
        return len(self.base)

    def __iter__(self):
        """One epoch of (index, seed) pairs."""
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(self.epoch)
        self.epoch += 1
        for index in self.base:
            yield int(index), int(torch.randint(0, 2**62, (), generator=self.generator))


class _ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...`` in order, without padding (DistributedSampler pads)."""

    def __init__(self, n: int, *, rank: int, world_size: int) -> None:
        """Args:
        n: dataset length.
        rank: this shard.
        world_size: number of shards.
        """
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        """Items in this shard."""
        return len(self.indices)

    def __iter__(self):
        """The shard's indices in order."""
        return iter(self.indices)
