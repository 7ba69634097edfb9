"""The Ray adapter: the only module that imports ray.

- Cluster: :func:`connect` (start a local instance or join one), :func:`shutdown`,
  :func:`check_resources` (exit 2 instead of waiting forever), :func:`default_concurrency`,
  :func:`check_shared_storage` (every node must read the driver's out dir).
- Tasks: one trial is a ``max_calls=1`` task (a fresh worker process, so GPU memory is released
  when it exits) holding the trial's CPUs/GPUs; with ``num_workers > 1`` it is a zero-CPU task that
  runs a Ray Train ``TorchTrainer`` of that many workers (DDP: gloo on CPU, NCCL on GPU).
- :class:`RayLauncher`: the :class:`harness.driver.Launcher` on Ray: submit, wait, events (a Ray
  queue the workers' engine callbacks put on), outcome (Ray errors mapped to failure classes),
  cancel.
- :func:`run_isolated`: one task alone on its device (the grid's cost phase, :mod:`harness.cost`).
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import ray

from ddsm.config import ConfigError
from harness.driver import Event, TrialOutcome, TrialPayload, read_result
from harness.spec import Resources
from harness.worker import root_cause, run_trial

__all__ = ["RayLauncher", "check_resources", "check_shared_storage", "connect", "default_concurrency",
           "failure_class", "run_isolated", "shutdown"]


# ============================================================================ the cluster


def connect(address: str | None) -> bool:
    """Start a local Ray instance (address None) or join a cluster; True when this call started/joined it.

    An already initialised Ray (e.g. a test session's) is reused and left running.
    """
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             configure_logging=True)
    return True


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
    """On a multi-node cluster, raise ConfigError unless every node reads a marker the driver wrote."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir.resolve() / f".storage-check-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    marker.write_text(token)
    try:
        refs = {n["NodeManagerAddress"]: _read_marker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes}
        blind = [host for host, ref in refs.items() if ray.get(ref, timeout=60) != token]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"--out {str(out_dir)!r} is not shared: node(s) {', '.join(blind)} cannot read it; "
                          "on a multi-node cluster put --out on a shared filesystem (NFS, Lustre, ...)")


# ============================================================================ tasks


@ray.remote(max_calls=1, max_retries=0)
def _single_task(payload: TrialPayload, queue: Any, threads: int) -> TrialOutcome:
    """One trial in a fresh worker process (max_calls=1: GPU memory is released when it exits)."""
    import torch

    torch.set_num_threads(max(1, threads))
    return run_trial(payload, queue)


def _ddp_loop(config: dict) -> None:
    """Ray Train worker loop: torch.distributed is initialised; engine.train wraps DDP + SyncBN."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    run_trial(config["payload"], config["queue"] if rank == 0 else None, rank=rank, reraise=True)


@ray.remote(num_cpus=0, max_calls=1, max_retries=0)
def _ddp_task(payload: TrialPayload, queue: Any, resources: Resources) -> TrialOutcome:
    """One DDP trial: a TorchTrainer with ``num_workers`` workers (gloo on CPU, NCCL on GPU)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.cpus, **({"GPU": resources.gpus} if resources.gpus else {})}
    trainer = TorchTrainer(
        _ddp_loop,
        train_loop_config={"payload": payload, "queue": queue},
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
    if isinstance(e, ray.exceptions.RayTaskError):
        from ddsm.engine.failures import classify_failure

        return classify_failure(e.cause) if getattr(e, "cause", None) else "error"
    return "killed"  # worker crashed, node died, task cancelled


class RayLauncher:
    """:class:`harness.driver.Launcher` on the connected Ray cluster; handles are ObjectRefs."""

    def __init__(self, resources: Resources) -> None:
        """Args:
        resources: what every trial asks for (``num_workers > 1``: DDP).
        """
        from ray.util.queue import Queue

        self.resources = resources
        self.queue = Queue(actor_options={"num_cpus": 0})

    def submit(self, payload: TrialPayload) -> Any:
        """Start one attempt: a ``max_calls=1`` task, or a DDP launcher task; return its ObjectRef."""
        res = self.resources
        if res.num_workers > 1:
            return _ddp_task.remote(payload, self.queue, res)
        return _single_task.options(num_cpus=res.cpus, num_gpus=res.gpus).remote(payload, self.queue, int(res.cpus))

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        """Every finished handle: waits up to ``timeout`` for the first, then takes all that are ready."""
        ready, rest = ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def events(self) -> list[Event]:
        """Every event on the queue now."""
        n = self.queue.size()
        return list(self.queue.get_nowait_batch(n)) if n else []

    def done(self, handle: Any) -> bool:
        """Whether the task returned (or failed)."""
        return bool(ray.wait([handle], timeout=0)[0])

    def outcome(self, handle: Any, timeout: float | None = None) -> TrialOutcome:
        """The task's TrialOutcome; a Ray error (crashed worker, OOM kill, cancel) becomes a failed one."""
        try:
            return ray.get(handle, timeout=timeout)
        except ray.exceptions.RayError as e:
            return TrialOutcome(status="failed", failure_class=failure_class(e), error=str(e).splitlines()[0])

    def cancel(self, handle: Any) -> None:
        """Kill the task's worker."""
        ray.cancel(handle, force=True)

    def close(self) -> None:
        """Remove the event queue's actor."""
        self.queue.shutdown()


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
