"""The tidy run frame: one row per (run, metric), run fields and config fields as columns.

Everything in ``reports/`` starts from this frame, so a report can be built from any source that can
fill it (``harness/mlflow_io.py`` reads MLflow; tests build it by hand). Columns:

* run fields (:data:`RUN_COLUMNS`): ``run_id``, ``parent_run_id``, ``experiment_id``, ``experiment``,
  ``run_name``, ``status`` (``FINISHED`` / ``FAILED`` / ``KILLED`` / ``RUNNING`` / ``SCHEDULED``, or
  ``INTERRUPTED``: a run its driver stopped (Ctrl-C, a lost store or cluster), or one left RUNNING by a
  driver that is gone, see :func:`harness.mlflow_io.load_runs`),
  ``start_time`` (ms since the epoch), ``variant`` (the cell without its seed), ``seed``,
  ``cell_hash``, ``failure_class`` (``oom`` / ``nan`` / ``error`` / ``killed``; empty or ``none`` when it
  finished), ``failures`` (classes of earlier failed attempts in the same run, comma-joined),
  ``attempts`` (launches recorded in the run), ``baseline`` (the spec baseline the cell derives from),
  ``git_sha``, ``device``, ``torch``;
* config fields: one column per dotted key (``model.num_points``, ``train.seed``, ...);
* ``metric`` and ``value``: the final value of each metric. A run that logged no metric (e.g. one that
  failed before evaluating) keeps one row with ``metric`` and ``value`` missing, so it is counted.

The functions here are pure ``DataFrame -> DataFrame`` transforms; nothing is formatted.
"""
from __future__ import annotations

import ast
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ddsm.config import ConfigError
from ddsm.metrics.catalogue import bf_metrics, class_metrics, tolerance_of  # the metric facts live there

__all__ = [
    "CELL_STATES", "FAILED_STATUSES", "FINISHED", "INTERRUPTED", "RUN_COLUMNS", "bf_metrics", "cell_status",
    "class_metrics",
    "coerce_param", "config_fields", "finished_values", "metric_names", "resolve_baseline",
    "runs_frame", "seed_counts", "select_attempts", "tidy_frame", "tolerance_of", "varying_fields", "with_variant",
]

RUN_COLUMNS = ["run_id", "parent_run_id", "experiment_id", "experiment", "run_name", "status", "start_time",
               "variant", "seed", "cell_hash", "failure_class", "failures", "attempts", "baseline", "git_sha",
               "device", "torch"]
FINISHED = "FINISHED"
INTERRUPTED = "INTERRUPTED"
FAILED_STATUSES = ("FAILED", "KILLED")
CELL_STATES = ("finished", "failed", "interrupted", "running", "missing")  # cell_status()["state"]
SEED_FIELD = "train.seed"


# ----------------------------------------------------------------------------- building the frame


def coerce_param(value: Any) -> Any:
    """An MLflow param string back to a Python scalar: ``"9"`` -> 9, ``"0.5"`` -> 0.5, ``"None"`` -> None.

    Lists, tuples and free text stay strings (they are compared, never averaged).
    """
    if not isinstance(value, str):
        return value
    if value in ("None", "null", ""):
        return None
    if value in ("True", "true", "False", "false"):
        return value.lower() == "true"
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value
    return parsed if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else value


def tidy_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Build the tidy frame from plain run records.

    Args:
        records: one dict per run with ``run`` (run fields, see :data:`RUN_COLUMNS`), ``params``
            (dotted key -> value; strings are coerced with :func:`coerce_param`) and ``metrics``
            (name -> final value).
    """
    rows = []
    for rec in records:
        base = {col: rec["run"].get(col) for col in RUN_COLUMNS}
        base.update({k: coerce_param(v) for k, v in rec.get("params", {}).items()})
        metrics = rec.get("metrics", {}) or {None: np.nan}
        rows += [{**base, "metric": name, "value": float(v)} for name, v in metrics.items()]
    if not rows:
        return pd.DataFrame(columns=[*RUN_COLUMNS, "metric", "value"])
    df = pd.DataFrame(rows)
    df["value"] = df["value"].astype(float)
    return with_variant(df)


def config_fields(df: pd.DataFrame) -> list[str]:
    """The dotted config columns (``model.name``, ``train.seed``, ...), in frame order."""
    return [c for c in df.columns if "." in c]


def runs_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (run and config columns, no metric/value), in frame order."""
    return df.groupby("run_id", sort=False).head(1).drop(columns=["metric", "value"]).reset_index(drop=True)


def metric_names(df: pd.DataFrame) -> list[str]:
    """Every metric name in the frame, in order of first appearance."""
    return list(pd.unique(df["metric"].dropna()))


def with_variant(df: pd.DataFrame) -> pd.DataFrame:
    """Fill a missing ``variant`` from the config fields that vary across runs, and a missing ``seed``
    from ``train.seed``.

    A derived variant reads ``model.name=ddsm,model.num_points=4`` (fields named ``*.seed`` are left out;
    with nothing varying it is the model name); a run tagged by the harness keeps its tag (e.g.
    ``ddsm[num_points=4]``).
    """
    out = df.copy()
    if SEED_FIELD in out:
        out["seed"] = out["seed"].where(out["seed"].notna(), out[SEED_FIELD])
    out["seed"] = pd.to_numeric(out["seed"], errors="coerce").astype("Int64")
    if out["variant"].notna().all():
        return out
    runs = runs_frame(out).set_index("run_id")
    keys = [f for f in config_fields(runs) if not f.endswith(".seed") and runs[f].astype(str).nunique() > 1]
    keys = keys or [k for k in ("model.name",) if k in runs]
    parts = [f"{k}=" + runs[k].astype(str) for k in keys]
    derived = pd.concat(parts, axis=1).agg(",".join, axis=1) if parts else pd.Series("run", index=runs.index)
    return out.assign(variant=out["variant"].where(out["variant"].notna(), out["run_id"].map(derived)))


# ----------------------------------------------------------------------------- cells and attempts


def select_attempts(runs: pd.DataFrame) -> pd.DataFrame:
    """One run per (variant, seed): the latest finished run, else the latest run.

    Re-launched grids can leave several runs for one cell, and one run can hold several launches (its
    ``attempts`` tag, retries reuse the run); ``attempts`` becomes the total over the cell's runs.
    """
    launches = pd.to_numeric(runs["attempts"], errors="coerce").fillna(1).clip(lower=1)
    ranked = runs.assign(_ok=runs["status"].eq(FINISHED), _t=runs["start_time"].fillna(0), attempts=launches)
    attempts = ranked.groupby(["variant", "seed"], sort=False, dropna=False)["attempts"].transform("sum")
    return (ranked.assign(attempts=attempts)
            .sort_values(["_ok", "_t"], kind="stable")
            .groupby(["variant", "seed"], sort=False, dropna=False).tail(1)
            .drop(columns=["_ok", "_t"])
            .sort_index()
            .reset_index(drop=True))


def _state(status: pd.Series) -> np.ndarray:
    """FINISHED -> finished, INTERRUPTED -> interrupted, FAILED/KILLED -> failed, anything else (RUNNING,
    SCHEDULED) -> running."""
    return np.select([status.eq(FINISHED), status.eq(INTERRUPTED), status.isin(FAILED_STATUSES)],
                     ["finished", "interrupted", "failed"], "running")


def cell_status(df: pd.DataFrame, *, seeds: Iterable[int] | None = None,
                expected: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every expected (variant, seed) cell with its ``state``: finished, failed, interrupted, running or missing.

    Args:
        df: the tidy frame.
        seeds: the seeds each variant should have; default: every seed seen in the frame.
        expected: the planned cells (columns ``variant``, ``seed``), e.g. the parent run's ``grid.json``;
            a planned variant that never ran is reported as missing.

    Returns:
        columns ``variant``, ``seed``, ``state``, ``failure_class``, ``failures``, ``attempts``, ``run_id``; planned
        variants first, then the others in order of first appearance; seeds ascending.
    """
    runs = select_attempts(runs_frame(df))
    planned = expected if expected is not None else pd.DataFrame({"variant": [], "seed": []})
    seen = set(runs["seed"].dropna()) | set(planned["seed"].dropna())
    seeds = sorted(set(seeds) if seeds is not None else seen)
    variants = list(pd.unique(pd.concat([planned["variant"], runs["variant"]])))
    grid = pd.concat([pd.MultiIndex.from_product([variants, seeds], names=["variant", "seed"]).to_frame(index=False),
                      planned[["variant", "seed"]]]).astype({"seed": "Int64"}).drop_duplicates()
    found = runs.assign(state=_state(runs["status"]))[
        ["variant", "seed", "state", "failure_class", "failures", "attempts", "run_id"]]
    out = grid.merge(found, on=["variant", "seed"], how="outer", sort=False)
    return (out.assign(state=out["state"].fillna("missing"), attempts=out["attempts"].fillna(0).astype(int),
                       failure_class=out["failure_class"].fillna("").replace("none", ""),
                       failures=out["failures"].fillna(""))
            .assign(_v=lambda d: d["variant"].map({v: i for i, v in enumerate(variants)}))
            .sort_values(["_v", "seed"], kind="stable").drop(columns="_v").reset_index(drop=True))


def seed_counts(status: pd.DataFrame) -> pd.DataFrame:
    """Per variant: ``n_expected``, ``n_finished``, ``n_failed``, ``n_interrupted``, ``n_running``, ``n_missing``
    and the failure classes seen (``failures``, comma-joined), from :func:`cell_status`."""
    counts = (pd.crosstab(status["variant"], status["state"])  # (variants, states)
              .reindex(columns=list(CELL_STATES), fill_value=0)
              .add_prefix("n_"))
    failures = (status[status["state"].eq("failed")].groupby("variant")["failure_class"]
                .agg(lambda s: ",".join(sorted({c for c in s if c}))))
    order = list(pd.unique(status["variant"]))
    return (counts.assign(n_expected=status.groupby("variant").size(), failures=failures)
            .fillna({"failures": ""}).reindex(order).rename_axis("variant"))


def finished_values(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Final metric values of the finished runs (one attempt per cell): columns variant, seed, *metrics."""
    chosen = select_attempts(runs_frame(df))
    keep = chosen.loc[chosen["status"].eq(FINISHED), "run_id"]
    wide = (df[df["run_id"].isin(keep) & df["metric"].isin(metrics)]
            .pivot(index="run_id", columns="metric", values="value"))  # (finished runs, metrics)
    return (chosen.loc[chosen["run_id"].isin(keep), ["run_id", "variant", "seed"]]
            .join(wide, on="run_id").reindex(columns=["variant", "seed", *metrics])
            .reset_index(drop=True))


# ----------------------------------------------------------------------------- config axes


def varying_fields(df: pd.DataFrame) -> list[str]:
    """Config fields that differ between variants: constant within every variant, not all equal.

    ``train.seed`` and anything that changes with the seed inside one variant (e.g. a per-seed data
    seed) are left out. A missing value (a field the run's model does not read, which the harness does
    not log) is no value: ``model.branches`` varies only if the variants that read it differ.
    """
    runs = runs_frame(df)
    fields = [f for f in config_fields(runs) if f != SEED_FIELD]
    as_text = runs[fields].astype(str).where(runs[fields].notna()).assign(variant=runs["variant"])
    within = as_text.groupby("variant")[fields].nunique().max() if fields else pd.Series(dtype=int)
    across = as_text[fields].nunique()
    return [f for f in fields if within[f] <= 1 and across[f] > 1]


def resolve_baseline(df: pd.DataFrame, name: str | None, *, default: str | None = None) -> str:
    """The variant that deltas are taken against.

    ``name`` may be a variant (``fpn``, ``ddsm[num_points=9]``) or a spec baseline name whose cells
    carry the ``baseline`` tag; a baseline with several variants (one with axes) resolves to its first
    one. When ``name`` is None, ``default`` (the spec's baseline, from the parent run) is used the same
    way, and failing that the first variant.

    Raises:
        ConfigError: an explicit ``name`` matches no variant and no baseline.
    """
    variants = list(pd.unique(runs_frame(df)["variant"]))
    if name is None:
        try:
            return resolve_baseline(df, default) if default is not None else variants[0]
        except ConfigError:
            return variants[0]
    if name in variants:
        return name
    family = list(pd.unique(runs_frame(df).loc[lambda r: r["baseline"].eq(name), "variant"]))
    if family:
        return family[0]
    raise ConfigError(f"baseline={name!r} is not a variant of this grid: expected one of {', '.join(variants)}")
