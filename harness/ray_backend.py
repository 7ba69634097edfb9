"""The Ray adapter: the only module that imports ray.

- Cluster: :func:`connect` (start a local instance, or join one: ``auto``, reachability and token
  authentication checked first, exit 2 in seconds), :func:`shutdown`,
  :func:`check_resources` (exit 2 instead of waiting forever), :func:`default_concurrency`,
  :func:`check_shared_storage` (every node, by node id, must read the driver's out dir).
- Tasks: one trial is a ``max_calls=1`` task (a fresh worker process, so GPU memory is released
  when it exits) holding the trial's CPUs/GPUs, started on a process that imported torch and the
  engine while the trial before it trained (:meth:`RayLauncher.prepare`); with ``num_workers > 1``
  (or ``ddp: true``) it is a zero-CPU task that runs a Ray Train ``TorchTrainer`` of that many workers
  (DDP: gloo on CPU, NCCL on GPU). Every attempt records its :func:`placement` (node id, GPU ids/UUIDs, every DDP rank's).
- :class:`RayLauncher`: the :class:`harness.driver.Launcher` on Ray: submit, wait, events (an
  :class:`EventQueue`, pinned to the driver's node, that the workers' engine callbacks put on), outcome (Ray errors
  mapped to failure classes: a dead node is ``node_lost``), stop (``ray.cancel(force=False)``: the
  trial checkpoints after its current step), cancel, and lost: a :class:`ClusterWatch` probes the
  head's GCS port every second and calls the cluster lost after :data:`LOST_AFTER_S` of silence (Ray's
  own core worker would end the driver abruptly after 60 s without its GCS), as does a Ray call that
  fails because the connection is gone. On a lost cluster ``wait`` returns at once and the other calls
  are bounded (the driver still tries to let trials checkpoint, and to cancel them).
- :func:`run_isolated`: one task alone on its device (the grid's cost phase, :mod:`harness.cost`).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from ddsm.config import ConfigError
from harness.preflight import check_tcp
from harness.secrets import redact
from harness.driver import Event, TrialOutcome, TrialPayload, read_result
from harness.spec import Resources
from harness.worker import root_cause, run_trial

__all__ = ["ClusterWatch", "Connection", "EventQueue", "LOST_AFTER_S", "RayLauncher", "check_resources",
           "check_shared_storage", "connect", "default_concurrency", "failure_class", "placement", "resolve_address", "run_isolated",
           "shutdown"]

# Seconds without an answer from the head before the cluster counts as lost (must stay well under the 60 s
# after which Ray's core worker ends a driver that lost its GCS); DDSM_BENCH_CLUSTER_LOST_S overrides it.
LOST_AFTER_S = float(os.environ.get("DDSM_BENCH_CLUSTER_LOST_S", "15"))
DRAIN_EVERY_S = 0.05  # pause between two drains of the event queue (harness.ray_backend._Drainer)


# ============================================================================ the cluster


@dataclass(frozen=True)
class Connection:
    """What :func:`connect` did: started a local instance, joined a cluster, or reused an initialised Ray."""

    started: bool  # this call started or joined Ray (and :func:`shutdown` should end it)
    address: str  # the GCS address ("" for a reused instance)
    dashboard_url: str | None  # http://host:port of the Ray dashboard, when one runs
    joined: bool = False  # an existing cluster (not a local instance)


def connect(address: str | None, *, dashboard: bool = False, num_cpus: int | None = None,
            num_gpus: int | None = None) -> Connection:
    """Start a local Ray instance (address None) or join a cluster; raise ConfigError (exit 2) fast when
    the cluster cannot be joined.

    Joining, before ``ray.init`` (whose own retries take minutes, or forever): ``auto`` means the cluster
    of ``RAY_ADDRESS`` or of the last ``ray start`` on this machine, never another process's private
    ``ray.init()`` instance (Ray's legacy fallback); ``ray://`` (Ray Client) is refused with what to do
    instead; something must listen at HOST:PORT; token authentication is set up
    (:func:`_join_auth`) and checked against the cluster's GCS, so a missing or wrong token is one
    line instead of a ConnectionError after 20 s.

    Args:
        address: None (a local instance), ``auto``, or ``HOST:PORT`` of a cluster's GCS.
        dashboard: start the dashboard with a local instance (on 127.0.0.1); a joined cluster has its own.
        num_cpus, num_gpus: resources of a local instance (default: what the machine has; ``num_gpus``
            on a machine without GPUs makes fake ones, for placement tests).

    An already initialised Ray (e.g. a test session's) is reused and left running.
    """
    if ray.is_initialized():
        return Connection(started=False, address="", dashboard_url=None)
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # ray.init would join it anyway: with the same checks
    options = dict(log_to_driver=False, logging_level="WARNING", configure_logging=True)
    if address is None:
        with _entrypoint_redacted():
            context = ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", num_cpus=num_cpus,
                               num_gpus=num_gpus, **options)
        return Connection(started=True, address=ray.get_runtime_context().gcs_address,
                          dashboard_url=_dashboard_url(context))
    gcs = resolve_address(address)
    host, _, port = gcs.rpartition(":")
    check_tcp(host, int(port), what=f"Ray cluster {address!r}" + (f" (= {gcs})" if gcs != address else ""),
              hint="start it (ray start --head --port PORT) or check --address; omit --address for a local instance")
    _join_auth(gcs, address=address)
    with _entrypoint_redacted():
        context = ray.init(address=gcs, **options)
    return Connection(started=True, address=gcs, dashboard_url=_dashboard_url(context), joined=True)


def resolve_address(address: str) -> str:
    """``HOST:PORT`` of the cluster ``address`` names (``auto``: ``RAY_ADDRESS``, else the last ``ray start``
    on this machine); ConfigError when there is none or the form is not supported."""
    if address.startswith("ray://"):
        raise ConfigError(f"--address {address}: Ray Client (ray://) is not supported; run the driver on a node of "
                          "the cluster (e.g. its head) with --address HEAD:6379, as deploy/slurm does")
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS", "")
        if env and env != "auto":
            return resolve_address(env)
        from ray._private.utils import read_ray_address  # the file `ray start` writes (Ray's own lookup)

        found = read_ray_address()
        if not found:
            raise ConfigError("--address auto: no Ray cluster was started with `ray start` on this machine "
                              "(RAY_ADDRESS is unset); start one (ray start --head), pass --address HOST:PORT, or "
                              "omit --address for a local instance")
        return found
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not allowed: expected auto or HOST:PORT of the cluster's head "
                          "(the GCS port, 6379 by default)")
    return address


def _token_source() -> str | None:
    """Where a token for a token-auth cluster would come from (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH") and Path(os.environ["RAY_AUTH_TOKEN_PATH"]).is_file():
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    if (Path.home() / ".ray" / "auth_token").is_file():
        return "~/.ray/auth_token"
    return None


def _token_mode() -> bool:
    """Whether this process sends a token (``RAY_AUTH_MODE=token``)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _enable_token_mode() -> None:
    """``RAY_AUTH_MODE=token`` for this process and its children (Ray sends a token only in that mode)."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches its config: make this process see the mode (as ray.init does)


def _join_auth(gcs: str, *, address: str) -> None:
    """Settle token authentication with the head before ``ray.init`` joins it, and check it.

    An explicit ``RAY_AUTH_MODE`` is respected. Unset, the head is asked first without a token; only if it
    asks for one and one is available is token mode turned on (and checked again). Token mode must match the
    cluster: a token-mode driver on a cluster without authentication connects, but every actor it creates
    dies unscheduled ("all references to the actor were removed"), and the driver's event queue is one.
    """
    source = _token_source()
    error = _probe_gcs(gcs, address=address)
    if (isinstance(error, ray.exceptions.AuthenticationError) and source is not None
            and os.environ.get("RAY_AUTH_MODE") is None):
        _enable_token_mode()
        error = _probe_gcs(gcs, address=address)
    _raise_for(error, gcs=gcs, address=address, token_source=source if _token_mode() else None)


GCS_CHECK_S = 15  # how long the GCS client may take to answer


def _probe_gcs(gcs: str, *, address: str) -> BaseException | None:
    """Open a GCS client once (in a thread, at most :data:`GCS_CHECK_S`) and return its error, or None: a token
    the cluster rejects, or does not get, is an AuthenticationError; something that listens but is no Ray head
    never answers (ConfigError)."""
    from ray._raylet import GcsClient  # what `ray status` and the autoscaler use to talk to the GCS

    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            GcsClient(address=gcs)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result.append(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(GCS_CHECK_S)
    if not result:
        raise ConfigError(f"Ray cluster {address!r}: {gcs} accepts connections but no Ray head answered in "
                          f"{GCS_CHECK_S} s; expected the GCS port of `ray start --head` (6379 by default)")
    return result[0]


def _raise_for(error: BaseException | None, *, gcs: str, address: str, token_source: str | None) -> None:
    """ConfigError (one line, what to set) for what :func:`_probe_gcs` returned; nothing for None."""
    if isinstance(error, ray.exceptions.AuthenticationError):
        if token_source:
            why = f"rejected the token from {token_source}"
        elif os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            why = "needs a token but RAY_AUTH_MODE=disabled"
        else:
            why = "needs a token and none was found"
        raise ConfigError(f"Ray cluster {address!r} {why}: set RAY_AUTH_TOKEN to the cluster's token (the head's "
                          "~/.ray/auth_token, or what `ray get-auth-token` prints there) or RAY_AUTH_TOKEN_PATH to a "
                          "file holding it, and RAY_AUTH_MODE=token") from None
    if error is not None:
        raise ConfigError(f"Ray cluster {address!r}: cannot talk to its head at {gcs}: "
                          f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


@contextmanager
def _entrypoint_redacted() -> Iterator[None]:
    """Ray records the driver's command line as the job's entrypoint (dashboard, ``ray list jobs``): hide any
    password a ``--tracking-uri`` in it carries."""
    from ray._private import utils

    original = utils.get_entrypoint_name
    utils.get_entrypoint_name = lambda: redact(original())
    try:
        yield
    finally:
        utils.get_entrypoint_name = original


def _dashboard_url(context: Any) -> str | None:
    """``http://host:port`` of the dashboard ``ray.init`` reported, or None (none runs, or Ray was reused)."""
    url = getattr(context, "dashboard_url", None) if context is not None else None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def shutdown() -> None:
    """Disconnect from (and stop, when it was started here) the Ray instance."""
    ray.shutdown()


def check_resources(res: Resources) -> None:
    """Raise ConfigError (exit 2) when no trial of the grid could ever be scheduled on this cluster.

    Ray would queue such a trial forever, so the driver checks ``ray.cluster_resources()`` (totals) and
    the alive nodes (one worker must fit on one node) before launching anything.
    """
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have = f"the cluster has CPU: {total.get('CPU', 0):g}, GPU: {total.get('GPU', 0):g} over {len(nodes)} node(s)"
    ask = (f"each trial asks for {res.num_workers} worker(s) x ({res.cpus:g} CPU + {res.gpus:g} GPU) = "
           f"{res.cpus * res.num_workers:g} CPU + {res.gpus * res.num_workers:g} GPU")
    fits_node = any(n.get("CPU", 0) >= res.cpus and n.get("GPU", 0) >= res.gpus for n in nodes)
    fits_total = (total.get("CPU", 0) >= res.cpus * res.num_workers
                  and total.get("GPU", 0) >= res.gpus * res.num_workers)
    if not (fits_node and fits_total):
        raise ConfigError(f"{ask}, but {have}: Ray would wait forever; lower `resources` in the spec "
                          "or join a bigger cluster with --address")


def default_concurrency(res: Resources) -> int:
    """How many trials the cluster can run at once with these per-trial resources."""
    total = ray.cluster_resources()
    limits = [total.get("CPU", 0) // (res.cpus * res.num_workers)]
    if res.gpus:
        limits.append(total.get("GPU", 0) // (res.gpus * res.num_workers))
    return max(1, int(min(limits)))


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    p = Path(path)
    return p.read_text() if p.is_file() else None


def check_shared_storage(out_dir: Path) -> None:
    """On a multi-node cluster, raise ConfigError unless every node reads a marker the driver wrote.

    One probe task is pinned to every alive node by node id (several nodes may share one host and IP
    address, yet not a filesystem: containers, mount namespaces).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir.resolve() / f".storage-check-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    marker.write_text(token)
    try:
        refs = {f"{n['NodeID'][:12]} ({n['NodeManagerAddress']})": _read_marker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes}
        blind = [node for node, ref in refs.items() if ray.get(ref, timeout=60) != token]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"--out {str(out_dir)!r} is not shared: node(s) {', '.join(blind)} cannot read it; "
                          "on a multi-node cluster put --out on a shared filesystem (NFS, Lustre, ...)")


# ============================================================================ tasks


def placement() -> dict[str, Any]:
    """Where this task runs: host, Ray node id, the GPU ids Ray assigned it (``ray.get_gpu_ids()``), their
    UUIDs (``nvidia-smi``; empty without one) and ``CUDA_VISIBLE_DEVICES``."""
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    return {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": gpu_ids,
            "gpu_uuids": _gpu_uuids(gpu_ids), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def _gpu_uuids(gpu_ids: list[str]) -> list[str]:
    """UUIDs of the physical GPUs ``gpu_ids`` (indices or UUIDs) from ``nvidia-smi``; [] where it is absent."""
    if not gpu_ids:
        return []
    if all(g.startswith(("GPU-", "MIG-")) for g in gpu_ids):
        return gpu_ids
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    by_index = dict(line.replace(" ", "").split(",", 1) for line in out.splitlines() if "," in line)
    return [by_index.get(g, g) for g in gpu_ids]


def _single_trial(payload: TrialPayload, queue: Any, threads: int, train_fn: Any) -> TrialOutcome:
    """One trial in a Ray worker process (see :class:`RayLauncher` for which worker)."""
    import torch

    torch.set_num_threads(max(1, threads))
    return run_trial(payload, queue, placement=placement(), train_fn=train_fn)


_single_task = ray.remote(max_calls=1, max_retries=0)(_single_trial)  # a fresh worker: GPU memory is released
_reused_task = ray.remote(max_retries=0)(_single_trial)  # trivial trials (tests, benchmarks): no process start

# what a trial loads before its first step: torch, torchvision (and the torch._dynamo it imports), the engine,
# the models and data, scipy for the boundary metrics (~5 s of every trial's start on 2 cores)
TRIAL_IMPORTS = ("ddsm.engine", "ddsm.models", "ddsm.data", "ddsm.metrics.boundary")


def _warm_up() -> int:
    """Load :data:`TRIAL_IMPORTS` in this worker process, then leave it idle for the next trial; return its pid.

    No device is touched (CUDA is initialised by the trial that gets the process and its GPU), so the
    process is still a fresh one for that trial: nothing trained in it, no GPU memory held.
    """
    import importlib

    for name in TRIAL_IMPORTS:
        importlib.import_module(name)
    return os.getpid()


# zero CPUs: it runs beside the trial that just started, on the node's idle cores, while that trial trains
_warm_task = ray.remote(num_cpus=0, max_retries=0)(_warm_up)


def _ddp_loop(config: dict) -> None:
    """Ray Train worker loop: torch.distributed is initialised; engine.train wraps DDP + SyncBN. Rank 0 records
    every rank's placement (gathered over the process group)."""
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    mine = {"rank": rank, **placement()}
    workers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(workers, mine)
    run_trial(config["payload"], config["queue"] if rank == 0 else None, rank=rank, reraise=True,
              placement={**mine, "workers": workers}, train_fn=config["train_fn"])


@ray.remote(num_cpus=0, max_calls=1, max_retries=0)
def _ddp_task(payload: TrialPayload, queue: Any, resources: Resources, train_fn: Any) -> TrialOutcome:
    """One DDP trial: a TorchTrainer with ``num_workers`` workers (gloo on CPU, NCCL on GPU; gloo also when
    GPUs are held but the trial trains on the CPU)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker = {"CPU": resources.cpus, **({"GPU": resources.gpus} if resources.gpus else {})}
    on_cpu = payload.config.get("train", {}).get("device") == "cpu"
    trainer = TorchTrainer(
        _ddp_loop,
        train_loop_config={"payload": payload, "queue": queue, "train_fn": train_fn},
        torch_config=TorchConfig(backend="gloo" if on_cpu else None),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.gpus > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"{payload.key}-attempt{payload.attempt}",
                             storage_path=str(Path(payload.cell_dir) / "ray_train"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    cell_dir = Path(payload.cell_dir)
    for old in cell_dir.glob("failure.rank*.json"):
        old.unlink()
    try:
        trainer.fit()
    except TrainingFailedError as e:
        return root_cause(cell_dir) or TrialOutcome(status="failed", failure_class="killed",
                                                    error=str(e).splitlines()[0])
    return TrialOutcome(status="finished", metrics=read_result(cell_dir) or {})


def failure_class(e: Exception) -> str:
    """Failure class of an exception raised by Ray itself (the trial's own exceptions are caught inside)."""
    if isinstance(e, ray.exceptions.OutOfMemoryError):
        return "oom"
    if isinstance(e, (ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError)):
        return "node_lost"
    if isinstance(e, ray.exceptions.RayTaskError):
        from ddsm.engine.failures import classify_failure

        return classify_failure(e.cause) if getattr(e, "cause", None) else "error"
    return "killed"  # worker crashed, task cancelled


def _node_of(e: Exception) -> str:
    """The node id a Ray error names (``node ID: <hex>``), else ""."""
    m = re.search(r"node[ _]?id[:=]\s*([0-9a-f]{16,})", str(e), flags=re.IGNORECASE)
    return m.group(1) if m else ""


class ClusterWatch:
    """Probes the head's GCS port in a thread: :meth:`lost` says so once it stayed silent ``lost_after_s``."""

    def __init__(self, gcs_address: str | None, *, lost_after_s: float = LOST_AFTER_S, every_s: float = 1.0) -> None:
        """Args:
        gcs_address: ``host:port`` of the GCS (None: nothing to probe, e.g. a ``ray://`` client).
        lost_after_s: seconds of failed probes before the cluster is lost.
        every_s: seconds between probes.
        """
        self.address, self.lost_after_s, self.every_s = gcs_address, lost_after_s, every_s
        self.reason: str | None = None
        self._stop = threading.Event()
        if gcs_address:
            threading.Thread(target=self._probe, name="ddsm-bench-cluster-watch", daemon=True).start()

    def lost(self) -> str | None:
        """Why the cluster is gone, else None."""
        return self.reason

    def close(self) -> None:
        """Stop probing."""
        self._stop.set()

    def _probe(self) -> None:
        host, _, port = self.address.rpartition(":")
        silent_since = None
        while not self._stop.wait(self.every_s):
            try:
                socket.create_connection((host, int(port)), timeout=min(2.0, self.lost_after_s)).close()
                silent_since = None
            except OSError as e:
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since >= self.lost_after_s:
                    self.reason = (f"the Ray cluster is lost: its head at {self.address} has not answered for "
                                   f"{time.monotonic() - silent_since:.0f} s ({e.strerror or e})")
                    return


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class _EventBuffer:
    """The actor behind :class:`EventQueue`: a list that ``drain`` empties in one call."""

    def __init__(self) -> None:
        self.items: list[Event] = []

    def put(self, item: Event) -> None:
        """Append one event."""
        self.items.append(item)

    def drain(self) -> list[Event]:
        """Every event put so far, oldest first; the buffer is empty after."""
        items, self.items = self.items, []
        return items


class EventQueue:
    """The trials' progress events on their way to the driver: one actor pinned to the driver's node.

    Written by hand instead of ``ray.util.queue.Queue`` because the driver takes everything in one call
    (that queue needs two round trips per poll: ``qsize``, then ``get_nowait_batch``). The actor
    restarts when its process dies (Ray's memory monitor kills it on a host short of memory) and the
    trials' puts are retried meanwhile: the events it held are lost (step metrics; every outcome comes
    back with its task), not the grid. Picklable: trials get it as an argument.
    """

    def __init__(self, node_id: str) -> None:
        """Args:
        node_id: the Ray node the actor must live on (hard affinity: a soft one lets Ray place it on a
            worker node that may be lost).
        """
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.actor = _EventBuffer.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()

    def put(self, event: Event) -> None:
        """Put one event (a trial's engine callback; waits until the actor has it, so none is lost at exit)."""
        ray.get(self.actor.put.remote(event))

    def shutdown(self) -> None:
        """Remove the actor."""
        ray.kill(self.actor)


class _Drainer:
    """Empties an :class:`EventQueue` from a background thread into an in-process inbox, so the driver's loop
    never waits for the queue's actor: on 2 cores shared with 16 trials one drain call took ~60-90 ms, most
    of the loop's time when it was made from the loop. A drain is sent :data:`DRAIN_EVERY_S` after the last
    one was read; events reach the inbox within that plus one round trip (what a driver killed outright can
    lose of them is no more than that). Counts the drains sent and read, for :meth:`RayLauncher.caught_up`."""

    def __init__(self, queue: EventQueue) -> None:
        self.queue = queue
        self.lock = threading.Lock()
        self.inbox: list[Event] = []
        self.sent = self.read = 0  # drains sent / returned by take() (the actor answers them in order)
        self.end_seen: set[tuple[str, int]] = set()  # (key, attempt) of every end event take() returned
        self._read_pending, self._end_pending = 0, set()  # read by the thread, not returned by take() yet
        self.unavailable_since: float | None = None  # the actor has not answered since (restarting, or gone)
        self.error: BaseException | None = None  # the last error of a drain
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ddsm-bench-events", daemon=True)
        self._thread.start()

    def take(self) -> list[Event]:
        """Every event read since the last call, in order. What caught_up counts (drains read, end events seen)
        moves on here, with the events returned, not when the thread reads them."""
        with self.lock:
            out, self.inbox = self.inbox, []
            self.read = self._read_pending  # only grows: drains are read in the order they were sent
            self.end_seen |= self._end_pending
            self._end_pending = set()
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Stop draining (the drain in flight is waited for at most ``timeout``)."""
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        ref, number = None, 0
        while not self._stop.wait(DRAIN_EVERY_S if ref is None else 0.0):
            if not ray.is_initialized():  # shut down under us: a Ray call now would start a new local instance
                return
            try:
                if ref is None:
                    with self.lock:
                        ref, number = self.queue.actor.drain.remote(), self.sent
                        self.sent += 1
                batch = ray.get(ref, timeout=1.0)
            except ray.exceptions.GetTimeoutError:  # a busy node: wait for the same drain
                continue
            except Exception as e:  # noqa: BLE001 - restarting or gone: the driver decides when that is a loss
                ref = None
                with self.lock:
                    self.unavailable_since, self.error = self.unavailable_since or time.monotonic(), e
                continue
            ref = None
            with self.lock:
                self.inbox.extend(batch)
                self._end_pending.update((e.key, e.attempt) for e in batch if e.kind == "end")
                self._read_pending, self.unavailable_since = number + 1, None


class RayLauncher:
    """:class:`harness.driver.Launcher` on the connected Ray cluster; handles are ObjectRefs."""

    def __init__(self, resources: Resources, *, train_fn: Callable[..., dict] | None = None,
                 fresh_workers: bool = True, watch: ClusterWatch | None = None) -> None:
        """Args:
        resources: what every trial asks for (``num_workers > 1``: DDP).
        train_fn: what trains inside the trial (default ``ddsm.engine.train``; see
            :func:`harness.worker.run_trial`); a module-level function, so workers can import it.
        fresh_workers: one worker process per trial (``max_calls=1``: GPU memory is released when it
            exits). False reuses workers, for trivial ``train_fn`` trials that hold no GPU memory.
        watch: what tells that the cluster is gone (default: a :class:`ClusterWatch` on this cluster's GCS).
        """
        self.resources, self.train_fn, self.fresh_workers = resources, train_fn, fresh_workers
        # a fresh-worker trial starts on a process warmed while the trial before it trained (see prepare)
        self.prewarm = fresh_workers and not resources.distributed
        self.warming: list[Any] = []  # ObjectRefs of the warm-up tasks submitted (each returns its pid)
        self._queued = 0  # attempts waiting behind the running ones (prepare)
        self._warm = 0  # warmed processes not yet taken by a trial, as far as the launcher can tell
        self.queue = EventQueue(ray.get_runtime_context().get_node_id())  # lives (and dies) with this node
        self.watch = watch if watch is not None else ClusterWatch(_gcs_address())
        self._lost: str | None = None
        self._drainer = _Drainer(self.queue)
        self._ended_at: dict[Any, int] = {}  # handle -> drains sent when wait() saw it end
        self._attempts: dict[Any, tuple[str, int]] = {}  # handle -> (key, attempt), until its outcome is read

    def submit(self, payload: TrialPayload) -> Any:
        """Start one attempt: a trial task, or a DDP launcher task; return its ObjectRef."""
        res = self.resources
        if res.distributed:
            handle = _ddp_task.remote(payload, self.queue, res, self.train_fn)
        else:
            task = _single_task if self.fresh_workers else _reused_task
            handle = task.options(num_cpus=res.cpus, num_gpus=res.gpus).remote(payload, self.queue, int(res.cpus),
                                                                               self.train_fn)
        self._attempts[handle] = (payload.key, payload.attempt)
        return handle

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        """Every finished handle: waits up to ``timeout`` for the first, then takes all that are ready (no
        handles: sleeps ``timeout``)."""
        if self.lost():
            return []
        if not handles:
            time.sleep(timeout)
            return []
        try:
            ready, rest = ray.wait(handles, num_returns=1, timeout=timeout)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
        except (ray.exceptions.RaySystemError, ConnectionError) as e:
            self._lose(e)
            return []
        with self._drainer.lock:
            for handle in ready:
                self._ended_at.setdefault(handle, self._drainer.sent)
        return ready

    def events(self) -> list[Event]:
        """Every event the background drain (:class:`_Drainer`) read since the last call; never waits. The
        cluster counts as lost when the queue's actor has not answered for ``lost_after_s``."""
        d = self._drainer
        since = d.unavailable_since
        if since is not None and time.monotonic() - since >= self.watch.lost_after_s and d.error is not None:
            self._lose(d.error, what="the driver's event queue (on the driver's node) stopped answering")
        got = d.take()
        if self.prewarm:
            self._warm_for([e for e in got if e.kind == "start"])
        return got

    def prepare(self, queued: int) -> None:
        """Remember how many attempts wait: each trial that starts while some do gets a process warmed for the
        next one (:func:`_warm_up`, on the started trial's node), so a fresh-worker trial skips the process
        start and imports (~2-6 s per trial) that it would otherwise spend before its first step.

        The warm-up is submitted only once a trial has *started*: that trial holds its process, so it cannot
        take the warm one, and the next trial's lease finds the warmed process idle (Ray reuses the most
        recently idle worker of the job). A guess that misses (the next trial goes to another node) leaves an
        idle process that Ray ends when the node has more idle workers than CPUs.
        """
        self._queued = max(0, int(queued))

    def _warm_for(self, started: list[Event]) -> None:
        """Warm processes for the waiting attempts, up to one per started trial, on the started trials' nodes."""
        if not started:
            return
        self._warm = max(0, self._warm - len(started))  # each started trial took a warmed process, if one was there
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        for event in started[:max(0, self._queued - self._warm)]:
            node = event.info.get("node_id", "")
            options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)} if node else {}
            self.warming.append(_warm_task.options(**options).remote())
            self._warm += 1

    def caught_up(self, handle: Any) -> bool:
        """Whether the ended attempt's events have all been returned: its ``end`` event was read (a trial's puts
        are acknowledged one by one, so the actor had every earlier one before it), or a drain sent after the
        task ended was (a crashed worker sends no ``end``)."""
        d = self._drainer
        with d.lock:
            ended_at = self._ended_at.setdefault(handle, d.sent)
            return self._attempts.get(handle) in d.end_seen or d.read > ended_at

    def _forget(self, handle: Any) -> None:
        """Drop what caught_up kept of an attempt whose outcome was read (or that was cancelled)."""
        with self._drainer.lock:
            self._ended_at.pop(handle, None)
            self._drainer.end_seen.discard(self._attempts.pop(handle, None))

    def done(self, handle: Any) -> bool:
        """Whether the task returned (or failed)."""
        return bool(ray.wait([handle], timeout=0)[0])

    def outcome(self, handle: Any, timeout: float | None = None) -> TrialOutcome:
        """The task's TrialOutcome; a Ray error (crashed worker, dead node, OOM kill, cancel) becomes a failed one."""
        self._forget(handle)
        try:
            return ray.get(handle, timeout=timeout)
        except ray.exceptions.RayError as e:
            node = _node_of(e)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            return TrialOutcome(status="failed", failure_class=failure_class(e), traceback=str(e),
                                error=first + (f" (node {node})" if node and node not in first else ""))

    def stop(self, handle: Any) -> None:
        """Ask the trial to stop: SIGINT in its worker (the engine checkpoints after the current step)."""
        ray.cancel(handle, force=False)

    def cancel(self, handle: Any) -> None:
        """Kill the task's worker."""
        self._forget(handle)
        ray.cancel(handle, force=True)

    def lost(self) -> str | None:
        """Why the cluster is gone (the head stopped answering, or a Ray call found the connection gone)."""
        return self._lost or self.watch.lost()

    def close(self) -> None:
        """Stop watching; remove the event queue's actor (not on a lost cluster: nothing answers there)."""
        self.watch.close()
        self._drainer.close(timeout=2.0 if self.lost() else 5.0)  # a drain's get returns within 1 s
        if not self.lost():
            self.queue.shutdown()

    def _lose(self, e: Exception, *, what: str = "a Ray call failed") -> None:
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300]
        self._lost = self._lost or f"the Ray cluster is lost: {what} ({why})"


def _gcs_address() -> str | None:
    """``host:port`` of the connected cluster's GCS (None for a Ray Client connection)."""
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - ray:// clients have no GCS address to probe
        return None


# ============================================================================ a task alone on its device


@ray.remote(max_retries=0)
def _isolated_task(fn: Any, arg: Any, threads: int) -> Any:
    import torch

    torch.set_num_threads(max(1, threads))
    return fn(arg)


def run_isolated(fn: Any, arg: Any, *, gpu: bool, threads: int = 1) -> Any:
    """``fn(arg)`` in a Ray task that holds its device alone; return its result (its exception is raised).

    GPU: one whole GPU (and ``threads`` CPUs), so no fractional-GPU trial shares it. CPU: every CPU of the
    largest alive node, which Ray grants only when no other task holds one, so the task waits for an
    idle node instead of sharing. Torch runs ``threads`` intra-op threads (the trial's ``train.threads``:
    the cost of the computation that was trained, on a node nothing else of the cluster uses).
    """
    if gpu:
        options = {"num_gpus": 1, "num_cpus": threads}
    else:
        options = {"num_cpus": max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive"))}
    return ray.get(_isolated_task.options(**options).remote(fn, arg, threads))
