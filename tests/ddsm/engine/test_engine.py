"""ddsm.engine: schedule, loss, checkpoint, sampler, inference helpers (unit), then short CPU trainings."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ddsm.config import ConfigError, TrialConfig, from_dict
from ddsm.engine import (
    Callback,
    CallbackList,
    TrainingDiverged,
    TrialKilled,
    build_scheduler,
    classify_failure,
    load_checkpoint,
    ohem_keep_mask,
    poly_factor,
    predict,
    save_checkpoint,
    segmentation_loss,
    sliding_window_logits,
    total_loss,
)
from ddsm.engine.checkpoint import capture_rng, restore_rng
from ddsm.engine.sampler import StepSampler

# ----------------------------------------------------------------------------- schedule


def test_poly_factor_known_values():
    assert poly_factor(0, total_steps=10, power=1.0) == 1.0
    assert poly_factor(5, total_steps=10, power=1.0) == pytest.approx(0.5)
    assert poly_factor(5, total_steps=10, power=0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(10, total_steps=10, power=0.9) == 0.0
    assert poly_factor(12, total_steps=10, power=0.9) == 0.0  # never negative past the end
    # warm-up over 4 updates: ramp (step + 1) / 4 times the poly value
    assert poly_factor(0, total_steps=10, warmup_steps=4, power=1.0) == pytest.approx(1.0 * 1 / 4)
    assert poly_factor(2, total_steps=10, warmup_steps=4, power=1.0) == pytest.approx(0.8 * 3 / 4)
    assert poly_factor(3, total_steps=10, warmup_steps=4, power=1.0) == pytest.approx(0.7)
    assert poly_factor(4, total_steps=10, warmup_steps=4, power=1.0) == pytest.approx(0.6)


def test_scheduler_sets_the_lr_of_each_update():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = build_scheduler(opt, total_steps=4, warmup_steps=2, power=1.0)
    used = []
    for _ in range(4):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([0.1 * 1.0 * 0.5, 0.1 * 0.75 * 1.0, 0.1 * 0.5, 0.1 * 0.25])


# ----------------------------------------------------------------------------- loss


def _binary_logits(p_true: list[float]) -> torch.Tensor:
    """(1, 2, 1, N) logits whose softmax gives class 1 probability p for each pixel."""
    z = torch.tensor([math.log(p / (1 - p)) for p in p_true])
    return torch.stack([torch.zeros_like(z), z]).view(1, 2, 1, -1)  # (1, 2, 1, N)


def test_ohem_keeps_pixels_below_threshold_and_at_least_min_kept():
    logits = _binary_logits([0.9, 0.6, 0.3, 0.8])
    target = torch.tensor([[[1, 1, 1, 255]]])  # (1, 1, 4); the 0.8 pixel is ignored
    keep = ohem_keep_mask(logits, target, thresh=0.7, min_kept=1)
    assert keep.flatten().tolist() == [False, True, True, False]
    # min_kept=3 > number of pixels below 0.7: the threshold rises to the 3rd smallest (0.9)
    keep = ohem_keep_mask(logits, target, thresh=0.7, min_kept=3)
    assert keep.flatten().tolist() == [True, True, True, False]
    # min_kept=2: the 2nd smallest (0.6) is below 0.7, so the threshold stays 0.7
    keep = ohem_keep_mask(logits, target, thresh=0.7, min_kept=2)
    assert keep.flatten().tolist() == [False, True, True, False]


@pytest.mark.parametrize("min_kept", [0, 1, 50, 400, 10_000])
def test_ohem_mask_equals_the_kthvalue_formula(min_kept: int):
    """The device-only OHEM threshold equals max(thresh, k-th smallest valid p) with k = min(min_kept, valid)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 12, 16, generator=g) * 3
    target = torch.randint(0, 5, (2, 12, 16), generator=g)
    target[torch.rand(2, 12, 16, generator=g) < 0.3] = 255
    valid = target != 255
    p_true = logits.softmax(1).gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    k = min(min_kept, int(valid.sum()))
    threshold = max(0.5, float(p_true[valid].kthvalue(k).values)) if k > 0 else 0.5
    expected = valid & (p_true <= threshold)
    assert torch.equal(ohem_keep_mask(logits, target, thresh=0.5, min_kept=min_kept), expected)


def test_ohem_loss_known_answer():
    logits = _binary_logits([0.9, 0.6, 0.3, 0.8])
    target = torch.tensor([[[1, 1, 1, 255]]])
    plain = segmentation_loss(logits, target)
    assert plain.item() == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.3)) / 3, rel=1e-5)
    hard = segmentation_loss(logits, target, ohem=True, ohem_thresh=0.7, ohem_min_kept=1)
    assert hard.item() == pytest.approx(-(math.log(0.6) + math.log(0.3)) / 2, rel=1e-5)


def test_loss_with_only_ignored_pixels_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_total_loss_adds_weighted_aux():
    target = torch.tensor([[[1, 1, 1, 1]]])
    out, aux = _binary_logits([0.9, 0.6, 0.3, 0.8]), _binary_logits([0.5, 0.5, 0.5, 0.5])
    losses = total_loss({"out": out, "aux": aux}, target, aux_weight=0.4)
    expected_main = -(math.log(0.9) + math.log(0.6) + math.log(0.3) + math.log(0.8)) / 4
    assert losses["loss_main"].item() == pytest.approx(expected_main, rel=1e-5)
    assert losses["loss_aux"].item() == pytest.approx(math.log(2), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(expected_main + 0.4 * math.log(2), rel=1e-5)
    assert set(total_loss({"out": out}, target, aux_weight=0.4)) == {"loss", "loss_main"}


# ----------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, total_steps=10)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    rng = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    for step in (1, 2, 3):
        path = save_checkpoint(tmp_path, {"step": step, "config": {"a": [1, 2]}, "model": model.state_dict(),
                                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng})
    assert path == tmp_path / "step_0000003.pt"
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt", "step_0000002.pt", "step_0000003.pt"]

    state = load_checkpoint(tmp_path / "last.pt")
    model2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = build_scheduler(opt2, total_steps=10)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert state["step"] == 3 and state["config"] == {"a": [1, 2]}
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    momentum, momentum2 = opt.state_dict()["state"][0]["momentum_buffer"], opt2.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, momentum2)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and sched2.last_epoch == sched.last_epoch
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_load_checkpoint_rejects_foreign_files(tmp_path: Path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ddsm-bench checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- failures and callbacks


@pytest.mark.parametrize("exc, expected", [
    (TrainingDiverged(iteration=3, loss=float("nan")), "nan"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "oom"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ... out of memory"), "oom"),
    (MemoryError(), "oom"),
    (KeyboardInterrupt(), "killed"),
    (SystemExit(1), "killed"),
    (TrialKilled("received SIGTERM"), "killed"),
    (ValueError("bad shape"), "error"),
    (ConfigError("eval.scales=[] is not allowed"), "config"),
])
def test_classify_failure(exc: BaseException, expected: str):
    assert classify_failure(exc) == expected


def test_classify_failure_looks_at_the_cause():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except RuntimeError as inner:
            raise RuntimeError("trial failed") from inner
    except RuntimeError as outer:
        assert classify_failure(outer) == "oom"


def test_diverged_message_names_the_iteration():
    e = TrainingDiverged(iteration=3, loss=float("nan"))
    assert str(e) == "loss is nan at iteration 3" and e.iteration == 3 and e.failure_class == "nan"


def test_callback_list_skips_rank_zero_only_callbacks_on_other_ranks():
    calls = []

    class Writer(Callback):
        def on_eval(self, step: int, metrics: dict) -> None:
            calls.append(("writer", step))

    class Reporter(Callback):
        rank_zero_only = False

        def on_eval(self, step: int, metrics: dict) -> None:
            calls.append(("reporter", step))

    CallbackList([Writer(), Reporter()], rank=1).on_eval(5, {})
    CallbackList([Writer(), Reporter()], rank=0).on_eval(6, {})
    assert calls == [("reporter", 5), ("writer", 6), ("reporter", 6)]


# ----------------------------------------------------------------------------- sampler


def _take(sampler: StepSampler, n: int) -> list[tuple[int, int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_step_sampler_starts_mid_stream_exactly():
    full = _take(StepSampler(10, batch_size=3, seed=7), 3 * 8)  # 3 steps per epoch, so 8 steps cross epochs
    for start in (1, 3, 5):
        assert _take(StepSampler(10, batch_size=3, seed=7, start_step=start), 3 * (8 - start)) == full[3 * start:]
    epoch0 = [i for i, _ in full[:9]]
    assert len(set(epoch0)) == 9  # one epoch never repeats an image
    assert _take(StepSampler(10, batch_size=3, seed=8), 9) != full[:9]


def test_step_sampler_shards_each_global_batch_over_ranks():
    ranks = [_take(StepSampler(12, batch_size=2, seed=0, rank=r, world_size=3), 2 * 4) for r in range(3)]
    single = _take(StepSampler(12, batch_size=6, seed=0), 6 * 4)
    for step in range(4):
        merged = [x for r in range(3) for x in ranks[r][2 * step:2 * step + 2]]
        assert merged == single[6 * step:6 * step + 6]


# ----------------------------------------------------------------------------- inference


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1)
    model = lambda x: {"out": conv(x)}  # noqa: E731 -- 1x1 conv: every crop sees the same per-pixel function
    image = torch.randn(2, 3, 20, 27)
    with torch.no_grad():
        whole = conv(image)
        tiled = sliding_window_logits(model, image, num_classes=5, crop=(8, 12))
        small = sliding_window_logits(model, image, num_classes=5, crop=(32, 32))  # padded
    torch.testing.assert_close(tiled, whole)
    torch.testing.assert_close(small, whole)


def test_flip_averaging_of_a_flip_equivariant_model_gives_its_softmax():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    model = lambda x: {"out": conv(x)}  # noqa: E731
    image = torch.randn(1, 3, 6, 9)
    scores = predict(model, image, num_classes=4, flip=True)
    torch.testing.assert_close(scores, conv(image).softmax(1).detach())
    assert torch.equal(predict(model, image, num_classes=4), conv(image).detach())


# ----------------------------------------------------------------------------- training runs (CPU, synthetic 64x64)

TINY = {
    "data": {"name": "synthetic", "num_images": 8, "image_size": [64, 64], "crop_size": [64, 64], "batch_size": 2},
    "model": {"name": "fpn", "backbone": "resnet18"},
    "train": {"steps": 30, "lr": 0.02, "device": "cpu", "log_every": 5},
    "eval": {"tolerances": [1, 2]},
}


# Runs that test mechanics, not learning: 3 steps per epoch, 2 val images (one batch).
SMALL = {"num_images": 9, "batch_size": 3, "image_size": [32, 32], "crop_size": [32, 32]}


def _cfg(**sections: dict) -> TrialConfig:
    d = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        d[section].update(values)
    return from_dict(d).validate()


@pytest.fixture
def no_profiling(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace ddsm.profile.trial_cost by a stub returning fixed numbers (profiling has its own tests)."""
    import ddsm.profile

    cost = {"gflops": 1.5, "params_m": 2.5}
    monkeypatch.setattr(ddsm.profile, "trial_cost", lambda model, cfg, *, device: dict(cost), raising=False)
    return cost


class Recorder(Callback):
    """Keeps every callback call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, dict | Path]] = []

    def on_train_step(self, step: int, metrics: dict) -> None:
        self.calls.append(("train", step, metrics))

    def on_eval(self, step: int, metrics: dict) -> None:
        self.calls.append(("eval", step, metrics))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.calls.append(("checkpoint", step, path))

    def on_end(self, metrics: dict) -> None:
        self.calls.append(("end", -1, metrics))


def test_training_improves_miou_at_least_3x(tmp_path: Path, no_profiling: dict):
    from ddsm.engine import evaluate, train
    from ddsm.engine.train import seed_everything
    from ddsm.models import build_model_from_config

    cfg = _cfg(train={"val_every": 15})
    seed_everything(cfg.train.seed)
    untrained = evaluate(build_model_from_config(cfg.model, num_classes=8), cfg, device="cpu")
    recorder = Recorder()
    metrics = train(cfg, out_dir=tmp_path, callbacks=[recorder])
    assert metrics["miou"] >= 3 * untrained["miou"], (untrained["miou"], metrics["miou"])

    kinds = [(kind, step) for kind, step, _ in recorder.calls]
    assert kinds == [("checkpoint", 0), *[("train", s) for s in (5, 10, 15)], ("eval", 15),
                     *[("train", s) for s in (20, 25, 30)], ("checkpoint", 30), ("eval", 30), ("end", -1)]
    train_metrics = recorder.calls[1][2]
    assert {"loss", "loss_main", "lr", "step_time_ms"} <= set(train_metrics)
    assert train_metrics["lr"] == pytest.approx(0.02 * poly_factor(4, total_steps=30))  # LR of update 5
    assert recorder.calls[-2][2]["miou"] == metrics["miou"] and metrics["gflops"] == no_profiling["gflops"]
    assert metrics["amp_dtype"] == "float32" and metrics["device"] == "cpu"


def test_profiling_failure_is_recorded_not_fatal(monkeypatch: pytest.MonkeyPatch):
    import ddsm.profile

    train_module = __import__("sys").modules["ddsm.engine.train"]

    def broken(model: nn.Module, cfg: TrialConfig, *, device: torch.device) -> dict:
        raise RuntimeError("no counter for op foo")

    monkeypatch.setattr(ddsm.profile, "trial_cost", broken, raising=False)
    cost = train_module._trial_cost(nn.Conv2d(3, 3, 1), _cfg(), device=torch.device("cpu"))
    assert cost == {"cost_error": "RuntimeError: no counter for op foo"}


class _Stop(Exception):
    """Simulates a killed run."""


class StopAfterCheckpoint(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step:
            raise _Stop(f"stopped after checkpoint {step}")


def test_resume_is_exact(tmp_path: Path, no_profiling: dict):
    from ddsm.engine import train

    # ddsm model with the aux head (dropout uses the RNG); 3 steps per epoch, so the stop is mid-epoch
    cfg = _cfg(model={"name": "ddsm", "aux": True}, data=SMALL,
               train={"steps": 40, "ckpt_every": 20, "val_every": 10, "warmup_steps": 5})
    full = train(cfg, out_dir=tmp_path / "full")
    with pytest.raises(_Stop):
        train(cfg, out_dir=tmp_path / "split", callbacks=[StopAfterCheckpoint(20)])
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 20
    resumed = train(cfg, out_dir=tmp_path / "split")

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 40
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert resumed["miou"] == full["miou"]
    np.testing.assert_array_equal(resumed["per_class_iou"], full["per_class_iou"])  # nan (absent class) == nan


def test_divergence_stops_with_nan_class_and_keeps_last_good_checkpoint(tmp_path: Path, no_profiling: dict):
    import json

    from ddsm.engine import train

    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at iteration \d+") as info:
        train(_cfg(data=SMALL, train={"lr": 1e6, "steps": 20}), out_dir=tmp_path)
    assert classify_failure(info.value) == "nan"
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] < info.value.iteration
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert failure["failure_class"] == "nan" and f"iteration {info.value.iteration}" in failure["message"]


def _nan_at(monkeypatch: pytest.MonkeyPatch, iteration: int) -> list[int]:
    """Make the loss of update ``iteration`` (1-based, fresh run) NaN; returns the list of updates run."""
    train_module = sys.modules["ddsm.engine.train"]

    real, calls = train_module.total_loss, []

    def planted(*args, **kwargs):
        calls.append(len(calls) + 1)
        losses = real(*args, **kwargs)
        return {k: v * float("nan") for k, v in losses.items()} if calls[-1] == iteration else losses

    monkeypatch.setattr(train_module, "total_loss", planted)
    return calls


def test_divergence_between_read_backs_names_the_exact_iteration(tmp_path: Path, no_profiling: dict,
                                                                monkeypatch: pytest.MonkeyPatch):
    """Losses are read back every log_every steps, not per step, yet the first bad iteration is exact
    and no checkpoint after it is written."""
    import json

    from ddsm.engine import train

    updates = _nan_at(monkeypatch, 7)
    recorder = Recorder()
    cfg = _cfg(data=SMALL, train={"steps": 20, "log_every": 5, "ckpt_every": 5})
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at iteration 7$"):
        train(cfg, out_dir=tmp_path, callbacks=[recorder])
    assert updates[-1] == 10  # the loss of update 7 was read back at step 10 (no per-step host sync)
    assert [(kind, step) for kind, step, _ in recorder.calls] == [("checkpoint", 0), ("train", 5), ("checkpoint", 5)]
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 5 and sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_0000000.pt", "step_0000005.pt"]
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert failure == {"failure_class": "nan", "message": "loss is nan at iteration 7", "step": 6}


def test_losses_are_read_back_once_per_log_window(tmp_path: Path, no_profiling: dict, monkeypatch: pytest.MonkeyPatch):
    train_module = sys.modules["ddsm.engine.train"]

    reads = []
    real = train_module._Unread.read
    monkeypatch.setattr(train_module._Unread, "read", lambda self: reads.append(len(self)) or real(self))
    recorder = Recorder()
    train_module.train(_cfg(data=SMALL, train={"steps": 10, "log_every": 4}), out_dir=tmp_path, callbacks=[recorder])
    assert reads == [4, 4, 2]  # steps 4, 8 and the last one
    logged = [m for kind, _, m in recorder.calls if kind == "train"]
    assert all(math.isfinite(m["loss"]) and m["step_time_ms"] > 0 for m in logged) and len(logged) == 3


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str, results: str) -> None:
    """One gloo process of :func:`test_distributed_training_on_cpu`."""
    import json

    import torch.distributed as dist

    from ddsm.engine import train

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metrics = train(_cfg(data=SMALL, train={"steps": 4, "val_every": 2}), out_dir=out_dir)
        Path(results, f"rank{rank}.json").write_text(json.dumps({"miou": metrics["miou"],
                                                                 "num_images": metrics["num_images"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_training_on_cpu(tmp_path: Path):
    """Two gloo processes: rank 0 writes the outputs, both see the same all-reduced metrics."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["num_images"] == 2  # each val image counted once
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 4
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4
