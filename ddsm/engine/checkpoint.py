"""Checkpoints: everything needed to continue a run bit-for-bit, loadable with ``weights_only=True``.

A checkpoint is one dict: ``format``, ``step`` (updates done), ``config`` (the resolved trial config
as a plain dict), ``model``, ``optimizer``, ``scheduler``, ``scaler`` (fp16 only), ``rng`` (torch
CPU/CUDA, numpy and ``random`` states) and ``train_time_s`` (training time of the steps it holds,
over every attempt). The data order needs no state: the training sampler is a pure function of
(seed, step), see :mod:`ddsm.engine.sampler`.

Files: ``<out>/checkpoints/step_<N>.pt``, the newest ``keep`` of them, and ``last.pt``, a separate
copy of the newest (never a link: damage to one file is never damage to two). Every write goes to a
temporary ``.<name>.<pid>.tmp`` that is flushed to disk and renamed over the target, so a run killed
mid-write leaves the previous checkpoint intact; a write cut short by an exception removes its
temporary, and :func:`clean_partial_writes` removes those a kill left behind. Every load is verified
(:func:`load_checkpoint`: the zip archive's CRC of every record, then the content), and every error
names the file. :func:`find_resume` resumes from the newest intact checkpoint: a damaged one is
renamed ``<name>.damaged`` (kept for inspection, never loaded again) and the next older one is tried;
no intact checkpoint is ever deleted.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "CheckpointError", "Resume", "capture_rng", "clean_partial_writes", "find_resume",
           "last_checkpoint", "load_checkpoint", "restore_rng", "save_checkpoint"]

FORMAT = 1
LAST = "last.pt"
REQUIRED = ("step", "config", "model", "optimizer", "scheduler", "rng")
_NUMBERED = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used (truncated, corrupted, not ours); ``path`` names it."""

    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(f"checkpoint {path} {why}")
        self.path = Path(path)


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU, current CUDA device, numpy, random) as tensors and ints."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "random": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; the CUDA state is restored only where CUDA is in use."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ============================================================================ writing


def save_checkpoint(ckpt_dir: str | Path, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as ``step_<N>.pt``, then ``last.pt`` as a copy of it, then prune the numbered files
    beyond the newest ``keep``; return the numbered path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{int(state['step']):07d}.pt"
    _atomic(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))
    _atomic(ckpt_dir / LAST, lambda tmp: shutil.copyfile(path, tmp))
    numbered = _numbered(ckpt_dir)  # oldest first
    for old in numbered[: max(0, len(numbered) - max(keep, 1))]:
        old.unlink(missing_ok=True)
    return path


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)``, flush it to disk, rename it over ``path``; the temporary never outlives an error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power loss once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def clean_partial_writes(ckpt_dir: str | Path) -> list[Path]:
    """Remove the temporaries a killed writer left in ``ckpt_dir``; return what was removed."""
    removed = []
    for tmp in sorted(Path(ckpt_dir).glob("*.tmp")) if Path(ckpt_dir).is_dir() else []:
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


# ============================================================================ reading


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint` (tensors, dicts, lists and ints only).

    Verified: the archive is complete and every record matches its CRC (``torch.load`` checks neither),
    it is a ddsm-bench checkpoint with every part, and a ``step_<N>.pt`` holds step N.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(path, f"is damaged (truncated or not a checkpoint archive: {e})") from None
    if bad is not None:
        raise CheckpointError(path, f"is damaged (record {bad!r} fails its CRC check)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file cannot be used
        raise CheckpointError(path, f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(path, f"is not a ddsm-bench checkpoint (format {FORMAT})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(path, f"is incomplete: no {', '.join(missing)}")
    m = _NUMBERED.match(path.name)
    if m and int(state["step"]) != int(m.group(1)):
        raise CheckpointError(path, f"holds step {state['step']}, not the step its name says")
    return state


def last_checkpoint(out_dir: str | Path) -> Path | None:
    """``<out_dir>/checkpoints/last.pt`` if it exists."""
    path = Path(out_dir) / "checkpoints" / LAST
    return path if path.is_file() else None


@dataclass
class Resume:
    """What :func:`find_resume` found: the newest intact checkpoint (``state`` None: none) and the damage seen."""

    state: dict[str, Any] | None
    path: Path | None
    damaged: list[str] = field(default_factory=list)  # one line per damaged file, naming it

    @property
    def step(self) -> int:
        """The step to continue from (0 when starting over)."""
        return int(self.state["step"]) if self.state is not None else 0


def find_resume(ckpt_dir: str | Path, *, map_location: str | torch.device = "cpu",
                quarantine: bool = True) -> Resume:
    """The newest intact checkpoint of ``ckpt_dir``: ``step_<N>.pt`` newest first, ``last.pt`` right after
    the newest (its copy).

    A damaged file is renamed ``<name>.damaged`` when ``quarantine`` (rank 0 of a distributed run; the
    others only skip it) and the next one is tried. ``Resume.damaged`` says what was skipped, so the
    caller can tell the user and the tracking store.
    """
    ckpt_dir = Path(ckpt_dir)
    numbered = _numbered(ckpt_dir)[::-1]  # newest first
    last = ckpt_dir / LAST
    candidates = numbered[:1] + ([last] if last.is_file() else []) + numbered[1:]
    damaged: list[str] = []
    for path in candidates:
        try:
            return Resume(state=load_checkpoint(path, map_location=map_location), path=path, damaged=damaged)
        except CheckpointError as e:
            if not path.is_file():  # another rank moved it aside meanwhile
                continue
            damaged.append(str(e))
            if quarantine:
                path.replace(path.with_name(path.name + ".damaged"))
    return Resume(state=None, path=None, damaged=damaged)


def _numbered(ckpt_dir: Path) -> list[Path]:
    """``step_<N>.pt`` files, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if _NUMBERED.match(p.name)),
                  key=lambda p: int(_NUMBERED.match(p.name).group(1)))
