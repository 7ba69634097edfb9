"""Why a trial stopped: the failure classes the harness records (``oom``, ``nan``, ``config``, ``error``,
``killed``), in the order a root cause wins over its echoes (one DDP rank's OOM makes the others fail).

``config`` is a :class:`ddsm.config.ConfigError` raised inside a trial (a value, file or checkpoint the
driver could not check): deterministic, so the harness never retries it.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ddsm.config import ConfigError

__all__ = ["FAILURE_CLASSES", "NEVER_RETRIED", "TrainingDiverged", "TrialKilled", "classify_failure",
           "sigterm_as_exception"]

FAILURE_CLASSES = ("oom", "nan", "config", "error", "killed")
NEVER_RETRIED = ("config",)  # the same attempt fails the same way


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``iteration`` is the 1-based update at which it happened."""

    failure_class = "nan"

    def __init__(self, iteration: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at iteration {iteration}")
        self.iteration = iteration
        self.loss = loss


class TrialKilled(RuntimeError):
    """The process received SIGTERM while training (see :func:`sigterm_as_exception`)."""

    failure_class = "killed"


def classify_failure(exc: BaseException) -> str:
    """Map an exception to one of :data:`FAILURE_CLASSES`, looking through ``__cause__``/``__context__``.

    ``KeyboardInterrupt``/``SystemExit``/:class:`TrialKilled` -> ``killed``; CUDA or host out-of-memory
    (``torch.cuda.OutOfMemoryError``, ``MemoryError``, a RuntimeError saying "out of memory") -> ``oom``;
    anything with a ``failure_class`` attribute (e.g. :class:`TrainingDiverged`) -> that value;
    a :class:`~ddsm.config.ConfigError` (bad value, file or checkpoint) -> ``config``; everything else -> ``error``.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (KeyboardInterrupt, SystemExit, TrialKilled)):
            return "killed"
        if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
            return "oom"
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            return "oom"
        cls = getattr(e, "failure_class", None)
        if cls in FAILURE_CLASSES:
            return cls
        if isinstance(e, ConfigError):
            return "config"
        e = e.__cause__ or e.__context__
    return "error"


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`TrialKilled` (so the run is recorded as ``killed``).

    Only installed from the main thread and only over the default handler, so a host process
    (Ray, a scheduler) that handles SIGTERM itself keeps doing so.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise TrialKilled("received SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
