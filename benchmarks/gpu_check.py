"""One-shot check of every CUDA path, time-boxed, with one table at the end.

Run (on the first GPU machine, one command, <= 8 minutes on one GPU):

    python -m benchmarks.gpu_check --out DIR          # --device cuda is the default

and on this CPU machine (tiny sizes; ``make test`` runs it, tests/benchmarks/test_gpu_check.py):

    python -m benchmarks.gpu_check --device cpu --out DIR

Sections, in this order (the most wanted figures first, so a short budget loses the least):

- ``env``: GPU, driver, torch / CUDA / cuDNN / NCCL / Ray versions, bf16 support.
- ``models``: every registered model, forward + backward at 1024x2048, batch 1, bf16 autocast,
  channels_last (time, peak ``max_memory_allocated``, finite loss and gradients). BatchNorm runs
  with its running statistics: one image cannot normalise the 1x1 pooled maps of PPM/ASPP heads.
  (CPU mode: 32x64, float32 except ddsm, since bf16 convolutions are 10-20x slower on this CPU.)
- ``sampling``: DDSM's gather path against its grid_sample reference on this device (outputs and
  all four gradients equal to tolerance, time of each), then the DDSM dual module with each one
  chosen through ``DDSM_SAMPLING_IMPL`` (the mechanism the model uses); says which to set if the
  gather path loses here.
- ``train``: ``ddsm-bench train``, 20 steps, bf16 AMP, channels_last, synthetic 512x1024.
- ``profile``: ``ddsm-bench profile`` of ddsm at 1024x2048 on this device (CUDA events, memory).
- ``ddp``: ``ddsm-bench run`` of a 1-worker Ray Train DDP trial (``resources.ddp: true``): NCCL and
  SyncBatchNorm on a GPU, gloo and BatchNorm on CPU; checked in the cell's metrics.json.
- ``syncs``: host syncs of 10 engine training steps (``torch.cuda.set_sync_debug_mode``; GPU only).
- ``bench_train_step`` and ``bench_modules`` at GPU sizes (their own JSON goes to DIR too).

Each section runs in its own process with its own time limit (what is left of ``--budget`` caps
it), so a crash, an out-of-memory or a hang is one FAIL / TIMEOUT row and the next section still
runs; sections that no longer fit are listed as skipped. The table is printed and written to
``DIR/gpu_check.md`` (with the card and versions), rows to ``DIR/gpu_check.json``, each section's
output to ``DIR/logs/<section>.log``. Exit code 0 when no row failed, 1 otherwise.

Test hook: ``GPU_CHECK_FAIL=<section>`` makes that section raise at its start.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
FAIL_ENV = "GPU_CHECK_FAIL"
COLUMNS = ["section", "check", "status", "time", "memory", "result"]


@dataclass
class Context:
    """What every section reads: the device, its sizes, where to write, how to reach Ray."""

    device: str  # "cuda" or "cpu"
    out: Path
    backbone: str = "resnet18"
    ray_address: str | None = None

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def size(self, gpu: tuple[int, int], cpu: tuple[int, int]) -> tuple[int, int]:
        """The GPU size on CUDA, the tiny one on CPU."""
        return gpu if self.gpu else cpu


def row(section: str, check: str, status: str, *, time_ms: float | None = None, memory_mib: float | None = None,
        result: str = "") -> dict[str, Any]:
    """One table row; status is ok, FAIL, TIMEOUT, ACTION (works, but a setting should change), n/a or skipped."""
    return {"section": section, "check": check, "status": status, "time_ms": time_ms, "memory_mib": memory_mib,
            "result": result}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


# ============================================================================ sections (each in its own process)


def section_env(ctx: Context) -> list[dict[str, Any]]:
    """Card, driver and software versions."""
    import torch

    rows = [row("env", "torch", "ok", result=f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                f"Python {sys.version.split()[0]}")]
    try:
        import ray

        rows.append(row("env", "ray", "ok", result=f"ray {ray.__version__}"))
    except ImportError as e:
        rows.append(row("env", "ray", "FAIL", result=_error(e)))
    if not ctx.gpu:
        rows.append(row("env", "device", "ok", result=f"cpu, {os.cpu_count()} cores, {torch.get_num_threads()} threads"))
        return rows
    if not torch.cuda.is_available():
        return rows + [row("env", "device", "FAIL", result="torch.cuda.is_available() is False")]
    props = torch.cuda.get_device_properties(0)
    smi = shutil.which("nvidia-smi")
    driver = (subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip() if smi else "nvidia-smi not found")
    rows.append(row("env", "device", "ok", memory_mib=props.total_memory / 2**20,
                    result=f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                           f"driver {driver}, {torch.cuda.device_count()} GPU(s)"))
    nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else "absent"
    nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    rows.append(row("env", "libraries", "ok", result=f"cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}, "
                    f"bf16 supported: {torch.cuda.is_bf16_supported()}"))
    return rows


def _fwd_bwd(model: Any, x: Any, *, amp: bool) -> Callable[[], Any]:
    """A zero-argument forward + cross-entropy (every output, float32) + backward; returns the loss."""
    import torch
    import torch.nn.functional as F

    targets: list[torch.Tensor] = []

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        logits = list(out.values()) if isinstance(out, dict) else [out]
        if not targets:
            g = torch.Generator().manual_seed(0)
            B, K, H, W = logits[0].shape
            targets.append(torch.randint(K, (B, H, W), generator=g).to(x.device))
        loss = sum(F.cross_entropy(z.float(), targets[0]) for z in logits)
        loss.backward()
        return loss.detach()

    return step


def _peak_mib(fn: Callable[[], Any], device: Any) -> float | None:
    """Peak ``max_memory_allocated`` (MiB, everything the process holds) during one call; None on CPU."""
    import torch

    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def section_models(ctx: Context) -> list[dict[str, Any]]:
    """Every registered model: fwd+bwd, batch 1, bf16 autocast, channels_last, frozen BN statistics."""
    import torch
    import torch.nn as nn

    from ddsm.models import build_model, list_models
    from ddsm.profile.timing import summarize, time_calls

    device = torch.device(ctx.device)
    H, W = ctx.size((1024, 2048), (32, 64))
    repeats, warmup = (3, 2) if ctx.gpu else (1, 0)
    rows = []
    for name in list_models():
        amp = ctx.gpu or name == "ddsm"  # CPU bf16 convolutions are 10-20x slower: the CPU mode keeps one
        check = f"{name} fwd+bwd {H}x{W} b1 {'bf16' if amp else 'fp32'} CL"
        try:
            torch.manual_seed(0)
            model = build_model(name, num_classes=19, backbone=ctx.backbone).to(device)
            model = model.to(memory_format=torch.channels_last).train()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()  # running statistics: batch 1 cannot normalise a 1x1 pooled map
            x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0)).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            step = _fwd_bwd(model, x, amp=amp)
            ms = summarize(time_calls(step, device=device, repeats=repeats, warmup=warmup))["median"]
            losses: list[torch.Tensor] = []
            peak = _peak_mib(lambda: losses.append(step()), device)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_ok = bool(torch.stack([g.float().norm() for g in grads]).isfinite().all())
            loss = float(losses[-1])
            ok = loss == loss and abs(loss) != float("inf") and grad_ok
            rows.append(row("models", check, "ok" if ok else "FAIL", time_ms=ms, memory_mib=peak,
                            result=f"loss {loss:.3f}, grads {'finite' if grad_ok else 'NOT finite'}"))
            print(f"{check}: {ms:.1f} ms", flush=True)
        except Exception as e:  # one model's failure (e.g. OOM) is its row; the others still run
            traceback.print_exc()  # into the section's log
            rows.append(row("models", check, "FAIL", result=_error(e)))
        finally:
            model = x = step = None  # noqa: F841 - free the GPU memory before the next model
            if ctx.gpu:
                torch.cuda.empty_cache()
    return rows


def section_sampling(ctx: Context) -> list[dict[str, Any]]:
    """gather vs grid_sample on this device: equal to tolerance, time of each; the model-level choice."""
    import torch

    from benchmarks._common import environ
    from ddsm.models import sampling
    from ddsm.models.ddsm import DDSM
    from ddsm.profile.timing import summarize, time_calls

    device = torch.device(ctx.device)
    C = 256 if ctx.gpu else 16  # a DDSM fusion at 1/4 of 1024x2048 on a GPU
    H, W = ctx.size((256, 512), (16, 24))
    B, N = 1, 9
    repeats, warmup = (5, 2) if ctx.gpu else (2, 1)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device)  # noqa: E731
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    base = [cl(rand(B, C, H, W)), cl(rand(B, C, H, W)), cl(rand(B, C, H, W)), rand(B, 2 * N, H, W, s=2.0)]
    upstream = rand(B, C, H, W)
    rows, results, times, steps = [], {}, {}, {}
    for impl in sampling.IMPLS:
        inputs = [t.clone().requires_grad_() for t in base]

        def step(inputs=inputs, impl=impl):  # noqa: ANN001, ANN202
            out = sampling.dynamic_affinity(*inputs, num_points=N, impl=impl)
            return out, torch.autograd.grad((out * upstream).sum(), inputs)

        steps[impl] = step
        results[impl] = step()  # both warm before either is timed
    for impl, step in steps.items():
        times[impl] = summarize(time_calls(step, device=device, repeats=repeats, warmup=warmup))["median"]
        rows.append(row("sampling", f"dynamic_affinity {impl} fwd+bwd C={C} {H}x{W} N={N}", "ok",
                        time_ms=times[impl]))
    names = ["output", "d query", "d key", "d value", "d offsets"]
    fast, ref = [results["gather"][0], *results["gather"][1]], [results["grid_sample"][0], *results["grid_sample"][1]]
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(fast, ref))
    bad = [n for n, a, b in zip(names, fast, ref) if not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))]
    rows.append(row("sampling", "gather == grid_sample (output, 4 gradients)", "FAIL" if bad else "ok",
                    result=f"max |diff| / max |ref| = {worst:.1e}" + (f"; differ: {', '.join(bad)}" if bad else "")))

    # the model-level choice: DDSM dual, with the implementation picked per device by DDSM_SAMPLING_IMPL
    torch.manual_seed(0)
    block = DDSM(C, branches="dual", num_points=N).to(device)
    x_l, x_h = cl(rand(B, C, H, W)).requires_grad_(), cl(rand(B, C, H // 2, W // 2)).requires_grad_()
    module_ms, outs = {}, {}
    step = lambda: block(x_l, x_h).backward(upstream)  # noqa: E731
    for impl in sampling.IMPLS:  # warm both first
        with environ(sampling.IMPL_ENV, f"{device.type}={impl}"):
            step()
    for impl in sampling.IMPLS:
        with environ(sampling.IMPL_ENV, f"{device.type}={impl}"):  # the caller's value comes back after
            assert sampling.default_impl(device) == impl
            module_ms[impl] = summarize(time_calls(step, device=device, repeats=repeats, warmup=warmup))["median"]
            with torch.no_grad():
                outs[impl] = block(x_l, x_h)
        rows.append(row("sampling", f"DDSM dual module fwd+bwd, {sampling.IMPL_ENV}={device.type}={impl}", "ok",
                        time_ms=module_ms[impl]))
    same = torch.allclose(outs["gather"], outs["grid_sample"], rtol=1e-3, atol=1e-4 * float(outs["grid_sample"].abs().max()))
    faster = min(module_ms, key=module_ms.get)
    current = sampling.DEFAULT_IMPLS.get(device.type, "gather")
    speedup = max(module_ms.values()) / min(module_ms.values())
    if not same:
        status, text = "FAIL", "the module's outputs differ between the two implementations"
    elif not ctx.gpu:
        status, text = "ok", f"{faster} faster at these tiny CPU sizes ({speedup:.2f}x): no basis for a choice"
    elif faster == current:
        status, text = "ok", f"keep {current} on {device.type} ({speedup:.2f}x faster than the other)"
    else:
        status, text = "ACTION", (f"{faster} is {speedup:.2f}x faster on {device.type}: set DEFAULT_IMPLS[{device.type!r}] "
                                  f"= {faster!r} in ddsm/models/sampling.py (or {sampling.IMPL_ENV}={device.type}={faster})")
    rows.append(row("sampling", f"choice on {device.type} (default {current})", status, result=text))
    _write_json(ctx.out / "sampling_choice.json", {"device": device.type, "recommended_impl": faster,
                                                   "module_ms": module_ms, "affinity_ms": times})
    return rows


def section_train(ctx: Context) -> list[dict[str, Any]]:
    """``ddsm-bench train``: 20 steps with bf16 AMP and channels_last; checks metrics.json and log.jsonl."""
    H, W = ctx.size((512, 1024), (32, 64))
    out = ctx.out / "train"
    sets = {"model.name": "ddsm", "model.backbone": ctx.backbone, "data.name": "synthetic",
            "data.image_size": f"[{H},{W}]", "data.crop_size": f"[{H},{W}]", "data.num_images": 8,
            "data.batch_size": 2, "data.workers": 4 if ctx.gpu else 0, "train.steps": 20, "train.log_every": 5,
            "train.device": ctx.device, "train.amp": "bf16", "train.channels_last": "true", "eval.max_images": 2}
    args = ["train", "--out", str(out), "--no-resume", "--json", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    t0 = time.perf_counter()
    proc = _cli(args, log=ctx.out / "logs" / "train.cli.log")
    wall = (time.perf_counter() - t0) * 1e3
    if proc.returncode != 0:
        return [row("train", "ddsm-bench train 20 steps bf16", "FAIL", time_ms=wall, result=_last_line(proc))]
    m = json.loads((out / "metrics.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if json.loads(line).get("event") == "train"]
    want_dtype = "bfloat16" if ctx.gpu else "float32"  # the engine ignores AMP on CPU
    problems = [p for p, bad in [
        (f"step {m.get('step')} != 20", m.get("step") != 20),
        (f"amp_dtype {m.get('amp_dtype')} != {want_dtype}", m.get("amp_dtype") != want_dtype),
        (f"device {m.get('device')}", not str(m.get("device", "")).startswith(ctx.device)),
        ("a logged loss is not finite", not losses or any(v is None or v != v for v in losses)),
    ] if bad]
    return [row("train", "ddsm-bench train 20 steps bf16 CL", "FAIL" if problems else "ok", time_ms=wall,
                memory_mib=m.get("train_peak_mem_mb"),
                result="; ".join(problems) or (f"{m['train_time_s']:.1f} s training, loss {losses[0]:.3f} -> "
                                               f"{losses[-1]:.3f}, miou {m.get('miou', float('nan')):.3f}"))]


def section_profile(ctx: Context) -> list[dict[str, Any]]:
    """``ddsm-bench profile`` on this device: CUDA-event latency, train step, peak memory, FLOPs."""
    H, W = ctx.size((1024, 2048), (64, 128))
    args = ["profile", "--model", "ddsm", "--backbone", ctx.backbone, "--device", ctx.device, "--size", f"{H}x{W}",
            "--batch", "1", "--amp", "bf16" if ctx.gpu else "none", "--channels-last", "--json",
            *(["--repeats", "5", "--warmup", "2"] if ctx.gpu else ["--repeats", "1", "--warmup", "0"])]
    t0 = time.perf_counter()
    proc = _cli(args, log=ctx.out / "logs" / "profile.cli.log")
    wall = (time.perf_counter() - t0) * 1e3
    if proc.returncode != 0:
        return [row("profile", f"ddsm-bench profile ddsm {H}x{W}", "FAIL", time_ms=wall, result=_last_line(proc))]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    kind = "cuda_max_memory_allocated" if ctx.gpu else "cpu_profiler_allocated"
    ok = r.get("device_type") == ctx.device and r.get("peak_mem_kind") == kind
    return [
        row("profile", f"ddsm-bench profile ddsm {H}x{W} b1 latency", "ok" if ok else "FAIL",
            time_ms=r["latency_ms"]["median"], memory_mib=r.get("peak_mem_mb"),
            result=f"{r['gflops']:.1f} GFLOPs, {r['params_m']:.2f} M params, {r['device']}, memory by {r.get('peak_mem_kind')}"),
        row("profile", f"ddsm-bench profile ddsm {H}x{W} b2 train step", "ok" if ok else "FAIL",
            time_ms=(r.get("train_step_ms") or {}).get("median"), memory_mib=r.get("train_peak_mem_mb"),
            result=f"whole command {wall / 1e3:.1f} s"),
    ]


DDP_SPEC = """\
# written by benchmarks/gpu_check.py: one 1-worker Ray Train DDP trial
name: gpu-check-ddp
baseline: ddsm
base:
  model: {{name: ddsm, backbone: {backbone}, weights: null}}
  data: {{name: synthetic, image_size: [{h}, {w}], crop_size: [{h}, {w}], num_images: 8, batch_size: 2, workers: 0}}
  train: {{steps: {steps}, log_every: {steps}, device: {device}, amp: bf16, channels_last: true}}
  eval: {{max_images: 1, tolerances: [2]}}
baselines: [{{name: ddsm, overrides: {{}}}}]
seeds: [0]
resources: {{cpus: {cpus}, gpus: {gpus}, num_workers: 1, ddp: true}}
max_failures: 0
cost: {{enabled: false}}  # this section checks DDP; the profile section checks the cost protocol
"""


def section_ddp(ctx: Context) -> list[dict[str, Any]]:
    """``ddsm-bench run`` of a 1-worker Ray Train DDP trial; checks backend and SyncBN in metrics.json."""
    H, W = ctx.size((256, 512), (32, 64))
    folder = ctx.out / "ddp"
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.yaml"
    steps = 10 if ctx.gpu else 4
    spec.write_text(DDP_SPEC.format(backbone=ctx.backbone, h=H, w=W, steps=steps, device=ctx.device,
                                    cpus=4 if ctx.gpu else 1, gpus=1 if ctx.gpu else 0))
    run_dir = folder / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["run", str(spec), "--out", str(run_dir), "--max-concurrent", "1",
            *(["--address", ctx.ray_address] if ctx.ray_address else [])]
    t0 = time.perf_counter()
    proc = _cli(args, log=ctx.out / "logs" / "ddp.cli.log")
    wall = (time.perf_counter() - t0) * 1e3
    check = "ddsm-bench run, Ray Train DDP, 1 worker"
    metrics = sorted(run_dir.glob("cells/*/metrics.json"))
    if proc.returncode != 0 or not metrics:
        logs = sorted(run_dir.glob("cells/*/train*.log"))
        tail = logs[0].read_text().strip().splitlines()[-1:] if logs else []
        return [row("ddp", check, "FAIL", time_ms=wall, result=(tail[0] if tail else _last_line(proc))[:200])]
    m = json.loads(metrics[0].read_text())
    backend, sync_bn = ("nccl", True) if ctx.gpu else ("gloo", False)
    problems = [p for p, bad in [
        (f"dist_backend {m.get('dist_backend')} != {backend}", m.get("dist_backend") != backend),
        (f"sync_batchnorm {m.get('sync_batchnorm')} != {sync_bn}", m.get("sync_batchnorm") != sync_bn),
        (f"world_size {m.get('world_size')} != 1", m.get("world_size") != 1),
        (f"step {m.get('step')} != {steps}", m.get("step") != steps),
        ("no Ray Train run folder", not list(run_dir.glob("cells/*/ray_train"))),
    ] if bad]
    return [row("ddp", check + (" NCCL + SyncBN" if ctx.gpu else " gloo"), "FAIL" if problems else "ok",
                time_ms=wall, result="; ".join(problems) or
                f"{m['dist_backend']}, SyncBN {m['sync_batchnorm']}, miou {m.get('miou', float('nan')):.3f}, "
                f"{m['train_time_s']:.1f} s training of {wall / 1e3:.0f} s")]


def section_syncs(ctx: Context) -> list[dict[str, Any]]:
    """Host syncs during 10 engine training steps (loss read back once, at step 10), GPU only."""
    if not ctx.gpu:
        return [row("syncs", "host syncs in 10 engine steps", "n/a", result="CUDA only (set_sync_debug_mode)")]
    import tempfile
    import warnings

    import torch

    from ddsm.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig
    from ddsm.engine import Callback, train

    class Window(Callback):
        """Syncs are recorded from after the step-0 checkpoint up to the first log (step 10)."""

        def __init__(self, records: list) -> None:
            self.records, self.span = records, [0, 0]

        def on_checkpoint(self, step: int, path: Path) -> None:
            if step == 0:
                self.span[0] = len(self.records)
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_step(self, step: int, metrics: dict) -> None:
            torch.cuda.set_sync_debug_mode(0)
            self.span[1] = len(self.records)

    cfg = TrialConfig(model=ModelConfig(name="ddsm", backbone=ctx.backbone),
                      data=DataConfig(name="synthetic", image_size=(256, 512), crop_size=(256, 512), batch_size=2,
                                      num_images=4, num_classes=19, workers=0),
                      train=TrainConfig(steps=10, log_every=10, device="cuda", amp="bf16", channels_last=True),
                      eval=EvalConfig(max_images=1, tolerances=[2.0]))
    with warnings.catch_warnings(record=True) as records, tempfile.TemporaryDirectory() as d:
        warnings.simplefilter("always")
        window = Window(records)
        try:
            train(cfg, out_dir=d, callbacks=[window], resume=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in records[window.span[0]:window.span[1]] if "synchroniz" in str(w.message)]
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    text = f"{len(syncs)} syncs" + (": " + ", ".join(f"{k} x{n}" for k, n in sorted(where.items(), key=lambda kv: -kv[1])[:4])
                                    if where else "")
    return [row("syncs", "host syncs in 10 engine steps (1 read-back)", "ok" if len(syncs) <= 3 else "ACTION",
                result=text)]


def section_bench_train_step(ctx: Context) -> list[dict[str, Any]]:
    """``benchmarks.bench_train_step`` (ddsm/fpn step ratio, engine/plain-loop throughput) at GPU sizes."""
    args = (["--device", "cuda", "--size", "512x1024", "--batch", "4", "--amp", "bf16", "--channels-last", "--steps", "25",
             "--warmup", "5", "--log-every", "5", "--workers", "4", "--repeats", "10", "--runs", "2"] if ctx.gpu else
            ["--device", "cpu", "--size", "32x64", "--batch", "2", "--steps", "3", "--warmup", "1", "--repeats", "1",
             "--runs", "1", "--part1-policies", "default"])  # both policies: tests/benchmarks/test_bench_train_step.py
    return _bench("bench_train_step", args, ctx)


def section_bench_modules(ctx: Context) -> list[dict[str, Any]]:
    """``benchmarks.bench_modules`` (DDSM vs non-local time, memory, growth) at GPU sizes."""
    args = (["--device", "cuda", "--sizes", "64x128,128x256,256x512", "--repeats", "5"] if ctx.gpu else
            ["--device", "cpu", "--sizes", "16x32", "--repeats", "1"])
    return _bench("bench_modules", args, ctx)


def _bench(name: str, args: list[str], ctx: Context) -> list[dict[str, Any]]:
    """Run ``python -m benchmarks.<name> ARGS --out DIR``; one row per target it reports."""
    import importlib

    t0 = time.perf_counter()
    proc = _in_process(importlib.import_module(f"benchmarks.{name}").main, [*args, "--out", str(ctx.out)],
                       log=ctx.out / "logs" / f"{name}.cli.log")
    wall = (time.perf_counter() - t0) * 1e3
    if proc.returncode != 0:
        return [row(name, " ".join(args[:4]), "FAIL", time_ms=wall, result=_last_line(proc))]
    payload = json.loads((ctx.out / f"{name}.json").read_text())
    rows = []
    for t in payload["targets"]:
        measured = t["measured"]
        value = "n/a (size not run)" if measured is None or measured != measured else f"{measured:.3f}"
        rows.append(row(name, t["target"], "ok", result=f"{value} (target {t['target_value']}: {t['verdict']})"))
    rows[0]["time_ms"] = wall
    return rows


SECTIONS: dict[str, tuple[Callable[[Context], list[dict[str, Any]]], float]] = {
    # name: (function, time limit on CUDA in s); on CPU every section may take CPU_LIMIT_S (a shared,
    # loaded 2-core machine makes CPU times unpredictable, and the CPU mode checks paths, not speed)
    "env": (section_env, 60),
    "models": (section_models, 120),
    "sampling": (section_sampling, 45),
    "train": (section_train, 90),
    "profile": (section_profile, 60),
    "ddp": (section_ddp, 120),
    "syncs": (section_syncs, 45),
    "bench_train_step": (section_bench_train_step, 120),
    "bench_modules": (section_bench_modules, 75),
}
CPU_LIMIT_S, BUDGET_S = 300.0, {"cuda": 480.0, "cpu": 1800.0}


# ============================================================================ subprocess helpers


def _cli(args: list[str], *, log: Path) -> subprocess.CompletedProcess:
    """``ddsm-bench ARGS`` (``harness.cli.main``, in this section's process), its output in ``log``."""
    from harness.cli import main

    return _in_process(main, args, log=log)


def _in_process(entry: Callable[[list[str]], Any], args: list[str], *, log: Path) -> subprocess.CompletedProcess:
    """Call ``entry(args)`` (a CLI or benchmark ``main``) with stdout captured and stderr streamed to ``log``.

    In the section's own process, so it is as isolated as the section (and saves a Python start).
    An int result is the exit code; anything else (a benchmark's payload) means 0.
    """
    import contextlib
    import io

    log.parent.mkdir(parents=True, exist_ok=True)
    stdout = io.StringIO()
    with log.open("w") as err, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
        print(f"$ {getattr(entry, '__module__', '')} {' '.join(args)}", file=err, flush=True)
        try:
            result = entry(args)
            rc = result if isinstance(result, int) else 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - reported as this check's failure
            traceback.print_exc(file=err)
            rc = 1
    log.write_text(log.read_text() + f"\n--- stdout\n{stdout.getvalue()}\n--- rc {rc}\n")
    return subprocess.CompletedProcess(args, rc, stdout.getvalue(), log.read_text())


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    return f"rc {proc.returncode}: {lines[-1].strip() if lines else 'no output'}"[:200]


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def run_section(name: str, ctx: Context) -> int:
    """Child process: run one section, write its rows to ``<out>/sections/<name>.json``; 0 on success."""
    fn = SECTIONS[name][0]
    try:
        if os.environ.get(FAIL_ENV) == name:
            raise RuntimeError(f"injected failure ({FAIL_ENV}={name})")
        rows = fn(ctx)
    except Exception as e:  # the whole section failed before producing rows
        traceback.print_exc()
        rows = [row(name, "section", "FAIL", result=_error(e))]
    _write_json(ctx.out / "sections" / f"{name}.json", rows)
    return 0


# ============================================================================ driver


def run_all(ctx: Context, *, names: list[str], budget_s: float, limits: dict[str, float]) -> list[dict[str, Any]]:
    """Run the sections in order, each in a child process limited to min(its limit, budget left)."""
    from benchmarks._common import BENCHMARK_ENV

    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in names:
        limit = limits.get(name, SECTIONS[name][1] if ctx.gpu else CPU_LIMIT_S)
        left = budget_s - (time.perf_counter() - start)
        if left < min(limit, 10):
            rows.append(row(name, "section", "skipped", result=f"time budget: {max(left, 0):.0f} s left of {budget_s:.0f}"))
            continue
        timeout = min(limit, left)
        print(f"[gpu_check] {name} (limit {timeout:.0f} s)", flush=True)
        result = ctx.out / "sections" / f"{name}.json"
        result.unlink(missing_ok=True)
        log = ctx.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--section", name, "--device", ctx.device,
               "--out", str(ctx.out), "--backbone", ctx.backbone,
               *(["--ray-address", ctx.ray_address] if ctx.ray_address else [])]
        t0, cpu0 = time.perf_counter(), _children_cpu_s()
        # what the benchmark scripts re-execute themselves with (benchmarks/_common.py), set for every section
        env = {**BENCHMARK_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the section and everything it started (CLI, Ray)
                proc.wait()
                timed_out = True
        took = time.perf_counter() - t0
        if timed_out:
            rows.append(row(name, "section", "TIMEOUT", time_ms=took * 1e3, result=f"killed after {timeout:.0f} s"))
        elif proc.returncode != 0 or not result.is_file():
            tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:]
            rows.append(row(name, "section", "FAIL", time_ms=took * 1e3,
                            result=f"rc {proc.returncode}: {tail[0] if tail else 'no output'}"[:200]))
        else:
            rows += json.loads(result.read_text())
        print(f"[gpu_check] {name}: {took:.0f} s ({_children_cpu_s() - cpu0:.0f} CPU s)", flush=True)
    return rows


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes so far (Ray's own processes not included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v / 1e3:.1f} s" if v >= 10_000 else f"{v:.1f} ms"


def render(rows: list[dict[str, Any]], *, markdown: bool) -> str:
    """The table as aligned text or Markdown."""
    cells = [[r["section"], r["check"], r["status"], _fmt_ms(r["time_ms"]),
              "" if r["memory_mib"] is None else f"{r['memory_mib']:.0f} MiB", r["result"]] for r in rows]
    if markdown:
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(esc(c) for c in cs) + " |" for cs in cells])
    widths = [max(len(c), *(len(cs[i]) for cs in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(v.ljust(w) for v, w in zip(cs, widths)) for cs in cells])


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments; run one section (``--section``, internal) or all of them and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default) or cpu (tiny sizes)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check",
                        help="folder for the table, JSON, logs and the runs (default benchmarks/results/gpu_check)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for everything (default 480 on cuda, 1800 on cpu); late sections are skipped")
    parser.add_argument("--only", default=None, help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS",
                        help="override one section's time limit (repeatable)")
    parser.add_argument("--backbone", default="resnet18", help="backbone of every model (default resnet18)")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster for the ddp section (default: start one)")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section here
    args = parser.parse_args(argv)
    ctx = Context(device=args.device, out=args.out.resolve(), backbone=args.backbone, ray_address=args.ray_address)
    if args.section:
        return run_section(args.section, ctx)
    names = args.only.split(",") if args.only else list(SECTIONS)
    limits = {}
    for item in args.limit:
        key, _, value = item.partition("=")
        limits[key] = float(value)
    unknown = [n for n in [*names, *limits] if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}: expected one of {', '.join(SECTIONS)}")
    budget = args.budget or BUDGET_S[ctx.device]
    ctx.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = run_all(ctx, names=names, budget_s=budget, limits=limits)
    total = time.perf_counter() - t0
    failed = [r for r in rows if r["status"] in ("FAIL", "TIMEOUT")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    card = next((r["result"] for r in rows if r["section"] == "env" and r["check"] == "device"), ctx.device)
    head = (f"gpu_check on {card}; {time.strftime('%Y-%m-%d %H:%M')}; {total:.0f} s of a {budget:.0f} s budget; "
            f"{len(failed)} failed, {len(skipped)} skipped")
    print(f"\n{head}\n{render(rows, markdown=False)}")
    command = "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    (ctx.out / "gpu_check.md").write_text(f"{head}\n\n`{command}`\n\n{render(rows, markdown=True)}\n")
    _write_json(ctx.out / "gpu_check.json", {"device": ctx.device, "card": card, "total_s": total, "budget_s": budget,
                                             "rows": rows})
    print(f"\nwrote {ctx.out / 'gpu_check.md'} and gpu_check.json; logs in {ctx.out / 'logs'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
