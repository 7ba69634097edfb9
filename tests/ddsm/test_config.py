"""Config dataclasses: strict parsing, overrides, validation messages."""
import pytest

from ddsm.config import ConfigError, TrialConfig, from_dict, load_config, save_config, to_dict


def test_round_trip(tmp_path):
    assert load_config(None, ["train.lr=1e6"]).train.lr == 1e6  # YAML 1.1 reads 1e6 as a string
    cfg = load_config(None, ["model.num_points=25", "data.crop_size=[64, 96]", "train.lr=0.02", "model.weights=null"])
    assert cfg.model.num_points == 25 and cfg.data.crop_size == (64, 96) and cfg.train.lr == 0.02
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, words", [
    ("model.nmu_points=9", ["model.nmu_points", "allowed keys", "model.num_points"]),
    ("bogus=1", ["'bogus'", "allowed keys", "model", "train"]),
    ("train.lr=fast", ["train.lr", "'fast'", "float"]),
    ("train.steps=1.5", ["train.steps", "1.5", "int"]),
    ("data.flip=3", ["data.flip", "bool"]),
    ("data.crop_size=[64]", ["data.crop_size", "2 values"]),
    ("model.num_points=8", ["model.num_points", "8", "perfect square"]),
    ("train.amp=fp8", ["train.amp", "fp8", "bf16"]),
    ("train.steps=0", ["train.steps", ">= 1"]),
    ("train.lr", ["key=value"]),
])
def test_errors_name_key_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert TrialConfig().validate() == TrialConfig()
