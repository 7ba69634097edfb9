"""Choosing the sampling implementation per device type (DDSM_SAMPLING_IMPL / DEFAULT_IMPLS)."""
from __future__ import annotations

import pytest
import torch

import ddsm.models.sampling as sampling
from ddsm.models.ddsm import DDSM


@pytest.fixture
def grid_sample_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the grid_sample reference path."""
    calls: list[int] = []
    real = sampling._affinity_grid_sample

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "_affinity_grid_sample", spy)
    return calls


@pytest.mark.parametrize(("env", "cpu", "cuda"), [
    (None, "gather", "gather"),
    ("grid_sample", "grid_sample", "grid_sample"),
    ("cuda=grid_sample", "gather", "grid_sample"),
    ("cuda=grid_sample, cpu=gather", "gather", "grid_sample"),
    ("gather,cuda=grid_sample", "gather", "grid_sample"),
])
def test_default_impl_per_device_type(monkeypatch: pytest.MonkeyPatch, env: str | None, cpu: str, cuda: str):
    if env is None:
        monkeypatch.delenv(sampling.IMPL_ENV, raising=False)
    else:
        monkeypatch.setenv(sampling.IMPL_ENV, env)
    assert sampling.default_impl("cpu") == cpu
    assert sampling.default_impl(torch.device("cuda", 0)) == cuda


def test_default_table_is_used_without_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(sampling.IMPL_ENV, raising=False)
    monkeypatch.setitem(sampling.DEFAULT_IMPLS, "cuda", "grid_sample")
    assert sampling.default_impl("cuda") == "grid_sample" and sampling.default_impl("cpu") == "gather"


def test_bad_variable_names_itself_and_the_choices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(sampling.IMPL_ENV, "cuda=deform")
    with pytest.raises(ValueError, match=r"DDSM_SAMPLING_IMPL='cuda=deform'.*'deform'.*gather, grid_sample"):
        sampling.default_impl("cpu")


def test_the_model_follows_the_choice(monkeypatch: pytest.MonkeyPatch, grid_sample_calls: list[int]):
    """DDSM (both branches) calls dynamic_affinity without impl, so the per-device choice reaches it;
    both choices give the same output up to float rounding."""
    torch.manual_seed(0)
    block = DDSM(16, branches="dual", num_points=9)
    x_l, x_h = torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6)
    monkeypatch.delenv(sampling.IMPL_ENV, raising=False)
    fast = block(x_l, x_h)
    assert grid_sample_calls == []
    monkeypatch.setenv(sampling.IMPL_ENV, "cpu=grid_sample")
    reference = block(x_l, x_h)
    assert len(grid_sample_calls) == 2  # spatial and channel branch
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
