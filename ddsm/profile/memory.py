"""Peak memory of one inference forward or one training step, labelled with how it was measured.

Both report the bytes resident across calls (parameters, buffers, optimizer state, input) plus the
peak of what one call allocates on top (activations, gradients, workspaces), measured after one
untimed call so the optimizer state exists, as in steady-state training:

- GPU (``peak_mem_kind = "cuda_max_memory_allocated"``): ``torch.cuda.max_memory_allocated`` over one
  call minus what was allocated just before it (so other tensors the process holds, e.g. the
  caller's own model, are left out), plus the resident bytes; the caching allocator's reserve is not
  counted.
- CPU (``"cpu_profiler_allocated"``): PyTorch has no CPU peak-allocation counter, so one call runs
  under ``torch.profiler`` with ``profile_memory=True``; the running sum of its allocation and free
  events gives the peak allocated during the call, plus the resident bytes. Allocations outside
  PyTorch's allocator are not seen.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import torch
import torch.nn as nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ddsm.profile.timing import Step, run_context

# Lines the CPU profiler (kineto, c10) writes straight to fd 2 on every start/stop; the last one is
# about frees of blocks allocated before the call (e.g. last step's gradients), which by design are
# not part of this call's running sum.
_PROFILER_NOISE = ("SyncActivityProfilerHandler", "gpuGetDeviceCount", "STAGE:", "CUPTI",
                   "allocated before the profiling started")


@contextlib.contextmanager
def _filtered_stderr():
    """Send fd 2 to a temp file while profiling, then re-emit every line that is not profiler noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines()
                    if ln.strip() and not any(n in ln for n in _PROFILER_NOISE)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def resident_bytes(step: Step) -> int:
    """Bytes of the tensors that live across calls: parameters, buffers, optimizer state, input."""
    tensors = [*step.model.parameters(), *step.model.buffers(), step.inputs]
    if step.optimizer is not None:
        tensors += [t for s in step.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _cpu_peak_bytes(step: Step) -> int:
    """Peak of the running sum of CPU allocations minus frees recorded while ``step`` runs once."""
    with _filtered_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    running, peak = 0, 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def step_peak_memory(step: Step) -> dict[str, float | str]:
    """Peak memory (MiB) of one more call of an already warm ``step``, and how it was measured."""
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
        torch.cuda.reset_peak_memory_stats(step.device)
        before = torch.cuda.memory_allocated(step.device)  # includes anything else the process holds
        step()
        torch.cuda.synchronize(step.device)
        peak = resident_bytes(step) + torch.cuda.max_memory_allocated(step.device) - before
        return {"peak_mem_mb": peak / 2**20, "peak_mem_kind": "cuda_max_memory_allocated"}
    peak = resident_bytes(step) + _cpu_peak_bytes(step)
    return {"peak_mem_mb": peak / 2**20, "peak_mem_kind": "cpu_profiler_allocated"}


def peak_memory(model: nn.Module, input_shape: tuple[int, ...], *, device: str | torch.device = "cpu",
                amp: str = "none", channels_last: bool = False, train_step: bool = False) -> dict[str, float | str]:
    """Peak memory (MiB) of one inference forward or training step on a copy of ``model``.

    input_shape: (B, 3, H, W). Returns {"peak_mem_mb", "peak_mem_kind"} and the run context.
    """
    step = Step(model, input_shape, device=device, amp=amp, channels_last=channels_last, train_step=train_step)
    step()  # untimed call: optimizer state, cached tables and workspaces now exist, as in steady state
    context = run_context(step.device, size=tuple(input_shape[-2:]), batch=input_shape[0], amp=amp,
                          channels_last=channels_last)
    return {**step_peak_memory(step), "train_step": train_step, **context}
