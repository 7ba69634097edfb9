"""One driver per out dir: the lock a ``ddsm-bench run`` or ``tune`` holds on its ``--out`` while it runs.

Two drivers on one ``--out`` would train the same cells at once, race on their checkpoints and share
or duplicate tracking runs. :class:`OutDirLock` takes ``<out>/.ddsm-bench.lock`` before anything is
launched: an exclusive ``flock`` held for the driver's lifetime (released by the kernel however the
driver dies, so a killed driver never leaves a lock behind on one host), and in the file the holder
(host, pid, start time, command) with a heartbeat rewritten every :data:`HEARTBEAT_S`. The file
covers what flock does not: a driver on another host of a filesystem without shared locks is a
holder while its heartbeat is fresh; one whose heartbeat is older than :data:`STALE_S` (or whose
pid is gone, on this host) is stale and taken over, saying so. A second driver exits 2 at once
naming the holder (:class:`OutDirLocked`).

:func:`prepare_out` turns a ``--out`` that cannot be a folder (a file, a path under a file, a
read-only filesystem, no permission) into one readable line before anything is written.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ddsm.config import ConfigError

__all__ = ["HEARTBEAT_S", "LOCK_FILE", "STALE_S", "Holder", "OutDirLock", "OutDirLocked", "pid_alive", "prepare_out",
           "read_holder"]

LOCK_FILE = ".ddsm-bench.lock"
HEARTBEAT_S = 30.0  # how often the holder rewrites its heartbeat
STALE_S = 120.0  # a holder on another host whose heartbeat is older than this is gone


class OutDirLocked(ConfigError):
    """``--out`` is held by another live driver (exit code 2)."""


@dataclass
class Holder:
    """Who holds an out dir (the content of the lock file)."""

    host: str
    pid: int
    started: float  # unix time the holder took the lock
    command: str  # e.g. "ddsm-bench run ablations/quickstart.yaml"
    heartbeat: float  # unix time of the holder's latest heartbeat

    def describe(self, now: float | None = None) -> str:
        """``ddsm-bench run x.yaml (pid 123 on host h, since 2026-01-01 10:00:00, last seen 5 s ago)``."""
        now = time.time() if now is None else now
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"{self.command} (pid {self.pid} on host {self.host}, since {since}, "
                f"last seen {max(0.0, now - self.heartbeat):.0f} s ago)")

    def stale(self, now: float | None = None) -> bool:
        """Gone: its process is not alive (this host), or its heartbeat is older than :data:`STALE_S`."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname():
            return not pid_alive(self.pid)
        return now - self.heartbeat > STALE_S


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_holder(out: str | Path) -> Holder | None:
    """The holder written in ``<out>/.ddsm-bench.lock``, or None (no file, empty: released, or unreadable)."""
    try:
        text = (Path(out) / LOCK_FILE).read_text()
        return Holder(**json.loads(text)) if text.strip() else None
    except (OSError, ValueError, TypeError):
        return None


def prepare_out(out: str | Path) -> Path:
    """Create ``out`` (and its parents); raise ConfigError (exit 2) naming the path when it cannot be a
    writable folder: a file, a path under a file, a read-only filesystem, no permission."""
    path = Path(out).resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file: expected a folder (or a path where one can be created)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {str(out)!r} cannot be used: {_why(path, e)}") from None
    return path


def _why(path: Path, e: OSError) -> str:
    if isinstance(e, (NotADirectoryError, FileExistsError)) or e.errno in (errno.ENOTDIR, errno.EEXIST):
        parent = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        return f"{parent or path} is a file, not a folder"
    if e.errno == errno.EROFS:
        return "it is on a read-only filesystem"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (cannot create files there)"
    if e.errno == errno.ENOSPC:
        return "no space left on its filesystem"
    return f"{e.strerror or e}"


class OutDirLock:
    """The lock of one out dir (see the module docstring); a context manager."""

    def __init__(self, out: str | Path, *, command: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        """Args:
        out: the out dir (created if needed, see :func:`prepare_out`).
        command: what holds it, shown to a second driver (e.g. ``ddsm-bench run x.yaml``).
        heartbeat_s: how often the heartbeat is rewritten.
        """
        self.out, self.command, self.heartbeat_s = Path(out), command, heartbeat_s
        self.path = self.out / LOCK_FILE
        self.took_over: Holder | None = None  # the stale holder replaced, if any (say so to the user)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._holder: Holder | None = None

    def acquire(self) -> OutDirLock:
        """Take the lock or raise :class:`OutDirLocked` naming the holder (ConfigError for a bad ``--out``)."""
        prepare_out(self.out)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--out {str(self.out)!r} cannot be used: {_why(self.out, e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shared_locks = True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise self._locked(read_holder(self.out)) from None
            shared_locks = False  # a filesystem without flock (ENOLCK, EOPNOTSUPP): the file alone decides
        holder = read_holder(self.out)
        if holder is not None and not (shared_locks and holder.host == socket.gethostname()):
            if not holder.stale():
                os.close(fd)
                raise self._locked(holder)
        if holder is not None:
            self.took_over = holder  # flock was free: its holder died without releasing the file
        self._fd = fd
        now = time.time()
        self._holder = Holder(host=socket.gethostname(), pid=os.getpid(), started=now, command=self.command,
                              heartbeat=now)
        self._write()
        self._thread = threading.Thread(target=self._beat, name="ddsm-bench-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Empty the lock file and let go (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> OutDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _locked(self, holder: Holder | None) -> OutDirLocked:
        who = holder.describe() if holder else "another driver (its details could not be read)"
        return OutDirLocked(f"--out {str(self.out)!r} is in use by {who}: wait for it to end or stop it, "
                            "or use another --out")

    def _write(self) -> None:
        data = json.dumps(asdict(self._holder)).encode()
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, data)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._holder.heartbeat = time.time()
                self._write()
            except (OSError, TypeError):  # the folder went away or was released meanwhile: nothing to keep alive
                return
