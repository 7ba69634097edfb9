"""harness.tune_spec: search-space parsing, the objectives the catalogue allows, one line per bad value.

No Ray here: everything runs before anything is launched.
"""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from ddsm.config import ConfigError
from harness.cli import main as cli_main
from harness.tune_spec import load_tune_spec, parse_tune_spec


# ----------------------------------------------------------------------------- parsing


def test_shipped_specs_parse_with_their_intended_strategy(repo_root):
    quick = load_tune_spec(repo_root / "ablations/tune_quickstart.yaml").search
    assert quick.metrics == ["miou"] and quick.pruning and quick.sampler["type"] == "tpe"
    names = [p.name for p in quick.params]
    assert names.index("model.branches") < names.index("model.pooled_size")  # parent sampled first
    city = load_tune_spec(repo_root / "ablations/tune_cityscapes.yaml", check_paths=False)  # no Cityscapes here
    assert city.search.multi and not city.search.pruning and city.search.sampler["type"] == "nsga2"
    assert city.search.directions == ["maximize", "minimize"]
    assert city.resources.num_workers == 8 and city.resources.gpus == 1
    # every shipped study tunes on minival and reports val; the baselines get their own recipe tuning
    fpn = load_tune_spec(repo_root / "ablations/tune_cityscapes_baselines.yaml", check_paths=False)
    for spec in (load_tune_spec(repo_root / "ablations/tune_quickstart.yaml"), city, fpn):
        assert (spec.objective_split, spec.search.confirm_split, spec.leaks) == ("minival", "val", False)
    assert fpn.base_config.model.name == "fpn" and fpn.search.pruning


def test_conditional_parameter_is_sampled_only_when_its_parent_allows(tiny_study):
    search = parse_tune_spec(tiny_study()).search
    spatial = search.suggest(optuna.trial.FixedTrial({"train.lr": 0.01, "model.branches": "spatial"}))
    assert spatial == {"train.lr": 0.01, "model.branches": "spatial"}
    channel = search.suggest(optuna.trial.FixedTrial({"train.lr": 0.01, "model.branches": "channel",
                                                      "model.pooled_size": 4}))
    assert channel == {"train.lr": 0.01, "model.branches": "channel", "model.pooled_size": 4}


def test_aliases_for_directions_shorthand_for_choices_and_yaml_1e_floats(tiny_study):
    search = parse_tune_spec(tiny_study(params={"model.num_points": [1, 4, 9], "train.lr": {
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
def test_bad_search_space_exits_2_with_one_line_before_anything_runs(search, message, tmp_path: Path, capsys,
                                                                    tiny_study):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(tiny_study(**search)))
    out = tmp_path / "out"
    assert cli_main(["tune", str(spec), "--out", str(out), "--smoke"]) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and message in problems[0], err
    assert not out.exists()


def test_grid_keys_and_several_seeds_are_rejected_in_a_tune_spec(tiny_study):
    raw = tiny_study()
    raw.update(axes={"model.num_points": [1, 4]}, seeds=[0, 1])
    with pytest.raises(ConfigError) as e:
        parse_tune_spec(raw)
    assert len(e.value.problems) == 2 and "axes is not allowed" in str(e.value) and "one seed" in str(e.value)


# ----------------------------------------------------------------------------- splits: tune on minival, report val


def test_a_study_tunes_on_minival_by_default_and_its_best_spec_reports_val(tiny_study):
    spec = parse_tune_spec(tiny_study())
    assert spec.objective_split == "minival" and spec.search.confirm_split == "val" and not spec.leaks
    assert spec.base_config.data.val_split == "minival"
    assert "tuned on minival, confirmed on val" in spec.split_note()


def test_tuning_on_the_split_the_best_spec_reports_exits_2_unless_asked(tmp_path, capsys, tiny_study):
    from harness.study import study_split_tags

    raw = tiny_study(confirm_split="val")
    raw["base"]["data"]["val_split"] = "val"
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["tune", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "data.val_split='val'" in err and "search.confirm_split='val'" in err and "--tune-on-confirm-split" in err
    assert not (tmp_path / "out").exists()
    spec = load_tune_spec(path, allow_leak=True)  # explicit: warned and recorded
    tags = study_split_tags(spec)
    assert spec.leaks and tags["split_leak"].startswith("WARNING: tuned on val")
    assert (tags["objective_split"], tags["confirm_split"]) == ("val", "val")
    with pytest.raises(ConfigError, match="confirm_split='minival' is not allowed"):
        parse_tune_spec(tiny_study(confirm_split="minival"))
