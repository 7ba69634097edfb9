"""Known answers for DDSM's dynamic sampling + affinity op and its two branches."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddsm.models.ddsm import ChannelBranch, SpatialBranch
from ddsm.models.sampling import base_grid, dynamic_affinity, sample_at, sample_positions


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_zero_offsets_equal_unfold_neighbourhood(k):
    torch.manual_seed(0)
    B, C, H, W, N = 2, 3, 6, 7, k * k
    feat = torch.randn(B, C, H, W)
    pos = sample_positions(torch.zeros(B, 2 * N, H, W), N)
    got = sample_at(feat, pos)  # (B, N, C, H, W)
    ref = F.unfold(feat, k, padding=k // 2).view(B, C, N, H, W).transpose(1, 2)  # zero-padded k x k gather
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_integer_offsets_shift_the_sample():
    feat = torch.arange(20.0).view(1, 1, 4, 5)
    off = torch.zeros(1, 2, 4, 5)
    off[:, 0] = 1.0  # dy = +1
    off[:, 1] = -2.0  # dx = -2
    got = sample_at(feat, sample_positions(off, 1))[0, 0, 0]
    ref = torch.zeros(4, 5)
    ref[:3, 2:] = feat[0, 0, 1:, :3]
    torch.testing.assert_close(got, ref)


def test_base_grid_even_is_centred():
    g = base_grid(4)
    assert g.tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]
    with pytest.raises(ValueError, match="num_points=8"):
        base_grid(8)


@pytest.mark.parametrize("out_of_map", ["zero", "mask"])
def test_affinity_equals_explicit_softmax(out_of_map):
    torch.manual_seed(1)
    B, C, H, W, N = 1, 4, 5, 5, 9
    q, k, v = (torch.randn(B, C, H, W) for _ in range(3))
    off = torch.zeros(B, 2 * N, H, W)
    got = dynamic_affinity(q, k, v, off, num_points=N, out_of_map=out_of_map)
    ku = F.unfold(k, 3, padding=1).view(B, C, N, H, W)
    vu = F.unfold(v, 3, padding=1).view(B, C, N, H, W)
    logits = (q[:, :, None] * ku).sum(1) / math.sqrt(C)  # (B, N, H, W)
    if out_of_map == "mask":  # the zero-padded neighbours of border pixels are left out of the softmax
        inside = F.unfold(torch.ones(B, 1, H, W), 3, padding=1).view(B, N, H, W) > 0
        logits = logits.masked_fill(~inside, float("-inf"))
    attn = logits.softmax(1)
    torch.testing.assert_close(got, (attn[:, None] * vu).sum(2), atol=1e-5, rtol=1e-5)


def test_gradcheck_sampling_and_affinity_float64():
    torch.manual_seed(2)
    B, C, H, W, N = 1, 2, 4, 4, 4
    q, k, v = (torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True) for _ in range(3))
    off = (0.3 * torch.randn(B, 2 * N, H, W, dtype=torch.float64)).requires_grad_()  # away from integer kinks
    assert torch.autograd.gradcheck(lambda *t: dynamic_affinity(*t, num_points=N), (q, k, v, off))


def test_spatial_n1_zero_offsets_is_projected_centre_value():
    torch.manual_seed(3)
    br = SpatialBranch(8, num_points=1, pos_embed="sine")
    x_l, x_h = torch.randn(2, 8, 8, 10), torch.randn(2, 8, 4, 5)
    xh = F.interpolate(br.pos_h(x_h), size=(8, 10), mode="bilinear", align_corners=br.align_corners)
    torch.testing.assert_close(br(x_l, x_h), br.proj(br.value(xh)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [16, 12])  # a perfect square, and one projected to 9
def test_channel_n1_zero_offsets_returns_own_channel(channels):
    torch.manual_seed(4)
    br = ChannelBranch(channels, num_points=1, pooled_size=2)
    x_l, x_h = torch.randn(2, channels, 8, 8), torch.randn(2, channels, 4, 4)
    expected = F.interpolate(br.proj(br.value(x_h)), size=(8, 8), mode="bilinear", align_corners=br.align_corners)
    torch.testing.assert_close(br(x_l, x_h), expected, atol=1e-5, rtol=1e-5)
    assert br.side ** 2 == (16 if channels == 16 else 9)
