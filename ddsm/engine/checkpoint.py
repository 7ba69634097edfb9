"""Checkpoints: everything needed to continue a run bit-for-bit, loadable with ``weights_only=True``.

A checkpoint is one dict: ``format``, ``step`` (updates done), ``config`` (the resolved trial config
as a plain dict), ``model``, ``optimizer``, ``scheduler``, ``scaler`` (fp16 only) and ``rng``
(torch CPU/CUDA, numpy and ``random`` states). The data order needs no state: the training
sampler is a pure function of (seed, step), see :mod:`ddsm.engine.sampler`.

Files go to ``<out>/checkpoints/step_<N>.pt``; ``last.pt`` is a hard link to (or copy of) the newest
one and only the newest ``keep`` numbered files stay. Writes go through a temporary file and
``os.replace`` so a run killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "capture_rng", "restore_rng", "save_checkpoint", "load_checkpoint", "last_checkpoint"]

FORMAT = 1


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


def save_checkpoint(ckpt_dir: str | Path, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as ``step_<N>.pt``, point ``last.pt`` at it, prune old numbered files; return its path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{int(state['step']):07d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    _point_last(path, ckpt_dir / "last.pt")
    numbered = sorted(ckpt_dir.glob("step_*.pt"))
    for old in numbered[: max(0, len(numbered) - max(keep, 1))]:
        old.unlink(missing_ok=True)
    return path


def _point_last(path: Path, last: Path) -> None:
    tmp = last.with_suffix(".pt.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # no extra disk; survives pruning of `path`
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, last)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors, dicts, lists and ints only)."""
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ddsm-bench checkpoint (format {FORMAT})")
    return state


def last_checkpoint(out_dir: str | Path) -> Path | None:
    """``<out_dir>/checkpoints/last.pt`` if it exists."""
    path = Path(out_dir) / "checkpoints" / "last.pt"
    return path if path.is_file() else None
