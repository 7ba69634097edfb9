"""Training-step cost of DDSM in a whole network, and of the training engine around it (CPU).

1. ``ddsm`` (dual, N=9) vs ``fpn`` on the same ResNet-18 at 256x512, batch 2: one training step
   (forward + cross-entropy + backward + SGD, ``ddsm.profile.timing.Step`` on random data), timed
   round-robin, ``--repeats`` (30) rounds. Target: step time ratio ddsm / fpn <= 1.25, printed with its 90%
   bootstrap interval over the rounds (``_common.ratio_interval``): on this shared 2-core VM single rounds
   range from 1.0 to 1.5, and 8 rounds left an interval of +-0.1. On CPU it runs twice, each time in a fresh
   process: with OpenMP's default wait policy (``OMP_WAIT_POLICY`` unset, as ``ddsm-bench train`` and a
   plain script run: the target is judged on this one) and with ``OMP_WAIT_POLICY=PASSIVE`` (for
   comparison: every parallel region then wakes sleeping workers, which costs DDSM's many short ops
   most; see benchmarks/_common.py). ``--part1-policies`` picks them. Both processes run on c10's default
   allocator (``THP_MEM_ALLOC_ENABLE`` unset), as training does (:data:`PART1_THP`).
2. Our engine (``ddsm.engine.train``) vs a plain PyTorch loop on the same model, data
   (the synthetic dataset at 256x512, batch 2, cached after the first epoch) and optimiser, each in
   its own process, taking turns: engine block 1, plain block 1, engine block 2, ... where a block is
   ``--log-every`` steps ending where both loops read their loss back to the host (as a loop that
   logs does). Only one computes at a time, so both see the same machine load block by block (runs
   one after the other saw +-30%). Throughput = steps / summed block time after the first
   ``--warmup`` steps; the engine's end-of-run checkpoint, validation and profiling are outside.
   Target: engine throughput >= 0.95 x the plain loop's (goal 0.98).

Run: ``.venv/bin/python -m benchmarks.bench_train_step [--repeats R] [--steps S] [--runs K] [--threads T]``;
prints tables and writes benchmarks/results/bench_train_step.json (``--out`` elsewhere). Part 2 runs with
THP_MEM_ALLOC_ENABLE=1 and OMP_WAIT_POLICY=PASSIVE (two processes take turns), unless they are set (see
benchmarks/_common.py); part 1 sets its own (above), whatever the caller's.
On a GPU (what ``benchmarks/gpu_check.py`` runs): ``--device cuda --size 512x1024 --batch 4
--amp bf16 --channels-last --steps 25 --warmup 5 --log-every 5 --workers 4``; every timed call is
then synchronised, and the loss is read back only every ``--log-every`` steps in both loops.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks._common import (describe, environ, interleaved_times, load_average, machine, parse_size,
                                print_table, ratio_interval, set_threads, timing_summary, use_benchmark_env, verdict,
                                write_results)
from ddsm.config import DataConfig, ModelConfig, TrainConfig, TrialConfig
from ddsm.models import build_model, build_model_from_config
from ddsm.profile.timing import Step

SIZE, BATCH, NUM_CLASSES = (256, 512), 2, 19
DDSM_OPTIONS = dict(branches="dual", num_points=9)
STEP_RATIO_TARGET, ENGINE_TARGET, ENGINE_GOAL = 1.25, 0.95, 0.98
# part 1's OpenMP wait policies: the value of OMP_WAIT_POLICY in its process (None: unset, libgomp's default
# of spinning a while after each parallel region, then sleeping); the first one listed is the judged one
OMP_POLICIES: dict[str, str | None] = {"default": None, "passive": "PASSIVE"}
# part 1's allocator: c10's default (huge pages off), as training runs; THP_MEM_ALLOC_ENABLE=1 (the other
# benchmarks' setting, for growth exponents) doubled the step-to-step spread here (IQR ~310 vs ~120 ms of
# ~1500, four paired runs on 2026-12-02) and is set by no training run
PART1_THP: str | None = None
RELAY_TIMEOUT_S = 1800  # part 2: a loop waiting longer for its turn gives up (the other one died)


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


def _step_times_child(threads: int, kwargs: dict[str, Any]) -> dict[str, list[float]]:
    """:func:`model_step_times` in a worker process, with ``threads`` intra-op threads (0: torch's default)."""
    set_threads(threads)
    return model_step_times(**kwargs)


def part1_environment(policy: str) -> dict[str, str | None]:
    """The variables part 1's process runs with under ``policy`` (None: unset): OMP_WAIT_POLICY from
    :data:`OMP_POLICIES`, THP_MEM_ALLOC_ENABLE :data:`PART1_THP`. Both are read once, when a process loads torch."""
    return {"OMP_WAIT_POLICY": OMP_POLICIES[policy], "THP_MEM_ALLOC_ENABLE": PART1_THP}


@contextlib.contextmanager
def part1_process(policy: str) -> Iterator[ProcessPoolExecutor]:
    """A fresh one-worker process (spawned) with :func:`part1_environment` (``policy``); the caller's own
    variables are back as they were afterwards."""
    with contextlib.ExitStack() as stack:
        for name, value in part1_environment(policy).items():
            stack.enter_context(environ(name, value))
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            pool.submit(int).result()  # start the worker now, while the variables are set
            yield pool


def step_times_under(policy: str, *, threads: int, **kwargs: Any) -> dict[str, list[float]]:
    """:func:`model_step_times` (keyword arguments as there) in :func:`part1_process` (``policy``)."""
    with part1_process(policy) as pool:
        return pool.submit(_step_times_child, threads, kwargs).result()


def _synchronised(fn, device: torch.device):  # noqa: ANN001, ANN202 - a zero-argument callable
    """``fn`` followed by a CUDA synchronise on a GPU, so that wall clocks see the work (as is on CPU)."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call


def _interval_text(interval: tuple[float, float] | None) -> str:
    """``[low, high]`` of a ratio's interval, or "n/a" below 3 rounds."""
    return "n/a" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def trial_config(steps: int, *, size: tuple[int, int] = SIZE, batch: int = BATCH, device: str = "cpu",
                 amp: str = "none", channels_last: bool = False, log_every: int = 1, workers: int = 0) -> TrialConfig:
    """ddsm (dual, N=9, ResNet-18) on synthetic images (default 256x512, batch 2, CPU, a log every step)."""
    return TrialConfig(
        model=ModelConfig(name="ddsm", backbone="resnet18", **DDSM_OPTIONS),
        data=DataConfig(name="synthetic", image_size=size, crop_size=size, scale_range=(1.0, 1.0), batch_size=batch,
                        num_images=4, num_classes=NUM_CLASSES, workers=workers),
        train=TrainConfig(steps=steps, device=device, amp=amp, channels_last=channels_last, log_every=log_every),
    )


Block = tuple[int, float, float]  # (last step of a block, wall s, process CPU s) of log_every steps


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _wait(turn: Any) -> None:
    """Block until it is this loop's turn (the other loop died if it never comes)."""
    if not turn.acquire(timeout=RELAY_TIMEOUT_S):
        raise RuntimeError(f"the other loop did not hand over within {RELAY_TIMEOUT_S} s")


def _engine_child(cfg: TrialConfig, mine: Any, other: Any, queue: Any, threads: int) -> None:
    """``ddsm.engine.train`` in its own process, each block of ``log_every`` steps timed in its turn."""
    from ddsm.engine import Callback, train

    set_threads(threads)

    class Relay(Callback):
        def __init__(self) -> None:
            self.blocks: list[Block] = []
            self.t0: tuple[float, float] | None = None

        def on_checkpoint(self, step: int, path: Path) -> None:
            if self.t0 is None:  # the step-0 checkpoint: training starts right after it
                _wait(mine)
                self.t0 = _clock()

        def on_train_step(self, step: int, metrics: dict) -> None:  # right after the losses were read back
            (w, c), (w0, c0) = _clock(), self.t0
            self.blocks.append((step, w - w0, c - c0))
            if step < cfg.train.steps:  # the last turn ends when the run is over (below)
                other.release()
                _wait(mine)
                self.t0 = _clock()

    relay = Relay()
    with tempfile.TemporaryDirectory() as out_dir:
        train(cfg, out_dir=out_dir, callbacks=[relay], resume=False)
    queue.put(("engine", relay.blocks))
    other.release()  # after validation, profiling and clean-up: the plain loop's last block runs alone


def _plain_child(cfg: TrialConfig, mine: Any, other: Any, queue: Any, threads: int) -> None:
    """A plain PyTorch loop on the same model, data, optimiser, AMP dtype and memory format, in its own
    process, each block of ``log_every`` steps (ending with ``loss.item()``, as a loop that logs) timed
    in its turn."""
    from ddsm.data import build_dataset, dataset_info
    from ddsm.engine import amp_dtype, resolve_device

    set_threads(threads)
    t = cfg.train
    device = resolve_device(t.device)
    dtype = amp_dtype(t.amp, device)
    torch.manual_seed(t.seed)
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    model = build_model_from_config(cfg.model, num_classes=cfg.data.num_classes).to(device).train()
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    loader = DataLoader(build_dataset(cfg.data, split="train", train=True), batch_size=cfg.data.batch_size,
                        shuffle=True, drop_last=True, num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.workers > 0)  # the engine's loader never restarts either
    ignore = dataset_info(cfg.data.name, cfg.data).ignore_index
    batches = (batch for _ in range(t.steps) for batch in loader)  # re-iterate epochs
    blocks: list[Block] = []
    for step in range(1, t.steps + 1):
        if (step - 1) % t.log_every == 0:
            _wait(mine)
            w0, c0 = _clock()
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
            loss.item()  # the host waits for the GPU here
            w, c = _clock()
            blocks.append((step, w - w0, c - c0))
            if step < t.steps:
                other.release()
    queue.put(("plain loop", blocks))


def relay_run(cfg: TrialConfig, *, threads: int) -> dict[str, list[Block]]:
    """One engine run and one plain-loop run in two processes that take turns, one block of
    ``log_every`` steps each (engine, plain, engine, ...): both see the same machine load, block by block."""
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")
    turns = {"engine": ctx.Semaphore(0), "plain loop": ctx.Semaphore(0)}
    results = ctx.Queue()
    procs = [ctx.Process(target=_engine_child, args=(cfg, turns["engine"], turns["plain loop"], results, threads)),
             ctx.Process(target=_plain_child, args=(cfg, turns["plain loop"], turns["engine"], results, threads))]
    for proc in procs:
        proc.start()
    turns["engine"].release()
    blocks: dict[str, list[Block]] = {}
    try:
        while len(blocks) < 2:
            try:
                name, got = results.get(timeout=5)
                blocks[name] = got
            except queue_module.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a loop process exited with code {dead[0].exitcode}") from None
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return blocks


def relay_ratios(runs: list[dict[str, list[Block]]], *, warmup: int) -> dict[str, float]:
    """Engine / plain-loop throughput over the blocks after ``warmup`` steps of the given relay runs:
    per wall second, per CPU second, and the median of the per-block (same-load) ratios."""
    steps, wall, cpu, per_block = {"engine": 0, "plain loop": 0}, {"engine": 0.0, "plain loop": 0.0}, \
        {"engine": 0.0, "plain loop": 0.0}, []
    for blocks in runs:
        counted = {k: [b for b in v if b[0] > warmup] for k, v in blocks.items()}
        for name, kept in counted.items():
            steps[name] += kept[-1][0] - warmup
            wall[name] += sum(b[1] for b in kept)
            cpu[name] += sum(b[2] for b in kept)
        per_block += [pb[1] / eb[1] for eb, pb in zip(counted["engine"], counted["plain loop"])]
    rate = {name: steps[name] / wall[name] for name in steps}
    return {"wall": rate["engine"] / rate["plain loop"],
            "cpu": (steps["engine"] / cpu["engine"]) / (steps["plain loop"] / cpu["plain loop"]),
            "per_block_median": statistics.median(per_block),
            "engine_steps_per_s": rate["engine"], "plain_steps_per_s": rate["plain loop"]}


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run both parts, print the tables, write the JSON; returns the payload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="round-robin training steps per model (part 1)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per engine / plain-loop run (part 2)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the throughput")
    parser.add_argument("--runs", type=int, default=2, help="engine + plain-loop relay runs (part 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument("--size", default=f"{SIZE[0]}x{SIZE[1]}", help=f"input HxW (default {SIZE[0]}x{SIZE[1]})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch (default {BATCH})")
    parser.add_argument("--amp", default="none", help="none | bf16 | fp16 (CUDA only; default none)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs (both parts)")
    parser.add_argument("--log-every", type=int, default=1,
                        help="part 2: read the loss back (and stamp the time) every N steps; divides --warmup and --steps")
    parser.add_argument("--workers", type=int, default=0, help="part 2: DataLoader workers (default 0)")
    parser.add_argument("--part1-policies", default=None,
                        help="part 1: OpenMP wait policies, each in its own process, the first one judged "
                             f"(from {', '.join(OMP_POLICIES)}; default: all on CPU, 'default' on CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default benchmarks/results/)")
    args = parser.parse_args(argv)
    policies = (args.part1_policies.split(",") if args.part1_policies else
                list(OMP_POLICIES) if args.device == "cpu" else ["default"])
    if not policies or any(p not in OMP_POLICIES for p in policies):
        parser.error(f"--part1-policies {args.part1_policies!r}: expected a comma-separated list of "
                     f"{', '.join(OMP_POLICIES)}")
    if args.warmup % args.log_every or args.steps % args.log_every or args.steps <= args.warmup:
        parser.error(f"--log-every {args.log_every} must divide --warmup {args.warmup} and --steps {args.steps}, "
                     "and --steps must exceed --warmup")
    size = parse_size(args.size)
    set_threads(args.threads)
    info = machine()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    setting = dict(size=size, batch=args.batch, device=args.device, amp=args.amp, channels_last=args.channels_last)

    part1 = {}
    for policy in policies:
        print(f"[bench_train_step] part 1: ddsm vs fpn training step, OpenMP wait policy {policy} "
              f"(load average {load_average()})", flush=True)
        times = step_times_under(policy, threads=args.threads, repeats=args.repeats, warmup=1, **setting)
        step = {name: timing_summary(ts) for name, ts in times.items()}
        part1[policy] = {"step_ms": step, "step_times_ms": times,
                         "ratio": step["ddsm"]["median"] / step["fpn"]["median"],
                         "per_round_median": statistics.median(a / b for a, b in zip(times["ddsm"], times["fpn"])),
                         "ratio_interval_90": ratio_interval(times["ddsm"], times["fpn"])}
    judged = part1[policies[0]]
    step_ratio = judged["ratio"]

    print(f"[bench_train_step] part 2: engine vs plain loop (load average {load_average()})", flush=True)
    cfg = trial_config(args.steps, log_every=args.log_every, workers=args.workers, **setting)
    runs = [relay_run(cfg, threads=args.threads) for _ in range(args.runs)]
    per_run = [relay_ratios([r], warmup=args.warmup) for r in runs]
    pooled = relay_ratios(runs, warmup=args.warmup)
    engine_ratio, engine_cpu_ratio = pooled["wall"], pooled["cpu"]

    where = args.device if not args.device.startswith("cuda") else f"{args.device} ({info['gpu']})"
    flags = f", {args.amp} autocast" * (args.amp != "none") + ", channels_last" * args.channels_last
    print(f"\nTraining step, ResNet-18, {size[0]}x{size[1]}, batch {args.batch}, {where}{flags}; {describe(info)} "
          f"(the parent's and part 2's; part 1: THP_MEM_ALLOC_ENABLE={PART1_THP or 'unset'}, the policy per row); "
          f"{args.repeats} round-robin repeats per policy, each policy in its own process")
    print_table([{"OpenMP wait policy": policy, "model": n, "median ms": f"{s['median']:.0f}", "IQR ms": f"{s['iqr']:.0f}",
                  "ddsm / fpn": f"{r['ratio']:.3f}" if n == "ddsm" else "",
                  "90% interval": _interval_text(r["ratio_interval_90"]) if n == "ddsm" else "",
                  "per-round median": f"{r['per_round_median']:.3f}" if n == "ddsm" else ""}
                 for policy, r in part1.items() for n, s in r["step_ms"].items()],
                ["OpenMP wait policy", "model", "median ms", "IQR ms", "ddsm / fpn", "90% interval", "per-round median"])
    print(f"(the target uses the {policies[0]} policy's ratio of medians; the interval: bootstrap over the rounds)")
    print(f"\nEngine vs plain loop, ddsm training, {args.steps} steps per run, first {args.warmup} left out, loss read "
          f"back every {args.log_every} step(s); the two loops run in two processes taking turns block by block, "
          f"{args.runs} run(s)")
    print_table([{"run": i + 1 if i < len(per_run) else "all", "engine steps/s": f"{r['engine_steps_per_s']:.3f}",
                  "plain steps/s": f"{r['plain_steps_per_s']:.3f}", "engine/plain (wall)": f"{r['wall']:.3f}",
                  "per CPU s": f"{r['cpu']:.3f}", "median per block": f"{r['per_block_median']:.3f}"}
                 for i, r in enumerate([*per_run, pooled])],
                ["run", "engine steps/s", "plain steps/s", "engine/plain (wall)", "per CPU s", "median per block"])
    print("(all: the runs pooled; the target uses its wall ratio)")
    tgt = [
        {"target": "ddsm / fpn training-step time", "measured": step_ratio, "target_value": STEP_RATIO_TARGET,
         "verdict": verdict(step_ratio, STEP_RATIO_TARGET, at_most=True), "omp_wait_policy": policies[0],
         "interval_90": judged["ratio_interval_90"]},
        *({"target": f"ddsm / fpn training-step time, OMP_WAIT_POLICY {p} (for comparison)", "measured": r["ratio"],
           "target_value": STEP_RATIO_TARGET, "verdict": verdict(r["ratio"], STEP_RATIO_TARGET, at_most=True),
           "omp_wait_policy": p} for p, r in part1.items() if p != policies[0]),
        {"target": "engine / plain-loop throughput", "measured": engine_ratio, "target_value": ENGINE_TARGET,
         "verdict": verdict(engine_ratio, ENGINE_TARGET, at_most=False)},
        {"target": "engine / plain-loop throughput (goal)", "measured": engine_ratio, "target_value": ENGINE_GOAL,
         "verdict": verdict(engine_ratio, ENGINE_GOAL, at_most=False)},
    ]
    print("\nTargets")
    print_table([{**t, "measured": f"{t['measured']:.3f}",
                  "90% interval": _interval_text(t["interval_90"]) if "interval_90" in t else ""} for t in tgt],
                ["target", "measured", "90% interval", "target_value", "verdict"])
    info["load_avg_1min_end"] = load_average()
    payload = {"benchmark": "bench_train_step", "machine": info, "size": size, "batch": args.batch,
               "device": args.device, "amp": args.amp, "channels_last": args.channels_last,
               "num_classes": NUM_CLASSES, "ddsm_options": DDSM_OPTIONS, "step_ms": judged["step_ms"],
               "step_times_ms": judged["step_times_ms"], "step_ratio_per_round_median": judged["per_round_median"],
               "step_ratio_interval_90": judged["ratio_interval_90"],
               "part1_omp_wait_policy": policies[0], "part1_by_omp_wait_policy": part1,
               "engine_vs_plain_runs": per_run, "engine_vs_plain": pooled,
               "blocks": runs, "steps": args.steps,
               "warmup": args.warmup, "log_every": args.log_every, "workers": args.workers, "targets": tgt}
    print(f"\nwrote {write_results('bench_train_step', payload, out_dir=args.out)}")
    return payload


if __name__ == "__main__":
    use_benchmark_env("benchmarks.bench_train_step")
    main()
