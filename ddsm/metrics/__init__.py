"""Segmentation metrics, all accumulated as sums that can be all-reduced across processes.

* :class:`ConfusionMatrix`: per-class IoU, mIoU, pixel and mean accuracy (torch, on device).
* :class:`BoundaryFScore` / :func:`boundary_fscore`: boundary F-score at several tolerances,
  identical to the GSCNN/DecoupleSegNets protocol (paper notes section 5), computed sparsely.
* :class:`BoundaryIoU`: IoU inside a band around ground-truth boundaries (trimap IoU).
* :func:`seg2bmap`: BSDS 1-pixel boundary map of a binary mask.
"""
from ddsm.metrics.boundary import BoundaryFScore, BoundaryIoU, boundary_fscore, seg2bmap, tolerance_to_px
from ddsm.metrics.confusion import ConfusionMatrix

__all__ = ["ConfusionMatrix", "BoundaryFScore", "BoundaryIoU", "boundary_fscore", "seg2bmap",
           "tolerance_to_px"]
