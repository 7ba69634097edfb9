"""harness.session: the default MLflow store is built while Ray starts, and nothing lands in --out early; the
report's imports load in the background."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.mlflow_io import REPORT_MODULE, artifact_uri
from harness.session import imports_in_background, open_recorder, store_while_ray_starts


def test_store_built_in_the_background_is_moved_into_out(tmp_path: Path):
    out = tmp_path / "out"
    with store_while_ray_starts(tracking_uri=None, out=out, experiment="e") as store:
        assert store is not None
        store._thread.join(120)
        assert not out.exists()  # built elsewhere: a failed cluster check leaves no --out
        out.mkdir()  # what harness.session.cluster does once its checks pass
        recorder = open_recorder(tracking_uri=None, out=out, experiment="e", prepared=store)
        tmp = store._tmp
    assert (out / "mlflow.db").is_file() and not tmp.exists()
    assert recorder.tracking_uri == f"sqlite:///{(out / 'mlflow.db').resolve()}"
    assert recorder.artifact_location == artifact_uri(out / "mlartifacts")  # the final place, not the temp one
    run = recorder.start_parent(key="k", name="grid", tags={}, params={})
    assert recorder.close(timeout_s=60)
    again = open_recorder(tracking_uri=None, out=out, experiment="e")  # the same store, reopened
    assert again.experiment_id == recorder.experiment_id and again.inner._client.get_run(run).info.run_id == run
    again.close(timeout_s=10)


def test_no_background_store_for_an_existing_store_or_another_uri(tmp_path: Path):
    (tmp_path / "mlflow.db").write_bytes(b"")
    with store_while_ray_starts(tracking_uri=None, out=tmp_path, experiment="e") as store:
        assert store is None
    with store_while_ray_starts(tracking_uri=f"sqlite:///{tmp_path / 'x.db'}", out=tmp_path / "o", experiment="e") as s:
        assert s is None


def test_imports_in_background_loads_the_module_and_waits_for_it(tmp_path, monkeypatch):
    (tmp_path / "slow_module_for_test.py").write_text("import time\ntime.sleep(0.3)\nLOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("slow_module_for_test", None)
    with imports_in_background("slow_module_for_test") as thread:
        assert thread.daemon
    assert not thread.is_alive()  # the block waited: the process never exits mid-import
    assert sys.modules["slow_module_for_test"].LOADED


def test_imports_in_background_leaves_a_failing_import_to_its_first_user():
    with imports_in_background("ddsm_no_such_module_for_test") as thread:
        pass
    assert not thread.is_alive() and "ddsm_no_such_module_for_test" not in sys.modules


def test_the_report_module_imports_alone():
    # what the grid preloads must be importable on its own (no import-order dependence on the driver)
    proc = subprocess.run([sys.executable, "-c", f"import importlib; importlib.import_module({REPORT_MODULE!r})"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
