"""bench_train_step's part 1 runs in a fresh process per OpenMP wait policy, with the variables as named."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks import bench_train_step
from benchmarks._common import environ


@pytest.mark.parametrize("policy", list(bench_train_step.OMP_POLICIES))
def test_each_policy_reaches_the_process_started_under_it(policy: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the parent's own settings must not leak into part 1
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    with bench_train_step.part1_process(policy) as pool:
        seen = {name: pool.submit(os.getenv, name).result() for name in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}
    assert seen == {"OMP_WAIT_POLICY": bench_train_step.OMP_POLICIES[policy],  # None: unset, OpenMP's default
                    "THP_MEM_ALLOC_ENABLE": None}  # c10's default allocator, as training runs
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"  # restored


def test_environ_unsets_and_restores_a_variable_that_was_not_set(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DDSM_TEST_VAR", raising=False)
    with environ("DDSM_TEST_VAR", "1"):
        assert os.environ["DDSM_TEST_VAR"] == "1"
    assert "DDSM_TEST_VAR" not in os.environ


def test_step_times_under_a_policy_times_both_models():
    times = bench_train_step.step_times_under("passive", threads=1, repeats=1, warmup=0, size=(32, 64), batch=2)
    assert set(times) == {"ddsm", "fpn"} and all(len(t) == 1 and t[0] > 0 for t in times.values())


def test_an_unknown_policy_is_refused_before_any_work():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_step", "--part1-policies", "default,spin"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
                                                                            "THP_MEM_ALLOC_ENABLE": "1"})
    assert proc.returncode == 2
    assert "--part1-policies 'default,spin'" in proc.stderr and "default, passive" in proc.stderr
    assert "part 1" not in proc.stdout
