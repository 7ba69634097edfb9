"""DDSM's controls change the sampling exactly as documented: channel order, base-grid dilation, fixed
offsets; and every DDSM layer reports its offsets (the engine logs them at each validation)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddsm.config import ConfigError, from_dict
from ddsm.engine import Callback
from ddsm.models import build_model, offset_stats
from ddsm.models.ddsm import DDSM, ChannelBranch, SpatialBranch, offset_magnitude
from ddsm.models.sampling import dynamic_affinity


def _uniform_attention(branch) -> None:
    """Zero query: every logit is 0, so the affinity is uniform over the points on the map."""
    torch.nn.init.zeros_(branch.query.weight)
    torch.nn.init.zeros_(branch.query.bias)


@pytest.mark.parametrize("order", ["natural", "permuted"])
def test_channel_order_with_zero_offsets_samples_the_grid_neighbours(order):
    """With zero offsets and a uniform affinity, output channel j is the mean of the value channels at the
    (on-grid) 3x3 neighbours of j's cell; permuted: j sits at cell perm^-1(j) and its neighbours are perm[...]."""
    torch.manual_seed(0)
    br = ChannelBranch(16, num_points=9, pooled_size=2, channel_order=order, align_corners=False)  # 4 x 4 grid
    _uniform_attention(br)
    x_l, x_h = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)  # same size: the final upsampling is the identity
    with torch.no_grad():
        out = br(x_l, x_h)
        v = br.value(x_h)  # (1, 16, 4, 4): value channels in channel order
    perm = br.perm if order == "permuted" else torch.arange(16)
    cell_of = torch.argsort(perm)  # channel j sits at cell cell_of[j]
    for j in range(16):
        gy, gx = divmod(int(cell_of[j]), 4)
        neighbours = [int(perm[y * 4 + x]) for y in range(gy - 1, gy + 2) for x in range(gx - 1, gx + 2)
                      if 0 <= y < 4 and 0 <= x < 4]
        torch.testing.assert_close(out[0, j], v[0, neighbours].mean(0), atol=1e-5, rtol=1e-5)
    if order == "permuted":
        assert not torch.equal(perm, torch.arange(16))


def test_permutation_is_seeded_by_the_trial_seed_and_saved_with_the_weights():
    torch.manual_seed(3)
    a = DDSM(16, channel_order="permuted").channel.perm
    torch.manual_seed(3)
    b = DDSM(16, channel_order="permuted").channel.perm
    torch.manual_seed(4)
    c = DDSM(16, channel_order="permuted").channel.perm
    assert torch.equal(a, b) and not torch.equal(a, c)
    model = build_model("ddsm", num_classes=3, channel_order="permuted")
    state = model.state_dict()
    assert any(k.endswith("channel.perm") for k in state)
    clone = build_model("ddsm", num_classes=3, channel_order="permuted")
    clone.load_state_dict(state)
    assert all(torch.equal(x.channel.perm, y.channel.perm)
               for x, y in zip(model.head.fusions, clone.head.fusions))


@pytest.mark.parametrize("dilation", [2, 3])
def test_grid_dilation_with_zero_offsets_samples_the_dilated_neighbourhood(dilation):
    """Zero offsets, zero-padding mode: the spatial sampling is an explicit dilated 3 x 3 gather."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 7, 8) for _ in range(3))
    got = dynamic_affinity(q, k, v, torch.zeros(1, 18, 7, 8), num_points=9, dilation=dilation, out_of_map="zero")
    unfold = lambda t: F.unfold(t, 3, dilation=dilation, padding=dilation).view(1, 4, 9, 7, 8)  # noqa: E731
    attn = ((q[:, :, None] * unfold(k)).sum(1) / 2).softmax(1)
    torch.testing.assert_close(got, (attn[:, None] * unfold(v)).sum(2), atol=1e-5, rtol=1e-5)


def test_spatial_branch_uses_its_grid_dilation():
    torch.manual_seed(2)
    near, far = SpatialBranch(8, grid_dilation=1), SpatialBranch(8, grid_dilation=3)
    far.load_state_dict(near.state_dict())
    x_l, x_h = torch.randn(1, 8, 9, 9), torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert not torch.allclose(near(x_l, x_h), far(x_l, x_h))


def test_fixed_offsets_have_no_offset_conv_and_stay_on_the_grid():
    model = build_model("ddsm", num_classes=3, learn_offsets=False, grid_dilation=2)
    assert not any("offset" in n for n, _ in model.named_parameters())
    model(torch.randn(2, 3, 64, 64))
    stats = offset_stats(model)
    assert stats and all(v == 0.0 for v in stats.values())


def test_bad_control_values_name_the_option():
    for kwargs, words in [(dict(channel_order="random"), "channel_order='random'.*natural, permuted"),
                          (dict(grid_dilation=0), "grid_dilation=0.*integer >= 1"),
                          (dict(learn_offsets="yes"), "learn_offsets='yes'")]:
        with pytest.raises(ConfigError, match=words):
            build_model("ddsm", num_classes=3, **kwargs)


# ----------------------------------------------------------------------------- offset statistics


def test_offset_magnitude_known_answer():
    off = torch.zeros(1, 4, 1, 2)  # N = 2 points at 2 locations: (dy, dx) pairs
    off[0, 0:2, 0, 0] = torch.tensor([3.0, 4.0])  # point 1 at location 0: |(3, 4)| = 5
    off[0, 2:4, 0, 1] = torch.tensor([0.0, -1.0])  # point 2 at location 1: 1
    assert offset_magnitude(off) == (pytest.approx(6.0 / 4), 5.0)


def test_every_ddsm_layer_reports_its_last_forward():
    torch.manual_seed(0)
    model = build_model("ddsm", num_classes=3, branches="dual")
    assert offset_stats(model) == {}  # nothing ran yet
    for m in model.modules():
        if isinstance(m, (SpatialBranch, ChannelBranch)):
            torch.nn.init.normal_(m.offset.weight, std=0.01)
    model(torch.randn(2, 3, 64, 64))
    stats = offset_stats(model)
    layers = {f"head.fusions.{i}.{b}" for i in range(3) for b in ("spatial", "channel")}
    assert set(stats) == {f"offset_{s}/{layer}" for s in ("mean", "max") for layer in layers}
    spatial = model.head.fusions[1].spatial.last_offsets
    assert stats["offset_max/head.fusions.1.spatial"] == pytest.approx(offset_magnitude(spatial)[1])
    assert all(stats[f"offset_mean/{x}"] <= stats[f"offset_max/{x}"] for x in layers)
    assert offset_stats(build_model("fpn", num_classes=3)) == {}


class Evals(Callback):
    def __init__(self) -> None:
        self.evals: list[tuple[int, dict]] = []

    def on_eval(self, step: int, metrics: dict) -> None:
        self.evals.append((step, metrics))


def test_engine_logs_offsets_at_every_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import ddsm.profile
    from ddsm.engine import train

    monkeypatch.setattr(ddsm.profile, "trial_cost", lambda model, cfg, *, device: {}, raising=False)
    cfg = from_dict({
        "data": {"name": "synthetic", "num_images": 4, "image_size": [32, 32], "crop_size": [32, 32], "batch_size": 2},
        "model": {"name": "ddsm", "backbone": "resnet18", "branches": "spatial", "decoder_dim": 16},
        "train": {"steps": 2, "lr": 0.05, "device": "cpu", "val_every": 1, "log_every": 1},
        "eval": {"tolerances": [1]},
    }).validate()
    rec = Evals()
    train(cfg, out_dir=tmp_path, callbacks=[rec])
    assert [step for step, _ in rec.evals] == [1, 2]
    for _, metrics in rec.evals:
        keys = [k for k in metrics if k.startswith("offset_")]
        assert sorted(keys) == sorted(f"offset_{s}/head.fusions.{i}.spatial" for s in ("mean", "max") for i in range(3))
    # the offset conv is zero-initialised and learns: after two updates the points have moved
    assert rec.evals[-1][1]["offset_max/head.fusions.0.spatial"] > 0
