"""Known answers for the cost profiler: FLOP formulas, DDSM branches, params, memory, CLI output."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddsm.config import TrialConfig
from ddsm.models import build_model, list_models
from ddsm.models.ddsm import ChannelBranch, SpatialBranch
from ddsm.models.sampling import dynamic_affinity
from ddsm.profile import count_flops, count_params, measure_latency, peak_memory, profile_model, trial_cost
from ddsm.profile.timing import summarize
from harness.cli import main as cli_main


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads contend and run ~10x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class Fn(nn.Module):
    """Wraps a function of the inputs so a single op can be counted."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def conv_flops(b: int, cin: int, cout: int, k: int, ho: int, wo: int) -> int:
    """2 x multiply-adds of a dense k x k conv (bias not counted)."""
    return 2 * b * cout * cin * k * k * ho * wo


# ----------------------------------------------------------------------------- FLOP formulas


def test_conv_stack_equals_analytic_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.Conv2d(16, 4, 1))
    report = count_flops(model, torch.randn(2, 3, 16, 20))
    expected = conv_flops(2, 3, 8, 3, 16, 20) + conv_flops(2, 8, 16, 3, 8, 10) + conv_flops(2, 16, 4, 1, 8, 10)
    assert report.total_flops == expected
    assert report.matmul_flops == expected
    assert report.gmacs == pytest.approx(expected / 2e9)
    assert report.uncounted_ops == []


@pytest.mark.parametrize("mode, per_elem, per_loc", [("bilinear", 8, 4), ("nearest", 0, 0), ("bicubic", 32, 16)])
def test_grid_sample_formula(mode, per_elem, per_loc):
    n, c, ho, wo = 2, 5, 7, 3
    grid = torch.rand(n, ho, wo, 2) * 2 - 1
    model = Fn(lambda x, g: F.grid_sample(x, g, mode=mode, align_corners=False))
    report = count_flops(model, (torch.randn(n, c, 11, 13), grid))
    assert report.total_flops == per_elem * n * c * ho * wo + per_loc * n * ho * wo
    assert report.uncounted_ops == []


@pytest.mark.parametrize("mode, per_elem", [("bilinear", 8), ("bicubic", 32)])
def test_interpolate_formula(mode, per_elem):
    model = Fn(lambda x: F.interpolate(x, size=(9, 14), mode=mode, align_corners=False))
    report = count_flops(model, torch.randn(2, 3, 4, 5))
    assert report.total_flops == per_elem * 2 * 3 * 9 * 14
    assert report.uncounted_ops == []


def test_nearest_interpolate_has_no_per_element_flops():
    """A gather: at most a few ops of source-index arithmetic per output row and column."""
    report = count_flops(Fn(lambda x: F.interpolate(x, size=(9, 14), mode="nearest")), torch.randn(2, 3, 4, 5))
    assert report.total_flops <= 4 * (9 + 14)
    assert report.uncounted_ops == []


def test_softmax_pooling_and_norm_formulas():
    x = torch.randn(2, 3, 8, 8)
    assert count_flops(Fn(lambda t: t.softmax(dim=1)), x).total_flops == 5 * x.numel()
    assert count_flops(Fn(lambda t: F.avg_pool2d(t, 2)), x).total_flops == 2 * 3 * 4 * 4 * 4
    assert count_flops(Fn(lambda t: F.max_pool2d(t, 2)), x).total_flops == 2 * 3 * 4 * 4 * 3
    assert count_flops(nn.BatchNorm2d(3), x).total_flops == 2 * x.numel()
    assert count_flops(Fn(lambda t: t + t * t), x).total_flops == 2 * x.numel()


@pytest.mark.parametrize("size, out, windows", [((6, 8), (3, 4), (6, 8)), ((7, 6), (3, 4), (9, 8))])
def test_adaptive_avg_pool_counts_every_window_element(size, out, windows):
    """Windows overlap when the sizes do not divide: 7 -> 3 gives windows 3+3+3, 6 -> 4 gives 2+2+2+2."""
    x = torch.randn(2, 3, *size)
    report = count_flops(Fn(lambda t: F.adaptive_avg_pool2d(t, out)), x)
    assert report.total_flops == 2 * 3 * windows[0] * windows[1]


def test_attention_matmuls_are_counted():
    """Attention written with @ inside forward (non-local, DANet) and fused SDPA: 2 x MACs of both matmuls."""
    B, S, D = 2, 10, 8
    q, k, v = torch.randn(B, 1, S, D), torch.randn(B, 1, S, D), torch.randn(B, 1, S, D)
    expected = 2 * (2 * B * S * S * D)
    assert count_flops(Fn(lambda a, b, c: F.scaled_dot_product_attention(a, b, c)), (q, k, v)).total_flops == expected
    by_hand = count_flops(Fn(lambda a, b, c: (a @ b.transpose(-1, -2)) @ c), (q, k, v))
    assert by_hand.total_flops == expected and by_hand.uncounted_ops == []


def test_op_without_formula_is_listed_not_zeroed():
    report = count_flops(Fn(lambda t: torch.special.erf(t) + t), torch.randn(4, 4))
    assert report.uncounted_ops == ["aten.erf"]
    assert report.total_flops == 16  # the add


def test_count_flops_restores_train_flags_and_keeps_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    model[2].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, torch.randn(2, 3, 8, 8))
    assert [m.training for m in model] == [True, True, False]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- DDSM branches


def affinity_flops(B: int, H: int, W: int, N: int, C: int, Cv: int, *, masked: bool = True) -> int:
    """dynamic_affinity (gather path, as ddsm/models/sampling.py computes it) for a (B, C, H, W) query,
    C-channel keys and Cv-channel values; update together with sampling.py.

    Per point (P = B*H*W locations x N points): q.k over the 4 corners 8C (gather-dot) and the
    weighted value gather 8Cv, plus 42 for the rest: position + offset 2; corners: floor 2, fraction 2,
    in-map comparisons 8, 1 - fraction 2, factors x inside 4, corner weights 4; affinity: weight x dot 4,
    sum over corners 4, scale 1, softmax 5, attention x weight 4.
    Masked (out_of_map="mask") replaces the softmax's 5 by 14: mass (sum of corner weights) 4, its clamp 1,
    dot / mass 1, mass <= 0 1, max 1, logit - max 1, exp 1, mass x exp 1, sum 1, exp / sum 1, mass x ratio 1;
    plus 1 per location (clamp of the sum).
    Per image location: centre + base grid 2N. Constants: base grid k = sqrt(N); map size - 1: 2.
    """
    P = B * H * W
    rest = 42 * P * N + (9 * P * N + P if masked else 0)
    return math.isqrt(N) + 2 + 2 * N * H * W + rest + 8 * P * N * (C + Cv)


def test_dynamic_affinity_flops_match_formula():
    B, C, Cv, H, W, N = 2, 6, 5, 7, 9, 9
    args = (torch.randn(B, C, H, W), torch.randn(B, C, 4, 5), torch.randn(B, Cv, 4, 5), torch.randn(B, 2 * N, H, W))
    for out_of_map in ("mask", "zero"):
        report = count_flops(Fn(lambda *a: dynamic_affinity(*a, num_points=N, out_of_map=out_of_map)), args)
        assert report.total_flops == affinity_flops(B, H, W, N, C, Cv, masked=out_of_map == "mask")
        assert report.uncounted_ops == []


def test_ddsm_spatial_branch_flops_match_formula():
    """As ddsm.py computes it: [query | key_l] 1x1 conv on x_l, [key_h | value] 1x1 conv on x_h then upsampled;
    the offset conv as nine 1x1 taps of each half (the up(x_h) half's on x_h, upsampled), added, shift-summed
    (eight strided adds: every tap but the centre one, over the pixels it reaches), plus the bias."""
    B, C, H, W, h, w, N = 2, 16, 12, 10, 6, 5, 9
    d, P, n = C // 2, B * H * W, 2 * N  # inner_ratio 0.5
    branch = SpatialBranch(C, num_points=N, inner_ratio=0.5, pos_embed="sine")
    report = count_flops(branch, (torch.randn(B, C, H, W), torch.randn(B, C, h, w)))
    shift = sum(B * (H - abs(t // 3 - 1)) * (W - abs(t % 3 - 1)) * n for t in range(9) if t != 4)
    offsets = 2 * P * C * 9 * n + 2 * B * h * w * C * 9 * n + shift  # taps of x_l, taps of x_h, shift-sum
    convs = 2 * P * C * 2 * d + 2 * B * h * w * C * 2 * d + offsets + 2 * P * d * C  # qk, kv, offsets, proj
    pos_embed = B * C * H * W + B * C * h * w  # x + e on both inputs
    upsample = 8 * B * 2 * d * H * W + 8 * B * 9 * n * H * W  # up(kv) and up(taps) for the offsets, bilinear
    adds = B * d * H * W + B * 9 * n * H * W + P * n  # k_l + k_h, the two halves' taps, the offset bias
    expected = convs + pos_embed + upsample + adds + affinity_flops(B, H, W, N, d, d)
    assert report.uncounted_ops == []
    assert report.total_flops == pytest.approx(expected, rel=0.01)


def test_ddsm_channel_branch_flops_match_formula():
    B, C, H, W, h, w, N, a = 2, 20, 16, 12, 8, 4, 9, 4  # C = 20 -> 4 x 4 channel grid (c = 16) + projection back
    s = 4
    c, A, S = s * s, a * a, s * s
    branch = ChannelBranch(C, num_points=N, pooled_size=a)
    report = count_flops(branch, (torch.randn(B, C, H, W), torch.randn(B, C, h, w)))
    pools = B * C * H * W + B * C * h * w  # sizes divisible by a: each element in one window
    convs = 2 * B * A * (C * c + 2 * C * c) + 2 * B * h * w * (C * c + c * C) + 2 * B * S * (A * 9) * (2 * N)
    upsample = 8 * B * C * H * W
    # the s x s channel grid is the "image": a^2-long queries and keys, h*w-long values
    expected = pools + convs + upsample + affinity_flops(B, s, s, N, A, h * w)
    assert report.uncounted_ops == []
    assert report.total_flops == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name", list_models())
def test_registered_models_leave_no_op_uncounted(name):
    model = build_model(name, num_classes=5, backbone="resnet18")
    report = count_flops(model, torch.randn(1, 3, 64, 64))
    assert report.uncounted_ops == []
    assert report.total_flops > report.matmul_flops > 0
    assert set(report.by_module) >= {"backbone", "head"}


# ----------------------------------------------------------------------------- cross-check with fvcore


def _fvcore_matmul(model: nn.Module, x: torch.Tensor) -> int:
    fvcore = pytest.importorskip("fvcore.nn")
    analysis = fvcore.FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    ops = analysis.by_operator()
    return ops.get("conv", 0) + ops.get("linear", 0) + ops.get("matmul", 0) + ops.get("bmm", 0)


def test_conv_matmul_part_is_twice_fvcore_on_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 96)
    assert count_flops(model, x).matmul_flops == pytest.approx(2 * _fvcore_matmul(model, x), rel=0.01)


class LogitsOnly(nn.Module):
    """fvcore traces with torch.jit, which needs a tensor output (and the net as a submodule)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["out"]


def test_conv_part_is_twice_fvcore_on_fpn():
    model = build_model("fpn", num_classes=5, backbone="resnet18").eval()
    x = torch.randn(1, 3, 64, 96)
    assert count_flops(model, x).matmul_flops == pytest.approx(2 * _fvcore_matmul(LogitsOnly(model), x), rel=0.01)


# ----------------------------------------------------------------------------- params, latency, memory


def test_count_params_total_trainable_and_by_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2))
    model[1].weight.requires_grad_(False)
    p = count_params(model)
    assert p["total"] == (3 * 8 * 9 + 8) + (8 * 2 + 2)
    assert p["trainable"] == p["total"] - 16
    assert p["by_module"] == {"0": 224, "1": 18}


def test_summarize_quartiles():
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median"], s["p25"], s["p75"], s["min"], s["repeats"]) == (3.0, 2.0, 4.0, 1.0, 5)


def test_measure_latency_leaves_model_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for train_step in (False, True):
        r = measure_latency(model, (2, 3, 16, 16), repeats=3, warmup=1, train_step=train_step)
        assert r["repeats"] == 3 and r["p25"] <= r["median"] <= r["p75"]
        assert (r["size"], r["batch"], r["device_type"], r["dtype"], r["train_step"]) == ([16, 16], 2, "cpu", "float32",
                                                                                          train_step)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Scale(nn.Module):
    """y = x * w: one output tensor of the input's size, nothing else allocated."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.w


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 50, 30)])
def test_cpu_peak_memory_known_answer(shape):
    """Resident: w (4 B) + input; the call allocates one output of the input's size."""
    r = peak_memory(Scale(), shape, device="cpu")
    nbytes = math.prod(shape) * 4
    assert r["peak_mem_kind"] == "cpu_profiler_allocated" and r["size"] == list(shape[-2:]) and r["torch"]
    assert r["peak_mem_mb"] * 2**20 == 4 + 2 * nbytes


def test_training_step_needs_more_memory_than_inference():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    infer = peak_memory(model, (2, 3, 32, 32))["peak_mem_mb"]
    train = peak_memory(model, (2, 3, 32, 32), train_step=True)["peak_mem_mb"]
    assert train > infer > 0


# ----------------------------------------------------------------------------- profile_model, trial_cost


def test_trial_cost_fields_and_model_untouched():
    model = build_model("fpn", num_classes=5, backbone="resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrialConfig()
    cfg.data.crop_size = (64, 64)
    cost = trial_cost(model, cfg, device="cpu", repeats=1, warmup=0)
    assert set(cost) >= {"gflops", "gmacs", "params_m", "latency_ms", "train_step_ms", "peak_mem_mb", "peak_mem_kind",
                         "uncounted_ops"}
    assert cost["gflops"] == pytest.approx(count_flops(model, torch.randn(1, 3, 64, 64)).gflops)
    assert cost["gmacs"] == pytest.approx(cost["gflops"] / 2)
    assert cost["params_m"] == pytest.approx(count_params(model)["total"] / 1e6)
    assert cost["uncounted_ops"] == [] and cost["latency_ms"] > 0 and cost["train_step_ms"] > 0
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_profile_model_flops_scale_with_area():
    model = build_model("fpn", num_classes=5, backbone="resnet18")
    small = profile_model(model, size=(64, 64), device="cpu", repeats=1, warmup=0, train_step=False, memory=False)
    large = profile_model(model, size=(128, 128), device="cpu", repeats=1, warmup=0, train_step=False, memory=False)
    assert large["matmul_gflops"] == pytest.approx(4 * small["matmul_gflops"], rel=0.02)
    assert small["size"] == [64, 64] and small["device_type"] == "cpu" and small["torch"] == torch.__version__


# ----------------------------------------------------------------------------- CLI

REQUIRED = {"gflops", "gmacs", "params_m", "latency_ms", "train_step_ms", "peak_mem_mb", "peak_mem_kind",
            "uncounted_ops", "device", "torch", "dtype", "size", "batch", "flop_convention"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["profile", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_ddsm_256x512(capsys):
    rc, out, _ = run_cli(capsys, "--model", "ddsm", "--backbone", "resnet18", "--size", "256x512", "--device", "cpu",
                         "--json", "--repeats", "1", "--warmup", "0", "--no-train-step")
    assert rc == 0
    r = json.loads(out)
    assert REQUIRED <= set(r)
    assert r["size"] == [256, 512] and r["batch"] == 1 and r["dtype"] == "float32" and r["uncounted_ops"] == []
    assert set(r["latency_ms"]) >= {"median", "p25", "p75"} and r["peak_mem_mb"] > r["params_m"] * 4
    assert r["gmacs"] == pytest.approx(r["gflops"] / 2)


def test_cli_json_with_train_step_and_model_options(capsys):
    rc, out, _ = run_cli(capsys, "--model", "ddsm", "--set", "num_points=4", "--set", "model.branches=spatial",
                         "--size", "64x96", "--device", "cpu", "--json", "--repeats", "2", "--warmup", "1",
                         "--num-classes", "7")
    assert rc == 0
    r = json.loads(out)
    assert r["options"]["num_points"] == 4 and r["options"]["branches"] == "spatial" and r["num_classes"] == 7
    assert set(r["train_step_ms"]) >= {"median", "p25", "p75"} and r["train_batch"] == 2
    assert r["train_peak_mem_mb"] > r["peak_mem_mb"]


def test_cli_table(capsys):
    rc, out, _ = run_cli(capsys, "--model", "fpn", "--size", "64x64", "--device", "cpu", "--repeats", "1",
                         "--warmup", "0", "--no-train-step")
    assert rc == 0 and "GFLOPs" in out and "FLOP convention" in out


@pytest.mark.parametrize("argv", [
    ["--size", "256x"], ["--size", "0x5"], ["--size", "abc"], ["--model", "nope", "--size", "32x32"],
    ["--set", "num_points=7", "--size", "32x32"], ["--set", "nope=1", "--size", "32x32"],
    ["--amp", "fp8", "--size", "32x32"], ["--batch", "0", "--size", "32x32"],
])
def test_cli_bad_input_exits_2_with_one_line(capsys, argv):
    rc, out, err = run_cli(capsys, *argv, "--device", "cpu", "--json")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_cli_json_ddsm_256x512_with_train_step(capsys):
    rc, out, _ = run_cli(capsys, "--model", "ddsm", "--backbone", "resnet18", "--size", "256x512", "--json",
                         "--repeats", "2", "--warmup", "1")
    assert rc == 0
    r = json.loads(out)
    assert REQUIRED <= set(r) and r["train_step_ms"]["median"] > 0 and r["uncounted_ops"] == []
