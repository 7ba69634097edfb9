"""Training-step cost of DDSM in a whole network, and of the training engine around it (CPU).

1. ``ddsm`` (dual, N=9) vs ``fpn`` on the same ResNet-18 at 256x512, batch 2: one training step
   (forward + cross-entropy + backward + SGD, ``ddsm.profile.timing.Step`` on random data), timed
   round-robin. Target: step time ratio ddsm / fpn <= 1.25.
2. Our engine (``ddsm.engine.train``) vs a plain PyTorch loop on the same model, data
   (the synthetic dataset at 256x512, batch 2, cached after the first epoch) and optimiser:
   throughput in steps/s from timestamps taken every ``--log-every`` steps (where both loops read
   their loss back to the host, as a loop that logs does), excluding the first ``--warmup`` steps
   and the engine's end-of-run checkpoint, validation and profiling. Runs alternate engine / plain
   loop. Target: engine throughput >= 0.95 x the plain loop's (goal 0.98).

Run: ``.venv/bin/python -m benchmarks.bench_train_step [--repeats R] [--steps S] [--runs K] [--threads T]``;
prints tables and writes benchmarks/results/bench_train_step.json (``--out`` elsewhere). Runs with
OMP_WAIT_POLICY=PASSIVE and THP_MEM_ALLOC_ENABLE=1 unless they are set (see benchmarks/_common.py).
On a GPU (what ``benchmarks/gpu_check.py`` runs): ``--device cuda --size 512x1024 --batch 4
--amp bf16 --channels-last --steps 25 --warmup 5 --log-every 5 --workers 4``; every timed call is
then synchronised, and the loss is read back only every ``--log-every`` steps in both loops.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks._common import (describe, interleaved_times, load_average, machine, parse_size, print_table,
                                set_threads, timing_summary, use_benchmark_env, verdict, write_results)
from ddsm.config import DataConfig, ModelConfig, TrainConfig, TrialConfig
from ddsm.models import build_model, build_model_from_config
from ddsm.profile.timing import Step

SIZE, BATCH, NUM_CLASSES = (256, 512), 2, 19
DDSM_OPTIONS = dict(branches="dual", num_points=9)
STEP_RATIO_TARGET, ENGINE_TARGET, ENGINE_GOAL = 1.25, 0.95, 0.98
Stamp = tuple[int, float, float]  # (step, wall s, process CPU s) after that step's loss was read back


def model_step_times(*, repeats: int, warmup: int, size: tuple[int, int] = SIZE, batch: int = BATCH,
                     device: str = "cpu", amp: str = "none", channels_last: bool = False) -> dict[str, list[float]]:
    """Training-step milliseconds of ddsm and fpn (ResNet-18), timed round-robin (synchronised on a GPU)."""
    steps = {}
    for name, options in (("ddsm", DDSM_OPTIONS), ("fpn", {})):
        torch.manual_seed(0)
        model = build_model(name, num_classes=NUM_CLASSES, backbone="resnet18", **options)
        step = Step(model, (batch, 3, *size), device=device, amp=amp, channels_last=channels_last, train_step=True)
        steps[name] = _synchronised(step, step.device)
    return interleaved_times(steps, repeats=repeats, warmup=warmup)


def _synchronised(fn, device: torch.device):  # noqa: ANN001, ANN202 - a zero-argument callable
    """``fn`` followed by a CUDA synchronise on a GPU, so that wall clocks see the work (as is on CPU)."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call


def trial_config(steps: int, *, size: tuple[int, int] = SIZE, batch: int = BATCH, device: str = "cpu",
                 amp: str = "none", channels_last: bool = False, log_every: int = 1, workers: int = 0) -> TrialConfig:
    """ddsm (dual, N=9, ResNet-18) on synthetic images (default 256x512, batch 2, CPU, a log every step)."""
    return TrialConfig(
        model=ModelConfig(name="ddsm", backbone="resnet18", **DDSM_OPTIONS),
        data=DataConfig(name="synthetic", image_size=size, crop_size=size, scale_range=(1.0, 1.0), batch_size=batch,
                        num_images=4, num_classes=NUM_CLASSES, workers=workers),
        train=TrainConfig(steps=steps, device=device, amp=amp, channels_last=channels_last, log_every=log_every),
    )


def steps_per_second(stamps: list[Stamp], *, warmup: int) -> tuple[float, float]:
    """Throughput per wall second and per process-CPU second between the stamp at step ``warmup``
    (the start of the timed window; 0 = the first stamp) and the last one."""
    counted = [s for s in stamps if s[0] >= warmup]
    (s0, w0, c0), (s1, w1, c1) = counted[0], counted[-1]
    return (s1 - s0) / (w1 - w0), (s1 - s0) / (c1 - c0)


def _stamp(step: int) -> Stamp:
    return step, time.perf_counter(), time.process_time()


def engine_stamps(cfg: TrialConfig) -> list[Stamp]:
    """(step, wall, CPU) stamps of one ``ddsm.engine.train`` run at every log (its on_train_step callback,
    called right after the engine read the losses back)."""
    from ddsm.engine import Callback, train

    class Clock(Callback):
        def __init__(self) -> None:
            self.stamps: list[Stamp] = []

        def on_train_step(self, step: int, metrics: dict) -> None:
            self.stamps.append(_stamp(step))

    clock = Clock()
    with tempfile.TemporaryDirectory() as out_dir:
        train(cfg, out_dir=out_dir, callbacks=[clock], resume=False)
    return clock.stamps


def plain_loop_stamps(cfg: TrialConfig) -> list[Stamp]:
    """(step, wall, CPU) stamps of a plain PyTorch training loop on the same model, data, optimiser, AMP
    dtype and memory format, taken every ``train.log_every`` steps after reading the loss back."""
    from ddsm.data import build_dataset, dataset_info
    from ddsm.engine import amp_dtype, resolve_device

    t = cfg.train
    device = resolve_device(t.device)
    dtype = amp_dtype(t.amp, device)
    torch.manual_seed(t.seed)
    model = build_model_from_config(cfg.model, num_classes=cfg.data.num_classes).to(device).train()
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    loader = DataLoader(build_dataset(cfg.data, split="train", train=True), batch_size=cfg.data.batch_size,
                        shuffle=True, drop_last=True, num_workers=cfg.data.workers, pin_memory=device.type == "cuda")
    ignore = dataset_info(cfg.data.name, cfg.data).ignore_index
    batches = (batch for _ in range(t.steps) for batch in loader)  # re-iterate epochs
    stamps = []
    for step in range(1, t.steps + 1):
        images, labels = next(batches)
        images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = model(images)
        loss = sum(F.cross_entropy(o.float(), labels, ignore_index=ignore) for o in outputs.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % t.log_every == 0 or step == t.steps:
            loss.item()  # what a loop that logs its loss does (the host waits for the GPU here)
            stamps.append(_stamp(step))
    return stamps


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run both parts, print the tables, write the JSON; returns the payload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="round-robin training steps per model (part 1)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per engine / plain-loop run (part 2)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the throughput")
    parser.add_argument("--runs", type=int, default=3, help="engine / plain-loop runs each, alternated")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument("--size", default=f"{SIZE[0]}x{SIZE[1]}", help=f"input HxW (default {SIZE[0]}x{SIZE[1]})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch (default {BATCH})")
    parser.add_argument("--amp", default="none", help="none | bf16 | fp16 (CUDA only; default none)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs (both parts)")
    parser.add_argument("--log-every", type=int, default=1,
                        help="part 2: read the loss back (and stamp the time) every N steps; divides --warmup and --steps")
    parser.add_argument("--workers", type=int, default=0, help="part 2: DataLoader workers (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.warmup % args.log_every or args.steps % args.log_every or args.steps <= args.warmup:
        parser.error(f"--log-every {args.log_every} must divide --warmup {args.warmup} and --steps {args.steps}, "
                     "and --steps must exceed --warmup")
    size = parse_size(args.size)
    set_threads(args.threads)
    info = machine()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    setting = dict(size=size, batch=args.batch, device=args.device, amp=args.amp, channels_last=args.channels_last)

    print(f"[bench_train_step] part 1: ddsm vs fpn training step (load average {load_average()})", flush=True)
    times = model_step_times(repeats=args.repeats, warmup=1, **setting)
    step = {name: timing_summary(ts) for name, ts in times.items()}
    step_ratio = step["ddsm"]["median"] / step["fpn"]["median"]
    paired = statistics.median(a / b for a, b in zip(times["ddsm"], times["fpn"]))  # per round: same load

    print(f"[bench_train_step] part 2: engine vs plain loop (load average {load_average()})", flush=True)
    cfg = trial_config(args.steps, log_every=args.log_every, workers=args.workers, **setting)
    rates: dict[str, list[float]] = {"engine": [], "plain loop": []}
    cpu_rates: dict[str, list[float]] = {"engine": [], "plain loop": []}
    for _ in range(args.runs):
        for name, stamps in (("engine", engine_stamps), ("plain loop", plain_loop_stamps)):
            wall_rate, cpu_rate = steps_per_second(stamps(cfg), warmup=args.warmup)
            rates[name].append(wall_rate)
            cpu_rates[name].append(cpu_rate)
    engine_ratio = statistics.median(rates["engine"]) / statistics.median(rates["plain loop"])
    engine_cpu_ratio = statistics.median(cpu_rates["engine"]) / statistics.median(cpu_rates["plain loop"])
    engine_paired = statistics.median(a / b for a, b in zip(rates["engine"], rates["plain loop"]))  # adjacent runs

    where = args.device if not args.device.startswith("cuda") else f"{args.device} ({info['gpu']})"
    flags = f", {args.amp} autocast" * (args.amp != "none") + ", channels_last" * args.channels_last
    print(f"\nTraining step, ResNet-18, {size[0]}x{size[1]}, batch {args.batch}, {where}{flags}; {describe(info)}; "
          f"{args.repeats} round-robin repeats")
    print_table([{"model": n, "median ms": f"{s['median']:.0f}", "IQR ms": f"{s['iqr']:.0f}"}
                 for n, s in step.items()], ["model", "median ms", "IQR ms"])
    print(f"median of the per-round ratios ddsm / fpn: {paired:.3f}")
    print(f"\nThroughput (steps/s) of ddsm training, {args.steps} steps per run, first {args.warmup} left out, "
          f"loss read back every {args.log_every} step(s), {args.runs} runs each")
    print_table([{"loop": n, "steps/s (median)": f"{statistics.median(r):.3f}",
                  "runs": ", ".join(f"{v:.3f}" for v in r),
                  "steps/CPU-s (median)": f"{statistics.median(cpu_rates[n]):.3f}"} for n, r in rates.items()],
                ["loop", "steps/s (median)", "runs", "steps/CPU-s (median)"])
    print(f"engine / plain loop per CPU second (less sensitive to other jobs): {engine_cpu_ratio:.3f}; "
          f"median of the ratios of adjacent runs: {engine_paired:.3f}")
    tgt = [
        {"target": "ddsm / fpn training-step time", "measured": step_ratio, "target_value": STEP_RATIO_TARGET,
         "verdict": verdict(step_ratio, STEP_RATIO_TARGET, at_most=True)},
        {"target": "engine / plain-loop throughput", "measured": engine_ratio, "target_value": ENGINE_TARGET,
         "verdict": verdict(engine_ratio, ENGINE_TARGET, at_most=False)},
        {"target": "engine / plain-loop throughput (goal)", "measured": engine_ratio, "target_value": ENGINE_GOAL,
         "verdict": verdict(engine_ratio, ENGINE_GOAL, at_most=False)},
    ]
    print("\nTargets")
    print_table([{**t, "measured": f"{t['measured']:.3f}"} for t in tgt],
                ["target", "measured", "target_value", "verdict"])
    info["load_avg_1min_end"] = load_average()
    payload = {"benchmark": "bench_train_step", "machine": info, "size": size, "batch": args.batch,
               "device": args.device, "amp": args.amp, "channels_last": args.channels_last,
               "num_classes": NUM_CLASSES, "ddsm_options": DDSM_OPTIONS, "step_ms": step, "step_times_ms": times,
               "step_ratio_per_round_median": paired, "steps_per_s": rates, "steps_per_cpu_s": cpu_rates,
               "engine_cpu_ratio": engine_cpu_ratio, "engine_paired_ratio": engine_paired, "steps": args.steps,
               "warmup": args.warmup, "log_every": args.log_every, "workers": args.workers, "targets": tgt}
    print(f"\nwrote {write_results('bench_train_step', payload, out_dir=args.out)}")
    return payload


if __name__ == "__main__":
    use_benchmark_env("benchmarks.bench_train_step")
    main()
