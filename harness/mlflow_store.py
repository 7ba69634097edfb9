"""Read a grid's runs out of MLflow into the tidy frame of :mod:`reports.load` (the only MLflow reader).

Conventions this reader relies on (``harness/tracking.py`` and ``harness/ray_runner.py`` write them; see
``reports/README.md``):

* experiment = spec name; one parent run per grid (tag ``kind=grid``), tagged ``spec`` (the spec file),
  ``git_sha``, ``baseline`` (the spec's reference baseline), ``smoke``; param ``seeds`` (JSON list);
  optionally an artifact ``grid.json`` (``{"cells": [{"hash", "variant", "seed"}, ...]}``) or
  ``cells.json`` (the list alone) with the planned cells, so cells that never started show as missing
  and cells finished by an earlier launch (under another parent) are found by hash;
* one child run per cell (tags ``mlflow.parentRunId``, ``kind=cell``), tagged ``variant`` (the cell
  without its seed), ``seed``, ``cell_hash``, ``baseline`` (the spec baseline it derives from),
  ``git_sha``, ``device``, ``torch``, ``host``, ``failure_class`` (``none`` when finished),
  ``failures`` and ``attempts``; params = every resolved config field with dotted keys; final metrics
  ``miou``, ``pixel_acc``, ``mean_acc``, ``bf_<r>px``, ``biou``, ``gflops``, ``params_m``, ``latency_ms``,
  ``train_step_ms``, ``peak_mem_mb`` and per-class ``iou_<class>`` (or an artifact ``per_class_iou.csv``
  with columns ``class_id,class_name,iou``, read when no ``iou_*`` metric was logged).

Missing tags are tolerated: the variant is then derived from the params that vary, the seed from
``train.seed``.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ddsm.config import ConfigError

__all__ = ["DEFAULT_TRACKING_URI", "GridRuns", "iter_runs", "load_runs", "resolve_tracking_uri",
           "write_report_from_mlflow"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # used when neither --tracking-uri nor $MLFLOW_TRACKING_URI is set
PARENT_TAG = "mlflow.parentRunId"
RUN_TAGS = ("variant", "seed", "cell_hash", "failure_class", "failures", "attempts", "baseline", "git_sha", "device",
            "torch")


@dataclass
class GridRuns:
    """What a report needs from the store: the tidy frame, its provenance, and the planned cells."""

    frame: pd.DataFrame
    provenance: dict[str, Any]
    expected: pd.DataFrame | None  # columns variant, seed; None when the parent logged no cells.json


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else :data:`DEFAULT_TRACKING_URI`; a bare ``*.db`` path
    becomes ``sqlite:///<abs path>``. A SQLite file that does not exist is an error (never created)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if "://" not in uri and uri.endswith(".db"):
        uri = f"sqlite:///{Path(uri).resolve()}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise ConfigError(f"tracking store {uri!r} does not exist: expected the mlflow.db of a grid "
                              "(ddsm-bench run writes <out>/mlflow.db); pass --tracking-uri")
    return uri


def iter_runs(client: Any, experiment_ids: list[str], *, filter_string: str = "",
              page_size: int = 1000) -> Iterator[Any]:
    """Every run matching the search, oldest first, following ``page_token`` until the last page.

    ``client`` is an :class:`mlflow.MlflowClient` (or anything with the same ``search_runs``).
    """
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=page_size,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _record(run: Any, experiment: str, per_class: dict[str, float]) -> dict[str, Any]:
    """An MLflow run -> the plain record :func:`reports.load.tidy_frame` takes."""
    tags = run.data.tags
    fields = {"run_id": run.info.run_id, "parent_run_id": tags.get(PARENT_TAG), "experiment": experiment,
              "experiment_id": run.info.experiment_id, "run_name": run.info.run_name, "status": run.info.status,
              "start_time": run.info.start_time, **{t: tags.get(t) for t in RUN_TAGS}}
    return {"run": fields, "params": dict(run.data.params), "metrics": {**run.data.metrics, **per_class}}


def _per_class_artifact(client: Any, run: Any) -> dict[str, float]:
    """``iou_<class>`` from ``per_class_iou.csv`` when the run logged no ``iou_*`` metric and finished."""
    if run.info.status != "FINISHED" or any(k.startswith("iou_") for k in run.data.metrics):
        return {}
    if "per_class_iou.csv" not in {f.path for f in client.list_artifacts(run.info.run_id)}:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, "per_class_iou.csv", tmp)
        with open(path, newline="") as fh:
            return {f"iou_{r['class_name']}": float(r["iou"]) if r["iou"] else float("nan")
                    for r in csv.DictReader(fh)}


def _plan(client: Any, parent: Any) -> list[dict[str, Any]]:
    """The planned cells of a grid: the parent's ``grid.json`` (``{"cells": [...]}``) or ``cells.json``
    (``[...]``) artifact, each cell ``{"variant", "seed", "hash"?}``; empty when neither was logged."""
    names = {f.path for f in client.list_artifacts(parent.info.run_id)}
    for name in ("grid.json", "cells.json"):
        if name in names:
            with tempfile.TemporaryDirectory() as tmp:
                data = json.loads(Path(client.download_artifacts(parent.info.run_id, name, tmp)).read_text())
            return list(data.get("cells", []) if isinstance(data, dict) else data)
    return []


def _is_parent(run: Any, referenced: set[str]) -> bool:
    return run.info.run_id in referenced or run.data.tags.get("kind") == "grid"


def load_runs(tracking_uri: str | None, *, experiment: str | None = None, parent_run_id: str | None = None,
              page_size: int = 1000, read_artifacts: bool = True) -> GridRuns:
    """Load every cell run of an experiment (all its grid launches) or of one grid's parent run.

    With a parent run, its children are loaded, plus the runs of its planned cells (by ``cell_hash``)
    that an earlier launch of the grid finished under another parent (the harness skips those).

    Args:
        tracking_uri: see :func:`resolve_tracking_uri`.
        experiment: experiment name; exactly one of ``experiment`` and ``parent_run_id``.
        parent_run_id: a grid's parent run.
        page_size: runs per search request (pages are followed to the end).
        read_artifacts: read ``per_class_iou.csv`` and the planned cells (``grid.json``/``cells.json``).

    Raises:
        ConfigError: unknown store, experiment or run, or no cell run.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from reports.load import tidy_frame

    if (experiment is None) == (parent_run_id is None):
        raise ConfigError("give exactly one of experiment (--experiment NAME) and parent run (--run ID)")
    uri = resolve_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bar per artifact read
    client = MlflowClient(tracking_uri=uri)
    if parent_run_id is not None:
        try:
            parents = [client.get_run(parent_run_id)]
        except MlflowException:
            raise ConfigError(f"run {parent_run_id!r} not found in tracking store {uri}") from None
        exp = client.get_experiment(parents[0].info.experiment_id)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            known = [e.name for e in client.search_experiments(max_results=20)]
            raise ConfigError(f"experiment {experiment!r} not found in tracking store {uri}: known experiments: "
                              f"{', '.join(known) or 'none'}")
    every = list(iter_runs(client, [exp.experiment_id], page_size=page_size))
    referenced = {r.data.tags.get(PARENT_TAG) for r in every} - {None}
    if parent_run_id is None:
        parents = [r for r in every if _is_parent(r, referenced)]
    plan = [c for p in parents for c in _plan(client, p)] if read_artifacts else []
    hashes = {c.get("hash") for c in plan} - {None}
    ids = {p.info.run_id for p in parents}
    runs = [r for r in every if not _is_parent(r, referenced)
            and (parent_run_id is None or r.data.tags.get(PARENT_TAG) in ids or r.data.tags.get("cell_hash") in hashes)]
    if not runs:
        where = f"parent run {parent_run_id!r}" if parent_run_id else f"experiment {experiment!r}"
        raise ConfigError(f"{where} has no cell runs in tracking store {uri}")
    frame = tidy_frame(_record(r, exp.name, _per_class_artifact(client, r) if read_artifacts else {}) for r in runs)
    return GridRuns(frame=frame, provenance=_provenance(uri, exp, parents, runs),
                    expected=_expected(plan, parents, frame))


def _expected(plan: list[dict[str, Any]], parents: list[Any], frame: pd.DataFrame) -> pd.DataFrame | None:
    """Planned (variant, seed) cells: the plan if logged, else every variant seen x the parents' ``seeds``
    param; None when neither is known (the report then expects every seed seen)."""
    if plan:
        return pd.DataFrame(plan, columns=["variant", "seed"]).drop_duplicates()
    seeds = sorted({s for p in parents for s in json.loads(p.data.params.get("seeds", "[]"))})
    if not seeds:
        return None
    variants = pd.unique(frame["variant"])
    return pd.MultiIndex.from_product([variants, seeds], names=["variant", "seed"]).to_frame(index=False)


def _provenance(uri: str, exp: Any, parents: list[Any], runs: list[Any]) -> dict[str, Any]:
    """Spec, experiment, parent runs, git SHAs, hardware and run dates for the report header."""
    def uniq(values: Any) -> list[str]:
        return sorted({v for v in values if v})

    ptags = [p.data.tags for p in parents]
    times = [r.info.start_time for r in runs if r.info.start_time]
    stamp = [dt.datetime.fromtimestamp(t / 1000, dt.timezone.utc).isoformat(timespec="seconds") for t in
             (min(times), max(times))] if times else []
    smoke = any(str(t.get("smoke")).lower() == "true" for t in ptags)
    return {
        "spec": exp.name,  # the experiment is named after the spec ("-smoke" appended under --smoke)
        "spec_path": ", ".join(uniq(t.get("spec_path") or t.get("spec") for t in ptags)),
        "smoke": "yes: a few steps on tiny inputs, the numbers are not results" if smoke else None,
        "spec_baseline": next((t["baseline"] for t in ptags if t.get("baseline")), None),
        "experiment": exp.name,
        "experiment_id": exp.experiment_id,
        "parent_run_ids": [p.info.run_id for p in parents],
        "tracking_uri": uri,
        "git_sha": uniq([*(t.get("git_sha") for t in ptags), *(r.data.tags.get("git_sha") for r in runs)]),
        "hardware": uniq(r.data.tags.get("device") for r in runs),
        "torch": uniq(r.data.tags.get("torch") for r in runs),
        "hosts": uniq(r.data.tags.get("host") for r in runs),
        "runs_started": " to ".join(stamp),
    }


def write_report_from_mlflow(tracking_uri: str | None, *, experiment: str | None = None,
                             parent_run_id: str | None = None, out_dir: str | Path, baseline: str | None = None,
                             method: str = "ttest", alpha: float = 0.05) -> dict[str, Path]:
    """Load a grid from MLflow and write its report (:func:`reports.build.write_report`).

    ``ddsm-bench run`` calls this at the end of every grid; ``ddsm-bench report`` is the same from the CLI.
    Returns ``{relative path: path}`` of every written file (``report.md`` among them).
    """
    from reports.build import write_report

    grid = load_runs(tracking_uri, experiment=experiment, parent_run_id=parent_run_id)
    return write_report(grid.frame, out_dir, baseline=baseline, provenance=grid.provenance, method=method,
                        alpha=alpha, expected=grid.expected)
