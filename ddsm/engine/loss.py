"""Pixel-wise cross-entropy with an ignore label and optional online hard example mining (OHEM).

OHEM follows the SFSegNets recipe that DDSM builds on (``paper/notes.md`` section 2): keep the
pixels whose predicted probability of the true class is at most ``thresh`` (0.7), but never fewer
than ``min_kept`` (10 000) -- if fewer are that hard, the threshold rises to the ``min_kept``-th
smallest probability. Mining is over the whole (per-process) batch, not per image, as there.
Written by hand because neither torch nor torchvision ships an OHEM segmentation loss.

Neither function syncs with the host (no ``.item()``, no data-dependent shapes), so a GPU training
step never waits for the CPU here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["HEAD_WEIGHTS", "ohem_keep_mask", "segmentation_loss", "total_loss"]

# Loss weight of every extra supervised output a model returns in training, besides "out" (weight 1)
# and "aux" (train.aux_weight, 0.4 as mmseg's configs): DANet's position and channel classifiers are
# supervised with weight 1 each, as mmseg's DAHead (its loss_decode, weight 1.0, applied to all three).
HEAD_WEIGHTS = {"pam": 1.0, "cam": 1.0}


def ohem_keep_mask(logits: torch.Tensor, target: torch.Tensor, *, thresh: float, min_kept: int,
                   ignore_index: int = 255) -> torch.Tensor:
    """Boolean (B, H, W) mask of the pixels OHEM keeps (always a subset of the non-ignored ones).

    Args:
        logits: (B, K, H, W) class scores.
        target: (B, H, W) labels in ``[0, K)`` or ``ignore_index``.
        thresh: keep pixels whose true-class probability is ``<= thresh``.
        min_kept: keep at least this many pixels (all valid ones if there are fewer).
        ignore_index: label excluded from the loss.
    """
    valid = target != ignore_index  # (B, H, W)
    with torch.no_grad():
        prob = logits.detach().float().softmax(dim=1)  # (B, K, H, W)
        safe_target = target.masked_fill(~valid, 0).long()  # (B, H, W)
        p_true = prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # (B, H, W)
        threshold = torch.full((), thresh, dtype=p_true.dtype, device=p_true.device)  # no host-to-device copy
        k = min(max(min_kept, 0), p_true.numel())
        if k > 0:
            # the k-th smallest true-class probability of the valid pixels (k = min(min_kept, valid
            # pixels)), read on the device: ignored pixels sort last, the index is a device tensor
            smallest = torch.where(valid, p_true, 2.0).flatten().topk(k, largest=False).values  # (k,) ascending
            kth = smallest.gather(0, (valid.sum().clamp(max=k) - 1).clamp(min=0).view(1))  # (1,)
            threshold = torch.maximum(threshold, kth.squeeze(0))
        return valid & (p_true <= threshold)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
                      ohem: bool = False, ohem_thresh: float = 0.7, ohem_min_kept: int = 10000) -> torch.Tensor:
    """Mean cross-entropy over the kept pixels; 0 (with a graph) when no pixel is kept.

    Computed as sum / max(kept, 1), so an all-ignore crop needs no host-side test.

    Args:
        logits: (B, K, H, W) class scores at label resolution.
        target: (B, H, W) integer labels; ``ignore_index`` pixels never count.
        ohem: mine hard pixels with :func:`ohem_keep_mask` before averaging.
    """
    target = target.long()
    if ohem:
        keep = ohem_keep_mask(logits, target, thresh=ohem_thresh, min_kept=ohem_min_kept, ignore_index=ignore_index)
        target = target.masked_fill(~keep, ignore_index)
    kept = (target != ignore_index).sum()  # 0-d, on the device
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / kept.clamp(min=1)  # an all-ignore crop gives 0, not a divergence


def total_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor, *, aux_weight: float, ignore_index: int = 255,
               ohem: bool = False, ohem_thresh: float = 0.7, ohem_min_kept: int = 10000) -> dict[str, torch.Tensor]:
    """``{"loss": main + aux_weight * aux + sum_k w_k * extra_k, "loss_main": ..., "loss_<key>": ...}``
    from a model's output dict.

    Every extra output (present only in training: ``"aux"``, and those of :data:`HEAD_WEIGHTS`) uses
    the same criterion as the main one, as mmseg's heads and SFSegNets' deep supervision do. An output
    with no known weight raises ValueError naming it (a silently unsupervised head would not train).
    """
    kwargs = dict(ignore_index=ignore_index, ohem=ohem, ohem_thresh=ohem_thresh, ohem_min_kept=ohem_min_kept)
    main = segmentation_loss(outputs["out"], target, **kwargs)
    losses = {"loss": main, "loss_main": main}
    for key, logits in outputs.items():
        if key == "out" or logits is None:
            continue
        if key != "aux" and key not in HEAD_WEIGHTS:
            raise ValueError(f"model output {key!r} has no loss weight: expected one of out, aux, "
                             f"{', '.join(HEAD_WEIGHTS)}")
        weight = aux_weight if key == "aux" else HEAD_WEIGHTS[key]
        losses[f"loss_{key}"] = segmentation_loss(logits, target, **kwargs)
        losses["loss"] = losses["loss"] + weight * losses[f"loss_{key}"]
    return losses
