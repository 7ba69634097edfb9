"""Latency of inference and of one training step, measured the way a paper can report it.

A fixed input shape and batch, ``warmup`` untimed calls, then ``repeats`` timed calls summarised by
the median and the interquartile range (p25, p75). On GPU each call is bracketed by CUDA events and
synchronised; on CPU it is timed with ``time.perf_counter``. The model is always deep-copied, so the
caller's weights, train/eval flags and memory format are never touched.

A training step is forward + cross-entropy on random labels (summed over every output, e.g. "aux")
+ backward + SGD step (momentum 0.9, weight decay 1e-4, as TrainConfig), with a GradScaler for fp16.
"""
from __future__ import annotations

import copy
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddsm.config import ConfigError

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; raise ConfigError for cuda without a GPU."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is not allowed: no CUDA device is available (use cpu)")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"device={name!r} is not allowed: expected auto, cpu or cuda[:N]")
    return torch.device(name)


def check_amp(amp: str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (none | bf16 | fp16); raise ConfigError otherwise."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp={amp!r} is not allowed: expected one of {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def device_name(device: torch.device) -> str:
    """GPU name from CUDA, or the CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_context(device: torch.device, *, size: tuple[int, int], batch: int, amp: str = "none",
                channels_last: bool = False, compile: bool = False) -> dict[str, Any]:
    """Where and how a measurement ran: device, software versions, dtype, shape and flags."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "dtype": "float32" if amp == "none" else f"{str(check_amp(amp)).removeprefix('torch.')} autocast",
        "size": list(size),
        "batch": batch,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile,
    }


def _logits(outputs: torch.Tensor | dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(outputs.values()) if isinstance(outputs, dict) else [outputs]


class Step:
    """One inference forward or one training step of a private copy of a model, ready to call.

    Attributes ``model``, ``inputs``, ``optimizer`` (None for inference) let callers see what stays
    resident between calls (memory.py counts it).
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], *, device: str | torch.device = "cpu",
                 amp: str = "none", channels_last: bool = False, compile: bool = False, train_step: bool = False,
                 seed: int = 0):
        self.device = resolve_device(device)
        self.dtype = check_amp(amp)
        self.train_step = train_step
        self.model = copy.deepcopy(model).to(self.device).train(train_step)
        gen = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(input_shape, generator=gen).to(self.device)  # (B, 3, H, W)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.inputs = self.inputs.contiguous(memory_format=torch.channels_last)
        self.forward: Callable = torch.compile(self.model) if compile else self.model
        self.optimizer = (torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
                          if train_step else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train_step and amp == "fp16")
        self.targets: torch.Tensor | None = None  # (B, H, W) labels, drawn at the first training call
        self.seed = seed

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def __call__(self) -> None:
        """Run one forward (no grad) or one forward + backward + optimizer step."""
        if not self.train_step:
            with torch.no_grad(), self._autocast():
                self.forward(self.inputs)
            return
        self.optimizer.zero_grad(set_to_none=True)  # frees last step's gradients, as a training loop does
        with self._autocast():
            logits = _logits(self.forward(self.inputs))
            if self.targets is None:
                gen = torch.Generator().manual_seed(self.seed)
                B, K, H, W = logits[0].shape
                self.targets = torch.randint(K, (B, H, W), generator=gen).to(self.device)
            loss = sum(F.cross_entropy(z.float(), self.targets) for z in logits)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def time_calls(fn: Callable[[], None], *, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return times
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times_ms: list[float]) -> dict[str, float | int]:
    """Median, p25, p75 (linear interpolation, as numpy's default), mean, min and count."""
    if len(times_ms) == 1:
        p25 = p75 = times_ms[0]
    else:
        p25, _, p75 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return {"median": statistics.median(times_ms), "p25": p25, "p75": p75,
            "mean": statistics.fmean(times_ms), "min": min(times_ms), "repeats": len(times_ms)}


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, device: str | torch.device = "cpu",
                    repeats: int = 20, warmup: int = 5, amp: str = "none", channels_last: bool = False,
                    compile: bool = False, train_step: bool = False) -> dict[str, float | int]:
    """Latency in ms of inference (or of a training step) on a copy of ``model``.

    input_shape: (B, 3, H, W). Returns {median, p25, p75, mean, min, repeats, warmup} and the run
    context (device, versions, dtype, size, batch, flags; see run_context). A training
    step needs B >= 2 for models with BatchNorm after global pooling (the PPM), as in training.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats={repeats}, warmup={warmup} are not allowed: expected repeats >= 1, warmup >= 0")
    step = Step(model, input_shape, device=device, amp=amp, channels_last=channels_last, compile=compile,
                train_step=train_step)
    times = time_calls(step, device=step.device, repeats=repeats, warmup=warmup)
    context = run_context(step.device, size=tuple(input_shape[-2:]), batch=input_shape[0], amp=amp,
                          channels_last=channels_last, compile=compile)
    return {**summarize(times), "warmup": warmup, "train_step": train_step, **context}
