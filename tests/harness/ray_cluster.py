"""A multi-node Ray cluster on this machine for fault tests, owned by a helper process the test controls.

``LocalCluster(workers=2)`` starts ``python -m tests.harness.ray_cluster`` which builds a
``ray.cluster_utils.Cluster`` (a head without CPUs, so trials land on the worker nodes, plus
``workers`` one-CPU nodes) in a private ``RAY_TMPDIR``, so that no other Ray user of this machine sees
it (``address="auto"`` never finds it). The test drives ``ddsm-bench`` against ``cluster.address`` and
kills parts of it: :meth:`LocalCluster.remove` (a worker node dies with what runs on it),
:meth:`LocalCluster.kill_head` (the head node goes, GCS and all). Only processes this helper started
are ever stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class LocalCluster:
    """The parent side: start, address, worker node ids, remove a node, kill the head, close."""

    def __init__(self, *, workers: int = 2, head_cpus: int = 0, timeout: float = 300,
                 auth_mode: str | None = None) -> None:
        """``auth_mode``: the cluster's ``RAY_AUTH_MODE`` (``token``, ``disabled``; None: as this process has it).
        ``env`` is what a driver of this cluster runs with (its RAY_TMPDIR; the auth mode is not passed on)."""
        self.tmpdir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.env = {**os.environ, "RAY_TMPDIR": self.tmpdir, "OMP_NUM_THREADS": "1"}
        helper_env = {**self.env, **({"RAY_AUTH_MODE": auth_mode} if auth_mode else {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.harness.ray_cluster", str(workers), str(head_cpus)],
                                     cwd=ROOT, env=helper_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        info = self._answer(timeout)
        self.address, self.head, self.workers = info["address"], info["head"], info["workers"]

    def remove(self, node_id: str) -> None:
        """Kill a worker node's processes (raylet, object store, its workers) at once."""
        self._ask(f"remove {node_id}")

    def kill_head(self) -> None:
        """Kill the head node's processes (GCS, raylet, ...) at once."""
        self._ask("kill_head")

    def close(self) -> None:
        """Stop every node this helper started."""
        if self.proc.poll() is None:
            try:
                self._ask("quit", timeout=60)
            except Exception:  # noqa: BLE001 - then by force: it is our own child
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, line: str, timeout: float = 120) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def _answer(self, timeout: float) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the Ray cluster helper did not answer within {timeout:.0f} s")
        return json.loads(line)


def _serve(workers: int, head_cpus: int) -> None:
    """The helper process: build the cluster, print its address, obey commands on stdin."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    nodes = {}
    for _ in range(workers):
        node = cluster.add_node(num_cpus=1)
        nodes[node.node_id] = node
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id, "workers": list(nodes)}),
          flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "remove":
            cluster.remove_node(nodes.pop(args[0]), allow_graceful=False)
        elif cmd == "kill_head":
            cluster.head_node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
        print(json.dumps({"done": cmd}), flush=True)
        if cmd == "quit":
            break
    for node in list(nodes.values()):
        cluster.remove_node(node, allow_graceful=False)
    if cluster.head_node is not None:
        cluster.head_node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
