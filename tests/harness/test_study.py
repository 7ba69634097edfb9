"""harness.study end to end on Ray: pruning, resume after Ctrl-C, Pareto fronts, a runnable best spec.

These are the integration tests (a real Ray, Optuna, MLflow, training): they share the session's Ray
instance (``ray_address`` in conftest.py) and run tiny DDSM trials (32x32 synthetic scenes, 4 steps,
a validation at step 2) under ``--smoke``. The policy's logic (prune, requeue, interruption at any
point) is unit-tested without Ray in test_driver.py.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ddsm.config import ConfigError
from harness.cli import main as cli_main
from harness.study import run_study
from harness.tune_spec import parse_tune_spec


def test_pruning_without_validations_during_training_exits_2_before_ray_starts(tmp_path: Path, tiny_study,
                                                                                 quiet):
    raw = tiny_study()
    raw["smoke"]["train.val_every"] = 0
    with pytest.raises(ConfigError, match="pruning needs validations during training"):
        run_study(parse_tune_spec(raw), out_dir=tmp_path / "out", smoke=True, console=quiet)
    assert not (tmp_path / "out").exists()


def _trials(out: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}").trials


@pytest.mark.slow  # ~75 s on 2 cores; the study's paths stay covered by the fake-launcher tests of test_driver*
def test_smoke_study_prunes_records_and_exports_a_runnable_best_spec(ray_address: str, tmp_path: Path, tiny_study,
                                                                     quiet, mlflow_runs):
    # One trial at a time makes the study deterministic: TPE's seeded start-up samples, CPU training and
    # the order of the step-2 reports. Successive halving (reduction factor 3) then promotes a trial at
    # step 2 only if it is the best of the first values recorded there (top third later), so among 6
    # trials some are pruned unless every trial beats all earlier ones.
    spec = parse_tune_spec(tiny_study(smoke_trials=6, concurrency=1))
    out = tmp_path / "study"
    summary = run_study(spec, out_dir=out, smoke=True, console=quiet)
    assert summary.exit_code == 0 and summary.finished == 6
    trials = _trials(out, "tiny-smoke")
    assert [t.number for t in trials] == list(range(6))
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [t.intermediate_values for t in trials]
    for t in pruned:  # stopped at the first validation, below a value recorded before it
        assert t.user_attrs["pruned_at_step"] == 2 and list(t.intermediate_values) == [2]
        assert t.intermediate_values[2] < max(o.intermediate_values[2] for o in trials[: t.number])
        assert t.value == t.intermediate_values[2]  # Optuna keeps the last intermediate value
    runs = {int(r.data.tags["optuna_trial"]): r for r in mlflow_runs(out, "tiny-smoke")}
    assert sorted(runs) == list(range(6))
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for number, run in runs.items():
        assert run.data.tags["optuna_state"] == trials[number].state.name
        assert run.info.status == status[trials[number].state.name]
    for name in ("trials.csv", "history.png", "intermediate_values.png", "best.yaml", "study.json"):
        assert (out / name).is_file(), name
    assert len((out / "trials.csv").read_text().splitlines()) == 7
    best_number = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value).number
    (baseline,) = yaml.safe_load((out / "best.yaml").read_text())["baselines"]
    assert baseline["name"] == f"trial{best_number}"
    assert cli_main(["run", str(out / "best.yaml"), "--smoke", "--out", str(tmp_path / "confirm")]) == 0


def _attempt_lines(trial) -> list[str]:
    """The lines of a trial's ``attempts.jsonl`` (none when it never started)."""
    path = Path(trial.user_attrs["trial_dir"]) / "attempts.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.slow  # timing-dependent on live Ray: both 4-step trials can end before the interrupt lands
def test_ctrl_c_keeps_finished_trials_and_rerun_continues_the_count(ray_address: str, tmp_path: Path, tiny_study,
                                                                     quiet, mlflow_runs):
    spec = parse_tune_spec(tiny_study(smoke_trials=3, concurrency=2, pruning=False))
    out = tmp_path / "study"
    stop = threading.Event()

    def interrupt_when_one_finished_and_another_runs() -> None:
        while not stop.wait(0.1):
            dirs = sorted((out / "trials").glob("*")) if (out / "trials").is_dir() else []
            done = [d for d in dirs if (d / "result.json").is_file()]
            # a running trial with a checkpoint to resume from (its attempt is recorded before the first one)
            running = [d for d in dirs if (d / "checkpoints" / "last.pt").is_file() and not (d / "result.json").is_file()]
            if done and running:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
                return

    watcher = threading.Thread(target=interrupt_when_one_finished_and_another_runs, daemon=True)
    watcher.start()
    try:
        first = run_study(spec, out_dir=out, smoke=True, console=quiet)
    finally:
        stop.set()
        watcher.join()
    assert first.interrupted and first.exit_code == 130
    before = _trials(out, "tiny-smoke")
    complete = [t for t in before if t.state == TrialState.COMPLETE]
    interrupted = [t for t in before if t.state == TrialState.FAIL and t.user_attrs.get("interrupted")]
    waiting = [t for t in before if t.state == TrialState.WAITING]
    assert complete and interrupted and not [t for t in before if t.state == TrialState.RUNNING]
    assert sorted(t.user_attrs["requeued_from"] for t in waiting) == [t.number for t in interrupted]
    runs = {int(r.data.tags["optuna_trial"]): r for r in mlflow_runs(out, "tiny-smoke")}
    assert all(runs[t.number].info.status == "KILLED" and runs[t.number].data.tags["optuna_state"] == "FAIL"
               for t in interrupted)

    # attempts each interrupted trial had made: a trial launched into the slot the finished one freed may be
    # stopped before it started (it then runs once, in its folder); the watcher's trial may finish in the grace
    started = {t.number: len(_attempt_lines(t)) for t in interrupted}

    second = run_study(spec, out_dir=out, smoke=True, console=quiet)
    assert second.exit_code == 0 and second.finished == 3
    after = _trials(out, "tiny-smoke")
    assert [t.number for t in after] == list(range(len(after)))  # numbers go on, none reused
    assert all(after[t.number].state == TrialState.COMPLETE and after[t.number].values == t.values for t in complete)
    for old in interrupted:  # re-queued: same parameters, resumed in the interrupted trial's folder
        (new,) = [t for t in after if t.user_attrs.get("requeued_from") == old.number]
        assert new.number > old.number and new.state == TrialState.COMPLETE and new.params == old.params
        attempts = _attempt_lines(new)
        assert new.user_attrs["trial_dir"] == old.user_attrs["trial_dir"] and len(attempts) == started[old.number] + 1
        assert json.loads(attempts[-1])["resumed"] == bool(started[old.number])


def test_multi_objective_smoke_study_writes_a_pareto_front(ray_address: str, tmp_path: Path, tiny_study, quiet,
                                                           mlflow_runs):
    spec = parse_tune_spec(tiny_study(objectives={"miou": "maximize", "gflops": "minimize"}, smoke_trials=3,
                                 concurrency=2, sampler={"type": "nsga2", "seed": 0, "population_size": 4}))
    out = tmp_path / "study"
    summary = run_study(spec, out_dir=out, smoke=True, console=quiet)
    assert summary.exit_code == 0 and summary.states == {"COMPLETE": 3}
    for name in ("pareto_front.png", "pareto.csv", "history_miou.png", "history_gflops.png", "best.yaml"):
        assert (out / name).is_file(), name
    trials = _trials(out, "tiny-smoke")
    front = [t.number for t in trials if not any(
        o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in trials)]
    pareto = [int(line.split(",")[0]) for line in (out / "pareto.csv").read_text().splitlines()[1:]]
    assert sorted(pareto) == sorted(front)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert {b["name"] for b in best["baselines"]} <= {f"trial{n}" for n in front}
    assert all(r.data.tags["optuna_state"] == "COMPLETE" for r in mlflow_runs(out, "tiny-smoke"))
