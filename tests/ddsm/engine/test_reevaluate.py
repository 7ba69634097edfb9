"""Re-scoring a finished run from its final checkpoint (ddsm.engine.reevaluate) and the thread count of a trial."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddsm.config import ConfigError, from_dict
from ddsm.engine import reevaluate, train
from ddsm.engine.train import intra_op_threads

BASE = {"model": {"name": "fpn", "backbone": "resnet18", "decoder_dim": 16},
        "data": {"name": "synthetic", "num_images": 8, "image_size": [32, 32], "crop_size": [32, 32],
                 "batch_size": 2},
        "train": {"steps": 2, "device": "cpu", "log_every": 1},
        "eval": {"tolerances": [1, 2]}}


def _cfg(**sections: dict):
    d = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        d[section].update(values)
    return from_dict(d).validate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(_cfg(), out_dir=out)
    return out


def test_reevaluate_scores_the_final_checkpoint_with_new_eval_settings(trained: Path):
    before = json.loads((trained / "metrics.json").read_text())
    again = reevaluate(_cfg(), out_dir=trained)
    assert again["miou"] == before["miou"] and again["bf_2px"] == before["bf_2px"]  # same weights, same scores
    changed = reevaluate(_cfg(eval={"tolerances": [1, 3]}), out_dir=trained)
    written = json.loads((trained / "metrics.json").read_text())
    assert "bf_3px" in written and "bf_2px" not in written and written["bf_1px"] == before["bf_1px"]
    assert written["train_time_s"] == before["train_time_s"] and written["step"] == 2  # the training's, kept
    assert changed["split"] == "val"
    test = reevaluate(_cfg(data={"val_split": "test"}), out_dir=trained)
    assert test["split"] == "test" and test["num_images"] == 2
    assert "tolerances: [1.0, 3.0]" not in (trained / "config.yaml").read_text()  # the last evaluation's config


def test_reevaluate_refuses_another_training_or_an_unfinished_one(trained: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="train.lr differs"):
        reevaluate(_cfg(train={"lr": 0.5}), out_dir=trained)
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    (tmp_path / "mid" / "checkpoints").mkdir(parents=True)
    torch.save({**ckpt, "step": 1}, tmp_path / "mid" / "checkpoints" / "last.pt")  # killed after step 1
    with pytest.raises(ConfigError, match="holds step 1 of 2"):
        reevaluate(_cfg(), out_dir=tmp_path / "mid")
    with pytest.raises(ConfigError, match="no intact final checkpoint"):
        reevaluate(_cfg(), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.val_split .minival is held out"):  # holding out minival retrains
        reevaluate(_cfg(data={"val_split": "minival"}), out_dir=trained)


def test_reevaluate_falls_back_from_a_damaged_last_checkpoint(trained: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert (run / "checkpoints" / "step_0000002.pt").is_file()
    (run / "checkpoints" / "step_0000002.pt").write_bytes(b"not a checkpoint")
    assert reevaluate(_cfg(), out_dir=run)["step"] == 2  # scored from last.pt, its intact twin
    assert (run / "checkpoints" / "step_0000002.pt.damaged").is_file()  # set aside, as a resume does
    for path in (run / "checkpoints").glob("*.pt"):
        path.write_bytes(b"damaged")
    with pytest.raises(ConfigError, match="no intact final checkpoint .*last.pt"):
        reevaluate(_cfg(), out_dir=run)


def test_threads_are_set_for_the_block_and_restored():
    before = torch.get_num_threads()
    with intra_op_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with intra_op_threads(0):  # 0 leaves the process's setting
        assert torch.get_num_threads() == before
