"""DDSM against other fusion/context blocks on C=256 feature maps, batch 2, forward + backward.

Candidates: DDSM (spatial, channel, dual; N=9 and N=25) on (x_l at H x W, x_h at H/2 x W/2); the
non-local block and DANet's dual attention (position + channel, summed, as DANet sums its two
paths) on x_l; SFNet's flow alignment module on (x_l, x_h); a plain 3x3 conv on x_l.
Sizes 32x64, 64x128, 128x256 (H x W of x_l). Per candidate and size: forward+backward wall time
(median and IQR over round-robin repeats), peak CPU memory allocated during one forward+backward
(torch.profiler memory events; parameters and inputs excluded), forward GFLOPs
(ddsm.profile.count_flops), and the growth exponent of time with H*W.

Targets at 64x128 (DDSM dual, N=9): time <= 0.3 x non-local, peak memory <= 0.25 x non-local;
near-linear growth: time(128x256) / time(64x128) <= 5.0 (non-local: ~16, quadratic). The sizes of
the main table are measured one after the other, so a change of machine load between them shows
up as growth: the growth target is measured on its own, both sizes round-robin (with the 3x3 conv,
whose work grows exactly 4x, as the yardstick).

Run: ``.venv/bin/python -m benchmarks.bench_modules [--repeats R] [--sizes 32x64,64x128] [--threads T]``;
prints tables and writes benchmarks/results/bench_modules.json (``--out`` elsewhere). Runs with
OMP_WAIT_POLICY=PASSIVE and THP_MEM_ALLOC_ENABLE=1 unless they are set (see benchmarks/_common.py).
On a GPU (what ``benchmarks/gpu_check.py`` runs): ``--device cuda --sizes 64x128,128x256,256x512``;
every timed call is then synchronised, peak memory is ``torch.cuda.max_memory_allocated`` over one
fwd+bwd (inputs and parameters excluded), and the attention memory budget is half the GPU's memory.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from benchmarks._common import (cpu_peak_allocated_bytes, describe, growth_exponent, interleaved_times, load_average,
                                machine, print_table, set_threads, timing_summary, use_benchmark_env, verdict,
                                write_results)
from ddsm.models.context import ChannelAttention, NonLocal2d, PositionAttention
from ddsm.models.ddsm import DDSM
from ddsm.models.decoder import FlowAlign

CHANNELS, BATCH = 256, 2
SIZES = ((32, 64), (64, 128), (128, 256))
REPEATS = {32: 10, 64: 5, 128: 3}  # by H; round-robin rounds, after one warm-up round
GROWTH_REPEATS = 5  # paired rounds of the growth target
MEMORY_BUDGET_GIB = 6.0  # quadratic blocks whose attention would need more are skipped, not run
TARGET_SIZE, GROWTH_SIZE = (64, 128), (128, 256)
DDSM_REF = "ddsm-dual-n9"


class DualAttention(nn.Module):
    """DANet's position and channel attention modules in parallel, summed."""

    def __init__(self, channels: int):
        super().__init__()
        self.pam = PositionAttention(channels, channels // 8)
        self.cam = ChannelAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        return self.pam(x) + self.cam(x)


def candidates() -> dict[str, tuple[Callable[[], nn.Module], bool, bool]]:
    """name -> (factory, takes (x_l, x_h), has an HW x HW attention matrix)."""
    out: dict[str, tuple[Callable[[], nn.Module], bool, bool]] = {}
    for n in (9, 25):
        for branches in ("spatial", "channel", "dual"):
            factory = lambda b=branches, n=n: DDSM(CHANNELS, branches=b, num_points=n)  # noqa: E731
            out[f"ddsm-{branches}-n{n}"] = (factory, True, False)
    out["nonlocal"] = (lambda: NonLocal2d(CHANNELS), False, True)
    out["danet-dual"] = (lambda: DualAttention(CHANNELS), False, True)
    out["sfnet-flowalign"] = (lambda: FlowAlign(CHANNELS), True, False)
    out["conv3x3"] = (lambda: nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), False, False)
    return out


DEVICE = torch.device("cpu")  # set by --device


def memory_budget_gib() -> float:
    """How much an attention block may need: MEMORY_BUDGET_GIB on CPU, half the GPU's memory on CUDA."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_properties(DEVICE).total_memory / 2**30 / 2
    return MEMORY_BUDGET_GIB


def attention_skip_reason(h: int, w: int) -> str | None:
    """Why an HW x HW attention block is not run at this size (None: it is run)."""
    matrix = BATCH * (h * w) ** 2 * 4  # one float32 (B, HW, HW) matrix
    need = 3 * matrix  # logits, softmax output (saved for backward) and its gradient live together
    budget = memory_budget_gib()
    if need > budget * 2**30:
        return (f"skipped (memory): B x (HW)^2 x 4 B = {matrix / 2**30:.1f} GiB per attention matrix, "
                f"~{need / 2**30:.0f} GiB live in fwd+bwd > {budget:.0f} GiB budget")
    return None


def peak_bytes(step: Callable[[], None]) -> int:
    """Peak allocation during one call of ``step`` beyond what was allocated before it (CPU or CUDA)."""
    if DEVICE.type != "cuda":
        return cpu_peak_allocated_bytes(step)
    torch.cuda.synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    step()
    torch.cuda.synchronize(DEVICE)
    return torch.cuda.max_memory_allocated(DEVICE) - before


def count_gflops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[float | None, list[str]]:
    """Forward GFLOPs and uncounted ops from ddsm.profile (None if that module is unavailable)."""
    try:
        from ddsm.profile.flops import count_flops
    except ImportError:
        return None, []
    with torch.no_grad():
        report = count_flops(module, tuple(x.detach() for x in inputs))
    return report.total_flops / 1e9, list(report.uncounted_ops)


def make_step(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """One forward + backward with a fixed random upstream gradient; gradients are freed first."""
    with torch.no_grad():
        grad = torch.randn_like(module(*inputs))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None
        module(*inputs).backward(grad)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)  # wall clocks see the work, as on CPU

    return step


def bench_size(h: int, w: int, *, repeats: int) -> list[dict[str, object]]:
    """All candidates at one size: timing (round-robin), peak memory, GFLOPs."""
    x_l, x_h = _inputs(h, w)
    rows, steps, modules = [], {}, {}
    for name, (factory, pair, quadratic) in candidates().items():
        row = {"module": name, "size": f"{h}x{w}", "hw": h * w}
        reason = attention_skip_reason(h, w) if quadratic else None
        if reason:
            row["skipped"] = reason
        else:
            torch.manual_seed(0)
            modules[name] = (factory().to(DEVICE), (x_l, x_h) if pair else (x_l,))
            steps[name] = make_step(*modules[name])
        rows.append(row)
    cpu: dict[str, list[float]] = {}
    times = interleaved_times(steps, repeats=repeats, warmup=1, cpu_times=cpu)
    for row in rows:
        name = row["module"]
        if name not in steps:
            continue
        row.update({f"time_{k}_ms": v for k, v in timing_summary(times[name]).items()})
        row["cpu_median_ms"] = timing_summary(cpu[name])["median"]
        row["times_ms"] = times[name]
        row["peak_mib"] = peak_bytes(steps[name]) / 2**20
        row["gflops"], row["uncounted_ops"] = count_gflops(*modules[name])
        row["params_m"] = sum(p.numel() for p in modules[name][0].parameters()) / 1e6
    return rows


def _inputs(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded x_l (B, C, h, w) and x_h (B, C, h/2, w/2) on DEVICE, requiring grad."""
    gen = torch.Generator().manual_seed(0)
    x_l = torch.randn(BATCH, CHANNELS, h, w, generator=gen).to(DEVICE).requires_grad_()
    x_h = torch.randn(BATCH, CHANNELS, h // 2, w // 2, generator=gen).to(DEVICE).requires_grad_()
    return x_l, x_h


def growth(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per candidate: growth exponent of time with H*W over the measured sizes, and time ratios."""
    out = []
    for name in candidates():
        pts = [(r["hw"], r["time_median_ms"]) for r in rows if r["module"] == name and "time_median_ms" in r]
        by_hw = dict(pts)
        g = {"module": name, "exponent": growth_exponent([p[0] for p in pts], [p[1] for p in pts])}
        for (a, b) in ((SIZES[0], SIZES[1]), (SIZES[1], SIZES[2])):
            ta, tb = by_hw.get(a[0] * a[1]), by_hw.get(b[0] * b[1])
            g[f"t{b[0]}x{b[1]}/t{a[0]}x{a[1]}"] = tb / ta if ta and tb else float("nan")
        out.append(g)
    return out


def paired_growth(*, repeats: int) -> dict[str, dict[str, float]]:
    """Wall and CPU ratios time(GROWTH_SIZE) / time(TARGET_SIZE) of DDSM dual N=9 and the 3x3 conv,
    with the two sizes timed round-robin so that both see the same machine load."""
    steps = {}
    for (h, w) in (TARGET_SIZE, GROWTH_SIZE):
        x_l, x_h = _inputs(h, w)
        for name in (DDSM_REF, "conv3x3"):
            factory, pair, _ = candidates()[name]
            torch.manual_seed(0)
            steps[(name, h)] = make_step(factory().to(DEVICE), (x_l, x_h) if pair else (x_l,))
    cpu: dict = {}
    wall = interleaved_times(steps, repeats=repeats, warmup=1, cpu_times=cpu)
    med = lambda d, k: timing_summary(d[k])["median"]  # noqa: E731
    return {name: {"wall_ratio": med(wall, (name, GROWTH_SIZE[0])) / med(wall, (name, TARGET_SIZE[0])),
                   "cpu_ratio": med(cpu, (name, GROWTH_SIZE[0])) / med(cpu, (name, TARGET_SIZE[0]))}
            for name in (DDSM_REF, "conv3x3")}


def targets(rows: list[dict[str, object]], growth_pair: dict[str, dict[str, float]] | None) -> list[dict[str, object]]:
    """The three targets of the issue, each with its measured ratio and PASS/MISS."""
    def get(name, size, key):
        for r in rows:
            if r["module"] == name and r["size"] == f"{size[0]}x{size[1]}" and key in r:
                return r[key]
        return float("nan")

    t_ratio = get(DDSM_REF, TARGET_SIZE, "time_median_ms") / get("nonlocal", TARGET_SIZE, "time_median_ms")
    m_ratio = get(DDSM_REF, TARGET_SIZE, "peak_mib") / get("nonlocal", TARGET_SIZE, "peak_mib")
    g_ratio = growth_pair[DDSM_REF]["wall_ratio"] if growth_pair else float("nan")
    size, gsize = "x".join(map(str, TARGET_SIZE)), "x".join(map(str, GROWTH_SIZE))
    note = (f" (paired; CPU-time ratio {growth_pair[DDSM_REF]['cpu_ratio']:.2f}, 3x3 conv "
            f"{growth_pair['conv3x3']['wall_ratio']:.2f} wall / {growth_pair['conv3x3']['cpu_ratio']:.2f} CPU)"
            if growth_pair else "")
    return [
        {"target": f"{DDSM_REF} / nonlocal fwd+bwd time at {size}", "measured": t_ratio, "target_value": 0.3,
         "verdict": verdict(t_ratio, 0.3, at_most=True)},
        {"target": f"{DDSM_REF} / nonlocal peak memory at {size}", "measured": m_ratio, "target_value": 0.25,
         "verdict": verdict(m_ratio, 0.25, at_most=True)},
        {"target": f"{DDSM_REF} time {gsize} / {size}{note}", "measured": g_ratio, "target_value": 5.0,
         "verdict": verdict(g_ratio, 5.0, at_most=True)},
    ]


def _fmt(v: object, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark, print the tables, write the JSON; returns the payload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=0, help="round-robin repeats per size (0 = 10/5/5 by size)")
    parser.add_argument("--sizes", default=",".join(f"{h}x{w}" for h, w in SIZES), help="e.g. 32x64,64x128")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default benchmarks/results/)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    set_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    info = machine()
    if DEVICE.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(DEVICE)
    rows = []
    for h, w in sizes:
        print(f"[bench_modules] {h}x{w} (load average {load_average()})", flush=True)
        rows += bench_size(h, w, repeats=args.repeats or REPEATS.get(h, 5))
    growth_pair = None
    if TARGET_SIZE in sizes and GROWTH_SIZE in sizes:
        print(f"[bench_modules] growth target, both sizes round-robin (load average {load_average()})", flush=True)
        growth_pair = paired_growth(repeats=args.repeats or GROWTH_REPEATS)
    table = [{"module": r["module"], "size": r["size"],
              "median ms": _fmt(r.get("time_median_ms"), ".0f"), "IQR ms": _fmt(r.get("time_iqr_ms"), ".0f"),
              "CPU ms": _fmt(r.get("cpu_median_ms"), ".0f"),
              "peak MiB": _fmt(r.get("peak_mib"), ".0f"), "GFLOPs": _fmt(r.get("gflops"), ".2f"),
              "note": r.get("skipped", "")} for r in rows]
    where = f"{DEVICE} ({info['gpu']})" if DEVICE.type == "cuda" else "cpu"
    print(f"\nForward+backward on {where}, C={CHANNELS}, batch {BATCH}; {describe(info)}\nmedian/IQR = wall time, "
          f"CPU ms = process CPU time (median); peak MiB = peak {DEVICE.type.upper()} allocation during one fwd+bwd "
          "(params/inputs excluded); GFLOPs = forward, ddsm.profile.count_flops")
    print_table(table, ["module", "size", "median ms", "IQR ms", "CPU ms", "peak MiB", "GFLOPs", "note"])
    grow = growth(rows)
    print("\nGrowth of fwd+bwd time with H*W (exponent: time ~ (HW)^e over the measured sizes)")
    print_table([{k: _fmt(v, ".2f") if isinstance(v, float) else v for k, v in g.items()} for g in grow], list(grow[0]))
    tgt = targets(rows, growth_pair)
    print("\nTargets")
    print_table([{**t, "measured": _fmt(t["measured"], ".3f")} for t in tgt],
                ["target", "measured", "target_value", "verdict"])
    info["load_avg_1min_end"] = load_average()
    payload = {"benchmark": "bench_modules", "machine": info, "device": str(DEVICE), "channels": CHANNELS,
               "batch": BATCH, "memory_kind": ("cuda_max_memory_allocated_during_fwd_bwd" if DEVICE.type == "cuda"
                                               else "cpu_profiler_allocated_during_fwd_bwd"),
               "rows": rows, "growth": grow, "growth_paired": growth_pair, "targets": tgt}
    print(f"\nwrote {write_results('bench_modules', payload, out_dir=args.out)}")
    return payload


if __name__ == "__main__":
    use_benchmark_env("benchmarks.bench_modules")
    main()
