"""Model zoo: forward/backward contract of every registered model, bad options, the CLI table."""
import pytest
import torch

from ddsm.config import ConfigError
from ddsm.models import build_model, list_models
from harness.cli import main

K = 5


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_contract(name, backbone):
    torch.manual_seed(0)
    model = build_model(name, num_classes=K, backbone=backbone, aux=True)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert "aux" in out and all(v.shape == (2, K, 64, 64) for v in out.values())
    assert torch.isfinite(out["out"]).all()
    sum(v.square().mean() for v in out.values()).backward()  # every supervised output (danet: pam, cam too)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"{name}: no/non-finite gradient for {missing[:5]}"
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert set(a) == {"out"}
    assert torch.equal(a["out"], b["out"])


@pytest.mark.parametrize("branches", ["spatial", "channel"])
@pytest.mark.parametrize("options", [dict(num_points=4, pos_embed="learned"), dict(num_points=1, pos_embed="none", fusion="concat"),
                                     dict(num_points=25, offset_range=2.0, pooled_size=4)])
def test_ddsm_variants(branches, options):
    model = build_model("ddsm", num_classes=K, branches=branches, **options)
    out = model(torch.randn(2, 3, 64, 96))["out"]
    assert out.shape == (2, K, 64, 96) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, kwargs, words", [
    ("ddsm", dict(num_points=8), ["num_points", "8", "perfect square"]),
    ("ddsm", dict(num_points=64), ["num_points", "64", "1..7"]),
    ("ddsm", dict(branches="both"), ["branches", "both", "spatial, channel, dual"]),
    ("ddsm", dict(pos_embed="rope"), ["pos_embed", "rope", "sine"]),
    ("ddsm", dict(fusion="max"), ["fusion", "max", "sum, concat"]),
    ("fpn", dict(backbone="resnet7"), ["backbone", "resnet7", "resnet18"]),
    ("unet", dict(), ["model", "unet", "ddsm"]),
    ("fpn", dict(num_classes=0), ["num_classes", "0", ">= 1"]),
    ("fpn", dict(num_points=9), ["num_points", "fpn", "decoder_dim"]),
])
def test_bad_options_name_option_value_and_allowed(name, kwargs, words):
    kwargs.setdefault("num_classes", K)
    with pytest.raises(ValueError) as e:
        build_model(name, **kwargs)
    assert isinstance(e.value, ConfigError)
    for w in words:
        assert w in str(e.value)


def test_imagenet_weights_without_cache_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError, match="hub cache.*weights=/path"):
        build_model("fpn", num_classes=K, weights="imagenet")
    with pytest.raises(ConfigError, match="no such file"):
        build_model("fpn", num_classes=K, weights=str(tmp_path / "nope.pth"))


def test_local_weights_load(tmp_path):
    import torchvision
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = build_model("fpn", num_classes=K, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.stem[0].weight, net.conv1.weight)


def test_cli_models_table(capsys):
    assert main(["models", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out


def test_cli_models_bad_backbone_exits_2_one_line(capsys):
    assert main(["models", "--backbone", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "Traceback" not in err
