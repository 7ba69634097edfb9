"""harness.lock: one driver per --out (run and tune), stale holders, and --out values that cannot be a folder.

The holder is a real second process; the second driver is the CLI itself, which must exit 2 before it
connects to Ray or writes anything.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.lock import LOCK_FILE, Holder, OutDirLock, OutDirLocked, read_holder

HOLD = """
import sys, time
from harness.lock import OutDirLock
with OutDirLock(sys.argv[1], command="ddsm-bench run other.yaml"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path: Path, repo_root: Path):
    """A live process holding ``tmp_path / "out"``."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=repo_root, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", ["run", "tune"])
def test_a_second_driver_exits_2_at_once_naming_the_holder(holder, tmp_path: Path, capsys, write_spec, tiny_study,
                                                            command: str):
    import yaml

    out, proc = holder
    if command == "run":
        spec = write_spec(tmp_path / "grid.yaml")
    else:
        spec = tmp_path / "study.yaml"
        spec.write_text(yaml.safe_dump(tiny_study()))
    before = sorted(p.name for p in out.iterdir())
    tic = time.monotonic()
    assert main([command, str(spec), "--out", str(out)]) == 2
    assert time.monotonic() - tic < 15  # before Ray or MLflow are touched
    err = capsys.readouterr().err
    assert f"pid {proc.pid} on host {socket.gethostname()}" in err and "ddsm-bench run other.yaml" in err, err
    assert "is in use by" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written


def test_the_lock_dies_with_its_holder_and_a_stale_file_is_taken_over(holder, tmp_path: Path):
    out, proc = holder
    with pytest.raises(OutDirLocked):
        OutDirLock(out, command="me").acquire()
    proc.send_signal(signal.SIGKILL)  # no clean-up at all: the kernel releases the flock
    proc.wait()
    assert read_holder(out).pid == proc.pid  # the file still names it...
    with OutDirLock(out, command="me") as lock:  # ...but it is gone
        assert lock.took_over.pid == proc.pid
        assert read_holder(out).pid == os.getpid()
    assert read_holder(out) is None  # released: the file is emptied


def test_a_holder_on_another_host_counts_while_its_heartbeat_is_fresh(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    fresh = Holder(host="node-7", pid=1234, started=time.time() - 60, command="ddsm-bench tune x.yaml",
                   heartbeat=time.time() - 5)
    (out / LOCK_FILE).write_text(json.dumps(fresh.__dict__))
    with pytest.raises(OutDirLocked, match=r"ddsm-bench tune x\.yaml \(pid 1234 on host node-7, since .*last seen 5 s"):
        OutDirLock(out, command="me").acquire()
    stale = {**fresh.__dict__, "heartbeat": time.time() - 3600}
    (out / LOCK_FILE).write_text(json.dumps(stale))
    with OutDirLock(out, command="me") as lock:
        assert lock.took_over.host == "node-7"


def test_the_heartbeat_is_refreshed(tmp_path: Path):
    with OutDirLock(tmp_path, command="me", heartbeat_s=0.05):
        first = read_holder(tmp_path).heartbeat
        time.sleep(0.3)
        assert read_holder(tmp_path).heartbeat > first


@pytest.mark.parametrize("case", ["file", "under a file", "read-only"])
def test_an_out_that_cannot_be_a_folder_exits_2_with_one_line(tmp_path: Path, capsys, write_spec, monkeypatch,
                                                               case: str):
    spec = write_spec(tmp_path / "grid.yaml")
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under a file": tmp_path / "afile" / "out", "read-only": tmp_path / "ro"}[case]
    if case == "read-only":
        import errno

        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):  # what a read-only mount answers (root ignores file modes)
            if self == out:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["run", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    expected = {"file": "is a file: expected a folder", "under a file": f"{tmp_path / 'afile'} is a file, not a folder",
                "read-only": "is on a read-only filesystem"}[case]
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
