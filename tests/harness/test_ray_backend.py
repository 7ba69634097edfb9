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
    with pytest.raises(ConfigError, match=r"is not shared: node\(s\) .*\(10\.0\.0\.2\) cannot read it"):
        ray_backend.check_shared_storage(tmp_path / "local")


def test_shared_storage_is_checked_on_every_node_of_one_host(ray_address: str, tmp_path: Path, monkeypatch):
    """Issue 14 case 6: two Ray nodes on one host and IP, ``--out`` hidden from one of them (a separate mount
    namespace): the probe is keyed by node id, so the blind node is found (one probe per IP passed it)."""
    import ray

    from ddsm.config import ConfigError
    from harness import ray_backend

    node = next(n for n in ray.nodes() if n["Alive"])
    twin = {**node, "NodeID": node["NodeID"][::-1]}  # same host and IP, another raylet
    monkeypatch.setattr(ray, "nodes", lambda: [node, twin])
    real = ray_backend._read_marker
    probed: list[str] = []

    class PerNode:  # the twin's filesystem does not have --out; the real node reads the marker for real
        def options(self, *, scheduling_strategy):
            probed.append(scheduling_strategy.node_id)
            blind = scheduling_strategy.node_id == twin["NodeID"]
            return type("Reader", (), {"remote": staticmethod(
                (lambda path: ray.put(None)) if blind else real.options(scheduling_strategy=scheduling_strategy).remote)})

    monkeypatch.setattr(ray_backend, "_read_marker", PerNode())
    blind = rf"is not shared: node\(s\) {twin['NodeID'][:12]} \({node['NodeManagerAddress']}\) cannot"
    with pytest.raises(ConfigError, match=blind):
        ray_backend.check_shared_storage(tmp_path / "out")
    assert sorted(probed) == sorted([node["NodeID"], twin["NodeID"]])


def _events_within(launcher, timeout_s: float) -> list:
    """The launcher's events, polled until some come (events() never waits) or ``timeout_s`` passes."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (got := launcher.events()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_an_ended_attempt_is_caught_up_only_after_all_its_events(ray_address: str, tmp_path):
    """events() never waits (a background thread drains the queue), so a trial's last events may come after its
    task ended; caught_up() must hold until they did: 30 train events, eval and end of each of 4 reused-worker
    trivial trials all arrive, in order, before caught_up is True."""
    import time

    from benchmarks.bench_scale import scale_spec, trivial_train
    from ddsm.config import to_dict
    from harness.cells import expand
    from harness.driver import TrialPayload
    from harness.ray_backend import ClusterWatch, RayLauncher
    from harness.spec import Resources, parse_spec

    cells = expand(parse_spec(scale_spec(4, steps=30)))
    launcher = RayLauncher(Resources(), train_fn=trivial_train, fresh_workers=False, watch=ClusterWatch(None))
    try:
        handles = {launcher.submit(TrialPayload(key=c.hash, cell_hash=c.hash, name=c.name, config=to_dict(c.config),
                                                cell_dir=str(tmp_path / c.hash), attempt=1)): c.hash for c in cells}
        got: dict[str, list[str]] = {k: [] for k in handles.values()}
        running, settled, deadline = set(handles), {}, time.monotonic() + 120
        while len(settled) < len(handles) and time.monotonic() < deadline:
            running -= set(launcher.wait(list(running), timeout=0.5) if running else [])
            for e in launcher.events():
                got[e.key].append(f"{e.kind}{e.step}")
            for h in set(handles) - running - set(settled):
                if launcher.caught_up(h):
                    settled[h] = list(got[handles[h]])
        want = ["start0", *(f"train{s}" for s in range(1, 31)), "eval30", "end0"]
        assert set(settled) == set(handles) and all(v == want for v in settled.values()), [v[-3:] for v in settled.values()]
        assert all(launcher.outcome(h).finished for h in handles)
    finally:
        launcher.close()


def test_a_killed_event_queue_restarts_and_is_not_a_lost_cluster(ray_address: str):
    """Ray's memory monitor may kill the queue's actor on a host short of memory: the launcher must not
    call that a lost cluster (exit 4); the actor restarts and later events arrive."""
    import time

    import ray

    from harness.driver import Event
    from harness.ray_backend import ClusterWatch, RayLauncher
    from harness.spec import Resources

    launcher = RayLauncher(Resources(), watch=ClusterWatch(None))
    try:
        launcher.queue.put(Event(key="a", attempt=1, kind="train", step=1, metrics={}, time=0.0, info={}))
        assert [e.key for e in _events_within(launcher, 30)] == ["a"]
        ray.kill(launcher.queue.actor, no_restart=False)  # the actor's process dies; Ray restarts it
        got: list = []
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:  # a put the old actor took before it died is lost with it
            launcher.queue.put(Event(key="b", attempt=1, kind="train", step=2, metrics={}, time=0.0, info={}))
            got = launcher.events()
            assert launcher.lost() is None
            time.sleep(0.2)
        assert got and {e.key for e in got} == {"b"}
    finally:
        launcher.close()


_JOIN = """
import sys
import ray
from harness import ray_backend
from harness.driver import Event
ray_backend.connect(sys.argv[1])
queue = ray_backend.EventQueue(ray.get_runtime_context().get_node_id())

@ray.remote(num_cpus=1)
def trial(q):
    q.put(Event(key="k", attempt=1, kind="start", step=0))

ray.get(trial.remote(queue), timeout=120)
print("events", [e.key for e in ray.get(queue.actor.drain.remote(), timeout=60)])
"""


@pytest.mark.parametrize("cluster_mode", ["disabled", "token"])
def test_joining_with_a_token_at_hand_matches_the_clusters_auth_mode(cluster_mode: str, monkeypatch):
    """A token in ~/.ray/auth_token (or RAY_AUTH_TOKEN) must not put the driver in token mode on a cluster
    without authentication: Ray then connects, but every actor it creates dies unscheduled (the driver's
    event queue, so every trial failed). On a token cluster the driver turns token mode on and joins."""
    import os
    import subprocess
    import sys

    from tests.harness.ray_cluster import ROOT, LocalCluster

    if not (Path.home() / ".ray" / "auth_token").is_file():  # the cluster and the driver share this token
        monkeypatch.setenv("RAY_AUTH_TOKEN", "ddsm-bench-test-token-0123456789abcdef")
    with LocalCluster(workers=1, auth_mode=cluster_mode) as cluster:
        env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
        done = subprocess.run([sys.executable, "-c", _JOIN, cluster.address], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=240)
    assert done.returncode == 0 and "events ['k']" in done.stdout, (done.stdout + done.stderr)[-3000:]


def test_a_fresh_worker_trial_starts_on_the_process_warmed_while_the_trial_before_it_ran(ray_address: str,
                                                                                          tmp_path: Path):
    """prepare(queued): once a fresh-worker trial has started and attempts wait, a zero-CPU warm-up loads the
    trial imports in another process; the next trial runs in that process (its pid), not in a cold one. With
    nothing waiting, a start warms nothing."""
    import json

    import ray

    from benchmarks.bench_scale import scale_spec, trivial_train
    from ddsm.config import to_dict
    from harness.cells import expand
    from harness.driver import TrialPayload
    from harness.ray_backend import ClusterWatch, RayLauncher
    from harness.spec import Resources, parse_spec

    payloads = [TrialPayload(key=c.hash, cell_hash=c.hash, name=c.name, config=to_dict(c.config),
                             cell_dir=str(tmp_path / c.hash), attempt=1)
                for c in expand(parse_spec(scale_spec(2, steps=10)))]
    launcher = RayLauncher(Resources(), train_fn=trivial_train, watch=ClusterWatch(None))  # fresh workers

    def started(key: str) -> None:
        """Read events until ``key``'s start event (or fail after 120 s: events() never waits)."""
        import time

        deadline = time.monotonic() + 120
        while not any(e.kind == "start" and e.key == key for e in _events_within(launcher, 5)):
            assert time.monotonic() < deadline, f"no start event of {key} within 120 s"

    try:
        assert launcher.prewarm
        launcher.prepare(1)
        first = launcher.submit(payloads[0])
        started(payloads[0].key)
        assert len(launcher.warming) == 1  # one warm-up for the one waiting attempt
        warm_pid = ray.get(launcher.warming[0], timeout=120)
        assert launcher.outcome(first, timeout=120).finished
        launcher.prepare(0)
        second = launcher.submit(payloads[1])
        started(payloads[1].key)
        assert launcher.outcome(second, timeout=120).finished
        assert len(launcher.warming) == 1  # nothing waits: no second warm-up
        pids = [json.loads((Path(p.cell_dir) / "trivial.json").read_text())["pid"] for p in payloads]
        assert pids[1] == warm_pid != pids[0]
    finally:
        launcher.close()


def test_the_warm_up_loads_the_trial_imports_and_touches_no_device():
    """What a warmed process has when a trial gets it: the engine, models, data and metrics modules loaded,
    CUDA neither initialised nor asked for its devices (the trial's CUDA_VISIBLE_DEVICES decides)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "asked = []\n"  # a device query latches CUDA_VISIBLE_DEVICES for the process: the trial's must count
            "for owner, name in ((torch._C, '_cuda_getDeviceCount'), (torch.cuda, 'is_available'),\n"
            "                    (torch.cuda, 'device_count')):\n"
            "    setattr(owner, name, lambda *a, _n=name, _f=getattr(owner, name), **k: asked.append(_n) or _f(*a, **k))\n"
            "from harness.ray_backend import TRIAL_IMPORTS, _warm_up\n"
            "assert not any(m in sys.modules for m in ('torchvision', 'scipy'))\n"
            "_warm_up()\n"
            "assert all(m in sys.modules for m in (*TRIAL_IMPORTS, 'torchvision', 'scipy')), TRIAL_IMPORTS\n"
            "assert not torch.cuda.is_initialized() and torch.cuda._cached_device_count is None\n"
            "assert not asked, asked\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
