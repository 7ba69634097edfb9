"""conv1x1 and conv1x1_heads (1x1 convs between layouts) against F.conv2d, and DDSM keeping its input's layout end
to end."""
import pytest
import torch
import torch.nn.functional as F

from ddsm.models.ddsm import DDSM
from ddsm.models.projection import conv1x1, conv1x1_heads

LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_layout", ["nchw", "cl"])
@pytest.mark.parametrize("in_layout", ["nchw", "cl"])
def test_conv1x1_is_the_1x1_conv_in_any_layout(in_layout, out_layout, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64).contiguous(memory_format=LAYOUTS[in_layout]).requires_grad_()
    w = torch.randn(7, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None
    params = [x, w] + ([b] if bias else [])
    out = conv1x1(x, w, b, channels_last=out_layout == "cl")
    ref = F.conv2d(x, w, b)
    assert out.is_contiguous(memory_format=LAYOUTS[out_layout])
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, params, g)
    ref_grads = torch.autograd.grad(ref, params, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads[0].is_contiguous(memory_format=LAYOUTS[in_layout])  # x's gradient comes back in x's layout


def test_conv1x1_gradcheck_with_a_gradient_of_another_layout():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # (O, C) works as (O, C, 1, 1)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    # the channels_last output then meets an NCHW gradient (the permute makes it so)
    torch.autograd.gradcheck(lambda *a: conv1x1(*a, channels_last=True).permute(0, 2, 3, 1).contiguous(), (x, w, b))


def test_conv1x1_computes_in_autocasts_dtype_as_the_conv_does():
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    w = torch.randn(6, 8, 1, 1, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = conv1x1(x, w, b, channels_last=True), F.conv2d(x, w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.float32,) * 3


def test_conv1x1_output_is_not_a_view_so_it_can_be_added_into():
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    out = conv1x1(x, torch.randn(2, 2, 1, 1), channels_last=True)
    out.add_(1.0).sum().backward()  # a view made inside a custom Function would refuse the in-place add
    assert x.grad is not None


@pytest.mark.parametrize("out_layout", ["nchw", "cl"])
@pytest.mark.parametrize("in_layout", ["nchw", "cl"])
def test_conv1x1_heads_are_the_convs_of_each_head_and_sum_their_input_gradients(in_layout, out_layout):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=LAYOUTS[in_layout]).requires_grad_()
    w1, w2 = (torch.randn(o, 5, 1, 1, dtype=torch.float64, requires_grad=True) for o in (3, 6))
    b1 = torch.randn(3, dtype=torch.float64, requires_grad=True)  # the second head has no bias
    outs = conv1x1_heads(x, [(w1, b1), (w2, None)], channels_last=out_layout == "cl")
    refs = (F.conv2d(x, w1, b1), F.conv2d(x, w2))
    params = [x, w1, b1, w2]
    g = [torch.randn_like(r) for r in refs]
    grads = torch.autograd.grad(outs, params, g)
    ref_grads = torch.autograd.grad(refs, params, g)
    for out, ref in zip(outs, refs):
        assert out.is_contiguous(memory_format=LAYOUTS[out_layout]) and out._base is None  # each its own tensor
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads[0].is_contiguous(memory_format=LAYOUTS[in_layout])


def test_conv1x1_heads_an_unused_head_gets_no_gradient_and_x_still_gets_the_others():
    torch.manual_seed(4)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w1, w2 = (torch.randn(2, 4, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    used, _unused = conv1x1_heads(x, [(w1, None), (w2, None)], channels_last=True)
    used.sum().backward()
    assert w2.grad is None
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.conv2d(x, w1).sum(), x)[0], rtol=1e-12, atol=1e-12)


def test_conv1x1_heads_refuses_no_heads():
    with pytest.raises(ValueError, match="heads is empty"):
        conv1x1_heads(torch.randn(1, 2, 2, 2), [], channels_last=True)


def test_conv1x1_heads_gradcheck():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w1, w2 = (torch.randn(o, 3, dtype=torch.float64, requires_grad=True) for o in (2, 4))
    b2 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: conv1x1_heads(a[0], [(a[1], None), (a[2], a[3])], channels_last=False),
                             (x, w1, w2, b2))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_ddsm_returns_and_differentiates_in_its_inputs_layout(layout):
    torch.manual_seed(2)
    m = DDSM(16, branches="dual", num_points=9, pooled_size=2).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    base_l, base_h = torch.randn(2, 16, 8, 10, dtype=torch.float64), torch.randn(2, 16, 4, 5, dtype=torch.float64)
    results = []
    for fmt in (torch.contiguous_format, LAYOUTS[layout]):
        x_l = base_l.clone(memory_format=fmt).requires_grad_()
        x_h = base_h.clone(memory_format=fmt).requires_grad_()
        out = m(x_l, x_h)
        assert out.is_contiguous(memory_format=fmt)
        out.square().sum().backward()
        assert x_l.grad.is_contiguous(memory_format=fmt) and x_h.grad.is_contiguous(memory_format=fmt)
        results.append((out, x_l.grad, x_h.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
