"""Hue jitter (SFSegNets' ColorJitter hue=0.25): off by default without changing the random stream."""
import pytest
import torch

from ddsm.config import ConfigError, from_dict
from ddsm.data.transforms import TrainTransform, jitter


def _image() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 8, 8)


def test_hue_zero_keeps_the_previous_stream_and_result():
    image = _image()
    a = jitter(image, strength=0.3, generator=torch.Generator().manual_seed(1))
    b = jitter(image, strength=0.3, hue=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_hue_shift_rotates_hue_and_keeps_value():
    image = _image()
    shifted = jitter(image, strength=0.0, hue=0.25, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(shifted, image)
    torch.testing.assert_close(shifted.amax(0), image.amax(0), atol=1e-5, rtol=0)  # HSV value = max channel
    assert shifted.min() >= 0 and shifted.max() <= 1


def test_train_transform_and_config_check_the_range():
    t = TrainTransform(crop_size=(8, 8), scale_range=(1.0, 1.0), flip=False, jitter=0.0, hue=0.1)
    image, _ = t(torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8),
                 torch.Generator().manual_seed(0))
    assert image.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="hue=0.7"):
        TrainTransform(crop_size=(8, 8), hue=0.7)
    with pytest.raises(ConfigError, match="data.hue=0.6"):
        from_dict({"data": {"hue": 0.6}}).validate()
