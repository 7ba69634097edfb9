"""Fail fast at start (issue 14 case 4, issue 15): unreachable or misconfigured services exit 2 in seconds with
one line naming what was tried, never a password; Ray addresses and token auth resolved before ray.init."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddsm.config import ConfigError
from harness.mlflow_io import ui_hint
from harness.preflight import check_database, check_tcp, check_tracking_uri
from harness.secrets import redact


def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listened on, closed: nothing answers there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redact_hides_passwords_in_urls_and_text():
    assert redact("postgresql://u:secret@127.0.0.1:1/db") == "postgresql://u:***@127.0.0.1:1/db"
    assert redact("postgresql+psycopg://u:p@ss@h/db") == "postgresql+psycopg://u:***@h/db"  # an unescaped @
    assert redact("error: 'http://me:tok@mlflow:5000' refused") == "error: 'http://me:***@mlflow:5000' refused"
    assert redact("postgresql://h/db?user=u&password=secret&x=1") == "postgresql://h/db?user=u&password=***&x=1"
    assert redact("sqlite:////tmp/a.db http://mlflow:5000") == "sqlite:////tmp/a.db http://mlflow:5000"


def test_unreachable_services_are_one_line_errors_without_the_password():
    port = _closed_port()
    for uri, words in ((f"http://u:secret@127.0.0.1:{port}", "is not reachable"),
                       (f"postgresql://u:secret@127.0.0.1:{port}/db", "did not accept a connection"),
                       (f"postgresql+pg8000://u:secret@127.0.0.1:{port}/db", "driver is not installed")):
        tic = time.time()
        with pytest.raises(ConfigError) as e:
            check_tracking_uri(uri)
        assert time.time() - tic < 15
        text = str(e.value)
        assert words in text and f"127.0.0.1:{port}" in text and "secret" not in text and "\n" not in text, text
    with pytest.raises(ConfigError, match="Optuna storage .* did not accept"):
        check_database(f"postgresql://u:secret@127.0.0.1:{port}/db", what="Optuna storage (search.storage)")
    with pytest.raises(ConfigError, match=f"nothing answers at 127.0.0.1:{port}"):
        check_tcp("127.0.0.1", port, what="Ray cluster")
    check_tracking_uri("sqlite:////nonexistent/dir/mlflow.db")  # not a service: nothing to reach
    check_tracking_uri("./mlruns")


def test_where_to_look_for_each_kind_of_store():
    assert ui_hint("http://u:secret@mlflow:5000/", "7") == "http://mlflow:5000/#/experiments/7?viewStateShareKey=ddsmbench"
    hint = ui_hint("postgresql://u:secret@db/mlflow", "3")
    assert hint.startswith("mlflow ui --backend-store-uri postgresql://u:***@db/mlflow") and "secret" not in hint
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in ui_hint("sqlite:////x/mlflow.db", "1")


def test_ray_address_forms(monkeypatch, tmp_path: Path):
    from harness.ray_backend import resolve_address

    with pytest.raises(ConfigError, match=r"Ray Client \(ray://\) is not supported"):
        resolve_address("ray://head:10001")
    with pytest.raises(ConfigError, match="expected auto or HOST:PORT"):
        resolve_address("head")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` would have written ray/ray_current_cluster
    with pytest.raises(ConfigError, match="no Ray cluster was started with `ray start`"):
        resolve_address("auto")  # never another process's private ray.init() instance
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379")
    assert resolve_address("auto") == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6380")
    assert resolve_address("auto") == "10.9.9.9:6380"


def test_token_sources_in_order(monkeypatch, tmp_path: Path):
    from harness import ray_backend

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert ray_backend._token_source() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert ray_backend._token_source() == "~/.ray/auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))  # a path to nothing is no source
    assert ray_backend._token_source() == "~/.ray/auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert ray_backend._token_source() == "RAY_AUTH_TOKEN"
    assert "RAY_AUTH_MODE" not in os.environ  # finding a token never turns token mode on by itself


def test_cli_exits_2_fast_and_never_prints_the_password(tmp_path: Path, write_spec, repo_root):
    """The acceptance check: a database nobody serves, then a Ray head nobody runs, both before Ray starts."""
    spec = write_spec(tmp_path / "s.yaml")
    port = _closed_port()
    for extra, words in ((["--tracking-uri", f"postgresql://u:secret@127.0.0.1:{port}/db"], "did not accept"),
                         (["--address", f"127.0.0.1:{port}"], "nothing answers")):
        out = tmp_path / f"out{len(extra[0])}"
        tic = time.time()
        done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(spec), "--out", str(out), *extra],
                              cwd=repo_root, capture_output=True, text=True, timeout=120)
        assert time.time() - tic < 30, done.stderr
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and f"127.0.0.1:{port}" in lines[0], done.stderr
        assert "secret" not in done.stdout + done.stderr
        assert not out.exists()  # nothing written
