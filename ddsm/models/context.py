"""Context-module baselines on a dilated ResNet (output stride 8): heads that map c5 to logits.

FCN and DeepLabV3 are torchvision's heads (``torchvision.models.segmentation``), unchanged. PSPNet,
Non-local and DANet are mmsegmentation's heads layer for layer, as its Cityscapes configs build them
(``configs/_base_/models/{pspnet,nonlocal,danet}_r50-d8.py`` at commit
3f8d34ee4b43d5cac00f12e911bbedf7544f77a4; heads in ``mmseg/models/decode_heads/psp_head.py``,
``nl_head.py`` (+ mmcv ``NonLocal2d``), ``da_head.py`` (+ ``mmseg/models/utils/self_attention_block.py``),
``decode_head.py``): width ``channels`` = 512 at ResNet-50/101 (128 at ResNet-18/34, as mmseg's
``pspnet_r18-d8`` config), mmcv ``ConvModule``s (conv without bias + BN + ReLU, conv initialised
Kaiming-normal fan_out, BN 1/0), Dropout2d(0.1) before every 1x1 classifier, the main classifier
``conv_seg`` initialised normal(0, 0.01). Written here because torchvision has none of the three and
mmseg is not a dependency. The auxiliary FCN head (weight 0.4) is :class:`AuxHead`.

Numerics: every attention energy (with the query / key projections that feed it) and softmax runs in
float32 under any autocast (:mod:`ddsm.models.precision`): DANet's channel energies F F^T reach
5e2-8e3 and its unscaled position energies hundreds, where bf16's 8-bit mantissa moves the softmax by
percents (34% for the channel attention). The HW x HW position / non-local attention is materialised
in float32 as in the references (1 GiB per image at a 128 x 128 feature map).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from ddsm.models.decoder import conv_bn_relu, upsample
from ddsm.models.precision import at_least_fp32, conv2d_fp32, float32_region

KINDS = ("fcn", "deeplabv3", "pspnet", "nonlocal", "danet")


def conv_module(in_ch: int, out_ch: int, k: int) -> nn.Sequential:
    """mmcv's ``ConvModule`` with a norm and ReLU: k x k conv (no bias) + BN + ReLU, conv Kaiming-normal
    (fan_out, relu), BN weight 1 and bias 0 (``ConvModule.init_weights``)."""
    m = conv_bn_relu(in_ch, out_ch, k)
    nn.init.kaiming_normal_(m[0].weight, mode="fan_out", nonlinearity="relu")
    nn.init.ones_(m[1].weight)
    nn.init.zeros_(m[1].bias)
    return m


def classifier(in_ch: int, num_classes: int, *, init_std: float | None = 0.01) -> nn.Conv2d:
    """A 1x1 classifier; ``init_std`` = normal(0, std) weights and zero bias (mmseg's ``conv_seg``),
    None = PyTorch's default init (mmseg's other classifiers, which its ``init_cfg`` does not name)."""
    conv = nn.Conv2d(in_ch, num_classes, 1)
    if init_std is not None:
        nn.init.normal_(conv.weight, std=init_std)
        nn.init.zeros_(conv.bias)
    return conv


class PSPHead(nn.Module):
    """mmseg ``PSPHead``: PPM at bins (1, 2, 3, 6) (avg pool + 1x1 ConvModule), concat(input, pooled...),
    3x3 ConvModule bottleneck, Dropout2d(0.1), classifier."""

    def __init__(self, in_ch: int, dim: int, num_classes: int, *, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_module(in_ch, dim, 1)) for b in bins)
        self.bottleneck = conv_module(in_ch + len(bins) * dim, dim, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = classifier(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, h, w) -> (B, K, h, w)."""
        size = x.shape[-2:]
        pooled = [upsample(s(x), size, align_corners=False) for s in self.stages]
        y = self.bottleneck(torch.cat([x, *pooled], dim=1))  # (B, Cin + 4 dim, h, w) -> (B, dim, h, w)
        return self.conv_seg(self.dropout(y))


class NonLocal2d(nn.Module):
    """mmcv ``NonLocal2d`` (embedded Gaussian, ``reduction=2``, ``use_scale=True``): theta, phi, g are
    1x1 convs (bias, normal(0, 0.01)) to C/2; softmax(theta phi^T / sqrt(C/2)) g; a 1x1 conv (no bias) +
    BN back to C, the BN zero-initialised (the block starts as the identity); residual."""

    def __init__(self, channels: int, *, reduction: int = 2):
        super().__init__()
        inner = max(channels // reduction, 1)
        self.g, self.theta, self.phi = (nn.Conv2d(channels, inner, 1) for _ in range(3))
        for conv in (self.g, self.theta, self.phi):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.conv_out = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels))
        nn.init.kaiming_normal_(self.conv_out[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv_out[1].weight)
        nn.init.zeros_(self.conv_out[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        B, _, H, W = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        theta = conv2d_fp32(x, self.theta.weight, self.theta.bias).flatten(2).transpose(1, 2)  # (B, HW, C')
        phi = conv2d_fp32(x, self.phi.weight, self.phi.bias).flatten(2)  # (B, C', HW)
        with float32_region(x.device):
            attn = torch.softmax(theta @ phi * theta.shape[-1] ** -0.5, dim=-1)  # (B, HW, HW)
            y = attn @ at_least_fp32(g)  # (B, HW, C')
        y = y.to(g.dtype).transpose(1, 2).reshape(B, -1, H, W)  # (B, C', H, W)
        return x + self.conv_out(y)


class NLHead(nn.Module):
    """mmseg ``NLHead`` (an ``FCNHead`` with ``num_convs=2``, ``concat_input=True``): 3x3 ConvModule,
    non-local block, 3x3 ConvModule, 3x3 ConvModule on concat(input, that), Dropout2d(0.1), classifier."""

    def __init__(self, in_ch: int, dim: int, num_classes: int):
        super().__init__()
        self.convs = nn.ModuleList([conv_module(in_ch, dim, 3), conv_module(dim, dim, 3)])
        self.nl_block = NonLocal2d(dim)
        self.conv_cat = conv_module(in_ch + dim, dim, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = classifier(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, h, w) -> (B, K, h, w)."""
        y = self.convs[1](self.nl_block(self.convs[0](x)))  # (B, dim, h, w)
        y = self.conv_cat(torch.cat([x, y], dim=1))  # (B, Cin + dim, h, w) -> (B, dim, h, w)
        return self.conv_seg(self.dropout(y))


class PositionAttention(nn.Module):
    """DANet's position attention (mmseg ``PAM``, a ``SelfAttentionBlock`` without norms, scaling or out
    projection): query/key 1x1 convs (bias) to ``key_channels``, value 1x1 conv (bias) to C; HW x HW
    softmax; learned residual scale gamma (init 0)."""

    def __init__(self, channels: int, key_channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        q = conv2d_fp32(x, self.query.weight, self.query.bias).flatten(2).transpose(1, 2)  # (B, HW, C_k)
        k = conv2d_fp32(x, self.key.weight, self.key.bias).flatten(2)  # (B, C_k, HW)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        with float32_region(x.device):
            attn = torch.softmax(q @ k, dim=-1)  # (B, HW, HW), unscaled as in the reference
            y = attn @ at_least_fp32(v)  # (B, HW, C)
        y = y.to(v.dtype).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.gamma * y


class ChannelAttention(nn.Module):
    """DANet's channel attention (mmseg ``CAM``): softmax(rowmax(F F^T) - F F^T) F over C x C, gamma init 0.

    The energies and the softmax run in float32 under any autocast: they reach 5e2-8e3, and in bf16 the
    output differed from float32 by 34% (relative L2).
    """

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        with float32_region(x.device):
            f = at_least_fp32(x).flatten(2)  # (B, C, HW)
            energy = f @ f.transpose(1, 2)  # (B, C, C)
            energy = energy.amax(dim=-1, keepdim=True) - energy
            y = torch.softmax(energy, dim=-1) @ f  # (B, C, HW)
        return x + self.gamma * y.to(x.dtype).reshape(B, C, H, W)


class DAHead(nn.Module):
    """mmseg ``DAHead``: a position branch and a channel branch (3x3 ConvModule in, attention, 3x3
    ConvModule out), each with its own classifier, and the classifier of their sum.

    Returns ``{"out": sum logits}``, plus in training ``{"pam": ..., "cam": ...}``, the two extra
    losses of the reference (weight 1 each, see :data:`ddsm.engine.loss.HEAD_WEIGHTS`).
    """

    def __init__(self, in_ch: int, dim: int, num_classes: int, *, key_channels: int | None = None):
        super().__init__()
        self.pam_in_conv = conv_module(in_ch, dim, 3)
        self.pam = PositionAttention(dim, key_channels or max(dim // 8, 1))  # pam_channels=64 at dim 512
        self.pam_out_conv = conv_module(dim, dim, 3)
        self.pam_conv_seg = classifier(dim, num_classes, init_std=None)
        self.cam_in_conv = conv_module(in_ch, dim, 3)
        self.cam = ChannelAttention()
        self.cam_out_conv = conv_module(dim, dim, 3)
        self.cam_conv_seg = classifier(dim, num_classes, init_std=None)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = classifier(dim, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, Cin, h, w) -> {"out": (B, K, h, w)[, "pam", "cam": (B, K, h, w) in training]}."""
        pam = self.pam_out_conv(self.pam(self.pam_in_conv(x)))  # (B, dim, h, w)
        cam = self.cam_out_conv(self.cam(self.cam_in_conv(x)))  # (B, dim, h, w)
        out = {"out": self.conv_seg(self.dropout(pam + cam))}
        if self.training:
            out["pam"] = self.pam_conv_seg(self.dropout(pam))
            out["cam"] = self.cam_conv_seg(self.dropout(cam))
        return out


class AuxHead(nn.Module):
    """mmseg's auxiliary ``FCNHead`` on stage 3 (``num_convs=1``, ``concat_input=False``): 3x3 ConvModule
    to ``in_ch // 4`` (256 at ResNet-50/101, 64 at ResNet-18/34), Dropout2d(0.1), classifier."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.conv = conv_module(in_ch, in_ch // 4, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = classifier(in_ch // 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, h, w) -> (B, K, h, w)."""
        return self.conv_seg(self.dropout(self.conv(x)))


def build_context_head(kind: str, in_ch: int, dim: int, num_classes: int) -> nn.Module:
    """The head of a context-module baseline (one of :data:`KINDS`) on c5 with ``in_ch`` channels."""
    if kind == "fcn":
        return FCNHead(in_ch, num_classes)
    if kind == "deeplabv3":
        return DeepLabHead(in_ch, num_classes)
    if kind == "pspnet":
        return PSPHead(in_ch, dim, num_classes)
    if kind == "nonlocal":
        return NLHead(in_ch, dim, num_classes)
    if kind == "danet":
        return DAHead(in_ch, dim, num_classes)
    raise ValueError(f"context head {kind!r} is not allowed: expected one of {', '.join(KINDS)}")


def build_aux_head(kind: str, in_ch: int, num_classes: int) -> nn.Module:
    """The auxiliary head on c4 as each reference trains it: torchvision's ``FCNHead`` for fcn/deeplabv3
    (torchvision's ``aux_classifier``), mmseg's :class:`AuxHead` for every other model."""
    return FCNHead(in_ch, num_classes) if kind in ("fcn", "deeplabv3") else AuxHead(in_ch, num_classes)
