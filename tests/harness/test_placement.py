"""Placement on a fake-GPU cluster: which node and GPU ran each attempt, and that cells never share a GPU.

A driver subprocess starts its own local Ray instance with 4 fake GPUs (``num_gpus=4`` on a CPU machine:
Ray assigns GPU ids and sets ``CUDA_VISIBLE_DEVICES`` as on a real node) and runs three grids of trivial
trials (``benchmarks.bench_scale.trivial_train``, device cpu): whole-GPU cells, half-GPU cells, and a
2-worker DDP cell. Each trial writes when it ran and the ``CUDA_VISIBLE_DEVICES`` it saw; the test
checks that against what the harness recorded (attempts.jsonl, MLflow tags, the report's provenance).
"""
from __future__ import annotations

import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

DRIVER = r'''
import io, json, sys, time
from pathlib import Path
from rich.console import Console
from benchmarks.bench_scale import scale_spec, trivial_train
from harness import ray_backend
from harness.grid import run_grid
from harness.spec import parse_spec

out = Path(sys.argv[1])
ray_backend.connect(None, num_cpus=8, num_gpus=4)
grids = {"whole": ({"cpus": 1, "gpus": 1}, 6), "half": ({"cpus": 1, "gpus": 0.5}, 8),
         "ddp": ({"cpus": 1, "gpus": 1, "num_workers": 2}, 1)}
for name, (resources, cells) in grids.items():
    raw = scale_spec(cells, steps=12, resources=resources)  # 12 steps x 0.05 s: trials overlap
    raw["name"] = name
    tic = time.time()
    s = run_grid(parse_spec(raw), out_dir=out / name, console=Console(file=io.StringIO()), train_fn=trivial_train,
                 fresh_workers=False)
    print("GRID", name, s.exit_code, round(time.time() - tic, 1), flush=True)
ray_backend.shutdown()
'''


@pytest.fixture(scope="module")
def fake_gpu_grids(tmp_path_factory, repo_root) -> Path:
    out = tmp_path_factory.mktemp("placement")
    done = subprocess.run([sys.executable, "-c", DRIVER, str(out)], cwd=repo_root, capture_output=True, text=True,
                          timeout=600)
    grids = [line.split()[1:3] for line in done.stdout.splitlines() if line.startswith("GRID ")]
    assert done.returncode == 0 and grids == [["whole", "0"], ["half", "0"], ["ddp", "0"]], \
        done.stdout + done.stderr[-3000:]
    return out


def _cells(grid: Path) -> list[tuple[dict, dict]]:
    """(last attempts.jsonl line, the trial's own trivial.json) per cell."""
    out = []
    for cell in sorted((grid / "cells").iterdir()):
        attempt = json.loads((cell / "attempts.jsonl").read_text().splitlines()[-1])
        out.append((attempt, json.loads((cell / "trivial.json").read_text())))
    return out


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_whole_gpu_cells_never_share_a_gpu_while_running(fake_gpu_grids: Path, mlflow_runs):
    cells = _cells(fake_gpu_grids / "whole")
    assert len(cells) == 6
    for attempt, seen in cells:
        assert len(attempt["gpu_ids"]) == 1 and attempt["node_id"] and attempt["host"]
        assert attempt["cuda_visible_devices"] == seen["cuda_visible_devices"] == attempt["gpu_ids"][0]
    assert any(_overlap(a[1], b[1]) for a, b in combinations(cells, 2))  # cells did run at the same time
    for (a, ta), (b, tb) in combinations(cells, 2):
        if _overlap(ta, tb):
            assert a["gpu_ids"] != b["gpu_ids"], (a, b)
    runs = mlflow_runs(fake_gpu_grids / "whole", "whole")
    assert sorted(r.data.tags["gpu_ids"] for r in runs) == sorted(a["gpu_ids"][0] for a, _ in cells)
    assert all(r.data.tags["ray_node_id"] == cells[0][0]["node_id"] for r in runs)
    report = (fake_gpu_grids / "whole" / "report" / "report.md").read_text()
    assert "Ray nodes: " + cells[0][0]["node_id"] in report and "GPUs: " in report


def test_half_gpu_cells_pack_two_per_gpu(fake_gpu_grids: Path):
    cells = _cells(fake_gpu_grids / "half")
    assert all(len(a["gpu_ids"]) == 1 for a, _ in cells)
    shared = [(a, b) for (a, ta), (b, tb) in combinations(cells, 2)
              if _overlap(ta, tb) and a["gpu_ids"] == b["gpu_ids"]]
    assert shared, "no two half-GPU cells ever ran on the same GPU at once"
    for (a, ta) in cells:  # never more than two at once on one GPU
        at_once = [b for b, tb in cells if b["gpu_ids"] == a["gpu_ids"] and _overlap(ta, tb)]
        assert len(at_once) <= 2


def test_ddp_workers_get_distinct_gpus(fake_gpu_grids: Path, mlflow_runs):
    ((attempt, _),) = _cells(fake_gpu_grids / "ddp")
    workers = attempt["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    gpus = [w["gpu_ids"] for w in workers]
    assert all(len(g) == 1 for g in gpus) and gpus[0] != gpus[1]
    (run,) = mlflow_runs(fake_gpu_grids / "ddp", "ddp")
    assert run.data.tags["gpu_ids"] == ",".join(g[0] for g in gpus)
    assert [w["rank"] for w in json.loads(run.data.tags["workers"])] == [0, 1]
