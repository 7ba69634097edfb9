"""Validation: whole-image, sliding-window and multi-scale + flip inference, then every metric.

Inference follows the SFSegNets ``eval.py`` recipe that DDSM builds on (``paper/notes.md`` section 2):
sliding crops overlapping by 1/3, softmax probabilities averaged over scales and flips. Whole-image
single-scale inference (the default, as inside SFSegNets' ``train.py``) takes the argmax of the logits.
Evaluation always runs in float32 (``train.amp`` is not applied) so metrics do not depend on the
training precision.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ddsm.config import TrialConfig

__all__ = ["evaluate", "predict", "sliding_window_logits", "distributed_context", "to_jsonable"]

SLIDING_OVERLAP = 1 / 3  # SFSegNets eval.py default


def distributed_context() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sliding_window_logits(model: nn.Module, image: torch.Tensor, *, num_classes: int, crop: tuple[int, int],
                          overlap: float = SLIDING_OVERLAP) -> torch.Tensor:
    """Logits (B, K, H, W) averaged over crops of size ``crop`` with stride ``ceil(crop * (1 - overlap))``.

    An image smaller than the crop is zero-padded (zero is the mean colour after normalisation) and
    the padding is cut off again; the last row/column of crops is aligned to the image border.
    """
    b, _, h, w = image.shape
    ch, cw = crop
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    padded = F.pad(image, [0, pad_w, 0, pad_h])  # (B, 3, H', W')
    hp, wp = padded.shape[-2:]
    sh, sw = max(1, math.ceil(ch * (1 - overlap))), max(1, math.ceil(cw * (1 - overlap)))
    logits = padded.new_zeros((b, num_classes, hp, wp))  # (B, K, H', W')
    count = padded.new_zeros((1, 1, hp, wp))
    for top in _starts(hp, ch, sh):
        for left in _starts(wp, cw, sw):
            window = padded[:, :, top:top + ch, left:left + cw]  # (B, 3, ch, cw)
            logits[:, :, top:top + ch, left:left + cw] += model(window)["out"].float()
            count[:, :, top:top + ch, left:left + cw] += 1
    return (logits / count)[:, :, :h, :w]  # (B, K, H, W)


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Window start offsets covering [0, length) with the last window flush with the end."""
    n = max(length - size + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, length - size) for i in range(n)})


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, *, num_classes: int, scales: Sequence[float] = (1.0,),
            flip: bool = False, sliding: bool = False, crop: tuple[int, int] = (512, 512),
            channels_last: bool = False) -> torch.Tensor:
    """Class scores (B, K, H, W) for a normalised image batch (B, 3, H, W); argmax gives the prediction.

    With one scale of 1.0 and no flip these are the logits; otherwise the softmax probabilities
    averaged over every (scale, flip) view, each resized back to (H, W) bilinearly.
    """
    h, w = image.shape[-2:]
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    total = None
    for scale, flipped in views:
        x = image.flip(-1) if flipped else image
        if scale != 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (B, 3, h*s, w*s)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if sliding:
            logits = sliding_window_logits(model, x, num_classes=num_classes, crop=crop)
        else:
            logits = model(x)["out"].float()  # (B, K, h*s, w*s)
        if len(views) == 1 and scale == 1.0:
            return logits
        if scale != 1.0:
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)  # (B, K, H, W)
        probs = logits.softmax(dim=1)
        probs = probs.flip(-1) if flipped else probs
        total = probs if total is None else total + probs
    return total / len(views)


def evaluate(model: nn.Module, cfg: TrialConfig, *, device: str | torch.device,
             loader: Iterable | None = None) -> dict[str, Any]:
    """Run ``model`` over the split ``data.val_split`` (val, test or minival) and return every metric.

    Reads ``data`` (dataset, via :func:`ddsm.data.build_loader`, which shards the split per rank
    when a process group is initialised), ``eval`` (tolerances, biou_width, absent_as_one, sliding,
    crop, scales, flip, max_images) and ``train.channels_last``/``train.seed``. Metric sums are
    all-reduced across ranks before they are computed. ``eval.max_images`` limits the images of
    each process.

    Returns:
        ``miou``, ``pixel_acc``, ``mean_acc``, ``per_class_iou`` (list, one per class), ``absent_classes``,
        ``bf_<r>px`` per tolerance, ``tolerances_px``, ``biou``, ``class_names``, ``num_images`` and
        ``confusion`` (K x K list, rows = ground truth, columns = prediction) and ``split`` (the split's name).
    """
    from ddsm.data import build_loader, dataset_info
    from ddsm.metrics import BoundaryFScore, BoundaryIoU, ConfusionMatrix

    device = torch.device(device)
    rank, world_size = distributed_context()
    info = dataset_info(cfg.data.name, cfg.data)
    k = info.num_classes
    if loader is None:
        loader = build_loader(cfg.data, split=cfg.data.val_split, train=False, seed=cfg.train.seed,
                              distributed_rank=rank, world_size=world_size)
    confusion = ConfusionMatrix(k, ignore_index=info.ignore_index, device=device)
    bfscore = BoundaryFScore(k, tolerances=list(cfg.eval.tolerances), ignore_index=info.ignore_index,
                             absent_as_one=cfg.eval.absent_as_one)
    biou = BoundaryIoU(k, width=cfg.eval.biou_width)
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = net.training
    net.eval()
    seen = 0
    try:
        for images, labels in loader:
            if cfg.eval.max_images and seen >= cfg.eval.max_images:
                break
            if cfg.eval.max_images:
                images, labels = images[: cfg.eval.max_images - seen], labels[: cfg.eval.max_images - seen]
            images, labels = images.to(device), labels.to(device)  # (B, 3, H, W), (B, H, W)
            scores = predict(net, images, num_classes=k, scales=cfg.eval.scales, flip=cfg.eval.flip,
                             sliding=cfg.eval.sliding, crop=tuple(cfg.eval.crop),
                             channels_last=cfg.train.channels_last)
            pred = scores.argmax(dim=1)  # (B, H, W)
            confusion.update(pred, labels)
            bfscore.update(pred, labels)
            biou.update(pred, labels)
            seen += images.shape[0]
    finally:
        net.train(was_training)
    seen = _all_reduce_metrics(confusion, bfscore, biou, seen=seen, world_size=world_size, device=device)
    metrics: dict[str, Any] = {}
    for result in (confusion.compute(), bfscore.compute(), biou.compute()):
        metrics.update(result)
    metrics = {key: _plain(v) for key, v in metrics.items()}
    metrics.update(class_names=list(info.class_names), num_images=seen, confusion=_plain(confusion.mat),
                   split=cfg.data.val_split)
    return metrics


def _all_reduce_metrics(*meters: Any, seen: int, world_size: int, device: torch.device) -> int:
    """Sum every meter's statistics over ranks (each meter's own ``all_reduce``); return the total image count."""
    if world_size == 1:
        return seen
    for meter in meters:
        meter.all_reduce()
    count = torch.tensor([seen], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(count)
    return int(count.item())


def _plain(x: Any) -> Any:
    """Tensors and numpy values -> Python floats/ints/lists, for JSON."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def to_jsonable(x: Any) -> Any:
    """:func:`_plain`, then NaN/inf floats -> None (strict JSON), recursively."""
    x = _plain(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [to_jsonable(v) for v in x]
    return x
