"""Where DDSM samples and what a model shows: the positions recorded are the ones the op used, and a tiny
trained model on synthetic data yields panels, sampling and offset figures (issue 16)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddsm.config import ConfigError, from_dict
from ddsm.models.sampling import dynamic_affinity, record_positions
from ddsm.viz import ViewSettings, probe_pixels, sampling_calls, save_views, to_image_coords

TINY_DDSM = {
    "model": {"name": "ddsm", "backbone": "resnet18", "weights": None, "decoder_dim": 16, "branches": "dual",
              "num_points": 4},
    "data": {"name": "synthetic", "image_size": [32, 32], "crop_size": [32, 32], "num_images": 12, "num_classes": 8,
             "batch_size": 2},
    "train": {"steps": 2, "val_every": 0, "ckpt_every": 0, "log_every": 1, "device": "cpu", "lr": 0.02},
    "eval": {"tolerances": [1, 2], "max_images": 2},
}


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
def test_recorded_positions_are_what_the_op_sampled(impl):
    """With a zero query the affinity is uniform, so the op returns the mean of the values it read; values
    that are the (y, x) coordinates (bilinear sampling of a linear map is exact) make that mean the mean
    sampled position: it must equal the mean of the recorded positions."""
    torch.manual_seed(0)
    B, N, H, W = 2, 9, 12, 14
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    value = torch.stack([ys, xs])[None].expand(B, 2, H, W).contiguous()  # (B, 2, H, W): value = position
    offsets = torch.rand(B, 2 * N, H, W) * 1.6 - 0.8  # within the map for the interior pixels checked below
    query, key = torch.zeros(B, 4, H, W), torch.randn(B, 4, H, W)
    with record_positions() as calls:
        out = dynamic_affinity(query, key, value, offsets, num_points=N, impl=impl)  # (B, 2, H, W)
    assert len(calls) == 1
    pos = calls[0]["positions"]  # (B, N, H, W, 2)
    assert pos.shape == (B, N, H, W, 2) and calls[0]["map_size"] == (H, W)
    inner = (slice(None), slice(2, H - 2), slice(2, W - 2))
    got = out.permute(0, 2, 3, 1)[inner]  # (B, h, w, 2) what the op computed
    want = pos.mean(dim=1)[inner]  # (B, h, w, 2) from the recorded positions
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    base = pos - calls[0]["offsets"]  # the recorded offsets are the learned part of the positions
    torch.testing.assert_close(base[0, :, 5, 6].round(), base[0, :, 5, 6], atol=1e-5, rtol=0)


def test_nothing_recorded_outside_a_block():
    q = torch.zeros(1, 2, 4, 4)
    with record_positions() as calls:
        pass
    dynamic_affinity(q, q, q, torch.zeros(1, 8, 4, 4), num_points=4)
    assert calls == []


def test_probe_pixels_pick_a_thin_a_boundary_and_a_flat_pixel():
    label = np.zeros((20, 30), dtype=np.uint8)
    label[10:, :] = 1
    label[2:18, 20:22] = 3  # a pole, two pixels wide
    probes = probe_pixels(label, thin_ids=[3])
    assert label[probes["thin"]] == 3
    y, x = probes["boundary"]
    assert label[y, x] != label[min(y + 1, 19), x] or label[y, x] != label[y, min(x + 1, 29)]
    assert probes["flat"] == (probes["flat"][0], probes["flat"][1]) and label[probes["flat"]] in (0, 1)
    assert probe_pixels(np.zeros((5, 5), dtype=np.uint8), thin_ids=[3]) == {}


def test_image_coords_of_feature_pixels():
    # stride 4: feature pixel 0 covers input pixels 0..3, its centre is 1.5
    assert to_image_coords([[0, 0], [1, 2]], map_size=(8, 8), image_size=(32, 32)).tolist() == [[1.5, 1.5],
                                                                                                 [5.5, 9.5]]


def test_view_settings_validation():
    assert ViewSettings.from_dict({"images": 3, "pool": 5}).images == 3
    for bad, field in [({"images": -1}, "images"), ({"pool": 1, "images": 2}, "pool"), ({"tolerance": 0}, "tolerance"),
                       ({"imgs": 2}, "imgs"), ({"names": "a"}, "names")]:
        with pytest.raises(ConfigError, match=f"figures.{field}"):
            ViewSettings.from_dict(bad)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DDSM trained 2 steps on synthetic data, its views saved; offsets made non-zero first so that
    learned and base positions differ."""
    from ddsm import engine
    from ddsm.data import dataset_info
    from ddsm.engine.checkpoint import load_checkpoint
    from ddsm.models import build_model_from_config

    out = tmp_path_factory.mktemp("cell")
    cfg = from_dict(TINY_DDSM).validate()
    engine.train(cfg, out_dir=out)
    model = build_model_from_config(cfg.model, num_classes=dataset_info("synthetic", cfg.data).num_classes)
    model.load_state_dict(load_checkpoint(out / "checkpoints" / "last.pt")["model"])
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("offset.weight"):
            p.data.normal_(0, 0.05)
    views = save_views(model, cfg, out, ViewSettings(images=2, differ=1, pool=3))
    return model, cfg, views


def test_views_of_a_trained_model(trained):
    model, cfg, views = trained
    index = json.loads((views / "index.json").read_text())
    assert [im["fixed"] for im in index["images"]] == [True, True, False]
    assert index["thin_classes"] == ["pole", "sign", "line"] and len(index["palette"]) == 8
    for im in index["images"]:
        for kind in ("input", "gt", "pred"):
            assert (views / f"{kind}_{im['name']}.{'jpg' if kind == 'input' else 'png'}").is_file()
    assert len((views / "per_image.csv").read_text().splitlines()) == 4
    offsets = json.loads((views / "offsets.json").read_text())
    assert [c["branch"] for c in offsets["calls"]] == ["spatial", "channel"] * 3
    assert sum(offsets["calls"][0]["counts"]) == 3 * 4 * 2 * 2  # 3 images x N=4 x a 2x2 map at stride 16


def test_sampling_json_holds_the_positions_the_module_used(trained):
    """sampling.json (what the figure draws) against a fresh recording of the op on the probe image."""
    from ddsm.data import build_dataset

    model, cfg, views = trained
    data = json.loads((views / "sampling.json").read_text())
    ds = build_dataset(cfg.data, split="val", train=False)
    index = json.loads((views / "index.json").read_text())["images"][0]["index"]
    with torch.no_grad(), record_positions() as calls:
        model.eval()(ds[index][0][None])
    assert len(calls) == len(data["calls"]) == 6
    size = tuple(data["image_size"])
    moved = 0
    for rec, drawn in zip(calls, data["calls"]):
        pos = rec["positions"][0].numpy()  # (N, H, W, 2)
        for p in drawn["points"].values():
            if drawn["branch"] == "spatial":
                fy, fx = p["feature_pixel"]
                want = to_image_coords(pos[:, fy, fx], map_size=rec["map_size"], image_size=size)
            else:
                cy, cx = p["cell"]
                want = pos[:, cy, cx]
            np.testing.assert_allclose(np.asarray(p["sampled"]), want, atol=1e-5)
            moved += int(not np.allclose(p["sampled"], p["base"]))
    assert moved > 0  # learned positions differ from the base grid


def test_figures_of_a_trained_model(trained, tmp_path):
    from reports import panels

    _, _, views = trained
    names = [im["name"] for im in json.loads((views / "index.json").read_text())["images"]]
    folders = {"ddsm": views, "ddsm again": views}
    assert panels.pick_images(folders, differ=1)[:2] == [(names[0], "fixed"), (names[1], "fixed")]
    assert panels.plot_panel(names[0], folders, path=tmp_path / "panel.png").stat().st_size > 10_000
    fig = panels.sampling_figure("ddsm", views)
    data = json.loads((views / "sampling.json").read_text())
    drawn = [line.get_xydata() for ax in fig.axes for line in ax.lines if line.get_label().startswith(("thin", "boundary",
                                                                                                         "flat"))]
    first = next(iter(data["calls"][0]["points"].values()))
    np.testing.assert_allclose(drawn[0], np.asarray(first["sampled"])[:, ::-1])  # (x, y) on the axes
    assert panels.plot_offset_hist(folders, path=tmp_path / "off.png").is_file()
