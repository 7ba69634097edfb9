"""Shared fixtures: one Ray instance per test session (starting Ray costs seconds), tiny configs, MLflow helpers.

Tests run with one intra-op thread per process: the suite runs Ray workers and subprocesses beside the
pytest process on a 2-core machine, and oversubscribed OpenMP threads there run ~10x slower.

The tree of tests mirrors the packages: ``tests/ddsm/<subpackage>/``, ``tests/harness/``,
``tests/reports/``, ``tests/benchmarks/``; architecture rules that span packages sit in ``tests/``.
"""
from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, inherited by subprocesses

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]

# One training trial, as small as the engine allows: fpn/resnet18 on 64x64 synthetic scenes, 2 steps.
TINY_BASE: dict[str, Any] = {
    "model": {"name": "fpn", "backbone": "resnet18", "decoder_dim": 32},
    "data": {"name": "synthetic", "image_size": [64, 64], "crop_size": [64, 64], "num_images": 4, "batch_size": 2},
    "train": {"steps": 2, "device": "cpu", "log_every": 1},
    "eval": {"tolerances": [1, 2], "max_images": 2},
}

# A tiny DDSM study; --smoke keeps 32x32 images, 4 steps and a validation at step 2.
TINY_STUDY: dict[str, Any] = {
    "name": "tiny",
    "base": {
        "model": {"name": "ddsm", "backbone": "resnet18", "weights": None, "decoder_dim": 16, "branches": "dual",
                  "num_points": 4},
        "data": {"name": "synthetic", "image_size": [32, 32], "crop_size": [32, 32], "num_images": 4,
                 "num_classes": 8, "batch_size": 2},
        "train": {"steps": 4, "val_every": 2, "lr": 0.02, "log_every": 1, "device": "cpu"},
        "eval": {"tolerances": [1], "max_images": 2},
    },
    "seeds": [0],
    "resources": {"cpus": 1, "gpus": 0},
    "smoke": {"data.image_size": [32, 32], "data.crop_size": [32, 32], "train.ohem_min_kept": 64},
    "search": {
        "params": {
            "train.lr": {"type": "float", "low": 1.0e-6, "high": 0.1, "log": True},
            "model.branches": ["spatial", "channel", "dual"],
            "model.pooled_size": {"type": "int", "low": 2, "high": 8, "step": 2,
                                  "when": {"model.branches": ["channel", "dual"]}},
        },
        "objectives": {"miou": "maximize"},
        "confirm_seeds": [0],
    },
}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (ablations/, reports/, ...)."""
    return ROOT


@pytest.fixture(scope="session")
def ray_address() -> str:
    """Start a local 2-CPU Ray instance once per session; yield its GCS address (for ``--address``).

    ``harness.grid.run_grid`` and ``harness.study.run_study`` reuse an initialised Ray in-process;
    subprocess drivers join it with ``--address``.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def quiet():
    """A rich Console writing to a string (progress and summaries out of the test log)."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


@pytest.fixture
def tiny_base() -> dict[str, Any]:
    """A copy of :data:`TINY_BASE` (a trial config dict) to change freely."""
    return copy.deepcopy(TINY_BASE)


@pytest.fixture
def tiny_study() -> Callable[..., dict[str, Any]]:
    """``tiny_study(**search)``: a copy of :data:`TINY_STUDY` with ``search`` keys replaced."""
    def make(**search: Any) -> dict[str, Any]:
        raw = copy.deepcopy(TINY_STUDY)
        raw["search"].update(search)
        return raw

    return make


@pytest.fixture
def write_spec() -> Callable[..., Path]:
    """``write_spec(path, **keys)``: a one-cell fpn grid spec on :data:`TINY_BASE` (keys replaced) as YAML."""
    def write(path: Path, **over: Any) -> Path:
        spec = {"name": path.stem, "base": copy.deepcopy(TINY_BASE), "baselines": [{"name": "fpn"}], "seeds": [0]}
        spec.update(over)
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


@pytest.fixture
def mlflow_runs() -> Callable[..., list]:
    """``mlflow_runs(out, experiment, kind="cell")``: the runs of a grid's or study's ``<out>/mlflow.db``."""
    def runs(out: Path, experiment: str, kind: str = "cell") -> list:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{Path(out).resolve() / 'mlflow.db'}")
        exp = client.get_experiment_by_name(experiment)
        return list(client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'")) if exp else []

    return runs


@pytest.fixture
def attempts() -> Callable[[Path], list[dict]]:
    """``attempts(cell_dir)``: the lines of a cell's ``attempts.jsonl`` (one per launch)."""
    def read(cell_dir: Path) -> list[dict]:
        path = Path(cell_dir) / "attempts.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    return read


@pytest.fixture
def spec_dict() -> Callable[..., dict[str, Any]]:
    """``spec_dict(**keys)``: a small valid grid spec dict (fpn vs ddsm with two branch settings, two seeds)."""
    def make(**over: Any) -> dict[str, Any]:
        d = {
            "name": "t",
            "base": {"data": {"name": "synthetic"}, "train": {"steps": 3}},
            "baselines": [
                {"name": "fpn", "overrides": {"model.name": "fpn"}},
                {"name": "ddsm", "overrides": {"model": {"name": "ddsm"}},
                 "axes": {"model.branches": ["spatial", "dual"]}},
            ],
            "seeds": [0, 1],
        }
        d.update(over)
        return d

    return make
