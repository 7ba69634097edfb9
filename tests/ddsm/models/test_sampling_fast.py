"""The fast (gather) path of DDSM's sampling op against the grid_sample reference and known answers."""
import pytest
import torch
import torch.nn.functional as F

from ddsm.models.ddsm import ChannelBranch, SpatialBranch
from ddsm.models.sampling import (Corners, SampledAffinity, dynamic_affinity, gather_dot, sample_positions,
                                  scatter_corners, weighted_gather, _to_bags)


def _inputs(*, B=2, C=5, Cv=7, H=6, W=7, Hk=5, Wk=8, N=9, spread=3.0, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, C, H, W, generator=gen, dtype=dtype)
    k = torch.randn(B, C, Hk, Wk, generator=gen, dtype=dtype)
    v = torch.randn(B, Cv, Hk, Wk, generator=gen, dtype=dtype)
    off = spread * torch.randn(B, 2 * N, H, W, generator=gen, dtype=dtype)  # many points fall outside the map
    return [t.requires_grad_() for t in (q, k, v, off)]


@pytest.mark.parametrize("out_of_map", ["mask", "zero"])
@pytest.mark.parametrize("N", [1, 4, 9, 25])
@pytest.mark.parametrize("sizes", [dict(), dict(H=5, W=8, Hk=5, Wk=8), dict(Hk=3, Wk=4)])
def test_fast_path_equals_grid_sample_values_and_gradients(N, sizes, out_of_map):
    inputs = _inputs(N=N, **sizes)
    outs = {}
    for impl in ("gather", "grid_sample"):
        out = dynamic_affinity(*inputs, num_points=N, impl=impl, out_of_map=out_of_map)
        up = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)  # a non-uniform upstream gradient
        outs[impl] = (out, *torch.autograd.grad((out * up).sum(), inputs))
    for name, fast, ref in zip(["out", "dq", "dk", "dv", "doffsets"], outs["gather"], outs["grid_sample"]):
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10, msg=name)


def test_some_points_fall_outside():
    q, k, v, off = _inputs()
    pos = sample_positions(off.detach(), 9)
    outside = (pos[..., 0] < 0) | (pos[..., 0] > 4) | (pos[..., 1] < 0) | (pos[..., 1] > 7)
    assert 0.1 < outside.float().mean() < 0.9  # the equality test above covers both cases


@pytest.mark.parametrize("masked", [True, False])
def test_gradcheck_sampled_affinity_float64(masked):
    torch.manual_seed(1)
    B, C, Cv, H, W, Hk, Wk, N = 1, 3, 2, 3, 4, 4, 5, 4
    q = torch.randn(B * H * W, C, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B * Hk * Wk, C, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B * Hk * Wk, Cv, dtype=torch.float64, requires_grad=True)
    # positions (B, 2, N, L) from -1.5 to 5.5 (outside on every side), away from the kinks of bilinear weights
    pos = torch.rand(B, 2, N, H * W, dtype=torch.float64) * 7 - 1.5
    pos = (pos.floor() + 0.1 + 0.8 * (pos - pos.floor())).requires_grad_()
    fn = lambda q, k, v, pos: SampledAffinity.apply(q, k, v, pos, Hk, Wk, 0.7, masked)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, pos))


def test_corners_known_answer():
    pos = torch.tensor([[1.25, -0.5], [2.5, 4.5]])[None, :, None, :]  # (B=1, 2, N=1, L=2) on a 1 x 4 x 5 map
    c = Corners(pos, height=4, width=5)
    assert c.index[0, :, 0, 0].tolist() == [1 * 5 + 2, 1 * 5 + 3, 2 * 5 + 2, 2 * 5 + 3]
    torch.testing.assert_close(c.weights[0, :, 0, 0], torch.tensor([0.375, 0.375, 0.125, 0.125]))
    # (-0.5, 4.5): only the corner (0, 4) is inside, with weight 0.5 * 0.5; the others read a valid row with weight 0
    assert int(c.index[0, 2, 0, 1]) == 4 and 0 <= int(c.index.min()) and int(c.index.max()) < 20
    torch.testing.assert_close(c.weights[0, :, 0, 1], torch.tensor([0.0, 0.0, 0.25, 0.0]))
    assert c.bag_index.tolist() == c.index[0, :, 0].t().tolist()  # one bag of 4N = 4 corners per pixel


def test_gather_primitives_known_answers():
    torch.manual_seed(2)
    table, x = torch.randn(6, 3), torch.randn(4, 3)
    index, w = torch.randint(0, 6, (4, 5)), torch.rand(4, 5)
    explicit = torch.stack([sum(w[p, j] * table[index[p, j]] for j in range(5)) for p in range(4)])
    torch.testing.assert_close(weighted_gather(table, index, w), explicit)
    dots = torch.tensor([[float(x[p] @ table[index[p, j]]) for j in range(5)] for p in range(4)])
    torch.testing.assert_close(gather_dot(x, table, index), dots)


def test_scatter_is_the_adjoint_of_the_gather():
    torch.manual_seed(3)
    B, N, L, Hk, Wk, C = 2, 4, 6, 3, 4, 5
    corners = Corners(torch.rand(B, 2, N, L) * 6 - 1.5, height=Hk, width=Wk)
    x, w = torch.randn(B * L, C, dtype=torch.float64), torch.rand(B, 4, N, L, dtype=torch.float64)
    (got,) = scatter_corners(corners, [(x, _to_bags(w.view(B, 4 * N, L)))])  # weights in bag layout
    expected = torch.zeros(B * Hk * Wk, C, dtype=torch.float64)
    for b, c, n, l in torch.cartesian_prod(*(torch.arange(k) for k in (B, 4, N, L))).tolist():
        expected[corners.index[b, c, n, l]] += w[b, c, n, l] * x[b * L + l]
    torch.testing.assert_close(got, expected)


def test_far_away_points_read_zeros_and_nan_does_not_crash():
    q, k, v, off = (t.detach() for t in _inputs(N=4))
    out = dynamic_affinity(q, k, v, torch.full_like(off, 1e6), num_points=4)
    assert torch.equal(out, torch.zeros_like(out))
    off[0, 0, 0, 0] = float("nan")
    assert dynamic_affinity(q, k, v, off, num_points=4).shape == (2, 7, 6, 7)


def test_channels_last_inputs_and_output_layout():
    q, k, v, off = (t.detach() for t in _inputs())
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (q, k, v, off)]
    out = dynamic_affinity(*cl, num_points=9)
    torch.testing.assert_close(out, dynamic_affinity(q, k, v, off, num_points=9))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bad_impl_names_value_and_choices():
    q, k, v, off = (t.detach() for t in _inputs())
    with pytest.raises(ValueError, match="impl='deform'.*gather, grid_sample"):
        dynamic_affinity(q, k, v, off, num_points=9, impl="deform")


# ----------------------------------------------------------------------------- branches vs the figure, literally


def _spatial_as_drawn(br: SpatialBranch, x_l, x_h):
    """The spatial branch written as the figure draws it (concat, full-size convs, grid_sample)."""
    size = x_l.shape[-2:]
    xl = br.pos_l(x_l)
    xh = F.interpolate(br.pos_h(x_h), size=size, mode="bilinear", align_corners=br.align_corners)
    up_h = F.interpolate(x_h, size=size, mode="bilinear", align_corners=br.align_corners)
    offsets = br.offset(torch.cat([x_l, up_h], dim=1))
    if br.offset_range > 0:
        offsets = br.offset_range * torch.tanh(offsets / br.offset_range)
    q, k, v = br.query(xl), br.key(torch.cat([xl, xh], dim=1)), br.value(xh)
    return br.proj(dynamic_affinity(q, k, v, offsets, num_points=br.num_points, out_of_map=br.out_of_map,
                                    dilation=br.grid_dilation, impl="grid_sample"))


def _channel_as_drawn(br: ChannelBranch, x_l, x_h):
    """The channel branch with explicit transposes and grid_sample."""
    B, _, H, W = x_l.shape
    h, w = x_h.shape[-2:]
    grid = lambda x: x.flatten(2).transpose(1, 2).reshape(B, x.shape[2] * x.shape[3], br.side, br.side)  # noqa: E731
    pl, ph = F.adaptive_avg_pool2d(x_l, br.pooled_size), F.adaptive_avg_pool2d(x_h, br.pooled_size)
    order = (lambda x: x) if br.perm is None else (lambda x: x[:, br.perm])  # noqa: E731  grid cell g = channel perm[g]
    q, k, v = (grid(order(t)) for t in (br.query(pl), br.key(torch.cat([pl, ph], dim=1)), br.value(x_h)))
    z = dynamic_affinity(q, k, v, br.offset(k), num_points=br.num_points, out_of_map=br.out_of_map, impl="grid_sample")
    z = z.reshape(B, h * w, br.side ** 2).transpose(1, 2).reshape(B, -1, h, w)
    if br.perm is not None:
        z = z[:, torch.argsort(br.perm)]
    return F.interpolate(br.proj(z), size=(H, W), mode="bilinear", align_corners=br.align_corners)


@pytest.mark.parametrize("make, reference", [
    (lambda: SpatialBranch(8, num_points=9, pos_embed="learned", offset_range=2.0), _spatial_as_drawn),
    (lambda: SpatialBranch(8, num_points=4, pos_embed="sine"), _spatial_as_drawn),
    (lambda: ChannelBranch(12, num_points=9, pooled_size=2), _channel_as_drawn),
    (lambda: SpatialBranch(8, num_points=9, out_of_map="zero", grid_dilation=2, align_corners=False), _spatial_as_drawn),
    (lambda: ChannelBranch(16, num_points=9, pooled_size=2, out_of_map="zero", channel_order="permuted"),
     _channel_as_drawn),
])
def test_branches_equal_the_figure_written_literally(make, reference):
    torch.manual_seed(4)
    br = make().double()
    for p in br.parameters():  # offsets are zero-initialised: randomise so the sampling moves off the grid
        torch.nn.init.normal_(p, std=0.5)
    x_l = torch.randn(2, br.query.in_channels, 8, 10, dtype=torch.float64, requires_grad=True)
    x_h = torch.randn(2, br.query.in_channels, 4, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (br, lambda a, b: reference(br, a, b)):
        out = fn(x_l, x_h)
        grads = torch.autograd.grad(out.square().sum(), [x_l, x_h, *br.parameters()])
        results.append((out, *grads))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("size", [(16, 24), (10, 13), (4, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_branch_pooling_is_adaptive_average_pooling(size, channels_last):
    """The block-mean pooling (when the pooled size divides the map) and its gradient equal
    ``adaptive_avg_pool2d``; a size that does not divide falls back to it."""
    from ddsm.models.ddsm import _pool

    x = torch.randn(2, 3, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ours, ref = _pool(x, 4), F.adaptive_avg_pool2d(x, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               rtol=1e-12, atol=1e-12)
