"""harness.mlflow_io: store URIs, pagination, and the recorder contract (the fake used by the driver tests
must behave like the MLflow one)."""
from __future__ import annotations

from pathlib import Path

import pytest

from ddsm.config import ConfigError
from harness.mlflow_io import MlflowRecorder, iter_runs, reader_uri, store_uri
from tests.harness.fakes import MemoryRecorder


def test_pagination_follows_tokens_past_1000():
    class Page(list):
        token = None

    class FakeClient:
        calls: list = []

        def search_runs(self, experiment_ids, filter_string="", max_results=1000, order_by=None, page_token=None):
            start = int(page_token or 0)
            self.calls.append(max_results)
            page = Page(range(start, min(start + max_results, 2500)))
            page.token = str(start + max_results) if start + max_results < 2500 else None
            return page

    client = FakeClient()
    assert list(iter_runs(client, ["1"])) == list(range(2500))
    assert client.calls == [1000, 1000, 1000]


def test_one_rule_for_the_store_of_writer_and_reader(tmp_path: Path, monkeypatch):
    grid = tmp_path / "grid"
    assert store_uri(None, folder=grid) == f"sqlite:///{grid.resolve() / 'mlflow.db'}"  # what a grid writes
    assert store_uri("http://mlflow:5000", folder=grid) == "http://mlflow:5000"
    assert store_uri(str(tmp_path / "x.db"), folder=grid) == f"sqlite:///{(tmp_path / 'x.db').resolve()}"
    with pytest.raises(ConfigError, match="does not exist"):  # readers never create an empty store
        store_uri(str(tmp_path / "x.db"), folder=grid, must_exist=True)
    grid.mkdir()
    (grid / "mlflow.db").touch()
    assert reader_uri(str(grid)) == f"sqlite:///{(grid / 'mlflow.db').resolve()}"  # a grid's --out reads as its store
    monkeypatch.chdir(grid)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert reader_uri(None) == f"sqlite:///{(grid / 'mlflow.db').resolve()}"  # ./mlflow.db


@pytest.fixture(params=["memory", "mlflow"])
def recorder(request, tmp_path: Path):
    if request.param == "memory":
        return MemoryRecorder()
    return MlflowRecorder(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="contract",
                          artifact_root=tmp_path / "mlartifacts")


def test_recorder_contract(recorder, tmp_path: Path):
    parent = recorder.start_parent(key="g1", name="grid", tags={"spec": "s.yaml"}, params={"seeds": [0, 1]})
    assert recorder.start_parent(key="g1", name="grid", tags={}, params={}) == parent  # reopened by key
    a = recorder.start_run(name="a", parent_id=parent, cell_hash="h1", params={"x": 1}, tags={"seed": 0})
    recorder.end_run(a, status="KILLED")
    b = recorder.start_run(name="b", parent_id=parent, cell_hash="h2", params={}, tags={})
    recorder.log_metrics(b, {"miou": 0.25}, step=1)
    recorder.log_metrics(b, {"miou": 0.5, "loss": float("nan")}, step=2)
    (tmp_path / "f.txt").write_text("x")
    recorder.end_run(b, status="FINISHED", tags={"status": "finished"},
                     artifacts=[(tmp_path / "f.txt", None), (tmp_path / "absent.txt", None)])
    assert recorder.final_metrics(b)["miou"] == 0.5  # the latest step, flushed by end_run
    runs = recorder.cell_runs()
    assert {h: r.status for h, r in runs.items()} == {"h1": "KILLED", "h2": "FINISHED"}
    again = recorder.start_run(name="a", parent_id=parent, cell_hash="h1", params={}, tags={}, reuse=a)
    assert again == a and recorder.cell_runs()["h1"].status == "RUNNING"  # reopened, not duplicated
    c = recorder.start_run(name="c", parent_id=parent, cell_hash="h2", params={}, tags={})  # a later try
    recorder.end_run(c, status="FAILED")
    assert recorder.cell_runs()["h2"].run_id == b  # a FINISHED run wins over later ones
    with pytest.raises((ValueError, AssertionError)):
        recorder.end_run(c, status="DONE")


def test_run_artifacts_read_in_place_from_a_local_store_and_through_the_client_otherwise(tmp_path: Path):
    from mlflow import MlflowClient

    from harness.mlflow_io import RunArtifacts

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("a", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    src = tmp_path / "src"
    (src / "views").mkdir(parents=True)
    (src / "metrics.json").write_text('{"miou": 0.5}')
    (src / "views" / "index.json").write_text("[]")
    client.log_artifacts(run.info.run_id, str(src))
    rid = run.info.run_id
    local = RunArtifacts(client, dest=tmp_path / "dl", artifact_uris={rid: run.info.artifact_uri})
    remote = RunArtifacts(client, dest=tmp_path / "dl")  # no location known: through the client
    for files in (local, remote):
        assert files.names(rid) == {"metrics.json", "views"}
        assert files.names(rid, "views") == {"views/index.json"}
        assert files.path(rid, "metrics.json").read_text() == '{"miou": 0.5}'
        assert (files.path(rid, "views") / "index.json").is_file()
        if files is local:
            assert not (tmp_path / "dl").exists()  # read in place: nothing copied
    assert local.path(rid, "metrics.json").parent == Path(run.info.artifact_uri.removeprefix("file://"))
    assert remote.path(rid, "metrics.json").is_relative_to(tmp_path / "dl")
    assert RunArtifacts(client, dest=tmp_path, artifact_uris={"x": "s3://bucket/1/x/artifacts"})._roots == {"x": None}
