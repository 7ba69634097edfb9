"""Training-step cost of DDSM in a whole network, and of the training engine around it (CPU).

1. ``ddsm`` (dual, N=9) vs ``fpn`` on the same ResNet-18 at 256x512, batch 2: one training step
   (forward + cross-entropy + backward + SGD, ``ddsm.profile.timing.Step`` on random data), timed
   round-robin. Target: step time ratio ddsm / fpn <= 1.25.
2. Our engine (``ddsm.engine.train``) vs a plain PyTorch loop on the same model, data
   (the synthetic dataset at 256x512, batch 2, cached after the first epoch) and optimiser:
   throughput in steps/s from per-step timestamps, excluding the first ``--warmup`` steps and the
   engine's end-of-run checkpoint, validation and profiling. Runs alternate engine / plain loop.
   Target: engine throughput >= 0.95 x the plain loop's.

Run: ``.venv/bin/python -m benchmarks.bench_train_step [--repeats R] [--steps S] [--runs K] [--threads T]``;
prints tables and writes benchmarks/results/bench_train_step.json. Runs with OMP_WAIT_POLICY=PASSIVE
and THP_MEM_ALLOC_ENABLE=1 unless they are set (see benchmarks/_common.py for why).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks._common import (describe, interleaved_times, load_average, machine, print_table, set_threads,
                                timing_summary, use_benchmark_env, verdict, write_results)
from ddsm.config import DataConfig, ModelConfig, TrainConfig, TrialConfig
from ddsm.models import build_model, build_model_from_config
from ddsm.profile.timing import Step

SIZE, BATCH, NUM_CLASSES = (256, 512), 2, 19
DDSM_OPTIONS = dict(branches="dual", num_points=9)
STEP_RATIO_TARGET, ENGINE_TARGET = 1.25, 0.95


def model_step_times(*, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Training-step milliseconds of ddsm and fpn (ResNet-18), timed round-robin."""
    steps = {}
    for name, options in (("ddsm", DDSM_OPTIONS), ("fpn", {})):
        torch.manual_seed(0)
        model = build_model(name, num_classes=NUM_CLASSES, backbone="resnet18", **options)
        steps[name] = Step(model, (BATCH, 3, *SIZE), device="cpu", train_step=True)
    return interleaved_times(steps, repeats=repeats, warmup=warmup)


def trial_config(steps: int) -> TrialConfig:
    """ddsm (dual, N=9, ResNet-18) on synthetic 256x512 images, batch 2, CPU, a callback every step."""
    return TrialConfig(
        model=ModelConfig(name="ddsm", backbone="resnet18", **DDSM_OPTIONS),
        data=DataConfig(name="synthetic", image_size=SIZE, crop_size=SIZE, scale_range=(1.0, 1.0), batch_size=BATCH,
                        num_images=4, num_classes=NUM_CLASSES, workers=0),
        train=TrainConfig(steps=steps, device="cpu", log_every=1),
    )


def steps_per_second(stamps: list[tuple[float, float]], *, warmup: int) -> tuple[float, float]:
    """Throughput per wall second and per process-CPU second from end-of-step (wall, CPU) stamps,
    counting only the steps after the first ``warmup``."""
    counted = stamps[warmup - 1:] if warmup > 0 else stamps
    steps = len(counted) - 1
    return steps / (counted[-1][0] - counted[0][0]), steps / (counted[-1][1] - counted[0][1])


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def engine_stamps(cfg: TrialConfig) -> list[tuple[float, float]]:
    """End-of-step (wall, CPU) stamps of one ``ddsm.engine.train`` run (via its on_train_step callback)."""
    from ddsm.engine import Callback, train

    class Clock(Callback):
        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []

        def on_train_step(self, step: int, metrics: dict) -> None:
            self.stamps.append(_stamp())

    clock = Clock()
    with tempfile.TemporaryDirectory() as out_dir:
        train(cfg, out_dir=out_dir, callbacks=[clock], resume=False)
    return clock.stamps


def plain_loop_stamps(cfg: TrialConfig) -> list[tuple[float, float]]:
    """End-of-step (wall, CPU) stamps of a plain PyTorch training loop on the same model, data and optimiser."""
    from ddsm.data import build_dataset, dataset_info

    torch.manual_seed(cfg.train.seed)
    model = build_model_from_config(cfg.model, num_classes=cfg.data.num_classes).train()
    t = cfg.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    loader = DataLoader(build_dataset(cfg.data, split="train", train=True), batch_size=cfg.data.batch_size,
                        shuffle=True, drop_last=True, num_workers=cfg.data.workers)
    ignore = dataset_info(cfg.data.name, cfg.data).ignore_index
    batches = (batch for _ in range(t.steps) for batch in loader)  # re-iterate epochs
    stamps = []
    for _ in range(t.steps):
        images, labels = next(batches)
        outputs = model(images)
        loss = sum(F.cross_entropy(o, labels, ignore_index=ignore) for o in outputs.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(_stamp())
    return stamps


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run both parts, print the tables, write the JSON; returns the payload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="round-robin training steps per model (part 1)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per engine / plain-loop run (part 2)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the throughput")
    parser.add_argument("--runs", type=int, default=3, help="engine / plain-loop runs each, alternated")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    info = machine()

    print(f"[bench_train_step] part 1: ddsm vs fpn training step (load average {load_average()})", flush=True)
    times = model_step_times(repeats=args.repeats, warmup=1)
    step = {name: timing_summary(ts) for name, ts in times.items()}
    step_ratio = step["ddsm"]["median"] / step["fpn"]["median"]
    paired = statistics.median(a / b for a, b in zip(times["ddsm"], times["fpn"]))  # per round: same load

    print(f"[bench_train_step] part 2: engine vs plain loop (load average {load_average()})", flush=True)
    cfg = trial_config(args.steps)
    rates: dict[str, list[float]] = {"engine": [], "plain loop": []}
    cpu_rates: dict[str, list[float]] = {"engine": [], "plain loop": []}
    for _ in range(args.runs):
        for name, stamps in (("engine", engine_stamps), ("plain loop", plain_loop_stamps)):
            wall_rate, cpu_rate = steps_per_second(stamps(cfg), warmup=args.warmup)
            rates[name].append(wall_rate)
            cpu_rates[name].append(cpu_rate)
    engine_ratio = statistics.median(rates["engine"]) / statistics.median(rates["plain loop"])
    engine_cpu_ratio = statistics.median(cpu_rates["engine"]) / statistics.median(cpu_rates["plain loop"])

    print(f"\nTraining step, ResNet-18, {SIZE[0]}x{SIZE[1]}, batch {BATCH}, CPU; {describe(info)}; "
          f"{args.repeats} round-robin repeats")
    print_table([{"model": n, "median ms": f"{s['median']:.0f}", "IQR ms": f"{s['iqr']:.0f}"}
                 for n, s in step.items()], ["model", "median ms", "IQR ms"])
    print(f"median of the per-round ratios ddsm / fpn: {paired:.3f}")
    print(f"\nThroughput (steps/s) of ddsm training, {args.steps} steps per run, first {args.warmup} left out, "
          f"{args.runs} runs each")
    print_table([{"loop": n, "steps/s (median)": f"{statistics.median(r):.3f}",
                  "runs": ", ".join(f"{v:.3f}" for v in r),
                  "steps/CPU-s (median)": f"{statistics.median(cpu_rates[n]):.3f}"} for n, r in rates.items()],
                ["loop", "steps/s (median)", "runs", "steps/CPU-s (median)"])
    print(f"engine / plain loop per CPU second (less sensitive to other jobs): {engine_cpu_ratio:.3f}")
    tgt = [
        {"target": "ddsm / fpn training-step time", "measured": step_ratio, "target_value": STEP_RATIO_TARGET,
         "verdict": verdict(step_ratio, STEP_RATIO_TARGET, at_most=True)},
        {"target": "engine / plain-loop throughput", "measured": engine_ratio, "target_value": ENGINE_TARGET,
         "verdict": verdict(engine_ratio, ENGINE_TARGET, at_most=False)},
    ]
    print("\nTargets")
    print_table([{**t, "measured": f"{t['measured']:.3f}"} for t in tgt],
                ["target", "measured", "target_value", "verdict"])
    info["load_avg_1min_end"] = load_average()
    payload = {"benchmark": "bench_train_step", "machine": info, "size": SIZE, "batch": BATCH,
               "num_classes": NUM_CLASSES, "ddsm_options": DDSM_OPTIONS, "step_ms": step, "step_times_ms": times,
               "step_ratio_per_round_median": paired,
               "steps_per_s": rates, "steps_per_cpu_s": cpu_rates, "engine_cpu_ratio": engine_cpu_ratio,
               "steps": args.steps, "warmup": args.warmup, "targets": tgt}
    print(f"\nwrote {write_results('bench_train_step', payload)}")
    return payload


if __name__ == "__main__":
    use_benchmark_env("benchmarks.bench_train_step")
    main()
