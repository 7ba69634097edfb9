"""The spatial branch's offset conv: its up(x_h) half computed at h x w equals the conv on up(x_h)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddsm.models.ddsm import SpatialBranch, conv3x3_of_upsampled


def _direct(x: torch.Tensor, weight: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    up = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)  # (B, C, H, W)
    return F.conv2d(up, weight, padding=1)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(("low", "size"), [((4, 6), (8, 12)), ((3, 5), (7, 9)), ((5, 4), (5, 4)), ((1, 2), (3, 5))])
def test_taps_at_low_resolution_equal_the_conv_on_the_upsampled_map(low, size, align_corners):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *low, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = conv3x3_of_upsampled(x, w, size=size, align_corners=align_corners)
    ref = _direct(x, w, size, align_corners)
    assert ours.shape == ref.shape == (2, 4, *size)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)  # every border pixel included
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(ours, (x, w), g)
    ref_grads = torch.autograd.grad(ref, (x, w), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("align_corners", [True, False])
def test_branch_offsets_equal_one_conv_on_the_concat(align_corners):
    torch.manual_seed(1)
    branch = SpatialBranch(6, num_points=4, align_corners=align_corners).double()
    torch.nn.init.normal_(branch.offset.weight, std=0.3)
    torch.nn.init.normal_(branch.offset.bias, std=0.3)
    x_l = torch.randn(2, 6, 9, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x_h = torch.randn(2, 6, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    up = F.interpolate(x_h, size=(9, 11), mode="bilinear", align_corners=align_corners)
    ref = branch.offset(torch.cat([x_l, up], dim=1))  # the figure literally: one 3x3 conv on concat(x_l, up(x_h))
    torch.testing.assert_close(branch._offsets(x_l, x_h), ref, rtol=1e-12, atol=1e-12)


def test_taps_stay_float32_under_bf16_autocast():
    x, w = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv3x3_of_upsampled(x.bfloat16(), w, size=(8, 8), align_corners=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _direct(x.bfloat16().float(), w, (8, 8), True), rtol=1e-5, atol=1e-5)
