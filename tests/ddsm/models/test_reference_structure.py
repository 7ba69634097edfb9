"""Every baseline equals its reference structure, layer for layer.

The reference counts are computed here from the layer lists read in the reference code (the source
files and commits are in each test's docstring), never by calling our builders; only the backbone
count comes from torchvision itself (our documented deviation: torchvision ResNets instead of the
references' deep-stem ones). Models are built on the meta device, so R50/R101 cost nothing.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from ddsm.models import build_model
from ddsm.models.decoder import PPM, FlowAlign, UpsampleAdd

K = 19  # Cityscapes


def conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def conv_module(cin: int, cout: int, k: int) -> int:
    """mmcv ConvModule with a norm: conv without bias (bias='auto') + BN."""
    return conv(cin, cout, k, False) + bn(cout)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def torchvision_backbone(depth: int) -> int:
    """A torchvision ResNet without its fc layer (stem + 4 stages)."""
    with torch.device("meta"):
        net = getattr(torchvision.models, f"resnet{depth}")()
    return params(net) - params(net.fc)


def build(name: str, backbone: str, **options) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, num_classes=K, backbone=backbone, **options)


C5, C4 = 2048, 1024  # ResNet-50/101 stage outputs; mmseg heads: channels=512, aux channels=256


def mmseg_aux_head() -> int:
    """mmseg configs/_base_/models/{pspnet,danet,nonlocal}_r50-d8.py @ 3f8d34ee4b43d5cac00f12e911bbedf7544f77a4:
    auxiliary_head FCNHead(in_channels=1024, channels=256, num_convs=1, concat_input=False, dropout 0.1);
    mmseg/models/decode_heads/fcn_head.py @ 86d473002f9e68111aa95465b6ac3bdbdb07f25a: convs = [ConvModule(in, ch, 3)];
    decode_head.py @ fdac3b8c9aacc132ae8b6fddd3a11ed7ef44271b: conv_seg = Conv2d(ch, K, 1) (bias)."""
    return conv_module(C4, 256, 3) + conv(256, K, 1, True)


def mmseg_psp_head() -> int:
    """configs/_base_/models/pspnet_r50-d8.py @ 3f8d34ee: PSPHead(in_channels=2048, channels=512, pool_scales
    (1, 2, 3, 6)); mmseg/models/decode_heads/psp_head.py @ 5563185b3ad7a3d31121280b13c1c5cbc41f4f55:
    PPM = 4 x [AdaptiveAvgPool2d, ConvModule(2048, 512, 1)], bottleneck = ConvModule(2048 + 4*512, 512, 3),
    conv_seg Conv2d(512, K, 1)."""
    return 4 * conv_module(C5, 512, 1) + conv_module(C5 + 4 * 512, 512, 3) + conv(512, K, 1, True)


def mmseg_nl_head() -> int:
    """configs/_base_/models/nonlocal_r50-d8.py @ 3f8d34ee: NLHead(in 2048, channels 512, reduction 2,
    use_scale, embedded_gaussian); mmseg/models/decode_heads/nl_head.py @ 5563185b: FCNHead(num_convs=2,
    concat_input=True): convs = [ConvModule(2048, 512, 3), ConvModule(512, 512, 3)], conv_cat =
    ConvModule(2048 + 512, 512, 3), nl_block = mmcv NonLocal2d(512) (open-mmlab/mmcv
    mmcv/cnn/bricks/non_local.py @ 0198abfdbd8daa98b6e2b002f9c3156b36f3ac14: g/theta/phi = ConvModule(512,
    256, 1) without norm (conv with bias), conv_out = ConvModule(256, 512, 1) with norm), conv_seg."""
    non_local = 3 * conv(512, 256, 1, True) + conv_module(256, 512, 1)
    return (conv_module(C5, 512, 3) + conv_module(512, 512, 3) + conv_module(C5 + 512, 512, 3) + non_local
            + conv(512, K, 1, True))


def mmseg_da_head() -> int:
    """configs/_base_/models/danet_r50-d8.py @ 3f8d34ee: DAHead(in 2048, channels 512, pam_channels 64);
    mmseg/models/decode_heads/da_head.py @ 94f9cb4e1dbffa13323dde65ce13b8af61e5ff07: pam_in_conv, pam_out_conv,
    cam_in_conv, cam_out_conv ConvModule 3x3; PAM = SelfAttentionBlock(key/query/value projections without
    norm, no out projection; mmseg/models/utils/self_attention_block.py @ 50546da85c96c6bb2cf386f179215ab54f82a3e3:
    Conv2d(512, 64, 1) x 2 and Conv2d(512, 512, 1), all with bias) + Scale gamma; CAM = Scale gamma;
    pam_conv_seg, cam_conv_seg, conv_seg = Conv2d(512, K, 1)."""
    pam = 2 * conv(512, 64, 1, True) + conv(512, 512, 1, True) + 1
    cam = 1
    return (2 * conv_module(C5, 512, 3) + 2 * conv_module(512, 512, 3) + pam + cam + 3 * conv(512, K, 1, True))


REFERENCE_HEADS = {"pspnet": mmseg_psp_head, "nonlocal": mmseg_nl_head, "danet": mmseg_da_head}


@pytest.mark.parametrize("depth", [50, 101])
@pytest.mark.parametrize("name", ["pspnet", "nonlocal", "danet"])
def test_context_baseline_parameter_count_equals_mmseg(name, depth):
    """R101 configs (e.g. configs/pspnet/pspnet_r101-d8_4xb2-80k_cityscapes-512x1024.py @
    e663aca8a4aa15be6e2776224e1d542be86cd13b) only set backbone depth=101: the heads are the R50 ones."""
    model = build(name, f"resnet{depth}")
    assert params(model.backbone) == torchvision_backbone(depth)
    assert params(model.head) == REFERENCE_HEADS[name]()
    assert params(model.aux_head) == mmseg_aux_head()  # aux=None: the reference trains with it
    assert params(model) == torchvision_backbone(depth) + REFERENCE_HEADS[name]() + mmseg_aux_head()


def test_context_baselines_at_r18_follow_mmseg_r18_widths():
    """configs/pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py @ e663aca8: decode_head in 512, channels 128;
    auxiliary_head in 256, channels 64."""
    model = build("pspnet", "resnet18")
    head = 4 * conv_module(512, 128, 1) + conv_module(512 + 4 * 128, 128, 3) + conv(128, K, 1, True)
    assert params(model.head) == head
    assert params(model.aux_head) == conv_module(256, 64, 3) + conv(64, K, 1, True)


def test_narrow_form_stays_reachable():
    wide, narrow = build("pspnet", "resnet50"), build("pspnet", "resnet50", decoder_dim=256, aux=False)
    assert narrow.aux_head is None and params(narrow.head) < params(wide.head)


@pytest.mark.parametrize("name, builder", [("fcn", torchvision.models.segmentation.fcn_resnet50),
                                           ("deeplabv3", torchvision.models.segmentation.deeplabv3_resnet50)])
def test_torchvision_heads_match_torchvision_exactly(name, builder):
    with torch.device("meta"):
        ref = builder(weights=None, weights_backbone=None, num_classes=K, aux_loss=True)
    model = build(name, "resnet50")
    assert [p.shape for p in model.head.parameters()] == [p.shape for p in ref.classifier.parameters()]
    assert [p.shape for p in model.aux_head.parameters()] == [p.shape for p in ref.aux_classifier.parameters()]
    assert params(model) == params(ref)


# ----------------------------------------------------------------------------- SFNet / FPN vs SFSegNets


def sfsegnets_head(fpn_inplanes: tuple[int, ...], fpn_dim: int, *, align: bool) -> int:
    """lxtGH/SFSegNets network/sfnet_resnet.py @ 22c56698b8f7bec0c38882618a45854ce2a9baa3, UperNetAlignHead
    (UperNetHead without the align modules): ppm = PSPModule(2048 or 512, out_features=fpn_dim); fpn_in =
    [Conv2d(c, fpn_dim, 1) (bias), BN, ReLU] per lateral; fpn_out = conv3x3_bn_relu(fpn_dim, fpn_dim) (no bias);
    fpn_out_align = AlignedModule(fpn_dim, fpn_dim // 2); conv_last = conv3x3_bn_relu(4 fpn_dim, fpn_dim) +
    Conv2d(fpn_dim, K, 1). network/nn/operators.py @ 22c56698: PSPModule stages = [pool, Conv2d(in, out, 1,
    bias=False), BN] x 4, bottleneck = [Conv2d(in + 4 out, out, 1, bias=False), BN, ReLU, Dropout2d(0.1)];
    AlignedModule: down_h, down_l = Conv2d(inplane, outplane, 1, bias=False), flow_make = Conv2d(2 outplane, 2,
    3, bias=False)."""
    d, top = fpn_dim, fpn_inplanes[-1]
    ppm = 4 * (conv(top, d, 1, False) + bn(d)) + conv(top + 4 * d, d, 1, False) + bn(d)
    laterals = sum(conv(c, d, 1, True) + bn(d) for c in fpn_inplanes[:-1])
    smooth = 3 * (conv(d, d, 3, False) + bn(d))
    aligned = 3 * (2 * conv(d, d // 2, 1, False) + conv(d, 2, 3, False)) if align else 0
    conv_last = conv(4 * d, d, 3, False) + bn(d) + conv(d, K, 1, True)
    return ppm + laterals + smooth + aligned + conv_last


@pytest.mark.parametrize("backbone, inplanes, dim", [("resnet18", (64, 128, 256, 512), 128),
                                                     ("resnet50", (256, 512, 1024, 2048), 256),
                                                     ("resnet101", (256, 512, 1024, 2048), 256)])
@pytest.mark.parametrize("name", ["sfnet", "fpn"])
def test_sfnet_and_fpn_parameter_count_equals_sfsegnets(name, backbone, inplanes, dim):
    """AlignNetResNet (sfnet_resnet.py @ 22c56698): fpn_dim 128 for resnet-18-deep, 256 otherwise; no aux."""
    model = build(name, backbone)
    assert model.aux_head is None
    assert params(model.head) == sfsegnets_head(inplanes, dim, align=name == "sfnet")
    assert params(model.backbone) == torchvision_backbone(int(backbone.removeprefix("resnet")))


def test_sfsegnets_ppm_layers():
    """PSPModule (operators.py @ 22c56698): pooled branches conv + BN without ReLU; 1x1 bottleneck + Dropout2d(0.1)."""
    ppm = PPM(32, 8)
    assert [type(m) for m in ppm.stages[0]] == [nn.AdaptiveAvgPool2d, nn.Conv2d, nn.BatchNorm2d]
    conv_, _, relu, drop = (*ppm.bottleneck[0], ppm.bottleneck[1])
    assert conv_.kernel_size == (1, 1) and conv_.bias is None and isinstance(relu, nn.ReLU)
    assert isinstance(drop, nn.Dropout2d) and drop.p == 0.1
    assert ppm.align_corners is True


def test_laterals_have_bias_and_decoder_uses_one_align_corners():
    model = build_model("sfnet", num_classes=K, backbone="resnet18")
    assert all(lat[0].bias is not None for lat in model.head.laterals)
    conventions = {m.align_corners for m in model.modules() if hasattr(m, "align_corners")}
    assert conventions == {True}  # PPM, fusions, head and final upsampling (SFSegNets: True everywhere)
    other = build_model("sfnet", num_classes=K, backbone="resnet18", align_corners=False)
    assert {m.align_corners for m in other.modules() if hasattr(m, "align_corners")} == {False}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_backbone_dilation_is_sfsegnets_variant_d(backbone):
    """AlignNetResNet variant 'D' (sfnet_resnet.py @ 22c56698): every 'conv2' of layer3 / layer4 gets
    dilation = padding = 2 / 4; strides are kept (downsample.0 stays (2, 2)), so the output stride stays 32."""
    model = build_model("fpn", num_classes=K, backbone=backbone)
    bb = model.backbone
    for layer, d in ((bb.layer3, 2), (bb.layer4, 4)):
        assert all(b.conv2.dilation == (d, d) and b.conv2.padding == (d, d) for b in layer)
        assert layer[0].downsample[0].stride == (2, 2)
    assert all(b.conv2.dilation == (1, 1) for b in bb.layer2)
    feats = bb(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    plain = build_model("fpn", num_classes=K, backbone=backbone, backbone_dilation="none").backbone
    assert all(b.conv2.dilation == (1, 1) for b in plain.layer4)


def test_os8_backbone_dilates_only_the_strided_conv_of_a_basic_block():
    """mmseg BasicBlock (mmseg/models/backbones/resnet.py): conv1 dilated, conv2 padding 1; the first block of a
    dilated stage uses dilation // 2 (contract_dilation=True)."""
    bb = build_model("pspnet", num_classes=K, backbone="resnet18").backbone
    assert [b.conv1.dilation for b in bb.layer4] == [(2, 2), (4, 4)]
    assert all(b.conv2.dilation == (1, 1) for b in bb.layer4)
    assert [f.shape[-1] for f in bb(torch.randn(1, 3, 64, 64))] == [16, 8, 8, 8]


@pytest.mark.parametrize("align_corners", [True, False])
def test_flow_align_with_zero_flow_is_the_same_upsampling(align_corners):
    """One convention through the flow path: a zero flow warps x_h exactly as the upsampling does."""
    torch.manual_seed(0)
    fam, add = FlowAlign(6, align_corners=align_corners), UpsampleAdd(6, align_corners=align_corners)
    nn.init.zeros_(fam.flow.weight)
    x_l, x_h = torch.randn(2, 6, 9, 11), torch.randn(2, 6, 5, 6)
    torch.testing.assert_close(fam(x_l, x_h), add(x_l, x_h), atol=1e-5, rtol=1e-5)
    expected = x_l + F.interpolate(x_h, size=(9, 11), mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(add(x_l, x_h), expected)


def test_fpn_sfnet_ddsm_differ_only_in_their_fusion():
    torch.manual_seed(0)
    fpn, sfnet, ddsm = (build_model(n, num_classes=K, backbone="resnet18") for n in ("fpn", "sfnet", "ddsm"))
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items() if ".fusions." not in k}  # noqa: E731
    assert shapes(fpn) == shapes(sfnet) == shapes(ddsm)
    # with zero flows, SFNet is FPN: load FPN's weights, the outputs agree
    missing, unexpected = sfnet.load_state_dict(fpn.state_dict(), strict=False)
    assert not unexpected and all(".fusions." in k for k in missing)
    for fam in sfnet.head.fusions:
        nn.init.zeros_(fam.flow.weight)
    fpn.eval(), sfnet.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(sfnet(x)["out"], fpn(x)["out"], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- layer details


def test_nonlocal_head_structure_and_init():
    """NLHead concatenates its input before the classifier; NonLocal2d's conv_out BN starts at zero, so the
    block is the identity at initialisation; mmcv normal_init(std=0.01) on g/theta/phi."""
    head = build_model("nonlocal", num_classes=K, backbone="resnet18").head
    assert head.conv_cat[0].in_channels == 512 + 128
    nl = head.nl_block
    assert torch.equal(nl.conv_out[1].weight, torch.zeros(128)) and torch.equal(nl.conv_out[1].bias, torch.zeros(128))
    assert 0.005 < float(nl.theta.weight.detach().std()) < 0.015
    nl.eval()
    x = torch.randn(1, 128, 5, 6)
    torch.testing.assert_close(nl(x), x)
    assert isinstance(head.dropout, nn.Dropout2d) and 0.005 < float(head.conv_seg.weight.detach().std()) < 0.015


def test_danet_returns_its_extra_heads_in_training_only():
    model = build_model("danet", num_classes=K, backbone="resnet18")
    x = torch.randn(2, 3, 64, 64)
    assert set(model(x)) == {"out", "aux", "pam", "cam"}
    model.eval()
    with torch.no_grad():
        assert set(model(x)) == {"out"}
    assert model.head.pam.query.out_channels == 128 // 8  # pam_channels = channels / 8 (64 at 512)


def test_cli_models_table_shows_the_reference_counts(capsys):
    from harness.cli import main

    assert main(["models", "--backbone", "resnet50"]) == 0
    out = capsys.readouterr().out
    expected = {"pspnet": torchvision_backbone(50) + mmseg_psp_head() + mmseg_aux_head(),
                "sfnet": torchvision_backbone(50) + sfsegnets_head((256, 512, 1024, 2048), 256, align=True)}
    for name, count in expected.items():
        row = next(line for line in out.splitlines() if f" {name} " in line)
        assert f"{count / 1e6:.2f}" in row
