"""What a sampled point outside the map contributes: ``mask`` (default) and ``zero``, on both paths of the
sampling op (fast gather and grid_sample reference), with known answers and float64 gradchecks."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddsm.config import ConfigError
from ddsm.models import build_model
from ddsm.models.ddsm import DDSM
from ddsm.models.sampling import dynamic_affinity, sample_positions

IMPLS = ("gather", "grid_sample")


def _row_inputs(dx: float, *, logit: float = 0.0):
    """A 1 x 3 map read by one query at (0, 0) with N=4 points (base grid +-0.5), all shifted by dx.

    Keys are constant ``logit`` * e0 and the query e0 (C=1, scale 1), values v = [10, 20, 30]."""
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.full((1, 1, 1, 3), logit, dtype=torch.float64)
    v = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64).view(1, 1, 1, 3)
    off = torch.zeros(1, 8, 1, 1, dtype=torch.float64)
    off[:, 1::2] = dx  # every point's dx
    return q, k, v, off


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_known_answer_partial_points_read_renormalised_and_weigh_their_mass(impl):
    # points at (y, x) = (+-0.5, -0.25) and (+-0.5, 0.75): every point is half off in y (H = 1)
    q, k, v, off = _row_inputs(0.25)
    out = dynamic_affinity(q, k, v, off, num_points=4, scale=1.0, impl=impl, out_of_map="mask")
    # x = -0.25: corners x=-1 (off, weight .25) and x=0 (on, .75): mass .75 * .5, renormalised read v[0] = 10
    # x = +0.75: corners x=0 (.25) and x=1 (.75): mass 1 * .5, read .25 * 10 + .75 * 20 = 17.5
    # equal logits: weights proportional to the masses .375 and .5 (two points each)
    expected = (0.375 * 10 + 0.5 * 17.5) / (0.375 + 0.5)
    torch.testing.assert_close(out, torch.full_like(out, expected))
    zero = dynamic_affinity(q, k, v, off, num_points=4, scale=1.0, impl=impl, out_of_map="zero")
    # zero: every point keeps 1/4 of the softmax and reads zero-padded values (.5 * (.75 * 10), .5 * 17.5)
    torch.testing.assert_close(zero, torch.full_like(zero, (0.5 * 7.5 + 0.5 * 17.5) / 2))


@pytest.mark.parametrize("impl", IMPLS)
def test_off_map_point_takes_no_weight_when_masked_and_its_share_when_zero(impl):
    """dx = -1.25: the points at x = -1.75 are entirely off the map, those at x = -0.75 a quarter on."""
    q, k, v, off = _row_inputs(-1.25, logit=-200.0)  # real keys look bad: masking must still ignore the off points
    masked = dynamic_affinity(q, k, v, off, num_points=4, scale=1.0, impl=impl, out_of_map="mask")
    torch.testing.assert_close(masked, torch.full_like(masked, 10.0))  # only the x = -0.75 points, renormalised: v[0]
    zero = dynamic_affinity(q, k, v, off, num_points=4, scale=1.0, impl=impl, out_of_map="zero")
    assert float(zero) < 1e-6  # the off points (logit 0) win the softmax and read 0


@pytest.mark.parametrize("impl", IMPLS)
def test_all_points_off_the_map_give_zero_and_finite_gradients(impl):
    q, k, v, off = (t.clone().requires_grad_() for t in _row_inputs(-7.0))
    out = dynamic_affinity(q, k, v, off, num_points=4, impl=impl, out_of_map="mask")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, off))


def _inputs(seed: int, *, N: int, spread: float):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 3, 3, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 4, 5, generator=gen, dtype=torch.float64)
    off = spread * torch.randn(1, 2 * N, 3, 4, generator=gen, dtype=torch.float64)
    return q, k, v, off


def _away_from_kinks(off: torch.Tensor, N: int, dilation: int) -> torch.Tensor:
    """Move every position to frac in [0.1, 0.9] (bilinear weights, the on-map mass and the mask all
    have kinks at integer positions, where finite differences disagree with any derivative)."""
    pos = sample_positions(off, N, dilation=dilation)  # (B, N, H, W, 2)
    fixed = pos.floor() + 0.1 + 0.8 * (pos - pos.floor())
    return off + (fixed - pos).permute(0, 1, 4, 2, 3).reshape(off.shape)


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("out_of_map", ["mask", "zero"])
def test_fast_and_reference_paths_agree_with_points_partly_off_the_map(out_of_map, dilation):
    q, k, v, off = _inputs(3, N=9, spread=1.5)
    off = _away_from_kinks(off, 9, dilation)
    pos = sample_positions(off, 9, dilation=dilation)
    partly = ((pos[..., 0] > -1) & (pos[..., 0] < 0)) | ((pos[..., 1] > -1) & (pos[..., 1] < 0))
    assert partly.any()  # some points straddle the border (fractional mass)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, off)]
    results = []
    for impl in IMPLS:
        out = dynamic_affinity(*inputs, num_points=9, out_of_map=out_of_map, dilation=dilation, impl=impl)
        up = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        results.append((out, *torch.autograd.grad((out * up).sum(), inputs)))
    for name, fast, ref in zip(["out", "dq", "dk", "dv", "doffsets"], *results):
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_of_map", ["mask", "zero"])
def test_gradcheck_float64_both_modes_both_paths(impl, out_of_map):
    q, k, v, off = _inputs(4, N=4, spread=1.2)
    off = _away_from_kinks(off, 4, 1)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, off))
    fn = lambda *t: dynamic_affinity(*t, num_points=4, out_of_map=out_of_map, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_channel_grid_border_share_matches_the_issue():
    """R18: decoder width 128 -> an 11 x 11 channel grid; a channel has a point off the grid at zero offsets
    when it lies within k // 2 of a border: 33% of channels at N=9, 79% at N=49."""
    side = DDSM(128).channel.side
    assert side == 11
    for N, share in ((9, 0.33), (49, 0.79)):
        k = math.isqrt(N)
        inner = max(side - 2 * (k // 2), 0) ** 2
        assert (side * side - inner) / (side * side) == pytest.approx(share, abs=0.005)


def test_default_is_mask_for_both_branches_and_zero_reads_zero_padding():
    m = DDSM(16)
    assert (m.spatial.out_of_map, m.channel.out_of_map) == ("mask", "mask")
    z = DDSM(16, spatial_out_of_map="zero", channel_out_of_map="mask")
    assert (z.spatial.out_of_map, z.channel.out_of_map) == ("zero", "mask")
    with pytest.raises(ConfigError, match="spatial_out_of_map='pad'.*mask, zero"):
        build_model("ddsm", num_classes=3, spatial_out_of_map="pad")


def test_zero_mode_with_zero_offsets_is_the_zero_padded_neighbourhood():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 5, 6) for _ in range(3))
    got = dynamic_affinity(q, k, v, torch.zeros(1, 18, 5, 6), num_points=9, out_of_map="zero")
    ku, vu = (F.unfold(t, 3, padding=1).view(1, 4, 9, 5, 6) for t in (k, v))
    attn = ((q[:, :, None] * ku).sum(1) / 2).softmax(1)  # scale 1/sqrt(4)
    torch.testing.assert_close(got, (attn[:, None] * vu).sum(2), atol=1e-5, rtol=1e-5)
