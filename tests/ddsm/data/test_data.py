"""Datasets, transforms and loaders: known answers on tiny generated trees, real CamVid when present."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from ddsm.config import ConfigError, DataConfig
from ddsm.data import DatasetError, build_dataset, build_loader, dataset_info
from ddsm.data import camvid, cityscapes
from ddsm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, normalize

CAMVID = camvid.resolve_root(None)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _unnormalize(image: torch.Tensor) -> torch.Tensor:
    """float (3, H, W) normalised -> uint8-valued float (3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).round()


# ----------------------------------------------------------------------------- cityscapes


def _cityscapes_tree(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two train cities and one val city of 6x8 PNGs; returns raw labelIds per image file name."""
    raw = {}
    for split, city, frames in [("train", "aachen", 2), ("train", "bochum", 1), ("val", "frankfurt", 1)]:
        for f in range(frames):
            stem = f"{city}_{f:06d}_000019"
            ids = rng.integers(0, 34, size=(6, 8), dtype=np.uint8)  # every labelId, including ignored ones
            _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                 rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
            _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
            raw[f"{stem}_leftImg8bit.png"] = ids
    return raw


def _oracle_train_ids(ids: np.ndarray) -> np.ndarray:
    labels = pytest.importorskip("cityscapesscripts.helpers.labels", reason="cityscapesscripts is the test oracle")
    table = {l.id: (l.trainId if 0 <= l.trainId < 255 else 255) for l in labels.labels if l.id >= 0}
    return np.vectorize(table.__getitem__)(ids)


def test_cityscapes_table_matches_cityscapesscripts():
    ids = np.arange(cityscapes.NUM_LABEL_IDS)
    assert cityscapes.label_table()[ids].tolist() == _oracle_train_ids(ids).tolist()
    assert (cityscapes.label_table()[cityscapes.NUM_LABEL_IDS:] == -1).all()


def test_cityscapes_mini_tree_loads_train_ids(tmp_path):
    raw = _cityscapes_tree(tmp_path, np.random.default_rng(0))
    cfg = DataConfig(name="cityscapes", root=str(tmp_path))
    train, val = build_dataset(cfg, split="train", train=False), build_dataset(cfg, split="val", train=False)
    assert (len(train), len(val)) == (3, 1)
    for ds in (train, val):
        for i, (image_path, _) in enumerate(ds.pairs):
            image, label = ds[i]
            assert image.shape == (3, 6, 8) and image.dtype == torch.float32
            assert label.dtype == torch.int64
            assert label.numpy().tolist() == _oracle_train_ids(raw[image_path.name]).tolist()
    info = dataset_info("cityscapes")
    assert (info.num_classes, info.class_names[0], info.class_names[18]) == (19, "road", "bicycle")


def test_cityscapes_image_without_label(tmp_path):
    _cityscapes_tree(tmp_path, np.random.default_rng(0))
    orphan = _png(tmp_path / "leftImg8bit/train/bochum/bochum_000009_000019_leftImg8bit.png",
                  np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="bochum_000009_000019_leftImg8bit.png.*no label file"):
        build_dataset(DataConfig(name="cityscapes", root=str(tmp_path)), split="train", train=False)
    assert orphan.is_file()


def test_cityscapes_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        build_dataset(DataConfig(name="cityscapes", root=str(missing)), split="val", train=False)
    assert str(missing) in str(e.value) and "gtFine/{split}/{city}/*_gtFine_labelIds.png" in str(e.value)


# ----------------------------------------------------------------------------- camvid


def _camvid_tree(root: Path, labels: dict[str, np.ndarray]) -> None:
    """A SegNet-layout tree with one 4x5 image per entry of ``labels`` in both splits."""
    for split in ("train", "val"):
        lines = []
        for name, label in labels.items():
            _png(root / split / name, np.full((*label.shape, 3), 100, np.uint8))
            _png(root / f"{split}annot" / name, label)
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_camvid_mini_tree_maps_void_to_ignore(tmp_path):
    label = np.arange(10, dtype=np.uint8).repeat(2).reshape(4, 5)  # train ids 0..9
    label[-1, -1] = camvid.VOID
    _camvid_tree(tmp_path, {"a.png": label})
    image, out = build_dataset(DataConfig(name="camvid", root=str(tmp_path)), split="val", train=False)[0]
    expected = torch.from_numpy(label.astype(np.int64))
    expected[-1, -1] = 255
    assert torch.equal(out, expected)
    assert torch.allclose(_unnormalize(image), torch.full((3, 4, 5), 100.0), atol=0.5)


def test_camvid_out_of_range_labels_name_file_and_values(tmp_path):
    label = np.zeros((4, 5), np.uint8)
    label[0, :2] = (12, 200)
    _camvid_tree(tmp_path, {"bad.png": label})
    ds = build_dataset(DataConfig(name="camvid", root=str(tmp_path)), split="train", train=False)
    with pytest.raises(DatasetError, match=r"trainannot/bad\.png.* values 12, 200 .*0\.\.11"):
        ds[0]


def test_camvid_image_without_label(tmp_path):
    _camvid_tree(tmp_path, {"a.png": np.zeros((4, 5), np.uint8)})
    (tmp_path / "valannot" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"val/a\.png.*no label file.*valannot/a\.png"):
        build_dataset(DataConfig(name="camvid", root=str(tmp_path)), split="val", train=False)


def test_camvid_unreadable_file_named(tmp_path):
    _camvid_tree(tmp_path, {"a.png": np.zeros((4, 5), np.uint8)})
    (tmp_path / "train" / "a.png").write_bytes(b"not a png")
    ds = build_dataset(DataConfig(name="camvid", root=str(tmp_path)), split="train", train=False)
    with pytest.raises(DatasetError, match=r"cannot read image file .*train/a\.png"):
        ds[0]


def test_camvid_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as e:
        build_dataset(DataConfig(name="camvid", root=str(missing)), split="train", train=False)
    assert isinstance(e.value, DatasetError)
    assert str(missing) in str(e.value) and "train.txt" in str(e.value) and "trainannot/" in str(e.value)


def test_camvid_root_falls_back_to_env_then_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("DDSM_CAMVID_ROOT", str(tmp_path))
    assert camvid.resolve_root(None) == tmp_path
    assert camvid.resolve_root("/explicit") == Path("/explicit")
    monkeypatch.delenv("DDSM_CAMVID_ROOT")
    repo = Path(__file__).resolve().parents[3]
    assert camvid.resolve_root(None) == (repo / ".." / "shared" / "data" / "camvid").resolve()


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid not found at {CAMVID}")
def test_real_camvid_splits_and_item():
    cfg = DataConfig(name="camvid")
    train, val = build_dataset(cfg, split="train", train=False), build_dataset(cfg, split="val", train=False)
    assert (len(train), len(val)) == (367, 101)
    image, label = val[0]
    assert image.shape == (3, 360, 480) and label.shape == (360, 480)
    values = set(torch.unique(label).tolist())
    assert values <= set(range(11)) | {255} and len(values - {255}) > 3
    assert dataset_info("camvid").num_classes == 11


# ----------------------------------------------------------------------------- synthetic


def _items(cfg: DataConfig, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = build_dataset(cfg, split="train", train=False)
    return [ds[i] for i in range(n)]


def test_synthetic_deterministic_and_seed_dependent():
    cfg = DataConfig(seed=3, image_size=(48, 64))
    a, b, c = _items(cfg, 3), _items(cfg, 3), _items(DataConfig(seed=4, image_size=(48, 64)), 3)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not any(torch.equal(x[1], y[1]) for x, y in zip(a, c))
    val = build_dataset(cfg, split="val", train=False)
    assert len(val) == 16 and not torch.equal(val[0][1], a[0][1])


def _thin_classes(label: np.ndarray, num_classes: int) -> set[int]:
    """Classes with a connected part of >= 8 px that a 4x4 opening removes entirely (width <= 3 px)."""
    thin = set()
    for c in range(num_classes):
        parts, n = ndimage.label(label == c)
        for p in range(1, n + 1):
            part = parts == p
            if part.sum() >= 8 and not ndimage.binary_opening(part, structure=np.ones((4, 4))).any():
                thin.add(c)
    return thin


def test_synthetic_content_thin_structures_ignore_and_range():
    cfg = DataConfig(num_classes=8, image_size=(96, 128))
    thin = set()
    for image, label in _items(cfg, 4):
        assert image.shape == (3, 96, 128) and label.shape == (96, 128)
        lab = label.numpy()
        assert set(np.unique(lab).tolist()) <= set(range(8)) | {255}
        assert (lab == 255).any()
        assert len(np.unique(lab)) >= 6
        thin |= _thin_classes(lab, 8)
    assert {3, 7} <= thin  # poles and lines


def test_synthetic_extra_and_fewer_classes():
    for k in (3, 12):
        labels = torch.stack([y for _, y in _items(DataConfig(num_classes=k, num_images=8, image_size=(64, 64)), 8)])
        present = set(torch.unique(labels).tolist()) - {255}
        assert present <= set(range(k)) and max(present) == k - 1
    assert dataset_info("synthetic", DataConfig(num_classes=10)).class_names[-2:] == ["object_8", "object_9"]
    with pytest.raises(DatasetError, match="data.num_classes=1 "):
        build_dataset(DataConfig(num_classes=1), split="train", train=False)


# ----------------------------------------------------------------------------- transforms


def _ramp_pair(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image whose red channel encodes the column, label = column % 7: any misalignment shows."""
    cols = torch.arange(w, dtype=torch.uint8).expand(h, w)
    image = torch.stack([cols * 10, torch.full((h, w), 50, dtype=torch.uint8), cols * 3])  # (3, H, W)
    return image, cols % 7


def test_normalize_known_answer():
    image = torch.tensor([round(m * 255) for m in IMAGENET_MEAN], dtype=torch.uint8)[:, None, None].expand(3, 2, 2)
    out, label = normalize(image, torch.zeros(2, 2, dtype=torch.uint8))
    assert out.abs().max() < 0.01 and label.dtype == torch.int64
    assert torch.equal(EvalTransform()(image, torch.ones(2, 2, dtype=torch.uint8))[1], torch.ones(2, 2).long())


def test_crop_pads_with_ignore_and_zero():
    image, label = _ramp_pair(4, 6)
    t = TrainTransform(crop_size=(8, 10), scale_range=(1.0, 1.0), flip=False, jitter=0.0)
    out, lab = t(image, label, torch.Generator().manual_seed(0))
    assert out.shape == (3, 8, 10) and lab.shape == (8, 10)
    assert torch.equal(lab[:4, :6], label.long()) and (lab[4:] == 255).all() and (lab[:, 6:] == 255).all()
    assert (_unnormalize(out)[:, 4:] == 0).all() and (_unnormalize(out)[:, :, 6:] == 0).all()


@pytest.mark.parametrize("size,crop,scale", [((20, 30), (16, 16), (0.5, 2.0)), ((10, 12), (24, 8), (1.0, 1.5))])
def test_train_output_sizes(size, crop, scale):
    image, label = _ramp_pair(*size)
    t = TrainTransform(crop_size=crop, scale_range=scale, flip=True, jitter=0.3)
    for s in range(5):
        out, lab = t(image, label, torch.Generator().manual_seed(s))
        assert out.shape == (3, *crop) and out.dtype == torch.float32 and lab.shape == crop


def test_flip_moves_image_and_label_together():
    image, label = _ramp_pair(5, 9)
    t = TrainTransform(crop_size=(5, 9), scale_range=(1.0, 1.0), flip=True, jitter=0.0)
    flipped = 0
    for s in range(20):
        out, lab = t(image, label, torch.Generator().manual_seed(s))
        red = _unnormalize(out)[0]  # (5, 9) = column * 10
        assert torch.equal((red / 10).long() % 7, lab)  # still aligned
        flipped += bool(torch.equal(lab, torch.flip(label.long(), dims=[1])))
    assert 0 < flipped < 20


def test_jitter_changes_image_only_and_is_seeded():
    image, label = _ramp_pair(8, 8)
    t = TrainTransform(crop_size=(8, 8), scale_range=(1.0, 1.0), flip=False, jitter=0.5)
    a, b = t(image, label, torch.Generator().manual_seed(1)), t(image, label, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], label.long())
    assert not torch.allclose(a[0], normalize(image, label)[0])


# ----------------------------------------------------------------------------- loaders


def test_train_loader_seeded_and_reiterable():
    cfg = DataConfig(num_images=6, batch_size=4, image_size=(32, 32), crop_size=(24, 24))
    first = [b for b in build_loader(cfg, split="train", train=True, seed=7)]
    again = build_loader(cfg, split="train", train=True, seed=7)
    assert len(first) == 1 and first[0][0].shape == (4, 3, 24, 24) and first[0][1].shape == (4, 24, 24)
    epoch1, epoch2 = next(iter(again)), next(iter(again))
    assert torch.equal(first[0][0], epoch1[0]) and not torch.equal(epoch1[0], epoch2[0])
    other = next(iter(build_loader(cfg, split="train", train=True, seed=8)))
    assert not torch.equal(first[0][0], other[0])


def test_loader_shards_and_validation_batches():
    cfg = DataConfig(num_images=20, batch_size=2, image_size=(32, 32))
    shards = [build_loader(cfg, split="val", train=False, distributed_rank=r, world_size=2) for r in (0, 1)]
    assert [len(s.sampler) for s in shards] == [3, 2]  # 5 val images, no padding
    assert next(iter(shards[0]))[0].shape == (2, 3, 32, 32)
    train = [build_loader(cfg, split="train", train=True, distributed_rank=r, world_size=2) for r in (0, 1)]
    seen = [{i for i, _ in s.sampler} for s in train]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20
    with pytest.raises(DatasetError, match="data.batch_size=8"):
        build_loader(DataConfig(num_images=4), split="train", train=True)


def test_unknown_name_and_split():
    with pytest.raises(DatasetError, match="data.name='kitti'.*synthetic, camvid, cityscapes"):
        build_dataset(DataConfig(name="kitti"), split="train", train=True)
    with pytest.raises(DatasetError, match="split='dev'"):
        build_dataset(DataConfig(), split="dev", train=False)


def test_loader_batches_do_not_depend_on_workers():
    cfg = DataConfig(num_images=4, batch_size=2, image_size=(32, 32), crop_size=(16, 16))
    inline = next(iter(build_loader(cfg, split="train", train=True, seed=1)))
    cfg.workers = 1
    worker = next(iter(build_loader(cfg, split="train", train=True, seed=1)))
    assert torch.equal(inline[0], worker[0]) and torch.equal(inline[1], worker[1])
