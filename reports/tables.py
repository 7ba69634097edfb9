"""Tables as numbers: pure transforms of the tidy frame (``reports/load.py``); formatting is in ``render.py``.

Every table is a :class:`Table`: a ``rows`` frame (one row per variant: the config fields that vary and
the seed counts) and a long ``cells`` frame (one row per variant and metric: mean, std, n, delta vs the
reference variant, paired test, best-in-column flag). Means and stds are over the finished seeds of a
variant (one attempt per cell, see :func:`reports.load.select_attempts`); failed, running and missing
seeds are counted in ``rows`` so the renderer can show them, never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ddsm.metrics.catalogue import is_accuracy, lookup
from reports.load import (bf_metrics, cell_status, class_metrics, finished_values, metric_names, runs_frame,
                          seed_counts, varying_fields)
from reports.stats import method_note, paired_test

__all__ = ["MAIN_METRICS", "Table", "axis_tables", "compare", "main_table", "per_class_tables", "row_info",
           "seed_stats", "significance_table"]

CELL_COLUMNS = ["variant", "metric", "mean", "std", "n", "delta", "tested", "n_pairs", "mean_diff", "p", "ci_low",
                "ci_high", "testable", "significant", "best"]
# The main comparison, in column order; "bf" expands to every boundary-F tolerance present.
MAIN_METRICS = ("miou", "bf", "biou", "gflops", "params_m", "latency_ms", "peak_mem_mb")


@dataclass
class Table:
    """One table of a report, still as numbers.

    ``show`` picks what each cell renders: ``mean``, ``std``, ``delta`` (vs ``reference``, with the
    significance marker) and ``test`` (mean paired difference, p or interval, pairs).
    """

    name: str  # file stem, e.g. "main", "axis_model.num_points"
    title: str
    rows: pd.DataFrame  # index: variant; the fields below plus n_expected/n_finished/n_failed/...
    fields: list[str]  # config fields shown as row descriptors
    metrics: list[str]  # metric columns, in order
    cells: pd.DataFrame  # one row per (variant, metric); see compare()
    reference: str | None  # the variant deltas are taken against (None: no deltas)
    show: tuple[str, ...] = ("mean", "std", "delta")
    notes: list[str] = field(default_factory=list)


def default_metrics(names: list[str]) -> list[str]:
    """:data:`MAIN_METRICS` that are present, ``bf`` expanded by tolerance."""
    out: list[str] = []
    for m in MAIN_METRICS:
        out += bf_metrics(names) if m == "bf" else [m] if m in names else []
    return out


def row_info(df: pd.DataFrame, *, fields: list[str], status: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per variant: the values of ``fields`` and the seed counts of :func:`reports.load.seed_counts`.

    ``status`` is :func:`reports.load.cell_status` (default: computed from ``df`` alone); its variants,
    including planned ones that never ran, are the rows.
    """
    values = runs_frame(df).groupby("variant", sort=False)[fields].first().astype(object)  # ints stay ints
    counts = seed_counts(status if status is not None else cell_status(df))
    return counts.join(values)


def compare(values: pd.DataFrame, *, metrics: list[str], reference: str | None, method: str = "ttest",
            alpha: float = 0.05, variants: list[str] | None = None) -> pd.DataFrame:
    """Per (variant, metric): mean, std (ddof=1), n, delta vs ``reference``, paired test, best flag.

    Args:
        values: finished runs, columns ``variant``, ``seed`` and one per metric
            (:func:`reports.load.finished_values`).
        metrics: the metric columns to summarise.
        reference: the variant deltas and tests are against; None for no deltas.
        method, alpha: see :func:`reports.stats.paired_test`; only accuracy metrics are tested.
        variants: rows to produce (default: those in ``values``); a variant without finished runs gets
            missing numbers.

    Returns:
        columns ``variant``, ``metric``, ``mean``, ``std``, ``n``, ``delta``, ``tested``, ``n_pairs``,
        ``mean_diff``, ``p``, ``ci_low``, ``ci_high``, ``testable``, ``significant``, ``best``.
    """
    if not metrics:  # nothing finished logged a metric
        return pd.DataFrame(columns=CELL_COLUMNS)
    long = _long(values, metrics)
    summary = seed_stats(values, metrics=metrics, variants=variants)
    ref_mean = summary[summary["variant"].eq(reference)].set_index("metric")["mean"]
    ref = summary["metric"].map(ref_mean).astype(float)
    summary["delta"] = (summary["mean"] - ref).where(summary["variant"].ne(reference))
    tests = pd.DataFrame([_test(long, v, m, reference, method, alpha)
                          for v, m in zip(summary["variant"], summary["metric"])])
    return summary.join(tests).pipe(_mark_best)


def _long(values: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (variant, seed, metric) with a value."""
    return (values.melt(id_vars=["variant", "seed"], value_vars=metrics, var_name="metric")
            .dropna(subset=["value"]))


def seed_stats(values: pd.DataFrame, *, metrics: list[str], variants: list[str] | None = None) -> pd.DataFrame:
    """Per (variant, metric): ``mean``, ``std`` (ddof=1; nan with one seed) and ``n`` over the seeds in ``values``.

    Args:
        values: columns ``variant``, ``seed`` and one per metric (:func:`reports.load.finished_values`).
        metrics: the metric columns to summarise.
        variants: rows to produce, in order (default: those in ``values``); one without values gets
            ``n`` 0 and missing numbers.
    """
    variants = variants if variants is not None else list(pd.unique(values["variant"]))
    grid = pd.MultiIndex.from_product([variants, metrics], names=["variant", "metric"])
    return (_long(values, metrics).groupby(["variant", "metric"])["value"].agg(mean="mean", std="std", n="count")
            .reindex(grid).fillna({"n": 0}).astype({"mean": float, "std": float, "n": int}).reset_index())


def _test(long: pd.DataFrame, variant: str, metric: str, reference: str | None, method: str, alpha: float) -> dict:
    """The paired test of one cell; ``tested`` is False for the reference row and non-accuracy metrics."""
    if reference is None or variant == reference or not is_accuracy(metric):
        return {"tested": False, "n_pairs": 0, "mean_diff": np.nan, "p": np.nan, "ci_low": np.nan,
                "ci_high": np.nan, "testable": False, "significant": False}
    per_seed = long[long["metric"].eq(metric)].set_index("seed")
    r = paired_test(per_seed.loc[per_seed["variant"].eq(variant), "value"],
                    per_seed.loc[per_seed["variant"].eq(reference), "value"], method=method, alpha=alpha)
    return {"tested": True, "n_pairs": r.n_pairs, "mean_diff": r.mean_diff, "p": r.p, "ci_low": r.ci_low,
            "ci_high": r.ci_high, "testable": r.testable, "significant": r.significant}


def _direction(metric: str) -> float:
    """+1 higher is better, -1 lower is better, nan: a metric with no direction (never best)."""
    info = lookup(metric)
    return np.nan if info is None else 1.0 if info.higher_is_better else -1.0


def _mark_best(cells: pd.DataFrame) -> pd.DataFrame:
    """``best``: the highest mean (lowest for cost metrics, see :mod:`ddsm.metrics.catalogue`) of each metric;
    ties are all best; metrics the catalogue has no direction for (``step``, ...) have none."""
    sign = cells["metric"].map(_direction).astype(float)
    score = cells["mean"] * sign
    top = score.groupby(cells["metric"]).transform("max")
    return cells.assign(best=np.isclose(score, top, rtol=1e-9, atol=0.0) & score.notna())


def _ordered(variants: list[str], reference: str | None) -> list[str]:
    """The reference first, then the others in their order."""
    return ([reference] if reference in variants else []) + [v for v in variants if v != reference]


def main_table(df: pd.DataFrame, *, reference: str, metrics: list[str] | None = None, method: str = "ttest",
               alpha: float = 0.05, status: pd.DataFrame | None = None) -> Table:
    """One row per variant, the main metrics as columns, deltas and tests vs ``reference``."""
    metrics = metrics or default_metrics(metric_names(df))
    fields = varying_fields(df)
    rows = row_info(df, fields=fields, status=status)
    variants = _ordered(list(rows.index), reference)
    cells = compare(finished_values(df, metrics), metrics=metrics, reference=reference, method=method,
                    alpha=alpha, variants=variants)
    notes = [f"Mean \u00b1 std over the finished seeds; \u0394 vs {reference}; best per column in bold "
             "(highest accuracy, lowest cost).", method_note(method, alpha)]
    return Table(name="main", title="Main comparison", rows=rows.loc[variants], fields=fields, metrics=metrics,
                 cells=cells, reference=reference, notes=notes)


def axis_tables(df: pd.DataFrame, *, reference: str, metrics: list[str] | None = None, method: str = "ttest",
                alpha: float = 0.05, status: pd.DataFrame | None = None) -> list[Table]:
    """One table per varying config field: a sweep over that field with the other fields held fixed.

    The held values are those of the reference variant when it belongs to a sweep of the field (a group
    of variants sharing every other field with at least two values of this one), else those of the
    largest such group. Deltas are vs the reference when it is in the table, else vs the row whose value
    of the field equals the reference's, else none.
    """
    metrics = metrics or default_metrics(metric_names(df))
    fields = varying_fields(df)
    rows = row_info(df, fields=fields, status=status)
    values = finished_values(df, metrics)
    tables = []
    rows = rows[rows[fields].notna().all(axis=1)]  # planned variants that never ran have no config values
    for f in fields:
        others = [g for g in fields if g != f]
        key = rows[others].astype(str).apply(tuple, axis=1) if others else pd.Series([()] * len(rows), rows.index)
        sweeps = [idx for _, idx in rows.groupby(key, sort=False).groups.items() if rows.loc[idx, f].nunique() > 1]
        if not sweeps:
            continue
        members = next((s for s in sweeps if reference in s), max(sweeps, key=len))
        sub = rows.loc[list(members)].pipe(_sort_by, f)
        ref = reference if reference in sub.index else _same_value(sub, f, rows.loc[reference, f])
        held = ", ".join(f"{g}={sub[g].iloc[0]}" for g in others) or "nothing else varies"
        notes = [f"Sweep over {f}; held: {held}."
                 + (f" \u0394 vs {ref}." if ref else " No row matches the reference, so no deltas."),
                 method_note(method, alpha)]
        cells = compare(values, metrics=metrics, reference=ref, method=method, alpha=alpha, variants=list(sub.index))
        tables.append(Table(name=f"axis_{f}", title=f"Ablation: {f}", rows=sub, fields=[f], metrics=metrics,
                            cells=cells, reference=ref, notes=notes))
    return tables


def _sort_by(rows: pd.DataFrame, f: str) -> pd.DataFrame:
    """Rows by increasing numeric value of ``f``; non-numeric values keep their order."""
    numeric = pd.to_numeric(rows[f], errors="coerce")
    return rows.iloc[np.argsort(numeric.to_numpy(), kind="stable")] if numeric.notna().all() else rows


def _same_value(rows: pd.DataFrame, f: str, value: object) -> str | None:
    match = rows.index[rows[f].astype(str).eq(str(value))]
    return match[0] if len(match) else None


def per_class_tables(df: pd.DataFrame, *, reference: str, method: str = "ttest", alpha: float = 0.05,
                     status: pd.DataFrame | None = None) -> list[Table]:
    """Variants x classes: the IoU means, and their deltas vs ``reference`` (empty list: no per-class IoU)."""
    metrics = class_metrics(metric_names(df))
    if not metrics:
        return []
    rows = row_info(df, fields=[], status=status)
    variants = _ordered(list(rows.index), reference)
    cells = compare(finished_values(df, metrics), metrics=metrics, reference=reference, method=method,
                    alpha=alpha, variants=variants)
    means = Table(name="per_class", title="Per-class IoU", rows=rows.loc[variants], fields=[], metrics=metrics,
                  cells=cells, reference=reference, show=("mean",),
                  notes=["Mean IoU over the finished seeds; best per class in bold."])
    deltas = Table(name="per_class_delta", title=f"Per-class IoU: \u0394 vs {reference}",
                   rows=rows.loc[[v for v in variants if v != reference]], fields=[], metrics=metrics,
                   cells=cells, reference=reference, show=("delta",), notes=[method_note(method, alpha)])
    return [means, deltas]


def significance_table(df: pd.DataFrame, *, reference: str, metrics: list[str] | None = None,
                       method: str = "ttest", alpha: float = 0.05, status: pd.DataFrame | None = None) -> Table:
    """Every variant vs ``reference`` on the accuracy metrics: mean paired difference, p (or interval), pairs."""
    metrics = [m for m in (metrics or default_metrics(metric_names(df))) if is_accuracy(m)]
    rows = row_info(df, fields=[], status=status)
    variants = [v for v in rows.index if v != reference]
    cells = compare(finished_values(df, metrics), metrics=metrics, reference=reference, method=method,
                    alpha=alpha, variants=[reference, *variants])
    notes = [f"Mean paired difference vs {reference} over the seeds both finished.", method_note(method, alpha)]
    return Table(name="significance", title=f"Significance vs {reference}", rows=rows.loc[variants], fields=[],
                 metrics=metrics, cells=cells, reference=reference, show=("test",), notes=notes)
