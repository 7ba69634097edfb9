"""Why a trial stopped: the failure classes the harness records, and how a training stops on a signal.

The classes (:data:`FAILURE_CLASSES`, the one vocabulary; spec ``retry_on`` lists some of them):
``oom`` out of memory, ``nan`` the loss diverged, ``config`` a :class:`ddsm.config.ConfigError` raised
inside a trial (a value, file or checkpoint the driver could not check: deterministic, so the harness
never retries it, :data:`NEVER_RETRIED`), ``error`` anything else raised by the trial, ``killed`` the
trial's process was stopped or died (signal, crashed worker, cancelled), and ``node_lost`` the machine
(Ray node) running it went away. The order is the order of precedence when the ranks of one
distributed trial report different classes (the root cause first).
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ddsm.config import ConfigError

__all__ = ["FAILURE_CLASSES", "NEVER_RETRIED", "GracefulStop", "TrainingDiverged", "TrialKilled",
           "classify_failure", "graceful_stop"]

FAILURE_CLASSES = ("oom", "nan", "config", "error", "killed", "node_lost")
NEVER_RETRIED = ("config",)  # the same attempt fails the same way


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``iteration`` is the 1-based update at which it happened."""

    failure_class = "nan"

    def __init__(self, iteration: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at iteration {iteration}")
        self.iteration = iteration
        self.loss = loss


class TrialKilled(RuntimeError):
    """The process received SIGTERM/SIGINT while training (see :func:`graceful_stop`)."""

    failure_class = "killed"


def classify_failure(exc: BaseException) -> str:
    """Map an exception to one of :data:`FAILURE_CLASSES`, looking through ``__cause__``/``__context__``.

    ``KeyboardInterrupt``/``SystemExit``/:class:`TrialKilled` -> ``killed``; CUDA or host out-of-memory
    (``torch.cuda.OutOfMemoryError``, ``MemoryError``, a RuntimeError saying "out of memory") -> ``oom``;
    anything with a ``failure_class`` attribute (e.g. :class:`TrainingDiverged`) -> that value;
    a :class:`~ddsm.config.ConfigError` (bad value, file or checkpoint) -> ``config``; everything else -> ``error``.
    """
    torch = sys.modules.get("torch")  # a torch exception exists only where torch is imported (the driver: not)
    oom = (MemoryError, torch.cuda.OutOfMemoryError) if torch is not None else (MemoryError,)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (KeyboardInterrupt, SystemExit, TrialKilled)):
            return "killed"
        if isinstance(e, oom):
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


class GracefulStop:
    """What :func:`graceful_stop` yields: ``requested`` is the first signal received (None: keep going)."""

    def __init__(self) -> None:
        self.requested: int | None = None

    def __bool__(self) -> bool:
        return self.requested is not None


@contextmanager
def graceful_stop(*, graceful: bool = True) -> Iterator[GracefulStop]:
    """Within the block, the first SIGTERM or SIGINT only asks to stop (the training loop checkpoints at
    the end of its current step and raises :class:`TrialKilled`); a second one raises TrialKilled at once,
    and so does the first when not ``graceful`` (a distributed run, whose ranks must stop together).

    Ray's ``ray.cancel(force=False)`` arrives as SIGINT, a scheduler's preemption as SIGTERM. Installed
    from the main thread only, and only over Python's default handlers, so a host process that handles
    a signal itself (Ray's SIGTERM handler in its workers) keeps doing so.
    """
    stop = GracefulStop()
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    mine = [s for s, default in defaults.items() if signal.getsignal(s) == default]

    def handler(signum: int, frame: object) -> None:
        if stop or not graceful:
            raise TrialKilled(f"received {signal.Signals(signum).name}" + (" twice" if stop else ""))
        stop.requested = signum

    for s in mine:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s in mine:
            signal.signal(s, defaults[s])
