"""Segmentation metrics, all accumulated as sums that can be all-reduced across processes.

* :class:`ConfusionMatrix`: per-class IoU, mIoU, pixel and mean accuracy (torch, on device).
* :class:`BoundaryFScore` / :func:`boundary_fscore`: boundary F-score at several tolerances,
  identical to the GSCNN/DecoupleSegNets protocol (paper notes section 5), computed sparsely.
* :class:`BoundaryIoU`: IoU inside a band around ground-truth boundaries (trimap IoU).
* :func:`seg2bmap`: BSDS 1-pixel boundary map of a binary mask.
* :mod:`ddsm.metrics.catalogue`: what every reported metric is (label, unit, direction, accuracy or
  cost); reports, tuning objectives and the terminal read it.
"""
from __future__ import annotations

import importlib
from typing import Any

from ddsm.metrics.catalogue import MetricInfo, lookup

# Loaded on first use, so that the catalogue can be read (by reports, the CLI) without importing torch.
_LAZY = {"BoundaryFScore": "boundary", "BoundaryIoU": "boundary", "boundary_fscore": "boundary",
         "seg2bmap": "boundary", "tolerance_to_px": "boundary", "ConfusionMatrix": "confusion"}

__all__ = ["ConfusionMatrix", "BoundaryFScore", "BoundaryIoU", "MetricInfo", "boundary_fscore", "lookup", "seg2bmap",
           "tolerance_to_px"]


def __getattr__(name: str) -> Any:
    """Import the torch-based metric classes on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'ddsm.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ddsm.metrics.{_LAZY[name]}"), name)
