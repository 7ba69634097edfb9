"""Train hash vs eval hash in the grid policy, without Ray or MLflow: a changed eval section re-evaluates
finished cells (evaluate-only attempts, same runs, new eval hash), ``--reevaluate`` forces it, a config failure is
never retried, an out dir of the old hash scheme is refused, and the cost phase runs once per variant.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ddsm.config import ConfigError
from harness.cells import HASH_VERSION, expand
from harness.driver import StopFlag, drive
from harness.grid import GridPolicy, _cost_phase, check_out_dir
from harness.spec import parse_spec
from tests.harness.fakes import FakeLauncher, MemoryRecorder, NoConsole, default_script, failing_script

RAW = {"name": "g", "base": {"train": {"steps": 4}, "eval": {"tolerances": [1, 2]}},
       "baselines": [{"name": "fpn", "overrides": {"model.name": "fpn"}},
                     {"name": "sfnet", "overrides": {"model.name": "sfnet"}}],
       "seeds": [0, 1], "max_failures": 2}


def _spec(**eval_section):
    raw = copy.deepcopy(RAW)
    raw["base"]["eval"].update(eval_section)
    return parse_spec(raw)


def _run(spec, out: Path, recorder: MemoryRecorder, launcher: FakeLauncher, **kw) -> GridPolicy:
    parent = recorder.start_parent(key="grid", name="g", tags={}, params={})
    policy = GridPolicy(spec=spec, cells=expand(spec), out=out, recorder=recorder, parent=parent, sha="sha", **kw)
    assert not drive(policy, launcher, recorder, NoConsole(), limit=2, stop=StopFlag())
    return policy


def _trained(out: Path, policy: GridPolicy) -> None:
    """What a worker leaves when training ends: the final checkpoint (the fake launcher writes result.json)."""
    for r in policy.results:
        ckpt = out / "cells" / r.cell.hash / "checkpoints" / "last.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"weights")


def test_changing_only_eval_evaluates_every_finished_cell_into_its_run(tmp_path: Path):
    recorder = MemoryRecorder()
    first = _run(_spec(), tmp_path, recorder, FakeLauncher())
    _trained(tmp_path, first)
    runs = {h: rs[0].run_id for h, rs in recorder.by_hash().items()}

    changed = _spec(tolerances=[1, 3])
    assert [c.hash for c in expand(changed)] == [r.cell.hash for r in first.results]  # same weights
    assert all(a.eval_hash != b.eval_hash for a, b in zip(expand(changed), (r.cell for r in first.results)))
    launcher = FakeLauncher()
    second = _run(changed, tmp_path, recorder, launcher)
    assert {p.mode for p in launcher.submitted} == {"evaluate"} and len(launcher.submitted) == 4
    assert all(r.status == "finished" and (r.attempts, r.evaluations) == (0, 1) for r in second.results)
    for r in second.results:
        (run,) = recorder.by_hash()[r.cell.hash]  # the same run, not a new one
        assert run.run_id == runs[r.cell.hash] and run.status == "FINISHED"
        assert run.tags["eval_hash"] == r.cell.eval_hash and run.tags["eval.tolerances"] == "[1.0, 3.0]"
        assert run.tags["attempts"] == "1"  # what the training recorded is kept
        assert "eval.tolerances" not in run.params  # params are what trained the weights

    third = FakeLauncher()  # the same eval again: nothing to do
    assert {r.status for r in _run(changed, tmp_path, recorder, third).results} == {"skipped"}
    assert not third.submitted
    forced = FakeLauncher()  # --reevaluate
    _run(changed, tmp_path, recorder, forced, reevaluate=True)
    assert [p.mode for p in forced.submitted] == ["evaluate"] * 4


def test_a_cell_without_its_final_checkpoint_trains_instead(tmp_path: Path):
    recorder = MemoryRecorder()
    _run(_spec(), tmp_path, recorder, FakeLauncher())  # no checkpoints on disk
    launcher = FakeLauncher()
    _run(_spec(flip=True), tmp_path, recorder, launcher)
    assert {p.mode for p in launcher.submitted} == {"train"}


def test_a_config_failure_is_never_retried(tmp_path: Path):
    recorder = MemoryRecorder()
    launcher = FakeLauncher(lambda p: failing_script("config") if p.attempt == 1 else default_script(p))
    policy = _run(parse_spec({**RAW, "retry_on": ["oom", "error", "killed"]}), tmp_path, recorder, launcher)
    assert {(r.status, r.attempts) for r in policy.results} == {("failed", 1)}  # max_failures 2, not used
    assert {run.tags["failure_class"] for run in recorder.children()} == {"config"}


def test_an_out_dir_of_the_old_hash_scheme_is_refused(tmp_path: Path):
    check_out_dir(tmp_path)  # nothing there yet: fine
    (tmp_path / "grid.json").write_text(json.dumps({"name": "g", "cells": []}))
    with pytest.raises(ConfigError, match="older ddsm-bench .*version 1.*new --out"):
        check_out_dir(tmp_path)
    (tmp_path / "grid.json").write_text(json.dumps({"hash_version": HASH_VERSION, "cells": []}))
    check_out_dir(tmp_path)


def test_cost_phase_measures_each_variant_once_and_records_every_seed(tmp_path: Path):
    recorder = MemoryRecorder()
    spec = _spec()
    policy = _run(spec, tmp_path, recorder, FakeLauncher())
    calls: list[str] = []

    def measure(task):
        calls.append(task.variant)
        ms = {"fpn": 5.0, "sfnet": 7.0}[task.variant]
        return {"key": task.key, "variant": task.variant, "device": "cpu", "device_type": "cpu", "cpu_threads": 1,
                "size": list(task.size), "latency_ms": {"median": ms, "p25": ms - 1, "p75": ms + 1},
                "train_step_ms": {"median": 3 * ms, "p25": 3 * ms - 1, "p75": 3 * ms + 1}, "peak_mem_mb": 10 * ms,
                "train_peak_mem_mb": 20 * ms}

    parent = recorder.start_parent(key="grid", name="g", tags={}, params={})
    records = _cost_phase(spec, policy, recorder=recorder, parent=parent, measure=measure, console=None)
    assert calls == ["fpn", "sfnet"] and set(records) == {"fpn", "sfnet"}  # 4 cells, 2 variants
    for r in policy.results:
        final = recorder.final_metrics(r.run_id)
        expected = 5.0 if r.cell.variant == "fpn" else 7.0
        assert (final["latency_ms"], final["latency_ms_p25"], final["latency_ms_p75"]) == (
            expected, expected - 1, expected + 1)
        assert final["trial_latency_ms"] == 3.0  # what the trial measured, kept as a diagnostic
        assert recorder.runs[r.run_id].tags["cost_source"].startswith("isolated:")
    assert "isolated cost phase" in recorder.runs[parent].tags["cost_phase"]
    _cost_phase(spec, policy, recorder=recorder, parent=parent, measure=measure, console=None)
    assert calls == ["fpn", "sfnet"]  # cached in <out>/cost: a re-run measures nothing again
