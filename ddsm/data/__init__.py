"""Datasets and loaders: ``synthetic`` (embedded default), ``camvid`` (SegNet layout), ``cityscapes`` (gtFine).

Splits. ``train`` is what a trial trains on; ``data.val_split`` names what it validates on (every
validation and the final scores): ``val`` (the dataset's validation split, the default), ``test``
(CamVid's ``test.txt`` and synthetic's third split; Cityscapes' test labels are withheld, so it is
refused) or ``minival``, a fixed subset of the train split that is then held out of training:
``data.minival_size`` images (0 = a tenth of train, at least 1), drawn once from
``data.minival_seed`` (never the training seed, so every trial and seed of a study shares it).
Tuning on minival and reporting on val keeps the reported split out of every choice.

Every dataset yields ``(image float32 (3, H, W) ImageNet-normalised, label int64 (H, W))`` with
255 = ignore. Training items are augmented (:class:`~ddsm.data.transforms.TrainTransform`), validation
items are whole images, only normalised. Bad input raises :class:`DatasetError` (a ConfigError) naming
the file or path, the offending values and what is allowed.

Public API: :func:`build_dataset`, :func:`dataset_info`, :func:`build_loader`, :class:`DatasetInfo`,
:class:`DatasetError`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from ddsm.config import DataConfig
from ddsm.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "DATASETS",
    "SPLITS",
    "check_data",
    "minival_indices",
    "DatasetError",
    "DatasetInfo",
    "PairedImageDataset",
    "SegmentationDataset",
    "build_dataset",
    "build_loader",
    "dataset_info",
]

DATASETS = ("synthetic", "camvid", "cityscapes")
SPLITS = ("train", "val", "test", "minival")
_MINIVAL_STREAM = 0x6D696E76  # mixed into the minival seed so the draw never repeats another stream

from ddsm.data import camvid, cityscapes, synthetic
from ddsm.data.base import DatasetError, DatasetInfo, PairedImageDataset, SegmentationDataset, Subset


# ----------------------------------------------------------------------------- public builders


def dataset_info(name: str, cfg: DataConfig | None = None) -> DatasetInfo:
    """Number of classes, class names, ignore index, display palette and thin classes of dataset ``name``
    (synthetic reads ``cfg``)."""
    if name == "synthetic":
        cfg = cfg or DataConfig()
        return DatasetInfo(num_classes=cfg.num_classes, class_names=synthetic.class_names(cfg.num_classes),
                           palette=synthetic.palette(cfg.num_classes), thin_classes=synthetic.THIN_CLASSES)
    if name in ("camvid", "cityscapes"):
        module = camvid if name == "camvid" else cityscapes
        return DatasetInfo(num_classes=len(module.CLASS_NAMES), class_names=list(module.CLASS_NAMES),
                           palette=list(module.PALETTE), thin_classes=module.THIN_CLASSES)
    raise DatasetError(f"data.name={name!r} is not allowed: expected one of {', '.join(DATASETS)}")


def build_dataset(cfg: DataConfig, *, split: str, train: bool) -> SegmentationDataset:
    """The ``split`` ("train" | "val" | "test" | "minival") of ``cfg.name``; ``train`` turns on augmentation.

    ``train`` is the train split without the minival images when ``cfg.val_split`` is ``minival`` (see
    the module docstring). Reads data.name, root, crop_size, scale_range, flip, jitter, hue, val_split,
    minival_size, minival_seed and, for synthetic, num_images, image_size, num_classes, seed.
    """
    if split not in SPLITS:
        raise DatasetError(f"split={split!r} is not allowed: expected one of {', '.join(SPLITS)}")
    if cfg.name not in DATASETS:
        raise DatasetError(f"data.name={cfg.name!r} is not allowed: expected one of {', '.join(DATASETS)}")
    transform = _train_transform(cfg) if train else EvalTransform()
    if split not in ("train", "minival"):
        return _split(cfg, split, transform)
    full = _split(cfg, "train", transform)
    if split == "train" and cfg.val_split != "minival":
        return full
    held = set(minival_indices(len(full), cfg))
    keep = sorted(held) if split == "minival" else [i for i in range(len(full)) if i not in held]
    return Subset(full, keep)


def _split(cfg: DataConfig, split: str, transform: TrainTransform | EvalTransform) -> SegmentationDataset:
    """One of the dataset's own splits (train, val, test)."""
    if cfg.name == "synthetic":
        return synthetic.SyntheticDataset(
            num_images=cfg.num_images if split == "train" else max(1, cfg.num_images // 4),
            image_size=cfg.image_size, num_classes=cfg.num_classes, seed=cfg.seed, split=split, transform=transform)
    if cfg.name == "camvid":
        return camvid.CamVidDataset(root=camvid.resolve_root(cfg.root), split=split, transform=transform)
    return cityscapes.CityscapesDataset(root=cityscapes.resolve_root(cfg.root), split=split, transform=transform)


def minival_indices(n_train: int, cfg: DataConfig) -> list[int]:
    """The positions in the train split (of ``n_train`` items) held out as minival, sorted.

    ``cfg.minival_size`` of them (0: ``max(1, n_train // 10)``), drawn without replacement by numpy
    from ``cfg.minival_seed``: the same for every trial and training seed. At least one image must
    remain for training.
    """
    size = cfg.minival_size or max(1, n_train // 10)
    if size >= n_train:
        raise DatasetError(f"data.minival_size={cfg.minival_size} is not allowed with {n_train} train images: "
                           f"expected fewer than {n_train} (at least one image must remain for training)")
    rng = np.random.default_rng([cfg.minival_seed, _MINIVAL_STREAM])
    return sorted(int(i) for i in rng.choice(n_train, size=size, replace=False))


def check_data(cfg: DataConfig, *, splits: tuple[str, ...], batch_size: int | None = None) -> list[str]:
    """Every problem a trial would meet reading ``splits`` of ``cfg``, one line each, before anything runs.

    Builds the datasets (settings, list files, file existence), reads the header of every listed
    image/label pair (size, mode, completeness; nothing is decoded: :func:`ddsm.data.base.check_pairs`),
    checks the minival draw and that the train split holds at least ``batch_size`` (the global batch) images.
    """
    problems: list[str] = []
    own = {"minival": "train", "train": "train"}
    for split in dict.fromkeys(own.get(s, s) for s in splits):  # the dataset's own splits, once each
        if cfg.name == "camvid":
            problems += camvid.check_split(camvid.resolve_root(cfg.root), split)
        elif cfg.name == "cityscapes":
            try:
                problems += cityscapes.check_split(cityscapes.resolve_root(cfg.root), split)
            except DatasetError as e:
                problems.append(str(e))
    if problems:
        return problems
    try:
        _train_transform(cfg)
        sizes = {s: len(build_dataset(cfg, split=s, train=s == "train")) for s in splits}
    except DatasetError as e:
        return [str(e)]
    if batch_size is not None and "train" in sizes and sizes["train"] < batch_size:
        held = " (after holding out minival)" if cfg.val_split == "minival" else ""
        problems.append(f"data.batch_size={cfg.batch_size} is not allowed: a global batch of {batch_size} is larger "
                        f"than the {sizes['train']} training images{held}")
    return problems


def _train_transform(cfg: DataConfig) -> TrainTransform:
    """The training transform of ``cfg``, after checking the fields TrialConfig.validate leaves open."""
    low, high = cfg.scale_range
    if not 0 < low <= high:
        raise DatasetError(f"data.scale_range={tuple(cfg.scale_range)!r} is not allowed: expected 0 < low <= high")
    if not all(int(s) >= 1 for s in cfg.crop_size):
        raise DatasetError(f"data.crop_size={tuple(cfg.crop_size)!r} is not allowed: expected two positive ints (H, W)")
    if not cfg.jitter >= 0:
        raise DatasetError(f"data.jitter={cfg.jitter!r} is not allowed: expected a float >= 0 (0 disables it)")
    return TrainTransform(crop_size=cfg.crop_size, scale_range=cfg.scale_range, flip=cfg.flip, jitter=cfg.jitter,
                          hue=cfg.hue)


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
        split: one of :data:`SPLITS` (see :func:`build_dataset`).
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
