"""Cost of the harness: ``ddsm-bench run`` of a 4-cell grid vs the same 4 configs by ``ddsm-bench train``.

Both sides are subprocesses started the way a user would start them, and both do the same work:

- the grid: a spec written to a temp folder (the quickstart base: ResNet-18 fpn and ddsm (dual,
  N=9) x seeds 0, 1 on 64x64 synthetic scenes, ``--steps`` steps each, ``resources.cpus`` CPUs per
  trial), run as ``ddsm-bench run SPEC --out DIR --max-concurrent 1``: Ray start, one fresh worker
  per trial (each but the first warmed while the trial before it trained), MLflow logging, the live
  progress, the end-of-grid comparison and report are included;
- back to back: each cell's resolved config (``harness.cells.expand`` -> ``ddsm.config.save_config``)
  run as ``ddsm-bench train CELL.yaml --out DIR``, one after the other.

Threads: a grid trial runs with ``torch.set_num_threads(int(resources.cpus))`` (``_single_task`` in
harness/ray_backend.py); the train side gets the same through ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS``
= cpus (set for both sides). The engine writes config.yaml first and metrics.json last in each cell
folder on both sides, so the engine's own time per cell is known on both; equal configs are checked
byte for byte, and the training-loop times (``train_time_s``) show whether both sides got the same CPU.

Load drift on a shared machine: the train side is split around the grid (cells 1-2, then the grid,
then cells 3-4), so a slow or busy phase of the machine falls on both sides alike.

Where the grid's extra time goes is read afterwards from what the run left behind (MLflow run start/
end times, file modification times): startup (imports, ``ray.init``, MLflow store), worker start per
trial, recording per trial (MLflow metrics + artifacts), gaps between trials, and the end (comparison,
report, Ray shutdown); then the fixed costs are timed one by one in a fresh process (imports, ``ray.init``,
a fresh Ray worker, a new MLflow store, the report, ``trial_cost``). Target: wall(run) / wall(train, back
to back) <= 1.10. Also printed: the engine-adjusted ratio, with the run side's engine time set to the
train side's; the engine work is identical, so this removes its load noise (often +-30% here) and is
the number to trust on a shared machine.

Like for like by default: the grid's isolated cost phase and per-trial figure views (measurements
``ddsm-bench train`` does not make) are off in the spec; ``--full`` keeps them.

Run: ``.venv/bin/python -m benchmarks.bench_harness [--steps S] [--cpus C] [--full] [--keep DIR] [--no-profile]
[--call-timeout S]``
(6-8 minutes on 2 busy cores); prints tables and writes benchmarks/results/bench_harness.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from benchmarks._common import load_average, machine, print_table, verdict, write_results

RATIO_TARGET = 1.10
EXPERIMENT = "bench_harness"
CALL_TIMEOUT_S = 900  # default limit of one subprocess (--call-timeout); the benchmark takes 6-8 min idle


def spec_dict(*, steps: int, cpus: float, full: bool = False) -> dict:
    """The 4-cell grid: fpn and ddsm (dual, N=9) x seeds 0, 1 on the quickstart base (64x64 synthetic).

    ``full``: keep the two measurements the grid makes that ``ddsm-bench train`` does not (the isolated
    cost phase, which times every variant alone after the grid, and the per-trial prediction views for
    the report's figures); off by default, so both sides do the same work and the ratio is the harness's.
    """
    every = max(1, steps // 2)
    extra = {} if full else {"cost": {"enabled": False}, "figures": {"enabled": False}}
    return {
        "name": EXPERIMENT,
        "description": "benchmarks/bench_harness.py: 4 cells, harness overhead",
        "baseline": "fpn",
        "base": {
            "model": {"backbone": "resnet18", "weights": None, "decoder_dim": 64},
            "data": {"name": "synthetic", "image_size": [64, 64], "crop_size": [64, 64], "scale_range": [0.75, 1.25],
                     "num_images": 64, "num_classes": 8, "batch_size": 8},
            "train": {"steps": steps, "lr": 0.02, "warmup_steps": 4, "val_every": every, "ckpt_every": every,
                      "log_every": 8, "device": "cpu"},
            "eval": {"tolerances": [1, 2]},
        },
        "baselines": [{"name": "fpn", "overrides": {"model.name": "fpn"}},
                      {"name": "ddsm", "overrides": {"model.name": "ddsm", "model.num_points": 9,
                                                     "model.branches": "dual"}}],
        "seeds": [0, 1],
        "resources": {"cpus": cpus, "gpus": 0},
        "max_failures": 0,
        **extra,
    }


def write_cells(spec_path: Path, folder: Path) -> list[dict]:
    """Expand the spec and save each cell's resolved config as ``folder/<hash>.yaml``; return name/hash/path."""
    from ddsm.config import save_config
    from harness.cells import expand
    from harness.spec import load_spec

    cells = []
    for cell in expand(load_spec(spec_path)):
        path = folder / f"{cell.hash}.yaml"
        save_config(cell.config, path)
        cells.append({"name": cell.name, "hash": cell.hash, "config": path})
    return cells


def bench_env(cpus: float) -> dict[str, str]:
    """This environment with ``cpus`` OpenMP/MKL threads and no test hooks (the same for both sides)."""
    env = {k: v for k, v in os.environ.items() if k != "DDSM_BENCH_FAIL_ONCE"}
    threads = str(max(1, int(cpus)))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def timed_call(argv: list[str], *, log: Path, env: dict[str, str], done: Callable[[], bool] = lambda: False,
               call_timeout_s: float = CALL_TIMEOUT_S) -> tuple[float, float, int]:
    """Run ``argv`` with stdout+stderr to ``log``; return (start, end) epoch seconds and the exit code.

    Raises RuntimeError when the exit code is not 0, unless ``done()`` says the work was all done
    anyway (e.g. every cell of a grid finished and only a final print failed); the caller reports it.
    """
    with log.open("w") as out:
        start = time.time()
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=call_timeout_s)
        end = time.time()
    if proc.returncode != 0 and not done():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}; last lines of {log}:\n{tail}")
    return start, end, proc.returncode


def grid_finished(out: Path, cells: list[dict]) -> bool:
    """Every cell of the grid wrote result.json and the MLflow grid run was closed."""
    if not all((out / "cells" / c["hash"] / "result.json").is_file() for c in cells):
        return False
    grid = mlflow_times(out).get("grid")
    return grid is not None and grid["end"] > 0


def engine_span(cell_dir: Path) -> dict[str, float]:
    """Engine start/end (config.yaml / metrics.json mtimes) and its training-loop seconds of one cell folder."""
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    return {"start": (cell_dir / "config.yaml").stat().st_mtime, "end": (cell_dir / "metrics.json").stat().st_mtime,
            "train_loop_s": float(metrics["train_time_s"])}


def mlflow_times(out: Path) -> dict[str, dict[str, float]]:
    """Start/end epoch seconds and run id of the grid's parent run (key ``grid``) and of each cell run (key: hash)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    times = {}
    for run in client.search_runs([exp.experiment_id]):
        key = "grid" if run.data.tags.get("kind") == "grid" else run.data.tags.get("cell_hash")
        times[key] = {"start": run.info.start_time / 1e3, "end": (run.info.end_time or 0) / 1e3,
                      "run_id": run.info.run_id}
    return times


def run_breakdown(start: float, end: float, out: Path, cells: list[dict]) -> dict[str, float]:
    """Seconds of each phase of the ``ddsm-bench run`` call (cells in launch order)."""
    runs = mlflow_times(out)
    spans = [engine_span(out / "cells" / c["hash"]) for c in cells]
    cell_runs = sorted((runs[c["hash"]] for c in cells), key=lambda r: r["start"])
    gaps = [b["start"] - a["end"] for a, b in zip(cell_runs, cell_runs[1:])]
    by_hash = {c["hash"]: (runs[c["hash"]], s) for c, s in zip(cells, spans)}
    return {
        "startup: imports, spec, ray.init, MLflow store": runs["grid"]["start"] - start,
        "before 1st launch: resume check, Ray queue": cell_runs[0]["start"] - runs["grid"]["start"],
        "worker start per trial: process, imports": sum(s["start"] - r["start"] for r, s in by_hash.values()),
        "engine: train loop": sum(s["train_loop_s"] for s in spans),
        "engine: build, ckpt, eval, trial_cost": sum(s["end"] - s["start"] - s["train_loop_s"] for s in spans),
        "record per trial: return, MLflow, artifacts": sum(r["end"] - s["end"] for r, s in by_hash.values()),
        "between trials: poll, next MLflow run": sum(gaps),
        "end: grid.json artifact, close grid run": runs["grid"]["end"] - cell_runs[-1]["end"],
        "end: summary, report, ray.shutdown, exit": end - runs["grid"]["end"],
    }


def train_breakdown(calls: list[tuple[float, float, int]], spans: list[dict[str, float]]) -> dict[str, float]:
    """Seconds of each phase of the ``ddsm-bench train`` calls, in the run side's phase names.

    The train side's wall time is the sum of its calls' wall times, so the moments between calls
    (this script starting the next one) count as 0 s.
    """
    return {
        "startup: imports, spec, ray.init, MLflow store": 0.0,
        "before 1st launch: resume check, Ray queue": 0.0,
        "worker start per trial: process, imports": sum(s["start"] - c[0] for c, s in zip(calls, spans)),
        "engine: train loop": sum(s["train_loop_s"] for s in spans),
        "engine: build, ckpt, eval, trial_cost": sum(s["end"] - s["start"] - s["train_loop_s"] for s in spans),
        "record per trial: return, MLflow, artifacts": sum(c[1] - s["end"] for c, s in zip(calls, spans)),
        "between trials: poll, next MLflow run": 0.0,
        "end: grid.json artifact, close grid run": 0.0,
        "end: summary, report, ray.shutdown, exit": 0.0,
    }


# The harness's fixed costs one by one, in a fresh interpreter (imports are timed cold, in the driver's
# order). argv: spec path, grid folder, grid run id, scratch folder. Prints one JSON line.
_STAGES = r"""
import json, sys, time
from pathlib import Path
spec_path, grid_out, grid_run, scratch = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
T = {}
def lap(name, t0):
    T[name] = time.perf_counter() - t0
t = time.perf_counter(); import torch, torchvision, ddsm.models, harness.spec; lap("import torch, torchvision, ddsm", t)
t = time.perf_counter(); import ray, harness.ray_backend as rb; lap("import ray", t)
t = time.perf_counter(); import harness.mlflow_io, harness.console, harness.session as rs; lap("import mlflow, rich", t)
t = time.perf_counter(); rb.connect(None); lap("ray.init (local instance)", t)
@ray.remote(max_calls=1)
def bare():
    return 0
@ray.remote(max_calls=1)
def heavy():
    import torch, ddsm.engine, harness.ray_backend
    return 0
t = time.perf_counter(); ray.get(bare.remote()); lap("Ray task in a fresh worker, no imports", t)
t = time.perf_counter(); ray.get(heavy.remote()); lap("Ray task in a fresh worker importing torch, ddsm.engine", t)
t = time.perf_counter(); ray.shutdown(); lap("ray.shutdown", t)
t = time.perf_counter(); rs.git_sha(); lap("git describe (tag of every run)", t)
from ddsm.config import to_dict
from harness.cells import expand
from harness.spec import flatten, load_spec
cell = expand(load_spec(spec_path))[-1]
t = time.perf_counter()
tracker = harness.mlflow_io.MlflowRecorder(tracking_uri=f"sqlite:///{scratch / 'mlflow.db'}", experiment="stages",
                                   artifact_root=scratch / "mlartifacts")
lap("MLflow: new sqlite store + experiment", t)
t = time.perf_counter(); parent = tracker.start_parent(key="x", name="x", tags={"a": 1}, params={"b": 2})
lap("MLflow: grid run", t)
t = time.perf_counter()
run = tracker.start_run(name=cell.name, parent_id=parent, cell_hash=cell.hash, params=flatten(to_dict(cell.config)),
                         tags={"seed": cell.seed})
lap("MLflow: open one cell run (params, tags)", t)
from harness.mlflow_io import write_report_from_mlflow  # imports pandas, matplotlib when called
t = time.perf_counter()
write_report_from_mlflow(f"sqlite:///{grid_out / 'mlflow.db'}", parent_run_id=grid_run, out_dir=scratch / "report",
                         baseline="fpn")
lap("report: imports, tables and figures of the grid", t)
from ddsm.models import build_model_from_config
from ddsm.profile import trial_cost
model = build_model_from_config(cell.config.model, num_classes=cell.config.data.num_classes)
t = time.perf_counter(); trial_cost(model, cell.config, device="cpu")
lap("trial_cost of one ddsm cell (both sides)", t)
print(json.dumps(T))
"""


def stage_profile(folder: Path, spec_path: Path, env: dict[str, str],
                  call_timeout_s: float = CALL_TIMEOUT_S) -> dict[str, float]:
    """Seconds of each fixed cost of the harness (see ``_STAGES``), measured one by one in a fresh process."""
    grid_out, scratch = folder / "grid", folder / "stages"
    scratch.mkdir(exist_ok=True)
    argv = [sys.executable, "-c", _STAGES, str(spec_path), str(grid_out), mlflow_times(grid_out)["grid"]["run_id"],
            str(scratch)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=call_timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"stage profile failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_both(cli: Path, folder: Path, spec_path: Path, cells: list[dict], env: dict[str, str],
             call_timeout_s: float = CALL_TIMEOUT_S) -> dict:
    """Train cells 1-2, run the grid, train cells 3-4; return the calls' (start, end, exit code)."""

    def train_cell(i: int) -> tuple[float, float, int]:
        c = cells[i]
        print(f"train side: {c['name']} ...", flush=True)
        return timed_call([str(cli), "train", str(c["config"]), "--out", str(folder / "train" / c["hash"])],
                          log=folder / f"train-{i}.log", env=env, call_timeout_s=call_timeout_s)

    grid_out = folder / "grid"
    calls = [train_cell(0), train_cell(1)]  # half of the train side before the grid, half after (load drift)
    print("run side: ddsm-bench run --max-concurrent 1 ...", flush=True)
    run_call = timed_call([str(cli), "run", str(spec_path), "--out", str(grid_out), "--max-concurrent", "1"],
                          log=folder / "run.log", env=env, done=lambda: grid_finished(grid_out, cells),
                          call_timeout_s=call_timeout_s)
    calls += [train_cell(2), train_cell(3)]
    return {"train": calls, "run": run_call}


def results(folder: Path, cells: list[dict], calls: dict, *, steps: int, threads: int) -> dict:
    """Wall times, ratio, verdict, fairness checks and both breakdowns as one JSON-ready dict."""
    grid_out = folder / "grid"
    train_spans = [engine_span(folder / "train" / c["hash"]) for c in cells]
    run_spans = [engine_span(grid_out / "cells" / c["hash"]) for c in cells]
    train_wall = sum(end - start for start, end, _ in calls["train"])
    run_start, run_end, run_rc = calls["run"]
    ratio = (run_end - run_start) / train_wall
    return {
        "cells": [{k: v for k, v in c.items() if k != "config"} for c in cells], "steps": steps,
        "torch_threads_per_trial": threads, "max_concurrent": 1,
        "configs_identical": all((folder / "train" / c["hash"] / "config.yaml").read_bytes()
                                 == (grid_out / "cells" / c["hash"] / "config.yaml").read_bytes() for c in cells),
        "order": "train cells 1-2, then the grid, then train cells 3-4",
        "train_wall_s": train_wall, "run_wall_s": run_end - run_start,
        "train_per_cell_s": train_wall / len(cells), "run_per_cell_s": (run_end - run_start) / len(cells),
        "train_cell_walls_s": [end - start for start, end, _ in calls["train"]],
        "train_loop_s": {"train": sum(s["train_loop_s"] for s in train_spans),
                         "run": sum(s["train_loop_s"] for s in run_spans)},
        "run_exit_code": run_rc, "ratio": ratio, "target": RATIO_TARGET,
        "verdict": verdict(ratio, RATIO_TARGET, at_most=True),
        "breakdown_run_s": run_breakdown(run_start, run_end, grid_out, cells),
        "breakdown_train_s": train_breakdown(calls["train"], train_spans),
    }


def overhead_model(r: dict) -> dict[str, float]:
    """The grid's extra time outside the engine: fixed part, per-trial part, engine-adjusted ratio, break-even.

    The engine does the same work on both sides, so its time differs only by load noise; taking it as
    long on the run side as on the train side gives the ratio the harness alone causes. Fixed: startup,
    before the first launch, the end; per trial: worker start, recording, gaps (per cell). A train-side
    cell must last ``(fixed + n * per_trial) / (n * (target - 1))`` s for that ratio to meet the target.
    """
    n = len(r["cells"])
    extra = {k: r["breakdown_run_s"][k] - r["breakdown_train_s"][k] for k in r["breakdown_run_s"]}
    fixed = sum(v for k, v in extra.items() if k.startswith(("startup", "before", "end")))
    per_trial = sum(v for k, v in extra.items() if k.startswith(("worker", "record", "between"))) / n
    ratio = (r["train_wall_s"] + fixed + n * per_trial) / r["train_wall_s"]
    return {"fixed_s": fixed, "per_trial_s": per_trial, "engine_noise_s": sum(
                v for k, v in extra.items() if k.startswith("engine")),
            "ratio_engine_adjusted": ratio, "verdict_engine_adjusted": verdict(ratio, r["target"], at_most=True),
            "cell_s_for_target": (fixed + n * per_trial) / (n * (r["target"] - 1))}


def print_results(r: dict) -> None:
    """The comparison table and the per-phase breakdown."""
    n = len(r["cells"])
    print(f"\n{n} cells ({', '.join(c['name'] for c in r['cells'])}), {r['steps']} steps each, 64x64 synthetic, "
          f"batch 8; one trial at a time on both sides (--max-concurrent 1), {r['torch_threads_per_trial']} torch "
          f"thread(s) per trial on both sides; configs identical on both sides: {r['configs_identical']}; load "
          f"average {r['load_avg_before']} -> {r['load_avg_after']} on {os.cpu_count()} cores; "
          + ("--full: the grid also runs its isolated cost phase and saves per-trial figure views\n" if r.get("full")
             else "like for like: the grid's isolated cost phase and figure views off (--full keeps them)\n"))
    rows = [{"side": "ddsm-bench train x4, back to back", "wall s": f"{r['train_wall_s']:.1f}",
             "per cell s": f"{r['train_per_cell_s']:.1f}", "train loops s": f"{r['train_loop_s']['train']:.1f}"},
            {"side": "ddsm-bench run (Ray, MLflow, report)", "wall s": f"{r['run_wall_s']:.1f}",
             "per cell s": f"{r['run_per_cell_s']:.1f}", "train loops s": f"{r['train_loop_s']['run']:.1f}"}]
    print_table(rows, ["side", "wall s", "per cell s", "train loops s"])
    print(f"\nratio run / train = {r['ratio']:.3f}   target <= {r['target']}   {r['verdict']}")
    if r["run_exit_code"] != 0:
        print(f"note: `ddsm-bench run` exited {r['run_exit_code']} although all {n} cells finished and the grid run "
              "was closed (a failure after the last record; see run.log); its wall time above is complete")
    run_parts, train_parts = r["breakdown_run_s"], r["breakdown_train_s"]
    phases = [{"phase": k, "run s": f"{run_parts[k]:.1f}", "train s": f"{train_parts[k]:.1f}",
               "extra s": f"{run_parts[k] - train_parts[k]:+.1f}"} for k in run_parts]
    phases.append({"phase": "total (wall)", "run s": f"{r['run_wall_s']:.1f}", "train s": f"{r['train_wall_s']:.1f}",
                   "extra s": f"{r['run_wall_s'] - r['train_wall_s']:+.1f}"})
    print(f"\nwhere the time goes (sums over the {n} cells; from MLflow run times and file mtimes):")
    print_table(phases, ["phase", "run s", "train s", "extra s"])
    m = r["overhead_model"]
    print(f"\noutside the engine the grid adds {m['fixed_s']:.1f} s fixed + {m['per_trial_s']:.1f} s per trial; "
          f"the engine itself (same work) took {m['engine_noise_s']:+.1f} s on the run side (load noise).\n"
          f"engine-adjusted ratio (run side's engine as long as the train side's) = {m['ratio_engine_adjusted']:.3f}"
          f"   target <= {r['target']}   {m['verdict_engine_adjusted']}; it meets the target with {n} cells of "
          f">= {m['cell_s_for_target']:.0f} s (here {r['train_per_cell_s']:.0f} s)")
    if "stages_s" in r:
        print("\nfixed costs one by one (fresh process; imports cold, in the driver's order):")
        print_table([{"stage": k, "s": f"{v:.2f}"} for k, v in r["stages_s"].items()], ["stage", "s"])


def main() -> None:
    """Write the spec and cell configs, run both sides, print and save the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=128, help="training steps per cell (128: ~60 s per cell here)")
    ap.add_argument("--full", action="store_true", help="keep the grid's isolated cost phase and per-trial "
                    "figure views (work the train side does not do; off: like for like)")
    ap.add_argument("--cpus", type=float, default=1.0, help="resources.cpus per trial = torch threads on both sides")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder (default: a temp folder)")
    ap.add_argument("--no-profile", action="store_true", help="skip timing the harness's fixed costs one by one")
    ap.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT_S, help="seconds one subprocess may take "
                    f"(default {CALL_TIMEOUT_S}; the grid took > 900 at load 30-40)")
    args = ap.parse_args()
    cli = Path(sys.executable).parent / "ddsm-bench"
    if not cli.is_file():
        sys.exit(f"{cli} not found: install the project (make install) so the console script exists")

    folder = Path(tempfile.mkdtemp(prefix="bench_harness-")) if args.keep is None else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(steps=args.steps, cpus=args.cpus, full=args.full), sort_keys=False))
    cells = write_cells(spec_path, folder)
    load_before = load_average()
    calls = run_both(cli, folder, spec_path, cells, bench_env(args.cpus), call_timeout_s=args.call_timeout)
    load_after = load_average()
    r = {"machine": machine(), "load_avg_before": load_before, "load_avg_after": load_after, "full": args.full,
         **results(folder, cells, calls, steps=args.steps, threads=max(1, int(args.cpus)))}
    r["overhead_model"] = overhead_model(r)
    if not args.no_profile:
        print("profiling the harness's fixed costs one by one ...", flush=True)
        r["stages_s"] = stage_profile(folder, spec_path, bench_env(args.cpus), call_timeout_s=args.call_timeout)
    print_results(r)
    print(f"\nwrote {write_results('bench_harness', r)}")
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
