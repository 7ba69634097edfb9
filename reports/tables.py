"""Tables as numbers: pure transforms of the tidy frame (``reports/load.py``); formatting is in ``render.py``.

Every table is a :class:`Table`: a ``rows`` frame (one row per variant: the config fields that vary and
the seed counts) and a long ``cells`` frame (one row per variant and metric: mean, std, n, delta vs the
reference variant, paired test, power, best-in-column flag, bold flag). Means and stds are over the
finished seeds of a variant (one attempt per cell, see :func:`reports.load.select_attempts`); failed,
running and missing seeds are counted in ``rows`` so the renderer can show them, never silently dropped.

Power (:mod:`reports.stats`): every tested cell (an accuracy metric vs the reference) carries the
minimum detectable paired difference ``mdd`` and the seeds that would detect 0.5 points; ``bold`` is
``best`` unless the best accuracy value is within the MDD of its comparison with the reference (or that
comparison cannot be powered), so a bold number is one the seeds run can tell apart. Cost metrics
measured once per variant (the isolated cost phase) carry their interquartile range (``q25``, ``q75``
from the ``<metric>_p25``/``_p75`` metrics).

Descriptor fields: a config field shows for a variant only when its model reads it (the harness logs
only those as params, so the others are missing): no "Branches: dual" for fpn.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ddsm.metrics.catalogue import CLASS_BF_SEP, class_bf_metrics, is_accuracy, lookup, tolerance_of
from reports.load import (bf_metrics, cell_status, class_metrics, finished_values, metric_names, runs_frame,
                          seed_counts, varying_fields)
from reports.stats import TARGET_POINTS, method_note, paired_test, power_analysis, power_note

__all__ = ["MAIN_METRICS", "Table", "axis_tables", "compare", "main_table", "per_class_bf_table", "per_class_tables", "power_table",
           "row_info", "seed_stats", "significance_table"]

CELL_COLUMNS = ["variant", "metric", "mean", "std", "n", "delta", "tested", "n_pairs", "mean_diff", "p", "ci_low",
                "ci_high", "testable", "significant", "sd_diff", "mdd", "seeds_needed", "q25", "q75", "best", "bold"]
IQR_SUFFIXES = ("_p25", "_p75")  # <metric>_p25 / _p75: the interquartile range of a cost measured once per variant
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
    show: tuple[str, ...] = ("mean", "std", "delta")  # or ("test",), ("power",)
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
    including planned ones that never ran, are the rows. A field the variant's model does not read is missing.
    """
    values = runs_frame(df).groupby("variant", sort=False)[fields].first().astype(object)  # ints stay ints
    counts = seed_counts(status if status is not None else cell_status(df))
    return counts.join(values)


def compare(values: pd.DataFrame, *, metrics: list[str], reference: str | None, method: str = "ttest",
            alpha: float = 0.05, variants: list[str] | None = None) -> pd.DataFrame:
    """Per (variant, metric): mean, std (ddof=1), n, delta vs ``reference``, paired test, power, IQR, best, bold.

    Args:
        values: finished runs, columns ``variant``, ``seed`` and one per metric
            (:func:`reports.load.finished_values`); ``<metric>_p25``/``_p75`` columns, when present, give ``q25``
            and ``q75``.
        metrics: the metric columns to summarise.
        reference: the variant deltas and tests are against; None for no deltas.
        method, alpha: see :func:`reports.stats.paired_test`; only accuracy metrics are tested.
        variants: rows to produce (default: those in ``values``); a variant without finished runs gets
            missing numbers.

    Returns:
        columns :data:`CELL_COLUMNS`.
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
    return summary.join(tests).join(_iqr(values, summary)).pipe(_mark_best, reference=reference)


def _iqr(values: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """``q25``/``q75`` per (variant, metric) from the ``<metric>_p25``/``_p75`` columns (mean over seeds; they are
    one measurement per variant), aligned with ``summary``."""
    out = pd.DataFrame(np.nan, index=summary.index, columns=["q25", "q75"])
    for col, suffix in zip(out.columns, IQR_SUFFIXES):
        for metric in summary["metric"].unique():
            if metric + suffix in values:
                means = values.groupby("variant")[metric + suffix].mean()
                rows = summary["metric"].eq(metric)
                out.loc[rows, col] = summary.loc[rows, "variant"].map(means).to_numpy(dtype=float)
    return out


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


_UNTESTED = {"tested": False, "n_pairs": 0, "mean_diff": np.nan, "p": np.nan, "ci_low": np.nan, "ci_high": np.nan,
             "testable": False, "significant": False, "sd_diff": np.nan, "mdd": np.nan, "seeds_needed": np.nan}


def _test(long: pd.DataFrame, variant: str, metric: str, reference: str | None, method: str, alpha: float) -> dict:
    """The paired test and power of one cell; ``tested`` is False for the reference row and non-accuracy metrics."""
    if reference is None or variant == reference or not is_accuracy(metric):
        return dict(_UNTESTED)
    per_seed = long[long["metric"].eq(metric)].set_index("seed")
    mine = per_seed.loc[per_seed["variant"].eq(variant), "value"]
    base = per_seed.loc[per_seed["variant"].eq(reference), "value"]
    r = paired_test(mine, base, method=method, alpha=alpha)
    info = lookup(metric)
    target = TARGET_POINTS / (info.scale if info is not None else 1.0)  # 0.5 points of a metric shown in %
    pw = power_analysis(mine, base, target=target, alpha=alpha)
    return {"tested": True, "n_pairs": r.n_pairs, "mean_diff": r.mean_diff, "p": r.p, "ci_low": r.ci_low,
            "ci_high": r.ci_high, "testable": r.testable, "significant": r.significant, "sd_diff": pw.sd_diff,
            "mdd": pw.mdd, "seeds_needed": np.nan if pw.seeds_for_target is None else pw.seeds_for_target}


def _direction(metric: str) -> float:
    """+1 higher is better, -1 lower is better, nan: a metric with no direction (never best)."""
    info = lookup(metric)
    return np.nan if info is None else 1.0 if info.higher_is_better else -1.0


def _mark_best(cells: pd.DataFrame, *, reference: str | None = None) -> pd.DataFrame:
    """``best``: the highest mean (lowest for cost metrics, see :mod:`ddsm.metrics.catalogue`) of each metric;
    ties are all best; metrics the catalogue has no direction for (``step``, ...) have none.

    ``bold``: ``best``, except for a tested (accuracy) metric where the comparison with the reference cannot
    tell it apart: a best variant whose ``|delta|`` is below its ``mdd`` (or whose MDD is unknown), or a best
    reference that some variant is within its MDD of.
    """
    sign = cells["metric"].map(_direction).astype(float)
    score = cells["mean"] * sign
    top = score.groupby(cells["metric"]).transform("max")
    cells = cells.assign(best=np.isclose(score, top, rtol=1e-9, atol=0.0) & score.notna())
    detectable = cells["delta"].abs() >= cells["mdd"]  # False where either is nan
    tested = cells.groupby("metric")["tested"].transform("any")
    bold = cells["best"].copy()
    for metric in cells.loc[tested, "metric"].unique():
        rows = cells["metric"].eq(metric)
        others = rows & cells["variant"].ne(reference) & cells["n"].gt(0)
        ref_clear = bool(detectable[others].all()) if others.any() else False
        bold[rows] = cells.loc[rows, "best"] & np.where(cells.loc[rows, "variant"].eq(reference), ref_clear,
                                                        detectable[rows])
    return cells.assign(bold=bold.astype(bool))


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
    cells = compare(_values_with_iqr(df, metrics), metrics=metrics, reference=reference, method=method,
                    alpha=alpha, variants=variants)
    notes = [f"Mean \u00b1 std over the finished seeds; \u0394 vs {reference}; best per column in bold "
             "(highest accuracy, lowest cost), withheld for accuracy where the difference to the baseline is below "
             "its minimum detectable difference (see Statistical power).", method_note(method, alpha)]
    if cells["q25"].notna().any():
        notes.append("Costs measured once per variant (isolated cost phase): median [p25\u2013p75] of the timed calls.")
    return Table(name="main", title="Main comparison", rows=rows.loc[variants], fields=fields, metrics=metrics,
                 cells=cells, reference=reference, notes=notes)


def _values_with_iqr(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """:func:`reports.load.finished_values` of ``metrics`` plus their ``_p25``/``_p75`` columns where logged."""
    names = set(metric_names(df))
    extra = [m + sfx for m in metrics for sfx in IQR_SUFFIXES if m + sfx in names and m + sfx not in metrics]
    return finished_values(df, metrics + extra)


def power_table(df: pd.DataFrame, *, reference: str, metrics: list[str] | None = None, method: str = "ttest",
                alpha: float = 0.05, status: pd.DataFrame | None = None) -> Table:
    """Every variant vs ``reference`` on the accuracy metrics: the minimum detectable paired difference at
    power 0.8 and the seeds that would detect 0.5 points (:mod:`reports.stats`)."""
    metrics = [m for m in (metrics or default_metrics(metric_names(df))) if is_accuracy(m)]
    rows = row_info(df, fields=[], status=status)
    variants = [v for v in rows.index if v != reference]
    cells = compare(finished_values(df, metrics), metrics=metrics, reference=reference, method=method,
                    alpha=alpha, variants=[reference, *variants])
    notes = [f"Per variant vs {reference}: the minimum detectable difference (points), and in parentheses the seeds "
             f"that would detect {TARGET_POINTS:g} points.", power_note(alpha)]
    return Table(name="power", title=f"Statistical power vs {reference}", rows=rows.loc[variants], fields=[],
                 metrics=metrics, cells=cells, reference=reference, show=("power",), notes=notes)


def axis_tables(df: pd.DataFrame, *, reference: str, metrics: list[str] | None = None, method: str = "ttest",
                alpha: float = 0.05, status: pd.DataFrame | None = None) -> list[Table]:
    """One table per varying config field: a sweep over that field with the other fields held fixed.

    A sweep of field F is a group of variants that read F, take distinct values of it (at least two) and
    agree on every other field where both read it; a field only some members read (e.g. ``model.branches``
    on a sweep of ``model.name``) is not "held" but shown as a column, missing for the models that do not
    read it. Among the sweeps, the one holding the reference variant, else the largest; ties go to the
    one whose values are the config defaults most often (``ddsm.config``), then to the first. Deltas are
    vs the reference when it is in the table; when the reference's model does not read F it heads the
    table as the baseline row; otherwise vs the row whose value of F equals the reference's, else none.
    """
    metrics = metrics or default_metrics(metric_names(df))
    fields = varying_fields(df)
    rows = row_info(df, fields=fields, status=status)
    values = _values_with_iqr(df, metrics)
    tables = []
    rows = rows[rows[fields].notna().any(axis=1)] if fields else rows  # planned variants never run have no values
    for f in fields:
        others = [g for g in fields if g != f]
        sweeps = _sweeps(rows, f, others)
        if not sweeps:
            continue
        members = max(sweeps, key=lambda m: (reference in m, len(m), _defaults_held(rows.loc[m], others),
                                             -sweeps.index(m)))
        sub = rows.loc[members].pipe(_sort_by, f)
        ref = reference if reference in sub.index else None
        if ref is None and reference in rows.index and pd.isna(rows.loc[reference, f]):
            sub, ref = pd.concat([rows.loc[[reference]], sub]), reference  # e.g. fpn above a sweep of DDSM options
        elif ref is None and reference in rows.index:
            ref = _same_value(sub, f, rows.loc[reference, f])
        members_only = [m for m in sub.index if m != reference or reference in members]
        held = [g for g in others if sub.loc[members_only, g].notna().all()]
        partial = [g for g in others if g not in held and sub.loc[members_only, g].notna().any()]
        held_text = ", ".join(f"{g}={sub.loc[members_only, g].iloc[0]}" for g in held) or "nothing else varies"
        notes = [f"Sweep over {f}; held: {held_text}."
                 + (f" Fields only some models read are shown where they do ({', '.join(partial)})." if partial else "")
                 + (f" \u0394 vs {ref}." if ref else " No row matches the reference, so no deltas."),
                 method_note(method, alpha)]
        cells = compare(values, metrics=metrics, reference=ref, method=method, alpha=alpha, variants=list(sub.index))
        tables.append(Table(name=f"axis_{f}", title=f"Ablation: {f}", rows=sub, fields=[f, *partial],
                            metrics=metrics, cells=cells, reference=ref, notes=notes))
    return tables


def _sweeps(rows: pd.DataFrame, f: str, others: list[str]) -> list[list[str]]:
    """Every distinct group of variants sweeping ``f`` (see :func:`axis_tables`), in order of first anchor."""
    readers = rows[rows[f].notna()]
    text = readers[others].astype(str).where(readers[others].notna())
    found: list[list[str]] = []
    for anchor in readers.index:
        a = text.loc[anchor]
        # a member agrees with the anchor on every field the anchor reads, or does not read it; it reads no
        # field the anchor does not (that field would vary inside the group)
        members = [v for v in readers.index
                   if all(pd.isna(text.loc[v, g]) if pd.isna(a[g])
                          else pd.isna(text.loc[v, g]) or text.loc[v, g] == a[g] for g in others)]
        values = readers.loc[members, f].astype(str)
        if values.nunique() > 1 and values.is_unique and members not in found:
            found.append(members)
    return found


def _defaults_held(rows: pd.DataFrame, fields: list[str]) -> int:
    """How many (row, field) values equal the TrialConfig default of that field (a tie-breaker)."""
    from ddsm.config import TrialConfig, to_dict

    from reports.load import coerce_param

    defaults = {f"{section}.{k}": v for section, d in to_dict(TrialConfig()).items() for k, v in d.items()}
    return int(sum(str(coerce_param(str(v))) == str(defaults.get(f)) for f in fields for v in rows[f].dropna()))


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


def per_class_bf_table(df: pd.DataFrame, *, reference: str, bf: str | None = None, method: str = "ttest",
                       alpha: float = 0.05, status: pd.DataFrame | None = None) -> Table | None:
    """Variants x classes: the boundary F of every class at tolerance ``bf`` (default: the smallest logged),
    mean over the finished seeds with the delta vs ``reference``; None when no per-class boundary F was read."""
    bfs = sorted({m.partition(CLASS_BF_SEP)[0] for m in class_bf_metrics(metric_names(df))}, key=tolerance_of)
    bf = bf if bf is not None else (bfs[0] if bfs else None)
    metrics = class_bf_metrics(metric_names(df), bf) if bf else []
    if not metrics:
        return None
    rows = row_info(df, fields=[], status=status)
    variants = _ordered(list(rows.index), reference)
    cells = compare(finished_values(df, metrics), metrics=metrics, reference=reference, method=method,
                    alpha=alpha, variants=variants)
    label = lookup(bf).label
    return Table(name="per_class_bf", title=f"Per-class boundary F ({label})", rows=rows.loc[variants], fields=[],
                 metrics=metrics, cells=cells, reference=reference, show=("mean", "delta"),
                 notes=[f"Mean {label} per class over the finished seeds (\u0394 vs {reference}); best per class "
                        "in bold.", method_note(method, alpha)])


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
