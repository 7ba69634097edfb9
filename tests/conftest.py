"""Shared fixtures: one Ray instance for the whole test session (starting Ray costs seconds).

Tests run with one intra-op thread per process: the suite runs Ray workers and subprocesses beside the
pytest process on a 2-core machine, and oversubscribed OpenMP threads there run ~10x slower.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, inherited by subprocesses

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def ray_address() -> str:
    """Start a local 2-CPU Ray instance once per session; yield its GCS address (for ``--address``).

    ``harness.ray_runner.run_grid`` reuses an initialised Ray in-process; subprocess drivers join it
    with ``--address``.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
