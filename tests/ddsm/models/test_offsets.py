"""The spatial branch's offset conv as 1x1 taps: the shift-sum, the up(x_h) half at h x w, the whole conv on the concat."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddsm.models.ddsm import SpatialBranch
from ddsm.models.offset_conv import conv3x3_of_upsampled, offset_conv_of_concat, shift_sum


def _direct(x: torch.Tensor, weight: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    up = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)  # (B, C, H, W)
    return F.conv2d(up, weight, padding=1)


@pytest.mark.parametrize("size", [(5, 7), (1, 4), (3, 1), (1, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_shift_sum_is_the_grouped_one_hot_conv(size, channels_last):
    """Known answer: a tap map that is 1 at one pixel lands at that pixel minus the tap's offset; and the
    whole op (forward, gradient) equals the grouped 3x3 conv with one-hot kernels, borders included."""
    n, s = 2, 0  # slot 0 = kernel position (ky, kx) = (2, 2): out(y, x) reads in(y + 1, x + 1)
    one = torch.zeros(1, 9 * n, 3, 3, dtype=torch.float64)
    one[0, s * n + 1, 1, 1] = 1.0
    hit = shift_sum(one, n)
    assert hit.shape == (1, n, 3, 3) and hit.sum() == 1 and hit[0, 1, 0, 0] == 1
    torch.manual_seed(0)
    taps = torch.randn(2, 9 * n, *size, dtype=torch.float64)
    if channels_last:
        taps = taps.contiguous(memory_format=torch.channels_last)
    taps.requires_grad_()
    o_major = taps.view(2, 9, n, *size).transpose(1, 2).reshape(2, 9 * n, *size)  # channel o*9 + s
    one_hot = torch.eye(9, dtype=torch.float64).view(9, 3, 3).flip(1, 2).repeat(n, 1, 1)[:, None]  # slot s at (2-s//3, 2-s%3)
    ref = F.conv2d(o_major, one_hot.view(n, 9, 3, 3), padding=1, groups=n)
    ours = shift_sum(taps, n)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, taps, g)[0], torch.autograd.grad(ref, taps, g)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(("low", "size"), [((4, 6), (8, 12)), ((3, 5), (7, 9)), ((1, 2), (3, 5))])
def test_offset_conv_of_concat_equals_the_conv_on_the_concat(low, size, align_corners):
    torch.manual_seed(2)
    x_l = torch.randn(2, 5, *size, dtype=torch.float64, requires_grad=True)
    x_h = torch.randn(2, 5, *low, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 10, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ours = offset_conv_of_concat(x_l, x_h, w, b, align_corners=align_corners)
    up = F.interpolate(x_h, size=size, mode="bilinear", align_corners=align_corners)
    ref = F.conv2d(torch.cat([x_l, up], dim=1), w, b, padding=1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(ours, (x_l, x_h, w, b), g), torch.autograd.grad(ref, (x_l, x_h, w, b), g)):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


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
