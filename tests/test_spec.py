"""harness.spec: parsing, deterministic expansion, content hashes, and one test per validation error.

No Ray here: everything runs before anything is launched.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from ddsm.config import TrialConfig, from_dict, to_dict
from harness.cli import main
from harness.spec import (
    SMOKE_OVERRIDES,
    SpecError,
    canonical_config,
    cell_hash,
    config_diff,
    expand,
    flatten,
    load_spec,
    parse_spec,
)

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"


def _spec(**over) -> dict:
    """A small valid spec dict: fpn vs ddsm (two branch settings), two seeds."""
    d = {
        "name": "t",
        "base": {"data": {"name": "synthetic"}, "train": {"steps": 3}},
        "baselines": [
            {"name": "fpn", "overrides": {"model.name": "fpn"}},
            {"name": "ddsm", "overrides": {"model": {"name": "ddsm"}}, "axes": {"model.branches": ["spatial", "dual"]}},
        ],
        "seeds": [0, 1],
    }
    d.update(over)
    return d


def _problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as e:
        expand(parse_spec(raw))
    return e.value.problems


# ----------------------------------------------------------------------------- expansion


def test_expansion_order_labels_seeds_and_reference():
    cells = expand(parse_spec(_spec()))
    assert [c.name for c in cells] == [
        "fpn/seed=0", "fpn/seed=1",
        "ddsm[branches=spatial]/seed=0", "ddsm[branches=spatial]/seed=1",
        "ddsm[branches=dual]/seed=0", "ddsm[branches=dual]/seed=1",
    ]
    assert [c.config.train.seed for c in cells] == [0, 1] * 3
    assert [c.config.model.branches for c in cells[2:]] == ["spatial", "spatial", "dual", "dual"]
    assert all(c.config.train.steps == 3 for c in cells)
    assert {c.reference for c in cells} == {"fpn"}  # the first baseline is the default reference


def test_global_axes_cross_every_baseline_and_pick_matching_reference():
    raw = _spec(axes={"model.backbone": ["resnet18", "resnet34"]}, seeds=[0])
    cells = expand(parse_spec(raw))
    assert len(cells) == 2 * 1 + 2 * 2  # (fpn + 2 ddsm variants) x 2 backbones
    by_name = {c.name: c for c in cells}
    ddsm34 = by_name["ddsm[backbone=resnet34,branches=dual]/seed=0"]
    assert ddsm34.config.model.backbone == "resnet34"
    assert ddsm34.reference == "fpn[backbone=resnet34]"


def test_explicit_cells_apply_on_their_baseline():
    raw = _spec(cells=[{"name": "ddsm_n4", "baseline": "ddsm", "overrides": {"model.num_points": 4}}], seeds=[0])
    cell = expand(parse_spec(raw))[-1]
    assert cell.name == "ddsm_n4/seed=0"
    assert (cell.config.model.name, cell.config.model.num_points) == ("ddsm", 4)


def test_expansion_is_deterministic():
    a = [(c.name, c.hash) for c in expand(parse_spec(_spec()))]
    b = [(c.name, c.hash) for c in expand(parse_spec(_spec()))]
    assert a == b


# ----------------------------------------------------------------------------- hashing


def test_hash_is_sha256_of_canonical_json():
    cfg = from_dict({"model": {"name": "ddsm", "num_points": 4}})  # every model field is used by ddsm
    payload = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    assert cell_hash(cfg) == hashlib.sha256(payload.encode()).hexdigest()[:12]


def test_hash_ignores_fields_the_model_does_not_read():
    fpn = from_dict({"model": {"name": "fpn"}})
    fpn_n4 = from_dict({"model": {"name": "fpn", "num_points": 4, "branches": "spatial"}})
    assert cell_hash(fpn) == cell_hash(fpn_n4)
    assert canonical_config(fpn_n4).model.num_points == 9  # reset to the default
    ddsm, ddsm_n4 = from_dict({"model": {"name": "ddsm"}}), from_dict({"model": {"name": "ddsm", "num_points": 4}})
    assert cell_hash(ddsm) != cell_hash(ddsm_n4)


def test_hash_changes_with_any_used_field_and_with_ddp_world_size():
    cfg = TrialConfig()
    other = from_dict({"train": {"lr": 0.02}})
    assert cell_hash(cfg) != cell_hash(other)
    assert cell_hash(cfg) != cell_hash(cfg, world_size=2)  # data.batch_size is per rank
    assert len(cell_hash(cfg)) == 12 and int(cell_hash(cfg), 16) >= 0


def test_dotted_and_nested_overrides_are_the_same_cell():
    dotted = _spec(baselines=[{"name": "a", "overrides": {"train.lr": 0.05, "model.name": "fpn"}}])
    nested = _spec(baselines=[{"name": "a", "overrides": {"train": {"lr": 0.05}, "model": {"name": "fpn"}}}])
    assert [c.hash for c in expand(parse_spec(dotted))] == [c.hash for c in expand(parse_spec(nested))]


def test_config_diff_and_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e.f": 3}) == {"a.b": 1, "a.c.d": 2, "e.f": 3}
    diff = config_diff(from_dict({"train": {"lr": 0.5}}), TrialConfig())
    assert diff == {"train.lr": (0.5, 0.01)}


# ----------------------------------------------------------------------------- validation: one test per error


def test_unknown_top_level_key_lists_the_allowed_ones():
    problems = _problems(_spec(seed=[0]))
    assert len(problems) == 1
    assert "unknown key 'seed'" in problems[0] and "allowed keys: name," in problems[0] and "seeds" in problems[0]


def test_unknown_config_key_lists_the_allowed_ones():
    problems = _problems(_spec(baselines=[{"name": "a", "axes": {"model.num_ponts": [1, 4]}}]))
    assert len(problems) == 1
    assert "unknown key 'model.num_ponts'" in problems[0]
    assert "model.num_points" in problems[0] and "baselines[a].axes" in problems[0]


def test_wrong_type_names_field_and_type():
    problems = _problems(_spec(base={"train": {"steps": "ten"}}))
    assert problems == ["base: train.steps='ten' has the wrong type: expected int"]


def test_impossible_value_from_trialconfig_validate_one_line_for_all_cells():
    problems = _problems(_spec(baselines=[{"name": "d", "overrides": {"model.name": "ddsm", "model.num_points": 5}}]))
    assert len(problems) == 1  # two seeds share the problem: one line, naming the first cell
    assert problems[0].startswith("d/seed=0 (and 1 more cells): model.num_points=5 is not allowed")
    assert "perfect square" in problems[0]


def test_duplicate_cells_are_named():
    raw = _spec(baselines=[{"name": "fpn", "overrides": {"model.name": "fpn"}, "axes": {"model.num_points": [1, 4]}}],
                seeds=[0])
    problems = _problems(raw)
    assert len(problems) == 1
    assert "duplicate cells: 'fpn[num_points=1]/seed=0' and 'fpn[num_points=4]/seed=0'" in problems[0]


def test_unknown_model_and_bad_reference_and_seeds_and_resources_each_get_a_line():
    raw = _spec(baseline="nope", seeds=[0, 0], resources={"gpus": -1, "num_workers": 0},
                retry_on=["segfault"], max_failures=-1)
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 6, e.value.problems
    for needle in ("baseline='nope' is not a baseline name", "seeds must be distinct", "resources.gpus=-1.0",
                   "resources.num_workers=0", "retry_on: 'segfault'", "max_failures=-1"):
        assert needle in text
    from ddsm.models import list_models

    assert _problems(_spec(baselines=[{"name": "u", "overrides": {"model.name": "unet"}}], seeds=[0])) == [
        f"u/seed=0: model.name='unet' is not allowed: expected one of {', '.join(list_models())}"]


def test_seed_is_set_by_seeds_only():
    problems = _problems(_spec(axes={"train.seed": [1, 2]}))
    assert problems == ["axes: train.seed is set by `seeds:`; list the seeds there instead"]


def test_missing_dataset_is_a_problem_unless_smoke(tmp_path: Path):
    raw = _spec(base={"data": {"name": "camvid", "root": str(tmp_path / "absent")}}, seeds=[0])
    problems = _problems(raw)
    assert len(problems) == 1 and "does not exist here" in problems[0]
    smoke = expand(parse_spec(raw), smoke=True)
    assert all(c.config.data.name == "synthetic" for c in smoke)  # documented: smoke checks the plumbing


def test_cli_bad_spec_exits_2_with_one_line_per_problem_and_writes_nothing(tmp_path: Path, capsys):
    spec = tmp_path / "bad.yaml"
    raw = _spec(base={"train": {"steps": 0}}, seeds=[0], bogus=1)
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


# ----------------------------------------------------------------------------- shipped specs, smoke, dry run


def test_quickstart_has_ten_cpu_cells_of_five_variants():
    spec = load_spec(ROOT / "ablations" / "quickstart.yaml")
    cells = expand(spec)
    assert len(cells) == 10 and len({c.variant for c in cells}) == 5
    assert {c.config.model.name for c in cells} == {"fpn", "sfnet", "ddsm"}
    assert spec.resources.gpus == 0 and all(c.config.data.name == "synthetic" for c in cells)


def test_cityscapes_paper_grid_covers_the_ablations():
    spec = load_spec(ROOT / "ablations" / "cityscapes_paper.yaml")
    cells = expand(spec, check_paths=False)  # no Cityscapes here
    models = {c.config.model.name for c in cells}
    assert {"fpn", "sfnet", "ddsm", "fcn", "deeplabv3", "pspnet", "nonlocal", "danet"} <= models
    ddsm = [c.config.model for c in cells if c.config.model.name == "ddsm"]
    assert {m.num_points for m in ddsm} == {1, 4, 9, 16, 25}
    assert {m.pos_embed for m in ddsm} >= {"sine", "none"}
    assert {m.branches for m in ddsm} == {"spatial", "channel", "dual"}
    assert {c.config.model.backbone for c in cells} == {"resnet18", "resnet50", "resnet101"}
    assert spec.seeds == [0, 1, 2] and spec.resources.num_workers > 1 and spec.resources.gpus >= 1
    assert all(c.config.train.ohem and c.config.data.crop_size == (1024, 1024) for c in cells)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid not available")
def test_camvid_spec_expands_with_its_data():
    spec = load_spec(ROOT / "ablations" / "camvid.yaml")
    cells = expand(spec)
    assert spec.resources.gpus == 1 and spec.resources.num_workers == 1
    assert all(Path(c.config.data.root).is_absolute() for c in cells)


@pytest.mark.parametrize("name", ["quickstart", "cityscapes_paper", "camvid"])
def test_every_shipped_spec_has_a_smoke_variant(name: str):
    cells = expand(load_spec(ROOT / "ablations" / f"{name}.yaml"), smoke=True)
    for c in cells:
        assert c.config.train.steps == SMOKE_OVERRIDES["train.steps"]
        assert c.config.model.weights is None and c.config.data.crop_size == (64, 64)


def test_dry_run_prints_cells_diffs_and_cost(capsys):
    from harness.cmd_run import dry_run

    rows = dry_run(load_spec(ROOT / "ablations" / "quickstart.yaml"))
    out = capsys.readouterr().out
    assert len(rows) == 10 and "total: 10 trials" in out
    sfnet = next(r for r in rows if r["cell"] == "sfnet/seed=0")
    assert sfnet["diff"] == {"model.name": ("sfnet", "fpn")}
    assert all(r["gflops"] > 0 and r["train_tflops"] > 0 for r in rows)
    assert main(["run", str(ROOT / "ablations" / "quickstart.yaml"), "--dry-run"]) == 0


def test_unknown_dataset_is_a_problem():
    problems = _problems(_spec(base={"data": {"name": "kitti"}}, seeds=[0]))
    assert len(problems) == 1 and "data.name='kitti' is not allowed: expected one of synthetic" in problems[0]
