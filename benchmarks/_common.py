"""Shared helpers for the benchmark scripts: interleaved timing, CPU peak memory, growth exponents,
machine description, tables and JSON results.

Timing summaries reuse :func:`ddsm.profile.timing.summarize` (median, p25, p75). On a shared CPU the
load changes from second to second, so candidates that are compared are timed round-robin (one call
of each per round), never one after the other: every candidate then sees the same load.

Process settings (both apply to every candidate alike, and both are set by :func:`use_benchmark_env`,
which re-runs the script with them unless the variables are already set):

- ``OMP_WAIT_POLICY=PASSIVE``: torch's GNU OpenMP workers spin for a while at the end of every
  parallel region. When other processes also want the cores, a spinning worker takes a core from
  the thread with the work, and each of the hundreds of parallel regions of a training step then
  waits for a scheduler time slice: measured at load 4-8, DDSM's forward+backward went from 0.6 s to
  2.1 s wall and a ResNet-18 + FPN training step from 2.9 s to 7.2 s. It is not free on an idle
  machine either: a passive worker sleeps at once and every parallel region wakes it again, which
  costs most where the regions are short. Measured alone on this VM (2026-12-01): the three DDSM
  fusions' forward+backward 489 ms passive vs 278 ms with the default policy (and no faster than
  one thread, 377 ms), a ResNet-18 + FPN training step 1832 vs 1644 ms. So a script whose result is
  a ratio between models measures under the policy training runs with (the default, variable unset):
  bench_train_step's part 1 runs in its own process per policy (:func:`environ`), and reports both.
- ``THP_MEM_ALLOC_ENABLE=1`` (a c10 allocator switch): CPU tensors of 2 MiB and more on transparent
  huge pages. glibc returns every block above 32 MiB to the kernel when it is freed, so each such
  tensor of every call is page-faulted in again, 4 KiB at a time: at 128x256 a fwd+bwd of a 3x3
  conv spent 0.3 s of 2.4 s in the kernel (131k faults), DDSM 0.5 s of 3.2 s (249k faults), which
  made every block look superlinear in H*W. With huge pages: 3k and 19k faults, and both grow 4.0x
  from 64x128 to 128x256. bench_train_step's part 1 (a ratio between two models at one size) runs
  without it, as training does: there it doubled the step-to-step spread (IQR ~310 vs ~120 ms of a
  ~1500 ms step, 2026-12-02) without moving the ratio beyond that noise.

Set either variable yourself (e.g. ``OMP_WAIT_POLICY=ACTIVE``) to measure without it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ddsm.profile.timing import summarize

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Lines kineto writes straight to fd 2 on every profiler start/stop on a CPU-only machine.
_PROFILER_NOISE = ("SyncActivityProfilerHandler", "gpuGetDeviceCount", "STAGE:", "CUPTI", "allocated before")


BENCHMARK_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}


def use_benchmark_env(module: str) -> None:
    """Re-execute ``python -m <module> <args>`` with :data:`BENCHMARK_ENV` for the variables not set.

    Both are read once, when torch is loaded, so they cannot be changed in-process.
    """
    missing = {k: v for k, v in BENCHMARK_ENV.items() if k not in os.environ}
    if missing:
        os.environ.update(missing)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])


@contextlib.contextmanager
def environ(name: str, value: str | None):
    """``os.environ[name]`` set to ``value`` (None: unset) inside the block, as it was after it; for the
    processes started inside (variables such as OMP_WAIT_POLICY are read once, when a process loads torch)."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (0 keeps torch's default: one per core)."""
    if threads > 0:
        torch.set_num_threads(threads)


def machine() -> dict[str, object]:
    """CPU model, core count, torch threads and version, and the 1-minute load average now."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)"),
            "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg_1min": load_average()}


def describe(info: dict[str, object]) -> str:
    """One line naming the settings that change CPU timings (cores, threads, env, load)."""
    return (f"{info['cores']} cores, {info['torch_threads']} threads, OMP_WAIT_POLICY={info['omp_wait_policy']}, "
            f"THP_MEM_ALLOC_ENABLE={info['thp_mem_alloc_enable']}, load average {info['load_avg_1min']} at start")


def load_average() -> float:
    """The 1-minute load average (other processes compete for the cores when it exceeds the core count)."""
    return round(os.getloadavg()[0], 2)


def interleaved_times(fns: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 1,
                      cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall milliseconds of ``repeats`` calls of every fn, timed round-robin after ``warmup`` untimed
    rounds; the process CPU milliseconds of each call go to ``cpu_times`` when given."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append((time.process_time() - c0) * 1e3)
    return times


def ratio_interval(a: list[float], b: list[float], *, level: float = 0.9,
                   resamples: int = 4000) -> tuple[float, float] | None:
    """Bootstrap interval (``scipy.stats.bootstrap``, percentile, seeded) of median(a) / median(b) for two
    lists of timings taken round-robin: rounds are resampled whole (paired), so a slow round of the machine
    moves both. None below 3 rounds. It says how far the run's ratio could move on a rerun under the same
    load; it is not a bound on the machine's noise between runs."""
    if len(a) != len(b):
        raise ValueError(f"ratio_interval: {len(a)} and {len(b)} timings; expected one of each per round")
    if len(a) < 3:
        return None
    from scipy.stats import bootstrap  # only here: the benchmarks that do not report an interval skip the import

    def ratio(x, y, axis=-1):  # noqa: ANN001, ANN202 - numpy arrays, vectorised over resamples
        return np.median(x, axis=axis) / np.median(y, axis=axis)

    res = bootstrap((np.asarray(a, dtype=float), np.asarray(b, dtype=float)), ratio, paired=True, vectorized=True,
                    n_resamples=resamples, confidence_level=level, method="percentile", rng=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def timing_summary(times_ms: list[float]) -> dict[str, float]:
    """Median, p25, p75 and IQR in ms (plus mean, min, repeats) of a list of timings."""
    s = summarize(times_ms)
    return {**s, "iqr": s["p75"] - s["p25"]}


@contextlib.contextmanager
def _quiet_profiler():
    """Send fd 2 to a temp file while profiling; re-emit every line that is not profiler noise."""
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


def cpu_peak_allocated_bytes(fn: Callable[[], None]) -> int:
    """Peak of the running sum of PyTorch CPU allocations minus frees while ``fn`` runs once.

    Measured with ``torch.profiler(profile_memory=True)`` (PyTorch keeps no CPU peak counter);
    tensors that exist before the call (parameters, inputs) are not included, nor are allocations
    made outside PyTorch's allocator (e.g. oneDNN scratch buffers).
    """
    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    running, peak = 0, 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def growth_exponent(sizes: list[float], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(size): time ~ size ** exponent (nan below 2 points)."""
    pts = [(math.log(s), math.log(t)) for s, t in zip(sizes, times) if t and t > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def verdict(measured: float, target: float, *, at_most: bool) -> str:
    """PASS / MISS of a measured ratio against a target (``at_most``: measured <= target passes)."""
    if measured is None or math.isnan(measured):
        return "n/a"
    return "PASS" if (measured <= target if at_most else measured >= target) else "MISS"


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    """Print rows as an aligned text table with the given columns (missing cells print as '')."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(name: str, payload: dict[str, object], *, out_dir: Path | None = None) -> Path:
    """Write ``payload`` as <out_dir or benchmarks/results>/<name>.json and return the path."""
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def parse_size(text: str) -> tuple[int, int]:
    """``"256x512"`` -> (256, 512); raises ValueError naming the text otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise ValueError(f"size {text!r} is not allowed: expected HxW with two positive integers, e.g. 256x512")
    return h, w
