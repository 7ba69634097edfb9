"""The MLflow adapter: the only module of the run feature that imports mlflow; the driver is the only writer.

One experiment per spec (its ``name``), one parent run per grid, one child run per cell. A child run
carries the tags ``cell_hash``, ``seed``, ``variant``, ``git_sha``, ``device``, ``torch``,
``failure_class`` (``none`` when it finished), ``failures`` and ``attempts``; every resolved config
field as a param (flattened dotted keys); train/eval metrics per step, logged in batches with
``MlflowClient.log_batch``; the final metrics at the last step; and the cell's files as artifacts.
Trials never call mlflow: they send events to the driver, which calls this module.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

__all__ = ["CellRun", "Tracker", "default_tracking_uri"]

for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_BATCH = 1000  # MLflow's per-request limit for metrics (params and tags: 100)


def default_tracking_uri(out_dir: str | Path) -> str:
    """``sqlite:///<out>/mlflow.db`` (absolute)."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


@dataclass
class CellRun:
    """A child run found in the experiment."""

    run_id: str
    cell_hash: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED


class Tracker:
    """Driver-side MLflow writer for one grid: parent run, child runs, buffered metrics."""

    def __init__(self, *, tracking_uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        """Args:
        tracking_uri: any MLflow tracking URI (default: :func:`default_tracking_uri`).
        experiment: experiment name (the spec name); created if missing.
        artifact_root: where a newly created experiment stores artifacts (None: the server's default).
        """
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = Path(artifact_root).resolve().as_uri() if artifact_root else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self._metrics: dict[str, list[Metric]] = {}

    # ------------------------------------------------------------------ runs

    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def start_grid(self, *, grid_hash: str, name: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        """Create the parent run, or reopen the one of an earlier run of the same grid; return its id."""
        found = self._search(f"tags.kind = 'grid' and tags.grid_hash = '{grid_hash}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name,
                                            tags={"kind": "grid", "grid_hash": grid_hash}).info.run_id
            self._log(run_id, params=params)
        self._log(run_id, tags=tags)
        return run_id

    def cell_runs(self) -> dict[str, CellRun]:
        """The latest child run of each cell hash in the experiment (a FINISHED one wins)."""
        out: dict[str, CellRun] = {}
        for run in sorted(self._search("tags.kind = 'cell'"), key=lambda r: r.info.start_time or 0):
            h = run.data.tags.get("cell_hash", "")
            prev = out.get(h)
            if prev is None or prev.status != "FINISHED":
                out[h] = CellRun(run_id=run.info.run_id, cell_hash=h, status=run.info.status)
        return out

    def start_cell(self, *, name: str, parent_id: str, cell_hash: str, params: dict[str, Any],
                   tags: dict[str, Any], reuse: str | None = None) -> str:
        """Create the child run of a cell (or reopen ``reuse``, an unfinished one); log params and tags."""
        tags = {**tags, "kind": "cell", "cell_hash": cell_hash}
        if reuse:
            self.client.update_run(reuse, status="RUNNING")
            run_id = reuse
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name,
                                            tags={"mlflow.parentRunId": parent_id, **_str(tags)}).info.run_id
        self._log(run_id, params=params, tags=tags)
        return run_id

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set (or overwrite) tags now."""
        self._log(run_id, tags=tags)

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int) -> None:
        """Buffer scalar metrics of ``step``; they are sent by :meth:`flush`."""
        now = int(time.time() * 1000)
        self._metrics.setdefault(run_id, []).extend(
            Metric(k, float(v), now, int(step)) for k, v in metrics.items() if _is_number(v))

    def flush(self) -> None:
        """Send every buffered metric, ``log_batch`` by ``log_batch``."""
        pending, self._metrics = self._metrics, {}
        for run_id, metrics in pending.items():
            for i in range(0, len(metrics), _BATCH):
                self.client.log_batch(run_id, metrics=metrics[i: i + _BATCH])

    def end_run(self, run_id: str, *, status: str, tags: dict[str, Any] | None = None,
                artifacts: Iterable[tuple[Path, str | None]] = ()) -> None:
        """Flush, set tags, upload ``(local file, artifact dir)`` pairs that exist, set the final status."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r} is not allowed: expected FINISHED, FAILED or KILLED")
        self.flush()
        if tags:
            self._log(run_id, tags=tags)
        for path, where in artifacts:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path), artifact_path=where)
        self.client.set_terminated(run_id, status=status)

    def final_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def log_json(self, run_id: str, obj: Any, name: str) -> None:
        """Store ``obj`` as a JSON artifact ``name`` of the run."""
        self.client.log_text(run_id, json.dumps(obj, indent=1, sort_keys=True), name)

    # ------------------------------------------------------------------ helpers

    def _log(self, run_id: str, *, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> None:
        p = [Param(k, _value(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, _value(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(p), len(t)), 100):
            self.client.log_batch(run_id, params=p[i: i + 100], tags=t[i: i + 100])


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


def _str(d: dict[str, Any]) -> dict[str, str]:
    return {k: _value(v) for k, v in d.items()}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v drops NaN
