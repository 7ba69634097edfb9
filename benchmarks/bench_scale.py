"""The driver at scale: a 1000-cell grid of trivial trials on a fake local cluster.

    python -m benchmarks.bench_scale                 # 1000 cells, 16 fake CPUs (~5-10 min on a busy 2-core box)
    python -m benchmarks.bench_scale --cells 100 --cpus 8

Each cell is a real ``ddsm-bench run`` cell (spec, hash, MLflow child run with params and tags, events
through the Ray queue, result.json, artifacts) whose training is :func:`trivial_train` (sleeps
:data:`STEP_S` per step and returns fixed-shape metrics) instead of the engine, in reused Ray workers
(``fresh_workers=False``: the fresh process per trial exists to release GPU memory, which a trivial
trial does not hold; starting 1000 Python processes would measure the OS, not the driver).

Measured, against the targets:

- driver overhead per cell: wall time of the driver loop (:func:`harness.driver.drive`) minus the time it
  sat blocked waiting for trials to end (``Launcher.wait``), divided by the cells; target <= 20 ms;
- MLflow writes per cell and their time (every ``MlflowClient`` call of the session counted);
- resume scan: the same command again on the finished grid, from start to every cell skipped
  (``GridPolicy.start``: one paginated search of the experiment); target <= 10 s;
- ``ddsm-bench report`` on the 1000 runs, as a user runs it (a subprocess); target <= 60 s.

Writes ``benchmarks/results/bench_scale.json``. :func:`measure` is also what the test runs at a tiny size.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STEP_S = 0.05  # one "training step" of a trivial trial
TARGETS = {"driver_ms_per_cell": 20.0, "resume_s": 10.0, "report_s": 60.0}
RESULTS = Path(__file__).resolve().parent / "results"


def trivial_train(cfg: Any, *, out_dir: str | Path, callbacks: list, resume: bool = True) -> dict[str, float]:
    """A stand-in for ``ddsm.engine.train`` (same signature): sleeps ``STEP_S`` per step, sends the engine's
    events, writes ``trivial[.rank<r>].json`` (start, end, pid, ``CUDA_VISIBLE_DEVICES``) and returns metrics
    derived from the config (so cells differ). DDP ranks (torch.distributed initialised) each write their own."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    start = time.time()
    for step in range(1, cfg.train.steps + 1):
        time.sleep(STEP_S)
        for cb in callbacks:
            cb.on_train_step(step, {"loss": 1.0 / step, "lr": cfg.train.lr})
    digest = hashlib.sha256(json.dumps([cfg.train.lr, cfg.train.seed, cfg.model.name]).encode()).digest()
    miou = 0.3 + 0.4 * digest[0] / 255
    for cb in callbacks:
        cb.on_eval(cfg.train.steps, {"miou": miou})
    name = "trivial.json" if rank == 0 else f"trivial.rank{rank}.json"
    Path(out_dir, name).write_text(json.dumps({"start": start, "end": time.time(), "pid": os.getpid(), "rank": rank,
                                               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}))
    return {"miou": miou, "pixel_acc": 0.5 + miou / 2, "gflops": 1.0, "params_m": 1.0, "latency_ms": 1.0}


def scale_spec(cells: int, *, steps: int = 1, resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """A grid spec of ``cells`` cells: fpn x learning rates x seeds (10 seeds when ``cells`` is a multiple of 10)."""
    n_seeds = 10 if cells % 10 == 0 else 1
    return {
        "name": f"scale{cells}",
        "base": {"model": {"name": "fpn", "backbone": "resnet18", "decoder_dim": 32},
                 "data": {"name": "synthetic", "image_size": [32, 32], "crop_size": [32, 32], "num_images": 4,
                          "batch_size": 2},  # a global batch (2 DDP workers: 4) no larger than the data (validated)
                 "train": {"steps": steps, "device": "cpu", "log_every": 1}},
        "baselines": [{"name": "fpn", "axes": {"train.lr": [round(0.001 + 1e-5 * i, 6)
                                                            for i in range(cells // n_seeds)]}}],
        "seeds": list(range(n_seeds)),
        "resources": resources or {"cpus": 1, "gpus": 0},
        "cost": {"enabled": False},  # trivial trials: no model to profile after the cells (harness/cost.py)
    }


class _Timers:
    """Call counts and seconds per instrumented function."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.scan_get_run = 0  # MlflowClient.get_run calls inside the last GridPolicy.start

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t, before = time.perf_counter(), self.calls["mlflow.get_run"]
            try:
                return original(*args, **kwargs)
            finally:
                self.calls[label] += 1
                self.seconds[label] += time.perf_counter() - t
                if label == "policy.start":  # the MLflow reads of the scan alone (the grid's own report reads more)
                    self.scan_get_run = self.calls["mlflow.get_run"] - before

        timed.__wrapped__ = original
        setattr(owner, name, timed)

    @staticmethod
    def restore(owner: Any, name: str) -> None:
        setattr(owner, name, getattr(owner, name).__wrapped__)


MLFLOW_CALLS = ("create_run", "log_batch", "set_terminated", "update_run", "log_artifact", "search_runs", "get_run",
                "set_tag", "set_experiment_tag", "create_experiment", "get_experiment_by_name")


@contextmanager
def _instrumented() -> Any:
    """Time the driver loop, its blocked waits, the grid's recovery scan and every MlflowClient call."""
    from mlflow import MlflowClient

    from harness import grid, ray_backend, session

    timers = _Timers()
    hooks = [(session, "drive", "drive"), (ray_backend.RayLauncher, "wait", "wait"),
             (grid.GridPolicy, "start", "policy.start"),
             *((MlflowClient, n, f"mlflow.{n}") for n in MLFLOW_CALLS)]
    for owner, name, label in hooks:
        timers.wrap(owner, name, label)
    try:
        yield timers
    finally:
        for owner, name, _ in hooks:
            timers.restore(owner, name)


def measure(*, cells: int, out: Path, concurrency: int, steps: int = 1) -> dict[str, Any]:
    """Run the grid, resume it, report it; return the figures (Ray must be connected, or is started here)."""
    from rich.console import Console

    from harness.grid import run_grid
    from harness.spec import parse_spec

    spec = parse_spec(scale_spec(cells, steps=steps))
    quiet = Console(file=io.StringIO(), width=200)
    with _instrumented() as t:
        tic = time.perf_counter()
        first = run_grid(spec, out_dir=out, console=quiet, max_concurrent=concurrency, train_fn=trivial_train,
                         fresh_workers=False)
        grid_s = time.perf_counter() - tic
    assert first.exit_code == 0, [r.status for r in first.results if not r.done][:5]
    writes = {k.removeprefix("mlflow."): v for k, v in t.calls.items() if k.startswith("mlflow.")}
    mlflow_s = sum(v for k, v in t.seconds.items() if k.startswith("mlflow."))
    driver_s = t.seconds["drive"] - t.seconds["wait"]
    with _instrumented() as r:
        tic = time.perf_counter()
        again = run_grid(spec, out_dir=out, console=quiet, max_concurrent=concurrency, train_fn=trivial_train,
                         fresh_workers=False)
        resume_total_s = time.perf_counter() - tic
    assert {x.status for x in again.results} == {"skipped"}, "resume trained cells again"
    tic = time.perf_counter()
    cmd = [sys.executable, "-m", "harness.cli", "report", "--run", first.parent_run_id, "--tracking-uri", str(out),
           "--out", str(out / "report_cli")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    report_s = time.perf_counter() - tic
    assert done.returncode == 0, done.stderr[-2000:]
    return {
        "cells": cells, "concurrency": concurrency, "trial_s": steps * STEP_S,
        "grid_wall_s": round(grid_s, 2), "drive_wall_s": round(t.seconds["drive"], 2),
        "driver_busy_s": round(driver_s, 2), "driver_ms_per_cell": round(1000 * driver_s / cells, 2),
        "mlflow_calls_per_cell": round(sum(writes.values()) / cells, 2), "mlflow_calls": dict(writes),
        "mlflow_ms_per_cell": round(1000 * mlflow_s / cells, 2),
        "resume_s": round(r.seconds["policy.start"], 2), "resume_scan_get_run": r.scan_get_run, "resume_total_s": round(resume_total_s, 2),
        "report_s": round(report_s, 2), "load_average": list(os.getloadavg()),
    }


def print_table(res: dict[str, Any]) -> None:
    """Figures against the targets."""
    print(f"bench_scale: {res['cells']} cells, {res['concurrency']} at once, trivial trials of {res['trial_s']} s; "
          f"load average {', '.join(f'{x:.1f}' for x in res['load_average'])}")
    print(f"{'measure':<38}{'measured':>12}{'target':>10}  verdict")
    for key, label in (("driver_ms_per_cell", "driver overhead per cell (ms)"),
                       ("resume_s", "resume scan of the finished grid (s)"),
                       ("report_s", "ddsm-bench report on all runs (s)")):
        ok = res[key] <= TARGETS[key]
        print(f"{label:<38}{res[key]:>12.2f}{TARGETS[key]:>10.1f}  {'met' if ok else 'MISSED'}")
    print(f"{'MLflow calls per cell':<38}{res['mlflow_calls_per_cell']:>12.2f}{'':>10}  "
          f"({res['mlflow_ms_per_cell']:.1f} ms per cell)")
    print(f"{'grid wall / driver loop wall (s)':<38}{res['grid_wall_s']:>12.1f}{res['drive_wall_s']:>10.1f}")
    print(f"{'resume, whole command (s)':<38}{res['resume_total_s']:>12.1f}")
    print("MLflow calls:", ", ".join(f"{k} {v}" for k, v in sorted(res["mlflow_calls"].items())))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start the fake cluster, measure, print and save."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--cpus", type=int, default=16, help="fake CPUs of the local Ray instance")
    parser.add_argument("--concurrency", type=int, default=None, help="trials at once (default --cpus)")
    parser.add_argument("--steps", type=int, default=1, help=f"steps per trivial trial ({STEP_S} s each)")
    parser.add_argument("--out", type=Path, default=None, help="grid folder (default: a temporary one)")
    args = parser.parse_args(argv)

    from harness import ray_backend

    ray_backend.connect(None, num_cpus=args.cpus)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        out = (args.out or Path(tmp) / "grid").resolve()
        res = measure(cells=args.cells, out=out, concurrency=args.concurrency or args.cpus, steps=args.steps)
    ray_backend.shutdown()
    print_table(res)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_scale.json").write_text(json.dumps({**res, "targets": TARGETS}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
