"""Every supervised output a model returns gets its reference loss weight: aux 0.4 (train.aux_weight),
DANet's position and channel heads 1 each; an output without a weight is an error, not a silent no-op."""
import math

import pytest
import torch

from ddsm.engine import total_loss
from ddsm.engine.loss import HEAD_WEIGHTS
from ddsm.models import build_model


def _logits(p_true: float) -> torch.Tensor:
    """(1, 2, 1, 1) logits whose softmax gives class 1 probability p_true."""
    return torch.tensor([math.log(1 - p_true), math.log(p_true)]).view(1, 2, 1, 1)


def test_danet_heads_weigh_one_each_and_aux_its_weight():
    target = torch.ones(1, 1, 1, dtype=torch.long)
    outputs = {"out": _logits(0.9), "aux": _logits(0.5), "pam": _logits(0.8), "cam": _logits(0.6)}
    losses = total_loss(outputs, target, aux_weight=0.4)
    ce = {k: -math.log(p) for k, p in (("out", 0.9), ("aux", 0.5), ("pam", 0.8), ("cam", 0.6))}
    for key in ("aux", "pam", "cam"):
        assert losses[f"loss_{key}"].item() == pytest.approx(ce[key], rel=1e-5)
    assert HEAD_WEIGHTS == {"pam": 1.0, "cam": 1.0}
    assert losses["loss"].item() == pytest.approx(ce["out"] + 0.4 * ce["aux"] + ce["pam"] + ce["cam"], rel=1e-5)


def test_unknown_output_is_an_error_naming_it():
    target = torch.ones(1, 1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="'edge' has no loss weight"):
        total_loss({"out": _logits(0.9), "edge": _logits(0.5)}, target, aux_weight=0.4)


def test_every_registered_model_output_has_a_weight():
    model = build_model("danet", num_classes=2, backbone="resnet18")
    out = model(torch.randn(2, 3, 32, 32))
    losses = total_loss(out, torch.ones(2, 32, 32, dtype=torch.long), aux_weight=0.4)
    assert {"loss_aux", "loss_pam", "loss_cam"} <= set(losses)
