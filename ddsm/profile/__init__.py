"""The cost of a model as a paper prints it: GFLOPs, parameters, latency and peak memory, with context.

``profile_model`` gives everything (what ``ddsm-bench profile`` prints); ``trial_cost`` is the cheap
per-trial summary the training engine logs. The FLOP convention is in ``ddsm/profile/flops.py`` and is
repeated in every result as ``flop_convention``. FLOPs are per image (batch 1) at the given size;
latency and memory use the given batch; the training step uses at least batch 2, because BatchNorm
after global pooling (PPM) cannot train on a single image.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ddsm.config import ConfigError, TrialConfig
from ddsm.profile.flops import CONVENTION, FlopReport, count_flops
from ddsm.profile.memory import peak_memory, step_peak_memory
from ddsm.profile.timing import (Step, check_amp, device_name, measure_latency, resolve_device, run_context,
                                 summarize, time_calls)


def count_params(model: nn.Module) -> dict[str, Any]:
    """Parameter counts: total, trainable, and total per top-level child module."""
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "by_module": {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()},
    }


def _check_shape(size: tuple[int, int], batch: int, repeats: int, warmup: int) -> None:
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"size={size!r} is not allowed: expected two positive integers (H, W)")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(f"batch={batch}, repeats={repeats}, warmup={warmup} are not allowed: "
                          "expected batch >= 1, repeats >= 1, warmup >= 0")


def profile_model(model: nn.Module, *, size: tuple[int, int], batch: int = 1, device: str | torch.device = "auto",
                  repeats: int = 20, warmup: int = 5, amp: str = "none", channels_last: bool = False,
                  compile: bool = False, train_step: bool = True, memory: bool = True) -> dict[str, Any]:
    """Full cost report of ``model`` at input (batch, 3, H, W); the model itself is not modified.

    Keys: gflops, gmacs (per image), params_m, latency_ms / train_step_ms ({median, p25, p75, ...}),
    peak_mem_mb / train_peak_mem_mb with peak_mem_kind, uncounted_ops, breakdowns, and the run context.
    """
    _check_shape(size, batch, repeats, warmup)
    dev = resolve_device(device)
    check_amp(amp)
    H, W = size
    model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    flops: FlopReport = count_flops(model, torch.randn(1, 3, H, W, device=model_device))
    params = count_params(model)
    result: dict[str, Any] = {
        "gflops": flops.gflops,
        "gmacs": flops.gmacs,
        "params_m": params["total"] / 1e6,
        "params_trainable_m": params["trainable"] / 1e6,
        "latency_ms": None,
        "train_step_ms": None,
        "train_batch": max(batch, 2) if train_step else None,
        "peak_mem_mb": None,
        "train_peak_mem_mb": None,
        "peak_mem_kind": None,
        "uncounted_ops": flops.uncounted_ops,
        "flops_per": "image (batch 1)",
        "flop_convention": CONVENTION,
        "matmul_gflops": flops.matmul_flops / 1e9,
        "gflops_by_op": {k: v / 1e9 for k, v in sorted(flops.by_op.items(), key=lambda kv: -kv[1])},
        "gflops_by_module": {k: v / 1e9 for k, v in flops.by_module.items()},
        "params_m_by_module": {k: v / 1e6 for k, v in params["by_module"].items()},
    }
    runs = [("latency_ms", "peak_mem_mb", batch, False)] + ([("train_step_ms", "train_peak_mem_mb", max(batch, 2), True)]
                                                          if train_step else [])
    for time_key, mem_key, b, train in runs:
        step = Step(model, (b, 3, H, W), device=dev, amp=amp, channels_last=channels_last, compile=compile,
                    train_step=train)
        times = time_calls(step, device=dev, repeats=repeats, warmup=warmup)
        result[time_key] = {**summarize(times), "warmup": warmup}
        if memory:  # one more call of the now warm step
            mem = step_peak_memory(step)
            result[mem_key], result["peak_mem_kind"] = mem["peak_mem_mb"], mem["peak_mem_kind"]
        del step
    result.update(run_context(dev, size=(H, W), batch=batch, amp=amp, channels_last=channels_last, compile=compile))
    return result


def trial_cost(model: nn.Module, cfg: TrialConfig, *, device: str | torch.device = "auto", repeats: int = 3,
               warmup: int = 1) -> dict[str, Any]:
    """Cheap per-trial cost at ``cfg.data.crop_size``: FLOPs, params, batch-1 latency, batch-2 train step, memory.

    AMP (``cfg.train.amp``) applies on CUDA only, as in training. The model is not modified (the
    timed copies are deep copies; FLOP counting restores train/eval flags).
    """
    dev = resolve_device(device)
    amp = cfg.train.amp if dev.type == "cuda" else "none"
    r = profile_model(model, size=tuple(cfg.data.crop_size), batch=1, device=dev, repeats=repeats, warmup=warmup,
                      amp=amp, channels_last=cfg.train.channels_last)
    return {
        "gflops": r["gflops"],
        "gmacs": r["gmacs"],
        "params_m": r["params_m"],
        "latency_ms": r["latency_ms"]["median"],
        "train_step_ms": r["train_step_ms"]["median"],
        "peak_mem_mb": r["peak_mem_mb"],
        "train_peak_mem_mb": r["train_peak_mem_mb"],
        "peak_mem_kind": r["peak_mem_kind"],
        "uncounted_ops": r["uncounted_ops"],
    }


__all__ = ["CONVENTION", "FlopReport", "count_flops", "count_params", "measure_latency", "peak_memory",
           "profile_model", "trial_cost", "run_context", "device_name"]
