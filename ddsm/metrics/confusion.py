"""Confusion-matrix metrics: per-class IoU, mIoU, pixel accuracy and mean accuracy.

The matrix is accumulated on the device of the inputs with one ``torch.bincount`` per update and
holds raw int64 counts, so it can be summed across processes (``all_reduce``) before ``compute``.
IoU follows the Cityscapes pixel-level evaluation: pixels whose ground truth is ``ignore_index``
are dropped; a class present in the prediction but not in the ground truth gets IoU 0.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulates a (K, K) matrix of pixel counts indexed [ground truth, prediction].

    Classes absent from both the ground truth and the prediction (row and column of the matrix
    empty) have no defined IoU: they are reported in ``absent_classes``, get nan in
    ``per_class_iou`` and are left out of ``miou``. ``mean_acc`` averages the recall of the classes
    that occur in the ground truth (the others have no defined accuracy).
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255,
                 device: torch.device | str | None = None) -> None:
        """Args:
            num_classes: K; valid labels are 0..K-1.
            ignore_index: ground-truth label that is not evaluated.
            device: where the matrix lives; None = CPU until the first update moves it to the
                inputs' device.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: must be >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._device_fixed = device is not None
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts (keeps the device)."""
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch. ``pred`` and ``target`` are integer label maps, (B, H, W) or (H, W).

        Raises ValueError on a shape mismatch or on a label outside 0..K-1 at a pixel that is
        evaluated (target != ignore_index).
        """
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if not self._device_fixed and self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        k = self.num_classes
        pred = pred.to(self.mat.device, torch.int64).flatten()  # (B*H*W,)
        target = target.to(self.mat.device, torch.int64).flatten()  # (B*H*W,)
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= k) | (pred < 0) | (pred >= k))
        if bool(bad.any()):
            raise ValueError(f"labels must be in 0..{k - 1} (or target == ignore_index "
                             f"{self.ignore_index}); got target/pred values outside that range")
        # invalid pixels go to an extra bin k*k that is dropped, so no boolean indexing is needed
        index = torch.where(valid, target * k + pred, torch.full_like(target, k * k))
        counts = torch.bincount(index, minlength=k * k + 1)[: k * k]  # (K*K,)
        self.mat += counts.view(k, k)  # (K, K) [gt, pred]

    def all_reduce(self) -> None:
        """Sum the matrix over all processes when torch.distributed is initialised; else no-op."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        """Scores from the accumulated counts.

        Returns:
            dict with ``miou``, ``pixel_acc``, ``mean_acc`` (floats, nan when undefined),
            ``per_class_iou`` (list of K floats, nan for absent classes) and ``absent_classes``
            (ids of classes with neither ground-truth nor predicted pixels).
        """
        mat = self.mat.to("cpu", torch.float64)  # (K, K)
        tp = mat.diagonal()  # (K,)
        gt_count = mat.sum(dim=1)  # (K,)
        pred_count = mat.sum(dim=0)  # (K,)
        union = gt_count + pred_count - tp  # (K,)
        absent = union == 0
        iou = torch.where(absent, torch.full_like(tp, math.nan), tp / union.clamp(min=1))
        in_gt = gt_count > 0
        acc = tp[in_gt] / gt_count[in_gt]
        total = mat.sum()
        return {
            "miou": float(iou[~absent].mean()) if (~absent).any() else math.nan,
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_acc": float(acc.mean()) if acc.numel() else math.nan,
            "per_class_iou": iou.tolist(),
            "absent_classes": absent.nonzero().flatten().tolist(),
        }
