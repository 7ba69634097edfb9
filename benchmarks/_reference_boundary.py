"""Slow reference for the boundary F-score, written from the protocol in paper notes section 5.

This is the path the group's code (GSCNN / DecoupleSegNets / SFSegNets ``utils/f_boundary.py``,
itself from the DAVIS benchmark) takes: per class and per tolerance, build 1-pixel boundaries with
the BSDS ``seg2bmap`` rule and dilate each boundary map by a disk. It is deliberately plain (one
dilation per class and tolerance) and shares no code with ``ddsm.metrics.boundary``, so the tests
and ``benchmarks/bench_boundary.py`` can use it as an independent oracle.

scikit-image is not a dependency, so the disk footprint (``skimage.morphology.disk``: offsets with
x^2 + y^2 <= r^2) is built by hand and the dilation is ``scipy.ndimage.binary_dilation``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["disk", "reference_seg2bmap", "tolerance_px", "reference_boundary_f",
           "reference_boundary_fscore"]


def disk(radius: int) -> np.ndarray:
    """Disk footprint of ``radius`` pixels: True where x^2 + y^2 <= radius^2 (as skimage's disk)."""
    offsets = np.arange(-radius, radius + 1)
    xx, yy = np.meshgrid(offsets, offsets)
    return xx**2 + yy**2 <= radius**2  # (2r+1, 2r+1)


def reference_seg2bmap(mask: np.ndarray) -> np.ndarray:
    """1-pixel boundaries of a binary mask by the BSDS rule, for a map of the same size.

    A pixel is on the boundary when it differs from its right, down or down-right neighbour; the
    shifted copies are zero-filled past the image, then the last row only compares to the right,
    the last column only compares downwards, and the bottom-right corner is never a boundary.
    """
    seg = np.asarray(mask).astype(bool)
    right = np.zeros_like(seg)
    down = np.zeros_like(seg)
    down_right = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    down[:-1, :] = seg[1:, :]
    down_right[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ down) | (seg ^ down_right)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ down[:, -1]
    bmap[-1, -1] = False
    return bmap


def tolerance_px(tolerance: float, shape: tuple[int, int]) -> int:
    """Tolerance in pixels: as given when >= 1, else ceil(tolerance * norm of the shape)."""
    if tolerance >= 1:
        return int(tolerance)
    return int(np.ceil(tolerance * np.linalg.norm(shape)))


def reference_boundary_f(pred_b: np.ndarray, gt_b: np.ndarray, radius: int) -> float:
    """F-measure of one pair of boundary maps at one tolerance (protocol steps 4 and 5)."""
    footprint = disk(radius)
    pred_dil = ndi.binary_dilation(pred_b, structure=footprint)
    gt_dil = ndi.binary_dilation(gt_b, structure=footprint)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.sum(pred_b & gt_dil) / float(n_pred)
        recall = np.sum(gt_b & pred_dil) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def reference_boundary_fscore(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int,
                              tolerances: list[float], *, ignore_index: int = 255,
                              absent_as_one: bool = False) -> dict[float, tuple[float, list[float]]]:
    """Dataset boundary F per tolerance: {tolerance: (mean over classes, per-class means)}.

    Per image and class (protocol steps 1-3): binary masks, ignore pixels cleared in both,
    ``reference_seg2bmap`` boundaries (computed once and shared by the tolerances); then one pair
    of disk dilations per tolerance. A class with no pixel in either map of an image is skipped
    unless ``absent_as_one`` (then it scores F = 1, as the group's code does). Per class: mean over
    counted images (nan if none); overall: mean over the classes that have a value.
    """
    sums = np.zeros((len(tolerances), num_classes))
    counts = np.zeros(num_classes)
    for pred, gt in zip(preds, gts):
        ignore = gt == ignore_index
        for k in range(num_classes):
            pred_k = (pred == k).astype(np.uint8)
            gt_k = (gt == k).astype(np.uint8)
            pred_k[ignore] = 0
            gt_k[ignore] = 0
            if not (pred_k.any() or gt_k.any()) and not absent_as_one:
                continue
            pred_b, gt_b = reference_seg2bmap(pred_k), reference_seg2bmap(gt_k)
            for t, tol in enumerate(tolerances):
                sums[t, k] += reference_boundary_f(pred_b, gt_b, tolerance_px(tol, gt.shape))
            counts[k] += 1
    out = {}
    for t, tol in enumerate(tolerances):
        with np.errstate(invalid="ignore"):
            per_class = sums[t] / counts
        mean = float(np.nanmean(per_class)) if np.any(counts > 0) else float("nan")
        out[tol] = (mean, per_class.tolist())
    return out
