"""Boundary metrics: boundary F-score at several tolerances at once, and boundary (trimap) IoU.

The boundary F-score reproduces the protocol of the group's ``utils/f_boundary.py`` (GSCNN /
DecoupleSegNets / SFSegNets, from the DAVIS benchmark; paper notes section 5): per image and class,
1-pixel boundaries of the binary masks by the BSDS ``seg2bmap`` rule, ignore pixels cleared in both
masks, a boundary pixel matched when a boundary pixel of the other map lies within Euclidean
distance r (the reference dilates by a disk of radius r), precision/recall/F with the protocol's
edge cases, then a per-class mean over images and a mean over classes.

It computes the same numbers much faster (see ``benchmarks/bench_boundary.py``):

* the boundaries of every class come from one pass over each label map: a pixel is on the boundary
  of class k exactly when its 2x2 block (itself, right, down, down-right) holds more than one label
  and k is one of them;
* distances are needed only at boundary pixels, which are sparse, so instead of one dilation per
  class and tolerance (or a dense distance transform per class) one ``scipy.spatial.cKDTree``
  nearest-neighbour query per boundary map gives the exact Euclidean distance of every boundary
  pixel to the nearest boundary pixel of the same class in the other map (classes are put far apart
  along a third axis so they never match each other); every tolerance is then a threshold on it.
  Why not ``scipy.ndimage.distance_transform_edt``: its cost grows with the area it covers, not
  with the number of boundary pixels; on 1024x2048 maps one dense EDT per class and map (even
  cropped to bounding boxes or tiled around the boundaries) measured 5-15x slower than the queries.

Everything accumulates as sums and counts, so ``all_reduce`` makes it exact under data parallelism.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ddsm.config import ConfigError
from ddsm.metrics.catalogue import bf_key

__all__ = ["seg2bmap", "tolerance_to_px", "boundary_fscore", "BoundaryFScore", "BoundaryIoU"]

LabelMap = np.ndarray | torch.Tensor


def seg2bmap(mask: LabelMap) -> np.ndarray:
    """1-pixel boundary map of a binary mask, as BSDS/DAVIS ``seg2bmap`` for a same-size map.

    Any non-zero value is foreground. A pixel is on the boundary when it differs from its right,
    down or down-right neighbour; on the last row only the right neighbour counts, on the last
    column only the one below, and the bottom-right pixel is never on the boundary. The boundary
    therefore sits half a pixel towards the origin from the true edge, as in the reference.

    Returns:
        (H, W) bool array.
    """
    return _label_changes(_to_numpy(mask).astype(bool))


def label_bmap(labels: LabelMap) -> np.ndarray:
    """(H, W) bool map of the pixels where a label map changes class, with :func:`seg2bmap`'s convention."""
    return _label_changes(_to_numpy(labels))


def tolerance_to_px(tolerance: float, shape: tuple[int, int]) -> int:
    """Match radius in pixels: ``tolerance`` itself when >= 1, else ceil(tolerance * diagonal)."""
    if tolerance >= 1:
        return int(tolerance)
    height, width = shape
    return int(math.ceil(tolerance * math.sqrt(float(height * height + width * width))))


def boundary_fscore(pred: LabelMap, gt: LabelMap, tolerances: Sequence[float], *, num_classes: int,
                    ignore_index: int = 255, absent_as_one: bool = False) -> dict:
    """Boundary F-score of a single image (H, W); same keys as :meth:`BoundaryFScore.compute`."""
    metric = BoundaryFScore(num_classes, tolerances, ignore_index=ignore_index,
                            absent_as_one=absent_as_one)
    metric.update(pred, gt)
    return metric.compute()


class BoundaryFScore:
    """Boundary F-score accumulated over images, per tolerance and class.

    A tolerance >= 1 is a radius in pixels (must be a whole number); a tolerance < 1 is a fraction
    of the image diagonal, resolved per image as ceil(tolerance * sqrt(H^2 + W^2)).

    Choices (documented because the protocol leaves them open or inflates scores):

    * A class with no pixel in either map of an image (after clearing ignore pixels) is skipped for
      that image. ``absent_as_one=True`` counts it as F = 1 instead, which is what the group's code
      does (its "no boundary in either map" case) and reproduces GSCNN/DecoupleSegNets numbers. A
      class present but without any boundary in both maps (it fills the image) still scores 1.
    * Result keys: ``bf_<r>px`` when a tolerance resolved to the same r on every image; if a
      fractional tolerance resolved to different radii (images of different sizes), the key is
      ``bf_<fraction>`` and ``tolerances_px`` holds [min, max] of the radii used. Two tolerances
      that resolve to the same radius everywhere give identical scores and share one key.
    * Labels outside 0..K-1 other than ``ignore_index`` belong to no class (no error is raised).
    """

    def __init__(self, num_classes: int, tolerances: Sequence[float], *, ignore_index: int = 255,
                 absent_as_one: bool = False) -> None:
        """Args:
            num_classes: K; classes are 0..K-1.
            tolerances: match radii, in pixels (>= 1, whole numbers) or fractions of the diagonal.
            ignore_index: ground-truth label whose pixels are cleared in both masks.
            absent_as_one: count classes absent from both maps of an image as F = 1.
        """
        if num_classes < 1:
            raise ConfigError(f"num_classes={num_classes}: must be >= 1")
        if not tolerances:
            raise ConfigError("tolerances=[]: give at least one tolerance")
        for tol in tolerances:
            if not tol > 0 or (tol >= 1 and float(tol) != int(tol)):
                raise ConfigError(f"tolerance {tol!r}: allowed are whole pixel counts >= 1 "
                                  "or fractions of the image diagonal in (0, 1)")
        self.num_classes = num_classes
        self.tolerances = [float(t) for t in tolerances]
        self.ignore_index = ignore_index
        self.absent_as_one = absent_as_one
        self.reset()

    def reset(self) -> None:
        """Clear the state: F sums (T, K), image counts (K,), radius range per tolerance (T,)."""
        n_tol = len(self.tolerances)
        self.f_sum = np.zeros((n_tol, self.num_classes), dtype=np.float64)  # (T, K)
        self.count = np.zeros(self.num_classes, dtype=np.int64)  # (K,)
        self.px_min = np.full(n_tol, np.iinfo(np.int64).max, dtype=np.int64)  # (T,)
        self.px_max = np.zeros(n_tol, dtype=np.int64)  # (T,)

    def update(self, pred: LabelMap, target: LabelMap) -> None:
        """Add images: integer label maps (H, W) or (B, H, W), numpy or torch (any device)."""
        for pred_img, gt_img in _as_image_pairs(pred, target):
            radii = [tolerance_to_px(t, gt_img.shape) for t in self.tolerances]
            f, present = _image_fscores(pred_img, gt_img, radii, self.num_classes, self.ignore_index)
            counted = np.ones_like(present) if self.absent_as_one else present  # (K,)
            self.f_sum += np.where(counted, f, 0.0)
            self.count += counted
            self.px_min = np.minimum(self.px_min, radii)
            self.px_max = np.maximum(self.px_max, radii)

    def all_reduce(self) -> None:
        """Combine the state of all processes (sums, counts, radius range); no-op without dist."""
        self.f_sum = _all_reduce_array(self.f_sum, "sum")
        self.count = _all_reduce_array(self.count, "sum")
        self.px_min = _all_reduce_array(self.px_min, "min")
        self.px_max = _all_reduce_array(self.px_max, "max")

    def compute(self) -> dict:
        """Scores: ``bf_<r>px`` (mean over classes), ``bf_per_class`` {r: K floats, nan where no
        image counted}, ``tolerances_px`` (r per tolerance, or [min, max]) and ``bf_images_per_class``.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = self.f_sum / self.count  # (T, K)
        means: dict[str, float] = {}
        by_radius: dict[int | float, list[float]] = {}
        tolerances_px: list = []
        for t, tol in enumerate(self.tolerances):
            lo, hi = int(self.px_min[t]), int(self.px_max[t])
            if tol >= 1 or lo == hi:
                radius: int | float = int(tol) if tol >= 1 else lo
                key, px = bf_key(tol, radius=int(radius)), radius
            else:  # radius varies with image size (or no image seen yet): key by the fraction
                radius, key, px = tol, bf_key(tol), [lo, hi] if lo <= hi else None
            scores = per_class[t]  # (K,)
            means[key] = float(np.nanmean(scores)) if np.isfinite(scores).any() else math.nan
            by_radius[radius] = scores.tolist()
            tolerances_px.append(px)
        return {**means, "bf_per_class": by_radius, "tolerances_px": tolerances_px,
                "bf_images_per_class": self.count.tolist()}


class BoundaryIoU:
    """IoU restricted to a band around ground-truth boundaries (trimap IoU).

    The band holds the pixels within Euclidean distance ``width`` of a ground-truth boundary pixel.
    Choice: boundary pixels are those of :func:`seg2bmap` applied to the whole ground-truth label
    map (any label change, ignore regions included), i.e. the same pixels the boundary F-score
    uses; ignore pixels inside the band are not evaluated. Per class, intersection and union pixel
    counts inside the band are summed over images; classes with an empty union get nan.
    """

    def __init__(self, num_classes: int, *, width: int = 3, ignore_index: int = 255) -> None:
        """Args:
            num_classes: K; classes are 0..K-1.
            width: band half-width in pixels (0 = boundary pixels only).
            ignore_index: ground-truth label that is not evaluated.
        """
        if num_classes < 1:
            raise ConfigError(f"num_classes={num_classes}: must be >= 1")
        if int(width) != width or width < 0:
            raise ConfigError(f"width={width!r}: must be a whole number of pixels >= 0")
        self.num_classes = num_classes
        self.width = int(width)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Clear the intersection and union sums, both (K,) int64."""
        self.intersection = np.zeros(self.num_classes, dtype=np.int64)
        self.union = np.zeros(self.num_classes, dtype=np.int64)

    def update(self, pred: LabelMap, target: LabelMap) -> None:
        """Add images: integer label maps (H, W) or (B, H, W), numpy or torch (any device)."""
        k = self.num_classes
        footprint = _disk(self.width)
        for pred_img, gt_img in _as_image_pairs(pred, target):
            pred_l, gt_l = _normalise(pred_img, gt_img, k, self.ignore_index)
            band = ndi.binary_dilation(_label_changes(gt_l), structure=footprint)  # (H, W)
            evaluated = band & (gt_l < k)
            gt_v, pred_v = gt_l[evaluated], pred_l[evaluated]  # (N,), (N,)
            inter = np.bincount(gt_v[gt_v == pred_v], minlength=k + 1)[:k]
            area_gt = np.bincount(gt_v, minlength=k + 1)[:k]
            area_pred = np.bincount(pred_v, minlength=k + 1)[:k]
            self.intersection += inter
            self.union += area_gt + area_pred - inter

    def all_reduce(self) -> None:
        """Sum the intersection and union counts over all processes; no-op without dist."""
        self.intersection = _all_reduce_array(self.intersection, "sum")
        self.union = _all_reduce_array(self.union, "sum")

    def compute(self) -> dict:
        """``biou`` (mean over classes with a non-empty union) and ``biou_per_class`` (K floats)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = self.intersection / self.union  # (K,), nan where union == 0
        biou = float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan
        return {"biou": biou, "biou_per_class": iou.tolist()}


# ----------------------------------------------------------------------------- per-image core


def _image_fscores(pred: np.ndarray, gt: np.ndarray, radii: list[int], num_classes: int,
                   ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """F per radius and class for one image, and which classes are present in either map.

    Returns:
        (T, K) float64 F-scores and (K,) bool presence.
    """
    k = num_classes
    pred_l, gt_l = _normalise(pred, gt, k, ignore_index)
    pred_pts = _class_boundary_points(pred_l, k)  # (Np, 3) rows (y, x, class)
    gt_pts = _class_boundary_points(gt_l, k)  # (Ng, 3)
    n_pred = np.bincount(pred_pts[:, 2], minlength=k)  # (K,)
    n_gt = np.bincount(gt_pts[:, 2], minlength=k)  # (K,)
    # a class occupying part of a map always has a boundary pixel there; a map without any
    # boundary is constant, so its one label is the only class it holds
    present = (n_pred + n_gt) > 0  # (K,)
    for labels, points in ((pred_l, pred_pts), (gt_l, gt_pts)):
        if len(points) == 0 and labels.size and labels.flat[0] < k:
            present[labels.flat[0]] = True
    d2_pred = _nearest_sq_dist(pred_pts, gt_pts, max(radii))  # (Np,)
    d2_gt = _nearest_sq_dist(gt_pts, pred_pts, max(radii))  # (Ng,)
    f = np.empty((len(radii), k), dtype=np.float64)  # (T, K)
    for t, radius in enumerate(radii):
        hit_pred = np.bincount(pred_pts[d2_pred <= radius * radius, 2], minlength=k)
        hit_gt = np.bincount(gt_pts[d2_gt <= radius * radius, 2], minlength=k)
        f[t] = _f_measure(hit_pred, n_pred, hit_gt, n_gt)
    return f, present


def _f_measure(hit_pred: np.ndarray, n_pred: np.ndarray, hit_gt: np.ndarray,
               n_gt: np.ndarray) -> np.ndarray:
    """Protocol steps 4-5, per class: an empty boundary set scores 1 on its own side; with the
    other side empty there is nothing to hit, so the other ratio is 0. Same float ops as the
    reference so the results are bit-identical."""
    precision = np.where(n_pred == 0, 1.0, hit_pred / np.maximum(n_pred, 1))
    recall = np.where(n_gt == 0, 1.0, hit_gt / np.maximum(n_gt, 1))
    denom = precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom == 0, 0.0, 2 * precision * recall / denom)


def _class_boundary_points(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Every (pixel, class) pair on a class boundary, from one pass over the label map.

    The mask ``labels == k`` differs between a pixel and one of its right/down/down-right
    neighbours exactly when that 2x2 block holds several labels and k is one of them, so the
    seg2bmap boundary of every class is read off the blocks where the label changes. Padding by
    edge replication reproduces seg2bmap's rules on the last row and column.

    Returns:
        (N, 3) int64 rows (y, x, class), each pair once.
    """
    width = labels.shape[1]
    padded = np.pad(labels, ((0, 1), (0, 1)), mode="edge").ravel()  # ((H+1)*(W+1),)
    y, x = np.nonzero(_label_changes(labels))  # (n,), (n,)
    at = y * (width + 1) + x
    here, right = padded[at], padded[at + 1]
    down, down_right = padded[at + width + 1], padded[at + width + 2]
    block = np.stack([here, right, down, down_right])  # (4, n)
    first_seen = np.stack([np.ones_like(here, dtype=bool), right != here,
                           (down != here) & (down != right),
                           (down_right != here) & (down_right != right) & (down_right != down)])
    keep = first_seen & (block < num_classes)  # (4, n): each class of the block once
    ys = np.broadcast_to(y, block.shape)[keep]
    xs = np.broadcast_to(x, block.shape)[keep]
    return np.stack([ys, xs, block[keep].astype(np.int64)], axis=1)  # (N, 3)


def _nearest_sq_dist(query: np.ndarray, target: np.ndarray, max_radius: int) -> np.ndarray:
    """Squared Euclidean distance from each query point to the nearest target point of the same
    class; inf when none lies within ``max_radius`` (exact integers below it)."""
    if len(query) == 0 or len(target) == 0:
        return np.full(len(query), np.inf)
    gap = 2.0 * (max_radius + 1)  # classes this far apart on a third axis never match each other
    scale = np.array([1.0, 1.0, gap])
    tree = cKDTree(target * scale, balanced_tree=False, compact_nodes=False)
    dist, _ = tree.query(query * scale, distance_upper_bound=max_radius + 1)
    return np.rint(np.square(dist))  # (Nq,) integer squared distances; inf stays inf


# ----------------------------------------------------------------------------- helpers


def _label_changes(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: label differs from the right, down or down-right neighbour (edges: see seg2bmap)."""
    changed = np.zeros(labels.shape, dtype=bool)
    changed[:, :-1] = labels[:, :-1] != labels[:, 1:]
    changed[:-1, :] |= labels[:-1, :] != labels[1:, :]
    changed[:-1, :-1] |= labels[:-1, :-1] != labels[1:, 1:]
    return changed


def _normalise(pred: np.ndarray, gt: np.ndarray, num_classes: int,
               ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Compact label maps where every non-class value is K, and pred is K wherever gt is ignored
    (protocol step 1: ignore pixels are cleared in both masks)."""
    gt_l = _compact(gt, num_classes)
    pred_l = _compact(pred, num_classes)
    pred_l[gt == ignore_index] = num_classes
    return pred_l, gt_l


def _compact(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A new label map in the smallest dtype holding 0..K, with every value outside 0..K-1 set to K."""
    dtype = np.uint8 if num_classes < 255 else np.int32
    if labels.dtype.kind == "u":  # no negative values: clipping is enough
        return np.minimum(labels, num_classes).astype(dtype)
    return np.where((labels >= 0) & (labels < num_classes), labels, num_classes).astype(dtype)


def _disk(radius: int) -> np.ndarray:
    """Disk footprint (x^2 + y^2 <= r^2), as skimage.morphology.disk, which is not a dependency."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius  # (2r+1, 2r+1)


def _to_numpy(x: LabelMap) -> np.ndarray:
    """A numpy view/copy of a numpy array or a torch tensor on any device."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_image_pairs(pred: LabelMap, target: LabelMap) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split (B, H, W) or (H, W) inputs into a list of (H, W) numpy pairs."""
    pred, target = _to_numpy(pred), _to_numpy(target)
    if pred.shape != target.shape or pred.ndim not in (2, 3):
        raise ValueError(f"pred {pred.shape} and target {target.shape} must share one shape, "
                         "(H, W) or (B, H, W)")
    if pred.ndim == 2:
        return [(pred, target)]
    return list(zip(pred, target))


def _all_reduce_array(array: np.ndarray, op: str) -> np.ndarray:
    """All-reduce a numpy array across processes (sum/min/max); returned unchanged without dist."""
    if not (dist.is_available() and dist.is_initialized()):
        return array
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=reduce_op)
    return tensor.cpu().numpy().astype(array.dtype)
