"""``ddsm-bench tune``: search-space parsing and errors, pruning, resume after Ctrl-C, Pareto fronts, best spec.

The Ray tests share the session's Ray instance (``ray_address`` in conftest.py) and run tiny DDSM
trials (32x32 synthetic scenes, 4 steps, a validation at step 2) under ``--smoke``.
"""
from __future__ import annotations

import copy
import io
import json
import os
import signal
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from rich.console import Console

from ddsm.config import ConfigError
from harness.cli import main as cli_main
from harness.search_space import load_tune_spec, parse_tune_spec
from harness.tune import best_spec, build_pruner, count_finished, open_study, run_study

ROOT = Path(__file__).resolve().parents[1]

# A tiny DDSM study; --smoke keeps 32x32 images, 4 steps and a validation at step 2.
TINY = {
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


def _spec(**search) -> dict:
    raw = copy.deepcopy(TINY)
    raw["search"].update(search)
    return raw


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _trials(out: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}").trials


def _child_runs(out: Path, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.kind = 'cell'")


# ----------------------------------------------------------------------------- parsing


def test_shipped_specs_parse_with_their_intended_strategy():
    quick = load_tune_spec(ROOT / "ablations/tune_quickstart.yaml").search
    assert quick.metrics == ["miou"] and quick.pruning and quick.sampler["type"] == "tpe"
    names = [p.name for p in quick.params]
    assert names.index("model.branches") < names.index("model.pooled_size")  # parent sampled first
    city = load_tune_spec(ROOT / "ablations/tune_cityscapes.yaml")
    assert city.search.multi and not city.search.pruning and city.search.sampler["type"] == "nsga2"
    assert city.search.directions == ["maximize", "minimize"]
    assert city.grid.resources.num_workers == 8 and city.grid.resources.gpus == 1


def test_conditional_parameter_is_sampled_only_when_its_parent_allows():
    search = parse_tune_spec(_spec()).search
    spatial = search.suggest(optuna.trial.FixedTrial({"train.lr": 0.01, "model.branches": "spatial"}))
    assert spatial == {"train.lr": 0.01, "model.branches": "spatial"}
    channel = search.suggest(optuna.trial.FixedTrial({"train.lr": 0.01, "model.branches": "channel",
                                                      "model.pooled_size": 4}))
    assert channel == {"train.lr": 0.01, "model.branches": "channel", "model.pooled_size": 4}


def test_aliases_for_directions_shorthand_for_choices_and_yaml_1e_floats():
    search = parse_tune_spec(_spec(params={"model.num_points": [1, 4, 9], "train.lr": {
        "type": "float", "low": "1e-3", "high": 0.1, "log": True}}, objectives={"miou": "maximise", "latency_ms": "min"}
    )).search
    points, lr = search.params
    assert points.type == "categorical" and points.choices == (1, 4, 9) and lr.low == 0.001
    assert search.directions == ["maximize", "minimize"] and not search.pruning


BAD_SEARCH = [
    ({"params": {"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "empty range"),
    ({"params": {"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "log range needs positive"),
    ({"params": {"model.pooled_sise": [2, 4]}}, "unknown parameter 'model.pooled_sise'"),
    ({"params": {"model.pooled_size": {"type": "int", "low": 2, "high": 8, "when": {"model.branches": ["dual"]}}}},
     "'model.branches', which is not a searched parameter"),
    ({"objectives": {"mIoU": "maximize"}}, "unknown metric 'mIoU'"),
    ({"objectives": {"miou": "up"}}, "direction 'up' is not allowed"),
    ({"objectives": {"miou": "maximize", "gflops": "minimize"}, "pruning": True}, "several objectives"),
    ({"objectives": {"gflops": "minimize"}, "pruning": True}, "only known at the end"),
    ({"params": {"model.num_points": [9, 10]}}, "model.num_points=10 is not allowed"),
    ({"params": {"model.num_points": {"type": "float", "low": 1, "high": 9}}}, "is an int field"),
    ({"params": {"train.seed": [0, 1]}}, "train.seed cannot be searched"),
    ({"params": {"train.lr": {"type": "float", "low": "small", "high": 0.1}}}, "low='small' has the wrong type"),
    ({"enqueue": [{"train.lr": 5.0}]}, "outside its range"),
    ({"sampler": {"type": "tpe", "n_startup": 3}}, "unknown option 'n_startup'"),
    ({"pruner": {"type": "successive_halving", "reduction_factor": 1}}, "reduction_factor >= 2"),
]


@pytest.mark.parametrize("search, message", BAD_SEARCH, ids=[m for _, m in BAD_SEARCH])
def test_bad_search_space_exits_2_with_one_line_before_anything_runs(search, message, tmp_path: Path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(_spec(**search)))
    out = tmp_path / "out"
    assert cli_main(["tune", str(spec), "--out", str(out), "--smoke"]) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and message in problems[0], err
    assert not out.exists()


def test_grid_keys_and_several_seeds_are_rejected_in_a_tune_spec():
    raw = _spec()
    raw.update(axes={"model.num_points": [1, 4]}, seeds=[0, 1])
    with pytest.raises(ConfigError) as e:
        parse_tune_spec(raw)
    assert len(e.value.problems) == 2 and "axes is not allowed" in str(e.value) and "one seed" in str(e.value)


# ----------------------------------------------------------------------------- study bookkeeping (no Ray)


def test_study_of_another_search_space_is_not_continued(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(parse_tune_spec(_spec()), storage=storage, study_name="s")
    other = parse_tune_spec(_spec(params={"train.lr": {"type": "float", "low": 1.0e-4, "high": 0.1, "log": True}}))
    with pytest.raises(ConfigError, match="another search space"):
        open_study(other, storage=storage, study_name="s")
    multi = parse_tune_spec(_spec(objectives={"miou": "maximize", "gflops": "minimize"}))
    with pytest.raises(ConfigError, match="optimises"):
        open_study(multi, storage=storage, study_name="s")


def test_journal_file_storage_continues_a_study(tmp_path: Path):
    spec = parse_tune_spec(_spec())
    first = open_study(spec, storage=str(tmp_path / "journal" / "study.log"), study_name="s")
    first.tell(first.ask(), 0.5)
    again = open_study(spec, storage=str(tmp_path / "journal" / "study.log"), study_name="s")
    assert [t.number for t in again.trials] == [0] and again.ask().number == 1


def test_budget_counts_verdicts_but_not_requeued_interruptions(tmp_path: Path):
    study = open_study(parse_tune_spec(_spec()), storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL):
        trial = study.ask()
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    study.enqueue_trial({"train.lr": 0.01}, user_attrs={"requeued_from": 3})  # trial 3 was interrupted
    study.ask()  # running, not counted
    assert count_finished(study) == 3


def test_best_spec_has_one_baseline_per_distinct_pareto_point(tmp_path: Path):
    spec = parse_tune_spec(_spec(objectives={"miou": "maximize", "gflops": "minimize"}))
    study = open_study(spec, storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    dist = {p.name: p.distribution() for p in spec.search.params}
    points = [(0.01, "spatial", None, [0.5, 2.0]),  # Pareto
              (0.02, "dual", 4, [0.6, 3.0]),  # Pareto
              (0.03, "dual", 4, [0.4, 3.5]),  # dominated by the second
              (0.01, "spatial", None, [0.5, 2.0])]  # same config as the first
    for lr, branches, pooled, values in points:
        params = {"train.lr": lr, "model.branches": branches, **({"model.pooled_size": pooled} if pooled else {})}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dist[k] for k in params},
                                                  values=values))
    best = best_spec(spec, study)
    assert [b["name"] for b in best["baselines"]] == ["trial0", "trial1"]
    assert best["baselines"][1]["overrides"] == {"train.lr": 0.02, "model.branches": "dual", "model.pooled_size": 4}
    assert best["seeds"] == [0] and best["base"] == TINY["base"]


def test_pruning_without_validations_during_training_exits_2_before_ray_starts(tmp_path: Path):
    raw = _spec()
    raw["smoke"]["train.val_every"] = 0
    with pytest.raises(ConfigError, match="pruning needs validations during training"):
        run_study(parse_tune_spec(raw), out_dir=tmp_path / "out", smoke=True, console=_quiet())
    assert not (tmp_path / "out").exists()


def test_successive_halving_rungs_start_at_the_first_validation():
    pruner = build_pruner(parse_tune_spec(_spec()).search, rung_step=2, total_steps=4)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and pruner._min_resource == 2


# ----------------------------------------------------------------------------- studies on Ray


def test_smoke_study_prunes_records_and_exports_a_runnable_best_spec(ray_address: str, tmp_path: Path):
    # One trial at a time makes the study deterministic: TPE's seeded start-up samples, CPU training and
    # the order of the step-2 reports. Successive halving (reduction factor 3) then promotes a trial at
    # step 2 only if it is the best of the first values recorded there (top third later), so among 6
    # trials some are pruned unless every trial beats all earlier ones.
    spec = parse_tune_spec(_spec(smoke_trials=6, concurrency=1))
    out = tmp_path / "study"
    summary = run_study(spec, out_dir=out, smoke=True, console=_quiet())
    assert summary.exit_code == 0 and summary.finished == 6
    trials = _trials(out, "tiny-smoke")
    assert [t.number for t in trials] == list(range(6))
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [t.intermediate_values for t in trials]
    for t in pruned:  # stopped at the first validation, below a value recorded before it
        assert t.user_attrs["pruned_at_step"] == 2 and list(t.intermediate_values) == [2]
        assert t.intermediate_values[2] < max(o.intermediate_values[2] for o in trials[: t.number])
        assert t.value == t.intermediate_values[2]  # Optuna keeps the last intermediate value
    runs = {int(r.data.tags["optuna_trial"]): r for r in _child_runs(out, "tiny-smoke")}
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


def test_ctrl_c_keeps_finished_trials_and_rerun_continues_the_count(ray_address: str, tmp_path: Path):
    spec = parse_tune_spec(_spec(smoke_trials=3, concurrency=2, pruning=False))
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
        first = run_study(spec, out_dir=out, smoke=True, console=_quiet())
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
    runs = {int(r.data.tags["optuna_trial"]): r for r in _child_runs(out, "tiny-smoke")}
    assert all(runs[t.number].info.status == "KILLED" and runs[t.number].data.tags["optuna_state"] == "FAIL"
               for t in interrupted)

    second = run_study(spec, out_dir=out, smoke=True, console=_quiet())
    assert second.exit_code == 0 and second.finished == 3
    after = _trials(out, "tiny-smoke")
    assert [t.number for t in after] == list(range(len(after)))  # numbers go on, none reused
    assert all(after[t.number].state == TrialState.COMPLETE and after[t.number].values == t.values for t in complete)
    for old in interrupted:  # re-queued: same parameters, resumed in the interrupted trial's folder
        (new,) = [t for t in after if t.user_attrs.get("requeued_from") == old.number]
        assert new.number > old.number and new.state == TrialState.COMPLETE and new.params == old.params
        attempts = (Path(new.user_attrs["trial_dir"]) / "attempts.jsonl").read_text().splitlines()
        assert new.user_attrs["trial_dir"] == old.user_attrs["trial_dir"] and len(attempts) == 2
        assert json.loads(attempts[1])["resumed"]


def test_multi_objective_smoke_study_writes_a_pareto_front(ray_address: str, tmp_path: Path):
    spec = parse_tune_spec(_spec(objectives={"miou": "maximize", "gflops": "minimize"}, smoke_trials=3,
                                 concurrency=2, sampler={"type": "nsga2", "seed": 0, "population_size": 4}))
    out = tmp_path / "study"
    summary = run_study(spec, out_dir=out, smoke=True, console=_quiet())
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
    assert all(r.data.tags["optuna_state"] == "COMPLETE" for r in _child_runs(out, "tiny-smoke"))
