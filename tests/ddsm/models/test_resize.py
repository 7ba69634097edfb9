"""resize_bilinear (NCHW maps on CPU, backward as two GEMMs) against F.interpolate, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from ddsm.models.resize import interpolation_matrix, resize_bilinear

SIZES = [((4, 6), (8, 12)), ((5, 7), (9, 16)), ((3, 4), (3, 9)), ((1, 5), (4, 5)), ((6, 1), (2, 3)),
         ((8, 8), (3, 5)), ((4, 4), (1, 1))]


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("src, dst", SIZES)
def test_resize_bilinear_equals_interpolate_with_its_gradient(src, dst, align_corners):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *src, dtype=torch.float64, requires_grad=True)
    out = resize_bilinear(x, dst, align_corners=align_corners)
    ref = F.interpolate(x, size=dst, mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               rtol=1e-12, atol=1e-12)
    assert out.shape == (2, 3, *dst) and out.is_contiguous()


def test_interpolation_matrix_known_answer():
    # 2 -> 3 samples: align_corners puts the middle output halfway; otherwise output centres sit at source
    # coordinates -1/6 (clamped to 0), 0.5 and 7/6 (past the last sample: clamped to it)
    torch.testing.assert_close(interpolation_matrix(3, 2, align_corners=True, dtype=torch.float64),
                               torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(interpolation_matrix(3, 2, align_corners=False, dtype=torch.float64),
                               torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    m = interpolation_matrix(4, 2, align_corners=False, dtype=torch.float64)  # centres -0.25, 0.25, 0.75, 1.25
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]],
                                               dtype=torch.float64))
    assert torch.equal(m.sum(1), torch.ones(4, dtype=torch.float64))  # every row a convex combination


def test_resize_bilinear_float32_gradient_at_the_channel_branch_size():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 32, 64, requires_grad=True)
    g = torch.randn(2, 8, 64, 128)
    for align_corners in (True, False):
        out = resize_bilinear(x, (64, 128), align_corners=align_corners)
        ref = F.interpolate(x, size=(64, 128), mode="bilinear", align_corners=align_corners)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the forward is ATen's own
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                                   rtol=1e-5, atol=1e-4)  # ATen's float32 coordinates are off by ~1e-5


def test_resize_bilinear_gradcheck_and_a_gradient_of_another_layout():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: resize_bilinear(t, (5, 7), align_corners=False)
                             .contiguous(memory_format=torch.channels_last), (x,))


def test_resize_bilinear_channels_last_and_autocast_as_interpolate():
    x = torch.randn(1, 4, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = resize_bilinear(x, (6, 10), align_corners=True)  # ATen's own channels-last kernel
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.interpolate(x, size=(6, 10), mode="bilinear", align_corners=True))
    y = torch.randn(1, 4, 3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.interpolate runs in its input's dtype: so does this
        out = resize_bilinear(y, (6, 10), align_corners=True)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert y.grad.dtype == torch.float32
