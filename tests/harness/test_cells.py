"""harness.cells: deterministic expansion, content hashes, references, the shipped specs and the dry run.

No Ray here: everything runs before anything is launched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from ddsm.config import TrialConfig, from_dict, to_dict
from ddsm.data import camvid
from harness.cells import canonical_config, cell_hash, config_diff, eval_hash, expand
from harness.cli import main
from harness.spec import SMOKE_OVERRIDES, SpecError, flatten, load_spec, parse_spec

CAMVID = camvid.resolve_root(None)


# ----------------------------------------------------------------------------- expansion


def test_expansion_order_labels_seeds_and_reference(spec_dict):
    cells = expand(parse_spec(spec_dict()))
    assert [c.name for c in cells] == [
        "fpn/seed=0", "fpn/seed=1",
        "ddsm[branches=spatial]/seed=0", "ddsm[branches=spatial]/seed=1",
        "ddsm[branches=dual]/seed=0", "ddsm[branches=dual]/seed=1",
    ]
    assert [c.config.train.seed for c in cells] == [0, 1] * 3
    assert [c.config.model.branches for c in cells[2:]] == ["spatial", "spatial", "dual", "dual"]
    assert all(c.config.train.steps == 3 for c in cells)
    assert {c.reference for c in cells} == {"fpn"}  # the first baseline is the default reference


def test_global_axes_cross_every_baseline_and_pick_matching_reference(spec_dict):
    raw = spec_dict(axes={"model.backbone": ["resnet18", "resnet34"]}, seeds=[0])
    cells = expand(parse_spec(raw))
    assert len(cells) == 2 * 1 + 2 * 2  # (fpn + 2 ddsm variants) x 2 backbones
    by_name = {c.name: c for c in cells}
    ddsm34 = by_name["ddsm[backbone=resnet34,branches=dual]/seed=0"]
    assert ddsm34.config.model.backbone == "resnet34"
    assert ddsm34.reference == "fpn[backbone=resnet34]"


def test_explicit_cells_apply_on_their_baseline(spec_dict):
    raw = spec_dict(cells=[{"name": "ddsm_n4", "baseline": "ddsm", "overrides": {"model.num_points": 4}}], seeds=[0])
    cell = expand(parse_spec(raw))[-1]
    assert cell.name == "ddsm_n4/seed=0"
    assert (cell.config.model.name, cell.config.model.num_points) == ("ddsm", 4)


def test_expansion_is_deterministic(spec_dict):
    a = [(c.name, c.hash) for c in expand(parse_spec(spec_dict()))]
    b = [(c.name, c.hash) for c in expand(parse_spec(spec_dict()))]
    assert a == b


# ----------------------------------------------------------------------------- hashing


def test_hash_is_sha256_of_canonical_json_of_what_trains():
    cfg = from_dict({"model": {"name": "ddsm", "num_points": 4}})  # every model field is used by ddsm
    body = to_dict(cfg)
    body.pop("eval")
    for key in ("val_split", "minival_size", "minival_seed"):  # scoring fields; minival ones unused with val
        body["data"].pop(key)
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert cell_hash(cfg) == hashlib.sha256(payload.encode()).hexdigest()[:12]
    scoring = {"eval": to_dict(cfg)["eval"], "data.val_split": "val"}
    assert eval_hash(cfg) == hashlib.sha256(json.dumps(scoring, sort_keys=True, separators=(",", ":")).encode()
                                            ).hexdigest()[:12]


def test_eval_and_split_change_the_eval_hash_only_unless_minival_changes_training():
    cfg = TrialConfig()
    for change in ({"eval": {"tolerances": [1, 3]}}, {"eval": {"flip": True}}, {"data": {"val_split": "test"}},
                   {"data": {"minival_size": 7}}):  # minival_size is unused while validating on val
        other = from_dict(change)
        assert cell_hash(other) == cell_hash(cfg), change
        assert eval_hash(other) != eval_hash(cfg) or change == {"data": {"minival_size": 7}}, change
    minival = from_dict({"data": {"val_split": "minival"}})
    assert cell_hash(minival) != cell_hash(cfg)  # holding out minival changes the training images
    assert cell_hash(from_dict({"data": {"val_split": "minival", "minival_size": 7}})) != cell_hash(minival)
    assert cell_hash(from_dict({"train": {"threads": 2}})) != cell_hash(cfg)


def test_device_and_threads_come_from_the_resources_so_cpus_change_the_hash(spec_dict):
    one, two = (expand(parse_spec(spec_dict(resources={"cpus": n}, seeds=[0])))[0] for n in (1, 2))
    assert (one.config.train.threads, two.config.train.threads) == (1, 2)
    assert one.config.train.device == "cpu" and one.hash != two.hash
    fixed = spec_dict(resources={"cpus": 2}, seeds=[0], base={"train": {"steps": 3, "threads": 1}})
    assert expand(parse_spec(fixed))[0].hash == one.hash  # threads fixed by the spec: the same computation


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


def test_dotted_and_nested_overrides_are_the_same_cell(spec_dict):
    dotted = spec_dict(baselines=[{"name": "a", "overrides": {"train.lr": 0.05, "model.name": "fpn"}}])
    nested = spec_dict(baselines=[{"name": "a", "overrides": {"train": {"lr": 0.05}, "model": {"name": "fpn"}}}])
    assert [c.hash for c in expand(parse_spec(dotted))] == [c.hash for c in expand(parse_spec(nested))]


def test_config_diff_and_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e.f": 3}) == {"a.b": 1, "a.c.d": 2, "e.f": 3}
    diff = config_diff(from_dict({"train": {"lr": 0.5}}), TrialConfig())
    assert diff == {"train.lr": (0.5, 0.01)}


# ----------------------------------------------------------------------------- shipped specs, smoke, dry run


def test_quickstart_has_ten_cpu_cells_of_five_variants(repo_root):
    spec = load_spec(repo_root / "ablations" / "quickstart.yaml")
    cells = expand(spec)
    assert len(cells) == 10 and len({c.variant for c in cells}) == 5
    assert {c.config.model.name for c in cells} == {"fpn", "sfnet", "ddsm"}
    assert spec.resources.gpus == 0 and all(c.config.data.name == "synthetic" for c in cells)


def test_cityscapes_paper_grid_covers_the_ablations(repo_root):
    spec = load_spec(repo_root / "ablations" / "cityscapes_paper.yaml", check_paths=False)  # no Cityscapes here
    cells = expand(spec)
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
def test_camvid_spec_expands_with_its_data(repo_root):
    spec = load_spec(repo_root / "ablations" / "camvid.yaml")
    try:
        expand(spec)
    except SpecError as e:  # the ImageNet weights are not in this machine's hub cache: refused before launch
        assert all("model.weights='imagenet'" in p for p in e.problems), e.problems
    base = {**spec.base, "model": {**spec.base["model"], "weights": None}}
    cells = expand(dataclasses.replace(spec, base=base))  # the data (every header of train and val) is fine
    assert spec.resources.gpus == 1 and spec.resources.num_workers == 1
    assert all(Path(c.config.data.root).is_absolute() for c in cells)


@pytest.mark.parametrize("name", ["quickstart", "cityscapes_paper", "camvid"])
def test_every_shipped_spec_has_a_smoke_variant(name: str, repo_root):
    cells = expand(load_spec(repo_root / "ablations" / f"{name}.yaml", smoke=True))
    for c in cells:
        assert c.config.train.steps == SMOKE_OVERRIDES["train.steps"]
        assert c.config.model.weights is None and c.config.data.crop_size == (64, 64)


def test_dry_run_prints_cells_diffs_and_cost(capsys, repo_root):
    from harness.cmd_run import dry_run

    rows = dry_run(load_spec(repo_root / "ablations" / "quickstart.yaml"))
    out = capsys.readouterr().out
    assert len(rows) == 10 and "total: 10 trials" in out
    sfnet = next(r for r in rows if r["cell"] == "sfnet/seed=0")
    assert sfnet["diff"] == {"model.name": ("sfnet", "fpn")}
    assert all(r["gflops"] > 0 and r["train_tflops"] > 0 for r in rows)
    assert main(["run", str(repo_root / "ablations" / "quickstart.yaml"), "--dry-run"]) == 0
