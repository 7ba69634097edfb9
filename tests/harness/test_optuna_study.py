"""harness.optuna_study: the study's storage, its budget, the exported best spec (no Ray)."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ddsm.config import ConfigError
from harness.optuna_study import best_spec, build_pruner, build_sampler, count_finished, open_study
from harness.tune_spec import parse_tune_spec


def test_study_of_another_search_space_is_not_continued(tmp_path: Path, tiny_study):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(parse_tune_spec(tiny_study()), storage=storage, study_name="s")
    lr = {"type": "float", "low": 1.0e-4, "high": 0.1, "log": True}
    other = parse_tune_spec(tiny_study(params={"train.lr": lr}))
    with pytest.raises(ConfigError, match="another search space"):
        open_study(other, storage=storage, study_name="s")
    multi = parse_tune_spec(tiny_study(objectives={"miou": "maximize", "gflops": "minimize"}))
    with pytest.raises(ConfigError, match="optimises"):
        open_study(multi, storage=storage, study_name="s")


def test_journal_file_storage_continues_a_study(tmp_path: Path, tiny_study):
    spec = parse_tune_spec(tiny_study())
    first = open_study(spec, storage=str(tmp_path / "journal" / "study.log"), study_name="s")
    first.tell(first.ask(), 0.5)
    again = open_study(spec, storage=str(tmp_path / "journal" / "study.log"), study_name="s")
    assert [t.number for t in again.trials] == [0] and again.ask().number == 1


def test_budget_counts_verdicts_but_not_requeued_interruptions(tmp_path: Path, tiny_study):
    study = open_study(parse_tune_spec(tiny_study()), storage=f"sqlite:///{tmp_path / 'study.db'}",
                       study_name="s")
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL):
        trial = study.ask()
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    study.enqueue_trial({"train.lr": 0.01}, user_attrs={"requeued_from": 3})  # trial 3 was interrupted
    study.ask()  # running, not counted
    assert count_finished(study) == 3


def test_best_spec_has_one_baseline_per_distinct_pareto_point(tmp_path: Path, tiny_study):
    spec = parse_tune_spec(tiny_study(objectives={"miou": "maximize", "gflops": "minimize"}))
    study = open_study(spec, storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    dist = {"train.lr": optuna.distributions.FloatDistribution(1.0e-6, 0.1, log=True),
            "model.branches": optuna.distributions.CategoricalDistribution(["spatial", "channel", "dual"]),
            "model.pooled_size": optuna.distributions.IntDistribution(2, 8, step=2)}
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
    assert best["baselines"][1]["overrides"] == {"train.lr": 0.02, "model.branches": "dual", "model.pooled_size": 4,
                                                 "data.val_split": "val"}  # tuned on minival, confirmed on val
    assert best["seeds"] == [0] and best["base"] == tiny_study()["base"]


def test_tpe_keeps_concurrent_trials_apart_explicitly(tiny_study):
    # constant_liar is Optuna's default only since 5.0; pyproject allows optuna>=3.6, so it is passed
    assert build_sampler(parse_tune_spec(tiny_study()).search)._constant_liar is True


def test_a_study_of_another_objective_split_is_not_continued(tmp_path: Path, tiny_study):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    minival = parse_tune_spec(tiny_study())
    open_study(minival, storage=storage, study_name="s").enqueue_trial({"train.lr": 0.01})
    on_test = tiny_study()
    on_test["base"]["data"]["val_split"] = "test"
    with pytest.raises(ConfigError, match="validated on minival, this spec's trials validate on test"):
        open_study(parse_tune_spec(on_test), storage=storage, study_name="s")


def test_successive_halving_rungs_start_at_the_first_validation(tiny_study):
    pruner = build_pruner(parse_tune_spec(tiny_study()).search, rung_step=2, total_steps=4)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and pruner._min_resource == 2
