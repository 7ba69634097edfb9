"""Poly learning-rate schedule with an optional linear warm-up, stepped once per iteration.

The DDSM recipe (SFSegNets, see ``paper/notes.md`` section 2) uses poly decay; it steps per epoch
with exponent 1.0 while most later code steps per iteration with 0.9. We step per iteration (the
finer grain, and what makes resume exact at any step) and keep the exponent an option
(``train.poly_power``). The factor depends on the *total* number of steps, so a run that stops and
resumes follows the same curve as one that does not.
"""
from __future__ import annotations

import torch

__all__ = ["poly_factor", "build_scheduler"]


def poly_factor(step: int, *, total_steps: int, warmup_steps: int = 0, power: float = 0.9) -> float:
    """LR multiplier for the update at 0-based ``step``.

    ``(1 - step / total_steps) ** power``, multiplied during the first ``warmup_steps`` updates by
    the linear ramp ``(step + 1) / warmup_steps`` (so the first update already has a non-zero LR and
    update ``warmup_steps - 1`` reaches the full poly value). Never negative, also past the end.
    """
    poly = max(0.0, 1.0 - step / total_steps) ** power
    if step < warmup_steps:
        return poly * (step + 1) / warmup_steps
    return poly


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0, power: float = 0.9
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`poly_factor`; call ``.step()`` after every optimizer step.

    ``LambdaLR`` keeps only the step counter in its state dict, so the same schedule is rebuilt from
    the config on resume and then fast-forwarded by ``load_state_dict``.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: poly_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, power=power),
    )
