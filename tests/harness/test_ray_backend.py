"""harness.ray_backend on the session's Ray instance: the checks made before anything is launched."""
from __future__ import annotations

from pathlib import Path

import pytest


def test_shared_storage_check_names_nodes_that_cannot_read_the_marker(ray_address: str, tmp_path: Path,
                                                                         monkeypatch):
    import ray

    from ddsm.config import ConfigError
    from harness import ray_backend

    node = next(n for n in ray.nodes() if n["Alive"])
    twin = {**node, "NodeManagerAddress": "10.0.0.2"}  # a second node that runs on the same machine
    monkeypatch.setattr(ray, "nodes", lambda: [node, twin])
    ray_backend.check_shared_storage(tmp_path / "shared")  # both read the marker: passes
    assert not list((tmp_path / "shared").glob(".storage-check-*"))  # and it cleans up

    class Blind:  # stands in for the remote reader on a node with its own local disk
        def options(self, **kwargs):
            return self

        def remote(self, path: str):
            return ray.put(None)

    monkeypatch.setattr(ray_backend, "_read_marker", Blind())
    with pytest.raises(ConfigError, match=r"is not shared: node\(s\) .*10\.0\.0\.2 cannot read it"):
        ray_backend.check_shared_storage(tmp_path / "local")
