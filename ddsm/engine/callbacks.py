"""Callbacks: everything the training loop does that is not training (logging, reporting, tracking).

The loop calls, in this order of a run: ``on_train_step`` every ``train.log_every`` steps (and at
the last step) with window-averaged train metrics, ``on_eval`` after every validation with all
validation metrics, ``on_checkpoint`` after every checkpoint is on disk, and ``on_end`` once with
the final metrics. Callbacks run on rank 0 only unless they set ``rank_zero_only = False`` (for
example a Ray Train reporter, which every worker must call); hooks must be cheap, since they run
inside the loop.
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ddsm.metrics.catalogue import ACCURACY, bf_metrics

__all__ = ["Callback", "CallbackList", "ConsoleLogger", "JsonlLogger", "scalar_metrics"]


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    rank_zero_only: bool = True  # False: also called on the other ranks of a distributed run

    def on_train_step(self, step: int, metrics: dict) -> None:
        """After update ``step`` (1-based): ``loss``, ``loss_main``, ``loss_<output>`` per extra supervised
        output (``loss_aux``, DANet's ``loss_pam`` / ``loss_cam``), ``lr``, ``step_time_ms``."""

    def on_eval(self, step: int, metrics: dict) -> None:
        """After validating the weights of update ``step``: every metric from :func:`ddsm.engine.evaluate`,
        plus each DDSM layer's ``offset_mean/<layer>`` and ``offset_max/<layer>`` (:func:`ddsm.models.offset_stats`)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After the checkpoint of update ``step`` was written to ``path``."""

    def on_end(self, metrics: dict) -> None:
        """Once, with the final metrics (the content of ``metrics.json``)."""


class CallbackList(Callback):
    """Calls each callback in order, skipping rank-0-only ones on other ranks."""

    def __init__(self, callbacks: Sequence[Callback], *, rank: int = 0) -> None:
        self.callbacks = [c for c in callbacks if rank == 0 or not c.rank_zero_only]

    def on_train_step(self, step: int, metrics: dict) -> None:
        """Forward to every callback."""
        for c in self.callbacks:
            c.on_train_step(step, metrics)

    def on_eval(self, step: int, metrics: dict) -> None:
        """Forward to every callback."""
        for c in self.callbacks:
            c.on_eval(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Forward to every callback."""
        for c in self.callbacks:
            c.on_checkpoint(step, path)

    def on_end(self, metrics: dict) -> None:
        """Forward to every callback."""
        for c in self.callbacks:
            c.on_end(metrics)


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The int/float entries of ``metrics`` (what a tracker such as MLflow can log)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class ConsoleLogger(Callback):
    """One line per train log, per validation and at the end."""

    def __init__(self, *, total_steps: int, stream: IO[str] | None = None) -> None:
        self.total_steps = total_steps
        self.stream = stream or sys.stderr

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_train_step(self, step: int, metrics: dict) -> None:
        """``step 10/200  loss 1.2345  lr 9.55e-03  312 ms/step``."""
        self._print(f"step {step}/{self.total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                    f"{metrics['step_time_ms']:.0f} ms/step")

    def on_eval(self, step: int, metrics: dict) -> None:
        """``val @ 200  miou 0.4321  pixel_acc 0.8765  ...``."""
        keys = [*(m.name for m in ACCURACY), *bf_metrics(metrics)]
        text = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if _is_number(metrics.get(k)))
        self._print(f"val @ {step}  {text}")

    def on_checkpoint(self, step: int, path: Path) -> None:
        """``checkpoint @ 200 -> out/checkpoints/step_0000200.pt``."""
        self._print(f"checkpoint @ {step} -> {path}")


class JsonlLogger(Callback):
    """Appends ``{"event": "train"|"eval", "step": N, <scalar metrics>}`` lines to a file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_step(self, step: int, metrics: dict) -> None:
        """Log the train metrics of ``step``."""
        self._write({"event": "train", "step": step, **scalar_metrics(metrics)})

    def on_eval(self, step: int, metrics: dict) -> None:
        """Log the scalar validation metrics of ``step``."""
        self._write({"event": "eval", "step": step, **scalar_metrics(metrics)})


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
