"""ddsm.engine.checkpoint under damage: separate files, verified loads, fallback to the newest intact one,
nothing intact deleted, partial writes removed, a signal mid-write (a real process) leaves no temporary."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddsm.config import from_dict
from ddsm.engine import Callback, CheckpointError, TrialKilled, find_resume, load_checkpoint, save_checkpoint, train

TINY = {
    "data": {"name": "synthetic", "num_images": 6, "image_size": [32, 32], "crop_size": [32, 32], "batch_size": 2},
    "model": {"name": "fpn", "backbone": "resnet18", "decoder_dim": 16},
    "train": {"steps": 6, "ckpt_every": 2, "lr": 0.02, "device": "cpu", "log_every": 1},
    "eval": {"tolerances": [1], "max_images": 2},
}


def _cfg():
    return from_dict({k: dict(v) for k, v in TINY.items()}).validate()


def _state(step: int) -> dict:
    return {"step": step, "config": {}, "model": {"w": torch.full((64,), float(step))}, "optimizer": {},
            "scheduler": {}, "rng": {}}


@pytest.fixture
def no_profiling(monkeypatch):
    import ddsm.profile

    monkeypatch.setattr(ddsm.profile, "trial_cost", lambda model, cfg, *, device: {}, raising=False)


class StopAt(Callback):
    """Kills the run (an exception) right after the checkpoint of ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step:
            raise KeyboardInterrupt(f"killed after checkpoint {step}")


class Resumes(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[int, Path | None, list[str]]] = []

    def on_resume(self, step: int, path: Path | None, damaged: list[str]) -> None:
        self.calls.append((step, path, damaged))


def test_last_is_a_separate_copy_and_every_load_is_verified(tmp_path: Path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _state(step), keep=2)
    last, newest = tmp_path / "last.pt", tmp_path / "step_0000003.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    assert os.stat(last).st_ino != os.stat(newest).st_ino and os.stat(last).st_nlink == 1  # never a link
    newest.write_bytes(newest.read_bytes()[:1000])  # damage to one is not damage to the other
    assert load_checkpoint(last)["step"] == 3
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_0000003\.pt is damaged \(truncated"):
        load_checkpoint(newest)
    flipped = bytearray(last.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # a bit flip inside the tensor data: torch.load alone would accept it
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"flipped\.pt is damaged \(record .* fails its CRC check\)"):
        load_checkpoint(tmp_path / "flipped.pt")
    os.replace(tmp_path / "step_0000002.pt", tmp_path / "step_0000009.pt")
    with pytest.raises(CheckpointError, match=r"step_0000009\.pt holds step 2"):
        load_checkpoint(tmp_path / "step_0000009.pt")


def test_find_resume_skips_damaged_files_and_sets_them_aside(tmp_path: Path):
    for step in (2, 4):
        save_checkpoint(tmp_path, _state(step))
    for name in ("step_0000004.pt", "last.pt"):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:500])
    found = find_resume(tmp_path)
    assert (found.step, found.path) == (2, tmp_path / "step_0000002.pt")
    assert [line.split()[1] for line in found.damaged] == [str(tmp_path / "step_0000004.pt"), str(tmp_path / "last.pt")]
    assert {p.name for p in tmp_path.iterdir()} == {"step_0000002.pt", "step_0000004.pt.damaged", "last.pt.damaged"}
    (tmp_path / "step_0000002.pt").write_bytes(b"not a zip")
    nothing = find_resume(tmp_path)
    assert nothing.state is None and nothing.step == 0 and len(nothing.damaged) == 1


def test_a_failed_write_leaves_no_temporary_and_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    save_checkpoint(tmp_path, _state(2))
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise TrialKilled("received SIGTERM")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(TrialKilled):
        save_checkpoint(tmp_path, _state(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_0000002.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_damaged_newest_checkpoint_falls_back_and_resume_stays_exact(tmp_path: Path, no_profiling, capsys):
    full = train(_cfg(), out_dir=tmp_path / "full")
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), out_dir=split, callbacks=[StopAt(4)])
    ckpts = split / "checkpoints"
    for name in ("step_0000004.pt", "last.pt"):  # the newest checkpoint and its copy, both truncated
        (ckpts / name).write_bytes((ckpts / name).read_bytes()[:2000])
    (ckpts / ".step_0000006.pt.4242.tmp").write_bytes(b"partial")  # a write a kill cut short
    (ckpts / "step_0000006.pt.tmp").write_bytes(b"partial")  # the old naming
    capsys.readouterr()
    seen = Resumes()
    resumed = train(_cfg(), out_dir=split, callbacks=[seen])
    err = capsys.readouterr().err
    assert f"checkpoint {ckpts / 'step_0000004.pt'} is damaged" in err
    assert f"resuming from {ckpts / 'step_0000002.pt'}" in err
    assert "removed" in err and not list(ckpts.glob("*.tmp"))
    ((step, path, damaged),) = seen.calls
    assert (step, path, len(damaged)) == (2, ckpts / "step_0000002.pt", 2) and "step_0000004.pt" in damaged[0]
    assert resumed["miou"] == full["miou"] and resumed["step"] == 6  # from step 2, still bit-exact
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (tmp_path / "full", split))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert (ckpts / "step_0000004.pt.damaged").is_file()  # kept for inspection


def test_deleted_last_resumes_from_the_numbered_checkpoint_and_train_time_adds_up(tmp_path: Path, no_profiling):
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), out_dir=tmp_path, callbacks=[StopAt(4)])
    first = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["train_time_s"]
    (tmp_path / "checkpoints" / "last.pt").unlink()
    seen = Resumes()
    metrics = train(_cfg(), out_dir=tmp_path, callbacks=[seen])
    assert seen.calls == [(4, tmp_path / "checkpoints" / "step_0000004.pt", [])]  # not from step 0
    assert first > 0 and metrics["train_time_s"] > first  # the first attempt's steps count too


# ----------------------------------------------------------------------------- a real process, a real signal

SIGNAL_MID_WRITE = """
import os, signal, sys, torch
from pathlib import Path
from ddsm.config import from_dict
from ddsm.engine import train
real = torch.save
def save(obj, f):  # the signal lands while the step-4 checkpoint is being written
    if obj.get("step") == 4:
        Path(f).write_bytes(b"half")
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    real(obj, f)
torch.save = save
import ddsm.profile
ddsm.profile.trial_cost = lambda model, cfg, *, device: {}
train(from_dict(CFG).validate(), out_dir=sys.argv[1])
"""


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_a_signal_mid_write_leaves_no_temporary(tmp_path: Path, sig: str):
    """SIGTERM: the write completes, a checkpoint is kept and the run stops as killed; SIGKILL: the temporary
    it leaves is removed when the run resumes (also covered in-process above)."""
    script = SIGNAL_MID_WRITE.replace("CFG", json.dumps(TINY).replace("null", "None"))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), sig], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpts = tmp_path / "checkpoints"
    if sig == "SIGTERM":
        assert proc.returncode != 0 and "TrialKilled: stopped by SIGTERM at step 4" in proc.stderr, proc.stderr[-2000:]
        assert not list(ckpts.glob("*.tmp")), sorted(p.name for p in ckpts.iterdir())
        assert load_checkpoint(ckpts / "last.pt")["step"] == 4
        assert json.loads((tmp_path / "failure.json").read_text())["failure_class"] == "killed"
    else:
        assert proc.returncode == -signal.SIGKILL
        assert list(ckpts.glob("*.tmp"))  # what a kill leaves...
        assert find_resume(ckpts).step == 2
        subprocess.run([sys.executable, "-c", script.replace("obj.get(\"step\") == 4", "False"), str(tmp_path), sig],
                       check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert not list(ckpts.glob("*.tmp"))  # ...is cleaned when the run resumes
        assert load_checkpoint(ckpts / "last.pt")["step"] == 6
