"""harness.session: the default MLflow store is built while Ray starts, and nothing lands in --out early."""
from __future__ import annotations

from pathlib import Path

from harness.mlflow_io import artifact_uri
from harness.session import open_recorder, store_while_ray_starts


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
