"""PostgreSQL as MLflow's tracking store and Optuna's storage, against a real server this module starts.

PostgreSQL 15 (Debian's ``postgresql`` package, binaries in /usr/lib/postgresql/15/bin) runs as the
``postgres`` user (it refuses root) on a free port of 127.0.0.1 with a temporary data folder and
password authentication; skipped where it is not installed. ``postgresql://`` URLs use psycopg 3 (the
``[cluster]`` extra).
"""
from __future__ import annotations

import io
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from ddsm.config import ConfigError
from harness.preflight import check_tracking_uri

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "pgS3cretWord"
pytestmark = pytest.mark.skipif(not (PG_BIN / "initdb").is_file() or shutil.which("runuser") is None,
                                reason="PostgreSQL 15 is not installed (apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """``postgresql://ddsm:<PASSWORD>@127.0.0.1:<port>/`` (append a database: mlflow, optuna); stopped at the end."""
    pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="ddsm-pg-"))
    root.chmod(0o755)
    data, pwfile = root / "data", root / "pw"
    pwfile.write_text(PASSWORD)
    shutil.chown(root, "postgres")
    shutil.chown(pwfile, "postgres")
    port = _free_port()

    def as_postgres(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, timeout=120,
                              check=True, cwd=root)

    as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "ddsm", f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
                "--auth-local=trust")
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        for db in ("mlflow", "optuna", "grid"):
            as_postgres(str(PG_BIN.parent / "bin" / "createdb") if (PG_BIN / "createdb").is_file() else "createdb",
                        "-h", str(root), "-p", str(port), "-U", "ddsm", db)
        yield f"postgresql://ddsm:{PASSWORD}@127.0.0.1:{port}"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_bad_password_and_missing_database_are_one_line(postgres: str):
    check_tracking_uri(f"{postgres}/mlflow")
    wrong = postgres.replace(PASSWORD, "nope-nope")
    with pytest.raises(ConfigError, match='password authentication failed for user "ddsm"') as e:
        check_tracking_uri(f"{wrong}/mlflow")
    assert "nope-nope" not in str(e.value) and PASSWORD not in str(e.value)
    with pytest.raises(ConfigError, match='database "absent" does not exist'):
        check_tracking_uri(f"{postgres}/absent")


def test_mlflow_and_optuna_on_postgresql_urls(postgres: str, tmp_path: Path):
    import optuna

    from harness.mlflow_io import MlflowRecorder

    rec = MlflowRecorder(tracking_uri=f"{postgres}/mlflow", experiment="pg", artifact_root=tmp_path / "art")
    parent = rec.start_parent(key="g", name="g", tags={}, params={"seeds": [0]})
    run = rec.start_run(name="c", parent_id=parent, cell_hash="h", params={"x": 1}, tags={})
    rec.log_metrics(run, {"miou": 0.5}, step=1)
    rec.end_run(run, status="FINISHED")
    assert rec.cell_runs()["h"].metrics == {"miou": 0.5}
    assert rec.artifact_location == (tmp_path / "art").resolve().as_uri()  # --artifact-location, not ./mlruns
    study = optuna.create_study(storage=f"{postgres}/optuna", study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(storage=f"{postgres}/optuna", study_name="s").trials) == 2


def test_no_password_reaches_any_output_of_a_grid_and_a_study(postgres: str, ray_address: str, tmp_path: Path,
                                                              capfd, write_spec, tiny_study):
    """Tracking and study storage on PostgreSQL with a password: the terminal, every file the grid and the study
    wrote (reports, provenance, logs, artifacts), and every MLflow param and tag (a dump of the database) are
    grepped for it."""
    from rich.console import Console

    from benchmarks.bench_scale import trivial_train
    from harness.grid import run_grid
    from harness.study import run_study

    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"  # the spec files hold the password: inputs
    inputs.mkdir()
    screen = io.StringIO()
    console = Console(file=screen, width=200)
    grid = run_grid(write_spec(inputs / "secret.yaml", seeds=[0, 1]), out_dir=outputs / "grid",
                    tracking_uri=f"{postgres}/grid", console=console, train_fn=trivial_train, fresh_workers=False)
    assert grid.exit_code == 0
    raw = tiny_study(n_trials=2, storage=f"{postgres}/optuna", pruning=False)
    (inputs / "tune.yaml").write_text(yaml.safe_dump(raw))
    study = run_study(inputs / "tune.yaml", out_dir=outputs / "study", tracking_uri=f"{postgres}/grid",
                      console=console, train_fn=trivial_train, fresh_workers=False)
    assert study.exit_code == 0
    captured = capfd.readouterr()
    printed = screen.getvalue() + captured.out + captured.err
    assert "ddsm:***@127.0.0.1" in printed  # the UI command is printed, redacted
    assert PASSWORD not in printed
    assert (outputs / "grid" / "report" / "report.md").is_file() and (outputs / "study" / "best.yaml").is_file()
    leaks = [str(p) for p in outputs.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert not leaks, leaks
    dump = subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN.parent / "bin" / "pg_dump")
                           if (PG_BIN / "pg_dump").is_file() else "pg_dump", f"{postgres}/grid"],
                          capture_output=True, text=True, timeout=120, check=True).stdout
    assert "kind" in dump and "cell_hash" in dump  # the runs are there
    assert PASSWORD not in dump  # no param or tag carries it
