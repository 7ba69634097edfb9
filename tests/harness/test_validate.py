"""Validation before launch: every value a worker would reject exits 2 from `run` and `tune`, one line per
problem, before Ray starts and before the out dir is written; broken dataset files are named with their list line.

No Ray here: each command must refuse before it connects (the assertions check the out dir does not exist and
the time taken).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from ddsm.config import ConfigError
from ddsm.engine.failures import classify_failure
from harness.cli import main
from tests.conftest import TINY_BASE, TINY_STUDY

BAD_VALUES = [  # (overrides of the tiny base, resources, words the line must hold)
    ({"eval.tolerances": [1.5]}, {}, ["eval.tolerances", "1.5", "whole pixel counts"]),
    ({"eval.scales": []}, {}, ["eval.scales", "[]", "non-empty"]),
    ({"model.backbone": "resnet7"}, {}, ["model.backbone='resnet7'", "resnet18"]),
    ({"model.name": "ddsm", "model.branches": "both"}, {}, ["model.branches='both'", "spatial, channel, dual"]),
    ({"model.name": "ddsm", "model.pooled_size": 0}, {}, ["model.pooled_size=0", ">= 1"]),
    ({"data.num_classes": 0}, {}, ["data.num_classes=0", "2..255"]),
    ({"data.image_size": [0, 0]}, {}, ["data.image_size=(0, 0)", ">= 16"]),
    ({"train.device": "cuda"}, {"gpus": 0}, ["train.device='cuda'", "resources.gpus=0", "no GPU"]),
]


def _base(overrides: dict[str, Any]) -> dict[str, Any]:
    base = copy.deepcopy(TINY_BASE)
    for key, value in overrides.items():
        section, name = key.split(".")
        base.setdefault(section, {})[name] = value
    return base


def _refused(argv: list[str], out: Path, capsys) -> list[str]:
    """Run the CLI; assert exit 2, fast, nothing written; return the problem lines."""
    tic = time.time()
    assert main(argv) == 2
    assert time.time() - tic < 15
    assert not out.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip().startswith("- ")]


@pytest.mark.parametrize("overrides, resources, words", BAD_VALUES, ids=[str(b[0]) for b in BAD_VALUES])
def test_run_refuses_each_bad_value_before_launch(tmp_path, capsys, write_spec, overrides, resources, words):
    spec = write_spec(tmp_path / "bad.yaml", base=_base(overrides), resources={"cpus": 1, **resources})
    (line,) = _refused(["run", str(spec), "--out", str(tmp_path / "out")], tmp_path / "out", capsys)
    for w in words:
        assert w in line, line


@pytest.mark.parametrize("overrides, resources, words", BAD_VALUES, ids=[str(b[0]) for b in BAD_VALUES])
def test_tune_refuses_each_bad_value_before_launch(tmp_path, capsys, overrides, resources, words):
    raw = copy.deepcopy(TINY_STUDY)
    for key, value in overrides.items():
        section, name = key.split(".")
        raw["base"][section][name] = value
    raw["resources"].update(resources)
    spec = tmp_path / "tune.yaml"
    spec.write_text(yaml.safe_dump(raw))
    lines = _refused(["tune", str(spec), "--out", str(tmp_path / "out")], tmp_path / "out", capsys)
    assert lines and any(all(w in line for w in words) for line in lines), lines


def test_tune_refuses_a_bad_categorical_choice(tmp_path, capsys):
    raw = copy.deepcopy(TINY_STUDY)
    raw["search"]["params"]["model.offset_range"] = [-1.0, 0.0]
    spec = tmp_path / "tune.yaml"
    spec.write_text(yaml.safe_dump(raw))
    (line,) = _refused(["tune", str(spec), "--out", str(tmp_path / "out")], tmp_path / "out", capsys)
    assert "search.params.model.offset_range=-1.0" in line and "model.offset_range=-1.0 is not allowed" in line


def _camvid(root: Path) -> Path:
    """A miniature SegNet-layout CamVid (3 train, 2 val images of 32x32)."""
    for split, n in (("train", 3), ("val", 2)):
        lines = []
        for i in range(n):
            name = f"{split}{i}.png"
            for folder, array in ((split, np.full((32, 32, 3), 40 * i, np.uint8)),
                                  (f"{split}annot", np.full((32, 32), i, np.uint8))):
                (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / name)
            lines.append(f"/x/{split}/{name} /x/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("damage, words", [
    ("missing", ["val/val1.png", "val.txt line 2", "does not exist"]),
    ("truncated", ["trainannot/train2.png", "train.txt line 3", "truncated"]),
    ("mis-sized", ["trainannot/train0.png", "train.txt line 1", "16x16", "32x32"]),
])
def test_run_names_a_broken_camvid_file_before_any_training(tmp_path, capsys, write_spec, damage, words):
    root = _camvid(tmp_path / "camvid")
    if damage == "missing":
        (root / "val" / "val1.png").unlink()
    elif damage == "truncated":
        path = root / "trainannot" / "train2.png"
        path.write_bytes(path.read_bytes()[:-30])  # header intact, end cut off
    else:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "trainannot" / "train0.png")
    base = _base({"data.name": "camvid", "data.root": str(root), "data.crop_size": [32, 32]})
    spec = write_spec(tmp_path / "camvid.yaml", base=base)
    (line,) = _refused(["run", str(spec), "--out", str(tmp_path / "out")], tmp_path / "out", capsys)
    for w in words:
        assert w in line, line


def test_a_config_error_inside_a_worker_is_class_config_and_never_retried(write_spec, tmp_path, capsys):
    assert classify_failure(ConfigError("bad")) == "config"
    assert classify_failure(RuntimeError("wrapped")) == "error"
    spec = write_spec(tmp_path / "r.yaml", retry_on=["oom", "config"])
    (line,) = _refused(["run", str(spec), "--out", str(tmp_path / "out")], tmp_path / "out", capsys)
    assert "retry_on: 'config' is not allowed" in line and "deterministic" in line
