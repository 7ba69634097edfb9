"""Training data order as a pure function of (seed, step): what makes resume exact.

:class:`StepSampler` shuffles each epoch with a generator seeded by ``(seed, epoch)``, deals each
global batch of ``batch_size * world_size`` indices out to the ranks, and can start at any step
without replaying earlier ones. Each index comes with an augmentation seed derived from
``(seed, epoch, position)``, the ``(index, seed)`` key that :class:`ddsm.data.SegmentationDataset`
accepts, so augmentation does not depend on the worker, the rank or on what ran before a resume.
Written by hand because torch's ``DistributedSampler`` (and ``ddsm.data.build_loader``) can only
start at an epoch boundary.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ddsm.config import ConfigError

__all__ = ["StepSampler"]


class StepSampler(Sampler):
    """Yields ``(index, sample_seed)`` pairs forever, ``batch_size`` per step, starting at ``start_step``.

    Every epoch uses ``len(dataset) // (batch_size * world_size)`` full global batches (the tail is
    dropped, as ``drop_last=True`` would); rank ``r`` takes slice ``r`` of each global batch.
    """

    def __init__(self, num_samples: int, *, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size={batch_size} is not allowed with {num_samples} training images and "
                              f"{world_size} process(es): expected batch_size * processes <= {num_samples}")

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of the dataset used in ``epoch`` (the same on every rank)."""
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while True:
            epoch, pos = divmod(step, self.steps_per_epoch)
            order = self.epoch_order(epoch)
            global_bs = self.batch_size * self.world_size
            for s in range(pos, self.steps_per_epoch):
                start = s * global_bs + self.rank * self.batch_size
                for slot in range(start, start + self.batch_size):
                    yield int(order[slot]), _mix(self.seed, epoch, slot)
            step = (epoch + 1) * self.steps_per_epoch


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from a tuple of ints (numpy's SeedSequence hashing)."""
    a, b = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)
