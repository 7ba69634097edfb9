"""harness.spec: parsing, smoke mode, and one test per validation error; the CLI's exit 2.

No Ray here: everything runs before anything is launched.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.cells import expand
from harness.cli import main
from harness.spec import SpecError, parse_spec


def _problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as e:
        expand(parse_spec(raw))
    return e.value.problems


# ----------------------------------------------------------------------------- validation: one test per error


def test_unknown_top_level_key_lists_the_allowed_ones(spec_dict):
    problems = _problems(spec_dict(seed=[0]))
    assert len(problems) == 1
    assert "unknown key 'seed'" in problems[0] and "allowed keys: name," in problems[0] and "seeds" in problems[0]


def test_unknown_config_key_lists_the_allowed_ones(spec_dict):
    problems = _problems(spec_dict(baselines=[{"name": "a", "axes": {"model.num_ponts": [1, 4]}}]))
    assert len(problems) == 1
    assert "unknown key 'model.num_ponts'" in problems[0]
    assert "model.num_points" in problems[0] and "baselines[a].axes" in problems[0]


def test_wrong_type_names_field_and_type(spec_dict):
    problems = _problems(spec_dict(base={"train": {"steps": "ten"}}))
    assert problems == ["base: train.steps='ten' has the wrong type: expected int"]


def test_impossible_value_from_trialconfig_validate_one_line_for_all_cells(spec_dict):
    ddsm_n5 = {"name": "d", "overrides": {"model.name": "ddsm", "model.num_points": 5}}
    problems = _problems(spec_dict(baselines=[ddsm_n5]))
    assert len(problems) == 1  # two seeds share the problem: one line, naming the first cell
    assert problems[0].startswith("d/seed=0 (and 1 more cells): model.num_points=5 is not allowed")
    assert "perfect square" in problems[0]


def test_duplicate_cells_are_named(spec_dict):
    fpn = {"name": "fpn", "overrides": {"model.name": "fpn"}, "axes": {"model.num_points": [1, 4]}}
    raw = spec_dict(baselines=[fpn], seeds=[0])
    problems = _problems(raw)
    assert len(problems) == 1
    assert "duplicate cells: 'fpn[num_points=1]/seed=0' and 'fpn[num_points=4]/seed=0'" in problems[0]


def test_unknown_model_and_bad_reference_and_seeds_and_resources_each_get_a_line(spec_dict):
    raw = spec_dict(baseline="nope", seeds=[0, 0], resources={"gpus": -1, "num_workers": 0},
                    retry_on=["segfault"], max_failures=-1)
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 6, e.value.problems
    for needle in ("baseline='nope' is not a baseline name", "seeds must be distinct", "resources.gpus=-1.0",
                   "resources.num_workers=0", "retry_on: 'segfault'", "max_failures=-1"):
        assert needle in text
    from ddsm.models import list_models

    assert _problems(spec_dict(baselines=[{"name": "u", "overrides": {"model.name": "unet"}}], seeds=[0])) == [
        f"u/seed=0: model.name='unet' is not allowed: expected one of {', '.join(list_models())}"]


def test_seed_is_set_by_seeds_only(spec_dict):
    problems = _problems(spec_dict(axes={"train.seed": [1, 2]}))
    assert problems == ["axes: train.seed is set by `seeds:`; list the seeds there instead"]


def test_missing_dataset_is_a_problem_unless_smoke(tmp_path: Path, spec_dict):
    raw = spec_dict(base={"data": {"name": "camvid", "root": str(tmp_path / "absent")}}, seeds=[0])
    problems = _problems(raw)
    assert len(problems) == 1 and "does not exist here" in problems[0]
    smoke = expand(parse_spec(raw, smoke=True))
    assert all(c.config.data.name == "synthetic" for c in smoke)  # documented: smoke checks the plumbing


def test_cli_bad_spec_exits_2_with_one_line_per_problem_and_writes_nothing(tmp_path: Path, capsys, spec_dict):
    spec = tmp_path / "bad.yaml"
    raw = spec_dict(base={"train": {"steps": 0}}, seeds=[0], bogus=1)
    spec.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("ddsm-bench run: error: 1 problem in spec") or "problem" in err[0]
    assert any("unknown key 'bogus'" in line for line in err)
    assert not out.exists()


def test_cli_missing_spec_exits_2(tmp_path: Path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_dataset_is_a_problem(spec_dict):
    problems = _problems(spec_dict(base={"data": {"name": "kitti"}}, seeds=[0]))
    assert len(problems) == 1 and "data.name='kitti' is not allowed: expected one of synthetic" in problems[0]


def test_a_yaml_error_names_its_line_and_column(tmp_path: Path, capsys):
    """Issue 14 case 8: the YAML parser's position survives into the one-line error (spec and trial config)."""
    from ddsm.config import ConfigError, load_config

    spec = tmp_path / "broken.yaml"
    spec.write_text("name: broken\nseeds: [0, 1\nbaselines: [{name: fpn}]\n")  # the list on line 2 never closes
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML: line 3, column 10:" in err, err
    config = tmp_path / "trial.yaml"
    config.write_text("train:\n  steps: 4\n\tlr: 0.1\n")  # a tab on line 3
    with pytest.raises(ConfigError, match=r"not valid YAML: line 3, column 1: .*'\\t'"):
        load_config(config)


def test_figures_block_validated_before_launch(tiny_base):
    """issue 16: the spec's figures block (ddsm.viz.ViewSettings), every problem named before anything runs."""
    raw = {"name": "f", "base": tiny_base, "baselines": [{"name": "fpn"}]}
    spec = parse_spec({**raw, "figures": {"images": 3, "pool": 6, "tolerance": 2, "panel_seed": 0}})
    assert spec.figures["images"] == 3 and spec.figures["panel_seed"] == 0 and spec.figures["enabled"] is True
    assert parse_spec(raw).figures["pool"] == 8  # defaults
    with pytest.raises(SpecError) as e:
        parse_spec({**raw, "figures": {"tolerance": 5, "imgs": 1}})
    assert "figures.imgs is not a known option" in str(e.value)
    with pytest.raises(SpecError, match=r"figures.tolerance=5 is not allowed: expected one of base eval.tolerances"):
        parse_spec({**raw, "figures": {"tolerance": 5}})
    with pytest.raises(SpecError, match="figures.pool=1 is not allowed"):
        parse_spec({**raw, "figures": {"pool": 1}})
